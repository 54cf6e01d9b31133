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
OV_EXPORT = """
from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig
if {int8!r}:  # the fp32 IR's weights compressed by NNCF: no second PyTorch export
    options = dict(quantization_config=OVWeightQuantizationConfig(bits=8))
    pipe = OVStableDiffusionPipeline.from_pretrained({folder!r}, compile=False, **options)
else:
    pipe = OVStableDiffusionPipeline.from_pretrained({folder!r}, export=True, compile=False, load_in_8bit=False)
pipe.save_pretrained({path!r})
"""


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
            step(f"OpenVINO IR {name}", path / "model_index.json",
                 [str(ov_python), "-c", OV_EXPORT.format(folder=str(source), path=str(path), int8=name.endswith("8"))])
    else:
        print(f"OpenVINO: no {ov_python}, IR skipped (benchmarks/PEERS.md)")
