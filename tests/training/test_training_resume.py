"""Exact resume: a run killed with SIGKILL after a checkpoint, resumed, ends bit for bit where an
uninterrupted run ends (weights, EMA, optimizer state, loss curve). Bad input mid-run: a clear error, no
hang, and the checkpoints already written stay intact and resumable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from latentdiff.errors import CheckpointError
from latentdiff.training.checkpoints import Checkpoints
from latentdiff.training.config import train_config_from_dict
from latentdiff.training.diffusion_trainer import DiffusionTrainer
from tests._support.training import (
    diffusion_config,
    make_shapes,
    progress_of,
    read_losses,
    state_of,
    tiny_autoencoder,
    write_yaml,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared

STEPS, EVERY = 32, 8




@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_shapes(root / "classes", count=40, size=16, labels="classes"), tiny_autoencoder(root / "vae")


def config_for(parts, out, **sections):
    data, vae = parts
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": STEPS, "batch_size": 8, "gradient_accumulation_steps": 2, "ema_decay": 0.9,
                         "conditioning_dropout": 0.2} | sections["train"]
    return diffusion_config(data, vae, out, data={"center_crop": False, "random_flip": True},
                            checkpoint={"every_n_steps": EVERY, "keep_last": 2}, **sections)


def cli(config_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return [sys.executable, "-m", "latentdiff.cli", "train", "diffusion", str(config_path), *extra], env


def test_killed_run_resumes_bit_for_bit(tmp_path, parts):
    straight = DiffusionTrainer(train_config_from_dict(config_for(parts, tmp_path / "straight"), "diffusion"))
    straight.fit()

    path = write_yaml(tmp_path / "run.yaml", config_for(parts, tmp_path / "killed"))
    command, env = cli(path)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = Checkpoints(tmp_path / "killed" / "checkpoints", keep_last=2)
    deadline = time.monotonic() + 240
    while not checkpoints.complete() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = progress_of(checkpoints.complete()[-1])["step"]
    assert 0 < killed_at < STEPS and not (tmp_path / "killed" / "pipeline").exists()

    result = subprocess.run(cli(path, "--resume", "latest")[0], env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "resumed from" in result.stdout.decode() + result.stderr.decode()

    final = f"checkpoint-{STEPS:08d}"
    a = state_of(tmp_path / "straight" / "checkpoints" / final)
    b = state_of(tmp_path / "killed" / "checkpoints" / final)
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a = torch.load(tmp_path / "straight" / "checkpoints" / final / "optimizer.bin", weights_only=True)
    opt_b = torch.load(tmp_path / "killed" / "checkpoints" / final / "optimizer.bin", weights_only=True)
    for i, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][i][name])), (i, name)
    assert read_losses(tmp_path / "straight") == read_losses(tmp_path / "killed")   # rows past the kill dropped
    assert progress_of(tmp_path / "killed" / "checkpoints" / final)["batches"] == 2 * STEPS
    assert not [p for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_bad_image_mid_run_errors_without_hang_and_keeps_checkpoints(tmp_path, parts):
    """Train 8 steps; corrupt an image; resuming with on_corrupt=error (and a loader worker) stops with
    an error naming the file, within a timeout; the step-8 checkpoint is untouched and still resumes."""
    data, vae = make_shapes(tmp_path / "data", count=16, size=16, labels="classes"), parts[1]
    first = config_for((data, vae), tmp_path / "run", train={"max_steps": EVERY})
    DiffusionTrainer(train_config_from_dict(first, "diffusion")).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{EVERY:08d}"
    before = state_of(checkpoint)
    bad = sorted(data.rglob("*.png"))[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    second = config_for((data, vae), tmp_path / "run", train={"max_steps": 2 * EVERY})
    second["data"] |= {"on_corrupt": "error", "num_workers": 1}
    second["checkpoint"]["resume"] = "latest"
    command, env = cli(write_yaml(tmp_path / "bad.yaml", second))
    result = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert result.returncode != 0
    assert "unreadable image" in result.stderr.decode() and bad.name in result.stderr.decode()
    assert Checkpoints(tmp_path / "run" / "checkpoints", keep_last=2).complete()[-1] == checkpoint
    after = state_of(checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The same data with skipping: the run resumes from the intact checkpoint and counts the skips.
    second["data"] |= {"on_corrupt": "skip", "num_workers": 0}
    trainer = DiffusionTrainer(train_config_from_dict(second, "diffusion"))
    with pytest.warns(UserWarning, match=bad.name):
        trainer.fit()
    assert trainer.step == 2 * EVERY and trainer.skipped > 0
    assert read_losses(tmp_path / "run", "data/skipped_images")[-1][1] == trainer.skipped


def test_resume_refuses_a_changed_model_or_a_missing_checkpoint(tmp_path, parts):
    config = config_for(parts, tmp_path / "run", train={"max_steps": 2})
    config["checkpoint"]["every_n_steps"] = 2
    DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
    with pytest.raises(CheckpointError, match="earlier run"):   # a fresh start would mix with them
        DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
    config["model"]["unet"]["layers_per_level"] = 2
    config["checkpoint"]["resume"] = "latest"
    with pytest.raises(CheckpointError, match="model.unet"):
        DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
    config["checkpoint"]["resume"] = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a complete"):
        DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
