"""DDIM / DDPM samplers: parity with diffusers' schedulers step by step, float64 references, analytic tests."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from latentdiff.diffusion import sampling
from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import DDIMSampler, DDPMSampler
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity, max_rel_error

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, per-sample stand-in for a network: bounded and t-dependent."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


def _schedules(prediction_type="epsilon", rescale=False):
    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=rescale))
    ref_kw = dict(SD, prediction_type=prediction_type, rescale_betas_zero_snr=rescale)
    return ns, ref_kw


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _x_T(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _trajectory(sampler, ns, n, x, **kw):
    """[x_T, x after step 0, ..., x_0] via the callback; checks that the callback sees every step."""
    traj, seen = [x], []

    def callback(i, t, x_new):
        seen.append((i, t))
        traj.append(x_new)

    out = sampler.sample(toy_model, x, ns, n, callback=callback, **kw)
    assert torch.equal(out, traj[-1])
    assert seen == list(enumerate(sampler.timesteps(ns, n).tolist()))
    return traj


# ---- the timestep grid ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_diffusers_for_every_step_count(diffusers, spacing, offset):
    ns = NoiseScheduler()
    ddim, ddpm = DDIMSampler(timestep_spacing=spacing, steps_offset=offset), DDPMSampler(timestep_spacing=spacing,
                                                                                         steps_offset=offset)
    ref = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    ref_ddpm = diffusers.DDPMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    for n in range(1, 1001):
        if spacing == "leading" and offset == 1 and n == 1000:   # diffusers returns timestep 1000: out of range
            with pytest.raises(InputError, match="steps_offset"):
                ddim.timesteps(ns, n)
            continue
        ours = ddim.timesteps(ns, n)
        assert ours.dtype == torch.long and len(ours) == n and ours.min() >= 0 and ours.max() < 1000
        assert bool((ours[:-1] > ours[1:]).all()), "descending, no repeats"
        ref.set_timesteps(n)
        # diffusers' float arange yields n + 1 "trailing" steps for some n (e.g. 61), the extra one being -1
        assert ours.tolist() == ref.timesteps.tolist()[:n] and ref.timesteps.tolist()[n:] in ([], [-1])
        if n % 97 == 1:
            ref_ddpm.set_timesteps(n)
            assert ddpm.timesteps(ns, n).tolist() == ref_ddpm.timesteps.tolist()[:n]


# ---- DDIM ----------------------------------------------------------------------------------------------------
# (spacing, steps_offset, N) where diffusers' prev_t = t - T // N lands on the next entry of the grid
ON_GRID = [("leading", 1, 10), ("leading", 0, 7), ("trailing", 0, 10)]
# ... and where it does not: diffusers steps off its own grid, so we test against a float64 reference
OFF_GRID = [("trailing", 0, 7), ("linspace", 0, 10)]


def _ddim_cases():
    for spacing, offset, n in ON_GRID:
        for prediction_type in ("epsilon", "v_prediction", "sample"):
            for eta in (0.0, 1.0):
                yield spacing, offset, n, prediction_type, eta, False, False
    yield "leading", 1, 10, "sample", 0.5, True, False           # clipped x0_pred
    yield "trailing", 0, 10, "v_prediction", 0.0, False, True    # zero terminal SNR: the first abar_t is 0


@pytest.mark.parametrize("spacing,offset,n,prediction_type,eta,clip,rescale", list(_ddim_cases()))
def test_ddim_every_step_matches_diffusers(diffusers, spacing, offset, n, prediction_type, eta, clip, rescale):
    ns, ref_kw = _schedules(prediction_type, rescale)
    sampler = DDIMSampler(eta=eta, timestep_spacing=spacing, steps_offset=offset, clip_sample=clip,
                          clip_sample_range=1.5)
    ref = diffusers.DDIMScheduler(**ref_kw, timestep_spacing=spacing, steps_offset=offset, clip_sample=clip,
                                  clip_sample_range=1.5, set_alpha_to_one=False)
    x = _x_T()
    traj = _trajectory(sampler, ns, n, x, generator=_gens(1, 2))
    ref.set_timesteps(n)
    gens = _gens(1, 2)
    for i, t in enumerate(ref.timesteps):   # every step from the same input
        expected = ref.step(toy_model(traj[i], t), t, traj[i], eta=eta, generator=gens).prev_sample
        assert_parity(traj[i + 1], expected)
    y, gens = x.clone(), _gens(1, 2)         # and the whole run, each library on its own trajectory
    for t in ref.timesteps:
        y = ref.step(toy_model(y, t), t, y, eta=eta, generator=gens).prev_sample
    assert_parity(traj[-1], y)


def _ddim_reference64(x, timesteps, abar, final, prediction_type, eta, gens):
    """Song et al. 2021, eq. 12, in float64, stepping along the timestep list."""
    x = x.double()
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else final
        out = toy_model(x, torch.tensor(t))
        if prediction_type == "epsilon":
            eps, x0 = out, (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        elif prediction_type == "v_prediction":
            x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps   # exactly 0 when a_t = 0
        if eta > 0:
            z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens]).double()
            x = x + sigma * z
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type,rescale", [("epsilon", False), ("v_prediction", False),
                                                     ("v_prediction", True), ("sample", False)])
@pytest.mark.parametrize("spacing,offset,n", ON_GRID + OFF_GRID)
def test_ddim_matches_float64_reference(diffusers, spacing, offset, n, prediction_type, rescale, eta):
    """Also where diffusers cannot be the oracle: off its grid (see below), and at a zero-SNR first step with
    eta = 1, where diffusers' float32 sqrt(1 - abar_prev - sigma^2) cancels to sqrt(+-6e-8) (3e-4 off, or NaN)."""
    ns, ref_kw = _schedules(prediction_type, rescale)
    ref = diffusers.DDIMScheduler(**ref_kw, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    abar = ref.alphas_cumprod.double()
    x = _x_T()
    out = DDIMSampler(eta=eta, timestep_spacing=spacing, steps_offset=offset).sample(
        toy_model, x, ns, n, generator=_gens(1, 2))
    expected = _ddim_reference64(x, ref.timesteps.tolist(), abar, abar[0], prediction_type, eta, _gens(1, 2))
    assert_parity(out, expected)


@pytest.mark.parametrize("spacing,offset,n", OFF_GRID)
def test_diffusers_ddim_steps_off_its_grid_where_we_follow_the_list(diffusers, spacing, offset, n):
    """Documents the discrepancy: diffusers 0.42 DDIMScheduler.step goes to t - T // N, not to the next grid
    entry. Our pure `ddim_step` reproduces diffusers exactly when fed diffusers' stride target, proving
    that the only difference is the choice of the previous timestep."""
    ns, ref_kw = _schedules("epsilon")
    ref = diffusers.DDIMScheduler(**ref_kw, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False,
                                  clip_sample=False)
    ref.set_timesteps(n)
    grid = ref.timesteps.tolist()
    abar = ns.alphas_cumprod.tolist()
    stride_prev = [t - 1000 // n for t in grid]
    assert stride_prev != grid[1:] + [stride_prev[-1]], "diffusers' stride leaves the grid it set"
    x = _x_T()
    for t, prev in zip(grid, stride_prev, strict=True):
        abar_prev = abar[prev] if prev >= 0 else abar[0]
        x0, eps = sampling.model_output_to_x0_eps(toy_model(x, torch.tensor(t)), x, abar[t], "epsilon")
        ours = sampling.ddim_step(x0, eps, abar[t], abar_prev)
        expected = ref.step(toy_model(x, torch.tensor(t)), t, x).prev_sample
        assert_parity(ours, expected)
        x = expected


# ---- DDPM ----------------------------------------------------------------------------------------------------
DDPM_CASES = [("leading", 0, "fixed_small"), ("leading", 0, "fixed_large"), ("leading", 1, "fixed_small"),
              ("trailing", 0, "fixed_small"), ("linspace", 0, "fixed_small")]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset,variance_type", DDPM_CASES)
def test_ddpm_ancestral_sampling_matches_diffusers(diffusers, spacing, offset, variance_type, prediction_type):
    """diffusers adds noise when t > 0; we skip it at the last step (Algorithm 2). The two agree exactly for
    leading/offset 0 (last t = 0); elsewhere diffusers adds sqrt(1e-20) z at the last "fixed_small" step."""
    ns, ref_kw = _schedules(prediction_type)
    clip = prediction_type == "sample"
    sampler = DDPMSampler(variance_type=variance_type, timestep_spacing=spacing, steps_offset=offset,
                          clip_sample=clip)
    ref = diffusers.DDPMScheduler(**ref_kw, variance_type=variance_type, timestep_spacing=spacing,
                                  steps_offset=offset, clip_sample=clip)
    x = _x_T()
    traj = _trajectory(sampler, ns, 10, x, generator=_gens(3, 4))
    ref.set_timesteps(10)
    gens = _gens(3, 4)
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(toy_model(traj[i], t), t, traj[i], generator=gens).prev_sample
        assert_parity(traj[i + 1], expected)
    y, gens = x.clone(), _gens(3, 4)
    for t in ref.timesteps:
        y = ref.step(toy_model(y, t), t, y, generator=gens).prev_sample
    assert_parity(traj[-1], y)


def test_ddim_eta_one_step_is_the_ddpm_posterior():
    """Song et al. 2021, sec. 4.1: with eta = 1 the DDIM update is DDPM's ancestral step (same mean and variance)."""
    g = torch.Generator().manual_seed(5)
    x_t, x0, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    abar_t, abar_prev = 0.3, 0.6
    eps = (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    ddim = sampling.ddim_step(x0, eps, abar_t, abar_prev, eta=1.0, noise=z)
    ddpm = sampling.ddpm_step(x_t, x0, abar_t, abar_prev, variance_type="fixed_small", noise=z)
    assert_parity(ddim, ddpm, tol=1e-12)


# ---- analytic: an oracle denoiser ------------------------------------------------------------------------
def _oracle(ns, x0, prediction_type):
    abar_table = ns.alphas_cumprod.double()

    def denoise(x_t, t):
        assert t.ndim == 0 and t.dtype == torch.long and t.device == x_t.device
        a = abar_table[t]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()   # the true noise of x_t given the known x0
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]

    return denoise


@pytest.mark.parametrize("sampler", [DDIMSampler(set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1),
                                     DDIMSampler(set_alpha_to_one=True, timestep_spacing="trailing"),
                                     DDIMSampler(set_alpha_to_one=True, timestep_spacing="linspace"),
                                     DDPMSampler(timestep_spacing="trailing")])
@pytest.mark.parametrize("prediction_type,rescale", [("epsilon", False), ("v_prediction", False),
                                                     ("v_prediction", True), ("sample", False)])
def test_oracle_denoiser_recovers_x0_exactly(sampler, prediction_type, rescale):
    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=rescale))
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    out = sampler.sample(_oracle(ns, x0, prediction_type), _x_T(dtype=torch.float64), ns, 13,
                         generator=_gens(1, 2))
    assert_parity(out, x0, tol=1e-9)


# ---- threads, generators, devices -------------------------------------------------------------------------
def test_one_sampler_shared_by_two_threads():
    sampler, ns = DDIMSampler(eta=1.0), NoiseScheduler()
    jobs = {10: (1, 2), 25: (3, 4)}

    def run(n):
        return sampler.sample(toy_model, _x_T(n), ns, n, generator=_gens(*jobs[n]))

    sequential = {n: run(n) for n in jobs}
    barrier, results = threading.Barrier(len(jobs)), {}

    def worker(n):
        barrier.wait()
        results[n] = [run(n) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for n in jobs:
        assert all(torch.equal(r, sequential[n]) for r in results[n])


@pytest.mark.parametrize("sampler", [DDIMSampler(eta=1.0), DDPMSampler()])
def test_image_i_of_a_batch_equals_its_seed_alone(sampler):
    ns = NoiseScheduler()
    from latentdiff.diffusion.noise import randn

    def generate(seeds):
        gens = _gens(*seeds)
        x_T = randn((len(seeds), *SHAPE[1:]), generator=gens)   # as the pipeline draws x_T
        return sampler.sample(toy_model, x_T, ns, 8, generator=gens)

    batch = generate([1, 2])
    assert_parity(batch[0:1], generate([1]), tol=1e-6)
    assert_parity(batch[1:2], generate([2]), tol=1e-6)
    assert max_rel_error(batch[0], batch[1]) > 0.01, "different seeds give different images"
    one = sampler.sample(toy_model, _x_T()[:1], ns, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(one, sampler.sample(toy_model, _x_T()[:1], ns, 8, generator=[torch.Generator().manual_seed(7)]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", [DDIMSampler(eta=1.0), DDPMSampler()])
def test_cpu_and_cuda_agree_with_cpu_generators(sampler):
    ns = NoiseScheduler()
    cpu = sampler.sample(toy_model, _x_T(), ns, 10, generator=_gens(1, 2))
    gpu = sampler.sample(toy_model, _x_T().cuda(), ns, 10, generator=_gens(1, 2))
    assert gpu.device.type == "cuda"
    assert_parity(gpu.cpu(), cpu)


# ---- settings and bad input ----------------------------------------------------------------------------------
def test_samplers_are_frozen_registered_and_strict():
    from latentdiff.registry import COMPONENTS, SAMPLERS

    s = DDIMSampler(eta=0.3)
    assert SAMPLERS.get("ddim") is DDIMSampler and SAMPLERS.get("ddpm") is DDPMSampler
    assert SAMPLERS.create("ddim", eta=0.3) == s and isinstance(COMPONENTS.create("noise_scheduler"), NoiseScheduler)
    assert s.init_noise_sigma == 1.0 and DDPMSampler().init_noise_sigma == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eta = 0.5
    assert s.with_options(eta=0.5) == DDIMSampler(eta=0.5) and s.eta == 0.3
    with pytest.raises(TypeError):
        DDIMSampler(variance_type="fixed_small")
    with pytest.raises(TypeError):
        DDPMSampler(eta=1.0)
    with pytest.raises(TypeError):
        s.with_options(steps=20)
    with pytest.raises(TypeError):
        DDIMSampler(0.5)  # keyword-only
    with pytest.raises(ConfigError, match="eta"):
        DDIMSampler(eta=1.5)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        DDIMSampler(timestep_spacing="karras")
    with pytest.raises(ConfigError, match="variance_type"):
        DDPMSampler(variance_type="learned")
    with pytest.raises(ConfigError, match="steps_offset"):
        DDPMSampler(steps_offset=-1)


@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, True, None])
def test_bad_step_counts_raise_input_error(n):
    assert DDIMSampler().timesteps(NoiseScheduler(), np.int64(4)).tolist() == [750, 500, 250, 0]
    with pytest.raises(InputError, match="num_inference_steps"):
        DDIMSampler().sample(toy_model, _x_T(), NoiseScheduler(), n)
    with pytest.raises(InputError, match="num_inference_steps"):
        DDPMSampler().timesteps(NoiseScheduler(), n)


def test_bad_call_arguments_raise_input_error():
    s, ns = DDIMSampler(eta=1.0), NoiseScheduler()
    with pytest.raises(InputError, match="one generator per sample"):
        s.sample(toy_model, _x_T(), ns, 5, generator=_gens(1))
    with pytest.raises(InputError, match="generator"):
        s.sample(toy_model, _x_T(), ns, 5, generator=123)
    with pytest.raises(InputError, match="x_T"):
        s.sample(toy_model, torch.zeros(SHAPE, dtype=torch.long), ns, 5)
    with pytest.raises(InputError, match="denoise"):
        s.sample("unet", _x_T(), ns, 5)
    with pytest.raises(InputError, match="NoiseScheduler"):
        s.sample(toy_model, _x_T(), NoiseSchedulerConfig(), 5)


def test_progress_bar(capsys):
    DDIMSampler().sample(toy_model, _x_T(), NoiseScheduler(), 3, progress=True)
    assert "3/3" in capsys.readouterr().err
    DDIMSampler().sample(toy_model, _x_T(), NoiseScheduler(), 3)
    assert capsys.readouterr().err == ""
