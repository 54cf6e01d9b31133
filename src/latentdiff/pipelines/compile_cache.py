"""Where `pipe.compile()` keeps what it compiled, so that the next process starts warm.

torch.compile's inductor caches each compiled graph (the FX graph cache) and its AOT-autograd wrapper on disk,
keyed by the graph, the input shapes and dtypes, the torch version and the options, and reuses them in a later
process: the first compile of an SD 1.5 UNet on a CPU takes minutes, a warm one a fraction of that (docs/fast.md
"## CPU" has the numbers). By default inductor writes to /tmp/torchinductor_<user>, which a reboot or a
container's fresh /tmp empties; latentdiff points it at its own cache folder instead:

1. `TORCHINDUCTOR_CACHE_DIR` when set (by the user, or by torch after an earlier compile in this process);
2. else `LATENTDIFF_COMPILE_CACHE`;
3. else `$XDG_CACHE_HOME/latentdiff/inductor` (default `~/.cache/latentdiff/inductor`).

Delete the folder to start cold; nothing in it is needed for correctness.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "LATENTDIFF_COMPILE_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    """`LATENTDIFF_COMPILE_CACHE`, else `$XDG_CACHE_HOME/latentdiff/inductor` (XDG's default `~/.cache`)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "latentdiff" / "inductor"


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn on inductor's on-disk caches and point them at `cache_dir` (None: the order in the module docstring);
    -> the folder in use. An explicit `cache_dir` wins over the environment."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if cache_dir is not None:
        os.environ[INDUCTOR_ENV] = str(Path(cache_dir).expanduser().resolve())
    elif not os.environ.get(INDUCTOR_ENV):
        os.environ[INDUCTOR_ENV] = str(default_cache_dir().resolve())
    folder = Path(os.environ[INDUCTOR_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder
