"""The identity first stage: f = 1, pixel-space diffusion through the latent pipelines.

LDM's study of the downsampling factor (Rombach et al. 2022, sec. 4.1, fig. 6) includes LDM-1, diffusion
directly on pixels. With this component in the autoencoder's place every pipeline, sampler and training
loop runs unchanged on images: encode and decode are identities, `downsample_factor` is 1 and the
"latent" has the image's channels. It has no weights: its folder is a config.json alone.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import hub
from ..config import ComponentConfig
from ..errors import CheckpointError, ConfigError
from ..registry import COMPONENTS
from ..utils.dtypes import resolve_torch_dtype
from .autoencoder_parts import FirstStage, Generator
from .base import CONFIG_NAME


@dataclasses.dataclass(frozen=True)
class IdentityFirstStageConfig(ComponentConfig):
    channels: int = 3  # image channels, which are also the latent channels

    def validate(self) -> None:
        if self.channels < 1:
            raise ConfigError("invalid IdentityFirstStageConfig field 'channels'", where="channels",
                              expected="a positive integer", found=repr(self.channels))


@COMPONENTS.register("identity_first_stage")
class IdentityFirstStage(FirstStage[IdentityFirstStageConfig]):
    """x (B, channels, H, W) -> the same x, through the first-stage interface of AutoencoderKL / VQModel."""

    config_class = IdentityFirstStageConfig
    _anchor: torch.Tensor

    def __init__(self, config: IdentityFirstStageConfig):
        super().__init__(config)
        # No parameters, so `dtype`/`device` follow this empty, non-persistent buffer: .to() / .half() move
        # it as they would move weights, and it is never saved.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.config.channels

    @property
    def image_channels(self) -> int:
        return self.config.channels

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # ---- the first-stage interface -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, channels, H, W) -> x."""
        self.check_image(x)
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, channels, H, W) -> z."""
        self.check_image(z, where=f"{type(self).__name__}.decode(z)")
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def encode_latents(self, x: torch.Tensor, *, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """x: (B, channels, H, W) -> x. `generator` and `sample` exist so every first stage is called alike."""
        return self.encode(x)

    def scale_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z

    # ---- a weightless folder: config.json only --------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, variant: str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool | None = None, mmap_weights: bool | None = None,
                        check_finite_weights: bool = False) -> IdentityFirstStage:
        """Read config.json from a folder or Hub id. `variant`, `mmap_weights` and `check_finite_weights` concern
        weights, so they change nothing here."""
        prefix = f"{subfolder}/" if subfolder else ""
        root = hub.resolve(path_or_id, revision=revision, cache_dir=cache_dir, token=token,
                           local_files_only=local_files_only, allow_patterns=[f"{prefix}{CONFIG_NAME}"])
        folder = root / subfolder if subfolder else root
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in the model folder", where=str(folder),
                                  expected=f"{cls.__name__} folder with {CONFIG_NAME}")
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path_or_id))[0]
        return cls.from_state_dict(cls.load_config(folder), {}, torch_dtype=torch_dtype, device=device,
                                   source=str(folder))

    @classmethod
    def from_state_dict(cls, config: IdentityFirstStageConfig, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None, key_names: Mapping[str, str] | None = None) -> IdentityFirstStage:
        if state:
            raise CheckpointError(f"{cls.__name__} has no weights", where=source, expected="an empty state dict",
                                  found=sorted(state)[:20])
        return cls(config).to(device=device or "cpu", dtype=torch_dtype or torch.float32).eval()

    def write_files(self, folder: Path, *, variant: str | None = None,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write config.json only (`variant` names a weights file, so it changes nothing here; `state_dict`, as
        ModelMixin.write_files takes it, can only be empty)."""
        if state_dict:
            raise CheckpointError(f"{type(self).__name__} has no weights", expected="an empty state dict",
                                  found=sorted(state_dict)[:20])
        folder.mkdir(parents=True, exist_ok=True)
        hub.write_json(self.file_config(), folder / CONFIG_NAME)

