"""The engine: one queue, batching by key, failure isolation, interrupt / skip / cancel, limits, progress; served
images against the Python API called directly on the same seeds (the independent reference)."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from latentdiff.serve.engine import Engine
from latentdiff.serve.requests import ImageRequest, RequestError
from latentdiff.serve.settings import ServeSettings

MODEL = "latentdiff/shapes-64"
STEPS = 6


class Catalog:
    """The catalog's interface over one loaded pipeline (the engine's only view of models)."""

    def __init__(self, pipe):
        self.pipe, self.lora_dirs, self.loads = pipe, (), 0

    def pipeline(self, name, vae=None):
        self.loads += 1
        return self.pipe

    def preview(self, name):
        class Preview:
            def image(self, z):
                from PIL import Image
                return Image.new("RGB", (z.shape[-1], z.shape[-2]))
        return Preview()


@pytest.fixture(scope="module")
def pipe():
    from latentdiff import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained(MODEL)


def request(prompt="a red circle", **kw):
    kw = {"steps": STEPS, "guidance": 5.0, "seed": 11, "width": 64, "height": 64} | kw
    return ImageRequest(model=MODEL, prompt=prompt, **kw)


def reference(pipe, prompt, seeds, **kw):
    """The Python API's images for `seeds` (a batch as the request's batch_size)."""
    return [np.array(im) for im in pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                                        num_images_per_prompt=len(seeds), progress=False,
                                        generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images]


def engine(pipe, **settings):
    return Engine(Catalog(pipe), ServeSettings(**({"batch_wait_s": 0.0} | settings)))


def test_a_request_alone_is_the_python_api_image(pipe):
    eng = engine(pipe, max_batch=1)
    eng.start()
    try:
        result = eng.generate_sync(request(seed=5, batch_size=1, n_iter=2), timeout=120)
    finally:
        eng.stop()
    assert [g.seed for g in result.images] == [5, 6]
    for g, seed in zip(result.images, (5, 6), strict=True):
        assert np.array_equal(np.array(g.image), reference(pipe, "a red circle", [seed])[0])
        assert g.params["seed"] == seed and g.params["prompt"] == "a red circle" and g.params["steps"] == STEPS


def test_batch_size_is_one_call_as_the_python_api_makes_it(pipe):
    eng = engine(pipe, max_batch=4)
    eng.start()
    try:
        result = eng.generate_sync(request(seed=40, batch_size=3), timeout=120)
    finally:
        eng.stop()
    expected = reference(pipe, "a red circle", [40, 41, 42])
    assert all(np.array_equal(np.array(g.image), e) for g, e in zip(result.images, expected, strict=True))


def test_concurrent_requests_share_a_call_and_keep_their_seeds(pipe):
    eng = engine(pipe, max_batch=4)
    prompts = ["a red circle", "a green square", "a blue triangle", "a yellow circle", "a red square"]
    jobs = [eng.submit(request(p, seed=100 + i)) for i, p in enumerate(prompts)]   # queued before the worker runs
    eng.start()
    try:
        results = [job.future.result(timeout=120) for job in jobs]
    finally:
        eng.stop()
    assert eng.stats()["calls"] == 2                       # 4 + 1 images, max_batch 4
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        (image,) = result.images
        assert image.seed == 100 + i and image.params["prompt"] == prompt
        got, alone = np.array(image.image).astype(int), reference(pipe, prompt, [100 + i])[0].astype(int)
        # a shared call's matrix products may round differently: at most 1 in a few values, never another image
        assert np.abs(got - alone).max() <= 1 and (got != alone).mean() < 0.01


def test_different_settings_never_share_a_call(pipe):
    eng = engine(pipe, max_batch=8)
    jobs = [eng.submit(request(seed=1)), eng.submit(request(seed=2, guidance=3.0)), eng.submit(request(seed=3))]
    eng.start()
    try:
        [job.future.result(timeout=120) for job in jobs]
    finally:
        eng.stop()
    assert eng.stats()["calls"] == 2      # requests 1 and 3 together; 2 alone


class Failing:
    """The pipeline, failing for prompts containing "boom" (a request at fault)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __setattr__(self, name, value):
        if name == "pipe":
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __call__(self, prompt, **kw):
        if "boom" in str(prompt):
            raise RuntimeError("boom")
        return self.pipe(prompt, **kw)


def test_a_failing_request_fails_alone(pipe):
    eng = Engine(Catalog(Failing(pipe)), ServeSettings(max_batch=4, batch_wait_s=0.0))
    good, bad = eng.submit(request("a red circle", seed=9)), eng.submit(request("boom", seed=10))
    eng.start()
    try:
        (image,) = good.future.result(timeout=120).images
        with pytest.raises(RuntimeError, match="boom"):
            bad.future.result(timeout=120)
    finally:
        eng.stop()
    assert np.array_equal(np.array(image.image), reference(pipe, "a red circle", [9])[0])   # retried alone
    assert eng.stats()["failed"] == 1 and eng.stats()["done"] == 1


def stopping_at(eng, step, action):
    """A catalog whose pipeline calls `action()` on the engine once `step` steps ran."""
    seen = []
    original = eng._call

    def call(taken, running):
        def watch():
            while running.step < step and eng._running is running:
                threading.Event().wait(0.002)
            if eng._running is running:
                seen.append(running.step)
                action()
        threading.Thread(target=watch, daemon=True).start()
        return original(taken, running)

    eng._call = call
    return seen


def test_interrupt_stops_the_job_and_returns_what_it_has(pipe):
    eng = engine(pipe, max_batch=1)
    seen = stopping_at(eng, 2, eng.interrupt)
    eng.start()
    try:
        result = eng.generate_sync(request(steps=40, n_iter=3), timeout=120)
    finally:
        eng.stop()
    assert seen and result.interrupted and len(result.images) == 1     # the first batch, partly denoised
    finished = pipe("a red circle", num_inference_steps=40, guidance_scale=5.0, progress=False,
                    generator=torch.Generator().manual_seed(11)).images[0]
    assert not np.array_equal(np.array(result.images[0].image), np.array(finished))


def test_skip_goes_on_with_the_next_batch(pipe):
    eng = engine(pipe, max_batch=1)
    stopping_at(eng, 2, eng.skip)
    eng.start()
    try:
        result = eng.generate_sync(request(steps=30, n_iter=2), timeout=120)
    finally:
        eng.stop()
    assert not result.interrupted and result.skipped >= 1 and len(result.images) == 2


def test_a_cancelled_queued_job_never_runs(pipe):
    eng = engine(pipe, max_batch=1)
    first, second = eng.submit(request(seed=1)), eng.submit(request(seed=2, guidance=2.0))
    eng.cancel(second)
    eng.start()
    try:
        first.future.result(timeout=120)
    finally:
        eng.stop()
    assert second.future.cancelled() and eng.stats()["calls"] == 1 and eng.stats()["cancelled"] == 1


def test_a_client_that_goes_away_cancels_its_request(pipe):
    eng = engine(pipe, max_batch=1)
    blocker = eng.submit(request(seed=1, steps=STEPS))

    async def gone() -> bool:
        return True

    async def main():
        with pytest.raises(RequestError) as caught:
            await eng.generate(request(seed=2, guidance=2.0), is_disconnected=gone)
        return caught.value

    error = asyncio.run(main())      # the worker is not started: the request is still queued when it goes
    assert error.status == 499 and eng.stats()["cancelled"] == 1 and eng.stats()["queued"] == 1
    eng.start()
    try:
        blocker.future.result(timeout=120)
    finally:
        eng.stop()
    assert eng.stats()["calls"] == 1


@pytest.mark.parametrize(("changes", "field"), [
    ({"width": 4096}, "width"), ({"height": 4}, "height"), ({"steps": 1000}, "steps"), ({"steps": 0}, "steps"),
    ({"batch_size": 9}, "batch_size"), ({"n_iter": 0}, "n_iter"),
    ({"batch_size": 8, "n_iter": 9}, "batch_size x n_iter"),
    ({"width": 1024, "height": 1024, "batch_size": 8}, "width x height x batch_size x n_iter"),
])
def test_limits_are_422_naming_the_field_and_the_limit(pipe, changes, field):
    eng = engine(pipe, max_batch=8, max_side=2048, max_steps=150, max_images=64, max_pixels=4 * 1024 * 1024)
    with pytest.raises(RequestError) as caught:
        eng.submit(request(**changes))
    assert caught.value.status == 422 and caught.value.field == field and "--max-" in str(caught.value)
    assert eng.stats()["queued"] == 0


def test_a_full_queue_is_503(pipe):
    eng = engine(pipe, max_queue=2)
    eng.submit(request(seed=1))
    eng.submit(request(seed=2))
    with pytest.raises(RequestError) as caught:
        eng.submit(request(seed=3))
    assert caught.value.status == 503


def test_progress_idle_and_running(pipe):
    eng = engine(pipe, max_batch=1)
    idle = eng.progress()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    reports = []
    stopping_at(eng, 3, lambda: reports.append(eng.progress()))
    eng.start()
    try:
        eng.generate_sync(request(steps=30), timeout=120)
    finally:
        eng.stop()
    (report,) = reports
    assert 0 < report["progress"] < 1 and report["state"]["sampling_steps"] == 30
    assert report["state"]["sampling_step"] >= 3 and report["current_image"] and report["eta_relative"] > 0
