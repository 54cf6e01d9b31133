"""Class-conditional latent diffusion (Rombach et al. 2022, sec. 4.1 and table 3: LDM-4 on ImageNet, "cin256").

class labels -> embed -> prepare x_T -> denoise with classifier-free guidance against the null class -> decode once:

    pipe = ClassConditionalPipeline.from_single_file("cin256-v2.ckpt", null_class=1000)
    images = pipe([207, 360, 387], guidance_scale=3.0, num_inference_steps=50, eta=1.0).images

A class reaches the UNet one of two ways, and both are run:

* through a `ClassEmbedder` (the cin256 model): a label becomes one context token (B, 1, D) that a
  UNet2DConditional with cross_attention_dim D attends to (sec. 3.3);
* through the UNet's own label table (`num_class_embeds`, UNet2D or UNet2DConditional), whose row is added
  to the time embedding (the ADM form, which latentdiff's trainer writes).

Guidance (Ho & Salimans 2021, eq. 6) for guidance_scale s > 1: pred = pred(null) + s (pred(c) - pred(null)),
with the null class `null_class` (default: the embedder's `config.null_class`; cin256-v2 keeps it in row 1000).

Labels are ints, a list, a tensor, or class names through `id2label` ({id: "name, synonym, ..."}: each
comma-separated synonym names the id, DiT's convention). ImageNet's names are not shipped.

diffusers has no such pipeline: the folder's `_class_name` is "LatentDiffusionClassConditionalPipeline", with
vqvae/ (VQ, KL or identity), unet/, scheduler/, class_embedder/ (["latentdiff", "ClassEmbedder"]; absent for a
UNet with its own label table), and "id2label" and "null_class" entries in model_index.json itself.
"""
from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config import is_int, is_real
from ..diffusion.guidance import classifier_free_guidance
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import SamplerProtocol
from ..errors import ConfigError, InputError, describe
from ..models.conditioners import ClassEmbedder
from ..registry import PIPELINES
from .arguments import check_call
from .call_options import finish
from .denoising import DenoisingPipeline, FirstStage, Generator, StepCallback, unet_conditioning
from .folder import FolderPart

ClassLabels = int | str | Sequence[int | str] | torch.Tensor | np.ndarray
CLASS_CONDITIONAL = "LatentDiffusionClassConditionalPipeline"


@PIPELINES.register("class-conditional")
class ClassConditionalPipeline(DenoisingPipeline):
    """A first stage, a UNet, and a ClassEmbedder (or the UNet's own label table) with a null class for guidance."""

    diffusers_class_names = (CLASS_CONDITIONAL,)
    component_names = ("vae", "unet", "class_embedder", "noise_scheduler", "sampler")
    folder_parts = (*DenoisingPipeline.folder_parts, FolderPart(
        "class_embedder", "class_embedder", {("latentdiff", "ClassEmbedder"): ClassEmbedder}, optional=True))
    option_names = ("id2label", "null_class")
    unet_inputs = ("context", "class_labels")

    def __init__(self, *, vae: FirstStage, unet: Any, class_embedder: ClassEmbedder | None = None,
                 noise_scheduler: NoiseScheduler | None = None, sampler: SamplerProtocol | None = None,
                 id2label: Mapping[int | str, str] | None = None, null_class: int | None = None):
        self.class_embedder = class_embedder
        embedder_null = class_embedder.config.null_class if class_embedder is not None else None
        if null_class is not None and embedder_null is not None and null_class != embedder_null:
            raise ConfigError("null_class differs from the class embedder's", where="null_class",
                              expected=embedder_null, found=null_class)
        self.null_class = null_class if null_class is not None else embedder_null
        super().__init__(vae=vae, unet=unet, noise_scheduler=noise_scheduler, sampler=sampler)
        self.id2label, self.label2id = self.read_id2label(id2label)

    def check_parts(self) -> None:
        """The class must reach the UNet one way: the embedder's token by cross-attention, or the UNet's table."""
        super().check_parts()
        needs, config, embedder = unet_conditioning(self.unet), self.unet.config, self.class_embedder
        route = "context" if embedder is not None else "class_labels"
        if needs != (route,) or (route == "class_labels" and not config.num_class_embeds):
            expected = (f"a UNet that cross-attends to the class token (cross_attention_dim "
                        f"{embedder.config.embed_dim})" if embedder is not None else
                        "a UNet with a label table (num_class_embeds), or a class_embedder")
            raise ConfigError("the UNet does not take the class the way this pipeline gives it", where="unet",
                              expected=expected, found=f"a UNet that needs {list(needs) or 'no conditioning'}")
        width = getattr(config, "cross_attention_dim", None)   # a UNet that takes a context has one
        if embedder is not None and width != embedder.config.embed_dim:
            raise ConfigError("the UNet's cross-attention width differs from the class embedding's",
                              where="unet.config.cross_attention_dim", expected=embedder.config.embed_dim,
                              found=width)
        if self.null_class is not None and not (isinstance(self.null_class, int) and
                                                0 <= self.null_class < self.num_classes):
            raise ConfigError("null_class must be a class id", where="null_class",
                              expected=f"0 <= null_class < {self.num_classes}", found=self.null_class)

    def read_id2label(self, id2label: Mapping[Any, str] | None) -> tuple[dict[int, str], dict[str, int]]:
        """{id: "name, synonym"} (JSON keys may be strings) -> (id2label with int keys, every synonym -> id)."""
        if id2label is None:
            return {}, {}
        if not isinstance(id2label, Mapping):
            raise ConfigError("id2label must map class ids to names", where="id2label",
                              expected="{0: 'tench, Tinca tinca', ...}", found=describe(id2label))
        table: dict[int, str] = {}
        for key, name in id2label.items():
            ok = isinstance(name, str) and str(key).lstrip("-").isdigit() and 0 <= int(key) < self.num_classes
            if not ok:
                raise ConfigError("id2label must map class ids of the model to names", where=f"id2label[{key!r}]",
                                  expected=f"an id 0 <= id < {self.num_classes} -> a string", found=repr(name))
            table[int(key)] = name
        label2id = {synonym.strip(): i for i, name in table.items() for synonym in name.split(",") if synonym.strip()}
        return table, label2id

    @property
    def num_classes(self) -> int:
        """Rows of the label table (the null class among them)."""
        if self.class_embedder is not None:
            return self.class_embedder.config.num_classes
        return self.unet.config.num_class_embeds or 0   # set: check_parts refuses a UNet without a table

    def networks(self) -> tuple[torch.nn.Module, ...]:
        return super().networks() + ((self.class_embedder,) if self.class_embedder is not None else ())

    def options(self) -> dict[str, Any]:
        return {"id2label": {str(i): name for i, name in sorted(self.id2label.items())} or None,
                "null_class": self.null_class}

    # ---- the algorithm ---------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, class_labels: ClassLabels, *, guidance_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, eta: float | None = None,
                 generator: Generator = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 callback: StepCallback | None = None, progress: bool = True,
                 max_pixels: int | None = None, return_dict: bool = True, clip_skip: int | None = None) -> Any:
        """One image per label of `class_labels` (an int, a name, a list of them, or a (B,) integer tensor).
        guidance_scale > 1 guides against the null class. latents: x_T (B, C, height/f, width/f), drawn from
        `generator` when None. max_pixels: the largest height x width x labels a call may generate (default
        limits.DEFAULT_MAX_PIXELS). Returns PipelineOutput(images=...), or (images,) with return_dict=False.
        clip_skip: None only (class labels have no text encoder layers to skip: an InputError names it)."""
        check_call(self, locals())
        labels = self.label_ids(class_labels)
        height, width = self.image_size(height, width)
        self.check_pixels(height, width, labels.shape[0], max_pixels=max_pixels, images_argument="class_labels")
        self.check_guidance(guidance_scale)
        self.check_run(num_inference_steps=num_inference_steps, output_type=output_type,
                       batch_size=labels.shape[0], generator=generator)
        sampler = self.sampler_for(eta)
        cond, uncond = self.encode_labels(labels, guidance=guidance_scale > 1.0)
        x_T = self.prepare_latents(labels.shape[0], height, width, generator=generator, latents=latents)
        z0 = self.sample(self.guided_denoiser(cond, uncond, guidance_scale=guidance_scale), x_T, sampler=sampler,
                         num_inference_steps=num_inference_steps, generator=generator, callback=callback,
                         progress=progress)
        return finish(self.output(z0, output_type), return_dict, nsfw_item=False)

    def label_ids(self, class_labels: ClassLabels) -> torch.Tensor:
        """Labels as given -> (B,) int64 class ids on the CPU, each checked to be a row of the table."""
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            ids = torch.as_tensor(class_labels).detach().cpu()
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim > 1:
                raise InputError("a class label tensor must hold integer ids", where="class_labels",
                                 expected="(B,) integers", found=f"{tuple(ids.shape)} {ids.dtype}")
            ids = ids.reshape(-1).long()
        else:
            items = [class_labels] if isinstance(class_labels, (str, numbers.Integral)) else class_labels
            if not isinstance(items, (list, tuple)):
                raise InputError("unsupported class labels", where="class_labels",
                                 expected="an int, a class name, a list of them or an integer tensor",
                                 found=describe(class_labels))
            ids = torch.tensor([self.label_id(item, where=f"class_labels[{i}]" if items is class_labels else
                                              "class_labels") for i, item in enumerate(items)], dtype=torch.long)
        if ids.numel() == 0:
            raise InputError("no class labels", where="class_labels", expected="at least one label", found=[])
        low, high = int(ids.min()), int(ids.max())   # one host check, before any work
        if low < 0 or high >= self.num_classes:
            raise InputError("class id out of range", where="class_labels",
                             expected=f"0 <= id < {self.num_classes}", found=low if low < 0 else high)
        return ids

    def label_id(self, label: int | str, *, where: str = "class_labels") -> int:
        """One label -> its class id: ints as they are, names through id2label."""
        if is_int(label):
            return int(label)
        if not isinstance(label, str):
            raise InputError("a class label must be an int or a class name", where=where, expected="int | str",
                             found=describe(label))
        if not self.label2id:
            raise InputError("class names need an id2label mapping, and this pipeline has none (ImageNet's names are "
                             "not shipped)", where=where,
                             expected="integer class ids; or id2label={0: 'tench, Tinca tinca', ...} passed to the "
                                      "constructor or from_pretrained, or an \"id2label\" entry in model_index.json",
                             found=label)
        if label not in self.label2id:
            close = difflib.get_close_matches(label, list(self.label2id), n=5)
            raise InputError("unknown class name", where=where,
                             expected=f"a name of id2label (close: {close})" if close else
                             f"one of the {len(self.label2id)} names of id2label", found=label)
        return self.label2id[label]

    def check_guidance(self, guidance_scale: float) -> None:
        if not is_real(guidance_scale) or guidance_scale < 0:
            raise InputError("guidance_scale must be a number >= 0", where="guidance_scale", expected=">= 0",
                             found=repr(guidance_scale))
        if guidance_scale > 1.0 and self.null_class is None:
            raise InputError("classifier-free guidance needs a null class, and this pipeline has none",
                             where="guidance_scale", expected="guidance_scale <= 1, or a pipeline built with "
                             "null_class= (cin256-v2: 1000) or a ClassEmbedder whose config has null_class",
                             found=guidance_scale)

    def encode_labels(self, labels: torch.Tensor, *, guidance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) class ids -> (cond, uncond): the context tokens (B, 1, D) of the labels and of the null class with a
        ClassEmbedder, else the ids themselves (B,) for the UNet's table; uncond is None without guidance."""
        labels = labels.to(self.device)
        # guidance has a null class: check_guidance
        null = torch.full_like(labels, self.null_class) if guidance else None  # type: ignore[arg-type]
        if self.class_embedder is None:
            return labels, null
        embed = self.class_embedder
        return embed(labels).to(self.unet.dtype), embed(null).to(self.unet.dtype) if guidance else None

    def guided_denoiser(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, guidance_scale: float) -> Any:
        """denoise(x_t, t): the UNet given the class (token or id), guided against the null class when uncond is set."""
        if self.class_embedder is not None:
            return classifier_free_guidance(self.unet, context=cond, uncond_context=uncond,
                                            guidance_scale=guidance_scale)

        def unet_with_labels(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, class_labels=context)  # the ids, doubled with guidance as a context would be

        return classifier_free_guidance(unet_with_labels, context=cond, uncond_context=uncond,
                                        guidance_scale=guidance_scale)
