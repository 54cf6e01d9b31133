"""Nothing lost (issue 14, d): a save killed at the window between its two steps leaves a model at the
destination (or one that the next load, save or `clean_partial` puts back), killed saves leave no full-size
hidden folders behind, a live pipeline survives its weights file being truncated or rewritten, `convert` never
deletes its own source, a training run never silently replaces an earlier run's export or shares its folder
with another run, and saved folders keep the usual modes.

Crashes are injected at the window itself: a subprocess whose `os.replace` (or the delete after the atomic
exchange) ends the process with `os._exit`, or a patched `os.replace` that raises."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentdiff import atomic_folders, hub
from latentdiff.errors import CheckpointError, UsageError
from tests._support.bounded import REPO, run_bounded

pytestmark = pytest.mark.usefixtures("one_thread")


def hidden_siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def save_in_subprocess(dest: Path, content: str, *, setup: str) -> int:
    """`hub.atomic_folder(dest)` writing `content` in a fresh interpreter after `setup` (which injects the
    crash); -> its exit status."""
    code = textwrap.dedent(f"""
        import os, shutil
        from pathlib import Path
        from latentdiff import atomic_folders, hub
        {textwrap.indent(textwrap.dedent(setup), '        ').strip()}
        with hub.atomic_folder({str(dest)!r}) as tmp:
            (tmp / "model.txt").write_text({content!r})
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode


def saved(dest: Path, content: str) -> Path:
    with hub.atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text(content)
    return dest


# ---- hub.atomic_folder ---------------------------------------------------------------------------------------
@pytest.mark.outcome("correct", fails_as="data_loss")
def test_crash_right_after_the_atomic_exchange_leaves_the_new_model_and_the_next_save_cleans_up(tmp_path):
    dest = saved(tmp_path / "model", "old")
    # the exchange is done; the process dies while deleting the old copy (now under the temporary name)
    rc = save_in_subprocess(dest, "new", setup="shutil.rmtree = lambda *a, **k: os._exit(9)")
    assert rc == 9
    assert (dest / "model.txt").read_text() == "new"
    assert len(hidden_siblings(dest)) == 1                 # the old copy, its writer dead
    saved(dest, "newer")
    assert (dest / "model.txt").read_text() == "newer" and hidden_siblings(dest) == []


FALLBACK_CRASH = """
atomic_folders.exchange = lambda a, b: False   # a file system without renameat2's exchange: two renames
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == 2:             # the old folder is aside, the new one not yet in: the window
        os._exit(9)
    real(src, dst)
os.replace = replace
"""


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_crash_between_the_two_renames_is_undone_by_the_next_load(tmp_path):
    dest = saved(tmp_path / "model", "old")
    assert save_in_subprocess(dest, "new", setup=FALLBACK_CRASH) == 9
    assert not dest.exists() and any(n.endswith(".old") for n in hidden_siblings(dest))
    assert hub.resolve(dest) == dest                       # a load finds the model again
    assert (dest / "model.txt").read_text() == "old" and hidden_siblings(dest) == []


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_crash_between_the_two_renames_is_undone_by_the_next_save_and_the_model_loader(tmp_path):
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from tests._support.tiny import tiny_kl_config

    dest = saved(tmp_path / "model", "old")
    assert save_in_subprocess(dest, "new", setup=FALLBACK_CRASH) == 9
    hub.recover_folder(tmp_path / "unrelated")              # another name's recovery leaves it alone
    assert not dest.exists()
    failing = []
    with pytest.raises(OSError), hub.atomic_folder(dest) as tmp:   # a save that fails in its body ...
        failing.append(tmp)
        raise OSError("disk full")
    assert (dest / "model.txt").read_text() == "old"       # ... still put the old model back first
    assert hidden_siblings(dest) == [] and not failing[0].exists()

    model_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(tiny_kl_config()).save_pretrained(model_dir)
    assert save_in_subprocess(model_dir, "new", setup=FALLBACK_CRASH) == 9
    assert not model_dir.exists()
    AutoencoderKL.from_pretrained(model_dir)               # the loader restores it too


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_killed_saves_leave_no_full_size_hidden_folders(tmp_path):
    dest = saved(tmp_path / "model", "old")
    for _ in range(3):   # killed while writing: each leaves a hidden, half-written folder ...
        rc = save_in_subprocess(dest, "new", setup="""
            real = Path.write_text
            def write_text(self, text):
                real(self, text * 100_000)
                os._exit(9)
            Path.write_text = write_text
            """)
        assert rc == 9
        assert len(hidden_siblings(dest)) == 1   # ... which the next save removes: they never pile up
    assert (dest / "model.txt").read_text() == "old"
    saved(dest, "newer")
    assert hidden_siblings(dest) == [] and (dest / "model.txt").read_text() == "newer"


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_a_live_saves_temporary_folder_is_never_cleaned_by_another_save(tmp_path):
    dest = saved(tmp_path / "model", "old")
    live = tmp_path / f".model.ld-{os.getppid()}-abc123.tmp"   # a running process's save in progress
    live.mkdir()
    saved(dest, "new")
    assert live.is_dir()


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_checkpoint_save_crash_at_the_window_is_restored_by_clean_partial(tmp_path, monkeypatch):
    from latentdiff.training.checkpoints import PROGRESS_FILE, Checkpoints

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            Path(folder, "state.bin").write_bytes(b"state")

    checkpoints = Checkpoints(tmp_path / "checkpoints", keep_last=3)
    tmp_path.joinpath("checkpoints").mkdir()

    def write(step):
        return lambda folder: (folder / PROGRESS_FILE).write_text(json.dumps({"step": step}))

    first = checkpoints.save(4, Accelerator(), write(4))
    monkeypatch.setattr(atomic_folders, "exchange", lambda a, b: False)
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt   # the process stops between the two renames
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(4, Accelerator(), write(40))   # the same step saved again (a re-run)
    monkeypatch.setattr(os, "replace", real)
    assert not first.exists()
    checkpoints.clean_partial()
    assert json.loads((first / PROGRESS_FILE).read_text()) == {"step": 4}
    assert [p.name for p in checkpoints.root.iterdir()] == [first.name]


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_checkpoint_save_uses_the_atomic_exchange(tmp_path):
    from latentdiff.training.checkpoints import PROGRESS_FILE, Checkpoints

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            Path(folder, "state.bin").write_bytes(b"state")

    checkpoints = Checkpoints(tmp_path / "checkpoints", keep_last=3)
    tmp_path.joinpath("checkpoints").mkdir()
    for step in (1, 2):
        final = checkpoints.save(8, Accelerator(), lambda f, step=step: (f / PROGRESS_FILE).write_text(str(step)))
    assert (final / PROGRESS_FILE).read_text() == "2" and [p.name for p in checkpoints.root.iterdir()] == [final.name]


# ---- modes ----------------------------------------------------------------------------------------------------
@pytest.mark.outcome("correct", fails_as="data_loss")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_folders_have_the_usual_modes(tmp_path, umask):
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from tests._support.tiny import tiny_kl_config

    previous = os.umask(umask)
    try:
        AutoencoderKL(tiny_kl_config()).save_pretrained(tmp_path / "vae")
        AutoencoderKL(tiny_kl_config()).save_pretrained(tmp_path / "vae")   # a re-save of a shared model
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "vae").stat().st_mode) == 0o777 & ~umask
    for file in (tmp_path / "vae").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


# ---- weights files changed under a live pipeline -------------------------------------------------------------
LIVE_PIPELINE = """
import shutil, torch
from pathlib import Path
from latentdiff import LatentDiffusionPipeline, builtin
folder = Path({folder!r})
shutil.copytree(builtin.builtin_path("latentdiff/shapes-64"), folder)
pipe = LatentDiffusionPipeline.from_pretrained(folder{options})
run = dict(num_inference_steps=2, output_type="pt", progress=False)
first = pipe("a red circle", generator=torch.Generator().manual_seed(0), **run).images
for weights in folder.glob("*/*.safetensors"):
    {change}
second = pipe("a red circle", generator=torch.Generator().manual_seed(0), **run).images
assert torch.equal(first, second), "the images changed"
"""
TRUNCATE = "open(weights, 'r+b').truncate(100)"
REWRITE = "data = weights.read_bytes(); open(weights, 'r+b').write(data[:len(data) // 2] + bytes(len(data) // 2 + 1))"


@pytest.mark.outcome("correct", fails_as="crash")
def test_default_pipeline_survives_its_weights_file_truncated(tmp_path):
    result = run_bounded(LIVE_PIPELINE.format(folder=str(tmp_path / "m"), options="", change=TRUNCATE),
                         timeout_s=120)   # a SIGBUS ends the subprocess without a result: the test fails
    assert result.raised is None, result.traceback


@pytest.mark.outcome("correct", fails_as="unclear")
def test_default_pipeline_weights_do_not_change_when_the_file_is_rewritten_in_place(tmp_path):
    # in this process: a same-size rewrite cannot crash, only change the weights
    exec(compile(LIVE_PIPELINE.format(folder=str(tmp_path / "m"), options="", change=REWRITE), "<live>", "exec"), {})


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_mapped_pipeline_refuses_a_weights_file_changed_in_place(tmp_path):
    result = run_bounded(LIVE_PIPELINE.format(folder=str(tmp_path / "m"), options=", mmap_weights=True",
                                              change=TRUNCATE), timeout_s=120)
    assert result.raised == "CheckpointError" and result.is_latentdiff_error, result.traceback
    assert ".safetensors" in result.message and str(tmp_path / "m") in result.message
    assert "mmap_weights" in result.message


@pytest.mark.outcome("correct", fails_as="crash")
def test_mapped_pipeline_is_fine_with_a_file_replaced_by_a_rename(tmp_path):
    # in this process: the mapping keeps the replaced file's bytes, so nothing can fault
    change = "tmp = weights.with_suffix('.new'); tmp.write_bytes(b'x' * 10); os.replace(tmp, weights)"
    code = LIVE_PIPELINE.format(folder=str(tmp_path / "m"), options=", mmap_weights=True", change=change)
    exec(compile(code, "<live>", "exec"), {"os": os})


# ---- convert SRC DST --overwrite ------------------------------------------------------------------------------
@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_convert_refuses_a_destination_that_contains_the_source(tmp_path, capsys):
    from latentdiff.cli.main import main

    models = tmp_path / "models"
    models.mkdir()
    source = models / "sd.safetensors"
    source.write_bytes(b"weights")
    assert main(["convert", str(source), str(models), "--overwrite"]) != 0
    err = capsys.readouterr().err
    assert "contains the source" in err and str(models) in err
    assert source.read_bytes() == b"weights"


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_convert_refuses_a_destination_inside_the_source(tmp_path):
    from latentdiff.convert.checkpoints import convert_checkpoint

    source = tmp_path / "sd"
    source.mkdir()
    (source / "model_index.json").write_text("{}")
    with pytest.raises(UsageError) as raised:
        convert_checkpoint(source, source / "unet" / "sd.safetensors", overwrite=True)
    assert "inside the source" in str(raised.value) and str(source / "unet" / "sd.safetensors") in str(raised.value)
    assert sorted(p.name for p in source.iterdir()) == ["model_index.json"]


# ---- training into an earlier run's folder --------------------------------------------------------------------
@pytest.fixture()
def autoencoder_run(tmp_path):
    from tests._support.training import autoencoder_config, make_shapes

    data = make_shapes(tmp_path / "data", count=16, size=16, labels="classes")
    config = autoencoder_config(data, tmp_path / "run")
    config["model"]["lpips"] = "random"   # no download: these runs stop before training
    return config


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_fresh_run_refuses_to_replace_an_earlier_export(tmp_path, autoencoder_run, capsys):
    from latentdiff.cli.main import main
    from tests._support.training import write_yaml

    export = tmp_path / "run" / "autoencoder"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")   # an earlier run's model; its checkpoints were deleted
    config = write_yaml(tmp_path / "ae.yaml", autoencoder_run)
    assert main(["train", "autoencoder", str(config)]) != 0
    err = capsys.readouterr().err
    assert "earlier run" in err and str(export) in err and "--overwrite" in err
    assert (export / "config.json").read_text() == "{}"
    assert not (tmp_path / "run" / "train_config.json").exists()   # nothing written before the refusal


@pytest.mark.outcome("correct", fails_as="data_loss")
def test_train_overwrite_flag_reaches_the_config(tmp_path, autoencoder_run):
    import argparse

    from latentdiff.cli.train import add_train_parser
    from latentdiff.training.config import load_train_config
    from tests._support.training import write_yaml

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "autoencoder", "x.yaml", "--overwrite"])
    assert args.overwrite
    config = write_yaml(tmp_path / "ae.yaml", autoencoder_run)
    assert load_train_config(config, "autoencoder", overrides=["train.overwrite=true"]).train.overwrite
    assert not load_train_config(config, "autoencoder").train.overwrite


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_two_runs_sharing_one_output_folder_are_refused(tmp_path, autoencoder_run):
    from latentdiff.training.autoencoder_trainer import AutoencoderTrainer
    from latentdiff.training.config import train_config_from_dict
    from latentdiff.training.loop import output_lock

    with output_lock(tmp_path / "run"):   # the first run, still training
        trainer = AutoencoderTrainer(train_config_from_dict(autoencoder_run, "autoencoder"))
        with pytest.raises(CheckpointError) as raised:
            trainer.fit()
    assert "another training run" in str(raised.value) and str(tmp_path / "run") in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    shutil.rmtree(tmp_path / "run")
