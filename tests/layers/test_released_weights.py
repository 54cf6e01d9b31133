"""Weights released into their packed copies (layers/prepacked.py `release=True`, what
`optimize_for_cpu(pipe, keep_weights=False)` and `--optimize-cpu` do) changed or read in place.

What is proven, for a Conv2d and a Linear, in float32 and bfloat16, against a plain twin changed the same way:
* every in-place change (`weight.detach().zero_()`, `mul_`, `copy_`, `.data.copy_`, `.data.mul_`, `.data = `,
  `nn.init.normal_`, `torch._foreach_add_`, an SGD and an Adam step) acts on the plain weight: the same Parameter
  object, state_dict equal to the twin's bit for bit, and the next call packs the changed weight (equal bit for
  bit to a packed layer holding the twin's weights) and releases it again;
* reads of the values (`sum()`, `copy.deepcopy`, pickling) give the twin's values, and the layer packs again;
* a weight that cannot be turned back (a weak reference made to it after the release) raises a latentdiff error
  naming the layer, `restore_weights(module)` and `keep_weights=True`, and is left unchanged;
* a weight holding a gradient (a preview between backward and the optimizer's step) is not released, which
  would drop the gradient: the step takes (SGD, Adam: equal to a plain layer's), and it is released after
  `zero_grad()`.
Each dtype runs in a subprocess (tests/_support/released_changes.py): before, a bf16 `zero_()` of a released
weight ran oneDNN's kernel, which writes float32s over twice the weight's bytes and aborted the interpreter.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import latentdiff
from latentdiff.layers.prepacked import prepack_linears
from tests._support.parity import max_rel_error
from tests._support.released_changes import CHANGES, KINDS, READS

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("float32", "bfloat16")
_RUNS: dict[str, tuple[dict[str, dict[str, Any]], str]] = {}


def results(dtype: str) -> tuple[dict[str, dict[str, Any]], str]:
    """The child's cases for `dtype` by name, and how it ended (its exit status and stderr's tail); run once."""
    if dtype not in _RUNS:
        # the latentdiff this test imports, and the tests package
        path = os.pathsep.join([str(Path(latentdiff.__file__).parents[1]), str(ROOT)])
        code = f"from tests._support.released_changes import main; main({dtype!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": path})
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        _RUNS[dtype] = {line.pop("case"): line for line in lines}, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return _RUNS[dtype]


def case(dtype: str, name: str) -> dict[str, Any]:
    found, ended = results(dtype)
    assert name in found, f"the child process died before {name} ({dtype}); {ended}"
    return found[name]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_in_place_change_of_a_released_weight_acts_on_the_plain_weight(dtype, change, kind):
    result = case(dtype, f"change:{change}:{kind}")
    assert result == {"error": None, "same_object": True, "values_equal": True, "forward_equal": True,
                      "packed_again": True}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_read_of_a_released_weight_gets_the_plain_values(dtype, read, kind):
    result = case(dtype, f"read:{read}:{kind}")
    assert result == {"error": None, "values_equal": True, "forward_equal": True, "packed_again": True}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_released_weight_that_cannot_be_turned_back_raises_before_any_change(dtype, kind):
    result = case(dtype, f"referenced:weakref:{kind}")
    assert result["latentdiff_error"] and result["values_equal"], result
    error = result["error"]
    assert "restore_weights(module)" in error and "keep_weights=True" in error, error
    assert f"where: {'Conv2d(8, 16' if kind == 'conv' else 'Linear(in_features=24'}" in error, error


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_a_weight_holding_a_gradient_is_not_released_so_the_optimizer_step_after_a_preview_takes(optimizer):
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 16), torch.randn(5, 24)
    plain = copy.deepcopy(layer)
    prepack_linears(layer, release=True)
    for net in (layer, plain):
        net(x).square().sum().backward()   # training: the plain layer (autograd)
    with torch.no_grad():
        preview = layer(x)                 # a preview between backward and step: packed, the weight kept
    assert layer.weight.grad is not None and not layer.weight.is_mkldnn
    for net in (layer, plain):
        optimizer(net.parameters(), lr=0.1).step()
    assert torch.equal(layer.weight, plain.weight) and not torch.equal(layer.weight, layer.bias.new_zeros(1))
    layer.zero_grad()
    with torch.no_grad():
        assert max_rel_error(layer(x), plain(x)) <= 1e-5 and not torch.equal(layer(x), preview)
    assert layer.weight.is_mkldnn   # no gradient left: released


def test_the_child_process_ends_cleanly():
    """After every case (and a last round of allocations), the heap is whole: the child exits 0."""
    for dtype in DTYPES:
        found, ended = results(dtype)
        assert ended.startswith("exit 0:"), ended
        assert len(found) == len(KINDS) * (len(CHANGES) + len(READS) + 1)
