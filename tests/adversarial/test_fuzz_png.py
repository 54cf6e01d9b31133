"""Fuzz what `latentdiff generate` reads back from files it did not write: the generation parameters in a PNG's
text chunk (`--from`) and a model folder's `latentdiff_generate.json`. Whatever the values (wrong types, huge
or non-finite numbers, nesting, text that is not JSON), settling them raises only latentdiff's own errors, and
quickly. In-process: the settings are parsed and checked, no model is loaded or run.

Reproducible: derandomized, a fixed number of examples, a per-example deadline.
"""
from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from latentdiff.builtin import GENERATE_SETTINGS
from latentdiff.cli.generate_model import SETTINGS_KEYS, locate_model
from latentdiff.cli.generate_settings import RECORDED, plan_jobs, read_from_png, settle
from latentdiff.cli.main import build_parser as _build_parser
from latentdiff.errors import LatentDiffError
from latentdiff.utils.images import PARAMS_KEY

pytestmark = pytest.mark.outcome("clear_error", fails_as="crash")

FUZZ = settings(max_examples=100, derandomize=True, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# values JSON can hold, biased to the edges: huge and negative ints, non-finite floats, wrong types, nesting
numbers = st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**63, 10**30, 10**400]),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20),
                    st.sampled_from(["ddim", "euler", "fp16", "latentdiff/shapes-64", "../x", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
EDGE_VALUES = [10**400, -10**400, 2**63, 2**64, 10**30, -1, 0, 1e308, -0.0, float("nan"), float("inf"), True, "1",
               "", "x" * 1000, [], [1], {}, {"a": 1}, None]
EDGES = st.sampled_from(EDGE_VALUES)
BASE = {"prompt": "a red circle", "seed": 0, "n": 1, "model": "latentdiff/shapes-64"}


build_parser = functools.cache(_build_parser)   # parsing is cheap, building the parser is not (10 ms)


@pytest.fixture(scope="module")
def source():
    return locate_model("latentdiff/shapes-64")


def _png(folder: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, text)
    path = folder / "in.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def _settle_from(path: Path, source, folder: Path) -> None:
    args = build_parser().parse_args(["generate", "--from", str(path), "-o", str(folder / "out.png")])
    stored = read_from_png(str(path))
    plan_jobs(args, settle(args, stored, source))


def _only_ours(run) -> None:
    with contextlib.suppress(LatentDiffError):
        run()


@FUZZ
@given(key=st.sampled_from([*RECORDED, "latentdiff", "batch"]), value=st.one_of(EDGES, values))
def test_fuzz_one_png_parameter_raises_only_latentdiff_errors(source, key, value):
    # one value changed at a time: a bad earlier setting would hide the later ones (they are checked in order)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _png(folder, json.dumps({**BASE, key: value}))
        _only_ours(lambda: _settle_from(path, source, folder))


@FUZZ
@given(changes=st.fixed_dictionaries({}, optional={key: values for key in (*RECORDED, "latentdiff", "batch")}))
def test_fuzz_png_parameters_raise_only_latentdiff_errors(source, changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _png(folder, json.dumps({**BASE, **changes}))
        _only_ours(lambda: _settle_from(path, source, folder))


def test_every_png_parameter_at_every_edge_value_raises_only_latentdiff_errors(source, tmp_path):
    """The exhaustive table behind the fuzz: each recorded setting at each edge value (one PNG each)."""
    for key in (*RECORDED, "latentdiff", "batch"):
        for value in EDGE_VALUES:
            path = _png(tmp_path, json.dumps({**BASE, key: value}))
            try:
                _settle_from(path, source, tmp_path)
            except LatentDiffError:
                pass
            except Exception as e:  # noqa: BLE001 (the point: name the input that let a foreign error out)
                raise AssertionError(f"{key} = {value!r}: {type(e).__name__}: {e}") from None


@FUZZ
@given(text=st.one_of(st.text(max_size=200), values.map(json.dumps),
                      st.integers(1, 5000).map(lambda d: "[" * d + "]" * d)))
def test_fuzz_png_parameter_text_that_is_not_a_settings_object(source, text):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _png(folder, text or " ")
        _only_ours(lambda: _settle_from(path, source, folder))


@FUZZ
@given(data=st.one_of(st.fixed_dictionaries({}, optional={key: values for key in (*SETTINGS_KEYS, "_c", "other")}),
                      values))
def test_fuzz_generate_json_values_raise_only_latentdiff_errors(source, data):
    from latentdiff.cli.generate_model import ModelSource, read_settings

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / GENERATE_SETTINGS).write_text(json.dumps(data))

        def run() -> None:
            model = ModelSource(source.name, source.kind, source.path, read_settings(folder))
            args = build_parser().parse_args(["generate", "x", "-o", str(folder / "out.png")])
            plan_jobs(args, settle(args, {}, model))

        _only_ours(run)
