"""What every latent-diffusion pipeline shares: a first stage, a denoiser, a noise schedule and a sampler.

    x_T ~ N(0, I)  (prepare_latents)  ->  the reverse process  (sample)  ->  decode once  (output)

`DenoisingPipeline` holds the four parts - `vae`, the first stage (an AutoencoderKL, a VQModel, or the
identity of pixel-space diffusion, LDM-1), `unet`, `noise_scheduler`, `sampler` - and those stages; each task
pipeline adds its conditioning. Its folder is the diffusers folder of the LDM family (`vqvae/`, `unet/`,
`scheduler/`, plus the parts a pipeline declares in `folder_parts`), the layout of diffusers' LDMPipeline and
LDMSuperResolutionPipeline, read and written by `pipelines.folder`; the text-to-image pipelines have their own
layouts (latent_diffusion.py). The first stage's decode and its switches are `pipelines.first_stage`'s, the
speed and memory switches `pipelines.acceleration`'s: the methods here delegate. The checks of the parts and of
`to()`'s arguments are `pipelines.part_checks`'s.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeAlias

import torch
from torch import nn

from .. import hub, limits
from ..config import is_int, is_real
from ..diffusion.noise import randn
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import DDIMSampler, Generator, SamplerProtocol, StepCallback
from ..diffusion.samplers.base import check_generator
from ..errors import ConfigError, InputError, describe
from ..hub import HubLocation
from ..models.autoencoder_kl import AutoencoderKL
from ..models.autoencoder_tiny import AutoencoderTiny
from ..models.base import watch_mapped_files
from ..models.identity import IdentityFirstStage
from ..models.unet import UNet2DConditional
from ..models.unet2d import UNet2D
from ..models.vae_tiling import TileSettings
from ..models.vq import VQModel
from ..utils.memory import release_mapped
from ..utils.numerics import check_finite_output, check_finite_weights
from . import acceleration, first_stage
from .base import Pipeline, PipelineOutput, check_output_type, to_output
from .call_options import Interrupted
from .folder import MODEL_INDEX, Entry, FolderPart, load_folder, write_parts
from .part_checks import (  # noqa: F401  (re-exported: they were defined here)
    check_sampler_part,
    device_and_dtype,
    is_device_name,
    unet_conditioning,
)
from .stages import stage

FirstStage: TypeAlias = AutoencoderKL | VQModel | IdentityFirstStage | AutoencoderTiny
# model_index.json (library, class) -> the latentdiff class that loads that part.
FIRST_STAGES: dict[Entry, type] = {("diffusers", "AutoencoderKL"): AutoencoderKL, ("diffusers", "VQModel"): VQModel,
                                   ("latentdiff", "IdentityFirstStage"): IdentityFirstStage,
                                   ("diffusers", "AutoencoderTiny"): AutoencoderTiny}
DENOISERS: dict[Entry, type] = {("diffusers", "UNet2DModel"): UNet2D,
                                ("diffusers", "UNet2DConditionModel"): UNet2DConditional}


class DenoisingPipeline(Pipeline):
    """A first stage `vae`, a `unet`, a `noise_scheduler` and a `sampler`, and the stages that use them."""

    # The parts of the folder (pipelines/folder.py). The first stage is `vqvae/` in diffusers' LDM folders and
    # `vae` here, as in every pipeline.
    folder_parts: ClassVar[tuple[FolderPart, ...]] = (FolderPart("vqvae", "vae", FIRST_STAGES),
                                                      FolderPart("unet", "unet", DENOISERS))
    option_names: ClassVar[tuple[str, ...]] = ()     # constructor options kept in model_index.json itself
    # The conditioning inputs (see `unet_conditioning`) the pipeline gives the UNet; None: not checked here.
    unet_inputs: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, *, vae: FirstStage, unet: UNet2D | UNet2DConditional,
                 noise_scheduler: NoiseScheduler | None = None, sampler: SamplerProtocol | None = None):
        self.vae = vae
        self.unet = unet
        self.noise_scheduler = noise_scheduler or NoiseScheduler()
        self.sampler = sampler if sampler is not None else DDIMSampler()
        self.check_parts()

    def check_parts(self) -> None:
        """The UNet must take the first stage's latents (plus any concatenated inputs) and predict for them."""
        expected, found = self.unet_in_channels(), self.unet.config.in_channels
        if found not in expected:
            raise ConfigError(f"the UNet does not fit {type(self).__name__}", where="unet.config.in_channels",
                              expected=" or ".join(map(str, expected)) + " (from the first stage's latent channels)",
                              found=found)
        given = self.unet_inputs
        missing = () if given is None else tuple(need for need in unet_conditioning(self.unet) if need not in given)
        if given is not None and missing:
            raise ConfigError(f"the UNet needs {' and '.join(missing)}, which {type(self).__name__} does not give it",
                              where="unet", expected=f"a UNet conditioned by {list(given) or 'nothing'}",
                              found=f"a UNet that needs {list(missing)}")
        if self.unet.config.out_channels != self.vae.latent_channels:
            raise ConfigError("the UNet's output must have the first stage's latent channels",
                              where="unet.config.out_channels", expected=self.vae.latent_channels,
                              found=self.unet.config.out_channels)

    def unet_in_channels(self) -> tuple[int, ...]:
        """The UNet input widths this pipeline drives: the latent channels (subclasses add concatenated inputs)."""
        return (self.vae.latent_channels,)

    def networks(self) -> tuple[nn.Module, ...]:
        """The modules `to()` moves."""
        return (self.unet, self.vae)

    def check_weights(self, *, source: str | None = None) -> None:
        """Scan every network's weights once: a NumericalError (stage "load") naming the part (`vae`, `unet`,
        `text_encoder` ...) and its first tensor holding NaN or Inf. What `check_finite_weights=True` runs."""
        for name in self.component_names:
            module = getattr(self, name, None)
            if isinstance(module, nn.Module):
                check_finite_weights(module, part=name, source=source)

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | str | torch.device | None = None) -> DenoisingPipeline:
        """Move and/or cast every network, as diffusers' `pipe.to` does: a device, a dtype or both, positional in
        either order or by keyword (`to("cuda")`, `to(torch.float16)`, `to("cuda", torch.float16)`,
        `to(torch.float16, "cuda")`, `to(device=..., dtype=...)`). Returns self."""
        target, cast = device_and_dtype(device, dtype)
        for module in self.networks():
            module.to(device=target, dtype=cast)
        return self

    @property
    def device(self) -> torch.device:
        """Where the networks run: the UNet's device, or the execution device of CPU offload."""
        return acceleration.execution_device(self) or self.unet.device

    @property
    def sampler(self) -> SamplerProtocol:
        """The sampler that runs the reverse process. An assignment is checked at once: anything but a sampler (a
        diffusers scheduler, say) is an InputError naming the latentdiff sampler that matches it."""
        return self._sampler

    @sampler.setter
    def sampler(self, value: SamplerProtocol) -> None:
        self._sampler = check_sampler_part(value, where="sampler")

    @property
    def scheduler(self) -> SamplerProtocol:
        """diffusers' name of `sampler` (the same object): `pipe.scheduler = DPMSolverMultistepSampler.from_config(
        pipe.scheduler.config)` swaps the sampler keeping the folder's timestep spacing and offset."""
        return self._sampler

    @scheduler.setter
    def scheduler(self, value: SamplerProtocol) -> None:
        self._sampler = check_sampler_part(value, where="scheduler")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the denoising runs in: the UNet's (diffusers' `pipe.dtype`)."""
        return self.unet.dtype

    @property
    def components(self) -> dict[str, Any]:
        """The constructor's arguments as a dict, name -> part (`component_names`, then the options): the same
        objects, not copies, so `OtherPipeline(**pipe.components)` shares them without reloading, as in diffusers
        (text-to-image, image-to-image and inpainting take the same parts); `from_pipe` takes only the ones a
        class accepts."""
        return {name: getattr(self, name) for name in (*self.component_names, *self.option_names)}

    @classmethod
    def from_pipe(cls, pipeline: DenoisingPipeline, **changes: Any) -> Any:
        """A `cls` pipeline on the parts of `pipeline` (shared, not copied), as diffusers' `from_pipe`: the
        components this class takes, `changes` (constructor arguments) replacing them; an unknown name in
        `changes` is a TypeError, parts that do not fit this class a ConfigError."""
        if not isinstance(pipeline, DenoisingPipeline):
            raise InputError("from_pipe takes a latentdiff pipeline", where="pipeline",
                             expected="a DenoisingPipeline (LatentDiffusionPipeline, ImageToImagePipeline ...)",
                             found=describe(pipeline))
        accepted = (*cls.component_names, *cls.option_names)
        unknown = sorted(set(changes) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipe got unknown keyword(s) {unknown}; its parts: {list(accepted)}")
        shared = {name: part for name, part in pipeline.components.items() if name in accepted}
        return cls(**(shared | changes))

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    # ---- diffusers' run-time idioms (pipelines/call_options.py) -----------------------------------------
    _interrupt: bool = False     # set from a step callback: the remaining steps are skipped (diffusers' interrupt)
    _progress_bar_config: Mapping[str, Any] = MappingProxyType({})

    @property
    def interrupt(self) -> bool:
        """Whether the running call was interrupted: a callback sets `pipe._interrupt = True`, as in diffusers; the
        steps left are skipped and the sample of that step decoded. Each `__call__` starts with it False."""
        return self._interrupt

    def set_progress_bar_config(self, **options: Any) -> None:
        """tqdm options of the sampling progress bar, as diffusers' (disable=True, desc=, leave=, position= ...);
        each call replaces the previous options. `progress=False` on a call still shows no bar."""
        self._progress_bar_config = dict(options)

    # ---- speed and memory (pipelines/acceleration.py) -----------------------------------------------
    def enable_attention_slicing(self, chunk_size: int | Literal["auto"] = "auto", *,
                                 max_bytes: int = acceleration.DEFAULT_MAX_BYTES) -> None:
        """Attention over chunks of chunk_size query rows in every network (same result, smaller score buffers);
        "auto": only where one call's (B, heads, N, M) scores would exceed max_bytes."""
        acceleration.enable_attention_slicing(self, chunk_size, max_bytes=max_bytes)

    def disable_attention_slicing(self) -> None:
        acceleration.disable_attention_slicing(self)

    def enable_model_cpu_offload(self, *, device: str | torch.device | None = None) -> None:
        """Keep the networks in CPU memory; each moves whole to `device` (None: the current accelerator) when
        it runs, and the one before it back. Use instead of `to(device)`."""
        acceleration.enable_cpu_offload(self, mode="model", device=device)

    def enable_sequential_cpu_offload(self, *, device: str | torch.device | None = None) -> None:
        """Keep the UNet's and the autoencoder's weights on the CPU and copy each layer's to `device` for its
        own forward (accelerate hooks): the least device memory, the slowest. Use instead of `to(device)`."""
        acceleration.enable_cpu_offload(self, mode="sequential", device=device)

    def disable_cpu_offload(self) -> None:
        """Remove the offload hooks; the networks are on the CPU afterwards."""
        acceleration.disable_cpu_offload(self)

    def compile(self, *, mode: str | None = "auto", backend: Any = "inductor", fullgraph: bool = True,
                dynamic: bool = False, options: dict[str, Any] | None = None) -> DenoisingPipeline:
        """torch.compile the UNet's forward: one static graph per latent shape (no recompiling for a new prompt
        or seed); on CUDA (mode "auto", the default, or "reduce-overhead") each step replays as a CUDA graph.
        Returns self."""
        acceleration.compile_unet(self, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                                  options=options)
        return self

    # ---- the LDM family's folder (pipelines/folder.py) ------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, variant: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None,
                        mmap_weights: bool = False, check_finite_weights: bool = False,
                        **parts: Any) -> DenoisingPipeline:
        """Load a diffusers-layout folder or Hub repo. `parts`: constructor arguments (vae=, unet=,
        noise_scheduler=, sampler= and the pipeline's own) that replace the folder's; any other is a TypeError.
        `mmap_weights`: see `load_pipeline_folder`. check_finite_weights: scan every part's weights once
        (`check_weights`): a NumericalError naming the part and the first tensor holding NaN or Inf."""
        names = [part.argument for part in cls.folder_parts] + ["noise_scheduler", "sampler", *cls.option_names]
        unknown = sorted(set(parts) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown keyword(s) {unknown}; its parts: {names}")
        location = HubLocation(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        return cls.load_pipeline_folder(path_or_id, given=parts, variant=variant, torch_dtype=torch_dtype,
                                        device=device, location=location, mmap_weights=mmap_weights,
                                        check_finite_weights=check_finite_weights)

    @classmethod
    def load_pipeline_folder(cls, path_or_id: str | os.PathLike, *, given: Mapping[str, Any], variant: str | None,
                             torch_dtype: torch.dtype | str | None, device: str | torch.device | None,
                             location: HubLocation, mmap_weights: bool = False,
                             check_finite_weights: bool = False) -> Any:
        """The pipeline of a folder (`load_folder`). The weights are copied into the process's memory (default,
        as diffusers does: the files can then be rewritten or deleted without effect), or with
        `mmap_weights=True` kept memory-mapped from the files (no copy: lower peak memory) and released after each
        stage (`release_weights = True`); each forward then first checks that no file was rewritten in place (a
        CheckpointError, where reading a truncated file would kill the process). docs/memory.md has the trade.
        check_finite_weights: then scan every part's weights once (`check_weights`)."""
        with hub.mapped_weights(mmap_weights) as files:
            pipe = cls(**load_folder(cls, path_or_id, given=given, variant=variant, torch_dtype=torch_dtype,
                                     device=device, location=location))
        if mmap_weights:
            pipe.release_weights = True
            for network in pipe.networks():
                watch_mapped_files(network, files)
        if check_finite_weights:
            pipe.check_weights(source=str(path_or_id))
        return pipe

    @classmethod
    def folder_layout(cls, index: Mapping[str, Any]) -> Sequence[FolderPart]:
        """The parts of this class's folders (`folder_parts`, whatever the index says)."""
        return cls.folder_parts

    @classmethod
    def load_part(cls, key: str, part_class: Any, root: Path, **load: Any) -> Any:
        """The part in root/<key>/ (`load`: variant, torch_dtype, device and the part's own options)."""
        return part_class.from_pretrained(root, subfolder=key, **load)

    @classmethod
    def read_options(cls, index: Mapping[str, Any], *, source: str) -> dict[str, Any]:
        """Constructor options kept in model_index.json (`option_names`); subclasses check their values."""
        return {name: index[name] for name in cls.option_names if name in index}

    def options(self) -> dict[str, Any]:
        """The options written to model_index.json (JSON values; None: not written)."""
        return {}

    def write_files(self, folder: Path, *, variant: str | None = None) -> None:
        parts = {part.key: getattr(self, part.argument) for part in self.folder_parts
                 if getattr(self, part.argument) is not None}
        entries = write_parts(folder, parts, noise_scheduler=self.noise_scheduler, sampler=self.sampler,
                              variant=variant)
        options = {k: v for k, v in self.options().items() if v is not None}
        index = self.model_index() | {"_class_name": self.diffusers_class_names[0]} | entries | options
        hub.write_json(index, folder / MODEL_INDEX)

    # ---- the stages ---------------------------------------------------------------------------------
    def sampler_for(self, eta: float | None) -> SamplerProtocol:
        """The pipeline's sampler, with `eta` set when given (only samplers that have an eta take one)."""
        if eta is None:
            return self.sampler
        if not hasattr(self.sampler, "eta"):
            raise InputError("this sampler has no eta", where="eta",
                             expected=f"eta=None with {type(self.sampler).__name__}", found=eta)
        tunable: Any = self.sampler   # a sampler with an eta (a SamplerSettings) copies itself by with_options
        return tunable.with_options(eta=float(eta) if is_real(eta) else eta)   # eta=1 is 1.0

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) of the images, checked: multiples of the first stage's factor f; None: the UNet's
        sample_size times f."""
        factor = self.vae_scale_factor
        sample_size = self.unet.config.sample_size
        if sample_size is None and (height is None or width is None):
            raise InputError("this UNet's config has no sample_size, so height and width must be given",
                             where="height/width", expected=f"multiples of {factor}", found=(height, width))
        default = (sample_size or 0) * factor
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not is_int(value) or value <= 0 or value % factor:
                raise InputError(f"{name} must be a positive multiple of the autoencoder factor {factor}",
                                 where=name, expected=f"a multiple of {factor}", found=value)
        return height, width

    def check_pixels(self, height: int, width: int, images: int, *, max_pixels: int | None = None,
                     images_argument: str = "batch_size") -> None:
        """Refuse a call whose height x width x images passes `max_pixels` (default limits.DEFAULT_MAX_PIXELS, see
        docs/limits.md), before any latent is allocated: `height=width=100000` must not cost gigabytes first."""
        if max_pixels is not None:
            limits.check_count(max_pixels, key="max_pixels", at_least=1, at_most=2**62, where="max_pixels",
                               error=InputError)
        limits.check_pixels(height, width, images, max_pixels=max_pixels,
                            where=f"{type(self).__name__}(height={height}, width={width}, {images_argument}={images})")

    @staticmethod
    def check_run(*, num_inference_steps: int, output_type: str, batch_size: int = 1,
                  generator: Generator = None) -> None:
        """The checks of the arguments every `__call__` has, before any model runs."""
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise InputError("num_inference_steps must be at least 1", where="num_inference_steps",
                             expected=">= 1", found=num_inference_steps)
        check_output_type(output_type)
        check_generator(generator, batch_size)

    @stage
    def prepare_latents(self, batch_size: int, height: int, width: int, *, generator: Generator = None,
                        latents: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
        """x_T: (B, C, h, w) noise, drawn per sample from its generator on the generator's device (CPU by
        default), so a seed gives the same image on CPU and GPU and image i of a batch equals its seed alone."""
        shape = self.latent_shape(batch_size, height, width)
        dtype, device = self.unet.dtype, self.device
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                raise InputError("latents have the wrong shape", where="latents", expected=shape,
                                 found=tuple(latents.shape) if isinstance(latents, torch.Tensor)
                                 else describe(latents))
            return latents.to(device=device, dtype=dtype) * self.sampler.init_noise_sigma
        noise = randn(shape, generator=generator, dtype=dtype, device=device)
        return noise * self.sampler.init_noise_sigma

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the diffusion latents for images of height x width."""
        factor = self.vae_scale_factor
        return (batch_size, self.vae.latent_channels, height // factor, width // factor)

    @stage
    def sample(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, *,
               sampler: SamplerProtocol | None = None, num_inference_steps: int, generator: Generator = None,
               callback: StepCallback | None = None, progress: bool = True, grad: bool = False) -> torch.Tensor:
        """The reverse process from x_T (B, C, h, w) to z_0 with `denoise(x_t, t)` (the UNet, or a wrapper adding
        the pipeline's conditioning) and the sampler (the pipeline's by default)."""
        try:
            z0 = (sampler or self.sampler).sample(denoise, x_T, self.noise_scheduler, num_inference_steps,
                                                  generator=generator, callback=callback, progress=progress)
        except Interrupted as stop:    # `pipe._interrupt` set by a callback: the sample of that step
            z0 = stop.x
        # one reduction after the loop, never per step (on CUDA a check is a host sync)
        return check_finite_output(z0, stage="denoising", step=num_inference_steps, steps=num_inference_steps,
                                   dtype=self.unet.dtype)

    @stage
    def decode(self, latents: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """z_0 (B, C, h, w), scaled -> images (B, 3, H, W) in [-1, 1]; the only autoencoder call of a run.
        grad: with autograd (every stage runs without by default, `pipelines.stages`)."""
        return self.decode_first_stage(latents, scaled=True)

    # ---- the first stage (pipelines/first_stage.py) ----------------------------------------------------
    # Tiles of the out-of-memory fall-back; an instance attribute overrides it for one pipeline.
    fallback_tiling: ClassVar[TileSettings] = first_stage.FALLBACK_TILING

    def decode_first_stage(self, latents: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, C_out, h*f, w*f) by `vae.decode_latents` (scaled: diffusion latents)
        or `vae.decode` (unscaled), with two safety nets, each announced by a RuntimeWarning (out of memory:
        again in tiles, `fallback_tiling`; NaN/Inf from a half-precision first stage: again in fp32); see
        `pipelines.first_stage`."""
        return first_stage.decode(self.vae, latents, scaled=scaled, fallback_tiling=self.fallback_tiling, stacklevel=3)

    def enable_vae_tiling(self, *, tile_sample_size: int = 512, overlap: float = 0.25) -> None:
        """Decode (and encode) images larger than `tile_sample_size` pixels in overlapping, blended tiles: bounded
        memory for any image size, slightly different images (see latentdiff.models.vae_tiling)."""
        first_stage.enable_tiling(self.vae, tile_sample_size=tile_sample_size, overlap=overlap)

    def disable_vae_tiling(self) -> None:
        first_stage.disable_tiling(self.vae)

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one sample at a time: the same images, the peak memory of batch 1."""
        first_stage.enable_slicing(self.vae)

    def disable_vae_slicing(self) -> None:
        first_stage.disable_slicing(self.vae)

    def output(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
        """z_0 -> PipelineOutput: the latents themselves for output_type "latent", else decoded images.
        The denoising is over: the UNet's memory-mapped weights are released first (`release_weights`)."""
        self.release(self.unet)
        if output_type == "latent":
            return PipelineOutput(images=latents)
        return PipelineOutput(images=to_output(self.decode(latents), output_type))

    # ---- memory between stages -----------------------------------------------------------------
    # With weights memory-mapped from their files (`from_pretrained(..., mmap_weights=True)`, which also sets this
    # to True), after a stage drop the resident pages of its weights (utils.memory: only pages that still hold the
    # file's bytes): a generation then holds one network's weights at a time (a lower peak RSS: see
    # benchmarks/RESULTS.md), and the next call reads them back from the page cache. "blocks" also releases each
    # UNet block's weights right after its forward, at every step (text-to-image: one block's weights resident at a
    # time, every weight read back from the page cache at every step). Off by default: weights loaded by default
    # are copies in memory, which nothing can release (and which a rewritten file cannot change).
    release_weights: bool | str = False

    def release(self, *modules: nn.Module) -> int:
        """Release the mapped weights of `modules` when `release_weights` is set; returns the bytes released."""
        return sum(release_mapped(m) for m in modules) if self.release_weights else 0
