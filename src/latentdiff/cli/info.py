"""`latentdiff info` (versions, devices, dtype support) and `latentdiff models` (built-in models, registered
components, samplers and pipelines, and every sampler name and schedule `generate` accepts)."""
from __future__ import annotations

import argparse

from ..version import __version__


def add_info_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="versions, devices and dtype support")
    sub.add_parser("models", help="built-in models, registered components, samplers and pipelines")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_bf16(flags: set[str] | None) -> str:
    """What bf16 costs on this CPU, from its flags: AMX tiles or AVX512-BF16 run bf16 matmuls natively (oneDNN);
    without them torch converts to fp32 and back, so bf16 works but is slower than fp32."""
    if flags is None:
        return "unknown (no CPU flags to read on this system)"
    native = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    if native:
        return f"native ({', '.join(native)})"
    if "bf16" in flags:   # an Arm CPU with the BF16 extension
        return "native (Arm BF16)"
    return "emulated (no AMX-BF16 / AVX512-BF16: works, slower than fp32; use float32 on this CPU)"


def bf16_works() -> bool:
    """A bf16 matmul runs here and agrees with fp32 to bf16's precision."""
    import torch

    a = torch.linspace(-1, 1, 64).reshape(8, 8)
    try:
        got = (a.bfloat16() @ a.bfloat16()).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(got, a @ a, rtol=2e-2, atol=2e-2))


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
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    print(f"cpu: {platform.processor() or platform.machine()}, {cores} cores available, torch uses "
          f"{torch.get_num_threads()} threads (set with OMP_NUM_THREADS or torch.set_num_threads), "
          f"kernels: {capability}")
    works = "works" if bf16_works() else "FAILS"
    print(f"bf16 on cpu: {cpu_bf16(cpu_flags())}; a bf16 matmul {works}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            bf16 = "native" if major >= 8 else "emulated (compute capability < 8.0)"
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}, bf16: {bf16}")
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
    from ..diffusion.samplers.names import accepted_names

    for registry in (COMPONENTS, SAMPLERS, PIPELINES):
        print(f"{registry.kind}s: {', '.join(registry.names())}")
    print("sampler names `generate --sampler` accepts (any case, spaces and punctuation ignored):")
    for group, names in accepted_names().items():
        print(f"  {group}: {', '.join(names)}")
    return 0
