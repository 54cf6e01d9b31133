"""`latentdiff generate`'s outputs as AUTOMATIC1111 users expect them (issue 15): a random seed unless one is given
(printed, recorded, reproduced by `--from`), `--batch-size` / `--batch-count` as A1111's batch size / n_iter, one file
per image (and a grid with `--grid`), auto-numbered names that never overwrite, `--overwrite`, `--format`, and
stdout listing every file written. On a tiny random stand-in for the built-in model (tests/_support/tiny_builtin.py),
in-process; two subprocess runs prove the entry points."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import latentdiff.cli.generate_outputs as generate_outputs
from latentdiff.cli import main
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import PROMPT, pixels
from tests._support.server import free_port

pytestmark = pytest.mark.usefixtures("offline_builtin")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def calls(monkeypatch):
    """The number of images of every pipeline call made."""
    made: list[int] = []
    call = LatentDiffusionPipeline.__call__

    def counting(self, *args, **kwargs):
        made.append(len(kwargs["generator"]))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", counting)
    return made


def generate(capsys, *argv) -> tuple[int, list[str], str]:
    """(exit status, the lines of stdout, stderr) of `latentdiff generate ARGV`."""
    capsys.readouterr()
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def files(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


# ---- the seed ----------------------------------------------------------------------------------------------------
def test_no_seed_draws_a_random_one_printed_recorded_and_reproduced(capsys):
    code, out, err = generate(capsys, PROMPT, "--steps", 2)
    assert code == 0
    [name] = files("outputs")                   # no -o: ./outputs/, made for it
    seed = read_png_params(f"outputs/{name}")["seed"]
    assert 0 <= seed < 2**32 and name == f"00000-{seed}.png" and out == [f"outputs/{name}"]
    assert f"latentdiff: seed {seed}\n" in err
    code, out, err = generate(capsys, "--from", f"outputs/{name}", "-o", "again.png")
    assert code == 0 and out == ["again.png"] and "latentdiff: seed" not in err     # the PNG's seed, as is
    assert np.array_equal(pixels("again.png"), pixels(f"outputs/{name}"))
    assert read_png_params("again.png")["seed"] == seed


def test_seed_minus_one_is_random_and_a_given_seed_is_not(capsys, monkeypatch):
    monkeypatch.setattr(generate_outputs.secrets, "randbelow", lambda bound: bound - 1)   # the top of the range
    code, out, err = generate(capsys, PROMPT, "--steps", 1, "--seed", -1, "-o", "a.png")
    assert code == 0 and "latentdiff: seed 4294967295" in err and read_png_params("a.png")["seed"] == 2**32 - 1
    code, out, err = generate(capsys, PROMPT, "--steps", 1, "--seed", 0, "-o", "b.png")
    assert code == 0 and "latentdiff: seed" not in err and read_png_params("b.png")["seed"] == 0
    code, out, err = generate(capsys, "--from", "b.png", "--seed", -1, "-o", "c.png")   # -1 beats the PNG's
    assert code == 0 and read_png_params("c.png")["seed"] == 2**32 - 1


# ---- batches -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, made", [
    (["--batch-size", 2, "--batch-count", 3], [2, 2, 2]),       # A1111: n = batch size x batch count
    (["--batch-count", 3], [1, 1, 1]),                          # A1111's default batch size: 1
    (["-n", 5, "--batch-size", 2], [2, 2, 1]),                  # -n: calls of at most --batch-size images
    (["-n", 6, "--batch-count", 2], [3, 3]),                    # two of three set the third
    (["-n", 5], [5]),                                           # default --batch-size 8
])
def test_batch_size_and_count_as_a1111_with_seeds_independent_of_batching(capsys, calls, flags, made):
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 40, *flags)
    assert code == 0 and calls == made
    n = sum(made)
    assert files("outputs") == [f"{i:05d}-{40 + i}.png" for i in range(n)]
    assert out == [f"outputs/{i:05d}-{40 + i}.png" for i in range(n)]
    assert [read_png_params(f"outputs/{i:05d}-{40 + i}.png")["seed"] for i in range(n)] == list(range(40, 40 + n))


def test_prompt_files_keep_prompts_per_call_at_one_image_each(tmp_path, capsys, calls):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\ngreen triangle\n")
    code, out, _ = generate(capsys, "--prompts", "prompts.txt", "--steps", 1, "--seed", 3, "--batch-size", 2)
    assert code == 0 and calls == [2, 1]     # --batch-size 2: two prompts a call, as before issue 15
    assert out == ["outputs/00000-3.png", "outputs/00001-4.png", "outputs/00002-5.png"]
    calls.clear()
    code, out, _ = generate(capsys, "--prompts", "prompts.txt", "--steps", 1, "--seed", 3, "-n", 3,
                            "--batch-size", 2, "--grid")
    assert code == 0 and calls == [2, 1, 2, 1, 2, 1]   # a prompt of 3 images split into calls of 2
    assert out[:4] == ["outputs/00003-3.png", "outputs/00004-4.png", "outputs/00005-5.png",
                       "outputs/00006-grid-3.png"]   # numbered on after the first run's files
    assert len(out) == 12 and read_png_params("outputs/00014-grid-9.png")["n"] == 3


def test_from_on_a_split_grid_makes_it_again_in_calls_of_the_same_size(capsys, calls):
    flags = ["--steps", 1, "--seed", 8, "-n", 5, "--batch-size", 2, "--grid"]
    code, _, _ = generate(capsys, PROMPT, *flags, "-o", "g.png")
    assert code == 0 and calls == [2, 2, 1] and read_png_params("g.png")["batch"] == 2
    calls.clear()
    code, _, err = generate(capsys, "--from", "g.png", "--grid", "-o", "again.png")
    assert code == 0 and calls == [2, 2, 1] and "batch of" not in err   # the same calls: the same pixels
    assert np.array_equal(pixels("again.png"), pixels("g.png"))


@pytest.mark.parametrize("flags, words", [
    (["-n", 5, "--batch-count", 2], ["-n, --batch-size, --batch-count", "-n 5, --batch-count 2"]),
    (["-n", 6, "--batch-count", 2, "--batch-size", 4], ["disagree", "--batch-size 4"]),
    (["--batch-size", 0], ["--batch-size", ">= 1"]),
    (["--batch-count", 10**6], ["--batch-count", "1024", "1000000"]),
    (["--batch-count", 100, "--batch-size", 100], ["--batch-size, --batch-count", "1024", "100 x 100 = 10000"]),
    (["-n", 0, "--batch-count", 2], ["-n", ">= 1"]),
])
def test_batch_flags_that_disagree_name_the_flags_before_loading(capsys, monkeypatch, flags, words):
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", None)   # never reached
    code, out, err = generate(capsys, PROMPT, *flags)
    assert code == 2 and out == [] and not Path("outputs").exists()
    first = err.splitlines()[0]
    assert first.startswith("latentdiff: error: ") and all(word in first for word in words), first


# ---- file names --------------------------------------------------------------------------------------------------
def test_numbering_continues_after_the_highest_file_in_the_folder(tmp_path, capsys):
    (tmp_path / "renders").mkdir()
    (tmp_path / "renders" / "00011-99.png").write_bytes(b"someone's image")
    (tmp_path / "renders" / "notes.txt").write_text("not numbered")
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 7, "-o", "renders", "-n", 2, "--grid")
    assert code == 0 and out == ["renders/00012-7.png", "renders/00013-8.png", "renders/00014-grid-7.png"]
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 7, "-o", "renders")   # same seed again
    assert code == 0 and out == ["renders/00015-7.png"]
    assert (tmp_path / "renders" / "00011-99.png").read_bytes() == b"someone's image"
    alone, in_a_call_of_two = pixels("renders/00015-7.png").astype(int), pixels("renders/00012-7.png").astype(int)
    assert np.abs(alone - in_a_call_of_two).max() <= 2      # the same seed (a batch may round differently)


def test_one_file_several_images_and_the_grid(capsys):
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 2, "-n", 3, "-o", "shapes.png")
    assert code == 0 and out == ["shapes-0.png", "shapes-1.png", "shapes-2.png"] and not Path("shapes.png").exists()
    assert [read_png_params(f"shapes-{i}.png")["seed"] for i in range(3)] == [2, 3, 4]
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 2, "-n", 3, "-o", "grid.png", "--grid")
    assert code == 0 and out == ["grid-0.png", "grid-1.png", "grid-2.png", "grid.png"]
    assert np.array_equal(pixels("grid-1.png"), pixels("shapes-1.png"))
    with Image.open("grid.png") as grid:
        assert grid.size == (2 * 64 + 2, 2 * 64 + 2)        # 3 images: a 2 x 2 grid, 2 px apart
    assert read_png_params("grid.png")["n"] == 3


def test_an_existing_file_is_never_replaced_without_overwrite(tmp_path, capsys, monkeypatch):
    Path("keep.png").write_bytes(b"precious")
    Path("many-1.png").write_bytes(b"precious")
    loaded = LatentDiffusionPipeline.from_pretrained
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", None)   # refused before loading
    for argv in (["-o", "keep.png"], ["-o", "many.png", "-n", 2]):
        code, out, err = generate(capsys, PROMPT, "--steps", 1, *argv)
        lines = err.splitlines()
        assert code == 2 and out == [] and len(lines) == 2, err
        assert "the output file exists" in lines[0] and argv[1].replace(".png", "") in lines[0]
        assert "--overwrite" in lines[1]
    assert Path("keep.png").read_bytes() == Path("many-1.png").read_bytes() == b"precious"
    assert not Path("many-0.png").exists()
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", loaded)
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "-o", "keep.png", "--overwrite")
    assert code == 0 and out == ["keep.png"] and read_png_params("keep.png")["prompt"] == PROMPT


def test_from_without_o_never_replaces_its_earlier_copy(capsys):
    assert generate(capsys, PROMPT, "--steps", 1, "--seed", 1, "-o", "one.png")[0] == 0
    assert generate(capsys, "--from", "one.png")[1] == ["one-reproduced.png"]
    code, _, err = generate(capsys, "--from", "one.png")
    assert code == 2 and "one-reproduced.png" in err and "--overwrite" in err


@pytest.mark.parametrize("argv, kind, suffix", [
    (["--format", "jpg"], "JPEG", ".jpg"),
    (["--format", "webp"], "WEBP", ".webp"),
    (["-o", "x.jpeg"], "JPEG", ".jpeg"),
    (["-o", "x.webp"], "WEBP", ".webp"),
    (["-o", "x.png", "--format", "png"], "PNG", ".png"),
])
def test_format_from_the_flag_or_the_suffix(capsys, argv, kind, suffix):
    code, out, _ = generate(capsys, PROMPT, "--steps", 1, "--seed", 4, *argv)
    assert code == 0 and len(out) == 1 and out[0].endswith(suffix)
    with Image.open(out[0]) as image:
        assert image.format == kind and image.size == (64, 64)
    assert not any(name.endswith(".tmp") for name in files(Path(out[0]).parent))   # written atomically


@pytest.mark.parametrize("argv, words", [
    (["-o", "x.jpg", "--format", "webp"], ["--format, -o", "-o FILE.webp"]),
    (["-o", "x.gif"], ["neither an existing folder nor an image file", "x.gif"]),
    (["-o", "no-such-folder"], ["neither an existing folder", "no-such-folder"]),
    ([], ["./outputs", "not a folder"]),
])
def test_outputs_that_cannot_be_written_are_named(capsys, argv, words):
    Path("outputs").write_text("a file where the default folder would be")
    code, out, err = generate(capsys, PROMPT, *argv)
    first = err.splitlines()[0]
    assert code == 2 and out == [] and all(word in first for word in words), first


# ---- the entry points --------------------------------------------------------------------------------------------
def environment(model: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def test_the_module_entry_point_prints_the_files_and_the_seed(tmp_path, model):
    argv = [sys.executable, "-m", "latentdiff", "generate", "a red circle", "--model", str(model), "--steps", "2",
            "-n", "2", "--grid", "-o", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=environment(model), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    seed = int(next(line for line in done.stderr.splitlines() if line.startswith("latentdiff: seed ")).split()[-1])
    assert done.stdout.splitlines() == [str(tmp_path / name) for name in
                                        (f"00000-{seed}.png", f"00001-{seed + 1}.png", f"00002-grid-{seed}.png")]


def test_the_installed_console_script_writes_the_named_file(tmp_path, model):
    script = shutil.which("latentdiff")    # installed with the package (CI installs the tree under test)
    assert script is not None, "the latentdiff console script is not installed"
    argv = [script, "generate", "a red circle", "--model", str(model), "--steps", "2", "--seed", "0", "-o", "c.png"]
    done = subprocess.run(argv, capture_output=True, text=True, env=environment(model), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["c.png"] and read_png_params(tmp_path / "c.png")["seed"] == 0


def test_two_processes_share_the_random_seed_and_the_numbers(tmp_path, model):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\ngreen triangle\n")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "00004-1.png").write_bytes(b"an earlier image")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "latentdiff.cli", "generate",
               "--prompts", str(tmp_path / "prompts.txt"), "--model", str(model), "--batch-size", "1",
               "--steps", "1", "-o", str(tmp_path / "two")]
    env = environment(model) | {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [seed] = [int(line.split()[-1]) for line in done.stderr.splitlines() if line.startswith("latentdiff: seed ")]
    names = [f"{5 + k:05d}-{seed + k}.png" for k in range(3)]     # one seed, one numbering, for both processes
    assert files(tmp_path / "two") == ["00004-1.png", *names]
    assert done.stdout.splitlines() == [str(tmp_path / "two" / name) for name in names]
    assert [read_png_params(tmp_path / "two" / name)["seed"] for name in names] == [seed, seed + 1, seed + 2]
    assert "process 0 of 2 wrote 2 file(s)" in done.stderr and "process 1 of 2 wrote 1 file(s)" in done.stderr
