"""`latentdiff train tiny-autoencoder CONFIG.yaml`: distil a first stage into a tiny autoencoder (TAESD's recipe).

The teacher (a trained AutoencoderKL / VQModel, frozen) gives, for each training image x, its diffusion latent
z = scale(mode of q(z|x)) and its decode D(z). The student (`AutoencoderTiny`, scaling 1.0: its latents *are*
the diffusion latents) learns both halves at once:

    loss = decoder_weight * MSE(D_tiny(z), D(z)) + encoder_weight * MSE(E_tiny(x), z)

so the tiny decoder reproduces the big decoder (not the data: it is a drop-in for previews and fast decodes of
the same latents), and the tiny encoder lands in the latent space the diffusion model was trained on. Plain MSE
suffices for the built-in model's flat colours; the published TAESD adds adversarial and perceptual terms for
photographs, which this recipe leaves out. Validation: PSNR of the tiny decode against the teacher's decode on
held-out latents, and the latent MSE of the tiny encoder.

    TinyAutoencoderTrainer(load_tiny_autoencoder_config("shapes-64-tiny-autoencoder.yaml")).fit()
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import hub
from ..config import ComponentConfig, read_json
from ..errors import ConfigError
from ..models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from .config import AutoencoderSampleConfig, _Sections, read_train_file, sections_from_dict
from .data import build_datasets, fixed_batches
from .ema import EMA
from .loop import Trainer, save_image_grid
from .sections import CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, TrainSection, _positive

KIND = "tiny-autoencoder"


@dataclasses.dataclass(frozen=True)
class TinyAutoencoderModelSection(ComponentConfig):
    teacher: str                       # the big first stage: its folder, or a pipeline folder / built-in name with
    teacher_subfolder: str | None = None   # the first stage's subfolder ("vqvae" for latentdiff/shapes-64)
    architecture: dict | None = None   # AutoencoderTinyConfig fields; latent channels and levels default to the
                                       # teacher's (same latent space, same factor)
    width: int | None = None           # shorthand: every level this wide (32 for a 64 px model, 64 = TAESD)
    pretrained: str | None = None      # continue from this AutoencoderTiny folder
    decoder_weight: float = 1.0
    encoder_weight: float = 1.0

    def validate(self) -> None:
        _positive(self, "width")
        _positive(self, "decoder_weight", "encoder_weight", allow_zero=True)


@dataclasses.dataclass(frozen=True)
class TinyAutoencoderTrainSection(TrainSection):
    ema: bool = False


@dataclasses.dataclass(frozen=True)
class TinyAutoencoderTrainConfig(_Sections):
    data: DataConfig
    model: TinyAutoencoderModelSection
    train: TinyAutoencoderTrainSection
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: AutoencoderSampleConfig = AutoencoderSampleConfig()
    source: str | None = None

    kind = KIND


def load_tiny_autoencoder_config(path: str | Path, *, overrides: Sequence[str] = ()) -> TinyAutoencoderTrainConfig:
    """Read the YAML run config (strict, as every stage's), with "section.key=value" overrides."""
    config: TinyAutoencoderTrainConfig = sections_from_dict(read_train_file(path, overrides=overrides),
                                                            TinyAutoencoderTrainConfig, source=str(path))
    return config


def load_teacher(model: TinyAutoencoderModelSection) -> Any:
    """The teacher first stage (AutoencoderKL or VQModel, by its config.json class), frozen, in eval mode."""
    from ..pipelines.denoising import FIRST_STAGES

    root = hub.resolve(model.teacher)
    folder = root / model.teacher_subfolder if model.teacher_subfolder else root
    if not (folder / "config.json").is_file():
        raise ConfigError("the teacher must be a first-stage folder (config.json + weights)", where="model.teacher",
                          expected="an AutoencoderKL / VQModel folder, or teacher_subfolder inside a pipeline",
                          found=str(folder))
    name = read_json(folder / "config.json").get("_class_name")
    cls: Any = FIRST_STAGES.get(("diffusers", str(name)))
    if cls is None or cls is AutoencoderTiny:
        raise ConfigError("the teacher's class cannot be distilled", where=str(folder / "config.json"),
                          expected="AutoencoderKL or VQModel", found=name)
    return cls.from_pretrained(folder).eval().requires_grad_(False)


def student_config(model: TinyAutoencoderModelSection, teacher: Any) -> AutoencoderTinyConfig:
    """The student's architecture: `architecture` fields over TAESD's, cut to the teacher's levels and latents."""
    levels = teacher.downsample_factor.bit_length()   # f = 2^(levels - 1)
    width = model.width or 64
    fields: dict[str, Any] = {
        "latent_channels": teacher.latent_channels, "in_channels": teacher.image_channels,
        "out_channels": teacher.image_channels,
        "encoder_channels": (width,) * levels, "decoder_channels": (width,) * levels,
        "encoder_blocks": (1, 3, 3, 3)[:levels] if levels <= 4 else (1,) + (3,) * (levels - 1),
        "decoder_blocks": (3, 3, 3, 1)[-levels:] if levels <= 4 else (3,) * (levels - 1) + (1,)}
    config = AutoencoderTinyConfig.from_dict({**fields, **(model.architecture or {})}, source="model.architecture")
    if config.downsample_factor != teacher.downsample_factor or config.latent_channels != teacher.latent_channels:
        raise ConfigError("the tiny autoencoder must share the teacher's latent space", where="model.architecture",
                          expected=f"factor {teacher.downsample_factor}, {teacher.latent_channels} latent channels",
                          found=f"factor {config.downsample_factor}, {config.latent_channels} latent channels")
    return config


class TinyAutoencoderTrainer(Trainer):
    stage = KIND
    export_name = "tiny_autoencoder"

    def __init__(self, config: TinyAutoencoderTrainConfig, *, accelerator: Any = None):
        # the loop reads only the sections every stage has (train, optim, checkpoint, logging, data)
        super().__init__(config, accelerator=accelerator)  # type: ignore[arg-type]
        self.run_config = config
        self.train_set, self.valid_set = build_datasets(config.data, seed=config.train.seed)
        self.teacher = load_teacher(config.model).to(self.device)
        if config.model.pretrained:
            self.student = AutoencoderTiny.from_pretrained(config.model.pretrained)
            student_config(config.model.replace(architecture=self.student.config.to_dict()), self.teacher)
        else:
            self.student = AutoencoderTiny(student_config(config.model, self.teacher))
        self.student.to(self.device).train()
        if config.data.resolution % self.student.downsample_factor:
            raise ConfigError("the image size must be a multiple of the autoencoder's factor",
                              where="data.resolution", expected=f"a multiple of {self.student.downsample_factor}",
                              found=config.data.resolution)
        self.modules = {"tiny_autoencoder": self.student}
        t = config.train
        self.ema = EMA(self.student, decay=t.ema_decay, warmup=t.ema_warmup) if t.ema else None
        self.add_optimizer("tiny_autoencoder", self.student.parameters(), config.optim)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (the teacher's diffusion latent z, its decode D(z)), both float32."""
        z = self.teacher.encode_latents(x, sample=False).float()
        return z, self.teacher.decode_latents(z).float()

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.run_config.model
        z, image = self.targets(x)
        with self.accelerator.autocast():
            decoded = self.student.decode_latents(z)
            encoded = self.student.encode_latents(x)
        loss_decoder = F.mse_loss(decoded.float(), image)
        loss_encoder = F.mse_loss(encoded.float(), z)
        loss = m.decoder_weight * loss_decoder + m.encoder_weight * loss_encoder
        return loss, {"loss": loss.detach(), "loss_decoder": loss_decoder.detach(),
                      "loss_encoder": loss_encoder.detach()}

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(micro_batches)
        logs: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            loss, log = self.losses(batch["pixel_values"].to(self.device, non_blocking=True))
            self.accelerator.backward(loss / n)
            for k, v in log.items():
                logs[k] = logs.get(k, 0) + v / n
        norm = self.step_optimizer("tiny_autoencoder", max_grad_norm=self.config.optim.max_grad_norm)
        if self.ema is not None:
            self.ema.update()
        return logs | ({"grad_norm": norm} if norm is not None else {})

    # ---- validation and export ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, *, limit: int | None = None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """PSNR of the tiny decode against the teacher's decode of the same held-out latents, and the tiny
        encoder's latent MSE. -> (scores, teacher decodes, tiny decodes), images in [-1, 1]."""
        from ..metrics.image import psnr

        data = self.valid_set or self.train_set
        count = min(limit or self.run_config.sample.max_validation_images, len(data))
        was_training = self.student.training
        self.student.eval()
        scores = {"val/psnr_vs_teacher": 0.0, "val/latent_mse": 0.0}
        teacher_images, tiny_images = [], []
        try:
            for batch in fixed_batches(data, count, self.local_batch):
                x = batch["pixel_values"].to(self.device)
                z, image = self.targets(x)
                tiny = self.student.decode_latents(z).float().clamp(-1, 1)
                image = image.clamp(-1, 1)
                weight = len(x) / count
                scores["val/psnr_vs_teacher"] += float(psnr((tiny + 1) / 2, (image + 1) / 2, data_range=1.0)
                                                       .mean()) * weight
                scores["val/latent_mse"] += float(F.mse_loss(self.student.encode_latents(x).float(), z)) * weight
                teacher_images.append(image.cpu())
                tiny_images.append(tiny.cpu())
        finally:
            self.student.train(was_training)
        return scores, torch.cat(teacher_images), torch.cat(tiny_images)

    def evaluate(self, step: int) -> None:
        with self.ema.applied() if self.ema is not None else nullcontext():
            scores, teacher_images, tiny_images = self.validate()
        self.log.log(step, scores)
        k = self.run_config.sample.num_images
        save_image_grid(torch.cat([teacher_images[:k], tiny_images[:k]]),
                        self.output_dir / "decodes" / f"step-{step:08d}.png", rows=2, params={"step": step, **scores})

    def export(self) -> Path:
        """The (EMA) student as an AutoencoderTiny folder; the main process writes."""
        folder = self.export_folder()
        if self.accelerator.is_main_process:
            with self.ema.applied() if self.ema is not None else nullcontext():
                model = AutoencoderTiny.from_state_dict(self.student.config, self.student.state_dict())
            model.save_pretrained(folder)
        self.accelerator.wait_for_everyone()
        return folder
