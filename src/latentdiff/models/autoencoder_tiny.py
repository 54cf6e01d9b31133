"""The tiny autoencoder (TAESD, Ollin Boer Bohan 2023): a distilled first stage for previews and fast decodes.

A stack of plain 3x3 convolutions with ReLU: `TinyBlock` = conv-ReLU-conv-ReLU-conv plus a skip, fused by a ReLU;
each encoder level after the first starts with a stride-2 conv, each decoder level but the last ends with a
nearest x2 upsampling and a conv. The decoder first soft-clamps its input to (-3, 3) (tanh(z/3) * 3), so a
latent far off the training range cannot blow the image up. The published networks (madebyollin/taesd: taesd,
taesdxl with 4 latent channels; taesd3, taef1 with 16) are distilled to reproduce their big VAE's *scaled*
latents (the diffusion model's space) and its decoded images, so here the latent scaling is the identity
(`scaling_factor` 1.0, `shift_factor` 0.0); the SD3 / FLUX variants' diffusers configs set both to the big VAE's.

Images are in [-1, 1] at this module's edges, as for every first stage; the networks themselves see and make
[0, 1] images (TAESD's convention, so the original files load unchanged). `latents_to_unit` / `unit_to_latents`
map raw latents to [0, 1] and back (`latent_magnitude`, `latent_shift`), for storing latents as 8-bit images
(diffusers' `AutoencoderTiny.scale_latents` / `unscale_latents`; here those names mean the diffusion scaling,
as on AutoencoderKL).

Parameter names are diffusers' `AutoencoderTiny`'s (encoder.layers.N..., decoder.layers.N...), so its folders
load with no key map; madebyollin's original single files (taesd_encoder / taesd_decoder .safetensors or .pth)
load through `from_taesd_files` (keys shifted by the decoder's Clamp, see `taesd_keys`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..builtin import builtin_path
from ..config import ComponentConfig, read_json
from ..errors import CheckpointError, ConfigError, InputError
from ..registry import COMPONENTS
from .autoencoder_parts import FirstStage, Generator
from .diffusers_config import DiffusersConfigMap
from .vae_tiling import TilingMixin


@dataclasses.dataclass(frozen=True)
class AutoencoderTinyConfig(ComponentConfig):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4                              # 16 for taesd3 / taef1
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)  # width per level; downsampling f = 2^(levels - 1)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)  # widest-resolution level last
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)        # TinyBlocks per encoder level
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)        # TinyBlocks per decoder level
    latent_magnitude: float = 3.0                         # latents_to_unit: z / (2 magnitude) + shift
    latent_shift: float = 0.5
    scaling_factor: float = 1.0                           # the diffusion latent is (z - shift_factor) * scaling
    shift_factor: float = 0.0
    force_upcast: bool = False                            # kept so a saved config round-trips

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)

    def validate(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels"):
            if getattr(self, name) < 1:
                _bad(name, "a positive integer", getattr(self, name))
        for widths, counts in (("encoder_channels", "encoder_blocks"), ("decoder_channels", "decoder_blocks")):
            if not getattr(self, widths) or any(w < 1 for w in getattr(self, widths)):
                _bad(widths, "one positive width per level", getattr(self, widths))
            if len(getattr(self, counts)) != len(getattr(self, widths)) or any(n < 0 for n in getattr(self, counts)):
                _bad(counts, f"one block count >= 0 per level ({len(getattr(self, widths))})", getattr(self, counts))
        if len(self.decoder_channels) != len(self.encoder_channels):
            _bad("decoder_channels", f"{len(self.encoder_channels)} levels, as the encoder (the same factor)",
                 self.decoder_channels)
        for name in ("latent_magnitude", "scaling_factor"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                _bad(name, "a finite positive number", getattr(self, name))
        for name in ("latent_shift", "shift_factor"):
            if not math.isfinite(getattr(self, name)):
                _bad(name, "a finite number", getattr(self, name))


def _bad(field: str, expected: str, found: Any) -> None:
    raise ConfigError(f"invalid AutoencoderTinyConfig field {field!r}", where=field, expected=expected,
                      found=repr(found))


def _read_levels(values: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    # diffusers also writes `block_out_channels` (= decoder_block_out_channels, for its pipelines): derived, dropped
    return {"encoder_channels": values["encoder_block_out_channels"],
            "decoder_channels": values["decoder_block_out_channels"]}


def _write_levels(config: Any) -> dict[str, Any]:
    return {"encoder_block_out_channels": list(config.encoder_channels),
            "decoder_block_out_channels": list(config.decoder_channels),
            "block_out_channels": list(config.decoder_channels)}


# diffusers 0.42's AutoencoderTiny.__init__ arguments, plus the `block_out_channels` it registers itself.
AUTOENCODER_TINY = DiffusersConfigMap(
    "AutoencoderTiny",
    defaults={"in_channels": 3, "out_channels": 3, "encoder_block_out_channels": [64, 64, 64, 64],
              "decoder_block_out_channels": [64, 64, 64, 64], "act_fn": "relu", "upsample_fn": "nearest",
              "latent_channels": 4, "upsampling_scaling_factor": 2, "num_encoder_blocks": [1, 3, 3, 3],
              "num_decoder_blocks": [3, 3, 3, 1], "latent_magnitude": 3, "latent_shift": 0.5,
              "force_upcast": False, "scaling_factor": 1.0, "shift_factor": 0.0,
              "block_out_channels": [64, 64, 64, 64]},
    same=("in_channels", "out_channels", "latent_channels", "latent_magnitude", "latent_shift", "force_upcast",
          "scaling_factor", "shift_factor"),
    renamed={"num_encoder_blocks": "encoder_blocks", "num_decoder_blocks": "decoder_blocks"},
    supported={"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2},
    structural=("encoder_block_out_channels", "decoder_block_out_channels", "block_out_channels"),
    read=_read_levels, write=_write_levels)


def _conv(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, stride=stride, bias=bias)


class TinyBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); skip is a bias-free 1x1 conv only when the width changes.
    x: (B, C_in, H, W) -> (B, C_out, H, W)"""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip: nn.Module = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(config: AutoencoderTinyConfig) -> nn.Sequential:
    """[0, 1] image (B, in_channels, H, W) -> raw latent (B, latent_channels, H/f, W/f). Level i: a conv (stride 2
    and no bias after the first level), then its blocks; a last conv to the latent."""
    c, width = config, config.in_channels
    layers: list[nn.Module] = []
    for i, (channels, count) in enumerate(zip(c.encoder_channels, c.encoder_blocks, strict=True)):
        layers.append(_conv(width, channels) if i == 0 else _conv(width, channels, stride=2, bias=False))
        layers += [TinyBlock(channels, channels) for _ in range(count)]
        width = channels
    layers.append(_conv(width, c.latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(config: AutoencoderTinyConfig) -> nn.Sequential:
    """Raw latent (B, latent_channels, h, w), already soft-clamped -> [0, 1]-ish image (B, out_channels, h f, w f).
    A conv + ReLU in, then per level its blocks, and (all but the last level) x2 upsampling and a bias-free conv;
    the last conv (with bias) makes the image."""
    c = config
    layers: list[nn.Module] = [_conv(c.latent_channels, c.decoder_channels[0]), nn.ReLU()]
    last = len(c.decoder_channels) - 1
    for i, (channels, count) in enumerate(zip(c.decoder_channels, c.decoder_blocks, strict=True)):
        layers += [TinyBlock(channels, channels) for _ in range(count)]
        if i < last:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       _conv(channels, c.decoder_channels[i + 1], bias=False)]
    layers.append(_conv(c.decoder_channels[-1], c.out_channels))
    return nn.Sequential(*layers)


class TinyDecoder(nn.Module):
    """tanh(z / 3) * 3, then the decoder layers (`self.layers`, diffusers' DecoderTiny names)."""

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__()
        self.layers = tiny_decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / 3) * 3)


class TinyEncoder(nn.Module):
    """The encoder layers (`self.layers`, diffusers' EncoderTiny names); [0, 1] images in."""

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__()
        self.layers = tiny_encoder(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@COMPONENTS.register("autoencoder_tiny")
class AutoencoderTiny(TilingMixin, FirstStage[AutoencoderTinyConfig]):
    """Image (B, in_channels, H, W) in [-1, 1] <-> latent (B, latent_channels, H/f, W/f), deterministically.

    A first stage like AutoencoderKL (`encode_latents` / `decode_latents`, tiling and slicing), so a pipeline
    takes it as `vae=`: for fast decodes, previews (`pipelines.previews`), or as a fast img2img encoder.
    """

    config_class = AutoencoderTinyConfig
    diffusers_class_name = "AutoencoderTiny"
    diffusers_config = AUTOENCODER_TINY

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__(config)
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def image_channels(self) -> int:
        return self.config.in_channels

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    # ---- the autoencoder ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> raw latent (B, latent_channels, H/f, W/f)."""
        self.check_image(x)
        return self.run_encode(self._encode, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w), raw -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise InputError("latents have the wrong shape", where=f"{type(self).__name__}.decode(z)",
                             expected=f"(B, {self.config.latent_channels}, h, w)", found=tuple(z.shape))
        return self.run_decode(self._decode, z)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.add(1).div(2))   # TAESD works on [0, 1] images

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).mul(2).sub(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x (B, in_channels, H, W) -> same shape."""
        return self.decode(self.encode(x))

    # ---- scaled latents, the diffusion model's space ----------------------------------------------
    def encode_latents(self, x: torch.Tensor, *, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """Image (B, in_channels, H, W) -> scaled latent. The encoder is deterministic: `generator` and `sample`
        exist so every first stage is called alike."""
        return self.scale_latents(self.encode(x))

    def scale_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> diffusion latent: (latent - shift_factor) * scaling_factor (the identity for taesd)."""
        return (latent - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def latents_to_unit(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> [0, 1] (clamped), for storing as an 8-bit image: latent / (2 magnitude) + shift."""
        return latent.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unit_to_latents(self, unit: torch.Tensor) -> torch.Tensor:
        """Inverse of `latents_to_unit` (inside the clamp)."""
        return unit.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    # ---- madebyollin's original files -------------------------------------------------------------
    @classmethod
    def from_taesd_files(cls, encoder: str | os.PathLike, decoder: str | os.PathLike, *,
                         scaling_factor: float = 1.0, shift_factor: float = 0.0,
                         torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
                         ) -> AutoencoderTiny:
        """Load `taesd_encoder` + `taesd_decoder` (.safetensors, or .pth read with weights_only=True): the
        published taesd / taesdxl / taesd3 / taef1 layout. The latent channels are read from the weights; the
        files carry no latent scaling, so give the big VAE's `scaling_factor` / `shift_factor` where the tiny one
        was distilled on raw latents (taesd3, taef1: their diffusers configs hold the values)."""
        state = {}
        for part, path in (("encoder", encoder), ("decoder", decoder)):
            state.update(taesd_keys(read_original_file(Path(path)), part=part, source=str(path)))
        key = "encoder.layers.14.weight"
        if key not in state:
            raise CheckpointError("not a TAESD encoder file", where=str(encoder), expected=f"a key {key!r}",
                                  found=sorted(state)[:10])
        config = AutoencoderTinyConfig(latent_channels=int(state[key].shape[0]), scaling_factor=scaling_factor,
                                       shift_factor=shift_factor)
        return cls.from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=str(encoder))

    def save_taesd_files(self, folder: str | os.PathLike, *, prefix: str = "taesd") -> tuple[Path, Path]:
        """Write `{prefix}_encoder.safetensors` and `{prefix}_decoder.safetensors` in the original layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        paths = []
        for part in ("encoder", "decoder"):
            path = folder / f"{prefix}_{part}.safetensors"
            hub.save_safetensors(original_keys(state, part=part), path)
            paths.append(path)
        return paths[0], paths[1]


def read_original_file(path: Path) -> dict[str, torch.Tensor]:
    """A TAESD half: safetensors, or a PyTorch pickle read with weights_only=True (no code runs)."""
    if not path.is_file():
        raise CheckpointError("TAESD file not found", where=str(path), expected="taesd_encoder / taesd_decoder file")
    if path.suffix == ".safetensors":
        return hub.load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure is a bad file)
        raise CheckpointError(f"cannot read the TAESD file ({type(e).__name__}: {e})", where=str(path)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("a TAESD file must hold a flat state dict", where=str(path),
                              expected="{name: tensor}", found=type(state).__name__)
    return state


# The original decoder is nn.Sequential(Clamp(), conv, ReLU, ...); diffusers (and this module) apply the clamp in
# forward, so decoder layer N is the original's N + 1. The encoder's indices are the same.
OFFSET = {"encoder": 0, "decoder": 1}


def taesd_keys(state: Mapping[str, torch.Tensor], *, part: str, source: str) -> dict[str, torch.Tensor]:
    """Original `N.rest` keys of one half -> `part.layers.(N - offset).rest`."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < OFFSET[part]:
            raise CheckpointError(f"unexpected key in a TAESD {part} file", where=source,
                                  expected="keys 'N.weight', 'N.conv.K.weight' ...", found=key)
        out[f"{part}.layers.{int(index) - OFFSET[part]}.{rest}"] = value
    return out


def original_keys(state: Mapping[str, torch.Tensor], *, part: str) -> dict[str, torch.Tensor]:
    """Inverse of `taesd_keys` for one half."""
    prefix = f"{part}.layers."
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out[f"{int(index) + OFFSET[part]}.{rest}"] = value
    return out



def load_tiny_autoencoder(path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                          device: str | torch.device | None = None) -> AutoencoderTiny:
    """A tiny autoencoder from a diffusers folder / Hub id / built-in name (config.json + weights), or from a folder
    holding madebyollin's `*_encoder` and `*_decoder` files (.safetensors preferred, else .pth)."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        halves = []
        for part in ("encoder", "decoder"):
            found = sorted(folder.glob(f"*_{part}.safetensors")) or sorted(folder.glob(f"*_{part}.pth"))
            if len(found) != 1:
                raise CheckpointError(f"a TAESD folder needs exactly one *_{part} file", where=str(folder),
                                      expected=f"config.json, or taesd_{part}.safetensors / .pth",
                                      found=[p.name for p in found])
            halves.append(found[0])
        return AutoencoderTiny.from_taesd_files(halves[0], halves[1], torch_dtype=torch_dtype, device=device)
    return AutoencoderTiny.from_pretrained(path, torch_dtype=torch_dtype, device=device)


def is_tiny_autoencoder(path: str | os.PathLike) -> bool:
    """Whether `path` (a local folder or a built-in name) holds a tiny autoencoder: a config.json of class
    AutoencoderTiny, or madebyollin's `*_decoder` file(s). Hub ids are not looked up (False)."""
    folder = builtin_path(str(path)) or Path(path).expanduser()
    if not folder.is_dir():
        return False
    if (folder / "config.json").is_file():
        return read_json(folder / "config.json").get("_class_name") == AUTOENCODER_TINY.class_name
    return any(folder.glob("*_decoder.safetensors")) or any(folder.glob("*_decoder.pth"))
