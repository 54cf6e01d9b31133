"""DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 3M SDE and DPM++ 2M SDE on a Brownian tree: step-by-step parity with
diffusers' KDPM2 / KDPM2Ancestral / DPMSolverSDE schedulers in float64, whole runs against k-diffusion's loops
(tests/_support/kdiffusion.py: the installed k_diffusion/sampling.py, with torchsde's Brownian trees), an oracle
denoiser, per-sample noise."""
from __future__ import annotations

import inspect
import json
import warnings

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise import randn
from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMPP2SAncestralSampler,
    DPMPP3MSDESampler,
    DPMSolverMultistepSDESampler,
    DPMSolverSDESampler,
    brownian,
    dpm_loops,
    grids,
)
from latentdiff.diffusion.scheduler_io import read_scheduler_file, write_scheduler_folder
from latentdiff.errors import ConfigError
from tests._support.kdiffusion import k_sampling
from tests._support.parity import assert_parity, max_rel_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, per-sample stand-in for a network: bounded and t-dependent (t may be fractional)."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- diffusers, step by step and whole runs ------------------------------------------------------------------
KDPM2, KDPM2A, SDE = "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"
DIFFUSERS_CASES = [
    (DPM2Sampler(), KDPM2, {}),
    (DPM2Sampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1), KDPM2,
     dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    (DPM2Sampler(sigma_schedule="exponential", timestep_spacing="trailing"), KDPM2,
     dict(use_exponential_sigmas=True, timestep_spacing="trailing")),
    (DPM2AncestralSampler(), KDPM2A, {}),
    (DPM2AncestralSampler(sigma_schedule="karras"), KDPM2A, dict(use_karras_sigmas=True)),
    (DPMSolverSDESampler(noise_sampler_seed=7), SDE, dict(noise_sampler_seed=7)),
    (DPMSolverSDESampler(noise_sampler_seed=3, sigma_schedule="karras", timestep_spacing="leading", steps_offset=1),
     SDE, dict(noise_sampler_seed=3, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
]


def _run_ref(ref, cls, x, calls, gens):
    for c in calls:
        t = ref.timesteps[c]
        kw = {"generator": gens} if cls == KDPM2A else {}
        x = ref.step(toy_model(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("sampler,cls,ref_kw", DIFFUSERS_CASES, ids=lambda v: repr(v)[:50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])   # diffusers lacks "sample" here
def test_every_step_and_whole_runs_match_diffusers(diffusers, sampler, cls, ref_kw, prediction_type):
    if cls == SDE:
        pytest.importorskip("torchsde")     # diffusers' DPMSolverSDEScheduler draws from torchsde's trees
    n = 8
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type=prediction_type))
    ref = getattr(diffusers, cls)(**SD, **ref_kw, prediction_type=prediction_type)
    x, plan = _x_T(), sampler.plan(ns, n)
    traj, seen = [x * plan.init_scale], []

    def callback(i, t, x_new):
        seen.append((i, t))
        traj.append(x_new)

    out = sampler.sample(toy_model, x, ns, n, generator=_gens(1, 2), callback=callback)
    assert seen == list(enumerate(sampler.timesteps(ns, n).tolist()))
    ref.set_timesteps(n)
    # DPMSolverSDEScheduler interpolates at float64 timesteps, the KDPM2 ones (and we) at float32: an ulp apart
    assert torch.allclose(ref.sigmas.unique(), torch.tensor(plan.sigmas).unique(), rtol=1e-6, atol=0)
    groups, gens = [[2 * i, 2 * i + 1] for i in range(n - 1)] + [[2 * n - 2]], _gens(1, 2)
    assert sum(map(len, groups)) == len(ref.timesteps)
    # DPMSolverSDEScheduler computes its step coefficients from float32 sigmas in float32 (sigma_up, sigma_down,
    # the midpoint: ~1e-7 apart from ours) and queries its Brownian tree at those float32 points, which the tree
    # rounds to 1e-6: 1e-4 apart. The float64 comparison of the same algorithm and trees is the k-diffusion one below.
    tol = 5e-4 if cls == SDE else TOL
    for i, calls in enumerate(groups):      # every step from the same input
        assert_parity(traj[i + 1], _run_ref(ref, cls, traj[i], calls, gens), tol=tol)
    ref.set_timesteps(n)                    # and the whole run
    assert_parity(out, _run_ref(ref, cls, x * ref.init_noise_sigma, range(len(ref.timesteps)), _gens(1, 2)), tol=tol)


# ---- k-diffusion: whole runs of the loops and of the samplers ---------------------------------------------------
@pytest.fixture
def k():
    module = k_sampling()
    if module is None:
        pytest.skip("k-diffusion's sampling.py needs k-diffusion (--no-deps), torchsde and torchdiffeq")
    return module


def _k_denoiser(table, prediction_type="epsilon"):
    """k-diffusion's CompVis denoiser, written here: D(x; sigma) from the toy eps / v model at sigma's timestep."""
    log_table = torch.from_numpy(table).double().log()

    def model(x, sigma):
        s = float(sigma.reshape(-1)[0])
        t = torch.tensor(float(grids.sigma_to_t(torch.tensor([s]).numpy(), log_table.numpy())[0]))
        out = toy_model(x / (s**2 + 1) ** 0.5, t.float())
        if prediction_type == "epsilon":
            return x - s * out
        return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)

    return model


LOOPS = ["sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
         "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("name", LOOPS)
def test_loops_match_k_diffusion(k, name):
    sigmas = [*grids.karras_sigmas(0.03, 14.6, 9).tolist(), 0.0]
    x = _x_T() * 14.6

    def model(x, s):
        s = float(s.reshape(-1)[0]) if torch.is_tensor(s) else s
        return 0.8 * torch.tanh(x / (s**2 + 1) ** 0.5) + 0.05 * s

    kw, ref_kw = {}, {}
    if name != "sample_dpm_2":
        kw["noise_sampler"] = brownian.BrownianNoise(x, 0.03, 14.6, entropy=[5, 6])
        ref_kw["noise_sampler"] = k.BrownianTreeNoiseSampler(x, torch.tensor(0.03, dtype=torch.float64),
                                                             torch.tensor(14.6, dtype=torch.float64), seed=[5, 6])
    expected = getattr(k, name)(model, x, torch.tensor(sigmas, dtype=torch.float64), disable=True, **ref_kw)
    assert_parity(getattr(dpm_loops, name)(model, x, sigmas, **kw), expected, tol=1e-12)


SAMPLERS_VS_K = [
    (DPM2Sampler(sigma_schedule="exponential"), "sample_dpm_2"),   # karras: diffusers' rounded timesteps
    (DPM2AncestralSampler(noise_type="brownian"), "sample_dpm_2_ancestral"),
    (DPMPP2SAncestralSampler(noise_type="brownian", sigma_schedule="exponential"), "sample_dpmpp_2s_ancestral"),
    (DPMSolverSDESampler(), "sample_dpmpp_sde"),
    (DPMSolverSDESampler(noise_sampler_seed=11), "sample_dpmpp_sde"),
    (DPMPP3MSDESampler(sigma_schedule="karras"), "sample_dpmpp_3m_sde"),
    # integer timesteps whose sigmas the default grid takes (diffusers rounds the karras ones)
    (DPMSolverMultistepSDESampler(noise_type="brownian", lower_order_final=False, timestep_spacing="trailing"),
     "sample_dpmpp_2m_sde"),
]


@pytest.mark.parametrize("sampler,name", SAMPLERS_VS_K, ids=lambda v: repr(v)[:60])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_match_k_diffusion_with_its_brownian_trees(k, sampler, name, prediction_type):
    """The whole sampler (grid, model adapter, per-sample tree entropies from the generators) against k-diffusion's
    loop on the same sigmas with torchsde trees of the same entropies."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type=prediction_type))
    plan, n = sampler.plan(ns, 9), 9
    x = _x_T()
    out = sampler.sample(toy_model, x, ns, n, generator=_gens(1, 2))
    x_k, sigmas = x * plan.init_scale, torch.tensor(plan.sigmas, dtype=torch.float64)
    kw = {}
    if getattr(sampler, "noise_type", "gaussian") == "brownian":
        seed = getattr(sampler, "noise_sampler_seed", None)
        positive = sigmas[sigmas > 0]
        kw["noise_sampler"] = k.BrownianTreeNoiseSampler(
            x_k, positive.min(), positive.max(), seed=seed if seed is not None else brownian.entropies_from(_gens(1, 2),
                                                                                                         2))
    table = grids.sigma_table(ns.alphas_cumprod)
    expected = getattr(k, name)(_k_denoiser(table, prediction_type), x_k, sigmas, disable=True, **kw)
    assert_parity(out, expected * plan.final_scale, tol=TOL)   # float32 timesteps; DPM2: rounded karras ones


# ---- analytic and per-sample ---------------------------------------------------------------------------------
ALL = [DPM2Sampler(), DPM2AncestralSampler(timestep_spacing="trailing"), DPMPP2SAncestralSampler(),
       DPMSolverSDESampler(sigma_schedule="karras"), DPMPP3MSDESampler(), DPMPP3MSDESampler(noise_type="gaussian"),
       DPMSolverMultistepSDESampler(noise_type="brownian")]


@pytest.mark.parametrize("sampler", ALL, ids=lambda s: repr(s)[:60])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_denoiser_recovers_x0(sampler, prediction_type):
    """With the exact denoiser of one data point every sampler ends on it (the last step returns D)."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type=prediction_type))
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    table = torch.from_numpy(grids.sigma_table(ns.alphas_cumprod)).double()

    def denoise(x_t, t):
        sigma = float(torch.from_numpy(grids.interpolate_sigmas(t.double().reshape(1).numpy(), table.numpy()))[0])
        a = torch.tensor(1 / (sigma**2 + 1), dtype=torch.float64)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]

    out = sampler.sample(denoise, _x_T(), ns, 11, generator=_gens(1, 2))
    assert_parity(out, x0, tol=1e-6)   # the midpoint timesteps map back to sigma by interpolation


STOCHASTIC = [DPM2AncestralSampler(), DPMPP2SAncestralSampler(), DPMSolverSDESampler(), DPMPP3MSDESampler(),
              DPMSolverMultistepSDESampler(noise_type="brownian", sigma_schedule="karras")]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: repr(s)[:60])
def test_image_i_of_a_batch_equals_its_seed_alone(sampler):
    ns = NoiseScheduler()

    def generate(seeds):
        gens = _gens(*seeds)
        x_T = randn((len(seeds), *SHAPE[1:]), generator=gens)   # as the pipeline draws x_T
        return sampler.sample(toy_model, x_T, ns, 8, generator=gens)

    batch = generate([1, 2])
    assert_parity(batch[0:1], generate([1]), tol=1e-6)
    assert_parity(batch[1:2], generate([2]), tol=1e-6)
    x = _x_T()[:1].float()
    runs = [sampler.sample(toy_model, x, ns, 8, generator=g) for g in (_gens(7)[0], _gens(7), _gens(8))]
    assert torch.equal(runs[0], runs[1]) and max_rel_error(runs[0], runs[2]) > 1e-3


def test_noise_sampler_seed_is_one_tree_over_the_batch():
    ns, x = NoiseScheduler(), _x_T().float()
    sampler = DPMSolverSDESampler(noise_sampler_seed=5)
    a = sampler.sample(toy_model, x, ns, 6, generator=_gens(1, 2))
    b = sampler.sample(toy_model, x, ns, 6, generator=_gens(3, 4))   # the generators no longer matter
    assert torch.equal(a, b)
    assert not torch.equal(a, sampler.with_options(noise_sampler_seed=6).sample(toy_model, x, ns, 6))


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="noise_type"):
        DPMPP3MSDESampler(noise_type="uniform")
    with pytest.raises(ConfigError, match="noise_type"):
        DPMSolverMultistepSDESampler(noise_type="pink")
    with pytest.raises(ConfigError, match="noise_sampler_seed"):
        DPMSolverSDESampler(noise_sampler_seed=-1)
    with pytest.raises(TypeError):
        DPM2Sampler(eta=0.5)


# ---- scheduler_config.json ------------------------------------------------------------------------------------
def _read_back(tmp_path, ns, sampler):
    write_scheduler_folder(tmp_path, ns, sampler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, loaded = read_scheduler_file(tmp_path / "scheduler_config.json")
    assert [w for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    return json.loads((tmp_path / "scheduler_config.json").read_text()), config, loaded


@pytest.mark.parametrize("sampler,cls", [
    (DPM2Sampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1), KDPM2),
    (DPM2AncestralSampler(sigma_schedule="exponential"), KDPM2A),
    (DPMSolverSDESampler(noise_sampler_seed=42, timestep_spacing="trailing"), SDE),
], ids=lambda v: repr(v)[:40])
def test_native_diffusers_classes_round_trip(diffusers, tmp_path, sampler, cls):
    if cls == SDE:
        pytest.importorskip("torchsde")
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD, prediction_type="v_prediction"))
    data, config, loaded = _read_back(tmp_path, ns, sampler)
    ref_cls = getattr(diffusers, cls)
    assert data["_class_name"] == cls and loaded == sampler and config == ns.config
    assert {k for k in data if not k.startswith("_")} == set(inspect.signature(ref_cls.__init__).parameters) - {"self"}
    ref = ref_cls.from_pretrained(tmp_path)           # diffusers reads the file to the same grid
    ref.set_timesteps(9)
    assert np.allclose(sampler.plan(ns, 9).timesteps.numpy(), ref.timesteps[::2].numpy(), rtol=1e-6)
    ref_cls(**SD, use_karras_sigmas=True).save_pretrained(tmp_path / "saved")    # and a diffusers folder reads back
    _, from_diffusers = read_scheduler_file(tmp_path / "saved" / "scheduler_config.json")
    assert from_diffusers == type(sampler)(sigma_schedule="karras")


@pytest.mark.parametrize("sampler", [
    DPMPP3MSDESampler(sigma_schedule="karras"), DPMPP2SAncestralSampler(noise_type="brownian"),
    DPMSolverMultistepSDESampler(noise_type="brownian", sigma_schedule="exponential"),
    DPMSolverSDESampler(noise_type="gaussian"), DPM2Sampler(sigma_schedule="align_your_steps", ays_model="sdxl"),
    DPM2Sampler(sigma_schedule="karras", discard_next_to_last_sigma=True),      # A1111's "DPM2", "DPM2 a"
    DPM2AncestralSampler(discard_next_to_last_sigma=True),
    DPMSolverMultistepSDESampler(noise_type="brownian", solver_type="heun", sigma_schedule="exponential"),
], ids=lambda s: repr(s)[:90])
def test_settings_diffusers_has_no_key_for_are_kept_for_latentdiff(tmp_path, sampler):
    data, _, loaded = _read_back(tmp_path, NoiseScheduler(), sampler)
    assert data["_class_name"] == "DDIMScheduler" and data["_latentdiff_sampler"]["name"] == sampler.registry_name
    assert loaded == sampler
