"""What every latentdiff model shares: a typed config, strict loading, atomic saving.

A model's folder is the diffusers layout (`config.json` + `diffusion_pytorch_model.safetensors`),
so a folder saved here loads in diffusers and the other way round. The config file is mapped to and
from the model's typed config by the model class (`from_file_config` / `to_file_config`, through its
`diffusers_config` table, see `diffusers_config`): an unknown key, or a known key at a value latentdiff does
not implement, is a ConfigError naming it.

A model may also be one *part* of an original single-file checkpoint (CompVis / Stability AI `.ckpt` /
`.safetensors`): `from_single_file` reads that part, `save_single_file` writes it back in the original
layout. Models know nothing of that format: both are hooks (`registry.SINGLE_FILE`) that
`latentdiff.convert.api` provides.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from .. import hub
from ..config import ComponentConfig, read_json
from ..errors import CheckpointError, ConfigError, describe
from ..hub_files import local_file
from ..registry import SINGLE_FILE
from ..utils import numerics
from ..utils.devices import check_device
from ..utils.dtypes import resolve_torch_dtype
from ..utils.memory import release_mapped
from ..utils.startup import freeze_startup_objects
from ..version import __version__
from .diffusers_config import DiffusersConfigMap, check_supported  # noqa: F401 (check_supported's old home)

if TYPE_CHECKING:
    from typing_extensions import Self

CONFIG_NAME = "config.json"

# The typed config a model holds: `class UNet2DConditional(ModelMixin[UNetConfig])` makes `self.config.x` check.
ConfigT = TypeVar("ConfigT", bound=ComponentConfig)


class ModelMixin(nn.Module, Generic[ConfigT]):
    """Base of the registrable networks (UNet, autoencoders ...)."""

    # Not a ClassVar only because a ClassVar cannot name a type variable: every subclass sets it in its body.
    config_class: type[ConfigT]
    config: ConfigT
    registry_name: ClassVar[str]
    diffusers_class_name: ClassVar[str | None] = None  # written as `_class_name` in config.json
    weights_name: ClassVar[str] = hub.WEIGHTS_NAME
    diffusers_config: ClassVar[DiffusersConfigMap | None] = None  # config.json table of the diffusers twin

    def __init__(self, config: ConfigT):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}",
                              expected=self.config_class.__name__, found=describe(config))
        self.config = config

    # ---- config files ---------------------------------------------------------------------
    @classmethod
    def from_file_config(cls, data: Mapping[str, Any], *, source: str | None = None) -> ConfigT:
        """Map a config.json dict to the typed config: through the `diffusers_config` table where the model has
        a diffusers twin (keys we don't implement at the given value are a ConfigError), else the config's own."""
        if cls.diffusers_config is not None:
            return cls.diffusers_config.to_config(data, cls.config_class, source=source)
        return cls.config_class.from_dict(data, source=source)

    def to_file_config(self) -> dict[str, Any]:
        """The config.json dict written by save_pretrained: the complete diffusers config where there is a twin."""
        if self.diffusers_config is not None:
            return self.diffusers_config.to_file(self.config)
        return self.config.to_dict()

    @classmethod
    def load_config(cls, folder: str | os.PathLike) -> ConfigT:
        path = Path(folder) / CONFIG_NAME
        return cls.from_file_config(read_json(path), source=str(path))

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ConfigT | Mapping[str, Any]) -> Self:
        if not isinstance(config, ComponentConfig):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, variant: str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool | None = None, mmap_weights: bool | None = None,
                        check_finite_weights: bool = False):
        """Load from a local folder or a Hub id (diffusers layout), strictly: every key used, every shape checked.

        The weights are copied into memory (default), or with `mmap_weights=True` kept memory-mapped from the file
        (no copy; pages can be released, see docs/memory.md); the file must then not be rewritten in place: each
        forward first checks it and raises a CheckpointError if it was. None: as the enclosing `hub.mapped_weights`
        block says (a pipeline's load). check_finite_weights: scan every tensor once and raise a NumericalError
        naming the first that holds NaN or Inf (off by default: one pass over the weights)."""
        check_device(device)  # before any file is read
        torch_dtype = resolve_torch_dtype(torch_dtype, device=device, model=str(path_or_id))[0]
        prefix = f"{subfolder}/" if subfolder else ""
        location = hub.HubLocation(revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only)
        root = location.resolve(path_or_id, allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}{cls.weights_name}*"])
        folder = root / subfolder if subfolder else root
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in the model folder", where=str(folder),
                                  expected=f"{cls.__name__} folder with {CONFIG_NAME} and weights")
        return cls.from_folder_weights(folder, cls.weights_name, variant=variant, torch_dtype=torch_dtype,
                                       device=device, mmap_weights=mmap_weights,
                                       check_finite_weights=check_finite_weights, part=subfolder or cls.__name__)

    @classmethod
    def from_folder_weights(cls, folder: Path, weights_name: str, *, variant: str | None,
                            torch_dtype: torch.dtype | None, device: str | torch.device | None,
                            mmap_weights: bool | None, check_finite_weights: bool, part: str) -> Any:
        """The model of a resolved local folder: its config, its weights `weights_name` (copied, or kept mapped
        and watched with `mmap_weights`), loaded strictly, then scanned for NaN / Inf when asked."""
        config = cls.load_config(folder)
        with hub.mapped_weights(mmap_weights) as files:
            state = load_weights(folder, weights_name, variant=variant)
            model = cls.from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=str(folder))
        if mmap_weights:
            watch_mapped_files(model, files)
        if check_finite_weights:
            numerics.check_finite_weights(model, part=part, source=str(folder))
        return model

    @classmethod
    def from_state_dict(cls, config: ConfigT, state: Mapping[str, torch.Tensor], *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        source: str | None = None, key_names: Mapping[str, str] | None = None) -> Self:
        """Build the model without initialising weights (meta device) and assign `state` to it, strictly.
        `key_names`: each key's name in the source file (a converted single file), for the error messages."""
        state = rename_deprecated_attention(state)
        freeze_startup_objects()
        with torch.device("meta"), init_skipped_on_meta():
            model = cls(config)
        check_state_dict(model, state, source=source, key_names=key_names)
        dtype = torch_dtype or torch.float32
        device = check_device(device) or torch.device("cpu")
        model.load_state_dict(cast_state_dict(state, dtype=dtype, device=device, copy=not hub.weights_mapped()),
                              strict=True, assign=True)
        return model.eval()

    # ---- original single files (hooks provided by latentdiff.convert.api) ---------------------------
    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, original_config: Any = None, use_ema: bool = True,
                         prediction_type: str | None = None, torch_dtype: torch.dtype | str | None = None,
                         device: str | torch.device | None = None, check_finite_weights: bool = False):
        """Load this model's part of an original single file (`.safetensors` or `.ckpt`), strictly.

        The architecture comes from `original_config` (a YAML path, a dict, or the name of a shipped one),
        else from latentdiff's metadata in the file, else from the tensor shapes. `use_ema`: the UNet gets
        LitEma's weights when the file has them. A file without this part is a CheckpointError naming the
        parts it has. check_finite_weights: as in `from_pretrained`.
        """
        path = local_file(path)   # a Hub file URL or "owner/repo/file": the cached download
        model = SINGLE_FILE.get("model_from_single_file")(cls, path, original_config=original_config, use_ema=use_ema,
                                                          prediction_type=prediction_type, torch_dtype=torch_dtype,
                                                          device=device)
        if check_finite_weights:
            numerics.check_finite_weights(model, part=cls.__name__, source=str(path))
        return model

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write this model alone in the original layout (`.safetensors`, atomically), its config in the metadata.

        `dtype` casts the floating-point tensors (None: as they are). A UNet gets `model.diffusion_model.`
        keys; an autoencoder gets the bare keys of CompVis' stand-alone first-stage files.
        """
        return SINGLE_FILE.get("model_to_single_file")(self, path, dtype=dtype)

    # ---- saving -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> Path:
        """Write config.json and safetensors weights; atomic: an interrupted save leaves the old folder intact."""
        with hub.atomic_folder(save_directory) as tmp:
            self.write_files(tmp, variant=variant)
        return Path(save_directory)

    def write_files(self, folder: Path, *, variant: str | None = None,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write config.json (`file_config()`) and <weights_name>[.variant].safetensors (`state_dict`, default the
        model's own) into `folder`, in place: callers make it atomic."""
        folder.mkdir(parents=True, exist_ok=True)
        hub.write_json(self.file_config(), folder / CONFIG_NAME)
        name = f"{self.weights_name}.{variant}.safetensors" if variant else f"{self.weights_name}.safetensors"
        state = dict(self.state_dict() if state_dict is None else state_dict)
        hub.save_safetensors(state, folder / name, metadata={"format": "pt"})

    def file_config(self) -> dict[str, Any]:
        """What config.json holds: the file config, plus the diffusers class and latentdiff's own entries."""
        config = dict(self.to_file_config())
        if self.diffusers_class_name:
            config["_class_name"] = self.diffusers_class_name
        config["_latentdiff_version"] = __version__
        config["_latentdiff_component"] = self.registry_name
        return config

    # ---- conveniences -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# Attention weights of autoencoder / UNet2DModel mid blocks as diffusers named them before 0.14; diffusers
# renames them on load, so folders saved then (e.g. the CompVis LDM uploads) still load.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_deprecated_attention(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights under their old names -> current names; every other key unchanged."""
    def rename(key: str) -> str:
        m = _DEPRECATED_KEY.match(key)
        return f"{m[1]}.{DEPRECATED_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else key
    return {rename(k): v for k, v in state.items()}


def load_weights(folder: Path, weights_name: str, *, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Read the weights of a model folder: safetensors (single or sharded), else a safe pickle."""
    stem = f"{weights_name}.{variant}" if variant else weights_name
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return hub.load_safetensors(single)
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in index_shards(index):
            state.update(hub.load_safetensors(shard))
        return state
    pickle = folder / f"{stem}.bin"
    if pickle.is_file():
        state = hub.load_torch_pickle(pickle)
        if not isinstance(state, dict):
            raise CheckpointError("pickled weights are not a state dict", where=str(pickle), found=describe(state))
        return state
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise CheckpointError("no weights file in the model folder", where=str(folder),
                          expected=f"{single.name} (or a sharded index, or {pickle.name})", found=found)


def index_shards(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names, each resolved inside the index's folder (a name like
    `../../x.safetensors` or an absolute path is a CheckpointError naming the index, the entry and where it
    points: an index must not read weights from elsewhere on the machine)."""
    try:
        data = read_json(index)
    except ConfigError as e:   # not JSON, or not an object: a broken checkpoint, like a bad weights file
        raise CheckpointError(f"unreadable sharded weights index: {e}", where=str(index)) from None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError("a sharded weights index needs a weight_map of tensor name -> shard file",
                              where=f"{index}: weight_map", expected="an object of string -> string",
                              found=describe(weight_map))
    first_key = {name: key for key, name in reversed(list(weight_map.items()))}  # a tensor naming each shard
    return [hub.contained(index.parent, name, file=index, entry=f"weight_map[{first_key[name]!r}]")
            for name in sorted(first_key)]


# torch.nn.init functions that modules call in reset_parameters(): on the meta device they have nothing to fill,
# yet some run through torch's Python decompositions (nn.Embedding's normal_ imports torch._dynamo: a large part
# of a cold from_pretrained, see benchmarks/RESULTS.md). init_skipped_on_meta() makes them return meta tensors
# untouched.
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


_INIT_LOCK = threading.Lock()
_init_users = 0                                     # blocks inside init_skipped_on_meta, in every thread
_init_originals: dict[str, Any] = {}                # torch's own functions while the wrappers are installed
_init_wrappers: dict[str, Any] = {}


def _skipping(original: Any) -> Any:
    @functools.wraps(original)
    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else original(tensor, *args, **kwargs)
    return init


@contextlib.contextmanager
def init_skipped_on_meta() -> Iterator[None]:
    """Within the block, torch.nn.init's functions leave meta tensors as they are (and work as usual on real
    ones: the wrappers check each tensor, so another thread initialising a real model is unaffected).

    Concurrent blocks share one installation, counted under a lock: the first installs the wrappers over torch's
    own functions, the last out puts torch's back, so overlapping loads in threads never leave a wrapper behind
    (each block saving and restoring what it found did: a later block saved the earlier one's wrappers)."""
    global _init_users
    with _INIT_LOCK:
        if _init_users == 0:
            _init_originals.update({name: getattr(nn.init, name) for name in INIT_FUNCTIONS if hasattr(nn.init, name)})
            _init_wrappers.update({name: _skipping(original) for name, original in _init_originals.items()})
            for name, wrapper in _init_wrappers.items():
                setattr(nn.init, name, wrapper)
        _init_users += 1
    try:
        yield
    finally:
        with _INIT_LOCK:
            _init_users -= 1
            if _init_users == 0:
                for name, original in _init_originals.items():
                    if getattr(nn.init, name) is _init_wrappers[name]:   # not patched again by someone else
                        setattr(nn.init, name, original)
                _init_originals.clear()
                _init_wrappers.clear()


# Source bytes cast or moved before their pages are given back (see cast_state_dict).
RELEASE_EVERY_BYTES = 256 * 2**20


def cast_state_dict(state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, copy: bool = False) -> dict[str, torch.Tensor]:
    """The one state-dict cast: floating-point tensors in `dtype` (None: as they are; integer buffers keep
    theirs), every tensor on `device` (None: where it is); `copy`: every tensor a copy in the process's own memory
    even where it needs no cast (weights memory-mapped from a file then no longer depend on it). Source pages
    memory-mapped from a .safetensors file are given back as it goes: loading an fp32 file into bf16 (or copying
    it) then peaks at the new model plus RELEASE_EVERY_BYTES, not at both whole models (every source page touched
    would otherwise stay resident)."""
    if dtype is None and device is None and not copy:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    done: list[torch.Tensor] = []
    pending = 0
    for key, value in state.items():
        out[key] = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point()
                            else value.dtype)
        if copy and out[key] is value:
            out[key] = value.clone()
        if out[key] is not value:  # a copy: the source is no longer needed
            done.append(value)
            pending += value.nbytes
            if pending >= RELEASE_EVERY_BYTES:
                release_mapped(done)
                done, pending = [], 0
    release_mapped(done)
    return out


def watch_mapped_files(module: nn.Module, files: list[hub.MappedFile]) -> None:
    """Before each forward of `module`, check that the files its weights are mapped from were not changed in place
    (`hub.MappedFile.check`: a CheckpointError, where the read would otherwise crash with SIGBUS or silently use
    other weights). One stat per file per forward; the hook stays outside a compiled forward."""
    watched = tuple(dict.fromkeys(files))

    def check_files(_module: nn.Module, _args: Any) -> None:
        for file in watched:
            file.check()

    if watched:
        module.register_forward_pre_hook(check_files)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | None = None,
                     key_names: Mapping[str, str] | None = None) -> None:
    """Raise a CheckpointError listing every missing, unexpected, mis-shaped or wrong-dtype key; `key_names`: a
    key's name in the file it came from (a converted single file), shown beside latentdiff's."""
    names = key_names or {}

    def in_file(key: str) -> str:
        return f" (in the file: {names[key]})" if key in names and names[key] != key else ""

    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k + in_file(k) for k in set(state) - set(expected))
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.is_meta)
    if not_tensors:
        raise CheckpointError("checkpoint entries are not tensors with data", where=source,
                              expected="name -> tensor (not on the meta device)",
                              found=_cap([f"{k}{in_file(k)}: {describe(state[k])}" for k in not_tensors], 5))
    wrong = sorted(f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}{in_file(k)}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    wanted = {k: v.dtype for k, v in own.items()}
    bad_dtypes = sorted(f"{k}: expected {_dtype_kind(wanted[k])}, found {state[k].dtype}"
                        for k in set(wanted) & set(state) if not _dtype_fits(wanted[k], state[k]))
    if missing or unexpected or wrong or bad_dtypes:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_cap(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_cap(unexpected)}")
        if wrong:
            lines.append(f"wrong shapes ({len(wrong)}): {_cap(wrong)}")
        if bad_dtypes:
            lines.append(f"wrong dtypes ({len(bad_dtypes)}): {_cap(bad_dtypes)}")
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(lines), where=source)


def _dtype_kind(dtype: torch.dtype) -> str:
    return "a real floating-point tensor" if dtype.is_floating_point else "an integer tensor"


def _dtype_fits(wanted: torch.dtype, value: Any) -> bool:
    """Whether a tensor of `value`'s dtype can fill a parameter or buffer of dtype `wanted`: floating point for
    floating point (int / bool / complex weights are refused: a cast would silently drop or invent values),
    integer for integer buffers (position ids)."""
    if not isinstance(value, torch.Tensor):
        return False
    if wanted.is_floating_point:
        return value.is_floating_point()
    if wanted == torch.bool:
        return value.dtype == torch.bool
    return not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool


def _cap(items: list[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
