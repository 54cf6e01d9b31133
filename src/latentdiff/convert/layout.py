"""How a whole original checkpoint is laid out: which prefix holds which network, and what belongs to none.

A CompVis / Stability AI checkpoint is one flat state dict of a `LatentDiffusion` module:

    model.diffusion_model.*   the denoising UNet                  -> part "unet"
    first_stage_model.*       the autoencoder (KL or VQ)          -> part "vae" / "vqvae"
    cond_stage_model.*        the conditioning stage              -> part "text_encoder" / "class_embedder"
    conditioner.embedders.N.* SDXL's text encoders (generative-models) -> "text_encoder" (CLIP-L), "text_encoder_2"
                              (bigG); the base has both (0, 1), the refiner bigG alone (0)
    model_ema.*               LitEma's copy of the UNet           -> replaces the UNet's weights (use_ema)
    betas, alphas_cumprod ... the DDPM schedule buffers, logvar   -> kept aside ("extras"), verbatim

A stand-alone first-stage file (e.g. CompVis' `kl-f8/model.ckpt`, SD's `vae-ft-mse-*.ckpt`) has the
autoencoder's keys without a prefix. `FileLayout.keymap()` is the one table for the whole file; its
output keys are `<part>/<diffusers key>`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .keymap import Drop, Nest
from .text_ldm import PROJECTION_ARCHITECTURES, TextArch
from .unet_ldm import EMA_BOOKKEEPING, UNET_PREFIX, UNetArch
from .vae_ldm import VAEArch

FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
CONDITIONER_PREFIX = "conditioner.embedders."  # SDXL (Stability's generative-models DiffusionEngine)
SEPARATOR = "/"  # between a part name and its keys in the whole-file table

# Top-level tensors of LatentDiffusion that are no network's weights: the diffusion schedule
# (recomputable from the scheduler config, but kept verbatim so a file round-trips bit for bit),
# the learned log-variance, the latent scale (scale_by_std), EMA bookkeeping, and the noise
# schedule of the x4 upscaler's low-resolution augmentation.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")
NON_NETWORK = (
    *(Drop(name) for name in SCHEDULE_BUFFERS),
    Drop("logvar"), Drop("scale_factor"),
    *(Drop(name) for name in EMA_BOOKKEEPING),
    Drop("low_scale_model.{rest*}"),
    Drop("denoiser.sigmas"),  # generative-models' DiscreteDenoiser buffer (the schedule's sigmas)
    Drop("v_pred"), Drop("ztsnr"),  # empty markers of v-prediction (zero-terminal-SNR) SDXL fine-tunes (ComfyUI's)
)

SDXL_FAMILIES = ("sdxl", "sdxl-refiner", "sdxl-inpaint")
FAMILIES = ("sd1", "sd2", "sd-inpaint", "sd-upscale", "ldm", "vae", "vqvae", *SDXL_FAMILIES)
# SDXL's conditioner: embedder index -> part, by family (the refiner has bigG alone, at 0)
SDXL_EMBEDDERS = {"base": {"text_encoder": 0, "text_encoder_2": 1}, "refiner": {"text_encoder_2": 0}}
SDXL_TEXT_KINDS = {"text_encoder": "clip", "text_encoder_2": "openclip-projection"}  # their original layouts


@dataclasses.dataclass(frozen=True)
class Embedder:
    """One text encoder of an SDXL file: `conditioner.embedders.{index}.*` is part `part`."""

    index: int
    part: str
    arch: TextArch


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """The parts of one original checkpoint, each described well enough to build its key table."""

    family: str
    unet: UNetArch | None = None
    first_stage: VAEArch | None = None
    cond_stage: TextArch | None = None
    scheduler: dict[str, Any] | None = None
    standalone_first_stage: bool = False  # the autoencoder's keys carry no `first_stage_model.` prefix
    embedders: tuple[Embedder, ...] = ()  # SDXL's text encoders (conditioner.embedders.N), instead of cond_stage

    def parts(self) -> dict[str, Any]:
        """part name -> its description (UNetArch / VAEArch / TextArch)."""
        out: dict[str, Any] = {}
        if self.unet is not None:
            out["unet"] = self.unet
        if self.first_stage is not None:
            out[self.first_stage.part] = self.first_stage
        if self.cond_stage is not None:
            out[self.cond_stage.part] = self.cond_stage
        out.update({e.part: e.arch for e in self.embedders})
        return out

    def prefix(self, part: str) -> str:
        """Where part `part`'s tensors are in the file."""
        if part in ("vae", "vqvae"):
            return "" if self.standalone_first_stage else FIRST_STAGE_PREFIX
        for embedder in self.embedders:
            if embedder.part == part:
                return f"{CONDITIONER_PREFIX}{embedder.index}."
        return UNET_PREFIX if part == "unet" else COND_STAGE_PREFIX

    def keymap(self) -> tuple:
        """Whole original file -> `<part>/<our key>`; `invert()` it to write an original file."""
        rules: list = []
        for part, arch in self.parts().items():
            rules.append(Nest(self.prefix(part), part + SEPARATOR, arch.keymap()))
        return tuple(sorted(rules, key=lambda r: r.src == "")) + NON_NETWORK  # a bare prefix goes last

    def configs(self, *, saved: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """part -> diffusers-format config dict (transformers' for text encoders), plus the scheduler's.

        `saved`: part configs to take verbatim instead (a latentdiff export's metadata: the layout keeps only
        what shapes tensors, so it could not rebuild, say, GroupNorm(8))."""
        saved = saved or {}
        out = {}
        for part, arch in self.parts().items():
            out[part] = dict(saved[part]) if part in saved else \
                arch.to_config() if isinstance(arch, TextArch) else arch.to_diffusers_config()
        if self.scheduler is not None:
            out["scheduler"] = dict(saved.get("scheduler", self.scheduler))
        return out

    @classmethod
    def from_configs(cls, configs: dict[str, dict[str, Any]], *, family: str | None = None,
                     standalone_first_stage: bool | None = None) -> FileLayout:
        """The inverse of `configs()`: from diffusers-format config dicts keyed by part name."""
        unet = UNetArch.from_diffusers_config(configs["unet"]) if "unet" in configs else None
        first = next((VAEArch.from_diffusers_config(configs[p], source=p) for p in ("vae", "vqvae") if p in configs),
                     None)
        cond = next((TextArch.from_config(configs[p], source=p) for p in ("text_encoder", "class_embedder")
                     if p in configs), None)
        embedders: tuple[Embedder, ...] = ()
        sdxl = family in SDXL_FAMILIES or "text_encoder_2" in configs or (family is None and unet is not None
                                                                            and unet.text_time)
        if sdxl:
            if family not in SDXL_FAMILIES:  # a base model has CLIP-L; bigG alone is the refiner
                refiner = cond is None and "text_encoder_2" in configs
                family = "sdxl-refiner" if refiner else "sdxl-inpaint" if unet is not None and \
                    unet.in_channels == 9 else "sdxl"
            index = SDXL_EMBEDDERS["refiner" if family == "sdxl-refiner" else "base"]
            # text_encoder_2 is the projection model by its name (a config built in memory may not say so)
            named = {"text_encoder": configs.get("text_encoder"), "text_encoder_2": configs.get("text_encoder_2") and
                     {**configs["text_encoder_2"], "architectures": list(PROJECTION_ARCHITECTURES)}}
            archs = {p: TextArch.from_config(c, source=p) for p, c in named.items() if c is not None}
            if any(p not in index or arch.kind != SDXL_TEXT_KINDS[p] for p, arch in archs.items()):
                raise CheckpointError("an SDXL file's text encoders are CLIP-L (text_encoder, not in the refiner) and "
                                      "OpenCLIP with its projection (text_encoder_2)", where="configs",
                                      expected={p: SDXL_TEXT_KINDS[p] for p in index},
                                      found={p: arch.kind for p, arch in archs.items()})
            embedders = tuple(Embedder(index[p], p, arch) for p, arch in archs.items())
            cond = None
        elif family is None:
            family = _family(unet, first, cond)
        if standalone_first_stage is None:
            standalone_first_stage = unet is None and cond is None and not embedders
        return cls(family=family, unet=unet, first_stage=first, cond_stage=cond, scheduler=configs.get("scheduler"),
                   standalone_first_stage=standalone_first_stage, embedders=embedders)


def _family(unet: UNetArch | None, first: VAEArch | None, cond: TextArch | None, *,
            conditioning: str | None = None) -> str:
    """The family name of a set of parts (see FAMILIES); `conditioning`: the kind of a conditioning stage left
    out of `cond` (a part not read)."""
    if unet is None:
        return first.part if first is not None else "ldm"
    if unet.text_time:  # SDXL: `conditioning` "sdxl-refiner" for the refiner's bigG-only conditioner
        return "sdxl-inpaint" if unet.in_channels == 9 else "sdxl-refiner" if conditioning == "sdxl-refiner" \
            else "sdxl"
    if unet.in_channels == 9 and unet.conditional:
        return "sd-inpaint"
    if unet.in_channels == 7 and unet.num_class_embeds:
        return "sd-upscale"
    kind = cond.kind if cond is not None else conditioning
    if kind == "openclip" or (kind is None and unet.cross_attention_dim == 1024):
        return "sd2"
    if kind == "clip" or (kind is None and unet.cross_attention_dim == 768):
        return "sd1"
    return "ldm"


def with_conventions(unet: UNetArch, text: TextArch | None, *, conditioning: str | None = None) -> UNetArch:
    """What the original code does but no weight records: Stability AI's SD 2.x code (OpenCLIP models)
    computes attention in float32 (ATTN_PRECISION="fp32"), diffusers' `upcast_attention`."""
    kind = text.kind if text is not None else conditioning
    return dataclasses.replace(unet, upcast_attention=kind == "openclip")
