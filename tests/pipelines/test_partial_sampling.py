"""Every sampler started part-way (`sample(..., start_step=)`, `noise_to_start`): image-to-image at strength 0.6 and
inpainting with a plain UNet against diffusers on tiny random weights, analytic checks of the start, and the
step-callback contract (a returned tensor replaces the sample)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentdiff import InputError
from latentdiff.diffusion.noise_scheduler import NoiseScheduler
from latentdiff.diffusion.scheduler_io import load_scheduler_folder
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.inpaint import InpaintPipeline
from latentdiff.registry import SAMPLERS
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sd import SD_SCHEDULER, random_image, random_mask, run_both, tiny_diffusers_pipeline

PROMPT = "a photo of a cat"
STEPS = 5                # strength 0.6 keeps int(5 * 0.6) = 3 steps: the run starts at step 2 of 5
# our sampler -> the diffusers scheduler (and config keys) that runs it
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}


# ---- two diffusers bugs the reference must not carry (see docs/samplers.md) ----------------------------------
def lms_counting_its_slopes():
    """diffusers' LMSDiscreteScheduler takes its order from the step index on the whole grid, min(s + i + 1, 4),
    and zips those coefficients with the i + 1 slopes it has, so from s > 0 its first steps do not sum to the
    step (huggingface/diffusers#5630). This one takes the order of the slopes it has, as k-diffusion's img2img."""
    import diffusers

    class LMS(diffusers.LMSDiscreteScheduler):
        def get_lms_coefficient(self, order, t, current_order):
            return super().get_lms_coefficient(min(order, t - (self.begin_index or 0) + 1), t, current_order)

    return LMS


def img2img_with_pndm_warm_up():
    """diffusers' `get_timesteps` slices PNDM's list [t_0, t_1, t_1, t_2, ...] (the repeat is its warm-up's second
    call) at the start step s: from s = 2 the run starts at t_1 and, after the warm-up, calls the model at every
    sample with the next step's timestep. Here PNDM gets the list it builds for a run: the tail of its plan,
    second entry repeated."""
    import diffusers

    class Img2ImgWithPNDMWarmUp(diffusers.StableDiffusionImg2ImgPipeline):
        def get_timesteps(self, num_inference_steps, strength, device):
            _, kept = super().get_timesteps(num_inference_steps, strength, device)
            full = self.scheduler.timesteps
            tail = torch.cat([full[:1], full[2:]])[-kept:]
            return torch.cat([tail[:1], tail[1:2], tail[1:]]), kept

    return Img2ImgWithPNDMWarmUp


def diffusers_scheduler(name: str):
    import diffusers

    cls, options = SCHEDULERS[name]
    scheduler_class = lms_counting_its_slopes() if name == "lms" else getattr(diffusers, cls)
    return scheduler_class.from_config({**SD_SCHEDULER, **options})


def our_schedule(name: str, folder) -> tuple[NoiseScheduler, object]:
    """Our (noise scheduler, sampler) read from the diffusers class's own config file."""
    import diffusers

    cls, options = SCHEDULERS[name]
    getattr(diffusers, cls).from_config({**SD_SCHEDULER, **options}).save_config(folder / name)
    noise_scheduler, sampler = load_scheduler_folder(folder / name)
    assert isinstance(sampler, SAMPLERS.get(name))
    return noise_scheduler, sampler


@pytest.fixture(scope="module")
def setup(diffusers, tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    sds, ours = {}, {}
    for channels in (4, 9):
        sds[channels] = tiny_diffusers_pipeline(root / str(channels), unet_in_channels=channels)
        sds[channels].save_pretrained(root / f"sd{channels}")
    ours["img2img"] = ImageToImagePipeline.from_pretrained(root / "sd4")
    ours["inpaint"] = {c: InpaintPipeline.from_pretrained(root / f"sd{c}") for c in (4, 9)}
    return sds, ours, root


def with_sampler(pipe, name, root):
    noise_scheduler, sampler = our_schedule(name, root)
    return type(pipe)(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, noise_scheduler=noise_scheduler,
                      sampler=sampler)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_image_to_image_parity_for_every_sampler(diffusers, setup, name):
    sds, ours, root = setup
    reference_class = img2img_with_pndm_warm_up() if name == "plms" else diffusers.StableDiffusionImg2ImgPipeline
    ref = reference_class(**(sds[4].components | {"scheduler": diffusers_scheduler(name)}))
    ref.set_progress_bar_config(disable=True)
    (images, latents), (expected, expected_latents) = run_both(
        ref, with_sampler(ours["img2img"], name, root), PROMPT, image=Image.fromarray(random_image()),
        strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5, gens=(3,))
    assert_parity(images, expected)
    assert_parity(latents, expected_latents)


@pytest.mark.parametrize("name, channels, strength", [
    ("euler", 4, 0.6), ("euler", 4, 1.0), ("dpmpp_2m", 4, 0.6), ("euler_ancestral", 9, 0.6)])
def test_inpainting_parity_with_a_sigma_space_sampler(diffusers, setup, name, channels, strength):
    """A plain UNet blends the known region in the sampler's own scale (z0 + sigma eps for Euler, where diffusers'
    DPM-Solver holds x_t); an inpainting UNet gets the mask after the sampler scaled x."""
    sds, ours, root = setup
    ref = diffusers.StableDiffusionInpaintPipeline(**(sds[channels].components |
                                                      {"scheduler": diffusers_scheduler(name)}))
    ref.set_progress_bar_config(disable=True)
    (images, latents), (expected, expected_latents) = run_both(
        ref, with_sampler(ours["inpaint"][channels], name, root), PROMPT, image=Image.fromarray(random_image()),
        mask_image=Image.fromarray(random_mask()), strength=strength, num_inference_steps=STEPS,
        guidance_scale=7.5, gens=(channels,))
    assert_parity(images, expected)
    assert_parity(latents, expected_latents)


# ---- the samplers themselves, on a toy denoiser ---------------------------------------------------------------
def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


SHAPE = (2, 4, 8, 8)


def _randn(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gens():
    return [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_start_step_zero_is_a_plain_run(name):
    sampler, ns = SAMPLERS.get(name)(), NoiseScheduler()
    plain = sampler.sample(toy_model, _randn(0), ns, 6, generator=_gens())
    assert torch.equal(sampler.sample(toy_model, _randn(0), ns, 6, start_step=0, generator=_gens()), plain)


DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m"]


@pytest.mark.parametrize("start_step", [1, 3, 5])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_exact_eps_keeps_every_state_on_the_forward_process(name, start_step):
    """A denoiser that returns the very noise mixed into x0 is exact: from noise_to_start, a deterministic sampler
    must then stay on the forward process, state i = plan.noised(x0, noise, i + 1) after every step, whatever
    step it starts at (LMS and DPM-Solver with their history reset, which diffusers' LMS gets wrong)."""
    sampler, ns, n = SAMPLERS.get(name)(), NoiseScheduler(), 6
    x0, noise = _randn(0), _randn(1)
    plan = sampler.plan(ns, n, start_step=start_step)
    assert plan.start_step == start_step and len(plan.timesteps) == n - start_step
    assert torch.equal(torch.as_tensor(plan.timesteps), torch.as_tensor(sampler.plan(ns, n).timesteps)[start_step:])
    states = []
    x_start = sampler.noise_to_start(x0, noise, ns, n, start_step)
    out = sampler.sample(lambda x, t: noise, x_start, ns, n, start_step=start_step,
                         callback=lambda i, t, x: states.append(x))
    assert len(states) == n - start_step
    for i, state in enumerate(states):
        assert max_rel_error(state, plan.noised(x0, noise, i + 1)) < 1e-10, i
    assert max_rel_error(out, plan.noised(x0, noise, n - start_step) * getattr(plan, "final_scale", 1.0)) < 1e-10


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_noise_to_start_is_the_forward_process_on_the_networks_scale(name):
    """From step s > 0 the x a sampler takes is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise at its t_s (exact
    for DDIM's integer t; sigma space: the same at sigma_s, i.e. (x0 + sigma_s noise) / sqrt(sigma_s^2 + 1))."""
    sampler, ns = SAMPLERS.get(name)(timestep_spacing="leading"), NoiseScheduler()
    x0, noise = _randn(0), _randn(1)
    t = float(sampler.plan(ns, 10, start_step=4).timesteps[0])
    assert t.is_integer() and t < 999           # "leading": trained timesteps, where add_noise is defined
    expected = ns.add_noise(x0, noise, torch.tensor(int(t)))
    assert_parity(sampler.noise_to_start(x0, noise, ns, 10, 4), expected, tol=1e-6)


@pytest.mark.parametrize("bad", [-1, 6, 7, 1.5, True, "2"])
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_bad_start_step_is_an_input_error(name, bad):
    sampler = SAMPLERS.get(name)()
    with pytest.raises(InputError) as info:
        sampler.sample(toy_model, _randn(0), NoiseScheduler(), 6, start_step=bad)
    assert info.value.where == "start_step"


# ---- the callback contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_a_tensor_the_callback_returns_replaces_the_sample(name):
    """After step 1 the callback returns R: the next model call sees R (on the network's scale), the tensor the
    sampler handed over is not written, and a replacement after the last step is the result."""
    sampler, ns, n = SAMPLERS.get(name)(), NoiseScheduler(), 5
    replacement, inputs, handed = _randn(7), [], []

    def denoise(x, t):
        inputs.append(x)
        return toy_model(x, t)

    def callback(i, t, x):
        handed.append((x, x.clone()))
        return replacement if i in (1, n - 1) else None

    out = sampler.sample(denoise, _randn(0), ns, n, generator=_gens(), callback=callback)
    two_calls = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")   # a midpoint call per step
    calls_per_step = {"plms": [2, 1], **{k: [2, 2] for k in two_calls}}.get(name, [1, 1])   # the calls of steps 0, 1
    after = inputs[sum(calls_per_step)]
    sigmas = getattr(sampler.plan(ns, n), "sigmas", None)
    scale = 1.0 if sigmas is None else 1 / (sigmas[2] ** 2 + 1) ** 0.5
    assert_parity(after, replacement * scale, tol=1e-12)
    assert all(torch.equal(x, copy) for x, copy in handed)
    assert torch.equal(out, replacement)   # the last sigma is 0: DPM-Solver's final scale is 1


def test_a_callback_returning_something_else_is_an_input_error():
    for sampler in (SAMPLERS.get("ddim")(), SAMPLERS.get("euler")()):
        for bad in (torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float32), 3):
            with pytest.raises(InputError) as info:
                sampler.sample(toy_model, _randn(0), NoiseScheduler(), 3, callback=lambda i, t, x, *, bad=bad: bad)
            assert info.value.where == "callback"


def test_the_inpaint_blend_returns_the_blended_sample(diffusers, setup):
    """m x + (1 - m) plan.noised(z0, eps, i + 1) after step i (z0 after the last), without writing into x."""
    _, ours, _ = setup
    pipe = ours["inpaint"][4]
    sampler = SAMPLERS.get("euler")()
    plan = sampler.plan(pipe.noise_scheduler, 5, start_step=2)
    z0, eps, x = _randn(0), _randn(1), _randn(2)
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).double()
    seen = []
    blend = pipe.blend_known_region(z0, eps, mask, plan, callback=lambda i, t, x: seen.append(x))
    x_copy = x.clone()
    for i, known in ((0, z0 + plan.sigmas[1] * eps), (2, z0)):
        blended = blend(i, int(plan.timesteps[i]), x)
        assert torch.equal(x, x_copy)
        assert_parity(blended, mask * x + (1 - mask) * known, tol=1e-12)
        assert seen[-1] is blended
