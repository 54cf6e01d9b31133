"""`latentdiff generate`'s output files and batches under hostile or careless input (issue 15): a file never replaced
without `--overwrite` (not even one that appears while the model runs), a link never written through, folder
names that only look numbered, and batch flags that ask for millions of images refused at once."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from latentdiff.cli.main import main
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params
from tests._support.sizes import assert_refused, run_cases
from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64")


@pytest.fixture(autouse=True)
def offline_builtin(monkeypatch, tmp_path, model):
    use_as_builtin(monkeypatch, model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)


def error_line(capsys) -> str:
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("latentdiff: error: "))


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_a_file_that_appears_while_the_model_runs_is_not_replaced(tmp_path, monkeypatch, capsys):
    call = LatentDiffusionPipeline.__call__

    def meanwhile(self, *args, **kwargs):     # another program takes the name after the check
        output = call(self, *args, **kwargs)
        (tmp_path / "outputs").mkdir()
        (tmp_path / "outputs" / "00000-3.png").write_bytes(b"someone else's")
        return output

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", meanwhile)
    assert main(["generate", PROMPT, "--steps", "1", "--seed", "3"]) == 2
    line = error_line(capsys)
    assert "the output file exists" in line and "00000-3.png" in line
    assert (tmp_path / "outputs" / "00000-3.png").read_bytes() == b"someone else's"


@pytest.mark.outcome("correct", fails_as="security")
def test_overwrite_replaces_a_link_never_the_file_it_points_to(tmp_path, capsys):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("not an image")
    (tmp_path / "out.png").symlink_to(victim)
    assert main(["generate", PROMPT, "--steps", "1", "--seed", "0", "-o", "out.png"]) == 2   # it exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--steps", "1", "--seed", "0", "-o", "out.png", "--overwrite"]) == 0
    assert victim.read_text() == "not an image"
    assert not (tmp_path / "out.png").is_symlink() and read_png_params(tmp_path / "out.png")["seed"] == 0


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_names_that_only_look_numbered_and_huge_numbers(tmp_path, capsys):
    folder = tmp_path / "renders"
    folder.mkdir()
    for name in ("0000x-1.png", "-5.png", "12.png", "00007"):        # not NNNNN-...: not counted
        (folder / name).write_bytes(b"keep")
    (folder / ("9" * 200 + "-1.png")).write_bytes(b"keep")            # a 200-digit number: counted on from
    (folder / "00009-dir").mkdir()
    assert main(["generate", PROMPT, "--steps", "1", "--seed", "5", "-o", "renders"]) == 0
    [written] = capsys.readouterr().out.split()
    assert Path(written).name == f"{10**200:05d}-5.png"
    assert all((folder / name).read_bytes() == b"keep" for name in ("0000x-1.png", "-5.png", "12.png", "00007"))


@pytest.mark.outcome("clear_error", fails_as="unclear")
def test_an_output_under_a_file_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(["generate", PROMPT, "-o", "notes.txt/out.png"]) == 2
    line = error_line(capsys)
    assert "output folder does not exist" in line and "notes.txt" in line


BATCH_CASES = {
    "batch_count_1e9": ("UsageError", ("--batch-count", "1024", "1000000000")),
    "batch_size_1e9": ("UsageError", ("--batch-size", "1024", "1000000000")),
    "batch_size_x_count_over_the_limit": ("UsageError", ("--batch-size, --batch-count", "1024", "1000 x 1000")),
}


@pytest.fixture(scope="module")
def batch_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("batches")
    cli = "from latentdiff.cli.main import main; main(['--debug', 'generate', 'x', '-o', r'{}', {}])"
    return run_cases({
        "batch_count_1e9": cli.format(out, "'--batch-count', '1000000000'"),
        "batch_size_1e9": cli.format(out, "'-n', '2', '--batch-size', '1000000000'"),
        "batch_size_x_count_over_the_limit": cli.format(out, "'--batch-size', '1000', '--batch-count', '1000'"),
    })


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("name", sorted(BATCH_CASES))
def test_batch_flags_asking_for_millions_of_images_are_refused_at_once(batch_cases, name):
    error, names = BATCH_CASES[name]
    assert_refused(batch_cases[name], error=error, names=names, rss_mb=1000, seconds=10)
