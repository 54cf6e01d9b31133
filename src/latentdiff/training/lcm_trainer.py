"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1; the LoRA variant of
"LCM-LoRA", Luo et al. 2023b): `latentdiff train lcm`.

For a data latent z0 and caption c, with the DDIM grid t_n = n k - 1 (k = T // N, N = num_ddim_timesteps):

    n ~ U{1..N},  t = t_n,  s = max(t - k, 0),  w ~ U[w_min, w_max],  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    teacher, guided (eq. 10):  x0_w = x0_c + w (x0_c - x0_u),   eps_w = eps_c + w (eps_c - eps_u)
    one DDIM ODE step t -> s:  z_s = sqrt(abar_s) x0_w + sqrt(1 - abar_s) eps_w
    student:  f(z, t) = c_skip(t) z + c_out(t) x0_pred(z, t)            (the boundary condition, eq. 9)
    loss:     d(f_theta(z_t, t), f_target(z_s, s)),  d = Huber sqrt(a^2 + c^2) - c (c = huber_c), or L2

The teacher is the frozen pipeline's UNet (the base under the LoRA, which is switched off for it). The target
network is the EMA of the student (full distillation; decay train.ema_decay, LCM's mu = 0.95), or, for an LCM-LoRA,
the student itself without gradients (as the LCM-LoRA training recipe). The LoRA variant takes no w embedding:
the model learns the guidance of the w range, and is sampled without guidance (LCMSampler, guidance_scale 1).

Export: an LCM-LoRA as a kohya-format file OUTPUT_DIR/lcm/pytorch_lora_weights.safetensors (what
`pipe.load_lora_weights(folder)` reads); a fully distilled model as a pipeline folder whose sampler is LCM.
Data, the latent cache, seeded per-step randomness, checkpoints and exact resume are the diffusion stage's.
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..diffusion.samplers.consistency import LCMSampler, consistency_denoised, skipping_timesteps
from ..diffusion.schedules import model_output_to_x0_eps
from ..errors import ConfigError
from ..pipelines.latent_diffusion import LatentDiffusionPipeline
from .conditioning import CONDITIONINGS
from .config import LCMTrainConfig
from .data import build_datasets, fixed_batches
from .diffusion_trainer import CHECKPOINTED_BLOCKS, DiffusionTrainer
from .ema import EMA
from .loop import Trainer, enable_gradient_checkpointing, save_image_grid
from .lora import TrainableLoRA

LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' default name: load_lora_weights(folder) finds it


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, *, kind: str, huber_c: float) -> torch.Tensor:
    """Huber: mean(sqrt((p - t)^2 + c^2) - c) (the pseudo-Huber of improved consistency training); l2: MSE."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(prediction.float(), target.float())
    return (((prediction.float() - target.float()) ** 2 + huber_c**2).sqrt() - huber_c).mean()


class LCMTrainer(DiffusionTrainer):
    """The diffusion stage's loop, with a frozen teacher pipeline and a consistency student (LoRA or full UNet)."""

    stage = "lcm"
    export_name = "lcm"
    config: LCMTrainConfig  # type: ignore[assignment]

    def __init__(self, config: LCMTrainConfig, *, accelerator: Any = None):
        Trainer.__init__(self, config, accelerator=accelerator)  # type: ignore[arg-type]
        model, train = config.model, config.train
        self.train_set, self.valid_set = build_datasets(config.data, seed=train.seed,  # data errors first
                                                        load_pixels=not train.cache_latents)
        if self.train_set.index.labels != "captions":
            raise ConfigError("LCM distillation of a text-to-image model needs captions", where="data.labels",
                              expected="captions", found=self.train_set.index.labels)
        self.pipeline = LatentDiffusionPipeline.from_pretrained(model.pipeline)
        self.pipeline.release_weights = False   # previews run while the student trains
        self.vae, self.unet, self.text_encoder = self.pipeline.vae, self.pipeline.unet, self.pipeline.text_encoder
        for frozen in (self.vae, self.unet, self.text_encoder):
            frozen.to(self.device).requires_grad_(False).eval()
        self.noise_scheduler = self.pipeline.noise_scheduler
        self.conditioning = CONDITIONINGS["text"]
        self.num_classes = None
        self.grid = torch.tensor(skipping_timesteps(self.noise_scheduler.num_train_timesteps,
                                                    train.num_ddim_timesteps), device=self.device)
        self.skip = self.noise_scheduler.num_train_timesteps // train.num_ddim_timesteps
        self.abar = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.lora: TrainableLoRA | None = None
        if model.lora is not None:
            lora = model.lora
            self.lora = TrainableLoRA(self.unet, rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
            self.lora.to(self.device).train()
            self.lora.attach(self.pipeline)
            self.teacher = self.unet           # with the adapter switched off (`_teacher`)
            self.modules = {"lora": self.lora}
            self.ema = EMA(self.lora, decay=train.ema_decay, warmup=train.ema_warmup) if train.ema else None
        else:
            if not train.ema:
                raise ConfigError("full LCM distillation needs the EMA: it is the target network",
                                  where="train.ema", expected="true", found=False)
            self.teacher = copy.deepcopy(self.unet)
            self.unet.requires_grad_(True).train()
            self.modules = {"unet": self.unet}
            self.ema = EMA(self.unet, decay=train.ema_decay, warmup=train.ema_warmup)
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet, CHECKPOINTED_BLOCKS)
        params = [p for m in self.modules.values() for p in m.parameters()]
        self.add_optimizer("model", params, config.optim)
        self.pipeline.sampler = LCMSampler(original_inference_steps=train.num_ddim_timesteps,
                                           timestep_scaling=train.timestep_scaling)
        with torch.no_grad():
            self.empty_context = self.text_encoder([""])
        self.cache = self._latent_cache() if train.cache_latents else None

    def _cache_key(self) -> str:
        files = [str(r.path) for r in self.train_set.index.records]
        parts = [files, self.config.data.resolution, self.config.data.random_flip, self.config.model.pipeline,
                 self.vae.to_file_config()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _teacher(self) -> AbstractContextManager[None]:
        return self.lora.disabled(self.pipeline) if self.lora is not None else nullcontext()

    def _target(self) -> AbstractContextManager[None]:
        """The target network in the body: the EMA weights (full), the student itself (LoRA)."""
        return self.ema.applied() if self.lora is None and self.ema is not None else nullcontext()

    # ---- one optimizer step ---------------------------------------------------------------------
    def targets(self, z0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, w: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z_t, t, s, f_target(z_s, s)) for data latents z0, noise, grid indices (B,) and guidance w (B,):
        the teacher's guided DDIM step from t to s and the target network's consistency function there."""
        b, kind = z0.shape[0], self.noise_scheduler.config.prediction_type
        t = self.grid[index]
        s = (t - self.skip).clamp(min=0)
        abar_t, abar_s = self.abar[t].view(-1, 1, 1, 1), self.abar[s].view(-1, 1, 1, 1)
        z_t = abar_t.sqrt() * z0 + (1 - abar_t).sqrt() * noise
        acc = self.accelerator
        with torch.no_grad():
            with self._teacher(), acc.autocast():
                both = self.teacher(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                    context=torch.cat([context, self.empty_context.expand(b, -1, -1)])).float()
            x0, eps = model_output_to_x0_eps(both, torch.cat([z_t, z_t]), torch.cat([abar_t, abar_t]), kind)
            (x0_c, x0_u), (eps_c, eps_u), ww = x0.chunk(2), eps.chunk(2), w.view(-1, 1, 1, 1)
            x0_w, eps_w = x0_c + ww * (x0_c - x0_u), eps_c + ww * (eps_c - eps_u)
            z_s = abar_s.sqrt() * x0_w + (1 - abar_s).sqrt() * eps_w
            with self._target(), acc.autocast():
                out = self.unet(z_s, s, context=context).float()
            target = consistency_denoised(out, z_s, s.view(-1, 1, 1, 1).float(), abar_s, kind,
                                          timestep_scaling=self.config.train.timestep_scaling)
        return z_t, t, abar_t, target

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        acc, n, train = self.accelerator, len(micro_batches), self.config.train
        kind = self.noise_scheduler.config.prediction_type
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro_batches):
            rnd = self.random(m)   # streams: 0 posterior, 1 noise, 2 grid index, 3 guidance w
            with torch.no_grad():
                z0, _ = self.latents(batch, rnd)
                b = z0.shape[0]
                noise = rnd.randn(z0.shape, stream=1)
                index = rnd.randint(len(self.grid), b, stream=2)
                w = train.w_min + (train.w_max - train.w_min) * rnd.rand(b, stream=3)
                assert self.text_encoder is not None     # the pipeline's (a LatentDiffusionPipeline has one)
                context = self.text_encoder(list(batch["caption"]))
            z_t, t, abar_t, target = self.targets(z0, noise, index, w, context)
            with acc.autocast():
                out = self.unet(z_t, t, context=context).float()
            prediction = consistency_denoised(out, z_t, t.view(-1, 1, 1, 1).float(), abar_t, kind,
                                              timestep_scaling=train.timestep_scaling)
            loss = consistency_loss(prediction, target, kind=train.loss, huber_c=train.huber_c)
            acc.backward(loss / n)
            total += loss.detach()
        return self.finish_step(total, n)

    # ---- previews and export ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, *, use_ema: bool = True) -> torch.Tensor:
        """(S N, 3, H, W) in [-1, 1]: per seed, the first sample.num_images validation captions in LCM steps."""
        cfg = self.config.sample
        data = self.valid_set or self.train_set
        captions = list(next(fixed_batches(data, cfg.num_images, cfg.num_images))["caption"])
        size, rows = self.config.data.resolution, []
        modules = list(self.modules.values())
        for module in modules:
            module.eval()
        try:
            with self.ema.applied() if (use_ema and self.ema is not None) else nullcontext():
                cond, uncond = self.pipeline.encode_prompt(captions, guidance=cfg.guidance_scale != 1.0)
                for seed in cfg.seeds:
                    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
                    x_T = self.pipeline.prepare_latents(len(captions), size, size, generator=generators)
                    z0 = self.pipeline.denoise(x_T, cond, uncond, guidance_scale=cfg.guidance_scale,
                                               num_inference_steps=cfg.num_inference_steps, progress=False,
                                               generator=generators)
                    rows.append(self.pipeline.decode(z0).clamp(-1, 1))
        finally:
            for module in modules:
                module.train()
        return torch.cat(rows)

    def evaluate(self, step: int) -> None:
        images = self.sample(use_ema=self.config.sample.use_ema)
        save_image_grid(images, self.output_dir / "samples" / f"step-{step:08d}.png",
                        rows=len(self.config.sample.seeds), params={"step": step, "stage": self.stage})

    def export(self) -> Path:
        """LoRA: OUTPUT_DIR/lcm/pytorch_lora_weights.safetensors (kohya format); full: a pipeline folder with the
        LCM sampler. The EMA weights when there is an EMA."""
        folder = self.export_folder()
        if self.accelerator.is_main_process:
            with self.ema.applied() if self.ema is not None else nullcontext(), hub.atomic_folder(folder) as tmp:
                if self.lora is not None:
                    train = self.config.train
                    self.lora.save(Path(tmp) / LORA_FILE, metadata={
                        "ss_training_comment": "LCM-LoRA (latentdiff train lcm)", "lcm_w_min": str(train.w_min),
                        "lcm_w_max": str(train.w_max), "lcm_original_inference_steps": str(train.num_ddim_timesteps),
                        "lcm_base_model": self.config.model.pipeline})
                else:
                    self.pipeline.write_files(tmp)
        self.accelerator.wait_for_everyone()
        return folder

    def build_pipeline(self) -> Any:
        return self.pipeline
