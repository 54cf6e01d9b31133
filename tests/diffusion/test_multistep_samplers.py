"""UniPC, DEIS and TCD: step-by-step parity with diffusers' UniPCMultistepScheduler, DEISMultistepScheduler and
TCDScheduler in float64 (1e-5), grids bit for bit, whole runs, an oracle denoiser, the coefficients against
numerical integration, settings. Through a tiny SD pipeline: tests/pipelines/test_multistep_pipeline.py."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise import randn
from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DEISSampler,
    DPMSolverMultistepSampler,
    TCDSampler,
    UniPCBH1Sampler,
    UniPCBH2Sampler,
    UniPCSampler,
)
from latentdiff.diffusion.samplers.grids import consistency_timesteps
from latentdiff.diffusion.samplers.multistep_loops import deis_coefficients, unipc_coefficients
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity, max_rel_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notices inside diffusers

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
UNIPC, DEIS, TCD = "UniPCMultistepScheduler", "DEISMultistepScheduler", "TCDScheduler"


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, per-sample stand-in for a network: bounded and t-dependent."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _case(sampler, cls, n=10, rescale=False, **ref_kw):
    return pytest.param(sampler, cls, ref_kw, n, rescale,
                        id=f"{type(sampler).__name__}-{'-'.join(f'{k}={v}' for k, v in ref_kw.items())}"
                           f"{'-zsnr' if rescale else ''}-n{n}")


CASES = [
    _case(UniPCSampler(), UNIPC),
    _case(UniPCSampler(solver_type="bh1", solver_order=3), UNIPC, solver_type="bh1", solver_order=3),
    _case(UniPCSampler(solver_order=3, sigma_schedule="karras", timestep_spacing="leading", steps_offset=1), UNIPC,
          solver_order=3, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
    _case(UniPCSampler(solver_order=1), UNIPC, solver_order=1),
    _case(UniPCSampler(solver_order=3, disable_corrector=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)), UNIPC, solver_order=3,
          disable_corrector=list(range(10))),
    _case(UniPCSampler(solver_type="bh1", disable_corrector=(2, 5)), UNIPC, solver_type="bh1",
          disable_corrector=[2, 5]),
    _case(UniPCSampler(solver_order=3, sigma_schedule="exponential", final_sigmas_type="sigma_min"), UNIPC, n=8,
          solver_order=3, use_exponential_sigmas=True, final_sigmas_type="sigma_min"),   # the last step: h = 0
    _case(UniPCSampler(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", predict_x0=False),
          UNIPC, n=8, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", predict_x0=False),
    _case(UniPCSampler(predict_x0=False, solver_type="bh1", final_sigmas_type="sigma_min", solver_order=3), UNIPC,
          predict_x0=False, solver_type="bh1", final_sigmas_type="sigma_min", solver_order=3),
    _case(UniPCSampler(sigma_schedule="karras", sigma_min=0.1, sigma_max=10.0, timestep_spacing="trailing"), UNIPC,
          use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, timestep_spacing="trailing"),
    _case(UniPCSampler(timestep_spacing="trailing", solver_order=3), UNIPC, rescale=True,
          timestep_spacing="trailing", solver_order=3),
    _case(UniPCBH1Sampler(), UNIPC, n=20, solver_type="bh1", solver_order=3),
    _case(DEISSampler(), DEIS),
    _case(DEISSampler(solver_order=3), DEIS, solver_order=3),
    _case(DEISSampler(solver_order=3), DEIS, n=16, solver_order=3),                 # N >= 15: no lower final
    _case(DEISSampler(solver_order=3, sigma_schedule="karras"), DEIS, solver_order=3, use_karras_sigmas=True),
    _case(DEISSampler(sigma_schedule="exponential", timestep_spacing="leading", steps_offset=1), DEIS,
          use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1),
    _case(DEISSampler(solver_order=1, lower_order_final=False), DEIS, solver_order=1, lower_order_final=False),
    _case(TCDSampler(), TCD, n=4),
    _case(TCDSampler(eta=0.0), TCD, n=8),
    _case(TCDSampler(eta=1.0, original_inference_steps=20), TCD, n=7, original_inference_steps=20),
    _case(TCDSampler(eta=0.5), TCD, n=3, rescale=True),
]


def _setup(cls, ref_kw, prediction_type, rescale):
    import diffusers

    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type=prediction_type, rescale_zero_terminal_snr=rescale))
    kw = dict(SD, **ref_kw, prediction_type=prediction_type)
    if rescale:
        kw["rescale_betas_zero_snr"] = True
    return ns, getattr(diffusers, cls)(**kw)


def _set_timesteps(ref, cls, n):
    """diffusers' set_timesteps; UniPC and DEIS then compute their step coefficients from the float32 sigma table in
    float32 (DEIS-3's log-rho integrals lose up to 1e-4 there): the same sigmas as float64 make the run float64."""
    ref.set_timesteps(n)
    if cls != TCD:
        ref.sigmas = ref.sigmas.double()


def _step(ref, cls, sampler, x, t, gens):
    kw = {"eta": sampler.eta, "generator": gens} if cls == TCD else {}
    return ref.step(toy_model(x, t), t, x, **kw).prev_sample


# a zero-terminal-SNR schedule cannot be used with epsilon prediction (x0 is undefined at SNR 0): not a case
STEP_CASES = [pytest.param(*case.values, prediction, id=f"{case.id}-{prediction}")
              for case in CASES for prediction in ("epsilon", "v_prediction", "sample")
              if not (case.values[4] and prediction == "epsilon")]


@pytest.mark.parametrize("sampler,cls,ref_kw,n,rescale,prediction_type", STEP_CASES)
def test_every_step_and_whole_runs_match_diffusers(diffusers, sampler, cls, ref_kw, n, rescale, prediction_type):
    ns, ref = _setup(cls, ref_kw, prediction_type, rescale)
    x, plan = _x_T(), sampler.plan(ns, n)
    scale = getattr(plan, "init_scale", 1.0)
    traj, seen = [x * scale], []

    def callback(i, t, x_new):
        seen.append((i, t))
        traj.append(x_new)

    out = sampler.sample(toy_model, x, ns, n, generator=_gens(1, 2), callback=callback)
    _set_timesteps(ref, cls, n)
    assert seen == list(enumerate(ref.timesteps.tolist()))
    # the multistep samplers hold x / sqrt(abar) between steps, diffusers x_t; TCD holds x_t too
    vp = [1 / (s**2 + 1) ** 0.5 for s in plan.sigmas] if cls != TCD else [1.0] * (n + 1)
    gens = _gens(1, 2)
    # diffusers' bh1 step to sigma = 0 computes -inf * 0 (a NaN image); ours returns D there (multistep.py)
    nan_last = cls == UNIPC and getattr(sampler, "solver_type", "") == "bh1" and plan.sigmas[-1] == 0
    for i, t in enumerate(ref.timesteps):     # every step from our input (diffusers keeps its history of them)
        expected = _step(ref, cls, sampler, traj[i] * vp[i], t, gens)
        if nan_last and i == n - 1:
            assert expected.isnan().all() and traj[i + 1].isfinite().all()
            continue
        assert_parity(traj[i + 1] * vp[i + 1], expected, tol=TOL)
    assert_parity(out, traj[-1] * vp[-1], tol=1e-12)
    _set_timesteps(ref, cls, n)                # and the whole run, each library on its own trajectory
    y, gens = x.clone(), _gens(1, 2)
    for t in ref.timesteps[:n - 1] if nan_last else ref.timesteps:
        y = _step(ref, cls, sampler, y, t, gens)
    assert_parity(traj[-2] * vp[-2] if nan_last else out, y, tol=TOL)


GRID_CASES = [
    (UniPCSampler, UNIPC, dict(), dict()),
    (UniPCSampler, UNIPC, dict(sigma_schedule="karras", final_sigmas_type="sigma_min"),
     dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    (UniPCSampler, UNIPC, dict(sigma_schedule="exponential", sigma_max=20.0),
     dict(use_exponential_sigmas=True, sigma_max=20.0)),
    (UniPCSampler, UNIPC, dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    (DEISSampler, DEIS, dict(), dict()),
    (DEISSampler, DEIS, dict(sigma_schedule="karras"), dict(use_karras_sigmas=True)),
]


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("cls,ref_cls,options,ref_options", GRID_CASES)
def test_grids_match_diffusers_bit_for_bit(diffusers, cls, ref_cls, options, ref_options, spacing, offset):
    ns = NoiseScheduler()
    sampler = cls(timestep_spacing=spacing, steps_offset=offset, **options)
    ref = getattr(diffusers, ref_cls)(**SD, timestep_spacing=spacing, steps_offset=offset, **ref_options)
    for n in [1, 2, 3, 7, 10, 25, 50, 333]:
        ref.set_timesteps(n)
        if spacing == "trailing" and len(np.arange(1000, 0, -1000 / n)) > n:
            continue   # diffusers' float arange gives n + 1 timesteps (see test_k_samplers)
        plan = sampler.plan(ns, n)
        assert plan.timesteps.tolist() == ref.timesteps.tolist()
        assert plan.sigmas == ref.sigmas.tolist()
        assert plan.init_scale == (plan.sigmas[0] ** 2 + 1) ** 0.5 and ref.init_noise_sigma == 1.0


@pytest.mark.parametrize("original,eta", [(50, 0.3), (20, 0.7), (1000, 0.3)])
def test_tcd_timesteps_and_s_match_diffusers(diffusers, original, eta):
    ref = diffusers.TCDScheduler(original_inference_steps=original)
    for n in (1, 2, 4, 7, 8, 13, original):
        ref.set_timesteps(n)
        ours = consistency_timesteps(1000, n, original_inference_steps=original)
        assert ours.tolist() == ref.timesteps.tolist() and ours.dtype == np.int64
        plan = TCDSampler(eta=eta, original_inference_steps=original).plan(NoiseScheduler(), n)
        following = ref.timesteps.tolist()[1:] + [0]
        s = [int(torch.floor((1 - eta) * torch.tensor(t))) for t in following]   # TCDScheduler.step's s
        expected = NoiseScheduler().alphas_cumprod[s].tolist()
        assert TCDSampler(eta=eta).s_alphas_cumprod(NoiseScheduler(), plan) == expected
    if original < 1000:
        with pytest.raises(InputError, match="original_inference_steps"):
            consistency_timesteps(1000, original + 1, original_inference_steps=original)


# ---- analytic checks -------------------------------------------------------------------------------------------
def test_deis_coefficients_match_numerical_integration():
    nodes, target = [2.0, 3.1, 5.0], 1.4
    us = np.log(nodes)
    grid = np.linspace(nodes[0], target, 200001)
    for j in range(3):
        others = [u for k, u in enumerate(us) if k != j]
        basis = np.prod([(np.log(grid) - u) / (us[j] - u) for u in others], axis=0)
        assert deis_coefficients(nodes, target)[j] == pytest.approx(np.trapezoid(basis, grid), rel=1e-8)
    assert deis_coefficients([2.0], 1.4) == pytest.approx([1.4 - 2.0])       # first order: DDIM / Euler in sigma


def test_unipc_coefficients_solve_the_order_conditions():
    """sum_k rho_k r_k^(j-1) = j! phi_{j+1}(hh) / B(h) (Zhao et al. 2023, Algorithm 1), phi by its series."""
    def phi(k, x):       # phi_k(x) = sum_m x^m / (m + k)!
        return sum(x**m / math.factorial(m + k) for m in range(40))

    rks, hh = [-0.7, -1.9], -0.4
    b_h = math.expm1(hh)
    rhos = unipc_coefficients(rks, hh, b_h, corrector=True)
    nodes = rks + [1.0]
    for j in range(1, 4):
        lhs = sum(rho * r ** (j - 1) for rho, r in zip(rhos, nodes, strict=True))
        assert lhs == pytest.approx(math.factorial(j) * hh * phi(j + 1, hh) / b_h, rel=1e-10)
    assert unipc_coefficients([-0.7], hh, b_h, corrector=False) == [0.5]


def _oracle(ns, sampler, n, x0):
    """The exact eps denoiser for data x0 at the noise level of each timestep the sampler uses."""
    plan = sampler.plan(ns, n)
    if hasattr(plan, "sigmas"):
        abar_of = {t: 1 / (s**2 + 1) for t, s in zip(plan.timesteps.tolist(), plan.sigmas, strict=False)}
    else:
        abar_of = dict(zip(plan.timesteps, plan.alphas_cumprod, strict=False))

    def denoise(x_t, t):
        a = abar_of[t.item()]
        return (x_t - a**0.5 * x0) / (1 - a) ** 0.5

    return denoise


@pytest.mark.parametrize("sampler", [UniPCSampler(), UniPCBH1Sampler(sigma_schedule="karras"),
                                     UniPCSampler(predict_x0=False, final_sigmas_type="sigma_min"),
                                     DEISSampler(solver_order=3), TCDSampler(), TCDSampler(eta=0.0)],
                         ids=lambda s: repr(s)[:50])
def test_oracle_denoiser_recovers_x0(sampler):
    """An exact denoiser makes every sampler return x0 (up to the final sigma's noise where the grid ends above 0)."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    out = sampler.sample(_oracle(ns, sampler, 8, x0), _x_T(), ns, 8, generator=_gens(1, 2))
    plan = sampler.plan(ns, 8)
    final_noise = plan.sigmas[-1] if hasattr(plan, "sigmas") else (1 - plan.alphas_cumprod[-1]) ** 0.5
    assert max_rel_error(out, x0) < max(1e-9, 5 * final_noise)


# ---- settings, names, per-sample noise -------------------------------------------------------------------------
def test_settings_are_checked():
    for make, match in [(lambda: UniPCSampler(solver_order=4), "solver_order"),
                        (lambda: UniPCSampler(solver_type="midpoint"), "solver_type"),
                        (lambda: UniPCSampler(disable_corrector=(-1,)), "disable_corrector"),
                        (lambda: UniPCSampler(sigma_min=0.0), "sigma_min"),
                        (lambda: DEISSampler(solver_order=0), "solver_order"),
                        (lambda: TCDSampler(eta=1.5), "eta"),
                        (lambda: TCDSampler(original_inference_steps=0), "original_inference_steps")]:
        with pytest.raises(ConfigError, match=match):
            make()
    with pytest.raises(TypeError):
        DEISSampler(solver_type="logrho")      # a class constant: DEIS has one solver type
    with pytest.raises(dataclasses.FrozenInstanceError):
        UniPCSampler().solver_order = 3
    assert UniPCSampler(disable_corrector=[1, 2]).disable_corrector == (1, 2)


def test_from_config_as_diffusers():
    dpm = DPMSolverMultistepSampler(timestep_spacing="trailing", solver_type="heun")
    assert UniPCSampler.from_config(dpm) == UniPCSampler(timestep_spacing="trailing", solver_order=2)
    bh1 = UniPCBH1Sampler.from_config(dpm)     # the name fixes bh1 / order 3; the spacing is kept
    assert (bh1.solver_type, bh1.solver_order, bh1.timestep_spacing) == ("bh1", 3, "trailing")
    assert UniPCBH1Sampler.from_config(bh1.with_options(solver_order=2)).solver_order == 2
    assert UniPCBH2Sampler().solver_type == "bh2" and UniPCBH2Sampler().solver_order == 3
    assert DEISSampler.from_config(UniPCSampler(solver_order=3)).solver_order == 3


@pytest.mark.parametrize("sampler", [TCDSampler(eta=0.5)], ids=lambda s: type(s).__name__)
def test_image_i_of_a_batch_equals_its_seed_alone(sampler):
    ns = NoiseScheduler()

    def generate(seeds):
        gens = _gens(*seeds)
        return sampler.sample(toy_model, randn((len(seeds), *SHAPE[1:]), generator=gens), ns, 4, generator=gens)

    batch = generate([1, 2])
    assert_parity(batch[0:1], generate([1]), tol=1e-6)
    assert max_rel_error(batch[0], batch[1]) > 0.01


def test_start_part_way_runs_the_tail():
    ns, x0 = NoiseScheduler(), torch.zeros(SHAPE, dtype=torch.float64)
    for sampler in (UniPCSampler(), DEISSampler(), TCDSampler()):
        x = sampler.noise_to_start(x0, _x_T(), ns, 10, start_step=4)
        seen = []
        sampler.sample(toy_model, x, ns, 10, start_step=4, callback=lambda i, t, x_new, seen=seen: seen.append(t))
        assert seen == sampler.timesteps(ns, 10).tolist()[4:]
