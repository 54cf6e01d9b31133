"""Training a ControlNet (Zhang et al. 2023) on a frozen text-to-image pipeline: `latentdiff train controlnet`.

    L = E_{z0 = E(x), eps, t} || target - eps_theta(z_t, t, tau(y), r_phi(z_t, t, tau(y), c)) ||^2

The base pipeline's UNet eps_theta, first stage E and text encoder tau are frozen; only the ControlNet r_phi,
which reads the control image c, is trained. It starts as `ControlNet.from_unet` (a copy of the UNet's down half
and mid block, zero convolutions at its outputs: at step 0 the UNet's prediction is untouched) and hands the UNet
its residuals (`Residuals(down=, mid=)`), so gradients reach it through the frozen UNet. The loss, its target
(eps / v / x0 as the base's noise scheduler says), the latent cache, the seeded per-step randomness, EMA,
checkpoints and exact resume are the diffusion stage's (`DiffusionTrainer`, `loop.Trainer`).

The data is an image folder with captions whose metadata also names a control image per image (diffusers'
ControlNet training layout: `{"file_name", "text", "conditioning_image"}`); a caption is replaced by "" with
probability `train.conditioning_dropout` (the control image stays), so guidance has an unconditional branch that
still follows the control image, as the paper trains (it drops 50 %).

    ControlNetTrainer(load_train_config("examples/train/shapes-64-silhouette.yaml", "controlnet")).fit()
    # -> OUTPUT_DIR/controlnet: a diffusers ControlNetModel folder (ControlNet.from_pretrained)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.controlnet import ControlNet
from ..models.residuals import Residuals
from ..pipelines.latent_diffusion import LatentDiffusionPipeline
from .conditioning import CONDITIONINGS
from .config import ControlNetTrainConfig
from .data import build_datasets, fixed_batches
from .diffusion_trainer import CHECKPOINTED_BLOCKS, DiffusionTrainer
from .ema import EMA
from .loop import Trainer, enable_gradient_checkpointing, save_image_grid

HINT_WIDTHS = (16, 32, 96, 256)  # diffusers' ControlNetModel default hint encoder (factor 8), cut to the base's


def controlled_unet(unet: Callable[..., torch.Tensor], controlnet: ControlNet, control_image: torch.Tensor, *,
                    conditioning_scale: float = 1.0) -> Callable[..., torch.Tensor]:
    """`model(x, t, context=..., **kw)` for `TextGuidedPipeline.denoise(model=)`: the UNet with the ControlNet's
    residuals for `control_image` (B, C, H, W) in [0, 1]. Under guidance the UNet sees the batch twice
    ([uncond; cond]); the control image is repeated to match, so both branches follow it (as diffusers does)."""
    def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hint = control_image.to(device=x.device, dtype=x.dtype)
        if hint.shape[0] != x.shape[0]:
            hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
        down, mid = controlnet(x, t, kwargs.get("context"), hint, conditioning_scale=conditioning_scale)
        return unet(x, t, residuals=Residuals(down=down, mid=mid), **kwargs)

    return model


class ControlNetTrainer(DiffusionTrainer):
    """The diffusion stage with the base pipeline frozen and a ControlNet as the one trained module."""

    stage = "controlnet"
    export_name = "controlnet"
    config: ControlNetTrainConfig  # type: ignore[assignment]

    def __init__(self, config: ControlNetTrainConfig, *, accelerator: Any = None):
        # the diffusion stage's __init__ builds a UNet and text encoder to train; this stage loads them frozen
        Trainer.__init__(self, config, accelerator=accelerator)  # type: ignore[arg-type]
        model, train = config.model, config.train
        self.train_set, self.valid_set = build_datasets(config.data, seed=train.seed,  # data errors first
                                                        load_pixels=not train.cache_latents,
                                                        hint_column=config.data.conditioning_image_column)
        self.pipeline = LatentDiffusionPipeline.from_pretrained(model.pipeline)
        self.pipeline.release_weights = False   # previews run while the ControlNet trains
        self.base_unet, self.base_text_encoder = self.pipeline.unet, self.pipeline.text_encoder  # typed as loaded
        self.vae, self.unet, self.text_encoder = self.pipeline.vae, self.base_unet, self.base_text_encoder
        for frozen in (self.vae, self.unet, self.text_encoder):
            frozen.to(self.device).requires_grad_(False).eval()
        self.noise_scheduler = self.pipeline.noise_scheduler
        self.conditioning = CONDITIONINGS["text"]
        self.num_classes = None
        self.controlnet = self._build_controlnet().to(self.device).train()
        self.modules = {"controlnet": self.controlnet}
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(self.controlnet, CHECKPOINTED_BLOCKS)
            enable_gradient_checkpointing(self.unet, CHECKPOINTED_BLOCKS)
        self.ema = EMA(self.controlnet, decay=train.ema_decay, warmup=train.ema_warmup) if train.ema else None
        self.add_optimizer("model", self.controlnet.parameters(), config.optim)
        self.cache = self._latent_cache() if train.cache_latents else None

    def _build_controlnet(self) -> ControlNet:
        """The pretrained ControlNet, or a new one from the UNet; its hint encoder must reach the latent's size."""
        model, factor = self.config.model, self.vae.downsample_factor
        if model.pretrained_controlnet:
            controlnet = ControlNet.from_pretrained(model.pretrained_controlnet)
        else:
            levels = factor.bit_length()          # one level, then one per halving: factor 4 -> 3 levels
            widths = model.conditioning_embedding_out_channels or HINT_WIDTHS[:levels]
            controlnet = ControlNet.from_unet(self.base_unet, conditioning_embedding_out_channels=tuple(widths),
                                              conditioning_channels=model.conditioning_channels)
        if controlnet.config.hint_factor != factor:
            raise ConfigError("the ControlNet's hint encoder must shrink the control image to the latent's size",
                              where="model.conditioning_embedding_out_channels",
                              expected=f"{factor.bit_length()} widths (the autoencoder's factor {factor})",
                              found=controlnet.config.conditioning_embedding_out_channels)
        unet_config = self.unet.config
        for name in ("in_channels", "channels", "cross_attention_dim"):
            if getattr(controlnet.config, name) != getattr(unet_config, name):
                raise ConfigError("the ControlNet was made for another UNet", where="model.pretrained_controlnet",
                                  expected=f"{name} {getattr(unet_config, name)}",
                                  found=getattr(controlnet.config, name))
        return controlnet

    def _cache_key(self) -> str:
        files = [str(r.path) for r in self.train_set.index.records]
        parts = [files, self.config.data.resolution, self.config.data.random_flip, self.config.model.pipeline,
                 self.vae.to_file_config()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        acc, n = self.accelerator, len(micro_batches)
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro_batches):
            rnd = self.random(m)   # the diffusion stage's streams: 0 posterior, 1 noise, 2 t, 3 dropout
            with torch.no_grad():
                z0, _ = self.latents(batch, rnd)
                noise = rnd.randn(z0.shape, stream=1)
                t = rnd.randint(self.noise_scheduler.num_train_timesteps, z0.shape[0], stream=2)
                drop = rnd.rand(z0.shape[0], stream=3) < self.config.train.conditioning_dropout
                x_t = self.noise_scheduler.add_noise(z0, noise, t)
                target = self.noise_scheduler.training_target(z0, noise, t)
                captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
                context = self.base_text_encoder(captions)
            hint = batch["control_image"].to(self.device, non_blocking=True)
            with acc.autocast():
                prediction = controlled_unet(self.unet, self.controlnet, hint)(x_t, t, context=context)
            loss = F.mse_loss(prediction.float(), target.float())
            acc.backward(loss / n)
            total += loss.detach()
        return self.finish_step(total, n)

    # ---- previews and export ------------------------------------------------------------------------
    def preview_batch(self) -> dict[str, Any]:
        """The first sample.num_images validation items (training items when none are held out)."""
        data = self.valid_set or self.train_set
        return next(fixed_batches(data, self.config.sample.num_images, self.config.sample.num_images))

    @torch.no_grad()
    def sample(self, *, use_ema: bool = True) -> torch.Tensor:
        """(2 N S, 3, H, W) in [-1, 1]: per seed, a row of the N control images over a row of their samples
        (the base pipeline's DDIM, guided, with the ControlNet's residuals)."""
        cfg, batch = self.config.sample, self.preview_batch()
        hints, captions = batch["control_image"].to(self.device), list(batch["caption"])
        size, rows = self.config.data.resolution, []
        self.controlnet.eval()
        try:
            with self.ema.applied() if (use_ema and self.ema is not None) else nullcontext():
                cond, uncond = self.pipeline.encode_prompt(captions, guidance=cfg.guidance_scale != 1.0)
                for seed in cfg.seeds:
                    x_T = self.pipeline.prepare_latents(len(captions), size, size,
                                                        generator=[torch.Generator().manual_seed(seed)
                                                                   for _ in captions])
                    z0 = self.pipeline.denoise(x_T, cond, uncond, guidance_scale=cfg.guidance_scale,
                                               num_inference_steps=cfg.num_inference_steps, progress=False,
                                               model=controlled_unet(self.unet, self.controlnet, hints))
                    rows += [hints * 2 - 1, self.pipeline.decode(z0).clamp(-1, 1)]
        finally:
            self.controlnet.train()
        return torch.cat(rows)

    def evaluate(self, step: int) -> None:
        images = self.sample(use_ema=self.config.sample.use_ema)
        save_image_grid(images, self.output_dir / "samples" / f"step-{step:08d}.png",
                        rows=2 * len(self.config.sample.seeds), params={"step": step, "stage": self.stage})

    def export(self) -> Path:
        """The EMA weights (else the trained ones) as a diffusers ControlNetModel folder; main process writes."""
        folder = self.export_folder()
        if self.accelerator.is_main_process:
            with self.ema.applied() if self.ema is not None else nullcontext():
                self.controlnet.save_pretrained(folder)
        self.accelerator.wait_for_everyone()
        return folder

    def build_pipeline(self) -> Any:
        return self.pipeline
