"""PLMS and the sigma-space samplers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++ 2M / 2M SDE):
step-by-step parity with diffusers' schedulers of the same name in float64, grids bit for bit, whole runs,
per-sample noise, threads, an oracle denoiser. Their scheduler_config.json io:
tests/diffusion/test_noise_scheduler.py."""
from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch

from latentdiff.diffusion import k_sampling
from latentdiff.diffusion.noise import randn
from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DPMSolverMultistepSampler,
    DPMSolverMultistepSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LMSSampler,
    PLMSSampler,
)
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity, max_rel_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notices inside diffusers

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
EULER, EULER_A, HEUN, LMS, DPM, PNDM = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                        "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                        "DPMSolverMultistepScheduler", "PNDMScheduler")


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, per-sample stand-in for a network: bounded and t-dependent (t may be fractional)."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- cases: our sampler, the diffusers class and its options; the prediction types to test (default: all, or
# v and sample on a zero-terminal-SNR schedule), the cosine schedule instead of SD's, the step count
def _case(sampler, cls, preds=None, rescale=False, cosine=False, n=10, **ref_kw):
    preds = preds or (ZSNR if rescale else ALL)
    return pytest.param(sampler, cls, ref_kw, preds, rescale, cosine, n,
                        id=f"{type(sampler).__name__}-{cls[:5]}-{'-'.join(f'{k}={v}' for k, v in ref_kw.items())}"
                           f"{'-zsnr' if rescale else ''}{'-cos' if cosine else ''}-n{n}")


ALL = ("epsilon", "v_prediction", "sample")
ZSNR = ("v_prediction", "sample")   # a zero-terminal-SNR schedule cannot be used with epsilon prediction
CASES = [
    _case(EulerSampler(), EULER),
    _case(EulerSampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1), EULER,
          use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
    _case(EulerSampler(sigma_schedule="exponential", timestep_spacing="trailing", final_sigmas_type="sigma_min"),
          EULER, use_exponential_sigmas=True, timestep_spacing="trailing", final_sigmas_type="sigma_min"),
    _case(EulerSampler(sigma_schedule="karras", sigma_min=0.1, sigma_max=10.0), EULER, use_karras_sigmas=True,
          sigma_min=0.1, sigma_max=10.0),
    _case(EulerSampler(timestep_spacing="trailing"), EULER, rescale=True,
          timestep_spacing="trailing"),
    _case(EulerSampler(), EULER, n=7),                          # fractional "linspace" timesteps (166.5 ...)
    _case(EulerAncestralSampler(), EULER_A),                    # "sample": diffusers via an eps model, see below
    _case(EulerAncestralSampler(timestep_spacing="leading", steps_offset=1), EULER_A, timestep_spacing="leading",
          steps_offset=1),
    _case(EulerAncestralSampler(timestep_spacing="trailing"), EULER_A, rescale=True,
          timestep_spacing="trailing"),
    _case(HeunSampler(), HEUN),
    _case(HeunSampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1), HEUN,
          use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
    _case(HeunSampler(sigma_schedule="exponential", clip_sample=True, clip_sample_range=1.5), HEUN,
          use_exponential_sigmas=True, clip_sample=True, clip_sample_range=1.5),
    _case(LMSSampler(), LMS),
    _case(LMSSampler(sigma_schedule="karras", timestep_spacing="trailing"), LMS, use_karras_sigmas=True,
          timestep_spacing="trailing"),
    _case(LMSSampler(sigma_schedule="exponential", timestep_spacing="leading"), LMS,
          use_exponential_sigmas=True, timestep_spacing="leading"),
    _case(DPMSolverMultistepSampler(), DPM),
    _case(DPMSolverMultistepSampler(sigma_schedule="karras", solver_type="heun", timestep_spacing="leading",
                                    steps_offset=1), DPM, use_karras_sigmas=True,
          solver_type="heun", timestep_spacing="leading", steps_offset=1),
    _case(DPMSolverMultistepSampler(sigma_schedule="exponential", final_sigmas_type="sigma_min",
                                    lower_order_final=False), DPM, use_exponential_sigmas=True,
          final_sigmas_type="sigma_min", lower_order_final=False),
    _case(DPMSolverMultistepSampler(solver_order=1), DPM, solver_order=1),
    _case(DPMSolverMultistepSampler(euler_at_final=True, lower_order_final=False, timestep_spacing="trailing"), DPM,
          rescale=True, euler_at_final=True, lower_order_final=False, timestep_spacing="trailing"),
    _case(DPMSolverMultistepSampler(lambda_min_clipped=-5.1), DPM, cosine=True, lambda_min_clipped=-5.1),
    _case(DPMSolverMultistepSampler(sigma_schedule="karras"), DPM, n=16, use_karras_sigmas=True),  # N >= 15
    _case(DPMSolverMultistepSDESampler(), DPM, algorithm_type="sde-dpmsolver++"),
    _case(DPMSolverMultistepSDESampler(sigma_schedule="karras", solver_type="heun"), DPM,
          algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_type="heun"),
    _case(DPMSolverMultistepSDESampler(sigma_schedule="exponential", solver_type="heun"), DPM,   # A1111's 2M SDE Heun
          algorithm_type="sde-dpmsolver++", use_exponential_sigmas=True, solver_type="heun"),
    _case(PLMSSampler(steps_offset=1), PNDM, skip_prk_steps=True, steps_offset=1),
    _case(PLMSSampler(set_alpha_to_one=True), PNDM, skip_prk_steps=True, set_alpha_to_one=True),
    _case(PLMSSampler(timestep_spacing="trailing"), PNDM, skip_prk_steps=True,
          timestep_spacing="trailing"),
    _case(PLMSSampler(), PNDM, n=1, skip_prk_steps=True),       # one step: a single DDIM step
]


def _setup(sampler, cls, ref_kw, prediction_type, rescale, cosine):
    import diffusers

    schedule = dict(SD, beta_schedule="squaredcos_cap_v2") if cosine else SD
    ns = NoiseScheduler(NoiseSchedulerConfig(**schedule, prediction_type=prediction_type,
                                             rescale_zero_terminal_snr=rescale))
    ref_pred = prediction_type
    if (prediction_type == "sample" and cls == EULER_A) or (prediction_type != "epsilon" and cls == PNDM):
        # diffusers lacks "sample" here (and PNDM combines raw v outputs, see test_plms_works_on_eps below):
        # feed it the eps our model's prediction implies instead
        ref_pred = "epsilon"
    kw = dict(schedule, **ref_kw, prediction_type=ref_pred)
    if rescale:
        kw["rescale_betas_zero_snr"] = True
    return ns, getattr(diffusers, cls)(**kw), ref_pred != prediction_type


def _ref_model(ref, cls, prediction_type, as_eps):
    """What diffusers' pipeline would call: the toy model on the (scaled) input; as eps where needed."""
    if not as_eps:
        return toy_model

    def eps_model(x_in, t):
        out = toy_model(x_in, t)
        abar = ref.alphas_cumprod[int(t)].double() if cls == PNDM else 1 / (ref.sigmas[ref.step_index].double()**2 + 1)
        if prediction_type == "v_prediction":
            return abar.sqrt() * out + (1 - abar).sqrt() * x_in
        return (x_in - abar.sqrt() * out) / (1 - abar).sqrt()

    return eps_model


def _call_groups(cls, n):
    """The diffusers `step` calls that make up each of our N steps."""
    if cls == HEUN:        # predictor + corrector, the last step an Euler step: 2N - 1 calls
        return [[2 * i, 2 * i + 1] for i in range(n - 1)] + [[2 * n - 2]]
    if cls == PNDM and n > 1:   # the warm-up step calls the model twice: N + 1 calls
        return [[0, 1]] + [[i + 1] for i in range(1, n)]
    return [[i] for i in range(n)]


def _run_ref(ref, cls, model, x, calls, gens):
    """diffusers from state x through the given calls (x in our convention: x / sqrt(abar) except DPM/PNDM)."""
    for c in calls:
        t = ref.timesteps[c]
        kw = {"generator": gens} if cls in (EULER_A, DPM) else {}
        x_in = x if cls in (DPM, PNDM) else ref.scale_model_input(x, t)
        x = ref.step(model(x_in, t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("sampler,cls,ref_kw,preds,rescale,cosine,n", CASES)
def test_every_step_and_whole_runs_match_diffusers(diffusers, sampler, cls, ref_kw, preds, rescale, cosine, n):
    for prediction_type in preds:
        ns, ref, as_eps = _setup(sampler, cls, ref_kw, prediction_type, rescale, cosine)
        x, plan = _x_T(), sampler.plan(ns, n)
        traj, seen = [x * getattr(plan, "init_scale", 1.0)], []   # PLMS: a SamplingPlan, on x_t itself

        def callback(i, t, x_new, *, seen=seen, traj=traj):
            seen.append((i, t))
            traj.append(x_new)

        out = sampler.sample(toy_model, x, ns, n, generator=_gens(1, 2), callback=callback)
        assert seen == list(enumerate(sampler.timesteps(ns, n).tolist()))
        ref.set_timesteps(n)
        model, groups, gens = _ref_model(ref, cls, prediction_type, as_eps), _call_groups(cls, n), _gens(1, 2)
        assert sum(map(len, groups)) == len(ref.timesteps)
        vp = [1 / (s**2 + 1) ** 0.5 for s in plan.sigmas] if cls == DPM else [1.0] * (n + 1)  # DPM: on x_t
        for i, calls in enumerate(groups):    # every step from the same input
            expected = _run_ref(ref, cls, model, traj[i] * vp[i], calls, gens)
            assert_parity(traj[i + 1] * vp[i + 1], expected, tol=TOL)
        assert_parity(out, traj[-1] * vp[-1], tol=1e-12)
        ref.set_timesteps(n)                  # and the whole run, each library on its own trajectory
        expected = _run_ref(ref, cls, model, x * ref.init_noise_sigma, range(len(ref.timesteps)), _gens(1, 2))
        assert_parity(out, expected, tol=TOL)


# ---- the grids, bit for bit -----------------------------------------------------------------------------------
GRID_CASES = [
    (EulerSampler, EULER, dict(), dict()),
    (EulerSampler, EULER, dict(sigma_schedule="karras", final_sigmas_type="sigma_min"),
     dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    (EulerSampler, EULER, dict(sigma_schedule="exponential", sigma_max=20.0), dict(use_exponential_sigmas=True,
                                                                                   sigma_max=20.0)),
    (EulerAncestralSampler, EULER_A, dict(), dict()),
    (HeunSampler, HEUN, dict(sigma_schedule="karras"), dict(use_karras_sigmas=True)),
    (LMSSampler, LMS, dict(sigma_schedule="exponential"), dict(use_exponential_sigmas=True)),
    (DPMSolverMultistepSampler, DPM, dict(), dict()),
    (DPMSolverMultistepSampler, DPM, dict(sigma_schedule="karras"), dict(use_karras_sigmas=True)),
    (DPMSolverMultistepSDESampler, DPM, dict(sigma_schedule="exponential", final_sigmas_type="sigma_min"),
     dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++")),
    (PLMSSampler, PNDM, dict(), dict(skip_prk_steps=True)),
]
STEP_COUNTS = [1, 2, 3, 7, 10, 25, 50, 61, 333, 999]


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("cls,ref_cls,options,ref_options", GRID_CASES)
def test_grids_match_diffusers_bit_for_bit(diffusers, cls, ref_cls, options, ref_options, spacing, offset):
    ns = NoiseScheduler()
    sampler = cls(timestep_spacing=spacing, steps_offset=offset, **options)
    ref = getattr(diffusers, ref_cls)(**SD, timestep_spacing=spacing, steps_offset=offset, **ref_options)
    for n in STEP_COUNTS:
        ref.set_timesteps(n)
        if ref.timesteps.max() >= 1000:    # diffusers calls the model at t = 1000 (and clamps sigma): we refuse
            with pytest.raises(InputError, match="steps_offset"):
                sampler.timesteps(ns, n)
            continue
        assert len(sampler.timesteps(ns, n)) == n
        if spacing == "trailing" and len(np.arange(1000, 0, -1000 / n)) > n:
            continue   # diffusers' float arange gives n + 1 timesteps (the last -1) and sigmas built from them
        ref_t, ref_sigmas = ref.timesteps, getattr(ref, "sigmas", None)
        if ref_cls == PNDM:   # t_1 twice: the warm-up step calls the model at t_1, then at t_2 on its guess
            assert sampler.timesteps(ns, n).tolist() == ref_t[:1].tolist() + ref_t[2:].tolist()
            continue
        if ref_cls == HEUN:   # predictor and corrector: every sigma but the first and last twice
            ref_t, ref_sigmas = ref_t[0::2], torch.cat([ref_sigmas[:1], ref_sigmas[1::2]])
        plan = sampler.plan(ns, n)
        assert plan.timesteps.dtype == ref_t.dtype and plan.timesteps.tolist() == ref_t.tolist()
        assert plan.sigmas == ref_sigmas.tolist()
        if ref_cls == DPM:   # diffusers runs DPM-Solver on x_t: the scales map x_t <-> x / sqrt(abar)
            assert ref.init_noise_sigma == 1.0 and plan.init_scale == (plan.sigmas[0] ** 2 + 1) ** 0.5
        else:
            assert plan.init_scale == float(ref.init_noise_sigma)


def test_dpm_solver_karras_grid_of_the_cosine_schedule(diffusers):
    """diffusers truncates (not rounds) karras timesteps for the cosine schedule; there its sigma_max (2e4) puts
    several sigmas on t = 998. We call the model with sigma_i at t_i; diffusers' step index starts at the second
    998 (its img2img rule for repeated timesteps), so there only the grid, not the run, can be compared."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**dict(SD, beta_schedule="squaredcos_cap_v2")))
    ref = diffusers.DPMSolverMultistepScheduler(**dict(SD, beta_schedule="squaredcos_cap_v2"), use_karras_sigmas=True,
                                                lambda_min_clipped=-5.1)
    for n in (10, 25):
        plan = DPMSolverMultistepSampler(sigma_schedule="karras", lambda_min_clipped=-5.1).plan(ns, n)
        ref.set_timesteps(n)
        assert plan.timesteps.tolist() == ref.timesteps.tolist() and plan.sigmas == ref.sigmas.tolist()
    assert plan.timesteps.tolist().count(998) > 1


def test_grid_errors():
    ns = NoiseScheduler()
    with pytest.raises(InputError, match="num_inference_steps"):
        DPMSolverMultistepSampler().timesteps(ns, 1000)   # linspace(0, 999, 1001).round() repeats timesteps
    with pytest.raises(InputError, match="num_inference_steps"):
        DPMSolverMultistepSampler(timestep_spacing="leading").timesteps(ns, 1000)  # stride 1000 // 1001 = 0
    with pytest.raises(InputError, match="steps_offset"):
        EulerSampler(timestep_spacing="leading", steps_offset=1).timesteps(ns, 1000)
    for bad in (0, 1001, 2.5, True, None):
        with pytest.raises(InputError, match="num_inference_steps"):
            HeunSampler().sample(toy_model, _x_T(), ns, bad)
    zero_snr = NoiseScheduler(NoiseSchedulerConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    with pytest.raises(InputError, match="zero-SNR"):
        PLMSSampler(timestep_spacing="trailing").sample(toy_model, _x_T(), zero_snr, 10)


def test_lms_coefficients_match_numerical_integration():
    from scipy import integrate

    sigmas = [14.6, 9.7, 6.1, 3.3, 1.6, 0.6, 0.03, 0.0]
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau, *, i=i, j=j, order=order):
                return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                                 for k in range(order) if k != j)

            expected = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=0, epsrel=1e-13)[0]
            assert k_sampling.lms_coefficient(sigmas, i, j, order) == pytest.approx(expected, rel=1e-12, abs=1e-14)
        # the basis polynomials sum to 1: the coefficients sum to the step length
        coefficients = [k_sampling.lms_coefficient(sigmas, i, j, order) for j in range(order)]
        assert sum(coefficients) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-12)


def test_plms_works_on_eps_where_diffusers_combines_raw_v_outputs(diffusers):
    """PNDM's multistep formula (Liu et al. 2022, eq. 12) is on eps; diffusers' PNDMScheduler combines the raw model
    outputs, so for v_prediction it combines v's taken at other x and t and converts the mixture at the current
    step. With an exact denoiser that is not exact, while PLMS on eps recovers x0 to rounding."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type="v_prediction"))
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    plms = PLMSSampler(steps_offset=1, set_alpha_to_one=True)
    oracle = _oracle(ns, plms, 10, x0, "v_prediction")
    ours = plms.sample(oracle, _x_T(), ns, 10)
    ref = diffusers.PNDMScheduler(**SD, prediction_type="v_prediction", skip_prk_steps=True, steps_offset=1,
                                  set_alpha_to_one=True)
    ref.set_timesteps(10)
    y = _x_T()
    for t in ref.timesteps:
        y = ref.step(oracle(y, t), t, y).prev_sample
    assert max_rel_error(ours, x0) < 1e-9 and max_rel_error(y, x0) > 1e-4


# ---- analytic: an oracle denoiser -----------------------------------------------------------------------------
def _oracle(ns, sampler, n, x0, prediction_type):
    """The exact denoiser for data x0: the noise level of each timestep the sampler uses, then eps / v / x0."""
    plan = sampler.plan(ns, n)
    if isinstance(plan.timesteps, list):       # PLMS: integer timesteps on the trained schedule
        abar_of = {t: ns.alphas_cumprod.double()[t] for t in range(ns.num_train_timesteps)}
    else:
        abar_of = {t: torch.tensor(1 / (s**2 + 1), dtype=torch.float64) for t, s in zip(plan.timesteps.tolist(),
                                                                                       plan.sigmas, strict=False)}

    def denoise(x_t, t):
        assert t.ndim == 0 and t.device == x_t.device
        a = abar_of[t.item()]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]

    return denoise


ORACLE_SAMPLERS = [
    EulerSampler(), EulerSampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1),
    EulerAncestralSampler(timestep_spacing="trailing"), HeunSampler(sigma_schedule="exponential"), LMSSampler(),
    LMSSampler(sigma_schedule="karras"), DPMSolverMultistepSampler(solver_type="heun", timestep_spacing="trailing"),
    DPMSolverMultistepSampler(sigma_schedule="karras"), DPMSolverMultistepSDESampler(),
    PLMSSampler(steps_offset=1, set_alpha_to_one=True),
]


@pytest.mark.parametrize("sampler", ORACLE_SAMPLERS, ids=lambda s: repr(s)[:60])
@pytest.mark.parametrize("prediction_type,rescale", [("epsilon", False), ("v_prediction", False),
                                                     ("v_prediction", True), ("sample", False)])
def test_oracle_denoiser_recovers_x0(sampler, prediction_type, rescale):
    if rescale and isinstance(sampler, PLMSSampler):
        sampler = sampler.with_options(timestep_spacing="leading")   # PLMS cannot start at zero SNR
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type=prediction_type, rescale_zero_terminal_snr=rescale))
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    out = sampler.sample(_oracle(ns, sampler, 13, x0, prediction_type), _x_T(), ns, 13, generator=_gens(1, 2))
    assert_parity(out, x0, tol=1e-9)


# ---- generators, threads, devices -------------------------------------------------------------------------------
STOCHASTIC = [EulerAncestralSampler(), DPMSolverMultistepSDESampler(sigma_schedule="karras")]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: type(s).__name__)
def test_image_i_of_a_batch_equals_its_seed_alone(sampler):
    ns = NoiseScheduler()

    def generate(seeds):
        gens = _gens(*seeds)
        x_T = randn((len(seeds), *SHAPE[1:]), generator=gens)   # as the pipeline draws x_T
        return sampler.sample(toy_model, x_T, ns, 8, generator=gens)

    batch = generate([1, 2])
    assert_parity(batch[0:1], generate([1]), tol=1e-6)
    assert_parity(batch[1:2], generate([2]), tol=1e-6)
    assert max_rel_error(batch[0], batch[1]) > 0.01, "different seeds give different images"
    x = _x_T()[:1].float()
    same_x = [sampler.sample(toy_model, x, ns, 8, generator=g) for g in (_gens(7)[0], _gens(7), _gens(8))]
    assert torch.equal(same_x[0], same_x[1]) and not torch.allclose(same_x[0], same_x[2])


def test_one_sampler_shared_by_two_threads():
    sampler, ns = DPMSolverMultistepSDESampler(), NoiseScheduler()
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", STOCHASTIC + [HeunSampler(), PLMSSampler()], ids=lambda s: type(s).__name__)
def test_cpu_and_cuda_agree_with_cpu_generators(sampler):
    ns = NoiseScheduler()
    cpu = sampler.sample(toy_model, _x_T(), ns, 10, generator=_gens(1, 2))
    gpu = sampler.sample(toy_model, _x_T().cuda(), ns, 10, generator=_gens(1, 2))
    assert gpu.device.type == "cuda"
    assert_parity(gpu.cpu(), cpu)


# ---- settings and bad input ------------------------------------------------------------------------------------
NAMES = {"plms": PLMSSampler, "euler": EulerSampler, "euler_ancestral": EulerAncestralSampler, "heun": HeunSampler,
         "lms": LMSSampler, "dpmpp_2m": DPMSolverMultistepSampler, "dpmpp_2m_sde": DPMSolverMultistepSDESampler}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_registered_frozen_and_strict(name):
    from latentdiff.registry import SAMPLERS

    cls = SAMPLERS.get(name)
    assert cls is NAMES[name] and cls.registry_name == name
    sampler = SAMPLERS.create(name, timestep_spacing="trailing")
    assert sampler == cls(timestep_spacing="trailing") and sampler.init_noise_sigma == 1.0
    assert sampler.with_options(steps_offset=1) == cls(timestep_spacing="trailing", steps_offset=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.steps_offset = 2
    for bad in (dict(bogus_option=1), dict(eta=1.0), dict(clip_sample=True) if cls is PLMSSampler else dict(order=3)):
        with pytest.raises(TypeError):
            cls(**bad)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        cls(timestep_spacing="karras")
    with pytest.raises(ConfigError, match="steps_offset"):
        cls(steps_offset=-1)
    ts = sampler.timesteps(NoiseScheduler(), 10)
    assert len(ts) == 10 and bool((ts[:-1] > ts[1:]).all())


def test_bad_settings_raise_config_error():
    for make, match in [(lambda: EulerSampler(sigma_schedule="polyexponential"), "sigma_schedule"),
                        (lambda: EulerSampler(sigma_min=-1.0), "sigma_min"),
                        (lambda: EulerSampler(sigma_min=2.0, sigma_max=1.0), "sigma_min"),
                        (lambda: EulerSampler(final_sigmas_type="one"), "final_sigmas_type"),
                        (lambda: HeunSampler(clip_sample_range=0.0), "clip_sample_range"),
                        (lambda: DPMSolverMultistepSampler(solver_order=3), "solver_order"),
                        (lambda: DPMSolverMultistepSampler(solver_order=True), "solver_order"),
                        (lambda: DPMSolverMultistepSDESampler(solver_type="bh2"), "solver_type")]:
        with pytest.raises(ConfigError, match=match):
            make()


def test_bad_call_arguments_raise_input_error():
    s, ns = EulerAncestralSampler(), NoiseScheduler()
    with pytest.raises(InputError, match="one generator per sample"):
        s.sample(toy_model, _x_T(), ns, 5, generator=_gens(1))
    with pytest.raises(InputError, match="x_T"):
        s.sample(toy_model, torch.zeros(SHAPE, dtype=torch.long), ns, 5)
    with pytest.raises(InputError, match="denoise"):
        s.sample("unet", _x_T(), ns, 5)
    with pytest.raises(InputError, match="NoiseScheduler"):
        s.sample(toy_model, _x_T(), NoiseSchedulerConfig(), 5)
    with pytest.raises(InputError, match="callback"):
        s.sample(toy_model, _x_T(), ns, 5, callback=3)


def test_progress_bar_and_callback_timesteps(capsys):
    seen = []
    HeunSampler().sample(toy_model, _x_T(), NoiseScheduler(), 3, progress=True,
                         callback=lambda i, t, x: seen.append((i, t)))
    assert "3/3" in capsys.readouterr().err
    assert [i for i, _ in seen] == [0, 1, 2] and all(isinstance(t, float) for _, t in seen)
    DPMSolverMultistepSampler().sample(toy_model, _x_T(), NoiseScheduler(), 3, callback=lambda i, t, x: seen.append(t))
    assert capsys.readouterr().err == "" and all(isinstance(t, int) for t in seen[3:])


@pytest.mark.parametrize("sampler", [EulerAncestralSampler(), HeunSampler(), DPMSolverMultistepSDESampler()],
                         ids=lambda s: type(s).__name__)
def test_half_precision_model_with_a_float32_state(sampler):
    """A float16 x_T (a half-precision model's latents) is stepped in float32, the model still sees float16."""
    ns, dtypes = NoiseScheduler(), set()

    def half_model(x, t):
        dtypes.add(x.dtype)
        return toy_model(x.float(), t).half()

    x = _x_T().float()
    out = sampler.sample(half_model, x.half(), ns, 10, generator=_gens(1, 2))
    assert out.dtype == torch.float16 and dtypes == {torch.float16}
    assert_parity(out.float(), sampler.sample(toy_model, x, ns, 10, generator=_gens(1, 2)), tol=1e-2)
