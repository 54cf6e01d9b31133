"""Shared pieces of the training tests: the procedural data set, tiny configs, a tiny first stage.

The data set is the one the tiny example configs use (`latentdiff data shapes`,
latentdiff.data.quick_shapes), so the tests exercise the same generator.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from latentdiff.data.quick_shapes import write_shapes_folder
from tests._support import ROOT
from tests._support.tiny import TINY_KL, TINY_UNET

EXAMPLES = ROOT / "examples" / "train"

def make_shapes(folder: Path, *, count: int = 256, **kwargs: Any) -> Path:
    return write_shapes_folder(folder, count, **kwargs)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def autoencoder_config(folder: Path, out: Path, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny KL first-stage config (16 x 16 images, f = 2); `sections` update the defaults section-wise."""
    config = {
        "data": {"path": str(folder), "resolution": 16, "validation_split": 8},
        "model": {"type": "autoencoder_kl", "architecture": copy.deepcopy(TINY_KL),
                  "loss": {"disc_start": 1000}},
        "optim": {"learning_rate": 2e-3, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out), "max_steps": 10, "batch_size": 8, "seed": 0},
        "checkpoint": {"every_n_steps": 5, "keep_last": 2},
        "logging": {"every_n_steps": 1, "progress_bar": False},
        "sample": {"every_n_steps": 0, "num_images": 4, "max_validation_images": 8},
    }
    return _merge(config, sections)


def diffusion_config(folder: Path, autoencoder: Path, out: Path, /, *, conditioning: str = "class",
                     **sections: dict[str, Any]) -> dict[str, Any]:
    unet = copy.deepcopy(TINY_UNET)
    if conditioning != "text":
        unet["cross_attention_dim"] = None
    if conditioning == "class":
        unet["num_class_embeds"] = 4  # 3 shapes + the null class
    config = {
        "data": {"path": str(folder), "resolution": 16},
        "model": {"autoencoder": str(autoencoder), "conditioning": conditioning, "unet": unet},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine"},
        "train": {"output_dir": str(out), "max_steps": 12, "batch_size": 8, "seed": 0, "ema_decay": 0.9},
        "checkpoint": {"every_n_steps": 4, "keep_last": 2},
        "logging": {"every_n_steps": 1, "progress_bar": False},
        "sample": {"every_n_steps": 0, "num_inference_steps": 3, "seeds": [0, 1]},
    }
    return _merge(config, sections)


def _merge(config: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def tiny_autoencoder(folder: Path, *, seed: int = 0) -> Path:
    """A random tiny AutoencoderKL folder whose scaling factor makes its latents roughly unit-variance."""
    from latentdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    torch.manual_seed(seed)
    config = AutoencoderKLConfig.from_dict(TINY_KL)
    model = AutoencoderKL(config)
    with torch.no_grad():
        std = model.encode(torch.rand(4, 3, 16, 16) * 2 - 1).mean.std().item()
    AutoencoderKL.from_state_dict(config.replace(scaling_factor=1.0 / std), model.state_dict()).save_pretrained(folder)
    return folder


def read_losses(run: Path, name: str = "loss") -> list[tuple[int, float]]:
    import csv

    with open(run / "logs" / "losses.csv", newline="") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == name]


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files (modules and EMA), keyed by file/name."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out |= {f"{path.stem}/{k}": v for k, v in load_file(str(path)).items()}
    return out


def progress_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "progress.json").read_text())


def tiny_text_pipeline(folder: Path, *, seed: int = 0) -> Path:
    """A random tiny text-to-image LatentDiffusionPipeline folder (the tiny KL first stage, f = 2; the tiny
    cross-attention UNet; a 1-layer LDM-BERT over the shapes captions' tokenizer): a base for ControlNet training."""
    from latentdiff.data.shapes import write_tokenizer
    from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
    from latentdiff.diffusion.samplers import DDIMSampler
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.ldm_bert import LDMBert, LDMBertConfig, LDMBertTextEncoder, load_bert_tokenizer
    from latentdiff.models.text_encoder import TextEncoderConfig
    from latentdiff.models.unet import UNet2DConditional, UNetConfig
    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(tiny_autoencoder(folder.parent / f"{folder.name}-vae", seed=seed))
    torch.manual_seed(seed)
    unet = UNet2DConditional(UNetConfig.from_dict(TINY_UNET))
    bert = LDMBert(LDMBertConfig(vocab_size=25, max_position_embeddings=16, d_model=32, encoder_layers=1,
                                 encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16, dropout=0.0))
    tokenizer = load_bert_tokenizer(write_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    text_encoder = LDMBertTextEncoder(bert, tokenizer, TextEncoderConfig(max_length=16))
    scheduler = NoiseScheduler(NoiseSchedulerConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    LatentDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, noise_scheduler=scheduler,
                            sampler=DDIMSampler()).save_pretrained(folder)
    return folder
