"""The sections of `latentdiff train lcm` (latent consistency distillation, `lcm_trainer.py`) beyond the shared ones.

    model:  pipeline: latentdiff/shapes-64      # the teacher (frozen), and the student's starting point
            lora: {rank: 16, alpha: 16}         # an LCM-LoRA; leave `lora` out for full distillation
    train:  w_min / w_max, num_ddim_timesteps, loss, huber_c ... (+ the shared train keys)
    sample: 4-step LCM previews without guidance

Part of `training.config` (which builds `LCMTrainConfig` from these); apart so that module stays readable.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..config import ComponentConfig
from ..errors import ConfigError
from .sections import TrainSection, _positive

# The modules the LCM-LoRA report's training script adapts (attention, feed-forward, ResNet convolutions, the
# time-embedding projections, the resamplers): a module is a target when its name is one of these or ends in
# "." + one of these (PEFT's `target_modules` rule).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclasses.dataclass(frozen=True)
class LoRASection(ComponentConfig):
    rank: int = 16
    alpha: float | None = None         # dW = up @ down * alpha / rank; None: alpha = rank (scale 1)
    targets: tuple[str, ...] = LORA_TARGETS

    def validate(self) -> None:
        _positive(self, "rank", "alpha")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError("lora.targets names the adapted modules", where="targets",
                              expected="a list of module-name suffixes", found=list(self.targets))


@dataclasses.dataclass(frozen=True)
class LCMModelSection(ComponentConfig):
    pipeline: str                      # the teacher: a LatentDiffusionPipeline folder or built-in name
    lora: LoRASection | None = None    # None: distil the whole UNet (the target is its EMA)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> LCMModelSection:
        """As every section, with `lora` read as its own strict section."""
        lora = data.get("lora") if isinstance(data, Mapping) else None
        if isinstance(lora, Mapping):
            where = f"{source}.lora" if source else "lora"
            data = {**data, "lora": LoRASection.from_dict(lora, source=where)}
        elif lora is not None and not isinstance(lora, LoRASection):
            raise ConfigError("model.lora must be a mapping", where=f"{source}.lora" if source else "lora",
                              expected="{rank, alpha, targets}", found=type(lora).__name__)
        return super().from_dict(data, source=source)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "lora": None if self.lora is None else self.lora.to_dict()}


@dataclasses.dataclass(frozen=True)
class LCMTrainSection(TrainSection):
    # the teacher's guidance eps_c + w (eps_c - eps_u), w ~ U[w_min, w_max] per sample (diffusers' guidance_scale
    # is 1 + w); the LoRA variant has no w-embedding, so its images follow the range's typical guidance
    w_min: float = 0.5
    w_max: float = 1.0
    num_ddim_timesteps: int = 50       # N: the skipping grid (k = T // N) of the teacher's DDIM solver step
    timestep_scaling: float = 10.0     # s of the boundary scalings (LCMSampler's timestep_scaling)
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001             # sqrt(d^2 + c^2) - c
    cache_latents: bool = False        # encode the data set once (needs center_crop)
    ema_decay: float = 0.95            # the target network of full distillation (LCM's mu)
    ema_warmup: bool = False

    def validate(self) -> None:
        super().validate()
        _positive(self, "w_min", "w_max", allow_zero=True)
        _positive(self, "num_ddim_timesteps", "timestep_scaling", "huber_c")
        if self.w_max < self.w_min:
            raise ConfigError("w_max must be >= w_min", where="w_max", expected=f">= {self.w_min}",
                              found=self.w_max)


@dataclasses.dataclass(frozen=True)
class LCMSampleConfig(ComponentConfig):
    every_n_steps: int = 500           # a PNG grid of previews; 0: only at the end
    num_images: int = 8                # the first validation (else training) images' captions
    seeds: tuple[int, ...] = (0,)
    num_inference_steps: int = 4       # LCM steps
    guidance_scale: float = 1.0        # 1: one UNet pass per step (an LCM is sampled without guidance)
    use_ema: bool = True

    def validate(self) -> None:
        _positive(self, "every_n_steps", allow_zero=True)
        _positive(self, "num_images", "num_inference_steps", "guidance_scale")
        if not self.seeds:
            raise ConfigError("sample.seeds needs at least one seed", where="seeds", expected="a list of ints",
                              found=self.seeds)


__all__ = ["LORA_TARGETS", "LoRASection", "LCMModelSection", "LCMTrainSection", "LCMSampleConfig"]
