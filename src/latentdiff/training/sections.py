"""The sections every training stage's config shares: data, optimizer, train, checkpoint, logging.

Part of `training.config` (which re-exports them and adds the stages' own sections and the file reader); apart so
that module stays readable. Frozen dataclasses checked on construction, as every config.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from .. import limits
from ..config import ComponentConfig
from ..errors import ConfigError
from ..limits import check_finite

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _positive(config: ComponentConfig, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, float):  # NaN passes every comparison below; inf trains to NaN
            check_finite(value, key=name, where=name, error=ConfigError)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}", where=name,
                              expected=">= 0" if allow_zero else "> 0", found=value)


@dataclasses.dataclass(frozen=True)
class DataConfig(ComponentConfig):
    path: str                                            # image folder (metadata.jsonl captions, or class folders)
    labels: Literal["auto", "captions", "classes", "none"] = "auto"   # auto: metadata file > subfolders > none
    metadata_file: str = "metadata.jsonl"                # Hugging Face `imagefolder` convention
    image_column: str = "file_name"
    caption_column: str = "text"
    resolution: int = 256                                # resize the short side, then crop a square of this side
    center_crop: bool = True                             # False: a random crop (seeded per sample)
    random_flip: bool = True                             # horizontal flip with p = 0.5 (seeded per sample)
    on_corrupt: Literal["skip", "error"] = "skip"        # skip: warn, count, and take the next image instead
    on_missing_caption: Literal["error", "skip", "empty"] = "error"  # image without a caption: error / drop / ""
    validation_path: str | None = None                   # a separate validation folder, or
    validation_split: int = 0                            # this many images of `path` held out (a seeded choice)
    num_workers: int = 0
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.path must name an image folder", where="path", expected="a folder", found="''")
        _positive(self, "resolution")
        _positive(self, "validation_split", "num_workers", allow_zero=True)
        limits.check_count(self.resolution, key="resolution", at_least=1, at_most=limits.MAX_SIDE, where="resolution")


@dataclasses.dataclass(frozen=True)
class OptimConfig(ComponentConfig):
    learning_rate: float = 1e-4
    scale_lr: bool = False             # LDM: lr = learning_rate * batch_size * accumulation (its "base lr")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01         # torch's AdamW default, as LDM uses it
    eps: float = 1e-8
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0              # linear from 0 to the full rate over these steps, then the schedule
    min_lr_ratio: float = 0.0          # cosine ends at learning_rate * min_lr_ratio
    max_grad_norm: float | None = 1.0  # clip the global gradient norm of each optimizer; None: no clipping

    def validate(self) -> None:
        _positive(self, "learning_rate", "max_grad_norm")
        _positive(self, "weight_decay", "warmup_steps", "eps", allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio must lie in [0, 1]", where="min_lr_ratio", expected="[0, 1]",
                              found=self.min_lr_ratio)
        if not all(0.0 <= b < 1.0 for b in self.betas):  # NaN fails this too
            raise ConfigError("betas must lie in [0, 1)", where="betas", expected="two numbers in [0, 1)",
                              found=list(self.betas))


@dataclasses.dataclass(frozen=True)
class TrainSection(ComponentConfig):
    output_dir: str
    max_steps: int
    seed: int = 0
    batch_size: int = 8                # global: images per micro-step summed over all processes
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"   # autocast; master weights stay fp32
    gradient_checkpointing: bool = False
    cpu: bool = False                  # force the CPU even where an accelerator is present
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True            # LDM: decay_n = min(decay, (1 + n) / (10 + n))
    overwrite: bool = False            # a fresh run may replace an earlier run's export in output_dir

    def validate(self) -> None:
        _positive(self, "max_steps", "batch_size", "gradient_accumulation_steps")
        _positive(self, "seed", allow_zero=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must lie in [0, 1)", where="ema_decay", expected="[0, 1)",
                              found=self.ema_decay)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(ComponentConfig):
    every_n_steps: int = 1000
    keep_last: int = 3
    resume: str | None = None          # "latest" (start fresh when there is none) or a checkpoint folder
    export_dir: str | None = None      # default: OUTPUT_DIR/autoencoder or OUTPUT_DIR/pipeline
    push_to_hub: str | None = None     # Hub repo id to upload the export to
    hub_private: bool = True

    def validate(self) -> None:
        _positive(self, "every_n_steps", "keep_last")


@dataclasses.dataclass(frozen=True)
class LoggingConfig(ComponentConfig):
    every_n_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True           # only if tensorboard is installed (else a note, and the CSV)
    csv: bool = True

    def validate(self) -> None:
        _positive(self, "every_n_steps")
