"""Faster and lighter sampling: attention slicing, CPU offload through accelerate hooks, torch.compile.

The pipeline methods (`DenoisingPipeline.enable_attention_slicing`, `enable_model_cpu_offload`,
`enable_sequential_cpu_offload`, `disable_cpu_offload`, `compile`) call these functions; they change how the
networks run, never what they compute:

* attention slicing: SDPA over chunks of the query rows (`layers.attention`), the same result to float
  rounding with a score buffer a fraction of the size.
* model CPU offload: every network stays in CPU memory and moves whole to the execution device when it is
  called, the one that ran before going back: one network on the accelerator at a time (text encoder, then
  the UNet for all steps, then the autoencoder), at the cost of one host-device copy of each per image.
* sequential CPU offload: the UNet's and the autoencoder's weights live on the CPU (their parameters become
  meta tensors) and each leaf layer's weights are copied to the device just for its own forward
  (`accelerate.cpu_offload`): the least memory, many copies per step. Conditioning encoders (text encoder,
  class embedder) are offloaded whole, as in model offload: they read their weights' device to place token
  ids, and they run once per image.
* compile: `torch.compile` of the UNet forward with fullgraph=True and dynamic=False (one static graph per
  latent shape and batch: a new prompt or seed reuses it, a new size compiles another), and on CUDA
  (mode="auto", the default, or "reduce-overhead") the step replays as a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InputError
from ..layers.attention import set_attention_chunking
from ..layers.prepacked import is_int8, unpack_convolutions, unpack_linears
from ..utils.devices import check_device
from .compile_cache import use_compile_cache

# Score-matrix budget of attention slicing "auto": 512 MiB per SDPA call (a 1024 px SD self-attention at
# batch 2 needs 2 x 8 x 16384^2 x 2 bytes = 8 GiB without it).
DEFAULT_MAX_BYTES = 512 * 2**20
# First-stage methods the pipelines call instead of forward: model offload must move the module for them too.
ENTRY_POINTS: tuple[str, ...] = ("encode", "decode", "encode_latents", "decode_latents")
CUDA_GRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")


# ---- attention slicing ------------------------------------------------------------------------------------
def enable_attention_slicing(pipe: Any, chunk_size: int | Literal["auto"] = "auto", *,
                             max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """chunk_size: query rows per SDPA call in every attention layer; "auto": only a call whose (B, heads, N, M)
    scores exceed max_bytes is chunked, in the largest chunks that fit."""
    if chunk_size == "auto":
        options = dict(chunk_size=None, max_bytes=max_bytes)
    else:
        options = dict(chunk_size=chunk_size, max_bytes=None)
    for module in pipe.networks():
        set_attention_chunking(module, **options)


def disable_attention_slicing(pipe: Any) -> None:
    for module in pipe.networks():
        set_attention_chunking(module)


# ---- CPU offload --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Offload:
    """A pipeline's offload: its kind, the device the networks run on, and the network now resident there."""

    mode: Literal["model", "sequential"]
    execution_device: torch.device
    resident: nn.Module | None = None

    def load(self, module: nn.Module) -> None:
        """Move `module` to the execution device, and the network resident there before it back to the CPU."""
        if self.resident is module:
            return
        if self.resident is not None:
            self.resident.to("cpu")
        module.to(self.execution_device)
        self.resident = module


def _hook_class() -> type:
    from accelerate.hooks import ModelHook, send_to_device

    class ModelOffloadHook(ModelHook):
        """Before the module's forward: make it the resident network, and move the inputs to its device."""

        def __init__(self, offload: Offload):
            super().__init__()
            self.offload = offload

        def init_hook(self, module: nn.Module) -> nn.Module:
            return module.to("cpu")

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            self.offload.load(module)
            device = self.offload.execution_device
            return send_to_device(args, device), send_to_device(kwargs, device)

    return ModelOffloadHook


def execution_device(pipe: Any) -> torch.device | None:
    """The device the networks of an offloaded pipeline run on; None without offload."""
    offload = pipe.__dict__.get("_offload")
    return offload.execution_device if offload is not None else None


def enable_cpu_offload(pipe: Any, *, mode: Literal["model", "sequential"],
                       device: str | torch.device | None = None) -> None:
    """Offload the pipeline's networks to the CPU, running each on `device` (None: the current accelerator)."""
    target = _execution_device(device)
    if _is_compiled(pipe.unet):
        raise InputError("a compiled pipeline cannot be offloaded: the hooks would break the compiled graph",
                         where="enable_cpu_offload", expected="offload or compile, not both", found="compiled UNet")
    disable_cpu_offload(pipe)
    from accelerate import cpu_offload
    from accelerate.hooks import add_hook_to_module

    offload = Offload(mode, target)
    hook = _hook_class()
    for module in pipe.networks():
        if mode == "sequential" and module in (pipe.unet, pipe.vae):
            cpu_offload(module, execution_device=target)
            continue
        add_hook_to_module(module, hook(offload))
        for name in ENTRY_POINTS:
            if callable(getattr(module, name, None)):
                setattr(module, name, _loading(offload, module, getattr(module, name)))
    pipe.__dict__["_offload"] = offload


def _loading(offload: Offload, module: nn.Module, method: Any) -> Any:
    """`method` of `module`, made to load the module first (an instance attribute, removed by disable)."""
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        offload.load(module)
        return method(*args, **kwargs)

    call.offload_original = method  # type: ignore[attr-defined]  # a marker on the wrapper, read by disable
    return call


def disable_cpu_offload(pipe: Any) -> None:
    """Remove the offload hooks; every network is back on the CPU with its weights (call `to()` after)."""
    offload = pipe.__dict__.pop("_offload", None)
    if offload is None:
        return
    from accelerate.hooks import remove_hook_from_module

    for module in pipe.networks():
        remove_hook_from_module(module, recurse=True)
        module.__dict__.pop("forward", None)          # accelerate leaves the old forward as an attribute
        for name in ENTRY_POINTS:
            if hasattr(module.__dict__.get(name), "offload_original"):
                del module.__dict__[name]
        module.to("cpu")


def _execution_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            raise InputError("CPU offload needs a device to run on, and there is no accelerator", where="device",
                             expected='device="cuda" (or any torch device)', found=None)
        return accelerator
    return check_device(device)


# ---- torch.compile ----------------------------------------------------------------------------------------
def compile_unet(pipe: Any, *, mode: str | None = "auto", backend: Any = "inductor", fullgraph: bool = True,
                 dynamic: bool = False, options: dict[str, Any] | None = None) -> None:
    """Compile the UNet's forward (see the module docstring). Compiling again replaces the compiled forward.
    mode "auto": "reduce-overhead" (each step a CUDA-graph replay) for the inductor backend on a CUDA UNet,
    else torch.compile's default."""
    if pipe.__dict__.get("_offload") is not None:
        raise InputError("an offloaded pipeline cannot be compiled: the hooks move weights inside the graph",
                         where="compile", expected="pipe.disable_cpu_offload() first, or no offload",
                         found=f"{pipe.__dict__['_offload'].mode} CPU offload")
    unet = pipe.unet
    if any(is_int8(m) for m in unet.modules()):
        raise InputError("an int8-static UNet cannot be compiled: its oneDNN int8 layers are opaque to the "
                         "compiler", where="compile", expected="cpu_paths.dequantize(pipe) first, or no compile",
                         found="int8-static layers (quantize(pipe, 'int8-static'))")
    if unpack_convolutions(unet) + unpack_linears(unet):
        warnings.warn("compile: the UNet's prepacked layers (optimize_for_cpu) run as plain layers in the compiled "
                      "graph (inductor packs its own weights); on a CPU the eager packed UNet is faster "
                      "(docs/fast.md \"CPU\")", RuntimeWarning, stacklevel=2)
    if mode == "auto":
        mode = "reduce-overhead" if unet.device.type == "cuda" and backend == "inductor" and not options else None
    unet.__dict__.pop("forward", None)
    if backend == "inductor":
        use_compile_cache()   # compiled graphs kept on disk for the next process (pipelines/compile_cache.py)
    unet.forward = CompiledForward(unet, dict(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                                              options=options))


class CompiledForward:
    """A UNet's compiled forward, held in its `__dict__` (what `compile_unet` sets). torch.compile wraps the
    forward bound to that UNet: a deep copy of the UNet (or of its pipeline) gets a forward of its own, compiled
    the same way from the copy's forward on its first call (`lazy`: while the UNet is being copied its attributes
    are not there yet), where a copied wrapper would run the original's blocks and weights (a copy with token
    merging switched off kept merging, with the original's settings)."""

    latentdiff_compiled = True   # the marker `_is_compiled` reads

    def __init__(self, unet: nn.Module, settings: dict[str, Any], *, lazy: bool = False):
        self.unet, self.settings = unet, settings
        self.compiled = None if lazy else _compiled_forward(unet, **settings)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            self.compiled = _compiled_forward(self.unet, **self.settings)
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledForward:
        copied = memo.get(id(self.unet))   # deepcopy records the UNet's copy before copying its attributes
        if copied is None:                 # the forward copied on its own: it still runs this UNet
            return self
        return CompiledForward(copied, self.settings, lazy=True)


def _compiled_forward(unet: nn.Module, *, mode: str | None, backend: Any, fullgraph: bool, dynamic: bool,
                      options: dict[str, Any] | None) -> Any:
    """torch.compile of `unet`'s class forward, bound to `unet` (not the instance attribute, which holds this)."""
    forward = types.MethodType(type(unet).forward, unet)
    compiled = torch.compile(forward, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                             options=options)
    if mode in CUDA_GRAPH_MODES and unet.device.type == "cuda":
        compiled = _graph_safe(compiled)
    return compiled


def _graph_safe(compiled: Any) -> Any:
    """A CUDA-graph replay writes its outputs into the same static memory each time, and multistep samplers
    keep earlier predictions (PLMS's eps history): each call starts a new graph step and returns a copy."""
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs).clone()

    return forward


def _is_compiled(unet: nn.Module) -> bool:
    return getattr(unet.__dict__.get("forward"), "latentdiff_compiled", False)


def uncompile(pipe: Any) -> None:
    """The UNet's eager forward again."""
    if _is_compiled(pipe.unet):
        del pipe.unet.__dict__["forward"]
