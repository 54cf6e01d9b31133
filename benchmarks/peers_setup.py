"""The shared weights of benchmarks/cpu_peers.py, built once into one folder (default /work/peers/weights):

    sd15/                    diffusers folder: random-weight SD 1.5 (benchmarks/common.py `build_sd15`, seed 0)
    sd15.safetensors         the same weights as one original-layout file (latentdiff `save_single_file`), fp32
    sd15-f16.gguf            stable-diffusion.cpp's conversion of that file (`sd-cli -M convert --type f16`)
    sd15-q8_0.gguf           the same, q8_0
    openvino-fp32/           optimum-intel's export of sd15/ to OpenVINO IR, weights uncompressed
    openvino-int8/           that IR with 8-bit weight compression (NNCF, OVWeightQuantizationConfig(bits=8))

Each step is skipped when its output exists, and each runs in a child process so that no two copies of the
weights are in memory at once. Steps whose tool is missing are skipped with a message.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import common

SINGLE_FILE = """
from latentdiff import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained({folder!r}, mmap_weights=True)
print(pipe.save_single_file({path!r}))
"""

# load_in_8bit=False: optimum-intel compresses the weights of large models to 8 bits by default on export.
# The venv's transformers (5.5) reads CLIP text encoders only in the "text_model."-prefixed layout, which
# transformers >= 5.24 no longer writes: it reported every weight of sd15/text_encoder as missing and exported a
# freshly initialised CLIP (the ~16-level image difference of RESULTS.md "OpenVINO image difference, explained").
# So the export reads a hard-linked copy of the folder whose text encoder has the prefixed names, refuses a text
# encoder with missing or unexpected weights, and writes latentdiff-export.json (what cpu_peers checks) last.
OV_STAMP = "latentdiff-export.json"


def readable_copy(folder: Path, copy: Path) -> int:
    """Hard-link `folder` (a diffusers folder) to `copy`, its text encoder's weights renamed to transformers' older
    "text_model."-prefixed layout where they lack it; check this interpreter's transformers reads every weight
    (SystemExit otherwise). Returns the number of text encoder tensors. Runs in the OpenVINO venv (OV_EXPORT)."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    shutil.copytree(folder, copy, copy_function=os.link)
    weights = copy / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    if not all(key.startswith("text_model.") for key in state):
        weights.unlink()  # a hard link: never write through it into the source (safetensors 0.8 replaces anyway)
        save_file({"text_model." + key: value for key, value in state.items()}, weights, metadata={"format": "pt"})
    _, info = CLIPTextModel.from_pretrained(copy / "text_encoder", output_loading_info=True)
    bad = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if bad:
        raise SystemExit(f"transformers cannot read {folder}/text_encoder: {bad}")
    return len(state)


OV_EXPORT = """
import json, tempfile
from importlib.metadata import version
from pathlib import Path
from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig
{readable_copy}
path = Path({path!r})
if {int8!r}:  # the fp32 IR's weights compressed by NNCF: no second PyTorch export
    options = dict(quantization_config=OVWeightQuantizationConfig(bits=8))
    pipe = OVStableDiffusionPipeline.from_pretrained({folder!r}, compile=False, **options)
    pipe.save_pretrained(path)
    checked = json.loads((Path({folder!r}) / {stamp!r}).read_text())["text_encoder_weights_read"]
else:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        checked = readable_copy(Path({folder!r}), Path(tmp) / "source")
        pipe = OVStableDiffusionPipeline.from_pretrained(Path(tmp) / "source", export=True, compile=False,
                                                         load_in_8bit=False)
        pipe.save_pretrained(path)
versions = {{name: version(name) for name in ("openvino", "optimum-intel", "transformers", "diffusers")}}
stamp = dict(source={folder!r}, text_encoder_weights_read=checked, versions=versions)
(path / {stamp!r}).write_text(json.dumps(stamp, indent=1))
"""


EXPORT_HELPER = inspect.getsource(readable_copy)   # OV_EXPORT imports Path before it


def step(what: str, done: Path, cmd: list[str]) -> None:
    if done.exists():
        print(f"{what}: {done} exists", flush=True)
        return
    print(f"{what}: building {done} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=str(common.REPO),
                   env={"PYTHONPATH": str(common.REPO / "src"), **dict(__import__("os").environ)})


def setup(weights: Path, *, sdcpp: Path, ov_python: Path) -> None:
    weights.mkdir(parents=True, exist_ok=True)
    folder, single = weights / "sd15", weights / "sd15.safetensors"
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, str(Path(common.__file__)), "build", "sd15", str(folder)], check=True,
                       cwd=str(common.REPO))
    step("single file", single, [sys.executable, "-c", SINGLE_FILE.format(folder=str(folder), path=str(single))])
    if sdcpp.is_file():
        for kind in ("f16", "q8_0"):
            step(f"GGUF {kind}", weights / f"sd15-{kind}.gguf",
                 [str(sdcpp), "-M", "convert", "-m", str(single), "-o", str(weights / f"sd15-{kind}.gguf"),
                  "--type", kind])
    else:
        print(f"stable-diffusion.cpp: no {sdcpp}, GGUF files skipped (benchmarks/PEERS.md)")
    if ov_python.is_file():
        for name, source in (("openvino-fp32", folder), ("openvino-int8", weights / "openvino-fp32")):
            path = weights / name
            step(f"OpenVINO IR {name}", path / OV_STAMP,  # an IR without it predates the text encoder fix
                 [str(ov_python), "-c", OV_EXPORT.format(folder=str(source), path=str(path), int8=name.endswith("8"),
                                                    stamp=OV_STAMP, readable_copy=EXPORT_HELPER)])
    else:
        print(f"OpenVINO: no {ov_python}, IR skipped (benchmarks/PEERS.md)")
