"""The child process of tests/layers/test_released_weights.py: every way of changing (or reading) a weight that a
prepacked layer released into its packed copy (`release=True`, `optimize_for_cpu(keep_weights=False)`), done to
the released layer and to a plain twin, one JSON line per case on stdout.

A released weight changed by oneDNN's own in-place kernels corrupted the heap (bf16 `zero_()` writes float32s over
twice its bytes), which kills the process, so the test runs this in a subprocess and reads what it printed.
Run: `python -c "from tests._support.released_changes import main; main('bfloat16')"`.
"""
from __future__ import annotations

import copy
import json
import pickle
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from latentdiff.errors import LatentDiffError
from latentdiff.layers.prepacked import prepack_convolutions, prepack_linears, restore_weights


def _step(optimizer: type[torch.optim.Optimizer], **options: Any) -> Callable[[nn.Parameter, torch.Tensor], Any]:
    def step(weight: nn.Parameter, other: torch.Tensor) -> None:
        weight.grad = other.clone()
        stepping = optimizer([weight], **options)
        stepping.step()
        stepping.zero_grad()   # (a weight holding a gradient stays plain: prepacked._Packed)
    return step


def _no_grad(change: Callable[[nn.Parameter, torch.Tensor], Any]) -> Callable[[nn.Parameter, torch.Tensor], Any]:
    def changed(weight: nn.Parameter, other: torch.Tensor) -> Any:
        with torch.no_grad():
            return change(weight, other)
    return changed


# name -> change(weight, other): what a user does to `layer.weight`; the same on the plain twin
CHANGES: dict[str, Callable[[nn.Parameter, torch.Tensor], Any]] = {
    "detach().zero_()": lambda w, o: w.detach().zero_(),
    "mul_ (no_grad)": _no_grad(lambda w, o: w.mul_(2)),
    "copy_ (no_grad)": _no_grad(lambda w, o: w.copy_(o)),
    "data.copy_": lambda w, o: w.data.copy_(o),
    "data.mul_": lambda w, o: w.data.mul_(-0.5),
    "data = ": lambda w, o: setattr(w, "data", o.clone()),
    "nn.init.normal_": lambda w, o: nn.init.normal_(w, generator=torch.Generator().manual_seed(1)),
    "_foreach_add_ (no_grad)": _no_grad(lambda w, o: torch._foreach_add_([w], [o])),
    "SGD step": _step(torch.optim.SGD, lr=0.1, momentum=0.9),
    "Adam step": _step(torch.optim.Adam, lr=0.01),
}
# name -> read(weight): values read from the weight itself (compared with the same read of the plain twin)
READS: dict[str, Callable[[nn.Parameter], torch.Tensor]] = {
    "sum()": lambda w: w.sum(),
    "copy.deepcopy": lambda w: copy.deepcopy(w),
    "pickle": lambda w: pickle.loads(pickle.dumps(w)),
}
KINDS = ("conv", "linear")


def _layers(kind: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(layer released into its packed copy, its plain twin, an input)."""
    torch.manual_seed(0)
    if kind == "conv":
        plain, x = nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 8, 8)
    else:
        plain, x = nn.Linear(24, 16), torch.randn(5, 24)
    plain, x = plain.to(dtype), x.to(dtype)
    layer = copy.deepcopy(plain)
    prepack_convolutions(layer, release=True), prepack_linears(layer, release=True)
    with torch.no_grad():
        layer(x)   # packs, and releases the plain weight
    assert layer.weight.is_mkldnn, "not released"
    return layer, plain, x


def _packed_result(plain: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a packed layer with the plain twin's weights computes (packed beside them, nothing released)."""
    fresh = copy.deepcopy(plain)
    prepack_convolutions(fresh), prepack_linears(fresh)
    with torch.no_grad():
        return fresh(x)


def _error(change: Callable[[], Any]) -> str | None:
    try:
        change()
    except Exception as error:   # reported, not raised: the parent test says what was expected
        return f"{type(error).__name__}: {error}"
    return None


def _churn() -> None:
    """Allocate and free: a heap corrupted by the case before aborts here (glibc's checks), not later."""
    for size in range(64, 4096, 64):
        torch.empty(size).fill_(1.0)
    [torch.empty(n, n) for n in range(1, 200)].clear()


def change_case(name: str, kind: str, dtype: torch.dtype) -> dict[str, Any]:
    layer, plain, x = _layers(kind, dtype)
    weight = layer.weight
    other = torch.randn(plain.weight.shape).to(dtype)
    error = _error(lambda: CHANGES[name](layer.weight, other))
    CHANGES[name](plain.weight, other)
    _churn()
    with torch.no_grad():
        out = layer(x)   # packs the changed weight (and releases it) again
    state, expected = layer.state_dict(), plain.state_dict()
    return {"error": error, "same_object": layer.weight is weight, "packed_again": layer.weight.is_mkldnn,
            "values_equal": all(torch.equal(state[k], expected[k]) for k in expected),
            "forward_equal": torch.equal(out, _packed_result(plain, x))}


def read_case(name: str, kind: str, dtype: torch.dtype) -> dict[str, Any]:
    layer, plain, x = _layers(kind, dtype)
    found: list[torch.Tensor] = []
    error = _error(lambda: found.append(READS[name](layer.weight)))
    _churn()
    with torch.no_grad():
        out = layer(x)
    return {"error": error, "values_equal": bool(found) and torch.equal(found[0], READS[name](plain.weight)),
            "packed_again": layer.weight.is_mkldnn, "forward_equal": torch.equal(out, _packed_result(plain, x))}


def referenced_case(kind: str, dtype: torch.dtype) -> dict[str, Any]:
    """A weak reference to a released weight (made after the release) keeps it from being turned back: the change
    must raise before it touches anything."""
    layer, plain, x = _layers(kind, dtype)
    reference = weakref.ref(layer.weight)
    error = _error(lambda: layer.weight.detach().zero_())
    _churn()
    del reference
    restore_weights(layer)   # nothing references it now
    return {"error": error, "latentdiff_error": error is not None and error.split(":")[0] in _latentdiff_errors(),
            "values_equal": torch.equal(layer.weight, plain.weight)}


def _latentdiff_errors() -> set[str]:
    found, todo = set(), [LatentDiffError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found


def main(dtype_name: str) -> None:
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    cases = [("change", name, kind) for name in CHANGES for kind in KINDS]
    cases += [("read", name, kind) for name in READS for kind in KINDS]
    cases += [("referenced", "weakref", kind) for kind in KINDS]
    for what, name, kind in cases:
        if what == "change":
            result = change_case(name, kind, dtype)
        elif what == "read":
            result = read_case(name, kind, dtype)
        else:
            result = referenced_case(kind, dtype)
        print(json.dumps({"case": f"{what}:{name}:{kind}", **result}), flush=True)
    _churn()


if __name__ == "__main__":
    main(sys.argv[1])
