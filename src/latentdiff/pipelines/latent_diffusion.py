"""Text-to-image latent diffusion (Rombach et al. 2022, sec. 3.3): Stable Diffusion and LDM's own text-to-image model.

encode prompt -> prepare latents -> denoise with classifier-free guidance -> decode once.
Each stage is a public method, so a custom pipeline is a few lines of plain Python.

One class serves both diffusers folder layouts (`FolderLayout`): Stable Diffusion's (`vae/`,
`text_encoder/` = CLIP) and LDM's `LDMTextToImagePipeline` (CompVis/ldm-text2im-large-256: `vqvae/`,
`bert/` = LDMBert). The text encoder decides which layout a pipeline saves. An LDM-layout folder claims
diffusers' class only where diffusers can run it (`LDMBertTextEncoder.runs_in_diffusers`: 77 text positions);
else latentdiff's own `_class_name`, "LatentDiffusionPipeline", whose layout is read from its parts
(`bert` / `vqvae`: LDM's), as the built-in model's folder does.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import hub
from ..diffusion.noise import randn
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import SamplerProtocol, StepCallback, check_sampler
from ..errors import ConfigError, InputError, UsageError
from ..hub import HubLocation
from ..models.ldm_bert import LDMBertTextEncoder
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet2DConditional
from ..registry import ADAPTERS, PIPELINES
from ..utils.numerics import check_finite_output
from . import prompt_encoding
from .adapter_methods import LoraMixin, with_prompt_adapters
from .arguments import check_call, check_clip_skip
from .base import PipelineOutput
from .call_options import CallbackOnStepEnd, finish, step_callback
from .control_pipeline import CONTROLNET_PART, ControlNetParts, ControlNets, as_controlnet
from .denoising import FIRST_STAGES, FirstStage, Generator
from .folder import MODEL_INDEX, Entry, FolderPart, write_parts
from .ip_adapter import IPAdapterMixin
from .sdedit import start_step
from .stages import stage
from .t2i_adapters import ADAPTER_PART, AdapterParts, Adapters, as_adapter
from .text_guided import Prompt, TextGuidedPipeline, no_prompt
from .tiled_sampling import Size as TileSize
from .tiled_sampling import check_upscale, upscale_latents

# model_index.json (library, class) -> the latentdiff class that loads that part (FIRST_STAGES: KL, VQ, identity).
UNETS: dict[Entry, type] = {("diffusers", "UNet2DConditionModel"): UNet2DConditional}
TEXT_ENCODERS: dict[Entry, type[TextEncoder]] = {("transformers", "CLIPTextModel"): TextEncoder,
                                                 ("latent_diffusion", "LDMBertModel"): LDMBertTextEncoder}


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """Where a diffusers pipeline class keeps its parts, and what else its model_index.json holds."""

    vae: str                                # subfolder of the first stage
    text_encoder: str                       # subfolder of the text model
    text_encoders: tuple[Entry, ...]        # its (library, class) entries latentdiff loads
    tokenizers: tuple[Entry, ...]
    extra_entries: tuple[tuple[str, Any], ...] = ()   # written as they are (SD's absent safety checker ...)

    def parts(self) -> tuple[FolderPart, ...]:
        """The folder's parts, for the loading engine (pipelines/folder.py); the text encoder reads the tokenizer."""
        return (FolderPart("unet", "unet", UNETS), FolderPart(self.vae, "vae", FIRST_STAGES),
                FolderPart(self.text_encoder, "text_encoder", {e: TEXT_ENCODERS[e] for e in self.text_encoders},
                           load_options=(("tokenizer_subfolder", "tokenizer"),)),
                FolderPart("tokenizer", "text_encoder", dict.fromkeys(self.tokenizers)), CONTROLNET_PART,
                ADAPTER_PART)


SD_LAYOUT = FolderLayout(
    vae="vae", text_encoder="text_encoder", text_encoders=(("transformers", "CLIPTextModel"),),
    tokenizers=(("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")),
    extra_entries=(("safety_checker", [None, None]), ("feature_extractor", [None, None]),
                   ("image_encoder", [None, None]), ("requires_safety_checker", False)))
LDM_LAYOUT = FolderLayout(
    vae="vqvae", text_encoder="bert", text_encoders=(("latent_diffusion", "LDMBertModel"),),
    tokenizers=(("transformers", "BertTokenizer"), ("transformers", "BertTokenizerFast"),
                ("transformers", "PreTrainedTokenizerFast")))   # any `tokenizers` pipeline (built-in models)
LDM_TEXT_TO_IMAGE = "LDMTextToImagePipeline"
OWN_CLASS = "LatentDiffusionPipeline"   # latentdiff's own `_class_name`: diffusers has no class of that name
# Every diffusers class whose folders hold these parts; each of the text-conditioned pipelines loads any of
# them (diffusers does the same: StableDiffusionImg2ImgPipeline.from_pretrained on an SD folder).
LAYOUTS: dict[str, FolderLayout] = {
    "StableDiffusionPipeline": SD_LAYOUT, "StableDiffusionImg2ImgPipeline": SD_LAYOUT,
    "StableDiffusionInpaintPipeline": SD_LAYOUT, OWN_CLASS: SD_LAYOUT,   # OWN_CLASS: LDM's with `bert`/`vqvae`
    "StableDiffusionControlNetPipeline": SD_LAYOUT, "StableDiffusionControlNetImg2ImgPipeline": SD_LAYOUT,
    "StableDiffusionControlNetInpaintPipeline": SD_LAYOUT, "StableDiffusionAdapterPipeline": SD_LAYOUT,
    LDM_TEXT_TO_IMAGE: LDM_LAYOUT,
}


@PIPELINES.register("text-to-image")
class LatentDiffusionPipeline(AdapterParts, IPAdapterMixin, ControlNetParts, LoraMixin, TextGuidedPipeline):
    """Text-conditioned latent diffusion: a first stage (KL, VQ or identity), a cross-attention UNet and a text
    encoder (CLIP, as Stable Diffusion, or LDMBert, as LDM's text-to-image model); optionally ControlNets
    (`control_pipeline`) and T2I-Adapters (`t2i_adapters`)."""

    diffusers_class_names: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline", LDM_TEXT_TO_IMAGE, OWN_CLASS, "StableDiffusionControlNetPipeline",
        "StableDiffusionAdapterPipeline")
    loadable_class_names = tuple(LAYOUTS)
    component_names = ("vae", "unet", "text_encoder", "noise_scheduler", "sampler", "controlnet", "adapter")
    unet: UNet2DConditional   # cross-attends to the text
    folder_parts = SD_LAYOUT.parts()   # the layout saved with a CLIP text encoder; `folder_layout` reads either

    def __init__(self, *, vae: FirstStage, unet: UNet2DConditional, text_encoder: TextEncoder,
                 noise_scheduler: NoiseScheduler | None = None, sampler: SamplerProtocol | None = None,
                 controlnet: ControlNets = None, adapter: Adapters = None):
        self.text_encoder = text_encoder
        self.controlnet = as_controlnet(controlnet)
        self.adapter = as_adapter(adapter)
        super().__init__(vae=vae, unet=unet, noise_scheduler=noise_scheduler, sampler=sampler)

    def check_parts(self) -> None:
        """The UNet must take the first stage's latents (plus any concatenated inputs) and the text width."""
        super().check_parts()
        width = self.unet.config.cross_attention_dim
        if width is not None and width != self.text_encoder.hidden_size:
            raise ConfigError("the UNet's cross-attention width differs from the text encoder's hidden size",
                              where="unet.config.cross_attention_dim", expected=self.text_encoder.hidden_size,
                              found=width)
        self.check_controlnets()
        self.check_adapters()

    def networks(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet, self.vae, self.text_encoder, *self.controlnets, *self.adapters, *self.ip_adapter_networks())

    # ---- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]  # its parts by name, where DenoisingPipeline takes **parts
            cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | str | None = None,
            device: str | torch.device | None = None, variant: str | None = None,
            revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None, local_files_only: bool | None = None,
            vae: FirstStage | None = None, unet: UNet2DConditional | None = None,
            text_encoder: TextEncoder | None = None, noise_scheduler: NoiseScheduler | None = None,
            sampler: SamplerProtocol | None = None, mmap_weights: bool = False,
            check_finite_weights: bool = False, controlnet: ControlNets = None,
            adapter: Adapters = None) -> LatentDiffusionPipeline:
        """Load a diffusers-format folder or Hub repo (Stable Diffusion v1/v2, LDM text-to-image, and their
        image-to-image / inpainting folders); parts passed in replace the folder's. `mmap_weights`: weights
        memory-mapped and released between stages instead of copied (`load_pipeline_folder`, docs/memory.md).
        check_finite_weights: scan every part's weights once (`check_weights`), a NumericalError naming the part
        and the first bad tensor. controlnet: a ControlNet or a list (multi-ControlNet) in place of the folder's
        (`controlnet/`, absent in plain folders); adapter: a T2IAdapter or a list, likewise (`adapter/`)."""
        location = HubLocation(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        given = dict(vae=vae, unet=unet, text_encoder=text_encoder, noise_scheduler=noise_scheduler, sampler=sampler,
                     controlnet=controlnet, adapter=adapter)
        return cls.load_pipeline_folder(path_or_id, given=given, variant=variant, torch_dtype=torch_dtype,
                                        device=device, location=location, mmap_weights=mmap_weights,
                                        check_finite_weights=check_finite_weights)

    @classmethod
    def folder_layout(cls, index: Mapping[str, Any]) -> Sequence[FolderPart]:
        """The parts of the index's layout: LDM's for LDMTextToImagePipeline, and for latentdiff's own class
        name when the index has LDM's parts (`bert` or `vqvae`); else Stable Diffusion's."""
        name = str(index.get("_class_name"))
        if name == OWN_CLASS and (LDM_LAYOUT.text_encoder in index or LDM_LAYOUT.vae in index):
            return LDM_LAYOUT.parts()
        return LAYOUTS.get(name, SD_LAYOUT).parts()

    def layout(self) -> tuple[str, FolderLayout]:
        """(model_index `_class_name`, layout) this pipeline saves as: LDM's with LDMBert (diffusers' class name
        only where diffusers runs the text encoder as latentdiff does, else latentdiff's), else Stable Diffusion's."""
        if isinstance(self.text_encoder, LDMBertTextEncoder):
            return (LDM_TEXT_TO_IMAGE if self.text_encoder.runs_in_diffusers() else OWN_CLASS), LDM_LAYOUT
        return self.diffusers_class_names[0], SD_LAYOUT

    def write_files(self, folder: Path, *, variant: str | None = None) -> None:
        loaded = ADAPTERS.get("loaded_tokens")(self.text_encoder)
        if loaded:   # the tokenizer's files would not hold the added tokens: refused before anything is written
            raise UsageError("saving a pipeline with textual-inversion embeddings loaded is not supported yet",
                             where="text_encoder", expected="unload_textual_inversion() first", found=loaded)
        class_name, layout = self.layout()
        entries = write_parts(folder, {"unet": self.unet, layout.vae: self.vae}, noise_scheduler=self.noise_scheduler,
                              sampler=self.sampler, variant=variant)
        self.text_encoder.write_files(folder / layout.text_encoder, folder / "tokenizer", variant=variant)
        control = self.write_controlnets(folder, variant=variant)
        if control:   # diffusers' ControlNet pipeline of the task; LDM's layout has none: latentdiff's own name
            class_name = self.controlnet_class_name if layout is SD_LAYOUT else OWN_CLASS
        adapters = self.write_adapters(folder, variant=variant)
        if adapters:   # diffusers' adapter pipeline (text-to-image only); with ControlNets too: latentdiff's name
            class_name = self.adapter_class_name if layout is SD_LAYOUT and not control and \
                type(self) is LatentDiffusionPipeline else OWN_CLASS
        index = self.model_index() | {"_class_name": class_name} | entries | control | adapters \
            | dict(layout.extra_entries) | self.text_encoder.diffusers_entries()
        hub.write_json(index, folder / MODEL_INDEX)

    # ---- the algorithm ---------------------------------------------------------------------------
    @with_prompt_adapters
    @torch.inference_mode()
    def __call__(self, prompt: Prompt | None = None, negative_prompt: Prompt | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, eta: float | None = None, num_images_per_prompt: int = 1,
                 generator: Generator = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None,
                 progress: bool = True, tile_size: TileSize | None = None,
                 tile_overlap: TileSize | None = None, max_pixels: int | None = None, guidance_rescale: float = 0.0,
                 cfg_truncation: float | None = None,
                 callback_on_step_end: CallbackOnStepEnd | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 return_dict: bool = True, clip_skip: int | None = None,
                 prompt_syntax: str = "a1111", lora_dirs: Sequence[str | os.PathLike] | None = None,
                 control_image: Any = None, controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 control_resize_mode: int | None = 0, ip_adapter_image: Any = None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None,
                 adapter_conditioning_scale: float | Sequence[float] = 1.0) -> Any:
        """Generate images for `prompt` (a string or a list). Returns PipelineOutput(images=...), or with
        return_dict=False diffusers' tuple (images, None) (no safety checker: nothing flagged).

        tile_size: sample in overlapping windows of tile_size image pixels (an int or (h, w), multiples of the
        autoencoder factor), blended at every step (MultiDiffusion, see `tiled_sampling`): images larger than
        the training size, the UNet seeing windows of its own size. tile_overlap: pixels neighbouring windows
        share (default half the tile). max_pixels: the largest height x width x images a call may generate
        (default limits.DEFAULT_MAX_PIXELS, see docs/limits.md); a larger request is refused before any work.
        guidance_rescale, callback_on_step_end(pipe, i, t, callback_kwargs) -> dict with
        callback_on_step_end_tensor_inputs, return_dict, `pipe._interrupt`: as diffusers' (`call_options`).
        cfg_truncation: guidance for that fraction of the steps only, then one conditional UNet pass per step
        (`cfg_truncation`; None: every step guided).
        clip_skip: CLIP layers skipped (`encode_prompt`). prompt_syntax: "a1111" (weights, BREAK, long prompts, AND,
        [from:to:when], [a|b]: docs/prompts.md) or "plain" (the text as it is, as diffusers).
        lora_dirs: folders where `<lora:NAME:W>` tags of the prompts find NAME.safetensors (`LoraMixin`).
        control_image (one per ControlNet: a list), controlnet_conditioning_scale, control_guidance_start / end (one
        number, or one per ControlNet), guess_mode: as diffusers' ControlNet pipelines (`control_pipeline`);
        control_resize_mode: how a hint of another size is brought to height x width (`latentdiff.control.fit`:
        0 resize, as diffusers; 1 crop; 2 fill; None: an error).
        ip_adapter_image / ip_adapter_image_embeds: the image prompt of a loaded IP-Adapter (`IPAdapterMixin`).
        adapter_conditioning_scale: the T2I-Adapters' (one number, or one per adapter; their hints in control_image,
        after the ControlNets'): `t2i_adapters`.
        """
        check_call(self, locals())
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds)
        height, width = self.check_inputs(prompt, negative_prompt, height=height, width=width,
                                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        control = self.control_for_call(locals(), height=height, width=width)
        tiling = self.tiling(tile_size, tile_overlap)
        sampler = self.sampler_for(eta)
        use_cfg = guidance_scale > 1.0
        cond, uncond, schedule = prompt_encoding.encode_for_call(
            self, prompt, negative_prompt, steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt,
            guidance=use_cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        x_T = self.prepare_latents(cond.shape[0], height, width, generator=generator, latents=latents)
        on_step = step_callback(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                embeddings={"prompt_embeds": cond, "negative_prompt_embeds": uncond})
        model = self.ip_adapter_model(self.unet, ip_adapter_image, ip_adapter_image_embeds, rows=cond.shape[0],
                                      num_images_per_prompt=num_images_per_prompt, guidance=use_cfg)
        z0 = self.denoise(x_T, cond, uncond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                          sampler=sampler, generator=generator, callback=on_step, progress=progress, tiling=tiling,
                          guidance_rescale=guidance_rescale,
                          cfg_truncation=cfg_truncation, schedule=schedule, model=model, control=control)
        return finish(self.output(z0, output_type), return_dict)

    @stage
    def encode_prompt(self, prompt: Prompt | None, negative_prompt: Prompt | None = None, *,
                      num_images_per_prompt: int = 1, guidance: bool = True,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      grad: bool = False, clip_skip: int | None = None,
                      prompt_syntax: str = "a1111") -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (cond, uncond): (B * num_images_per_prompt, L, D) each; uncond is None without guidance.

        clip_skip: the CLIP text encoder's hidden states that many layers before its last, through its final layer
        norm, as diffusers' clip_skip (1: the penultimate layer = A1111's "Clip skip: 2"); for the prompt and the
        negative prompt both, as A1111 (diffusers' StableDiffusionPipeline skips layers for the prompt only).
        A text encoder without layers to skip (LDMBert) refuses it (an InputError).
        prompt_syntax: "a1111" reads weights, BREAK and prompts past 75 tokens (77 * k tokens; a prompt without
        them is encoded exactly as "plain", which gives the text as it is, as diffusers); AND, [from:to:when] and
        [a|b] change per step, which one tensor cannot hold: an InputError here (`__call__` runs them); see
        docs/prompts.md."""
        prompt_encoding.check_prompt_syntax(prompt_syntax)
        if clip_skip is not None:
            check_clip_skip(self, clip_skip)
        encode: Any = functools.partial(self.text_encoder, clip_skip=clip_skip) if clip_skip else self.text_encoder
        negative_encode = encode
        if prompt_syntax == "a1111":
            encode = functools.partial(prompt_encoding.encode_a1111, self.text_encoder, clip_skip=clip_skip)
            negative_encode = functools.partial(encode, composable=False)
        if prompt_embeds is None:
            if prompt is None:
                raise no_prompt()
            prompt_embeds = encode([prompt] if isinstance(prompt, str) else list(prompt))
        uncond = None
        if guidance:
            if negative_prompt_embeds is None:
                n = prompt_embeds.shape[0]
                negatives = [negative_prompt or ""] * n if negative_prompt is None or isinstance(negative_prompt, str) \
                    else list(negative_prompt)
                negative_prompt_embeds = negative_encode(negatives)
            if prompt_syntax == "a1111":
                prompt_embeds, negative_prompt_embeds = prompt_encoding.same_chunks(
                    self.text_encoder, prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip)
            uncond = negative_prompt_embeds.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        cond = prompt_embeds.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        self.release(self.text_encoder)
        dtype = getattr(self.text_encoder, "dtype", None)
        for embeddings in (cond, uncond) if uncond is not None else (cond,):   # small: (B, L, D)
            check_finite_output(embeddings, stage="text encoding", where="text_encoder", dtype=dtype)
        return cond, uncond

    def upscale(self, z: torch.Tensor, height: int, width: int, *, mode: str = "latent") -> torch.Tensor:
        """z_0 (B, C, h, w) -> (B, C, height/f, width/f): bicubic on the latents ("latent"), or decoded, resized
        bicubically as an image and encoded again (the posterior's mode) ("image")."""
        f = self.vae_scale_factor
        if mode == "latent":
            return upscale_latents(z, (height // f, width // f))
        image = torch.nn.functional.interpolate(self.decode(z).float(), size=(height, width), mode="bicubic",
                                                align_corners=False).clamp(-1, 1)
        return self.vae.encode_latents(image.to(self.vae.dtype), sample=False).to(self.unet.dtype)

    @torch.inference_mode()
    def generate_refined(self, prompt: Prompt | None = None, negative_prompt: Prompt | None = None, *,
                         height: int, width: int, refine_strength: float = 0.5, upscale: str = "latent",
                         num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float | None = None,
                         num_images_per_prompt: int = 1, generator: Generator = None,
                         tile_size: TileSize | None = None, tile_overlap: TileSize | None = None,
                         prompt_embeds: torch.Tensor | None = None,
                         negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                         progress: bool = True, max_pixels: int | None = None) -> PipelineOutput:
        """Generate small, refine large: an image at the training size (the UNet's sample_size x f), upscaled to
        height x width (`upscale`: "latent" or "image"), noised to refine_strength (SDEdit) and denoised by the
        last int(N * refine_strength) of the N steps in tiles (tile_size default: the training size). The
        composition comes from the native-size pass, the detail from the large one. max_pixels: as in __call__.
        -> PipelineOutput."""
        check_call(self, locals())
        if self.controlnets:   # its two passes take no hint yet: refused rather than run without the ControlNet
            raise InputError("generate_refined does not run ControlNets yet", where="controlnet",
                             expected="LatentDiffusionPipeline.from_pipe(pipe, controlnet=None)",
                             found=f"{len(self.controlnets)} ControlNet(s)")
        height, width = self.check_inputs(prompt, negative_prompt, height=height, width=width,
                                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                          num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          max_pixels=max_pixels)
        base = self.image_size(None, None)
        first = start_step(num_inference_steps, refine_strength)
        check_upscale(upscale)
        sampler = self.sampler_for(eta)
        check_sampler(sampler)
        tiling = self.tiling(base if tile_size is None else tile_size, tile_overlap)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                          guidance=guidance_scale > 1.0, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds)
        run: dict[str, Any] = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                   sampler=sampler, generator=generator, progress=progress)
        z_small = self.denoise(self.prepare_latents(cond.shape[0], *base, generator=generator), cond, uncond, **run)
        z_large = self.upscale(z_small, height, width, mode=upscale)
        eps = randn(z_large.shape, generator=generator, dtype=z_large.dtype, device=z_large.device)
        x = sampler.noise_to_start(z_large, eps, self.noise_scheduler, num_inference_steps, first)
        return self.output(self.denoise(x, cond, uncond, start_step=first, tiling=tiling, **run), output_type)
