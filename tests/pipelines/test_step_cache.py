"""The pipeline switches of `pipelines.step_cache`: DeepCache in text-to-image, image-to-image, inpainting, SDXL
and the unconditional pipeline (cache_interval=1 is the plain run exactly; the number of full UNet passes is
what the interval says, counted at the mid level, which only a full pass runs; uniform and non-uniform full
steps), FreeU on a pipeline (diffusers' factors reach the UNet), disabling, and bad settings refused first."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiff import (
    ImageToImagePipeline,
    InpaintPipeline,
    LatentDiffusionPipeline,
    StableDiffusionXLPipeline,
    UnconditionalPipeline,
)
from latentdiff.errors import InputError
from latentdiff.models.freeu import FreeU
from latentdiff.models.unet2d import UNet2D, UNet2DConfig
from latentdiff.pipelines.step_cache import DeepCache, nonuniform_full_steps
from tests._support.sdxl_native import write_tiny_sdxl
from tests._support.tiny import TINY_UNET2D
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_pretrained(make_tiny_shapes_model(tmp_path_factory.mktemp("t2i") / "m"))


class Passes:
    """Counts UNet calls (conv_in: every pass) and full passes (the mid level: full passes only)."""

    def __init__(self, unet: torch.nn.Module):
        self.calls, self.full = 0, 0
        self.hooks = [unet.conv_in.register_forward_hook(lambda *_: self._call()),
                      unet.mid_block.register_forward_hook(lambda *_: self._full())]

    def _call(self) -> None:
        self.calls += 1

    def _full(self) -> None:
        self.full += 1

    def __enter__(self) -> Passes:
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self.hooks:
            hook.remove()


def t2i(pipe, **kw) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=kw.pop("steps", 6), guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0), progress=False, **kw).images


def test_interval_one_is_the_plain_run_and_disable_restores_it(pipe) -> None:
    plain = t2i(pipe)
    pipe.enable_deepcache(1, 2)
    try:
        assert np.array_equal(t2i(pipe), plain)
        pipe.enable_deepcache(3, 0)
        cached = t2i(pipe)
    finally:
        pipe.disable_deepcache()
    assert not np.array_equal(cached, plain)
    assert np.array_equal(t2i(pipe), plain)


@pytest.mark.parametrize("interval, uniform, steps", [(3, True, 6), (2, True, 7), (4, True, 6), (2, False, 8)])
def test_full_passes_follow_the_interval(pipe, interval: int, uniform: bool, steps: int) -> None:
    pipe.enable_deepcache(interval, 1, uniform=uniform)
    seen: list[int] = []
    try:
        with Passes(pipe.unet) as passes:
            def note(i, t, x, denoised=None):
                seen.append(passes.full)
            t2i(pipe, steps=steps, callback=note)
    finally:
        pipe.disable_deepcache()
    assert passes.calls == steps                       # guidance: one (doubled) call per step
    assert passes.full == math.ceil(steps / interval)
    full_steps = [i for i in range(steps) if seen[i] > (seen[i - 1] if i else 0)]
    assert full_steps == sorted(DeepCache(interval, uniform=uniform).full_steps(steps))
    if uniform:
        assert full_steps == list(range(0, steps, interval))


def test_image_to_image_and_inpainting_count_their_own_steps(pipe) -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    for cls, extra in ((ImageToImagePipeline, {}), (InpaintPipeline, {"mask_image": mask})):
        task = cls.from_pipe(pipe)
        task.enable_deepcache(2, 0)         # on the shared UNet: `pipe` has it too until disabled
        try:
            with Passes(task.unet) as passes:   # strength 0.5 of 8 steps: 4 steps run, full at 0 and 2
                task("a red circle", image, strength=0.5, num_inference_steps=8, guidance_scale=3.0,
                     output_type="np", generator=torch.Generator().manual_seed(0), progress=False, **extra)
        finally:
            task.disable_deepcache()
        assert (passes.calls, passes.full) == (4, 2), cls.__name__


def test_sdxl(tmp_path) -> None:
    sdxl = StableDiffusionXLPipeline.from_pretrained(write_tiny_sdxl(tmp_path / "xl"))

    def run() -> np.ndarray:
        return sdxl("a cat", num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0), progress=False).images

    plain = run()
    sdxl.enable_deepcache(2, 3)
    with Passes(sdxl.unet) as passes:
        cached = run()
    assert (passes.calls, passes.full) == (4, 2)
    assert not np.array_equal(cached, plain)
    sdxl.enable_deepcache(1, 3)
    assert np.array_equal(run(), plain)


def test_unconditional() -> None:
    torch.manual_seed(0)
    config = UNet2DConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_UNET2D.items()})
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from tests._support.tiny import tiny_kl_config
    uncond = UnconditionalPipeline(vae=AutoencoderKL(tiny_kl_config()).eval(), unet=UNet2D(config).eval())

    def run() -> np.ndarray:
        return uncond(batch_size=2, num_inference_steps=5, output_type="np", progress=False,
                      generator=torch.Generator().manual_seed(0)).images

    plain = run()
    uncond.enable_deepcache(1, 1)
    assert np.array_equal(run(), plain)
    uncond.enable_deepcache(2, 1)
    with Passes(uncond.unet) as passes:
        cached = run()
    assert (passes.calls, passes.full) == (5, 3)
    assert not np.array_equal(cached, plain)


def test_freeu_switch(pipe, monkeypatch) -> None:
    plain = t2i(pipe, steps=2)
    seen = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **kw: seen.append(kw.get("freeu")) or forward(*a, **kw))
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    try:
        changed = t2i(pipe, steps=2)
    finally:
        pipe.disable_freeu()
    assert seen == [FreeU(0.9, 0.2, 1.5, 1.6)] * 2
    assert not np.array_equal(changed, plain)
    assert np.array_equal(t2i(pipe, steps=2), plain)


def test_bad_settings_are_refused_before_any_work(pipe) -> None:
    with pytest.raises(InputError, match="one of the UNet's skips"):
        pipe.enable_deepcache(3, 99)
    for bad in ({"cache_interval": 0}, {"cache_interval": 2.5}, {"cache_branch_id": -1}, {"uniform": "yes"}):
        with pytest.raises(InputError):
            pipe.enable_deepcache(**bad)
    with pytest.raises(InputError, match="FreeU"):
        pipe.enable_freeu(0.9, 0.2, 0, 1.6)
    assert pipe._deepcache is None and pipe._freeu is None


def test_nonuniform_schedule_is_denser_around_the_center() -> None:
    chosen = nonuniform_full_steps(50, 10, center=15, power=1.4)
    assert chosen[0] == 0 and chosen == sorted(set(chosen)) and len(chosen) == 10 and chosen[-1] < 50
    gaps = np.diff(chosen)
    near = min(range(len(gaps)), key=lambda i: abs(chosen[i] - 15))
    assert gaps[near] <= gaps[1] and gaps[near] < gaps[-1]
    with pytest.raises(InputError, match="non-uniform"):
        nonuniform_full_steps(30, 15, center=15, power=1.4)   # the one (steps, interval <= 10) case up to 100
