"""`latentdiff info` (versions, devices, dtype support) and `latentdiff models` (built-in models, registered
components, samplers and pipelines)."""
from __future__ import annotations

import argparse

from ..version import __version__


def add_info_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="versions, devices and dtype support")
    sub.add_parser("models", help="built-in models, registered components, samplers and pipelines")


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    print(f"latentdiff {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for name in ("transformers", "accelerate", "safetensors", "huggingface_hub", "diffusers"):
        try:
            from importlib.metadata import version

            print(f"{name} {version(name)}")
        except Exception:
            print(f"{name} not installed")
    print(f"cpu threads: {torch.get_num_threads()}; bf16 matmul on cpu: supported")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}, bf16: {torch.cuda.is_bf16_supported()}")
    else:
        print("cuda: not available")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..builtin import BUILTIN_MODELS, ROOT, builtin_names, builtin_path
    from ..registry import COMPONENTS, PIPELINES, SAMPLERS

    for name in builtin_names():
        folder = builtin_path(name)
        where = f"installed at {folder}" if folder else f"not installed (no {ROOT / BUILTIN_MODELS[name]})"
        print(f"built-in model {name}: {where}")
    for registry in (COMPONENTS, SAMPLERS, PIPELINES):
        print(f"{registry.kind}s: {', '.join(registry.names())}")
    return 0
