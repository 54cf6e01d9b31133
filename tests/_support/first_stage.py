"""Tiny KL autoencoders: diffusers' with random weights and ours on a copy of them, and the state comparison."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from latentdiff.models.autoencoder_kl import AutoencoderKL

TINY_WIDTHS = (8, 16, 16, 32, 32, 32)


def tiny_config(levels: int = 3, **overrides) -> dict:
    """A diffusers AutoencoderKL config dict with tiny widths, f = 2^(levels - 1)."""
    config = {"block_out_channels": list(TINY_WIDTHS[:levels]), "down_block_types": ["DownEncoderBlock2D"] * levels,
              "up_block_types": ["UpDecoderBlock2D"] * levels, "layers_per_block": 1, "norm_num_groups": 4,
              "sample_size": 32}
    return config | overrides


def randomize(model: torch.nn.Module) -> None:
    """Default init leaves norm scales at 1 and norm biases at 0, which hides bugs; perturb all 1-D params."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    for name, p in model.named_parameters():
        assert p.numel() == 1 or p.min() < p.max(), f"{name} is constant: the test could not fail"


def make_pair(config: dict, seed: int = 0) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    """diffusers' model with random weights, and ours built from its config.json dict and a copy of its weights."""
    torch.manual_seed(seed)
    theirs = DiffusersAutoencoderKL.from_config(config).eval()
    randomize(theirs)
    ours_config = AutoencoderKL.from_file_config(dict(theirs.config), source="diffusers")
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    return AutoencoderKL.from_state_dict(ours_config, state), theirs


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
