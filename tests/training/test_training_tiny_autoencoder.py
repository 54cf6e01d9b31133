"""`latentdiff train tiny-autoencoder`: the student shares the teacher's latent space, its loss is the distillation
loss (recomputed here from the teacher's and student's outputs), it learns (the decode PSNR against the teacher
rises), and the export is an AutoencoderTiny folder; the config is strict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.cli import main
from latentdiff.errors import ConfigError
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.autoencoder_tiny import AutoencoderTiny
from latentdiff.training.tiny_autoencoder import TinyAutoencoderTrainer, load_tiny_autoencoder_config
from tests._support.tiny import tiny_kl_config
from tests._support.training import make_shapes, read_losses, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), count=48, size=16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    return AutoencoderKL(tiny_kl_config()).save_pretrained(tmp_path_factory.mktemp("teacher") / "vae")


def _config(shapes, teacher, out, **train):
    return {"data": {"path": str(shapes), "resolution": 16, "validation_split": 8},
            "model": {"teacher": str(teacher), "width": 8},
            "optim": {"learning_rate": 3e-3},
            "train": {"output_dir": str(out), "max_steps": 40, "batch_size": 8, "ema": False} | train,
            "checkpoint": {"every_n_steps": 40}, "logging": {"every_n_steps": 1, "progress_bar": False},
            "sample": {"every_n_steps": 0, "max_validation_images": 8}}


def test_distillation_loss_learning_and_export(tmp_path, shapes, teacher):
    path = write_yaml(tmp_path / "tiny.yaml", _config(shapes, teacher, tmp_path / "run"))
    trainer = TinyAutoencoderTrainer(load_tiny_autoencoder_config(path))
    big = AutoencoderKL.from_pretrained(teacher)
    student = trainer.student
    assert (student.latent_channels, student.downsample_factor) == (big.latent_channels, big.downsample_factor)
    x = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=4)))["pixel_values"]
    loss, _ = trainer.losses(x)
    with torch.no_grad():
        z = big.encode_latents(x, sample=False)
        expected = F.mse_loss(student.decode_latents(z), big.decode_latents(z)) + \
            F.mse_loss(student.encode_latents(x), z)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    before = trainer.validate()[0]["val/psnr_vs_teacher"]
    folder = trainer.fit()
    after = dict(read_losses(tmp_path / "run", "val/psnr_vs_teacher"))[40]
    assert after > before + 3.0, (before, after)
    exported = AutoencoderTiny.from_pretrained(folder)
    assert exported.config == student.config


def test_cli_runs_the_stage_and_the_config_is_strict(tmp_path, shapes, teacher, capsys):
    path = write_yaml(tmp_path / "tiny.yaml", _config(shapes, teacher, tmp_path / "run", max_steps=2))
    assert main(["train", "tiny-autoencoder", str(path)]) == 0
    assert (tmp_path / "run" / "tiny_autoencoder" / "config.json").is_file()
    bad = write_yaml(tmp_path / "bad.yaml", _config(shapes, teacher, tmp_path / "bad") | {"model": {"teacher": "x",
                                                                                                   "widht": 8}})
    with pytest.raises(ConfigError, match="widht"):
        load_tiny_autoencoder_config(bad)
    wrong = write_yaml(tmp_path / "wrong.yaml", _config(shapes, teacher, tmp_path / "wrong")
                       | {"model": {"teacher": str(teacher), "architecture": {"latent_channels": 3}}})
    with pytest.raises(ConfigError, match="latent space"):
        TinyAutoencoderTrainer(load_tiny_autoencoder_config(wrong))
