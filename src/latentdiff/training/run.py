"""`latentdiff train KIND CONFIG`: read a run config, build its stage's trainer, fit.

Above both trainers (which build on `loop.Trainer`), so the loop never imports a stage.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import load_train_config


def train_from_file(kind: str, path: str | Path, *, overrides: Sequence[str] = ()) -> tuple[Path, bool]:
    """Read the config, build the stage's trainer, fit. -> (the export folder, whether this is the main process)."""
    config = load_train_config(path, kind, overrides=overrides)  # type: ignore[arg-type]
    # only the stage that runs is imported (the diffusion stage pulls in every pipeline)
    if kind == "autoencoder":
        from .autoencoder_trainer import AutoencoderTrainer as trainer_class
    else:
        from .diffusion_trainer import DiffusionTrainer as trainer_class
    trainer = trainer_class(config)
    return trainer.fit(), trainer.accelerator.is_main_process
