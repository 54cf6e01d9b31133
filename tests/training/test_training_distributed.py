"""Two processes (`accelerate launch`, gloo on the CPU) train the same model as one process with the same
global batch. Each process takes half of every global batch and its slice of every random draw
(noise, timesteps, conditioning dropout, posterior samples); gradients are averaged over the processes.
The only difference left is the order of float summation (the loss of half a batch, then a mean of two
gradients, instead of one mean over the whole batch), so weights agree to float32 round-off:
rtol 1e-5 / atol 1e-6 after 6 steps. A batch that does not split over the processes is a clear error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

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

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of `latentdiff train`; CPU only (with no GPU, --multi_gpu runs gloo processes)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "latentdiff.cli", "train", "diffusion", str(config_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    return subprocess.run(command, env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return make_shapes(root / "classes", count=32, size=16, labels="classes"), tiny_autoencoder(root / "vae")


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, parts):
    data, vae = parts
    config = diffusion_config(data, vae, tmp_path / "two",
                              data={"center_crop": False, "random_flip": True},
                              train={"max_steps": STEPS, "batch_size": 8, "gradient_accumulation_steps": 2,
                                     "conditioning_dropout": 0.3, "ema_decay": 0.9},
                              checkpoint={"every_n_steps": STEPS})
    result = launch(write_yaml(tmp_path / "two.yaml", config))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert progress_of(tmp_path / "two" / "checkpoints" / f"checkpoint-{STEPS:08d}")["num_processes"] == 2

    config["train"]["output_dir"] = str(tmp_path / "one")
    DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()

    one = state_of(tmp_path / "one" / "checkpoints" / f"checkpoint-{STEPS:08d}")
    two = state_of(tmp_path / "two" / "checkpoints" / f"checkpoint-{STEPS:08d}")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # The weights moved (they differ from their moving average): not the trivial equality of untrained models.
    assert any(not torch.equal(one[k], one[k.replace("unet/", "ema/unet.")]) for k in one if k.startswith("unet/"))
    losses_one, losses_two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == list(range(1, STEPS + 1))
    assert [v for _, v in losses_two] == pytest.approx([v for _, v in losses_one], rel=1e-4)


def test_batch_not_divisible_by_process_count_is_a_clear_error(tmp_path, parts):
    data, vae = parts
    config = diffusion_config(data, vae, tmp_path / "run", train={"batch_size": 7})
    result = launch(write_yaml(tmp_path / "odd.yaml", config))
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "split evenly over the processes" in stderr and "multiple of 2" in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
