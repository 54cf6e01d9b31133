"""Fuzzed `__call__` arguments (issue 14): random values of the wrong type, NaN / Inf, negative, huge, lists of the
wrong length, mixed with valid ones, for the tiny pipelines. Only a latentdiff error or a valid output may come
out, each call within a deadline; the runs are derandomized (the same examples every run).

Sizes stay small here (the pixel bound is `limits.check_pixels`'s, tested with its own cases): valid calls take
a few milliseconds."""
from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentdiff import ImageToImagePipeline, LatentDiffusionPipeline
from latentdiff.errors import LatentDiffError
from latentdiff.pipelines.base import PipelineOutput
from tests._support.numerics import latent_shape, nan_tensor, tiny_text_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster
FUZZ = settings(max_examples=100, derandomize=True, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow])
WIDTH = 32   # the tiny UNet's cross_attention_dim


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LatentDiffusionPipeline.from_pretrained(tiny_text_model(tmp_path_factory.mktemp("fuzz") / "tiny"))


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value five times in six: most examples then get past the first check and reach the later ones
    (and some run to the end)."""
    return st.sampled_from([True] * 5 + [False]).flatmap(lambda ok: valid if ok else invalid)


def reals(valid: st.SearchStrategy) -> st.SearchStrategy:
    return mostly(valid, st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10),
                                   st.sampled_from([10**40, -(10**40), 1e30, True, "7.5", None, [1.0], 2j])))


def prompts() -> st.SearchStrategy:
    texts = st.text(max_size=6)
    return mostly(st.one_of(texts, st.lists(texts, min_size=1, max_size=2)),
                  st.one_of(st.lists(st.one_of(texts, st.integers()), max_size=2),
                            st.sampled_from([None, 5, b"bytes", {"a": 1}, [], ("a", "b")])))


def embeddings() -> st.SearchStrategy:
    """(B, L, D) tensors, of a valid or a wrong batch / length / width / dtype, finite or not."""
    def make(shape: tuple[int, int, int], kind: str) -> torch.Tensor:
        return {"ok": lambda: torch.randn(*shape), "nan": lambda: nan_tensor(*shape),
                "inf": lambda: torch.full(shape, float("inf")), "int": lambda: torch.zeros(shape, dtype=torch.long),
                "2d": lambda: torch.randn(*shape[1:])}[kind]()

    valid = st.builds(make, st.tuples(st.just(1), st.just(16), st.just(WIDTH)), st.just("ok"))
    shapes = st.tuples(st.sampled_from([1, 2]), st.sampled_from([16, 3]), st.sampled_from([WIDTH, 8]))
    return mostly(valid, st.one_of(st.builds(make, shapes, st.sampled_from(["ok", "nan", "inf", "int", "2d"])),
                                   st.sampled_from([[[0.0] * WIDTH], "embeds"])))


def generators() -> st.SearchStrategy:
    one = st.builds(lambda seed: torch.Generator().manual_seed(seed), st.integers(0, 3))
    return mostly(st.one_of(st.none(), one),
                  st.one_of(st.lists(one, max_size=4), st.sampled_from(["seed", 42, [0], [None]])))


def latents() -> st.SearchStrategy:
    def make(kind: str):  # type: ignore[no-untyped-def]
        return {"ok": lambda: torch.randn(latent_shape()), "nan": lambda: nan_tensor(*latent_shape()),
                "shape": lambda: torch.randn(1, 4, 8, 8), "int": lambda: torch.zeros(latent_shape(), dtype=torch.int),
                "list": lambda: [[0.0]], "numpy": lambda: np.zeros(latent_shape())}[kind]()

    return mostly(st.builds(make, st.just("ok")),
                  st.builds(make, st.sampled_from(["nan", "shape", "int", "list", "numpy"])))


def callbacks() -> st.SearchStrategy:
    return mostly(st.sampled_from([None, lambda i, t, x: None]),
                  st.sampled_from([5, "print", lambda i, t, x: torch.full_like(x, float("nan"))]))  # NaN x_t


def call_arguments(**extra: st.SearchStrategy) -> st.SearchStrategy:
    """Each argument absent (its default) or fuzzed; num_inference_steps always given (the default, 50, is slow)."""
    fuzzed = dict(negative_prompt=prompts(), guidance_scale=reals(st.floats(0, 10)),
                  eta=reals(st.floats(0, 1)), generator=generators(),
                  num_images_per_prompt=mostly(st.integers(1, 2), st.sampled_from([0, -1, "1", 1.0, None])),
                  output_type=mostly(st.sampled_from(["latent", "pt", "np", "pil"]),
                                     st.sampled_from(["jpeg", None, 5])),
                  prompt_embeds=embeddings(), negative_prompt_embeds=embeddings(), callback=callbacks()) | extra
    steps = mostly(st.integers(1, 2), st.sampled_from([0, -3, 10**6, "2", 2.0, None]))
    return st.fixed_dictionaries({"num_inference_steps": steps}, optional=fuzzed)


def check_outcome(run) -> None:  # type: ignore[no-untyped-def]
    """run() returns a valid PipelineOutput or raises a latentdiff error, within seconds."""
    start = time.perf_counter()
    try:
        out = run()
    except LatentDiffError as error:
        event(f"{type(error).__name__}: {error.where}")   # --hypothesis-show-statistics shows the mix
    else:
        event("output")
        assert isinstance(out, PipelineOutput)
        images = out.images
        if isinstance(images, list):
            assert images and all(isinstance(i, Image.Image) for i in images)
        else:
            assert bool(np.isfinite(np.asarray(images)).all())
    assert time.perf_counter() - start < 5


@pytest.mark.outcome("clear_error", fails_as="crash")
@FUZZ
@given(prompt=prompts(), size=mostly(st.sampled_from([16, 8]), st.sampled_from([0, -16, 15, "16", 16.0, None])),
       arguments=call_arguments(latents=latents()))
def test_fuzzed_text_to_image_arguments(pipe, prompt, size, arguments):
    check_outcome(lambda: pipe(prompt, height=size, width=size, progress=False, **arguments))


@pytest.mark.outcome("clear_error", fails_as="crash")
@FUZZ
@given(prompt=prompts(), strength=reals(st.just(1.0)), noise=mostly(st.none(), latents()),
       arguments=call_arguments())
def test_fuzzed_image_to_image_arguments(pipe, prompt, strength, noise, arguments):
    img2img = ImageToImagePipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder)
    check_outcome(lambda: img2img(prompt, torch.rand(1, 3, 16, 16), strength=strength, noise=noise, progress=False,
                                  **arguments))
