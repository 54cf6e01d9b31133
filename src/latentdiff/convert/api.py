"""Original single-file checkpoints as latentdiff models and pipelines: the user-facing side of `convert`.

    unet = UNet2DConditional.from_single_file("v1-5-pruned-emaonly.safetensors")       # one part
    text = TextEncoder.from_single_file("v1-5-pruned-emaonly.safetensors")             # + a tokenizer
    pipe = pipeline_from_single_file("v1-5-pruned-emaonly.safetensors", sampler=DDIMSampler(eta=0.5))
    pipeline_to_single_file(pipe, "mine.safetensors", dtype=torch.float16)          # loads in A1111 / ComfyUI

`ModelMixin.from_single_file` / `save_single_file`, `TextEncoder.from_single_file` and the pipelines' reach
this module through `registry.SINGLE_FILE`, where it registers its entry points at import. The
file is read and split into parts by `single_file.read_single_file` (architecture from `original_config`,
else from latentdiff's metadata, else inferred from the shapes: see `infer`); each part is then built
strictly (every key used, every shape checked) on the meta device and assigned, so no weight is initialised
twice. Files written here store every part's config in the safetensors metadata: one file is a whole model.
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..errors import CheckpointError, InputError
from ..models.base import ModelMixin, cast_state_dict, check_state_dict
from ..registry import COMPONENTS, SINGLE_FILE
from ..utils.devices import check_device
from ..utils.dtypes import resolve_torch_dtype
from . import controlnet_ldm  # noqa: F401 (registers ControlNet.from_single_file / save_single_file's hooks)
from . import t2i_adapter as _t2i_adapter  # noqa: F401  (registers T2IAdapter's single-file hooks)
from .single_file import (
    METADATA_KEY,
    NETWORK_PARTS,
    Parts,
    class_name,
    read_single_file,
    single_file_part,
    write_single_file,
)
from .single_file import SINGLE_FILE_SETTINGS_KEY as SETTINGS_KEY
from .text_ldm import TextArch
from .tokenizers import resolve_tokenizer

# What pipeline each family of checkpoints runs in (names in latentdiff.registry.PIPELINES).
FAMILY_TASKS = {"sd1": "text-to-image", "sd2": "text-to-image", "sd-inpaint": "inpainting",
                "sd-upscale": "super-resolution", "sdxl": "sdxl-text-to-image", "sdxl-refiner": "sdxl-image-to-image",
                "sdxl-inpaint": "sdxl-inpainting"}
# Pipeline options a family implies (a folder's model_index.json holds them; a single file does not): the SDXL
# refiner's add embedding reads an aesthetic score, and it conditions an empty prompt on its encoding.
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "sdxl-refiner": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}}
# The tokenizer argument of each text encoder part (a single file holds none).
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# Pipeline constructor arguments that may be given a part of the other kind of first stage.
FIRST_STAGE_ALIASES = {"vae": "vqvae", "vqvae": "vae"}


# ---- reading ------------------------------------------------------------------------------------------------
def read_parts(path: str | os.PathLike, *, use_ema: bool = True, original_config: Any = None,
               prediction_type: str | None = None, only: Collection[str] | None = None) -> Parts:
    """`read_single_file`, with the part configs a latentdiff export saved taken verbatim; `only`: the network
    parts to read (None: all), the others neither inferred nor converted.

    The engine rebuilds saved configs through the key layout, which records only what shapes tensors; a
    model trained with, say, GroupNorm(8) or 2 attention heads must come back as it was saved.
    """
    parts = read_single_file(path, use_ema=use_ema, original_config=original_config, prediction_type=prediction_type,
                             only=only)
    if original_config is None:
        for name, config in saved_configs(path).items():
            if name in parts and name != "extras" and not (name == "scheduler" and prediction_type is not None):
                parts[name] = (dict(config), parts[name][1])
    return parts


def saved_configs(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The part configs in a latentdiff-written safetensors file's metadata ({} for any other file)."""
    try:
        header = hub.check_safetensors_header(Path(path))
        return dict(json.loads((header.get("__metadata__") or {})[METADATA_KEY])["configs"])
    except (CheckpointError, KeyError, TypeError, ValueError):  # no metadata: not a latentdiff export
        return {}


# ---- one model --------------------------------------------------------------------------------------------
def take_part(parts: Parts, part: str, *, source: str, wanted_by: str) -> tuple[dict[str, Any], dict]:
    """parts[part], or a CheckpointError naming the file and the parts it has."""
    if part not in parts:
        found = sorted(name for name in parts if name in NETWORK_PARTS)
        raise CheckpointError(f"the file has no {part!r} part, which {wanted_by} needs", where=source,
                              expected=part, found=found or "no network at all")
    config, state = parts[part]
    return dict(config), state


@SINGLE_FILE.register("model_from_single_file")
def model_from_single_file(cls: type[ModelMixin[Any]], path: str | os.PathLike, *, original_config: Any = None,
                           use_ema: bool = True, prediction_type: str | None = None,
                           torch_dtype: torch.dtype | str | None = None,
                           device: str | torch.device | None = None) -> nn.Module:
    """`cls.from_single_file` of a ModelMixin: read the file, take the class's part, build it strictly."""
    part = single_file_part(cls)
    if part is None:
        raise InputError(f"{cls.__name__} is no part of an original single file", where=cls.__name__,
                         expected="a class with a part in SINGLE_FILE_PARTS (UNet, autoencoder ...)")
    # the parts read: this one (a KL class asked of a VQ file is named below); an autoencoder's sample size
    # follows the UNet's (its shapes are read, its tensors renamed, nothing built); a conditioning stage's file
    # is read whole (what it conditions tells its kind)
    only = {"unet": ("unet",), "vae": ("vae", "vqvae", "unet"), "vqvae": ("vae", "vqvae", "unet")}.get(part)
    torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path))[0]   # before the file is read
    parts = read_parts(path, use_ema=use_ema, original_config=original_config, prediction_type=prediction_type,
                       only=only)
    config, state = take_part(parts, part, source=str(path), wanted_by=cls.__name__)
    check_class(cls, config, source=f"{path}: {part}")
    return build_model(cls, config, state, torch_dtype=torch_dtype, device=device, source=f"{path}: {part}")


def check_class(cls: type, config: Mapping[str, Any], *, source: str) -> None:
    """The part's config must describe `cls` (a UNet2DModel part is not a UNet2DConditionModel)."""
    found = config.get("model_type") or config.get("_class_name")  # transformers' configs name the model type
    want = "ldmbert" if single_file_part(cls) == "text_encoder" else class_name(cls)
    if found is None or found == want:
        return
    other = component_class(found)
    hint = f"{other.__name__}.from_single_file" if other is not None else "TextEncoder.from_single_file" \
        if config.get("model_type") else "a class latentdiff does not have"
    raise CheckpointError(f"this part is a {found}, not what {cls.__name__} loads; use {hint}", where=source,
                          expected=want, found=found)


def component_class(name: str) -> type[ModelMixin[Any]] | None:
    """The registered ModelMixin whose `class_name` is `name`, if any."""
    for key in COMPONENTS.names():
        cls = COMPONENTS.get(key)
        if isinstance(cls, type) and issubclass(cls, ModelMixin) and class_name(cls) == name:
            return cls
    return None


def build_model(cls: type[ModelMixin[Any]], config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                torch_dtype: torch.dtype | None, device: Any, source: str) -> ModelMixin[Any]:
    """A ModelMixin from a diffusers-format config dict and state, strictly."""
    typed = cls.from_file_config(config, source=source)
    return cls.from_state_dict(typed, state, torch_dtype=torch_dtype, device=device, source=source,
                               key_names=getattr(state, "origins", None))


def model_part(model: ModelMixin[Any], *, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], dict]:
    """(diffusers-format config, state) of a ModelMixin: what `to_single_file` takes."""
    config = {**model.to_file_config(), "_class_name": class_name(type(model))}
    return config, cast_state_dict(model.state_dict(), dtype=dtype)


@SINGLE_FILE.register("model_to_single_file")
def model_to_single_file(model: ModelMixin[Any], path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """`model.save_single_file`: this one part, in the original layout, configs in the metadata."""
    part = single_file_part(type(model))
    if part is None:
        raise InputError(f"{type(model).__name__} is no part of an original single file", where=type(model).__name__)
    return write_single_file(path, {part: model_part(model, dtype=dtype)})


# ---- text encoders ----------------------------------------------------------------------------------------
@SINGLE_FILE.register("text_encoder_from_single_file")
def text_encoder_from_single_file(cls: type, path: str | os.PathLike, *, original_config: Any = None,
                                  tokenizer: Any = None, torch_dtype: torch.dtype | str | None = None,
                                  device: str | torch.device | None = None,
                                  cache_dir: str | os.PathLike | None = None,
                                  local_files_only: bool | None = None) -> nn.Module:
    """`TextEncoder.from_single_file`: the file's conditioning stage with its tokenizer (see `tokenizers`)."""
    parts = read_parts(path, original_config=original_config)
    config, state = take_part(parts, "text_encoder", source=str(path), wanted_by=cls.__name__)
    return text_encoder_from_part(cls, config, state, tokenizer=tokenizer, device=device,
                                  torch_dtype=resolve_torch_dtype(torch_dtype, device=device, model=str(path))[0],
                                  cache_dir=cache_dir, local_files_only=local_files_only, source=str(path))


def text_encoder_from_part(cls: type, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                           tokenizer: Any = None, torch_dtype: torch.dtype | None = None, device: Any = None,
                           cache_dir: Any = None, local_files_only: bool | None = None,
                           source: str = "single file") -> nn.Module:
    """A TextEncoder (CLIP / OpenCLIP) or LDMBertTextEncoder from a text encoder part; the tokenizer is
    resolved first, so a missing one fails before any weight is touched."""
    from ..models.ldm_bert import LDMBert, LDMBertTextEncoder
    from ..models.text_encoder import TextEncoderConfig

    config = dict(config)
    settings = config.pop(SETTINGS_KEY, None)
    kind = TextArch.from_config(config, source=f"{source}: text_encoder").kind
    wrapper = LDMBertTextEncoder if kind == "ldmbert" else cls
    if (kind == "ldmbert" and not issubclass(LDMBertTextEncoder, cls)) or \
            (kind != "ldmbert" and issubclass(cls, LDMBertTextEncoder)):
        raise CheckpointError(f"this file's text encoder is {'LDMBert' if kind == 'ldmbert' else 'CLIP'}, which "
                              f"{cls.__name__} does not load", where=f"{source}: text_encoder",
                              expected="TextEncoder.from_single_file", found=kind)
    tok = resolve_tokenizer(kind, tokenizer, cache_dir=cache_dir, local_files_only=local_files_only, source=source)
    where = f"{source}: text_encoder"
    model: nn.Module
    if kind == "ldmbert":
        model = build_model(LDMBert, config, state, torch_dtype=torch_dtype, device=device, source=where)
    else:
        model = clip_text_model(config, state, torch_dtype=torch_dtype, device=device, source=where)
    model_config: Any = model.config  # LDMBert's, or latentdiff's or transformers' CLIPTextConfig
    vocab = int(model_config.vocab_size)
    if len(tok) > vocab:
        raise CheckpointError("the tokenizer has more tokens than the text encoder has embeddings", where=where,
                              expected=f"at most {vocab} tokens", found=f"{type(tok).__name__} with {len(tok)}")
    settings = TextEncoderConfig.from_dict(settings, source=f"{where}: {SETTINGS_KEY}") if settings else None
    return wrapper(model, tok, settings)


def clip_text_model(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                    torch_dtype: torch.dtype | None = None, device: Any = None,
                    source: str = "text_encoder") -> nn.Module:
    """A CLIPTextModel from a config dict and state, loaded strictly: latentdiff's own (`models.clip_text`, no
    transformers import) when it implements every setting of the config, as for a folder (`load_text_model`),
    else transformers' (parameters built on the meta device, buffers real, checked, then assigned)."""
    from ..models.text_encoder import native_backend, native_class_of, native_config_of

    architectures = list(config.get("architectures") or ["CLIPTextModel"])
    if architectures not in (["CLIPTextModel"], ["CLIPTextModelWithProjection"]):
        raise CheckpointError("only CLIPTextModel(WithProjection) text encoders have an original layout",
                              where=source, expected="CLIPTextModel or CLIPTextModelWithProjection (SDXL's bigG)",
                              found=architectures)
    from ..models.clip_text import MODEL_TYPE

    names: dict[str, str] = dict(getattr(state, "origins", None) or {})   # each key's name in the file
    data = {"model_type": MODEL_TYPE, **config, "architectures": architectures}
    native = native_config_of(data, source=source) if native_backend() else None
    if native is not None:
        return native_class_of(data).from_state_dict(native, state, torch_dtype=torch_dtype, device=device,
                                                     source=source, key_names=names)
    import transformers
    from accelerate import init_empty_weights

    model_config = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, architectures[0])(model_config)
    projection = architectures == ["CLIPTextModelWithProjection"]   # text_model.* + text_projection.weight as is
    nested = all(k.startswith("text_model.") for k in state)
    if not projection and hasattr(model, "text_model") != nested:  # transformers 4 (and its files) nest once more
        state = {"text_model." + k: v for k, v in state.items()} if not nested else \
            {k[len("text_model."):]: v for k, v in state.items()}
    expected = model.state_dict()
    # a buffer, not a weight, that transformers < 4.31 saved: drop it where the model no longer persists it
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("embeddings.position_ids")}
    names |= {"text_model." + k: v for k, v in names.items()} | {k.removeprefix("text_model."): v
                                                               for k, v in names.items()}
    check_state_dict(model, state, source=source, key_names=names)
    dtype = torch_dtype or torch.float32
    target = check_device(device) or torch.device("cpu")
    model.load_state_dict(cast_state_dict(state, dtype=dtype, device=target, copy=not hub.weights_mapped()),
                          strict=True, assign=True)
    module: nn.Module = model  # nn.Module's .to: transformers annotates PreTrainedModel.to as taking a model
    return module.to(target).eval()


def text_encoder_part(encoder: Any, *, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], dict]:
    """(config, state) of a TextEncoder's text model as an original single file's "text_encoder" part: the
    transformers (or LDMBert) config dict, with the encoder's settings under SETTINGS_KEY, and its weights
    (floating-point ones cast to `dtype` unless None)."""
    to_file = getattr(encoder.model, "to_file_config", None)  # LDMBert is a latentdiff model
    config = dict(to_file()) if to_file is not None else encoder.model.config.to_dict()
    config[SETTINGS_KEY] = encoder.config.to_dict()
    return config, cast_state_dict(encoder.model.state_dict(), dtype=dtype)


# ---- pipelines --------------------------------------------------------------------------------------------
@SINGLE_FILE.register("pipeline_from_single_file")
def pipeline_from_single_file(path: str | os.PathLike, *, original_config: Any = None, use_ema: bool = True,
                              prediction_type: str | None = None, torch_dtype: torch.dtype | str | None = None,
                              device: str | torch.device | None = None, task: str | None = None,
                              pipeline_class: type | None = None,
                              cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                              check_finite_weights: bool = False, **components: Any) -> Any:
    """The pipeline an original single file describes: its class from PIPELINES by the file's family, or by
    `task=` (a PIPELINES name); `pipeline_class=` (what `SomePipeline.from_single_file` passes) must fit the file.

    `components` replace the file's parts and are not built from it: `unet=`, `vae=`, `text_encoder=`,
    `noise_scheduler=`, `sampler=` ... (the pipeline's constructor arguments), and `tokenizer=` for the text
    encoder built from the file. An unknown name is a TypeError. check_finite_weights: scan every part's weights
    once (the pipeline's `check_weights`): a NumericalError naming the part and the first tensor holding NaN or Inf.
    """
    given = {FIRST_STAGE_ALIASES.get(name, name) for name, value in components.items() if value is not None} \
        | {name for name, value in components.items() if value is not None}
    only = [part for part in NETWORK_PARTS if part not in given]   # a part passed in is not even read
    torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path))[0]   # before the file is read
    parts = read_parts(path, use_ema=use_ema, original_config=original_config, prediction_type=prediction_type,
                       only=only)
    pipeline = pipeline_from_parts(parts, source=str(path), torch_dtype=torch_dtype, device=device, task=task,
                                   pipeline_class=pipeline_class,
                                   cache_dir=cache_dir, local_files_only=local_files_only, **components)
    if check_finite_weights:
        pipeline.check_weights(source=str(path))
    return pipeline


def pipeline_from_parts(parts: Parts, *, source: str, torch_dtype: torch.dtype | None = None, device: Any = None,
                        task: str | None = None, pipeline_class: type | None = None, cache_dir: Any = None,
                        local_files_only: bool | None = None,
                        on_part: Callable[[str, int], None] | None = None, **components: Any) -> Any:
    """`pipeline_from_single_file` on parts already read; `on_part(name, tensors)` after each part is built."""
    cls = find_pipeline_class(parts, task=task, wanted=pipeline_class, source=source)
    params = inspect.signature(cls.__init__).parameters
    names = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    takes = ["tokenizer"] + [TOKENIZERS[n] for n in names if n in TOKENIZERS and n != "text_encoder"]
    unknown = sorted(set(components) - set(names) - set(takes))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unknown component(s) {unknown}; it takes {names} "
                        f"and {', '.join(t + '=' for t in takes)}")
    given = {part: components.pop(TOKENIZERS[part], None) for part in TOKENIZERS if TOKENIZERS[part] in takes}
    from_file = [n for n in names if n not in components]
    tokenizers: dict[str, Any] = {}
    for part, tokenizer in given.items():
        if part in from_file and part in parts:  # before any weight is touched
            kind = TextArch.from_config(parts[part][0], source=f"{source}: {part}").kind
            tokenizers[part] = resolve_tokenizer(kind, tokenizer, cache_dir=cache_dir,
                                                 local_files_only=local_files_only, source=source)
        elif tokenizer is not None:
            raise InputError(f"{TOKENIZERS[part]}= is for the text encoder built from the file, and none is",
                             where=TOKENIZERS[part], expected=f"{part}=TextEncoder(model, tokenizer) instead")
    required = [n for n in from_file if params[n].default is inspect.Parameter.empty]
    built = build_components(parts, from_file, required=required, tokenizers=tokenizers, source=source,
                             on_part=on_part, torch_dtype=torch_dtype, device=device, wanted_by=cls.__name__)
    family = dict(parts.get("extras", ({}, {}))[0]).get("family")
    options = {k: v for k, v in FAMILY_OPTIONS.get(str(family), {}).items() if k in params and k not in components}
    return cls(**components, **built, **options)


def build_components(parts: Parts, names: list[str], *, required: list[str], tokenizers: Mapping[str, Any],
                     source: str, on_part: Callable[[str, int], None] | None, torch_dtype: torch.dtype | None,
                     device: Any, wanted_by: str) -> dict[str, Any]:
    """Pipeline constructor arguments `names` built from the file's parts; a `required` one it lacks is an error."""
    from ..models.text_encoder import TextEncoder

    built: dict[str, Any] = {}
    if "scheduler" in parts and {"noise_scheduler", "sampler"} & set(names):
        schedule = dict(zip(("noise_scheduler", "sampler"), scheduler_from_part(parts["scheduler"][0], source=source),
                            strict=True))
        built.update({k: v for k, v in schedule.items() if k in names})
    load = dict(torch_dtype=torch_dtype, device=device)
    for name in (n for n in names if n not in built):
        part = name if name in parts else FIRST_STAGE_ALIASES.get(name)
        if part in TOKENIZERS and part in parts:
            built[name] = text_encoder_from_part(TextEncoder, *parts[part], tokenizer=tokenizers.get(part),
                                                 source=source, **load)
        elif part in parts and part in NETWORK_PARTS:
            built[name] = module_from_part(part, *parts[part], source=f"{source}: {part}", **load)
        elif name in required:
            raise CheckpointError(f"the file has no part for {wanted_by}'s {name!r}; pass {name}=", where=source,
                                  expected=name, found=sorted(p for p in parts if p in NETWORK_PARTS))
        else:
            continue
        if on_part is not None:
            on_part(part, len(parts[part][1]))
    return built


def find_pipeline_class(parts: Parts, *, task: str | None = None, wanted: type | None = None,
                        source: str) -> type[Any]:
    """The pipeline class for a file: PIPELINES[task] when given, else the one its family runs in. `wanted`
    (the class whose from_single_file was called) must be that class or a base of it; where the file alone
    cannot tell (a concat-conditioned LDM), `wanted` decides."""
    from ..registry import PIPELINES

    if task is not None:
        cls = PIPELINES.get(task)
    else:
        try:
            name = detect_task(parts, source=source)
        except CheckpointError:
            if wanted is None:
                raise
            return wanted
        if wanted is not None and name == getattr(wanted, "registry_name", None):
            return wanted
        if name not in PIPELINES:
            family = dict(parts["extras"][0]).get("family")
            raise CheckpointError(f"a {family} checkpoint runs in the {name!r} pipeline, which latentdiff does not "
                                  "have yet; load its parts with their classes' from_single_file", where=source,
                                  expected=PIPELINES.names(), found=name)
        cls = PIPELINES.get(name)
    if wanted is not None and issubclass(wanted, cls) and set(getattr(wanted, "component_names", ())) == \
            set(getattr(cls, "component_names", ())):
        return wanted   # a task over the same parts (SDXL's base in its image-to-image pipeline)
    if wanted is not None and not issubclass(cls, wanted):
        raise CheckpointError(f"this checkpoint runs in {cls.__name__}, not {wanted.__name__}; use "
                              f"{cls.__name__}.from_single_file", where=source, expected=wanted.__name__,
                              found=cls.__name__)
    return cls


def detect_task(parts: Parts, *, source: str) -> str:
    """The PIPELINES name a file's parts call for (FAMILY_TASKS; LDMs by their conditioning)."""
    family = dict(parts.get("extras", ({}, {}))[0]).get("family")
    if family in FAMILY_TASKS:
        return FAMILY_TASKS[family]
    if "unet" not in parts:
        raise CheckpointError("the file holds no denoiser, so no pipeline: load its parts with their classes' "
                              "from_single_file", where=source, found=sorted(p for p in parts if p in NETWORK_PARTS))
    unet = parts["unet"][0]
    conditioning = dict(parts.get("extras", ({}, {}))[0]).get("conditioning")   # of a part not read
    if "text_encoder" in parts or conditioning in ("clip", "openclip", "ldmbert"):
        return "text-to-image"
    if "class_embedder" in parts or conditioning == "class":
        return "class-conditional"
    if unet.get("in_channels") == unet.get("out_channels"):
        return "unconditional"
    raise CheckpointError("an LDM conditioned by concatenation (super-resolution, layout-to-image ...): the file "
                          "does not say which task; pass task= (a PIPELINES name)", where=source,
                          found=f"in_channels {unet.get('in_channels')} != out_channels {unet.get('out_channels')}")


def module_from_part(part: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                     torch_dtype: torch.dtype | None = None, device: Any = None, source: str = "part") -> nn.Module:
    """The network of one part, without tokenizer: a ModelMixin (by its config's _class_name), CLIPTextModel
    or LDMBert."""
    if part in ("text_encoder", "text_encoder_2"):
        if config.get("model_type") == "ldmbert":
            from ..models.ldm_bert import LDMBert

            return build_model(LDMBert, config, state, torch_dtype=torch_dtype, device=device, source=source)
        return clip_text_model({k: v for k, v in config.items() if k != SETTINGS_KEY}, state,
                               torch_dtype=torch_dtype, device=device, source=source)
    class_name = config.get("_class_name")
    cls = component_class(class_name) if class_name else None
    if cls is None:
        raise CheckpointError(f"latentdiff has no model for this {part!r} part", where=source,
                              expected="a registered component with this diffusers class", found=class_name)
    return build_model(cls, config, state, torch_dtype=torch_dtype, device=device, source=source)


def scheduler_from_part(config: Mapping[str, Any], *, source: str) -> tuple[Any, Any]:
    """(NoiseScheduler, sampler) from the file's scheduler part (a diffusers scheduler config dict)."""
    from ..diffusion.noise_scheduler import NoiseScheduler
    from ..diffusion.scheduler_io import read_scheduler_config

    schedule, sampler = read_scheduler_config(config, source=f"{source}: scheduler")
    return NoiseScheduler(schedule), sampler


def pipeline_parts(pipe: Any, *, dtype: torch.dtype | None = None) -> Parts:
    """The parts of a pipeline (its networks and its noise schedule), as `write_single_file` takes them."""
    from ..models.text_encoder import TextEncoder

    parts: Parts = {}
    for attr in ("unet", "vae", "vqvae", "text_encoder", "text_encoder_2", "class_embedder"):
        module = getattr(pipe, attr, None)
        if isinstance(module, TextEncoder):
            parts[attr] = text_encoder_part(module, dtype=dtype)
        elif isinstance(module, ModelMixin) and (part := single_file_part(type(module))) is not None:
            parts[part] = model_part(module, dtype=dtype)
    if not parts:
        raise InputError("the pipeline has no network with an original layout", where=type(pipe).__name__)
    if getattr(pipe, "noise_scheduler", None) is not None:
        parts["scheduler"] = (scheduler_part(pipe.noise_scheduler, getattr(pipe, "sampler", None)), {})
    return parts


def scheduler_part(noise_scheduler: Any, sampler: Any) -> dict[str, Any]:
    """The scheduler config stored in the metadata: the pipeline's sampler when diffusers can name it, else the
    noise schedule with DDIM (an original file records the training schedule only)."""
    from ..diffusion.samplers import DDIMSampler
    from ..diffusion.scheduler_io import scheduler_file_config
    from ..errors import ConfigError

    try:
        return scheduler_file_config(noise_scheduler, sampler if sampler is not None else DDIMSampler())
    except ConfigError:
        return scheduler_file_config(noise_scheduler, DDIMSampler())


@SINGLE_FILE.register("pipeline_to_single_file")
def pipeline_to_single_file(pipe: Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write a pipeline as one original-layout `.safetensors` file (atomically), configs in the metadata.

    `dtype` casts the floating-point tensors (None: as they are). The file loads in CompVis' code and the tools
    that read its layout (AUTOMATIC1111, ComfyUI), and back here without a YAML.
    """
    return write_single_file(path, pipeline_parts(pipe, dtype=dtype), metadata=metadata)
