"""The command line under bad input, broken files and interruptions (issue 14): every failure is one line
`latentdiff: error: ...` plus a `hint: ...` line and a non-zero exit (2: a latentdiff / OS error, 1: anything
unexpected, named by its type, 130: Ctrl-C), never a traceback unless asked for (--debug, LATENTDIFF_DEBUG=1).
Cases run `latentdiff.cli.main` in-process."""
from __future__ import annotations

import importlib
import json
import shutil
import struct
import zlib

import pytest
import torch
from PIL import Image

from latentdiff.cli.main import main
from latentdiff.errors import NumericalError
from latentdiff.utils.images import save_png
from tests._support.malformed import tiny_files
from tests._support.tiny import TINY_KL
from tests._support.training import autoencoder_config, make_shapes, write_yaml

cli_main = importlib.import_module("latentdiff.cli.main")  # the module (latentdiff.cli.main is also the function)
pytestmark = pytest.mark.usefixtures("one_thread")
clear = pytest.mark.outcome("clear_error", fails_as="crash")


def one_error(capsys, code, *words, exit_code=2):
    """The run exited with `exit_code` and printed exactly the error line and the hint line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert code == exit_code, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("latentdiff: error: ") and lines[1].startswith("hint: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines


# ---- exit codes, unexpected errors, Ctrl-C ------------------------------------------------------------------------
@clear
def test_unexpected_exception_is_one_line_naming_its_type(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli_main, "cmd_info", boom)
    lines = one_error(capsys, main(["info"]), "ZeroDivisionError", "division by zero", exit_code=1)
    assert "LATENTDIFF_DEBUG=1" in lines[1]


@pytest.mark.outcome("correct")
def test_debug_shows_the_traceback(monkeypatch):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli_main, "cmd_info", boom)
    monkeypatch.setenv("LATENTDIFF_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info"])


@clear
def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "cmd_info", interrupted)
    assert main(["info"]) == 130
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == ["latentdiff: interrupted"], err


@clear
def test_numerical_error_prints_its_hint(monkeypatch, capsys):
    def overflow(args):
        raise NumericalError("the latents are not finite", stage="denoise", step=3,
                             hint="fp16 overflow: run with --dtype bfloat16 or float32")

    monkeypatch.setattr(cli_main, "cmd_info", overflow)
    lines = one_error(capsys, main(["info"]), "not finite")
    assert "bfloat16" in lines[1]


@clear
def test_multi_line_exception_text_is_one_line(monkeypatch, capsys):
    def multi(args):
        raise RuntimeError("first line\n  second line\n\nthird")

    monkeypatch.setattr(cli_main, "cmd_info", multi)
    one_error(capsys, main(["info"]), "first line; second line; third", exit_code=1)


# ---- library errors the CLI meets -----------------------------------------------------------------------------
@clear
def test_safetensors_error_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    single = tiny_files(tmp_path)["single"]

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "converted"
    one_error(capsys, main(["convert", str(single), str(out)]), "No space left on device", "could not write")
    assert not out.exists()


def bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (far past PIL's decompression-bomb limit), 1 byte of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@clear
def test_decompression_bomb_through_from(tmp_path, capsys):
    path = bomb_png(tmp_path / "bomb.png")
    one_error(capsys, main(["generate", "--from", str(path)]), str(path))


@clear
def test_decompression_bomb_from_any_command_is_one_line(monkeypatch, capsys, tmp_path):
    path = bomb_png(tmp_path / "bomb.png")

    def open_it(args):
        Image.open(path)

    monkeypatch.setattr(cli_main, "cmd_info", open_it)
    one_error(capsys, main(["info"]), "image too large", "decompression")


# ---- --from values of the wrong type -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tests._support.tiny_builtin import make_tiny_shapes_model

    return make_tiny_shapes_model(tmp_path_factory.mktemp("cli") / "shapes-64")


def png_with(tmp_path, model_folder, **params):
    values = {"prompt": "a red circle", "seed": 0, "n": 1, "model": str(model_folder)} | params
    return save_png(Image.new("RGB", (8, 8)), tmp_path / "made.png", params=values)


@clear
@pytest.mark.parametrize("key, value, words", [
    ("height", 10**30, ["height", "at most 16384"]),
    ("width", 1.5, ["width", "1.5"]),
    ("steps", "ten", ["steps", "'ten'"]),
    ("guidance", float("nan"), ["guidance", "nan"]),
    ("n", [1, 2], ["n", "[1, 2]"]),
    ("model", ["x"], ["model", "['x']"]),
    ("sampler", {"name": "ddim"}, ["sampler", "ddim"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_from_png_values_of_the_wrong_type(tmp_path, model_folder, capsys, monkeypatch, key, value, words):
    from latentdiff import LatentDiffusionPipeline

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    path = png_with(tmp_path, model_folder, **{key: value})
    one_error(capsys, main(["generate", "--from", str(path), "-o", str(tmp_path / "out.png")]), str(path), *words)


# ---- training: configs and resume ----------------------------------------------------------------------------------
def train_config(data, out, **sections):
    model = {"type": "autoencoder_kl", "architecture": dict(TINY_KL),
             "loss": {"disc_start": 1000, "perceptual_weight": 0.0}}
    return autoencoder_config(data, out, model=model, train={"max_steps": 2, "batch_size": 4},
                              checkpoint={"every_n_steps": 1, "keep_last": 1}, data={"validation_split": 4},
                              sample={"every_n_steps": 0, "num_images": 2, "max_validation_images": 4}, **sections)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step tiny autoencoder run with its checkpoint (perceptual loss off: no download)."""
    root = tmp_path_factory.mktemp("train")
    data = make_shapes(root / "shapes", count=12, size=16)
    path = write_yaml(root / "run.yaml", train_config(data, root / "run"))
    assert main(["train", "autoencoder", str(path)]) == 0
    return {"data": data, "run": root / "run", "checkpoint": root / "run" / "checkpoints" / "checkpoint-00000002"}


def resume_copy(trained, tmp_path, corrupt):
    """A copy of the trained run, `corrupt(checkpoint folder)` applied; -> the config to resume it with."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    corrupt(run / "checkpoints" / trained["checkpoint"].name)
    return write_yaml(tmp_path / "resume.yaml", train_config(trained["data"], run))


def resume(config):
    return main(["train", "autoencoder", str(config), "--resume", "latest", "--set", "train.max_steps=3"])


@clear
@pytest.mark.parametrize("text", ["{\"step\": 2, \"batc", "[2, 8, 0]", "{\"step\": \"two\", \"batches\": 8}"],
                         ids=["truncated", "a-list", "a-string-step"])
def test_corrupt_progress_json_on_resume(trained, tmp_path, capsys, text):
    config = resume_copy(trained, tmp_path, lambda folder: (folder / "progress.json").write_text(text))
    one_error(capsys, resume(config), "progress.json", "corrupt")


@clear
def test_corrupt_train_config_json_on_resume(trained, tmp_path, capsys):
    config = resume_copy(trained, tmp_path, lambda folder: (folder / "train_config.json").write_text("{\"data\": "))
    one_error(capsys, resume(config), "train_config.json", "not JSON")


@clear
def test_corrupt_optimizer_bin_on_resume(trained, tmp_path, capsys):
    def truncate(folder):
        data = (folder / "optimizer.bin").read_bytes()
        (folder / "optimizer.bin").write_bytes(data[: len(data) // 3])

    config = resume_copy(trained, tmp_path, truncate)
    one_error(capsys, resume(config), "optimizer.bin", "cannot restore the training state")


class Payload:
    """Stands for anything a weights-only unpickler must refuse."""


@clear
def test_refused_pickle_on_resume(trained, tmp_path, capsys):
    config = resume_copy(trained, tmp_path, lambda folder: torch.save({"state": Payload()}, folder / "optimizer.bin"))
    one_error(capsys, resume(config), "optimizer.bin", "Payload")


@clear
def test_second_fresh_run_into_an_output_folder_with_checkpoints(trained, tmp_path, capsys):
    config = resume_copy(trained, tmp_path, lambda folder: None)
    one_error(capsys, main(["train", "autoencoder", str(config)]), "earlier run")


@clear
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_learning_rate(trained, tmp_path, capsys, value):
    path = tmp_path / "lr.yaml"
    write_yaml(path, train_config(trained["data"], tmp_path / "out"))
    code = main(["train", "autoencoder", str(path), "--set", f"optim.learning_rate={value}"])
    one_error(capsys, code, "learning_rate", "finite")
    assert not (tmp_path / "out").exists()


@clear
def test_multi_line_yaml_error_is_one_line_with_its_position(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: shapes\n  resolution: 16\n optim: [1, 2\n")
    one_error(capsys, main(["train", "autoencoder", str(path)]), str(path), "line 4, column")


@clear
def test_yaml_error_in_an_override_is_one_line(trained, tmp_path, capsys):
    path = write_yaml(tmp_path / "ok.yaml", train_config(trained["data"], tmp_path / "out"))
    one_error(capsys, main(["train", "autoencoder", str(path), "--set", "optim.learning_rate=[1, 2"]), "--set",
              "line 1, column")


@clear
def test_multi_line_yaml_error_in_an_original_config(tmp_path, capsys):
    single = tiny_files(tmp_path)["single"]
    yaml_path = tmp_path / "v1.yaml"
    yaml_path.write_text("model:\n  target: x\n  params: {a: [1, 2}\n")
    code = main(["convert", str(single), str(tmp_path / "out"), "--original-config", str(yaml_path)])
    one_error(capsys, code, str(yaml_path), "line 3, column")


@clear
def test_json_in_the_progress_file_of_a_checkpoint_named_for_resume(trained, tmp_path, capsys):
    """`--resume FOLDER` of a checkpoint whose progress.json holds negative counters."""
    def negative(folder):
        (folder / "progress.json").write_text(json.dumps({"step": -5, "batches": 8, "skipped": 0}))

    config = resume_copy(trained, tmp_path, negative)
    folder = tmp_path / "run" / "checkpoints" / trained["checkpoint"].name
    code = main(["train", "autoencoder", str(config), "--resume", str(folder), "--set", "train.max_steps=3"])
    one_error(capsys, code, "progress.json: step", ">= 0")
