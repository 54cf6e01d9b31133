"""`latentdiff generate` on a tiny random stand-in for the built-in model (tests/_support/tiny_builtin.py).

The images are checked against direct pipeline calls with the same settings and seeds (the same batch
composition: a batch's matrix products may round differently from a lone image's), `--from` against the
file it reads (same pixels, same parameters), and a two-process `accelerate launch` run against a one-process
run (the same file bytes). Bad input: exit code 2, one error line and a hint, no traceback, nothing written,
and the model never loaded.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import __version__
from latentdiff.cli import main
from latentdiff.diffusion.samplers import EulerSampler
from latentdiff.errors import UsageError
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import make_grid, read_png_params
from tests._support.cli import BUILTIN, PROMPT, generate, pixels
from tests._support.server import free_port

pytestmark = pytest.mark.usefixtures("offline_builtin")


@pytest.fixture(scope="module")
def pipe(model):
    return LatentDiffusionPipeline.from_pretrained(model)


def reference(pipe, prompts: list[str], seeds: list[int], n: int = 1, **settings) -> list[np.ndarray]:
    """What the pipeline itself makes for these prompts in one batch: one array per prompt (a grid when n > 1)."""
    settings = {"num_inference_steps": 4, "guidance_scale": 3.0} | settings
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = pipe(prompts, num_images_per_prompt=n, generator=generators, progress=False, **settings).images
    per_prompt = [images[k * n:(k + 1) * n] for k in range(len(prompts))]
    return [np.asarray(group[0] if n == 1 else make_grid(group)) for group in per_prompt]


def test_out_of_the_box_uses_the_builtin_model_and_its_settings(tmp_path, pipe, capsys):
    assert generate(PROMPT, "-o", "out.png", "--seed", 0) == 0
    assert capsys.readouterr().out.strip() == "out.png"
    params = read_png_params("out.png")
    assert params == {"prompt": PROMPT, "negative": None, "seed": 0, "steps": 4, "guidance": 3.0, "sampler": "ddim",
                      "eta": 0.0, "height": 64, "width": 64, "n": 1, "model": BUILTIN, "dtype": "float32",
                      "tokenizer": None, "latentdiff": __version__, "batch": 1,
                      "schedule": None}
    assert np.array_equal(pixels("out.png"), reference(pipe, [PROMPT], [0])[0])
    with Image.open("out.png") as image:           # the human-readable chunk other tools show
        assert image.text["parameters"].startswith(PROMPT + "\nSteps: 4, Sampler: DDIM, CFG scale: 3, Seed: 0")

    assert generate("--from", "out.png") == 0      # no -o: beside the source, never over it
    assert np.array_equal(pixels("out-reproduced.png"), pixels("out.png"))
    assert read_png_params("out-reproduced.png") == params


def test_flags_override_settings_and_from_reproduces_a_grid(pipe):
    flags = ["-n", 3, "--seed", 7, "--negative", "green", "--steps", 3, "--guidance", 2.5, "--sampler", "euler"]
    assert generate(PROMPT, "-o", "grid.png", "--grid", *flags) == 0
    params = read_png_params("grid.png")
    assert [read_png_params(f"grid-{i}.png")["seed"] for i in range(3)] == [7, 8, 9]   # and each image alone
    assert {k: params[k] for k in ("n", "seed", "negative", "steps", "guidance", "sampler", "eta")} == \
        {"n": 3, "seed": 7, "negative": "green", "steps": 3, "guidance": 2.5, "sampler": "euler", "eta": None}
    # seeds seed .. seed + n - 1; euler keeps the timestep settings of the model's sampler (as diffusers' from_config)
    euler_pipe = copy.copy(pipe)
    euler_pipe.sampler = EulerSampler(timestep_spacing=pipe.sampler.timestep_spacing,
                                      steps_offset=pipe.sampler.steps_offset)
    expected = reference(euler_pipe, [PROMPT], [7, 8, 9], n=3, negative_prompt="green", num_inference_steps=3,
                         guidance_scale=2.5)
    assert np.array_equal(pixels("grid.png"), expected[0])

    assert generate("--from", "grid.png", "-o", "again.png", "--grid") == 0
    assert np.array_equal(pixels("again.png"), pixels("grid.png"))
    assert read_png_params("again.png") == params
    assert generate("--from", "grid.png", "-o", "fewer.png", "--steps", 2, "--grid") == 0   # a flag given wins
    assert read_png_params("fewer.png") == params | {"steps": 2}
    assert not np.array_equal(pixels("fewer.png"), pixels("grid.png"))


def test_prompt_file_one_png_per_image_with_its_own_seed(tmp_path, pipe, capsys):
    prompts = ["a red circle", "a blue square on the left", "green triangle"]
    (tmp_path / "prompts.txt").write_text(f"\n{prompts[0]}\n\n  {prompts[1]}  \n{prompts[2]}\n", encoding="utf-8")
    (tmp_path / "samples").mkdir()
    argv = ["--prompts", "prompts.txt", "-o", "samples", "-n", 2, "--seed", 10, "--batch-size", 4, "--grid"]
    assert generate(*argv) == 0
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert capsys.readouterr().out.split() == [f"samples/{name}" for name in files]   # every file, in order
    # prompt k: its images (seeds seed + k * n + i), then its grid; a call holds at most 4 images: prompts 0 and 1
    assert files == ["00000-10.png", "00001-11.png", "00002-grid-10.png", "00003-12.png", "00004-13.png",
                     "00005-grid-12.png", "00006-14.png", "00007-15.png", "00008-grid-14.png"]
    for k, prompt in enumerate(prompts):
        for i in range(2):
            params = read_png_params(tmp_path / "samples" / files[3 * k + i])
            assert (params["prompt"], params["seed"], params["n"], params["batch"]) == (prompt, 10 + 2 * k + i, 1,
                                                                                        4 if k < 2 else 2)
        params = read_png_params(tmp_path / "samples" / files[3 * k + 2])
        assert (params["prompt"], params["seed"], params["n"]) == (prompt, 10 + 2 * k, 2)
    generators = [torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)]
    first_call = pipe(prompts[:2], num_images_per_prompt=2, generator=generators, progress=False,
                      num_inference_steps=4, guidance_scale=3.0).images
    for name, image in zip(files[:2] + files[3:5], first_call, strict=True):
        assert np.array_equal(pixels(f"samples/{name}"), np.asarray(image)), name
    assert np.array_equal(pixels("samples/00002-grid-10.png"), np.asarray(make_grid(first_call[:2])))

    assert generate("--from", "samples/00008-grid-14.png", "-o", "two.png", "--grid") == 0   # made alone: exact
    assert np.array_equal(pixels("two.png"), pixels("samples/00008-grid-14.png"))
    assert generate("--from", "samples/00002-grid-10.png", "-o", "zero.png") == 0   # a batch of 4 images: a note
    assert "batch of 4 images" in capsys.readouterr().err
    assert [read_png_params(f"zero-{i}.png")["seed"] for i in range(2)] == [10, 11]


def test_two_processes_write_each_image_once_with_the_same_bytes(tmp_path, model):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\ngreen triangle\nred square\nblue circle\n")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    common = ["--prompts", tmp_path / "prompts.txt", "--model", model, "--batch-size", 2, "--seed", 3, "--steps", 2]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "latentdiff.cli", "generate",
               *map(str, common), "-o", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true",
               HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # batches [0, 1], [2, 3], [4] are dealt out in turn: process 0 takes the first and the last
    assert "process 0 of 2 wrote 3 file(s)" in result.stderr and "process 1 of 2 wrote 2 file(s)" in result.stderr

    assert generate(*common, "-o", tmp_path / "one") == 0
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in two] == [p.name for p in one] == [f"{k:05d}-{3 + k}.png" for k in range(5)]
    assert result.stdout.split() == [str(path) for path in two]     # the main process names every file
    for a, b in zip(one, two, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_single_file_model_gives_the_folder_model_images(tmp_path, model, pipe):
    pipe.save_single_file(tmp_path / "shapes.safetensors")
    flags = ["--steps", 4, "--guidance", 3.0, "--height", 64, "--width", 64]   # a single file has no settings
    assert generate(PROMPT, "-o", "file.png", "--model", "shapes.safetensors", "--tokenizer", model / "tokenizer",
                    "--seed", 0, *flags) == 0
    assert np.array_equal(pixels("file.png"), reference(pipe, [PROMPT], [0])[0])
    # stored as what resolves from anywhere (`--from` in another folder): the absolute path
    assert read_png_params("file.png")["model"] == str((tmp_path / "shapes.safetensors").resolve())
    assert read_png_params("file.png")["tokenizer"] == str((model / "tokenizer").resolve())


def test_a_hub_model_in_the_cache_works_offline(tmp_path, model, pipe):
    repo = tmp_path / "hub-cache" / "models--someone--shapes"
    shutil.copytree(model, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert generate(PROMPT, "-o", "hub.png", "--model", "someone/shapes", "--seed", 0) == 0
    assert np.array_equal(pixels("hub.png"), reference(pipe, [PROMPT], [0])[0])   # its generate settings too
    assert read_png_params("hub.png")["model"] == "someone/shapes"


def test_a_word_outside_the_vocabulary_warns_once(capsys):
    assert generate("a purple circle, violet background", "-o", "w.png", "--steps", 1) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'purple'" in warnings[0] and "'violet'" in warnings[0] and "[UNK]" in warnings[0]


def bad_cases(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "latin1.txt").write_bytes("a red circle\nun carr\u00e9 bleu\n".encode("latin-1"))
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    return {
        "unknown model": (["x", "--model", "someone/no-such-model"], ["Hub cache", BUILTIN]),
        "path-like model": (["x", "--model", "./no/such/folder"], ["no such model folder", BUILTIN]),
        "empty prompt file": (["--prompts", "empty.txt", "-o", "."], ["empty.txt", "an empty file"]),
        "blank prompt file": (["--prompts", "blank.txt", "-o", "."], ["blank.txt", "only blank lines"]),
        "not utf-8": (["--prompts", "latin1.txt", "-o", "."], ["latin1.txt, line 2, byte 20", "0xe9"]),
        "n = 0": (["x", "-n", "0"], ["-n", ">= 1"]),
        "missing folder": (["x", "-o", "no/such/dir/out.png"], ["output folder does not exist", "no/such/dir"]),
        "--prompts needs a folder": (["--prompts", "blank.txt", "-o", "out.png"], ["existing folder"]),
        "no parameters": (["--from", "plain.png"], ["no latentdiff generation parameters", "plain.png"]),
        "no --from file": (["--from", "gone.png"], ["no such file", "gone.png"]),
        "no prompt": ([], ["no prompt given"]),
        "unknown sampler": (["x", "--sampler", "warp_drive"], ["unknown sampler", "euler_ancestral"]),
        "eta without eta": (["x", "--sampler", "euler", "--eta", "0.5"], ["no eta"]),
        "tokenizer for a folder": (["x", "--tokenizer", "tok"], ["single-file"]),
    }


CASES = ["unknown model", "path-like model", "empty prompt file", "blank prompt file", "not utf-8", "n = 0",
         "missing folder", "--prompts needs a folder", "no parameters", "no --from file", "no prompt",
         "unknown sampler", "eta without eta", "tokenizer for a folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_a_hint_before_any_loading(case, tmp_path, monkeypatch, capsys):
    argv, words = bad_cases(tmp_path)[case]

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", never)
    monkeypatch.setattr(LatentDiffusionPipeline, "from_single_file", never)
    before = sorted(tmp_path.iterdir())
    assert generate(*argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("latentdiff: error: ") and err[1].startswith("hint: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert sorted(tmp_path.iterdir()) == before     # nothing written, not even a temporary file


def test_a_builtin_model_missing_from_the_package_is_named(monkeypatch, capsys):
    import latentdiff.builtin as builtin

    monkeypatch.setattr(builtin, "BUILTIN_MODELS", {**builtin.BUILTIN_MODELS, "latentdiff/absent": "absent"})
    assert generate("x", "--model", "latentdiff/absent") == 2
    assert "not installed" in capsys.readouterr().err
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"built-in model {BUILTIN}: installed at" in out and "built-in model latentdiff/absent: not installed" in out


def test_debug_shows_the_exception(capsys):
    with pytest.raises(UsageError, match="-n"):
        main(["--debug", "generate", "x", "-n", "0"])
    with pytest.raises(UsageError, match="-n"):
        main(["generate", "x", "-n", "0", "--debug"])


def test_the_old_module_paths_still_import():
    import latentdiff.cli_generate as old
    from latentdiff.cli import generate

    assert old.UsageError is UsageError and old.cmd_generate is generate.cmd_generate
