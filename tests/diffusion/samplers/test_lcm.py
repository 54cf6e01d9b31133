"""LCMSampler: step-by-step parity with diffusers' LCMScheduler in float64 (fixed noise), the timestep grid for every
step count, the boundary condition, and the scheduler-file round trip."""
from __future__ import annotations

import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import LCMSampler
from latentdiff.diffusion.samplers.consistency import consistency_scalings, lcm_timesteps
from latentdiff.errors import ConfigError, InputError
from latentdiff.registry import SAMPLERS
from tests._support.parity import assert_parity

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, per-sample stand-in for a network: bounded and t-dependent."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("original", [50, 25, 1000])
def test_timesteps_match_diffusers_for_every_step_count(diffusers, original):
    ref = diffusers.LCMScheduler(**SD, original_inference_steps=original)
    for n in range(1, original + 1, 1 if original <= 50 else 37):
        ref.set_timesteps(n)
        assert lcm_timesteps(1000, n, original) == ref.timesteps.tolist()
    assert lcm_timesteps(1000, 4, 50) == [999, 759, 499, 259]
    with pytest.raises(InputError, match="inference_steps"):    # N > P (or, for P = T, N > T)
        lcm_timesteps(1000, original + 1, original)


CASES = [("epsilon", False, 4, False), ("v_prediction", False, 4, False), ("sample", False, 2, False),
         ("v_prediction", True, 4, False), ("epsilon", False, 8, True), ("epsilon", False, 1, False)]


@pytest.mark.parametrize("prediction_type,rescale,n,clip", CASES)
def test_every_step_matches_diffusers_float64(diffusers, prediction_type, rescale, n, clip):
    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=rescale))
    sampler = LCMSampler(clip_sample=clip, clip_sample_range=1.5)
    ref = diffusers.LCMScheduler(**SD, prediction_type=prediction_type, rescale_betas_zero_snr=rescale,
                                 clip_sample=clip, clip_sample_range=1.5)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj, denoised_list, seen = [x], [], []

    def callback(i, t, x_new, denoised):
        seen.append((i, t))
        traj.append(x_new)
        denoised_list.append(denoised)

    out = sampler.sample(toy_model, x, ns, n, generator=_gens(3, 4), callback=callback)
    assert torch.equal(out, traj[-1]) and len(traj) == n + 1
    ref.set_timesteps(n)
    assert seen == list(enumerate(ref.timesteps.tolist()))
    gens = _gens(3, 4)   # the same draws in the same order: one per step but the last
    for i, t in enumerate(ref.timesteps):
        step = ref.step(toy_model(traj[i], t), t, traj[i], generator=gens)
        assert_parity(traj[i + 1], step.prev_sample, tol=1e-5)
        assert_parity(denoised_list[i], step.denoised, tol=1e-5)
    y, gens = x.clone(), _gens(3, 4)
    ref.set_timesteps(n)
    for t in ref.timesteps:
        y = ref.step(toy_model(y, t), t, y, generator=gens).prev_sample
    assert_parity(out, y, tol=1e-5)


def test_boundary_condition():
    """f(x, 0) = x: c_skip(0) = 1, c_out(0) = 0; c_skip^2 + c_out^2 / ... as in the paper's eq. 9 (sigma_data 0.5)."""
    assert consistency_scalings(0.0) == (1.0, 0.0)
    c_skip, c_out = consistency_scalings(999.0, timestep_scaling=10.0)
    s = 9990.0
    assert c_skip == pytest.approx(0.25 / (s**2 + 0.25)) and c_out == pytest.approx(s / (s**2 + 0.25) ** 0.5)
    t = torch.tensor([0.0, 19.0, 999.0])
    tensor_skip, tensor_out = consistency_scalings(t)
    for k, v in enumerate(t.tolist()):
        assert tensor_skip[k].item() == pytest.approx(consistency_scalings(v)[0])
        assert tensor_out[k].item() == pytest.approx(consistency_scalings(v)[1])


def test_settings_are_checked_and_registered():
    assert SAMPLERS.get("lcm") is LCMSampler
    with pytest.raises(ConfigError, match="original_inference_steps"):
        LCMSampler(original_inference_steps=0)
    with pytest.raises(ConfigError, match="timestep_scaling"):
        LCMSampler(timestep_scaling=0.0)
    with pytest.raises(TypeError):
        LCMSampler(eta=0.5)   # type: ignore[call-arg]


def test_start_step_runs_the_tail_of_the_plan():
    ns = NoiseScheduler(NoiseSchedulerConfig())
    sampler = LCMSampler()
    plan = sampler.plan(ns, 4, start_step=2)
    assert plan.timesteps == [499, 259] and len(plan.alphas_cumprod) == 3
    seen = []
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sampler.sample(toy_model, x, ns, 4, start_step=2, generator=torch.Generator().manual_seed(0),
                   callback=lambda i, t, x: seen.append(t))
    assert seen == [499, 259]


@pytest.mark.parametrize("text", ["LCM", "lcm", "LCMScheduler", "LCMSampler"])
def test_a1111_comfyui_and_diffusers_names_resolve(text):
    from latentdiff.diffusion.samplers.names import resolve_sampler, sampler_from_name

    assert resolve_sampler(text).name == "lcm"
    assert isinstance(sampler_from_name(text), LCMSampler)


def test_scheduler_config_round_trip(diffusers, tmp_path):
    """Our LCMScheduler file loads in diffusers with the same settings, and diffusers' file loads as LCMSampler."""
    from latentdiff.diffusion.scheduler_io import read_scheduler_config, scheduler_file_config

    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    sampler = LCMSampler(original_inference_steps=25, timestep_scaling=5.0)
    data = scheduler_file_config(ns, sampler)
    assert data["_class_name"] == "LCMScheduler"
    ref = diffusers.LCMScheduler.from_config(data)
    assert ref.config.original_inference_steps == 25 and ref.config.timestep_scaling == 5.0
    assert ref.config.prediction_type == "v_prediction" and ref.config.rescale_betas_zero_snr
    schedule, back = read_scheduler_config(dict(ref.config))
    assert back == sampler and schedule == ns.config
    _, default = read_scheduler_config({"_class_name": "LCMScheduler"})
    assert default == LCMSampler()
