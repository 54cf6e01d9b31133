"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's down half (conv_in, embeddings, down levels, mid level: `unet.UNetTrunk`, the very
classes the UNet is built of) reads the latent plus an encoded control image (edges, depth, pose ...), and hands
the UNet one residual per skip connection and one for the mid block. Every residual leaves through a 1x1
convolution initialised to zero (the paper's "zero convolutions", sec. 3.1), as does the hint encoder: a fresh
ControlNet adds nothing, so training starts from the UNet's own behaviour.

Parameter names and config.json are those of diffusers' ControlNetModel (`diffusers_tables.CONTROLNET`), so its
folders load with no key map and ours load in diffusers.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..errors import ConfigError, InputError
from ..hub_files import local_file
from ..registry import COMPONENTS, SINGLE_FILE
from ..utils import numerics
from ..utils.dtypes import resolve_torch_dtype
from . import structure
from .diffusers_tables import CONTROLNET
from .unet import UNet2DConditional, UNetConfig, UNetTrunk, shape_of

# The modules a ControlNet copies from its UNet (diffusers' ControlNetModel.from_unet); time_proj has no weights
SHARED_WITH_UNET = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")
# UNetConfig fields of the half a ControlNet does not have: left at their defaults (no config.json key holds them)
UNREAD = ("sample_size", "out_channels")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """The UNet's settings for the copied half, plus the hint encoder's. The UNet settings of the other half
    (out_channels, sample_size) are not read; time_embedding_dim, dropout and per-level layer counts, which
    diffusers' ControlNetModel has no key for, must stay at its values."""

    conditioning_channels: int = 3    # channels of the control image
    # widths of the hint encoder's levels: len - 1 stride-2 steps, so the control image is 2^(len - 1) times the
    # latent's side (SD: 8, the autoencoder's factor)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def validate(self) -> None:
        super().validate()
        widths = self.conditioning_embedding_out_channels
        if not widths:
            raise ConfigError("conditioning_embedding_out_channels needs at least one width",
                              where="conditioning_embedding_out_channels", expected="non-empty tuple of ints",
                              found=widths)
        structure.check_levels(widths, key="conditioning_embedding_out_channels")
        structure.check_counts([("conditioning_channels", self.conditioning_channels, limits.MAX_CHANNELS)])
        fixed = {"mid_block": ("transformer", "resnet"), "time_embedding_dim": (None,), "dropout": (0.0,)}
        for name, allowed in fixed.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"a ControlNet (diffusers ControlNetModel) has no other {name}", where=name,
                                  expected=allowed if len(allowed) > 1 else allowed[0], found=getattr(self, name))
        if isinstance(self.layers_per_level, tuple):   # diffusers' layers_per_block is one int here
            raise ConfigError("a ControlNet has one layer count for every level", where="layers_per_level",
                              expected="an int", found=self.layers_per_level)

    @property
    def hint_factor(self) -> int:
        """How many times the control image's side is the latent's."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ConditioningEmbedding(nn.Module):
    """diffusers ControlNetConditioningEmbedding: the control image -> conv_in's width at the latent's size.
    3x3 convs with SiLU, each level a same-width conv then a stride-2 conv to the next width; conv_out zero."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


@COMPONENTS.register("controlnet")
class ControlNet(UNetTrunk[ControlNetConfig]):
    """(x_t, t, context, control image) -> residuals for the UNet's skips and mid block (diffusers ControlNetModel)."""

    config_class = ControlNetConfig
    diffusers_class_name = "ControlNetModel"
    diffusers_config = CONTROLNET

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        ch = config.channels
        self.controlnet_cond_embedding = ConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, ch[0])
        # one zero conv per skip the UNet keeps: conv_in's output, each resnet's, each downsampler's
        widths, layers = [ch[0]], config.per_level(config.layers_per_level)
        for level, width in enumerate(ch):
            widths += [width] * (layers[level] + (level < len(ch) - 1))
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in widths)
        self.controlnet_mid_block = _zero(nn.Conv2d(ch[-1], ch[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet2DConditional, *, conditioning_embedding_out_channels: tuple[int, ...] =
                  (16, 32, 96, 256), conditioning_channels: int = 3) -> ControlNet:
        """A ControlNet whose copied half holds copies of `unet`'s weights (the paper's initialisation, diffusers'
        ControlNetModel.from_unet), its zero convolutions zero, on the UNet's device and dtype."""
        shared = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(UNetConfig)
                  if f.name not in UNREAD}
        config = ControlNetConfig(**shared, conditioning_channels=conditioning_channels,
                                  conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        model = cls(config)
        state = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in SHARED_WITH_UNET}
        # strict=False: only the half shared with the UNet is copied (the hint embedding and the zero convolutions
        # keep their initialisation); that half's keys are checked right below, both ways
        missing, unexpected = model.load_state_dict(state, strict=False)
        own = [k for k in missing if k.split(".")[0] in SHARED_WITH_UNET]
        assert not own and not unexpected, (own, unexpected)   # same config, same classes: same keys
        return model.to(device=unet.device, dtype=unet.dtype).train(unet.training)

    # ---- lllyasviel's original files (hooks provided by latentdiff.convert.controlnet_ldm) ---------------------
    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, original_config: Any = None, use_ema: bool = True,
                         prediction_type: str | None = None, torch_dtype: torch.dtype | str | None = None,
                         device: str | torch.device | None = None, check_finite_weights: bool = False,
                         unet: UNet2DConditional | None = None) -> ControlNet:
        """An original ControlNet file (`.pth` / `.ckpt` read with weights_only, or `.safetensors`), strictly: v1.0
        (`control_model.*` beside a whole SD model: only the ControlNet is read), v1.1 (`control_model.*` alone,
        fp16 repacks too), bare cldm keys, and "difference" files, which need `unet=` (the base model's UNet
        they were made from). The architecture comes from `original_config` (the ControlLDM YAML: a path, a
        dict, or the shipped "cldm_v15" / "cldm_v21"), else from latentdiff's metadata in the file, else from the
        tensor shapes (docs/control.md). `use_ema`: no ControlNet file holds an EMA copy (kept for the base's
        signature); a ControlNet has no `prediction_type` (an InputError if one is given)."""
        if prediction_type is not None:
            raise InputError("a ControlNet has no prediction type (its UNet's pipeline has)", where="prediction_type",
                             expected=None, found=prediction_type)
        path = local_file(path)   # a Hub file URL or "owner/repo/file": the cached download
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path))[0]
        model = SINGLE_FILE.get("controlnet_from_single_file")(cls, path, original_config=original_config, unet=unet,
                                                               torch_dtype=torch_dtype, device=device)
        if check_finite_weights:
            numerics.check_finite_weights(model, part=cls.__name__, source=str(path))
        return model

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         layout: str = "v1.1") -> Path:
        """Write this ControlNet as an original file (`.safetensors`, atomically): `layout` "v1.1" (the
        `control_model.*` keys of lllyasviel's v1.1 files, what A1111 / ComfyUI read) or "bare" (no prefix).
        `dtype` casts the floating-point tensors (None: as they are). Its config goes in the metadata."""
        return SINGLE_FILE.get("controlnet_to_single_file")(self, path, layout=layout, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None,
                controlnet_cond: torch.Tensor, *, conditioning_scale: float = 1.0, guess_mode: bool = False,
                added_cond: Mapping[str, torch.Tensor] | None = None,
                class_labels: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """x: (B, in_channels, H, W) latent; t, context, added_cond, class_labels: as the UNet takes them;
        controlnet_cond: (B, conditioning_channels, H * f, W * f) control image in [0, 1], f = hint_factor.
        -> (one residual per UNet skip, in the UNet's order; the mid block's residual), each times
        conditioning_scale. guess_mode (the control image alone, no prompt): the residuals are scaled from 0.1
        (conv_in's) to 1.0 (the mid block's) on a log scale, so the coarse levels steer most."""
        self._check_inputs(x, t, context, class_labels)
        self._check_added_cond(added_cond, x.shape[0])
        self._check_hint(controlnet_cond, x)
        emb = self.embed(x, t, class_labels, added_cond)
        h = self.conv_in(x) + self.controlnet_cond_embedding(controlnet_cond.to(x.dtype))
        skips = [h]
        for down in self.down_blocks:
            h = down(h, emb, context, skips)
        assert self.mid_block is not None   # validate(): a ControlNet has a mid block
        h = self.mid_block(h, emb, context)
        down_res = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid_res = self.controlnet_mid_block(h)
        if guess_mode:   # python floats: a 0-d factor keeps an fp16 residual fp16
            scales = [s * conditioning_scale for s in torch.logspace(-1, 0, len(down_res) + 1).tolist()]
        else:
            scales = [conditioning_scale] * (len(down_res) + 1)
        # strict=False: scales holds one more factor than down_res, the last, which is the middle block's
        return tuple(r * s for r, s in zip(down_res, scales, strict=False)), mid_res * scales[-1]

    def _check_hint(self, hint: Any, x: torch.Tensor) -> None:
        """The control image must be one per latent, hint_factor times the latent's side: InputError first."""
        cfg = self.config
        f = cfg.hint_factor
        expected = (x.shape[0], cfg.conditioning_channels, x.shape[2] * f, x.shape[3] * f)
        if not isinstance(hint, torch.Tensor) or tuple(hint.shape) != expected or not hint.is_floating_point():
            raise InputError(f"controlnet_cond must be a float control image {f} times the latent's side "
                             f"(latent {tuple(x.shape[2:])})", where="controlnet_cond", expected=expected,
                             found=shape_of(hint) if isinstance(hint, torch.Tensor) and hint.is_floating_point()
                             else (shape_of(hint), getattr(hint, "dtype", type(hint).__name__)))


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """A zero convolution (paper sec. 3.1): its output is 0 until training moves it."""
    nn.init.zeros_(conv.weight)
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)
    return conv
