"""Fuzzing the file readers (issue 14): mutated safetensors headers (bytes and JSON structure), config.json
contents and single-file metadata must load or fail with one of latentdiff's exception types, each within a
time bound; nothing else may come out (no KeyError, TypeError, RuntimeError, AssertionError ...).

Derandomized (the same examples every run) and small: ~200 examples in all, a few seconds. Integer values stay
small: sizes that cost memory are the subject of the bounds cases, not of this file."""
from __future__ import annotations

import contextlib
import json
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentdiff.errors import LatentDiffError
from latentdiff.models.autoencoder_kl import AutoencoderKL
from tests._support.malformed import read_safetensors, saved_metadata, tiny_files, with_metadata, write_safetensors

SECONDS_PER_EXAMPLE = 5.0  # a tiny model: a load takes milliseconds; this catches hangs, not slowness
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every shape, integers kept small (see the module doc)
scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True) | \
    st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    found = tiny_files(root)
    found["work"] = root / "work"
    return found


def load_or_latentdiff_error(load):
    """Run `load`; only success or a LatentDiffError may come out, within SECONDS_PER_EXAMPLE."""
    start = time.monotonic()
    with contextlib.suppress(LatentDiffError):
        load()
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS_PER_EXAMPLE, f"took {elapsed:.1f} s"


def fresh_folder(files):
    """A copy of the tiny model folder to break (weights and config)."""
    folder = files["work"]
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(files["folder"], folder)
    return folder


# ---- safetensors headers ------------------------------------------------------------------------------------------
@pytest.mark.outcome("clear_error", fails_as="crash")
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_safetensors_header_bytes(files, data):
    """Bytes of the header overwritten, or the file cut short, or the length prefix changed."""
    raw = bytearray(files["weights"].read_bytes())
    n = int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["overwrite", "truncate", "length"]))
    if kind == "overwrite":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    folder = fresh_folder(files)
    (folder / files["weights"].name).write_bytes(bytes(raw))
    load_or_latentdiff_error(lambda: AutoencoderKL.from_pretrained(folder))


@pytest.mark.outcome("clear_error", fails_as="crash")
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_safetensors_header_structure(files, data):
    """One tensor entry (or one of its fields, or the metadata, or the whole header) replaced by any JSON."""
    header, payload = read_safetensors(files["weights"])
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    target = data.draw(st.sampled_from(["entry", "dtype", "shape", "data_offsets", "drop-field", "metadata",
                                        "header", "offsets-range"]))
    if target == "entry":
        header[name] = data.draw(json_values)
    elif target in ("dtype", "shape", "data_offsets"):
        header[name] = {**header[name], target: data.draw(json_values)}
    elif target == "drop-field":
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name] = {k: v for k, v in header[name].items() if k != field}
    elif target == "metadata":
        header["__metadata__"] = data.draw(json_values)
    elif target == "offsets-range":
        header[name] = {**header[name], "data_offsets": [data.draw(st.integers(-2, 10**6)) for _ in range(2)]}
    else:
        header = data.draw(json_values)
    folder = fresh_folder(files)
    write_safetensors(folder / files["weights"].name, header, payload)
    load_or_latentdiff_error(lambda: AutoencoderKL.from_pretrained(folder))


# ---- config.json -----------------------------------------------------------------------------------------------------
@pytest.mark.outcome("clear_error", fails_as="crash")
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_config_json(files, data):
    """A key of config.json set to any JSON value, deleted, or added; or the whole file replaced."""
    config = json.loads((files["folder"] / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)))
    change = data.draw(st.sampled_from(["set", "delete", "add", "replace"]))
    if change == "set":
        config[key] = data.draw(json_values)
    elif change == "delete":
        del config[key]
    elif change == "add":
        config[data.draw(st.text(min_size=1, max_size=10))] = data.draw(json_values)
    else:
        config = data.draw(json_values)
    folder = fresh_folder(files)
    (folder / "config.json").write_text(json.dumps(config))
    load_or_latentdiff_error(lambda: AutoencoderKL.from_pretrained(folder))


# ---- single-file metadata --------------------------------------------------------------------------------------
@pytest.mark.outcome("clear_error", fails_as="crash")
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_single_file_metadata(files, data):
    """latentdiff's metadata entry of a single file: a config key, a top-level key or the whole of it changed."""
    header, payload = read_safetensors(files["single"])
    described = saved_metadata(header)
    where = data.draw(st.sampled_from(["part-key", "part", "top", "whole", "text"]))
    if where == "part-key":
        vae = described["configs"]["vae"]
        key = data.draw(st.sampled_from(sorted(vae)))
        if data.draw(st.booleans()):
            vae[key] = data.draw(json_values)
        else:
            del vae[key]
    elif where == "part":
        described["configs"][data.draw(st.sampled_from(["vae", "unet", "text_encoder", "scheduler", "x"]))] = \
            data.draw(json_values)
    elif where == "top":
        described[data.draw(st.sampled_from(["configs", "family", "format_version"]))] = data.draw(json_values)
    elif where == "whole":
        described = data.draw(json_values)
    else:
        described = data.draw(st.text(max_size=40))
    path = write_safetensors(files["work"].parent / "single.safetensors", with_metadata(header, described), payload)
    load_or_latentdiff_error(lambda: AutoencoderKL.from_single_file(path))


# ---- the parameters of a PNG read back by `latentdiff generate --from` ------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tests._support.tiny_builtin import make_tiny_shapes_model

    return make_tiny_shapes_model(tmp_path_factory.mktemp("fuzz-model") / "shapes-64")


RECORDED_KEYS = ("prompt", "negative", "seed", "steps", "guidance", "sampler", "eta", "height", "width", "n",
                 "model", "dtype", "tokenizer", "latentdiff", "batch")


@pytest.mark.outcome("clear_error", fails_as="crash")
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_png_parameters(files, model_folder, data):
    """The settings `--from` reads from a PNG: any JSON in any recorded key (huge integers included: they are
    checked before anything is built), the model the tiny folder. Only checking runs here, no generation."""
    from PIL import Image

    from latentdiff.cli.generate_model import locate_model
    from latentdiff.cli.generate_settings import read_from_png, settle
    from latentdiff.cli.main import build_parser
    from latentdiff.utils.images import save_png

    params = {"prompt": "a red circle", "seed": 0, "n": 1, "model": str(model_folder)}
    for key in data.draw(st.lists(st.sampled_from(RECORDED_KEYS), min_size=1, max_size=3, unique=True)):
        params[key] = data.draw(json_values | st.integers(-10**30, 10**30))
    path = save_png(Image.new("RGB", (4, 4)), files["work"].parent / "params.png", params=params)
    args = build_parser().parse_args(["generate", "--from", str(path), "-o", str(files["work"].parent / "o.png")])

    def check():
        stored = read_from_png(args.from_png)
        settle(args, stored, locate_model(args.model or stored.get("model")))

    load_or_latentdiff_error(check)
