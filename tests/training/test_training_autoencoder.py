"""Stage 1 on a CPU: a tiny autoencoder learns (PSNR rises), its scaling factor gives unit-variance
latents, VQ trains, and a resumed run ends bit for bit where an uninterrupted one does."""
from __future__ import annotations

import math

import pytest
import torch

from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.vq import VQModel
from latentdiff.training.autoencoder_trainer import AutoencoderTrainer
from latentdiff.training.config import train_config_from_dict
from latentdiff.training.data import fixed_batches
from tests._support.training import autoencoder_config, make_shapes, progress_of, read_losses, state_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), count=72, size=16)


def psnr_db(model, images: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of the posterior-mode reconstructions, in [0, 1], from the definition."""
    with torch.no_grad():
        reconstruction = model(images).clamp(-1, 1)
    mse = ((reconstruction - images) / 2).pow(2).mean(dim=(1, 2, 3))
    return sum(10 * math.log10(1.0 / m) for m in mse.tolist()) / len(mse)


def test_kl_autoencoder_psnr_rises_and_scaling_factor_is_unit_std(tmp_path, shapes):
    config = autoencoder_config(shapes, tmp_path / "run", model={"loss": {"disc_start": 120, "perceptual_weight": 0.0,
                                                                          "disc_num_layers": 2, "disc_ndf": 8}},
                                train={"max_steps": 150, "batch_size": 8},
                                checkpoint={"every_n_steps": 75}, logging={"every_n_steps": 5},
                                sample={"every_n_steps": 75})
    trainer = AutoencoderTrainer(train_config_from_dict(config, "autoencoder"))
    initial = {k: v.clone() for k, v in trainer.autoencoder.state_dict().items()}
    valid = torch.cat([b["pixel_values"] for b in fixed_batches(trainer.valid_set, 8, 8)])
    folder = trainer.fit()

    model = AutoencoderKL.from_pretrained(folder)
    before = AutoencoderKL.from_state_dict(model.config, initial)
    gain = psnr_db(model, valid) - psnr_db(before, valid)
    assert gain >= 4.0, f"PSNR rose by only {gain:.2f} dB"
    # The trainer's own validation metric agrees with the direct computation on the same images.
    logged = dict(read_losses(tmp_path / "run", "val/psnr"))
    assert logged[150] == pytest.approx(psnr_db(model, valid), abs=0.05)
    assert read_losses(tmp_path / "run", "disc_loss")[-1][0] == 150  # the discriminator trained after step 120
    # app. G: the exported scaling factor makes the diffusion model's latents unit-variance.
    train_images = torch.cat([b["pixel_values"] for b in fixed_batches(trainer.train_set, 64, 16)])
    scale = model.config.scaling_factor
    assert scale != AutoencoderKL.config_class().scaling_factor
    with torch.no_grad():
        z = model.encode_latents(train_images, generator=torch.Generator().manual_seed(1))
    assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert (tmp_path / "run" / "reconstructions" / "step-00000075.png").is_file()
    assert len(list((tmp_path / "run" / "rfid" / "reconstructions").glob("*.png"))) == 8


def test_vq_autoencoder_trains_with_codebook_loss(tmp_path, shapes):
    architecture = {"channels": [8, 16], "layers_per_level": 1, "latent_channels": 3, "num_vq_embeddings": 32,
                    "norm_num_groups": 4, "sample_size": 16, "mid_block_attention": False}
    config = autoencoder_config(shapes, tmp_path / "run", model={"type": "vq_model", "architecture": architecture,
                                                                 "loss": {"disc_start": 2, "perceptual_weight": 0.0,
                                                                          "disc_num_layers": 2, "disc_ndf": 8}},
                                train={"max_steps": 4, "scaling_factor_images": 16}, checkpoint={"every_n_steps": 4})
    folder = AutoencoderTrainer(train_config_from_dict(config, "autoencoder")).fit()
    model = VQModel.from_pretrained(folder)
    assert model.config.num_vq_embeddings == 32 and model.config.scaling_factor != 1.0
    assert [s for s, _ in read_losses(tmp_path / "run", "quant_loss")] == [1, 2, 3, 4]
    assert len(read_losses(tmp_path / "run", "disc_loss")) == 2  # steps 3 and 4 (disc_start 2)


def test_resumed_autoencoder_equals_uninterrupted(tmp_path, shapes):
    """Train 6 steps in one go, and 3 + 3 with a resume: same weights, discriminator (BatchNorm statistics
    included) and optimizer trajectory, bit for bit. LPIPS (random weights) and the GAN term both run."""
    def run(out, steps, resume=None):
        config = autoencoder_config(shapes, out, model={"lpips": "random",
                                                        "loss": {"disc_start": 2, "disc_num_layers": 2,
                                                                 "disc_ndf": 8}},
                                    data={"random_flip": True, "center_crop": False},
                                    train={"max_steps": steps, "scaling_factor_images": 0},
                                    checkpoint={"every_n_steps": 3, "resume": resume})
        return AutoencoderTrainer(train_config_from_dict(config, "autoencoder")).fit()

    run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    run(tmp_path / "split", 6, resume="latest")
    a = state_of(tmp_path / "straight" / "checkpoints" / "checkpoint-00000006")
    b = state_of(tmp_path / "split" / "checkpoints" / "checkpoint-00000006")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert progress_of(tmp_path / "split" / "checkpoints" / "checkpoint-00000006")["batches"] == 6
    for name in ("loss", "disc_loss", "p_loss"):
        assert read_losses(tmp_path / "straight", name) == read_losses(tmp_path / "split", name), name


def test_decoder_only_fine_tuning_keeps_the_latents(tmp_path, shapes):
    from tests._support.training import tiny_autoencoder

    start = tiny_autoencoder(tmp_path / "start")
    config = autoencoder_config(shapes, tmp_path / "run", model={"pretrained": str(start), "architecture": None,
                                                                 "loss": {"disc_start": 0, "disc_factor": 0.0,
                                                                          "perceptual_weight": 0.0}},
                                train={"max_steps": 4, "batch_size": 4, "train_encoder": False,
                                       "scaling_factor_images": 0},
                                checkpoint={"every_n_steps": 4}, sample={"every_n_steps": 0})
    trainer = AutoencoderTrainer(train_config_from_dict(config, "autoencoder"))
    folder = trainer.fit()
    before, after = AutoencoderKL.from_pretrained(start), AutoencoderKL.from_pretrained(folder)
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor


def test_decoder_only_fine_tuning_keeps_the_scaling_factor(tmp_path, shapes):
    from latentdiff.errors import ConfigError

    config = autoencoder_config(shapes, tmp_path / "run", train={"max_steps": 4, "train_encoder": False})
    with pytest.raises(ConfigError, match="scaling_factor_images"):
        train_config_from_dict(config, "autoencoder")
