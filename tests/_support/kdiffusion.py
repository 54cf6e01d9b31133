"""k-diffusion's `sampling.py` as a test oracle, without the rest of the package.

k-diffusion 0.1.1's `__init__` imports its training stack (torchvision, wandb, clip ...), and its `sampling` module
needs only `utils.append_dims` of it. `k_sampling()` loads the installed `k_diffusion/sampling.py` under a stand-in
package whose `utils` has that one function (`k_external()` loads its `external.py` beside it), or returns None when
k-diffusion (installed without its dependencies: `pip install k-diffusion==0.1.1.post1 --no-deps torchsde
torchdiffeq`) or torchsde / torchdiffeq is missing.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from typing import Any


def _append_dims(x: Any, target_dims: int) -> Any:
    """k-diffusion's `utils.append_dims`: trailing singleton dimensions up to target_dims."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


@functools.cache
def k_sampling() -> types.ModuleType | None:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for needed in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(needed) is None:
            return None
    root = list(spec.submodule_search_locations)[0]
    name = "_kdiffusion_oracle"
    package = types.ModuleType(name)
    package.__path__ = [root]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims   # type: ignore[attr-defined]
    sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    package.utils = utils   # type: ignore[attr-defined]
    loaded = importlib.util.spec_from_file_location(f"{name}.sampling", f"{root}/sampling.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    sys.modules[f"{name}.sampling"] = module
    loaded.loader.exec_module(module)
    package.sampling = module   # type: ignore[attr-defined]
    return module


@functools.cache
def k_external() -> types.ModuleType | None:
    """k-diffusion's `external.py` (the model wrappers: `DiscreteSchedule.get_sigmas`, k-diffusion's uniform grid,
    which A1111 calls "Uniform"), loaded beside `k_sampling()`'s module; None where that is None."""
    sampling = k_sampling()
    if sampling is None:
        return None
    name, root = "_kdiffusion_oracle", sys.modules["_kdiffusion_oracle"].__path__[0]
    loaded = importlib.util.spec_from_file_location(f"{name}.external", f"{root}/external.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    sys.modules[f"{name}.external"] = module
    loaded.loader.exec_module(module)
    return module
