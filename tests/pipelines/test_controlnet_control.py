"""ControlNets inside the denoiser (pipelines/control.py): every sampler and MultiDiffusion tiles run with control,
the step a model call belongs to is counted for multi-evaluation samplers too, hints are prepared (resize modes,
kinds, batches), and bad input is refused before any network runs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ConfigError, ControlNet, InputError, LatentDiffusionPipeline
from latentdiff.diffusion.samplers import switch_sampler
from latentdiff.errors import CheckpointError
from latentdiff.models.residuals import Residuals
from latentdiff.models.unet import UNet2DConditional
from latentdiff.pipelines.control import Control, ControlNetUnit, in_range, prepare_hint
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.registry import SAMPLERS
from tests._support.docs_harness import tiny_stable_diffusion
from tests._support.parity import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16   # the tiny SD's images (latent 8 x 8, autoencoder factor 2)
RUN = dict(num_inference_steps=3, output_type="latent", progress=False)


def hint(seed: int = 0, size: int = SIZE) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    tiny_stable_diffusion(root / "sd")
    plain = LatentDiffusionPipeline.from_pretrained(root / "sd")
    torch.manual_seed(0)
    nets = [randomize_(ControlNet.from_unet(plain.unet, conditioning_embedding_out_channels=(8, 16))).eval()
            for _ in range(2)]
    return plain, LatentDiffusionPipeline.from_pipe(plain, controlnet=nets[0]), nets, root


def latents(pipe, seed: int = 0):
    return pipe.prepare_latents(1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SAMPLERS.names()))
def test_every_sampler_runs_with_control(pipes, name):
    plain, pipe, _, _ = pipes
    sampler = switch_sampler(pipe.sampler, name)
    kw = dict(RUN, generator=torch.Generator().manual_seed(1))
    x = latents(pipe)
    with_control = pipe.from_pipe(pipe, sampler=sampler)("a", control_image=hint(), latents=x, **kw).images
    without = plain.from_pipe(plain, sampler=sampler)("a", latents=x, **dict(kw, generator=torch.Generator()
                                                                                  .manual_seed(1))).images
    assert torch.isfinite(with_control).all() and not torch.allclose(with_control, without, atol=1e-4)


class Recorder:
    """A ControlUnit that adds nothing and records (step, steps, region) of every model call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def residuals(self, x, t, context, *, added_cond, step, steps, region=None):
        self.calls.append((step, steps, None if region is None else (region[0].start, region[1].start)))
        return None


@pytest.mark.parametrize("name, evaluations", [("ddim", [1, 1, 1, 1]), ("heun", [2, 2, 2, 1]),
                                               ("dpmpp_2m", [1, 1, 1, 1])])
def test_the_step_is_counted_for_every_evaluation(pipes, name, evaluations):
    """Heun evaluates twice per step (once on its last): both evaluations see their step's index."""
    _, pipe, _, _ = pipes
    recorder = Recorder()
    cond, uncond = pipe.encode_prompt("a")
    pipe.denoise(latents(pipe), cond, uncond, num_inference_steps=4, sampler=switch_sampler(pipe.sampler, name),
                 progress=False, control=Control((recorder,)))
    steps = [s for s, _, _ in recorder.calls]
    assert [steps.count(i) for i in range(4)] == evaluations and steps == sorted(steps)
    assert {n for _, n, _ in recorder.calls} == {4}


def test_a_run_started_part_way_counts_its_own_steps(pipes):
    """Image-to-image at strength 0.5 of 4 steps runs 2: the ranges are fractions of those (as diffusers)."""
    _, pipe, _, _ = pipes
    recorder = Recorder()
    cond, uncond = pipe.encode_prompt("a")
    pipe.denoise(latents(pipe), cond, uncond, num_inference_steps=4, start_step=2, progress=False,
                 control=Control((recorder,)))
    assert [(s, n) for s, n, _ in recorder.calls] == [(0, 2), (1, 2)]


def test_step_ranges_follow_diffusers_rule():
    for steps in (1, 4, 7, 10):
        for start, end in ((0.0, 1.0), (0.2, 0.8), (0.5, 0.6), (0.0, 0.3)):
            expected = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
            assert [float(in_range(i, steps, start, end)) for i in range(steps)] == expected


def test_tiles_crop_the_hint_per_window(pipes):
    """One window over the whole latent is plain controlled sampling, bit for bit; smaller windows each see
    their crop of the hint (the window's latent rows / columns times the hint factor)."""
    plain, pipe, nets, _ = pipes
    kw = dict(RUN, control_image=hint(), latents=latents(pipe))
    whole = pipe("a", **kw).images
    assert torch.equal(pipe("a", **kw, tile_size=SIZE).images, whole)
    tiled = pipe("a", **kw, tile_size=SIZE // 2, tile_overlap=4).images
    tiled_plain = plain("a", latents=kw["latents"], **RUN, tile_size=SIZE // 2, tile_overlap=4).images
    assert torch.isfinite(tiled).all() and not torch.allclose(tiled, tiled_plain, atol=1e-4)
    recorder = Recorder()
    cond, uncond = pipe.encode_prompt("a")
    pipe.denoise(latents(pipe), cond, uncond, num_inference_steps=1, progress=False, control=Control((recorder,)),
                 tiling=pipe.tiling(SIZE // 2, 4))
    assert [r for _, _, r in recorder.calls] == [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4), (4, 0), (4, 2),
                                                 (4, 4)]
    unit = ControlNetUnit(nets[0], torch.rand(1, 3, SIZE, SIZE))
    crop = unit.window_hint((slice(2, 6), slice(4, 8)))
    assert torch.equal(crop, unit.hint[..., 4:12, 8:16])


def test_hint_kinds_sizes_and_batches():
    image = hint(3)
    array = np.asarray(image)
    ref = prepare_hint(image, height=SIZE, width=SIZE, batch=1)
    for kind in (array, array.astype(np.float32) / 255, torch.from_numpy(array).permute(2, 0, 1) / 255.0, [image]):
        assert torch.allclose(prepare_hint(kind, height=SIZE, width=SIZE, batch=1), ref, atol=1e-6)
    assert prepare_hint(image, height=SIZE, width=SIZE, batch=2, num_images_per_prompt=3).shape == (6, 3, SIZE, SIZE)
    two = prepare_hint([image, hint(4)], height=SIZE, width=SIZE, batch=2, num_images_per_prompt=2)
    assert torch.equal(two[1], two[0]) and torch.equal(two[2], two[3]) and not torch.equal(two[0], two[2])
    big = hint(5, size=24)
    for mode in (0, 1, 2):
        assert prepare_hint(big, height=SIZE, width=SIZE, batch=1, resize_mode=mode).shape == (1, 3, SIZE, SIZE)
    with pytest.raises(InputError, match="not of the generation size") as info:
        prepare_hint(big, height=SIZE, width=SIZE, batch=1, resize_mode=None, name="control_image")
    assert info.value.where == "control_image"
    with pytest.raises(InputError, match="generation size"):
        prepare_hint(torch.rand(1, 3, 24, 24), height=SIZE, width=SIZE, batch=1, resize_mode=None)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        prepare_hint(torch.rand(1, 3, SIZE, SIZE) * 2 - 1, height=SIZE, width=SIZE, batch=1)
    with pytest.raises(InputError, match="one per prompt"):
        prepare_hint([image] * 3, height=SIZE, width=SIZE, batch=2)


BAD_CALLS = [
    (dict(control_image=None), "needs a control_image", "control_image"),
    (dict(control_guidance_start=0.5, control_guidance_end=0.5), "start < end", "control_guidance_start/end[0]"),
    (dict(control_guidance_start=-0.1), "start < end", "control_guidance_start/end[0]"),
    (dict(control_guidance_end=1.5), "start < end", "control_guidance_start/end[0]"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5]), "one entry per ControlNet", "controlnet_conditioning_scale"),
    (dict(control_resize_mode=None, control_image=hint(size=24)), "generation size", "control_image"),
    (dict(guess_mode="yes"), "True or False", "guess_mode"),
]


@pytest.mark.parametrize("changes, message, where", BAD_CALLS)
def test_bad_control_input_is_refused_before_any_work(pipes, changes, message, where):
    _, pipe, _, _ = pipes
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=message) as info:
            pipe("a", **(dict(control_image=hint()) | changes), **RUN)
    finally:
        handle.remove()
    assert info.value.where == where and calls == []


def test_several_controlnets_need_one_image_and_setting_each(pipes):
    plain, _, nets, _ = pipes
    multi = LatentDiffusionPipeline.from_pipe(plain, controlnet=nets)
    for changes, where in [(dict(control_image=hint()), "control_image"),
                           (dict(control_image=[hint()] * 3), "control_image"),
                           (dict(control_image=[[hint()], [hint()]]), "control_image"),
                           (dict(control_image=[hint()] * 2, control_guidance_end=[0.5]), "control_guidance_end")]:
        with pytest.raises(InputError) as info:
            multi("a", **changes, **RUN)
        assert info.value.where == where
    out = multi("a", control_image=[hint(), hint(1)], control_guidance_end=[0.5, 1.0], **RUN).images
    assert torch.isfinite(out).all()


def test_control_arguments_without_a_controlnet(pipes):
    plain, _, _, _ = pipes
    for changes in (dict(control_image=hint()), dict(guess_mode=True), dict(control_guidance_end=0.5)):
        with pytest.raises(InputError, match="need a ControlNet"):
            plain("a", **changes, **RUN)


def test_a_controlnet_for_another_base_is_a_config_error(pipes):
    """As an SD 2.x ControlNet (text width 1024) on SD 1.5 (768): another text width, both named."""
    plain, _, _, _ = pipes
    other = UNet2DConditional.from_config(plain.unet.config.to_dict() | {"cross_attention_dim": 24})
    wrong = ControlNet.from_unet(other, conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(ConfigError, match="another base model") as info:
        LatentDiffusionPipeline.from_pipe(plain, controlnet=wrong)
    assert info.value.where == "controlnet.config.cross_attention_dim"
    assert (info.value.expected, info.value.found) == (plain.unet.config.cross_attention_dim, 24)
    factor8 = ControlNet.from_unet(plain.unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    with pytest.raises(ConfigError, match="hint_factor"):
        LatentDiffusionPipeline.from_pipe(plain, controlnet=[factor8])
    with pytest.raises(ConfigError, match="a ControlNet or a non-empty list"):
        LatentDiffusionPipeline.from_pipe(plain, controlnet=[])


def test_components_carry_the_controlnet_and_a_lone_multi_folder_is_refused(pipes, tmp_path):
    _, pipe, nets, _ = pipes
    other = ImageToImagePipeline.from_pipe(pipe)
    assert other.controlnet is pipe.controlnet and pipe.controlnet in pipe.networks()
    LatentDiffusionPipeline.from_pipe(pipe, controlnet=nets).save_pretrained(tmp_path / "multi")
    shutil.rmtree(tmp_path / "multi" / "controlnet_1")
    with pytest.raises(CheckpointError, match="numbered ControlNet folders"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "multi")
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "multi", controlnet=nets[1]).controlnet is nets[1]


def test_residuals_of_guess_mode_leave_the_unconditional_half_alone(pipes):
    _, _, nets, _ = pipes
    unit = ControlNetUnit(nets[0], torch.rand(1, 3, SIZE, SIZE), guess_mode=True)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, nets[0].config.cross_attention_dim)
    with torch.no_grad():
        r = unit.residuals(x, torch.tensor(500), context, added_cond=None, step=0, steps=1)
    assert isinstance(r, Residuals) and r.down is not None and r.mid is not None
    assert not r.mid[0].any() and r.mid[1].any() and all(not d[0].any() for d in r.down)


def test_a_compiled_unet_takes_the_residuals(pipes):
    """pipe.compile() (fullgraph) compiles the UNet's forward, residuals= included; the ControlNet runs eagerly."""
    plain, _, nets, _ = pipes
    eager = LatentDiffusionPipeline.from_pipe(plain, controlnet=nets[0])
    kw = dict(RUN, control_image=hint(), latents=latents(eager), num_inference_steps=2)
    expected = eager("a", **kw).images
    compiled = LatentDiffusionPipeline(**(eager.components | dict(unet=UNet2DConditional.from_config(
        plain.unet.config.to_dict()))))
    compiled.unet.load_state_dict(plain.unet.state_dict())
    compiled.compile(backend="eager")
    assert torch.allclose(compiled("a", **kw).images, expected, atol=1e-5)
