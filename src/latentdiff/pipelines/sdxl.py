"""Stable Diffusion XL (Podell et al. 2023): the LDM recipe scaled, from the same parts.

    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    image = pipe("a church at dusk", guidance_scale=5.0, original_size=(1024, 1024)).images[0]

encode the prompt with two text encoders (`sdxl_conditioning`: a context, a pooled embedding and the
micro-conditioning numbers) -> prepare latents -> denoise with classifier-free guidance, the UNet given
`added_cond` -> decode once (a float16 VAE whose config says `force_upcast` decodes in float32: SDXL's VAE
overflows in float16). `denoising_end` stops the plan part-way and returns its latents (output_type="latent"):
the "ensemble of expert denoisers" hands them to the refiner (`StableDiffusionXLImg2ImgPipeline`, `sdxl_image`)
with the same `denoising_start`.

The folder is diffusers' SDXL layout (`text_encoder` + `tokenizer`: CLIP ViT-L/14, absent in the refiner's;
`text_encoder_2` + `tokenizer_2`: OpenCLIP ViT-bigG/14 with its projection; `unet`, `vae`, `scheduler`;
`force_zeros_for_empty_prompt` and `requires_aesthetics_score` in model_index.json), read and written both ways.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import hub
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import SamplerProtocol, StepCallback, check_sampler
from ..diffusion.samplers.base import after_step
from ..errors import ConfigError, InputError, UsageError, describe
from ..hub import HubLocation
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet2DConditional
from ..registry import ADAPTERS, PIPELINES
from ..utils.numerics import check_finite_output
from . import first_stage, prompt_encoding
from . import sdxl_conditioning as conditioning
from .adapter_methods import LoraMixin, with_prompt_adapters
from .arguments import check_call, check_prompt
from .call_options import CallbackOnStepEnd, Interrupted, finish, step_callback
from .control_pipeline import CONTROLNET_PART, ControlNetParts, ControlNets, as_controlnet, with_added
from .denoising import FIRST_STAGES, FirstStage, Generator
from .folder import MODEL_INDEX, Entry, FolderPart, write_parts
from .latent_diffusion import UNETS
from .stages import stage
from .text_guided import Prompt, TextGuidedPipeline
from .tiled_sampling import Size as TileSize

TOKENIZERS: dict[Entry, None] = {("transformers", "CLIPTokenizer"): None, ("transformers", "CLIPTokenizerFast"): None}
ABSENT: dict[Entry, None] = {(None, None): None}   # type: ignore[dict-item]  # the refiner's [null, null]
SDXL_PARTS = (
    FolderPart("unet", "unet", UNETS), FolderPart("vae", "vae", FIRST_STAGES),
    FolderPart("text_encoder", "text_encoder", {("transformers", "CLIPTextModel"): TextEncoder, **ABSENT},
               optional=True, load_options=(("tokenizer_subfolder", "tokenizer"),)),
    FolderPart("tokenizer", "text_encoder", {**TOKENIZERS, **ABSENT}, optional=True),
    FolderPart("text_encoder_2", "text_encoder_2", {("transformers", "CLIPTextModelWithProjection"): TextEncoder},
               load_options=(("tokenizer_subfolder", "tokenizer_2"),)),
    FolderPart("tokenizer_2", "text_encoder_2", dict(TOKENIZERS)), CONTROLNET_PART)
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline")
DEFAULT_AESTHETIC, DEFAULT_NEGATIVE_AESTHETIC = 6.0, 2.5   # diffusers' and A1111's refiner defaults


def check_fraction(value: Any, *, name: str) -> float | None:
    """None, or a number strictly inside (0, 1) (the share of the noise schedule a denoising_end/start names)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"{name} must lie strictly between 0 and 1", where=name,
                         expected="0 < value < 1 (the fraction of the noise schedule denoised before the hand-off)",
                         found=repr(value) if isinstance(value, (int, float, str)) else describe(value))
    return float(value)


def cutoff_timestep(noise_scheduler: NoiseScheduler, fraction: float) -> int:
    """The timestep where a fraction of the schedule is denoised: round(T - fraction * T), as diffusers."""
    steps = noise_scheduler.num_train_timesteps
    return int(round(steps - fraction * steps))


def stop_after(callback: StepCallback | None, last: int) -> StepCallback:
    """A step callback that runs `callback`, then ends the loop after step `last` (0-based): the sample of that step
    is what the denoising returns (`denoising_end`)."""
    def on_step(i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
        x = after_step(callback, x, i, t, denoised)
        if i >= last:
            raise Interrupted(x, i)
        return x

    return on_step


@PIPELINES.register("sdxl-text-to-image")
class StableDiffusionXLPipeline(ControlNetParts, LoraMixin, TextGuidedPipeline):
    """SDXL text-to-image: a first stage, a `text_time` UNet, CLIP-L (`text_encoder`, None in the refiner) and bigG
    with its projection (`text_encoder_2`); optionally SDXL ControlNets (`control_pipeline`)."""

    diffusers_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",
                                                        "StableDiffusionXLControlNetPipeline")
    loadable_class_names = SDXL_CLASSES
    component_names = ("vae", "unet", "text_encoder", "text_encoder_2", "noise_scheduler", "sampler", "controlnet")
    controlnet_class_name = "StableDiffusionXLControlNetPipeline"
    option_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
    folder_parts = SDXL_PARTS
    unet: UNet2DConditional
    negative_crop_zero: ClassVar[bool] = False   # the negative crop's default: (0, 0) (diffusers' img2img, inpaint)
    default_guidance: ClassVar[float] = 5.0      # diffusers' SDXL default

    def __init__(self, *, vae: FirstStage, unet: UNet2DConditional, text_encoder: TextEncoder | None = None,
                 text_encoder_2: TextEncoder, noise_scheduler: NoiseScheduler | None = None,
                 sampler: SamplerProtocol | None = None, force_zeros_for_empty_prompt: bool = True,
                 requires_aesthetics_score: bool = False, controlnet: ControlNets = None):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.controlnet = as_controlnet(controlnet)
        for name, value in (("force_zeros_for_empty_prompt", force_zeros_for_empty_prompt),
                            ("requires_aesthetics_score", requires_aesthetics_score)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false", where=name, expected="a bool", found=repr(value))
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        super().__init__(vae=vae, unet=unet, noise_scheduler=noise_scheduler, sampler=sampler)

    def check_parts(self) -> None:
        """The UNet must read the text encoders' concatenated width, and its add embedding the pooled width plus
        6 micro-conditioning numbers (5 with `requires_aesthetics_score`, the refiner)."""
        super().check_parts()
        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ConfigError("an SDXL pipeline needs a UNet with the text_time add embedding",
                              where="unet.config.addition_embed_type", expected="text_time",
                              found=config.addition_embed_type)
        width = sum(e.hidden_size for e in conditioning.encoders(self))
        if config.cross_attention_dim != width:
            raise ConfigError("the UNet's cross-attention width differs from the text encoders' widths together",
                              where="unet.config.cross_attention_dim", expected=width,
                              found=config.cross_attention_dim)
        pooled = getattr(self.text_encoder_2.model.config, "projection_dim", None)
        numbers = 5 if self.requires_aesthetics_score else 6
        per, total = config.addition_time_embed_dim, config.projection_class_embeddings_input_dim
        if isinstance(pooled, int) and per is not None and total is not None and total != pooled + numbers * per:
            other = (total - pooled) / per
            raise ConfigError(f"the UNet's add embedding takes {other:g} micro-conditioning numbers, the pipeline "
                              f"gives {numbers}", where="requires_aesthetics_score",
                              expected=f"{other == 5} (5 numbers: a refiner, with an aesthetic score; 6: a base)",
                              found=self.requires_aesthetics_score)
        self.check_controlnets()

    def networks(self) -> tuple[torch.nn.Module, ...]:
        return tuple(m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, *self.controlnets)
                     if m is not None)

    # ---- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]  # its parts by name, where DenoisingPipeline takes **parts
            cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | str | None = None,
            device: str | torch.device | None = None, variant: str | None = None,
            revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None, local_files_only: bool | None = None,
            vae: FirstStage | None = None, unet: UNet2DConditional | None = None,
            text_encoder: TextEncoder | None = None, text_encoder_2: TextEncoder | None = None,
            noise_scheduler: NoiseScheduler | None = None, sampler: SamplerProtocol | None = None,
            mmap_weights: bool = False, check_finite_weights: bool = False, controlnet: ControlNets = None) -> Any:
        """Load a diffusers SDXL folder or Hub repo (base, refiner, inpainting; fp16 `variant`s); parts passed in
        replace the folder's. mmap_weights, check_finite_weights, controlnet: as LatentDiffusionPipeline's."""
        location = HubLocation(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        given = dict(vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                     noise_scheduler=noise_scheduler, sampler=sampler, controlnet=controlnet)
        return cls.load_pipeline_folder(path_or_id, given=given, variant=variant, torch_dtype=torch_dtype,
                                        device=device, location=location, mmap_weights=mmap_weights,
                                        check_finite_weights=check_finite_weights)

    @classmethod
    def read_options(cls, index: Any, *, source: str) -> dict[str, Any]:
        options = super().read_options(index, source=source)
        for name, value in options.items():
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false", where=f"{source}: {name}", expected="a bool",
                                  found=repr(value))
        return options

    def options(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                "requires_aesthetics_score": self.requires_aesthetics_score}

    def write_files(self, folder: Path, *, variant: str | None = None) -> None:
        for key, encoder in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
            loaded = ADAPTERS.get("loaded_tokens")(encoder) if encoder is not None else None
            if loaded:
                raise UsageError("saving a pipeline with textual-inversion embeddings loaded is not supported yet",
                                 where=key, expected="unload_textual_inversion() first", found=loaded)
        entries = write_parts(folder, {"unet": self.unet, "vae": self.vae}, noise_scheduler=self.noise_scheduler,
                              sampler=self.sampler, variant=variant)
        encoders: dict[str, Any] = {"text_encoder": [None, None], "tokenizer": [None, None]}
        if self.text_encoder is not None:
            self.text_encoder.write_files(folder / "text_encoder", folder / "tokenizer", variant=variant)
            encoders = self.text_encoder.diffusers_entries()
        self.text_encoder_2.write_files(folder / "text_encoder_2", folder / "tokenizer_2", variant=variant)
        second = self.text_encoder_2.diffusers_entries()
        encoders |= {"text_encoder_2": second["text_encoder"], "tokenizer_2": second["tokenizer"]}
        control = self.write_controlnets(folder, variant=variant)
        name = self.controlnet_class_name if control else self.diffusers_class_names[0]
        index = self.model_index() | {"_class_name": name} | entries | encoders | control \
            | {"feature_extractor": [None, None], "image_encoder": [None, None]} | self.options()
        hub.write_json(index, folder / MODEL_INDEX)

    # ---- the conditioning -------------------------------------------------------------------------
    @stage
    def encode_prompt(self, prompt: Prompt | None, prompt_2: Prompt | None = None,
                      negative_prompt: Prompt | None = None, negative_prompt_2: Prompt | None = None, *,
                      num_images_per_prompt: int = 1, guidance: bool = True,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None,
                      negative_pooled_prompt_embeds: torch.Tensor | None = None, clip_skip: int | None = None,
                      prompt_syntax: str = "a1111", grad: bool = False) -> tuple[Any, Any, Any, Any]:
        """-> (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), as
        diffusers' StableDiffusionXLPipeline.encode_prompt: contexts (B * n, L, D1 + D2), pooled (B * n, P); the
        negatives None without guidance. prompt_2 / negative_prompt_2: bigG's text (default: prompt /
        negative_prompt). clip_skip: SDXL's numbering (diffusers'): layers skipped before the penultimate one.
        prompt_syntax: "a1111" or "plain" (see `sdxl_conditioning`); AND, [from:to:when] and [a|b] change per step,
        which one tensor cannot hold: an InputError here (`__call__` runs them)."""
        prompt_encoding.check_prompt_syntax(prompt_syntax)
        encode = conditioning.encode_a1111 if prompt_syntax == "a1111" else conditioning.encode_plain
        if prompt_embeds is None:
            if prompt is None:
                raise InputError("a prompt is required", where="prompt", expected="str or list of str", found=None)
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts_2 = prompts if prompt_2 is None else [prompt_2] * len(prompts) if isinstance(prompt_2, str) \
                else list(prompt_2)
            prompt_embeds, pooled_prompt_embeds = encode(self, prompts, prompts_2, clip_skip=clip_skip)
        elif pooled_prompt_embeds is None:
            raise InputError("prompt_embeds need their pooled_prompt_embeds (SDXL conditions on both)",
                             where="pooled_prompt_embeds", expected="a (B, P) tensor", found=None)
        uncond = pooled_uncond = None
        if guidance:
            n = prompt_embeds.shape[0]
            negatives = None if negative_prompt is None else [negative_prompt] * n \
                if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives_2 = negatives if negative_prompt_2 is None else [negative_prompt_2] * n \
                if isinstance(negative_prompt_2, str) else list(negative_prompt_2)
            zeros = self.force_zeros_for_empty_prompt and negative_prompt_embeds is None and (
                negative_prompt is None if prompt_syntax == "plain" else
                conditioning.is_empty(negatives) and conditioning.is_empty(negatives_2))
            if zeros:
                uncond, pooled_uncond = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled_prompt_embeds)
            elif negative_prompt_embeds is not None:
                if negative_pooled_prompt_embeds is None:
                    raise InputError("negative_prompt_embeds need their negative_pooled_prompt_embeds",
                                     where="negative_pooled_prompt_embeds", expected="a (B, P) tensor", found=None)
                uncond, pooled_uncond = negative_prompt_embeds, negative_pooled_prompt_embeds
            else:
                uncond, pooled_uncond = encode(self, negatives or [""] * n, negatives_2 or [""] * n,
                                               clip_skip=clip_skip)
            if prompt_syntax == "a1111":
                prompt_embeds, uncond = conditioning.same_chunks(self, prompt_embeds, uncond, clip_skip=clip_skip)
        dtype = self.unet.dtype

        def ready(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)

        out = [ready(t) for t in (prompt_embeds, uncond, pooled_prompt_embeds, pooled_uncond)]
        # the text encoders' mapped weights go back once encoded (release_weights), as LatentDiffusionPipeline's
        self.release(*(e for e in (self.text_encoder, self.text_encoder_2) if e is not None))
        for embeddings in out:
            if embeddings is not None:
                check_finite_output(embeddings, stage="text encoding", where="text_encoder_2", dtype=dtype)
        return out[0], out[1], out[2], out[3]

    def micro_conditioning(self, height: int, width: int, *, original_size: Any, crops_coords_top_left: Any,
                           target_size: Any, negative_original_size: Any = None,
                           negative_crops_coords_top_left: Any = None, negative_target_size: Any = None,
                           aesthetic_score: Any = DEFAULT_AESTHETIC,
                           negative_aesthetic_score: Any = DEFAULT_NEGATIVE_AESTHETIC) -> tuple[list[float],
                                                                                               list[float]]:
        """(time ids, negative time ids), each argument checked (an InputError naming it). Sizes default to the
        image's (height, width), the crop to (0, 0), the negative sizes to the positive ones. The negative crop
        defaults as in diffusers: to the positive crop while no negative micro-conditioning is given (diffusers'
        text-to-image then reuses the positive time ids), else to (0, 0) (diffusers' image-to-image and inpainting
        always: `negative_crop_zero`). Where diffusers' text-to-image ignores one negative size given alone, it
        counts here. The refiner (requires_aesthetics_score) conditions on an aesthetic score in place of the
        target size."""
        size = (height, width)
        original = conditioning.check_pair(size if original_size is None else original_size, name="original_size")
        crop = conditioning.check_pair((0, 0) if crops_coords_top_left is None else crops_coords_top_left,
                                       name="crops_coords_top_left")
        target = conditioning.check_pair(size if target_size is None else target_size, name="target_size")
        n_original = original if negative_original_size is None else conditioning.check_pair(
            negative_original_size, name="negative_original_size")
        zero = self.negative_crop_zero or negative_original_size is not None or negative_target_size is not None
        n_crop = ((0, 0) if zero else crop) if negative_crops_coords_top_left is None else conditioning.check_pair(
            negative_crops_coords_top_left, name="negative_crops_coords_top_left")
        n_target = target if negative_target_size is None else conditioning.check_pair(
            negative_target_size, name="negative_target_size")
        score = conditioning.check_score(aesthetic_score, name="aesthetic_score")
        n_score = conditioning.check_score(negative_aesthetic_score, name="negative_aesthetic_score")
        if not self.requires_aesthetics_score:
            return (conditioning.time_ids(original, crop, target),
                    conditioning.time_ids(n_original, n_crop, n_target))
        return (conditioning.time_ids(original, crop, target, aesthetic_score=score),
                conditioning.time_ids(n_original, n_crop, n_target, aesthetic_score=n_score))

    def conditioning_for_call(self, prompt: Prompt | None, prompt_2: Prompt | None, negative_prompt: Prompt | None,
                              negative_prompt_2: Prompt | None, *, steps: int, guidance_scale: float,
                              num_images_per_prompt: int, ids: list[float], negative_ids: list[float],
                              prompt_syntax: str, clip_skip: int | None,
                              embeds: dict[str, Any]) -> dict[str, Any]:
        """A call's conditioning: {"cond", "uncond", "pooled", "model" (the UNet call for `denoise`), "schedule"}.
        Prompts with A1111's per-step syntax (AND, [from:to:when], [a|b]) get a PromptSchedule
        (`sdxl_conditioning.build_schedule`), others `encode_prompt` once."""
        guided = guidance_scale > 1.0
        prompts = None if prompt is None or embeds.get("prompt_embeds") is not None else \
            [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None or prompts is None else \
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if prompt_syntax == "a1111" and prompts is not None and conditioning.needs_schedule(
                prompts, negatives, steps=steps, guidance=guided):
            extra = [name for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2),
                                              ("negative_prompt_embeds", embeds.get("negative_prompt_embeds")))
                     if value is not None]
            if extra:
                raise InputError("AND, [from:to:when] and [a|b] read one prompt for both text encoders",
                                 where=extra[0], expected=f"{extra[0]}=None with per-step prompt syntax",
                                 found="given")
            schedule = conditioning.build_schedule(self, prompts, negatives, steps=steps,
                                                   num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                                                   guidance=guided, ids=ids, negative_ids=negative_ids)
            cond, uncond = schedule.first()
            assert schedule.added_conds is not None
            return dict(cond=cond, uncond=uncond, pooled=schedule.added_conds[0][0]["text_embeds"],
                        model=self.unet, schedule=schedule)
        cond, uncond, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt=num_images_per_prompt,
            guidance=guided, clip_skip=clip_skip, prompt_syntax=prompt_syntax, **embeds)
        added = self.added_conds(pooled, negative_pooled, ids, negative_ids)
        return dict(cond=cond, uncond=uncond, pooled=pooled, schedule=None, added=added,
                    model=conditioning.with_added_cond(self.unet, *added))

    def added_conds(self, pooled: torch.Tensor, negative_pooled: torch.Tensor | None, ids: list[float],
                    negative_ids: list[float]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """SDXL's added_cond of the conditional and the unconditional rows (None without guidance)."""
        dtype = pooled.dtype
        cond = conditioning.added_cond(pooled, ids, dtype=dtype)
        uncond = None if negative_pooled is None else conditioning.added_cond(negative_pooled, negative_ids,
                                                                              dtype=dtype)
        return cond, uncond

    def conditioned_unet(self, pooled: torch.Tensor, negative_pooled: torch.Tensor | None, ids: list[float],
                         negative_ids: list[float]) -> Any:
        """The UNet with SDXL's added_cond bound (`sdxl_conditioning.with_added_cond`)."""
        return conditioning.with_added_cond(self.unet, *self.added_conds(pooled, negative_pooled, ids, negative_ids))

    def check_sdxl_call(self, arguments: Mapping[str, Any]) -> None:
        """A call's arguments (`locals()` with the defaults resolved) checked before any work: what `check_call`
        checks of every pipeline (clip_skip aside: SDXL numbers it from the penultimate layer), then SDXL's own."""
        check_call(self, {k: v for k, v in arguments.items() if k != "clip_skip"})
        for name in ("prompt_2", "negative_prompt_2"):
            if arguments.get(name) is not None:
                check_prompt(arguments[name], argument=name)
        for encoder in conditioning.encoders(self):
            encoder._check_clip_skip(arguments.get("clip_skip"), encoder._skip_layers("penultimate", False))
        for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = arguments.get(name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.ndim != 2):
                raise InputError(f"{name} must be (batch, width)", where=name, expected="a 2-d tensor (B, P)",
                                 found=describe(value))

    def conditioning_of(self, arguments: Mapping[str, Any], *, ids: list[float],
                        negative_ids: list[float]) -> dict[str, Any]:
        """`conditioning_for_call` on a call's arguments (its prompts, embeddings and options by their names)."""
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return self.conditioning_for_call(
            arguments["prompt"], arguments["prompt_2"], arguments["negative_prompt"], arguments["negative_prompt_2"],
            steps=arguments["num_inference_steps"], guidance_scale=arguments["guidance_scale"],
            num_images_per_prompt=arguments["num_images_per_prompt"], ids=ids, negative_ids=negative_ids,
            prompt_syntax=arguments["prompt_syntax"], clip_skip=arguments["clip_skip"],
            embeds={name: arguments[name] for name in names})

    def steps_to_run(self, sampler: SamplerProtocol, num_inference_steps: int, denoising_end: float | None) -> int:
        """How many steps of the N-step plan run before `denoising_end` (all N without one): those whose timestep
        is at or above the cut-off, as diffusers counts them."""
        if denoising_end is None:
            return num_inference_steps
        check_sampler(sampler)
        timesteps = sampler.plan(self.noise_scheduler, num_inference_steps).timesteps
        cutoff = cutoff_timestep(self.noise_scheduler, denoising_end)
        kept = int((torch.as_tensor(timesteps) >= cutoff).sum())
        if kept < 1:
            raise InputError(f"denoising_end {denoising_end} with {num_inference_steps} steps runs no step",
                             where="denoising_end", expected="a larger denoising_end, or more steps",
                             found=denoising_end)
        return kept

    def decode_first_stage(self, latents: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """As every pipeline's, a float16 VAE with `force_upcast` (SDXL's) decoding in float32 from the start."""
        upcast = bool(getattr(getattr(self.vae, "config", None), "force_upcast", False))
        return first_stage.decode(self.vae, latents, scaled=scaled, fallback_tiling=self.fallback_tiling,
                                  stacklevel=3, upcast=upcast)

    # ---- the algorithm ---------------------------------------------------------------------------
    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(self, prompt: Prompt | None = None, prompt_2: Prompt | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 denoising_end: float | None = None, guidance_scale: float | None = None,
                 negative_prompt: Prompt | None = None, negative_prompt_2: Prompt | None = None,
                 num_images_per_prompt: int = 1, eta: float | None = None, generator: Generator = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, guidance_rescale: float = 0.0, cfg_truncation: float | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] | None = None,
                 negative_target_size: tuple[int, int] | None = None, clip_skip: int | None = None,
                 callback_on_step_end: CallbackOnStepEnd | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 callback: StepCallback | None = None, progress: bool = True, tile_size: TileSize | None = None,
                 tile_overlap: TileSize | None = None, max_pixels: int | None = None, prompt_syntax: str = "a1111",
                 lora_dirs: Sequence[str | os.PathLike] | None = None, control_image: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 control_resize_mode: int | None = 0) -> Any:
        """Generate images for `prompt`, diffusers' StableDiffusionXLPipeline arguments and meanings (returns
        PipelineOutput(images=...), or the tuple (images,) with return_dict=False). num_inference_steps and
        guidance_scale default to the model's (`default_call`: 50 and 5.0; a distilled Turbo-style model, whose
        scheduler has trailing timesteps and an ancestral Euler sampler, 1 and 0.0). denoising_end in (0, 1): stop
        when that fraction of the schedule is denoised (output_type="latent" hands the latents to the refiner's
        `denoising_start`). original_size, crops_coords_top_left, target_size and their negative_* twins: the
        micro-conditioning (defaults: the image size, (0, 0)). tile_size, tile_overlap, max_pixels, callback,
        progress, prompt_syntax, lora_dirs, control_image ... control_resize_mode: as LatentDiffusionPipeline's
        (diffusers' StableDiffusionXLControlNetPipeline; the ControlNets get the added_cond too)."""
        steps, scale = self.default_call(num_inference_steps, guidance_scale)
        arguments = dict(locals(), num_inference_steps=steps, guidance_scale=scale)
        self.check_sdxl_call(arguments)
        if self.requires_aesthetics_score:
            raise UsageError("this is a refiner: it denoises an image (it conditions on an aesthetic score, not a "
                             "target size)", where="image", expected="StableDiffusionXLImg2ImgPipeline with image= "
                             "(e.g. the base's latents and denoising_start)", found="text-to-image without an image")
        height, width = self.check_inputs(prompt, negative_prompt, height=height, width=width,
                                          num_inference_steps=steps, guidance_scale=scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        end = check_fraction(denoising_end, name="denoising_end")
        control = self.control_for_call(arguments, height=height, width=width)
        ids, negative_ids = self.micro_conditioning(
            height, width, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size)
        sampler = self.sampler_for(eta)
        tiling = self.tiling(tile_size, tile_overlap)
        kept = self.steps_to_run(sampler, steps, end)
        c = self.conditioning_of(arguments, ids=ids, negative_ids=negative_ids)
        x_T = self.prepare_latents(c["cond"].shape[0], height, width, generator=generator, latents=latents)
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": c["cond"], "negative_prompt_embeds": c["uncond"],
                                            "add_text_embeds": c["pooled"]})
        if kept < steps:
            on_step = stop_after(on_step, kept - 1)
        z0 = self.denoise(x_T, c["cond"], c["uncond"], guidance_scale=scale, num_inference_steps=steps,
                          sampler=sampler, generator=generator, callback=on_step, progress=progress, tiling=tiling,
                          guidance_rescale=guidance_rescale,
                          cfg_truncation=cfg_truncation, model=c["model"], schedule=c["schedule"],
                          control=with_added(control, c.get("added")))
        return finish(self.output(z0, output_type), return_dict)
