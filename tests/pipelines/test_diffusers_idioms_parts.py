"""The pipeline idioms diffusers users type (issue 15): `pipe.to(dtype)` / `pipe.to(device, dtype)` in any order,
`pipe.dtype`, `pipe.device`, `pipe.components` shared across the text pipelines, and the scheduler swap
`pipe.scheduler = Sampler.from_config(pipe.scheduler.config)`; side by side with diffusers where it has the idiom."""
from __future__ import annotations

import pytest
import torch

from latentdiff import ConfigError, InputError
from latentdiff.diffusion.samplers import DDIMSampler, DPMSolverMultistepSampler, EulerSampler
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sd import seeds, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(diffusers' tiny SD pipeline, its folder), the scheduler PNDM as in the SD v1 folders."""
    root = tmp_path_factory.mktemp("idioms")
    ref = tiny_diffusers_pipeline(root, scheduler_class="PNDMScheduler")
    ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config, skip_prk_steps=True)   # as SD v1's
    ref.save_pretrained(root / "sd")
    return ref, root / "sd"


@pytest.fixture
def pipe(folders):
    return LatentDiffusionPipeline.from_pretrained(folders[1])


def parameter_dtypes(pipe) -> set[torch.dtype]:
    return {p.dtype for network in pipe.networks() for p in network.parameters()}


# ---- pipe.to, pipe.dtype, pipe.device -------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs", [
    ((torch.bfloat16,), {}),
    (("cpu", torch.bfloat16), {}),
    ((torch.bfloat16, "cpu"), {}),          # either order (diffusers wants the device first)
    ((), dict(device="cpu", dtype=torch.bfloat16)),
    ((torch.device("cpu"),), dict(dtype=torch.bfloat16)),
    ((), dict(dtype=torch.bfloat16)),
])
def test_to_takes_a_dtype_a_device_or_both(pipe, args, kwargs):
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert pipe.to(*args, **kwargs) is pipe
    assert pipe.dtype == torch.bfloat16 and parameter_dtypes(pipe) == {torch.bfloat16}
    assert pipe.device == torch.device("cpu")
    pipe.to("cpu")                            # a device alone keeps the dtype
    assert pipe.dtype == torch.bfloat16


def test_to_and_dtype_as_in_diffusers(folders, diffusers):
    ref, _ = folders
    ref = diffusers.StableDiffusionPipeline(**ref.components)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    for args in [(torch.bfloat16,), ("cpu", torch.float16), ("cpu",), (torch.float32,)]:
        ref.to(*args)
        ours.to(*args)
        assert ours.dtype == ref.dtype and ours.device == ref.device


@pytest.mark.parametrize("args, kwargs, where", [
    ((3.5,), {}, "device"),
    (("float16",), {}, "device"),
    ((torch.float16, torch.bfloat16), {}, "to(dtype=...)"),
    (("cpu", "cpu"), {}, "to(dtype=...)"),
    ((), dict(dtype="float16"), "dtype"),
    ((torch.int8,), {}, "dtype"),
    (("cuda:99",), {}, "device"),
])
def test_to_refuses_what_is_neither_device_nor_dtype(pipe, args, kwargs, where):
    with pytest.raises(InputError) as info:
        pipe.to(*args, **kwargs)
    assert where in str(info.value)
    assert pipe.dtype == torch.float32


# ---- pipe.components --------------------------------------------------------------------------------
def test_components_are_shared_across_the_text_pipelines(pipe, diffusers, folders):
    parts = pipe.components
    # the optional control parts are components too (None here), as diffusers lists its None parts
    assert set(parts) == {"vae", "unet", "text_encoder", "noise_scheduler", "sampler", "controlnet", "adapter"}
    same = LatentDiffusionPipeline(**parts)
    img2img = ImageToImagePipeline(**parts)           # diffusers: StableDiffusionImg2ImgPipeline(**pipe.components)
    inpaint = InpaintPipeline(**img2img.components)
    for other in (same, img2img, inpaint, ImageToImagePipeline.from_pipe(inpaint)):
        assert all(getattr(other, name) is part for name, part in parts.items())   # shared, not reloaded
    # the diffusers idiom the test mirrors
    ref = folders[0]
    assert diffusers.StableDiffusionImg2ImgPipeline(**ref.components).unet is ref.unet
    # the same images from the shared parts
    kw = dict(num_inference_steps=2, output_type="latent", progress=False)
    a = pipe(PROMPT, generator=seeds(0), **kw).images
    b = same(PROMPT, generator=seeds(0), **kw).images
    assert torch.equal(a, b)


def test_from_pipe_takes_the_parts_a_class_needs_and_changes(pipe):
    sampler = EulerSampler()
    img2img = ImageToImagePipeline.from_pipe(pipe, sampler=sampler)
    assert img2img.unet is pipe.unet and img2img.sampler is sampler and pipe.sampler is not sampler
    with pytest.raises(TypeError, match="safety_checker"):
        ImageToImagePipeline.from_pipe(pipe, safety_checker=None)
    with pytest.raises(InputError, match="pipeline"):
        ImageToImagePipeline.from_pipe(object())


# ---- the scheduler swap -------------------------------------------------------------------------------
def test_scheduler_is_the_sampler(pipe):
    assert pipe.scheduler is pipe.sampler
    euler = EulerSampler()
    pipe.scheduler = euler
    assert pipe.sampler is euler
    pipe.sampler = DDIMSampler()
    assert isinstance(pipe.scheduler, DDIMSampler)


@pytest.mark.parametrize("attribute", ["scheduler", "sampler"])
def test_from_config_swap_matches_diffusers(folders, diffusers, attribute):
    folder = folders[1]
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)   # the folder's file: spacing "leading", offset 1
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    setattr(pipe, attribute, DPMSolverMultistepSampler.from_config(getattr(pipe, attribute).config))
    assert (pipe.sampler.timestep_spacing, pipe.sampler.steps_offset) == ("leading", 1)   # the folder's
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        expected = torch.from_numpy(ref(PROMPT, generator=seeds(0), **kw).images)
    ours = torch.from_numpy(pipe(PROMPT, generator=seeds(0), progress=False, **kw).images)
    assert_parity(ours, expected)
    # the naive swap (the sampler's own defaults, offset 0) differs: the test can fail
    pipe.sampler = DPMSolverMultistepSampler()
    naive = torch.from_numpy(pipe(PROMPT, generator=seeds(0), progress=False, **kw).images)
    assert max_rel_error(naive, expected) > 1e-3


def test_keys_the_file_left_out_take_the_new_samplers_defaults_as_in_diffusers(folders, diffusers, tmp_path):
    """Stable Diffusion v1.5's scheduler file has no timestep_spacing: diffusers' from_config then gives
    DPM-Solver its own default, "linspace", not PNDM's "leading"; so does latentdiff."""
    import json
    import shutil

    folder = shutil.copytree(folders[1], tmp_path / "sd15")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}))
    ref = diffusers.DPMSolverMultistepScheduler.from_config(diffusers.PNDMScheduler.from_pretrained(
        folder, subfolder="scheduler").config)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert pipe.scheduler.timestep_spacing == "leading"           # PNDM's default
    pipe.scheduler = DPMSolverMultistepSampler.from_config(pipe.scheduler.config)
    assert (pipe.scheduler.timestep_spacing, pipe.scheduler.steps_offset) == (ref.config.timestep_spacing, 1)
    ref.set_timesteps(10)
    assert pipe.scheduler.timesteps(pipe.noise_scheduler, 10).tolist() == ref.timesteps.tolist()
    # the same from a latentdiff sampler built by hand: every setting is carried
    assert DPMSolverMultistepSampler.from_config(DDIMSampler(steps_offset=1).config).timestep_spacing == "leading"


def test_from_config_reads_samplers_and_diffusers_configs(diffusers):
    ddim = DDIMSampler(timestep_spacing="trailing", steps_offset=1, eta=0.5)
    assert ddim.config["steps_offset"] == 1 and ddim.config["_class_name"] == "DDIMSampler"
    for source in (ddim, ddim.config):
        euler = EulerSampler.from_config(source)
        assert (euler.timestep_spacing, euler.steps_offset) == ("trailing", 1)
    assert DDIMSampler.from_config(ddim.config) == ddim
    assert DPMSolverMultistepSampler.from_config(ddim.config, steps_offset=0).steps_offset == 0
    # a diffusers config: its keys this sampler has, and its sigma grid flags
    config = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, timestep_spacing="trailing",
                                                   solver_order=2).config
    dpm = DPMSolverMultistepSampler.from_config(config)
    assert (dpm.sigma_schedule, dpm.timestep_spacing, dpm.solver_order) == ("karras", "trailing", 2)
    with pytest.raises(ConfigError, match="steps_offset"):
        DDIMSampler.from_config({"steps_offset": -1})
    with pytest.raises(InputError, match="config"):
        DDIMSampler.from_config("ddim")


@pytest.mark.parametrize("attribute", ["scheduler", "sampler"])
def test_a_diffusers_scheduler_is_refused_naming_its_sampler(pipe, diffusers, attribute):
    before = pipe.sampler
    cases = [(diffusers.DPMSolverMultistepScheduler(), "DPMSolverMultistepSampler"),
             (diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "DPMSolverMultistepSDESampler"),
             (diffusers.EulerAncestralDiscreteScheduler(), "EulerAncestralSampler"),
             (diffusers.UniPCMultistepScheduler(), "UniPCSampler"),
             (diffusers.DPMSolverSinglestepScheduler(), "implements none")]
    for scheduler, named in cases:
        with pytest.raises(InputError, match=named) as info:
            setattr(pipe, attribute, scheduler)
        assert info.value.where == attribute and type(scheduler).__name__ in str(info.value)
    with pytest.raises(InputError, match="latentdiff sampler"):
        setattr(pipe, attribute, "dpmpp_2m")
    assert pipe.sampler is before
    with pytest.raises(InputError, match="DDIMSampler"):     # in the constructor too, before any call
        LatentDiffusionPipeline(**(pipe.components | dict(sampler=diffusers.DDIMScheduler())))


def test_components_rebuild_the_ldm_family_pipelines(tmp_path, diffusers):
    from latentdiff.models.unet2d import UNet2D
    from latentdiff.models.vq import VQModel
    from latentdiff.pipelines.class_conditional import ClassConditionalPipeline
    from latentdiff.pipelines.unconditional import UnconditionalPipeline
    from tests._support.ldm import ours, tiny_unet2d, tiny_vq

    vq = ours(tiny_vq(), VQModel, tmp_path / "vq")
    uncond = UnconditionalPipeline(vae=vq, unet=ours(tiny_unet2d(), UNet2D, tmp_path / "unet"))
    again = UnconditionalPipeline(**uncond.components)
    assert again.unet is uncond.unet and again.vae is vq and again.sampler is uncond.sampler
    labels = {0: "cat", 1: "dog", 2: "fox", 3: "owl"}
    classes = ClassConditionalPipeline(vae=vq, unet=ours(tiny_unet2d(num_class_embeds=5), UNet2D, tmp_path / "cls"),
                                       id2label=labels, null_class=4)
    rebuilt = ClassConditionalPipeline(**classes.components)            # the options travel too
    assert rebuilt.unet is classes.unet and rebuilt.id2label == classes.id2label and rebuilt.null_class == 4
