"""The A1111 / ComfyUI schedules (sgm_uniform, simple, beta, align_your_steps): each against its reference formula
written here as ComfyUI computes it (torch float32 linspace and index arithmetic, scipy's Beta quantiles), the AYS
tables against their defining property, and every schedule through the sigma samplers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DPM2Sampler,
    DPMSolverMultistepSampler,
    DPMSolverSDESampler,
    EulerSampler,
    HeunSampler,
    grids,
)
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = [1, 2, 3, 7, 10, 20, 25, 50, 150]


def _table():
    return grids.sigma_table(NoiseScheduler(NoiseSchedulerConfig(**SD)).alphas_cumprod)


@pytest.mark.parametrize("n", STEPS)
def test_sgm_uniform_is_comfyuis_normal_scheduler_with_sgm(n):
    """ComfyUI: t = linspace(timestep(sigma_max), timestep(sigma_min), n + 1)[:-1] in float32, sigma(t) linear in
    log sigma between floor(t) and ceil(t)."""
    log_sigmas = torch.from_numpy(_table()).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n + 1)[:-1]
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    expected = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    assert_parity(torch.from_numpy(grids.sgm_uniform_sigmas(_table(), n)), expected, tol=1e-5)


@pytest.mark.parametrize("n", STEPS)
def test_simple_takes_every_T_over_n_th_sigma_from_the_top(n):
    table = torch.from_numpy(_table())
    indices = (torch.arange(n) * len(table) / n).long()      # floor(k T / n) from the top
    assert torch.equal(torch.from_numpy(grids.simple_sigmas(_table(), n)), table.flip(0)[indices].double())


@pytest.mark.parametrize("n", STEPS)
def test_beta_is_comfyuis_beta_scheduler(n):
    stats = pytest.importorskip("scipy.stats")
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    assert np.array_equal(grids.beta_sigmas(_table(), n), _table()[kept].astype(np.float64))


def test_beta_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.3, 1.7)]:
        qs = np.linspace(0, 1, 41)
        assert np.allclose([grids.beta_ppf(q, a, b) for q in qs], stats.beta.ppf(qs, a, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_align_your_steps_tables_and_resampling(model):
    levels = np.array(grids.AYS_SIGMAS[model])
    assert np.array_equal(grids.ays_sigmas(model, 10), levels[:10])         # the published 10-step grid
    twenty = grids.ays_sigmas(model, 20)                # 21 points: every other one is a published level
    assert np.allclose(twenty[::2], levels[:10], rtol=1e-12)
    assert np.allclose(np.log(twenty[1::2]), (np.log(levels[:10]) + np.log(levels[1:])) / 2, rtol=1e-12)
    five = grids.ays_sigmas(model, 5)                   # 6 points at 0, 0.2, ... 1: the even published levels
    assert np.allclose(five, levels[::2][:5], rtol=1e-12)
    seven = grids.ays_sigmas(model, 7)                  # between levels: linear in log sigma over the position
    x = np.linspace(0, 1, 8)[:7]
    assert np.allclose(np.log(seven), np.interp(x, np.linspace(0, 1, 11), np.log(levels)), rtol=1e-12)


SCHEDULES = ["sgm_uniform", "simple", "beta", "align_your_steps"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [EulerSampler, HeunSampler, DPM2Sampler, DPMSolverSDESampler,
                                 DPMSolverMultistepSampler])
def test_samplers_walk_the_schedules(schedule, cls):
    ns, n = NoiseScheduler(NoiseSchedulerConfig(**SD)), 12
    sampler = cls(sigma_schedule=schedule, **({"ays_model": "sdxl"} if schedule == "align_your_steps" else {}))
    plan = sampler.plan(ns, n)
    expected = grids.schedule_sigmas(schedule, _table(), n, low=0.0, high=0.0, ays_model="sdxl")
    assert np.allclose(plan.sigmas[:-1], expected.astype(np.float32), rtol=0, atol=0) and plan.sigmas[-1] == 0
    t = grids.sigma_to_t(expected, np.log(_table()))
    t = t.round() if cls is DPMSolverMultistepSampler else t          # DPM-Solver calls with integer timesteps
    assert np.allclose(plan.timesteps.numpy(), t, atol=1e-3)
    x0 = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_of = dict(zip(plan.timesteps.tolist(), plan.sigmas, strict=False))
    table = _table()

    def denoise(x_t, t):         # the exact eps for data x0 at the timestep's noise level
        s = sigma_of.get(t.item(), float(grids.interpolate_sigmas(np.array([t.item()]), table)[0]))
        return (x_t * (s**2 + 1) ** 0.5 - x0) / s

    out = sampler.sample(denoise, torch.randn(1, 2, 4, 4, dtype=torch.float64), ns, n,
                         generator=torch.Generator().manual_seed(1))
    assert_parity(out, x0, tol=1e-5)


def test_bad_schedule_and_model():
    with pytest.raises(ConfigError, match="sigma_schedule"):
        EulerSampler(sigma_schedule="polyexponential")
    with pytest.raises(ConfigError, match="ays_model"):
        EulerSampler(sigma_schedule="align_your_steps", ays_model="svd")
    with pytest.raises(InputError, match="ays_model"):
        grids.ays_sigmas("flux", 10)


def test_align_your_steps_takes_the_table_of_the_pipelines_model_family():
    from types import SimpleNamespace

    from latentdiff.diffusion.samplers.names import schedule_options

    sdxl = SimpleNamespace(component_names=("vae", "unet", "text_encoder", "text_encoder_2"))
    sd15 = SimpleNamespace(component_names=("vae", "unet", "text_encoder"))
    assert schedule_options("align_your_steps", pipeline=sdxl) == {"sigma_schedule": "align_your_steps",
                                                                   "ays_model": "sdxl"}
    assert schedule_options("align_your_steps", pipeline=sd15)["ays_model"] == "sd15"
    assert schedule_options("align_your_steps")["ays_model"] == "sd15"
    assert schedule_options("karras", pipeline=sdxl) == {"sigma_schedule": "karras"}
