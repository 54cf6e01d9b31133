"""Engine: the one job queue of the server, and the worker that runs it.

Every API turns a request into an ImageRequest and awaits `Engine.generate`. A request is split into units (its
n_iter batches). The worker thread takes the oldest unit and, when its request has a batch key, the next queued
units with the same key (other requests' included, oldest first) while the images fit in `max_batch`: one pipeline
call for all of them (`render.render`). So N clients asking at once get their images from fewer, larger calls,
each image still drawn from its own seed's noise.

Failure stays with its job: a call that fails with several requests in it is retried unit by unit, so only the
request at fault gets the error. `interrupt` stops the running call at its next step (the images are the partly
denoised ones, decoded, as A1111 returns them) and drops the rest of its requests' units; `skip` stops the call
and goes on with the next unit. A client that goes away before its request is done cancels it: its queued units
are dropped (a call it shares with others runs on for them).

Progress (`progress()`) is A1111's /progress JSON; the live preview is the running call's x0 prediction projected
to RGB (`preview.LatentPreview`), made only when a client asks for it.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..utils.images import png_bytes
from .controlnet_units import controlnets_for
from .render import render, unit_steps
from .requests import GeneratedImage, ImageRequest, JobResult, RequestError, Unit
from .settings import ServeSettings

POLL_S = 0.25    # how often a waiting request checks that its client is still there


@dataclasses.dataclass(eq=False)
class Job:
    request: ImageRequest
    future: concurrent.futures.Future[JobResult]
    pending: collections.deque[Unit]
    results: dict[int, list[GeneratedImage]] = dataclasses.field(default_factory=dict)
    running: int = 0             # units in the call now running
    cancelled: bool = False
    interrupted: bool = False
    skipped: int = 0
    submitted: float = dataclasses.field(default_factory=time.time)

    def finished(self) -> bool:
        return not self.pending and not self.running


@dataclasses.dataclass
class Running:
    """The call the worker is making now (what /progress reports)."""

    units: list[Unit]
    steps: int                   # denoising steps of the call
    started: float
    step: int = 0
    latents: Any = None          # the last x0 prediction (a CPU copy), for the preview
    model: str = ""


class Engine:
    def __init__(self, catalog: Any, settings: ServeSettings):
        self.catalog, self.settings = catalog, settings
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()   # jobs with units still queued, oldest first
        self._running: Running | None = None
        self._interrupt = self._skip = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counts = collections.Counter({k: 0 for k in ("done", "failed", "cancelled", "calls", "images")})

    # ---- life -----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="latentdiff-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping, self._interrupt = True, True
            jobs, self._jobs = list(self._jobs), collections.deque()
            self._cond.notify_all()
        for job in jobs:
            _fail(job, RequestError("the server is shutting down", status=503))
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # ---- requests -------------------------------------------------------------------------------------------------
    def check(self, request: ImageRequest) -> None:
        """The server's limits (`latentdiff serve --max-...`): a RequestError (422) naming the field and the limit."""
        s = self.settings

        def bound(value: int, field: str, low: int, high: int, flag: str) -> None:
            if not low <= value <= high:
                raise RequestError(f"{field} is out of the range this server accepts", field=field,
                                   expected=f"{low} <= {field} <= {high} ({flag})", found=value)

        bound(request.width, "width", 8, s.max_side, "--max-side")
        bound(request.height, "height", 8, s.max_side, "--max-side")
        bound(request.steps, "steps", 1, s.max_steps, "--max-steps")
        bound(request.batch_size, "batch_size", 1, s.max_batch, "--max-batch")
        bound(request.n_iter, "n_iter", 1, s.max_images, "--max-images")
        bound(request.images, "batch_size x n_iter", 1, s.max_images, "--max-images")
        width, height = request.width, request.height
        if request.hires is not None:
            width, height = round(width * request.hires.scale), round(height * request.hires.scale)
            bound(width, "hr_scale x width", 8, s.max_side, "--max-side")
            bound(height, "hr_scale x height", 8, s.max_side, "--max-side")
            if request.hires.steps is not None:
                bound(request.hires.steps, "hr_second_pass_steps", 0, s.max_steps, "--max-steps")
        pixels = width * height * request.images
        if pixels > s.max_pixels:
            raise RequestError("the request asks for more pixels than this server makes in one request",
                               field="width x height x batch_size x n_iter",
                               expected=f"at most {s.max_pixels} pixels (--max-pixels)",
                               found=f"{width} x {height} x {request.images} = {pixels}")

    def submit(self, request: ImageRequest) -> Job:
        """Check and queue `request`; its Job's future resolves to the JobResult."""
        self.check(request)
        units = collections.deque(Unit(request, i) for i in range(request.n_iter))
        job = Job(request, concurrent.futures.Future(), units)
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down", status=503)
            if len(self._jobs) >= self.settings.max_queue:
                raise RequestError("the server's queue is full; try again later", status=503, field="queue",
                                   expected=f"at most {self.settings.max_queue} waiting requests",
                                   found=len(self._jobs))
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    async def generate(self, request: ImageRequest, *,
                       is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobResult:
        job = self.submit(request)
        waiting = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
                if done:
                    return waiting.result()
                if is_disconnected is not None and await is_disconnected():
                    self.cancel(job)
                    raise RequestError("the client went away; its request was cancelled", status=499)
        except asyncio.CancelledError:     # the server cancelled the handler (the client went away)
            self.cancel(job)
            raise

    def generate_sync(self, request: ImageRequest, timeout: float | None = None) -> JobResult:
        return self.submit(request).future.result(timeout=timeout)

    def cancel(self, job: Job) -> None:
        """Drop the job's queued units; a call it shares with other jobs runs on for them."""
        with self._cond:
            if job.future.done() or job.cancelled:
                return
            job.cancelled = True
            self._dequeue(job)
            self._counts["cancelled"] += 1
            if not job.running:
                job.future.cancel()

    def interrupt(self) -> None:
        with self._cond:
            if self._running is not None:
                self._interrupt = True

    def skip(self) -> None:
        with self._cond:
            if self._running is not None:
                self._skip = True

    # ---- the worker -----------------------------------------------------------------------------------------------
    def _take(self) -> list[tuple[Job, Unit]] | None:
        """The next call's units (under the lock): the oldest unit, and same-key units after it."""
        while not self._stopping:
            if self._jobs:
                first = self._jobs[0]
                key = first.request.batch_key()
                if key is not None and self.settings.max_batch > first.request.batch_size \
                        and self.settings.batch_wait_s > 0 and self._companions(key) == 0:
                    self._cond.wait(self.settings.batch_wait_s)   # a moment for requests arriving together
                    if not self._jobs or self._jobs[0] is not first:
                        continue
                return self._gather(first, key)
            self._cond.wait()
        return None

    def _companions(self, key: tuple[Any, ...]) -> int:
        return sum(len(job.pending) for job in list(self._jobs)[1:] if job.request.batch_key() == key)

    def _gather(self, first: Job, key: tuple[Any, ...] | None) -> list[tuple[Job, Unit]]:
        taken = [(first, first.pending.popleft())]
        images = first.request.batch_size
        if key is not None:
            for job in self._jobs:
                while job.pending and job.request.batch_key() == key \
                        and images + job.request.batch_size <= self.settings.max_batch:
                    taken.append((job, job.pending.popleft()))
                    images += job.request.batch_size
        for job, _ in taken:
            job.running += 1
        self._jobs = collections.deque(job for job in self._jobs if job.pending)
        return taken

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
                if taken is None:
                    return
                self._interrupt = self._skip = False
            self._run(taken)

    def _run(self, taken: list[tuple[Job, Unit]]) -> None:
        units = [unit for _, unit in taken]
        request = units[0].request
        running = Running(units, unit_steps(request), time.time(), model=request.model)
        with self._cond:
            self._running = running
        try:
            outcome: list[list[GeneratedImage]] | BaseException = self._call(taken, running)
        finally:
            with self._cond:
                self._running = None
        if isinstance(outcome, BaseException) and len(units) > 1:
            for pair in taken:                    # only the request at fault fails
                self._run([pair])
            return
        with self._cond:
            interrupted, skipped = self._interrupt, self._skip
            for index, (job, unit) in enumerate(taken):
                job.running -= 1
                if isinstance(outcome, BaseException):
                    self._dequeue(job)
                    _fail(job, outcome)
                    self._counts["failed"] += 1
                    continue
                job.results[unit.index] = outcome[index]
                if interrupted:
                    job.interrupted = True
                    self._dequeue(job)
                elif skipped:
                    job.skipped += 1
                if job.finished() and not job.future.done():
                    self._finish(job)
            self._cond.notify_all()

    def _dequeue(self, job: Job) -> None:
        """Drop the job's units still queued (under the lock)."""
        job.pending.clear()
        if job in self._jobs:
            self._jobs.remove(job)

    def _finish(self, job: Job) -> None:
        images = [image for index in sorted(job.results) for image in job.results[index]]
        self._counts["done"] += 1
        self._counts["images"] += len(images)
        job.future.set_result(JobResult(job.request, images, interrupted=job.interrupted, skipped=job.skipped))

    def _call(self, taken: list[tuple[Job, Unit]], running: Running) -> list[list[GeneratedImage]] | BaseException:
        units = [unit for _, unit in taken]
        request = units[0].request
        pipe: Any = None

        def on_step(i: int, t: float, x: Any, denoised: Any = None) -> None:
            running.step += 1
            running.latents = (x if denoised is None else denoised).detach().to("cpu", copy=True)
            if self._interrupt or self._skip or all(job.cancelled for job, _ in taken):
                pipe._interrupt = True

        try:
            pipe = self.catalog.pipeline(request.model, request.vae)
            refiner = None if request.refiner is None else self.catalog.pipeline(request.refiner, request.vae)
            controlnets = controlnets_for(self.catalog, request.control, pipe) if request.control else []
            self._counts["calls"] += 1
            return render(pipe, units, lora_dirs=tuple(self.catalog.lora_dirs), callback=on_step, refiner=refiner,
                          controlnets=controlnets)
        except Exception as exc:    # noqa: BLE001  # a job's failure is its own: reported to its client
            return exc

    # ---- reporting ------------------------------------------------------------------------------------------------
    def progress(self, *, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's /sdapi/v1/progress."""
        with self._cond:
            running = self._running
            queued = sum(len(job.pending) for job in self._jobs)
            interrupted, skipped = self._interrupt, self._skip
        state = {"skipped": skipped, "interrupted": interrupted, "job": "", "job_count": queued,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if running is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        done = min(running.step, running.steps) / max(running.steps, 1)
        elapsed = time.time() - running.started
        state |= {"job": f"{running.units[0].request.origin} ({len(running.units)} unit(s))",
                  "job_count": queued + 1, "sampling_step": running.step, "sampling_steps": running.steps,
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(running.started))}
        image = None
        if not skip_current_image and running.latents is not None:
            image = self._preview(running)
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
                "current_image": image, "textinfo": f"Sampling step {running.step}/{running.steps}"}

    def _preview(self, running: Running) -> str | None:
        try:
            picture = self.catalog.preview(running.model).image(running.latents)
        except Exception:    # noqa: BLE001  # a preview is a nicety: never fail /progress for it
            return None
        return base64.b64encode(png_bytes(picture)).decode("ascii")

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = sum(len(job.pending) for job in self._jobs)
            running = 0 if self._running is None else len(self._running.units)
            return dict(self._counts) | {"queued": queued, "running": running}


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)
