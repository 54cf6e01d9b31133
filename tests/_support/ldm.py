"""Tiny LDM-family parts built by diffusers (VQ first stage, UNet2DModel, DDIM scheduler) and the manual reference
loop, shared by the unconditional, super-resolution, class-conditional and layout pipeline tests."""
from __future__ import annotations

import contextlib

import diffusers
import torch

from latentdiff.diffusion.scheduler_io import load_scheduler_folder
from tests._support.parity import randomize

STEPS = 4
# CompVis/ldm-celebahq-256's scheduler_config.json
LDM_SCHEDULER = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                     num_train_timesteps=1000)


def seeded(build, seed):
    torch.manual_seed(seed)
    return randomize(build(), seed).eval()


def tiny_vq(levels=2, *, seed=2, latent_channels=3, **kw):
    """A diffusers VQModel with f = 2^(levels - 1) and a 32-entry codebook of N(0, 1) codes:
    far apart, so that the 1e-6 differences of two implementations' latents do not change the nearest code (the
    default init, uniform in +-1/32, leaves near ties that flip whole pixels)."""
    vq = seeded(lambda: diffusers.VQModel(
        block_out_channels=(32,) * levels, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=latent_channels, num_vq_embeddings=32,
        vq_embed_dim=latent_channels,
        sample_size=16, **kw), seed)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return vq


def tiny_unet2d(*, in_channels=3, sample_size=8, seed=1, **kw):
    """A diffusers UNet2DModel (LDM's AttentionBlock in the second level and the mid block)."""
    return seeded(lambda: diffusers.UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, **kw), seed)


def ldm_scheduler(**kw):
    return diffusers.DDIMScheduler(**(LDM_SCHEDULER | kw))


def ours(model, cls, folder):
    """The latentdiff model of a diffusers model: its folder, loaded by `cls`."""
    model.save_pretrained(folder)
    return cls.from_pretrained(folder)


def schedule(scheduler, folder):
    """(NoiseScheduler, sampler) of a diffusers scheduler, through its folder."""
    scheduler.save_pretrained(folder)
    return load_scheduler_folder(folder)


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def manual_ddim(eps_of, x_T, scheduler, steps=STEPS):
    """The reference reverse process: diffusers' DDIMScheduler stepping with eps_of(x_t, t) (eta = 0)."""
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(eps_of(x, t), t, x).prev_sample
    return x


@torch.no_grad()
def decoded(vq, z):
    """diffusers' decoding of latents the diffusion model sampled: /scaling_factor, quantize, decode; in [0, 1]."""
    return (vq.decode(z / vq.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


@contextlib.contextmanager
def no_unet_calls(pipe):
    """Fails the test when the UNet runs inside the block (bad input must be refused before any model work)."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert calls == [], "the UNet ran before the error"
