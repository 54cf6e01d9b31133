"""`latentdiff train KIND CONFIG`: read a run config, build its stage's trainer, fit.

Above both trainers (which build on `loop.Trainer`), so the loop never imports a stage.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import AutoencoderTrainConfig, ControlNetTrainConfig, LCMTrainConfig, load_train_config

if TYPE_CHECKING:
    from .loop import Trainer


def train_from_file(kind: str, path: str | Path, *, overrides: Sequence[str] = ()) -> tuple[Path, bool]:
    """Read the config, build the stage's trainer, fit. -> (the export folder, whether this is the main process)."""
    if kind == "tiny-autoencoder":   # its config and trainer live in their own module
        from .tiny_autoencoder import TinyAutoencoderTrainer, load_tiny_autoencoder_config

        tiny = TinyAutoencoderTrainer(load_tiny_autoencoder_config(path, overrides=overrides))
        return tiny.fit(), tiny.accelerator.is_main_process
    # kind is checked there (an unknown one is a ConfigError naming the stages)
    config = load_train_config(path, kind, overrides=overrides)  # type: ignore[arg-type]
    # only the stage that runs is imported (the diffusion stage pulls in every pipeline)
    trainer: Trainer
    if isinstance(config, AutoencoderTrainConfig):    # kind == "autoencoder"
        from .autoencoder_trainer import AutoencoderTrainer

        trainer = AutoencoderTrainer(config)
    elif isinstance(config, ControlNetTrainConfig):
        from .controlnet_trainer import ControlNetTrainer

        trainer = ControlNetTrainer(config)
    elif isinstance(config, LCMTrainConfig):
        from .lcm_trainer import LCMTrainer

        trainer = LCMTrainer(config)
    else:
        from .diffusion_trainer import DiffusionTrainer

        trainer = DiffusionTrainer(config)
    return trainer.fit(), trainer.accelerator.is_main_process
