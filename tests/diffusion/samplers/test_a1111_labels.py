"""A1111's labels compute what A1111 computes (names.py: A1111_OPTIONS, A1111_VARIANTS): each label through
latentdiff against k-diffusion's loop (tests/_support/kdiffusion.py) driven the way A1111 >= 1.9 drives it
(modules/sd_samplers_kdiffusion.py): its "Automatic" schedule over the model's sigma range, built by k-diffusion's
own get_sigmas_* with one step more and sigmas[-2] dropped where A1111 discards the next-to-last sigma, a
BrownianTreeNoiseSampler (torchsde) for its SDE samplers, solver_type="heun" for "DPM++ 2M SDE Heun"; float64, 1e-12.

The network is a t-independent stand-in here, so the comparison is of the grid, the noise and the loop: the
timestep a sampler passes to the network (integer for DPM-Solver, as diffusers; fractional in A1111) is not part of
it. The trees take the entropies latentdiff draws from the image's generator (`brownian.entropies_from`): A1111
seeds its trees with the image seed itself, which the sampler (given a generator, not a seed) cannot see.
"""
from __future__ import annotations

import json

import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DDIMSampler,
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMPP3MSDESampler,
    DPMSolverMultistepSDESampler,
    EulerSampler,
    brownian,
    grids,
)
from latentdiff.diffusion.samplers.base import noise_sampler_from
from latentdiff.diffusion.samplers.names import A1111_GRID, resolve_sampler, sampler_from_name
from latentdiff.diffusion.samplers.sigma import MultistepSigmaSampler
from latentdiff.diffusion.scheduler_io import read_scheduler_file, write_scheduler_folder
from latentdiff.errors import ConfigError, InputError
from tests._support.kdiffusion import k_external, k_sampling
from tests._support.parity import assert_parity, max_rel_error

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")]   # torchsde's float32 tree ends

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
STEPS = 9


@pytest.fixture
def k():
    module = k_sampling()
    if module is None:
        pytest.skip("k-diffusion's sampling.py needs k-diffusion (--no-deps), torchsde and torchdiffeq")
    return module


def toy_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A bounded, per-sample stand-in for an eps network that ignores t."""
    return 0.8 * torch.tanh(x_t) + 0.05


def k_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion's CompVisDenoiser of toy_eps: D(x; sigma) = x - sigma eps(x / sqrt(sigma^2 + 1))."""
    s = float(sigma.reshape(-1)[0])
    return x - s * toy_eps(x / (s**2 + 1) ** 0.5, sigma)


def _gens():
    return [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]


# label, k-diffusion loop and its extra arguments, A1111's Automatic schedule, discard_next_to_last_sigma, Brownian
CASES = [
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, "exponential", False, True),
    ("k_dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, "exponential", False, True),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {}, "exponential", False, True),
    ("DPM++ SDE", "sample_dpmpp_sde", {}, "karras", False, True),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {}, "exponential", True, True),
    ("DPM2", "sample_dpm_2", {}, "karras", True, False),
    ("DPM2 a", "sample_dpm_2_ancestral", {}, "karras", True, False),
]


def a1111_sigmas(k, table, schedule: str, steps: int, discard: bool) -> torch.Tensor:
    """A1111's get_sigmas: k-diffusion's karras / exponential grid over the model's sigmas (steps + 1 of them when it
    discards), then sigmas[-2] removed."""
    make = {"karras": k.get_sigmas_karras, "exponential": k.get_sigmas_exponential}[schedule]
    sigmas = make(steps + (1 if discard else 0), float(table[0]), float(table[-1])).double()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


@pytest.mark.parametrize("label,loop,loop_kw,schedule,discard,tree", CASES, ids=[c[0] for c in CASES])
def test_a1111_label_equals_k_diffusion_driven_as_a1111(k, label, loop, loop_kw, schedule, discard, tree):
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    sampler = sampler_from_name(label)
    plan = sampler.plan(ns, STEPS)
    expected_sigmas = a1111_sigmas(k, grids.sigma_table(ns.alphas_cumprod), schedule, STEPS, discard)
    assert len(plan.sigmas) == STEPS + 1        # N steps, also where the grid was built for N + 1
    assert max_rel_error(torch.tensor(plan.sigmas, dtype=torch.float64), expected_sigmas) < 1e-6   # float32 grid

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler.sample(toy_eps, x_T, ns, STEPS, generator=_gens())
    # k-diffusion on the very same sigmas and start (A1111 starts at x_T sigma_0; the samplers start where diffusers
    # does, `plan.init_scale`: a separate matter)
    sigmas, x_k = torch.tensor(plan.sigmas, dtype=torch.float64), x_T * plan.init_scale
    if tree:
        positive = sigmas[sigmas > 0]
        noise = k.BrownianTreeNoiseSampler(x_k, positive.min(), positive.max(),
                                           seed=brownian.entropies_from(_gens(), SHAPE[0]))
    else:                                        # DPM2 a: fresh Gaussian noise per step, the same numbers
        draw = noise_sampler_from(_gens())
        noise = lambda sigma, sigma_next: draw(x_k)     # noqa: E731
    kw = {"noise_sampler": noise} if loop != "sample_dpm_2" else {}
    expected = getattr(k, loop)(k_denoiser, x_k, sigmas, disable=True, **loop_kw, **kw)
    assert_parity(out, expected * plan.final_scale, tol=1e-12)

    # the registered name keeps the sampler's own settings (DPM++ SDE's are A1111's already, and its karras grid
    # spans the same sigmas in either interpolation): another image
    registered = sampler_from_name(sampler.registry_name, schedule=schedule)
    same = registered.with_options(**A1111_GRID) == sampler
    assert same == (label == "DPM++ SDE")
    if not same:
        assert not torch.allclose(registered.sample(toy_eps, x_T, ns, STEPS, generator=_gens()), out, rtol=1e-3)


@pytest.mark.parametrize("label,options", [
    ("DPM++ 2M SDE Heun", {"solver_type": "heun", "noise_type": "brownian"}),
    ("DPM++ 2M SDE Heun Karras", {"solver_type": "heun", "noise_type": "brownian"}),
    ("DPM++ 2M SDE", {"noise_type": "brownian"}),
    ("k_dpmpp_2m_sde", {"noise_type": "brownian"}),
    ("DPM++ SDE Karras", {"noise_type": "brownian"}),
    ("DPM++ 3M SDE", {"noise_type": "brownian", "discard_next_to_last_sigma": True}),
    ("DPM2", {"discard_next_to_last_sigma": True}),
    ("DPM2 a Karras", {"discard_next_to_last_sigma": True}),
    ("k_dpm_2_a", {"discard_next_to_last_sigma": True}),
    ("DPM++ 2M", {}), ("Euler a", {}), ("k_lms", {}),
])
def test_labels_carry_a1111_options(label, options):
    """Each k-diffusion label: A1111's grid (linspace from T - 1, no offset, log sigma) and its own options."""
    expected = {"timestep_spacing": "linspace", "steps_offset": 0, "sigma_interpolation": "log"} | options
    assert dict(resolve_sampler(label).options) == expected


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpm_2", "euler", "DPMSolverMultistepScheduler",
                                  "KDPM2DiscreteScheduler", "EulerDiscreteScheduler", "DDIM", "UniPC"])
def test_other_names_carry_no_options(name):
    assert resolve_sampler(name).options == ()


def test_options_override_the_settings_a_base_sampler_carries_over():
    base = DPMSolverMultistepSDESampler(noise_type="gaussian", timestep_spacing="trailing")
    sampler = sampler_from_name("DPM++ 3M SDE", base=base)
    assert sampler == DPMPP3MSDESampler(noise_type="brownian", discard_next_to_last_sigma=True,
                                        sigma_schedule="exponential", **A1111_GRID)
    assert sampler_from_name("DPM++ 2M SDE", base=base, schedule="karras") == DPMSolverMultistepSDESampler(
        noise_type="brownian", sigma_schedule="karras", **A1111_GRID)
    assert sampler_from_name("dpmpp_2m_sde", base=base) == base      # a registered name: the base's settings


@pytest.mark.parametrize("cls", [DPM2Sampler, DPM2AncestralSampler, DPMPP3MSDESampler])
@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
def test_discarding_the_next_to_last_sigma(cls, schedule):
    """The N + 1-step grid without its smallest positive sigma (and that step's timestep); off by default."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    longer = cls(sigma_schedule=schedule).plan(ns, STEPS + 1)
    plan = cls(sigma_schedule=schedule, discard_next_to_last_sigma=True).plan(ns, STEPS)
    assert plan.sigmas == longer.sigmas[:-2] + longer.sigmas[-1:]
    assert torch.equal(plan.timesteps, longer.timesteps[:-1])
    assert plan.init_scale == longer.init_scale
    own = cls(sigma_schedule=schedule).plan(ns, STEPS)
    assert len(own.sigmas) == STEPS + 1 and own.sigmas != plan.sigmas


# ---- A1111's grid whatever the folder: its model's sigmas alone, "Uniform" in log sigma --------------------------
# SDXL's scheduler_config.json (and SD 1.5's PNDM one): "leading" spacing, steps_offset 1
FOLDERS = {"none": None, "sdxl": EulerSampler(timestep_spacing="leading", steps_offset=1),
           "sd15": DDIMSampler(timestep_spacing="leading", steps_offset=1)}
# A1111's k-diffusion labels, their Automatic schedule and whether A1111 discards the next-to-last sigma
K_LABELS = [("Euler", "uniform", False), ("Euler a", "uniform", False), ("Heun", "uniform", False),
            ("LMS", "uniform", False), ("DPM2", "karras", True), ("DPM2 a", "karras", True),
            ("DPM++ 2S a", "karras", False), ("DPM++ SDE", "karras", False), ("DPM++ 2M", "karras", False),
            ("DPM++ 2M SDE", "exponential", False), ("DPM++ 2M SDE Heun", "exponential", False),
            ("DPM++ 3M SDE", "exponential", True)]


def k_grid(k, schedule: str, steps: int, discard: bool) -> torch.Tensor:
    """A1111's get_sigmas on k-diffusion's CompVisDenoiser of the SD schedule: k-diffusion's karras / exponential
    grid over the model's [sigma_min, sigma_max], or "Uniform", the denoiser's own get_sigmas; with one step more
    and sigmas[-2] dropped where A1111 discards."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    model = k_external().DiscreteEpsDDPMDenoiser(toy_eps, ns.alphas_cumprod, quantize=False)
    n = steps + (1 if discard else 0)
    if schedule == "uniform":
        sigmas = model.get_sigmas(n)
    else:
        make = {"karras": k.get_sigmas_karras, "exponential": k.get_sigmas_exponential}[schedule]
        sigmas = make(n, model.sigma_min.item(), model.sigma_max.item())
    sigmas = sigmas.double()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


# every schedule A1111 offers these samplers by a k-diffusion grid (Euler a has none to choose: Automatic, Uniform)
GRID_CASES = [(label, automatic, discard, schedule) for label, automatic, discard in K_LABELS
              for schedule in (None, "Uniform", "Karras", "Exponential")
              if label != "Euler a" or schedule in (None, "Uniform")]


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("label,automatic,discard,schedule", GRID_CASES, ids=[f"{c[0]}-{c[3]}" for c in GRID_CASES])
def test_a1111_label_grid_is_a1111s_whatever_the_folder(k, folder, label, automatic, discard, schedule):
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    sampler = sampler_from_name(label, schedule=schedule, base=FOLDERS[folder])
    plan = sampler.plan(ns, STEPS)
    chosen = automatic if schedule is None else schedule.lower()
    expected = k_grid(k, chosen, STEPS, discard)
    assert len(plan.sigmas) == STEPS + 1
    # float32 grids; karras / exponential: latentdiff's in float64 (diffusers'), rounded to float32, k-diffusion's in
    # float32 throughout; Uniform: the same float32 operations (linear interpolation: up to 7e-7 off here)
    tol = 1e-7 if chosen == "uniform" else 1e-6
    assert max_rel_error(torch.tensor(plan.sigmas, dtype=torch.float64), expected) < tol
    assert plan.sigmas[0] == pytest.approx(14.6146, abs=1e-4)                       # sigma_max of the model
    if not isinstance(sampler, MultistepSigmaSampler):      # A1111 starts at x_T sigma_0 (DPM-Solver: diffusers')
        assert plan.init_scale == pytest.approx(plan.sigmas[0], rel=1e-7)


def test_registered_and_diffusers_names_keep_the_folders_grid():
    """diffusers' from_config keeps a folder's spacing: so do the names that are not A1111's."""
    ns, folder = NoiseScheduler(NoiseSchedulerConfig(**SD)), FOLDERS["sdxl"]
    for name in ("euler", "EulerDiscreteScheduler", "dpm_2", "KDPM2DiscreteScheduler", "euler_ancestral"):
        sampler = sampler_from_name(name, base=folder)
        assert (sampler.timestep_spacing, sampler.steps_offset, sampler.sigma_interpolation) == \
            ("leading", 1, "linear")
    # diffusers' Euler on SDXL's leading grid: the first timestep 8 * (1000 // 9) + 1 = 889, not T - 1
    assert sampler_from_name("euler", base=folder).plan(ns, STEPS).timesteps[0] == 889
    assert sampler_from_name("Euler", base=folder).plan(ns, STEPS).timesteps[0] == 999


# label, its k-diffusion loop, schedule (None: Automatic), tolerance (LMS: k-diffusion integrates its coefficients
# with scipy's quad, latentdiff with Gauss-Legendre)
LOOPS = [("Euler", "sample_euler", None, 1e-12), ("Heun", "sample_heun", None, 1e-12),
         ("LMS", "sample_lms", None, 1e-9), ("Euler a", "sample_euler_ancestral", None, 1e-12),
         ("DPM2", "sample_dpm_2", "Uniform", 1e-12), ("DPM++ 2M", "sample_dpmpp_2m", "Uniform", 1e-12)]


@pytest.mark.parametrize("label,loop,schedule,tol", LOOPS, ids=[c[0] for c in LOOPS])
def test_a1111_label_on_an_sdxl_folder_equals_k_diffusion_on_its_own_grid(k, label, loop, schedule, tol):
    """The whole run from an SDXL folder's sampler against k-diffusion's loop on k-diffusion's own grid (not
    latentdiff's), started as A1111 starts it (x_T sigma_0; DPM-Solver where diffusers starts it)."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    sampler = sampler_from_name(label, schedule=schedule, base=FOLDERS["sdxl"])
    plan = sampler.plan(ns, STEPS)
    sigmas = k_grid(k, "uniform", STEPS, discard=label == "DPM2")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler.sample(toy_eps, x_T, ns, STEPS, generator=_gens())
    draw = noise_sampler_from(_gens())
    kw = {"noise_sampler": lambda sigma, sigma_next: draw(x_T)} if loop == "sample_euler_ancestral" else {}
    start = plan.init_scale if isinstance(sampler, MultistepSigmaSampler) else sigmas[0].item()
    expected = getattr(k, loop)(k_denoiser, x_T * start, sigmas, disable=True, **kw)
    assert_parity(out, expected * plan.final_scale, tol=tol)


@pytest.mark.parametrize("steps", [30, 1000])
def test_log_interpolation_is_k_diffusions_uniform_grid(k, steps):
    """sigma_interpolation="log" on the linspace grid is k-diffusion's get_sigmas (the same float32 operations, on
    timesteps that numpy's and torch's linspace may round an ulp apart);
    "linear" (the default) stays diffusers' grid, which differs from it between trained timesteps (sigmas up to
    3e-5 apart at 30 steps of SD's schedule: a small difference, but another image)."""
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    expected = k_grid(k, "uniform", steps, False)
    log = EulerSampler(sigma_interpolation="log").plan(ns, steps)
    assert max_rel_error(torch.tensor(log.sigmas, dtype=torch.float64), expected) < 1e-7
    linear = EulerSampler().plan(ns, steps)
    assert torch.equal(linear.timesteps, log.timesteps)
    linear_error = max_rel_error(torch.tensor(linear.sigmas, dtype=torch.float64), expected)
    if steps == 30:     # fractional timesteps: sigma between two trained ones
        assert linear_error > 1e-6
    else:               # every trained timestep: both read the table itself (exp(log s) rounds in float32)
        assert linear_error < 1e-6


def test_discarding_with_every_trained_timestep_names_the_steps_asked_for():
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    with pytest.raises(InputError) as caught:
        sampler_from_name("DPM2").plan(ns, 1000)
    assert caught.value.where == "num_inference_steps" and caught.value.found == 1000
    assert "1001" not in str(caught.value) and "999" in str(caught.value)
    assert len(sampler_from_name("DPM2").plan(ns, 999).sigmas) == 1000
    assert len(sampler_from_name("dpm_2").plan(ns, 1000).sigmas) == 1001    # no discarding: every timestep


def test_sigma_interpolation_is_checked():
    with pytest.raises(ConfigError):
        EulerSampler(sigma_interpolation="cubic")


@pytest.mark.parametrize("label,written", [
    ("DPM++ 2M", "DPMSolverMultistepScheduler"), ("Euler Karras", "EulerDiscreteScheduler"),
    ("LMS Exponential", "LMSDiscreteScheduler"),          # log sigma changes no karras / exponential grid
    ("Euler", "DDIMScheduler"), ("Euler a", "DDIMScheduler"), ("DPM++ 2M Uniform", "DDIMScheduler"),
])
def test_an_a1111_labels_sampler_is_written_as_diffusers_where_diffusers_can_say_it(tmp_path, label, written):
    """A scheduler file: diffusers' class where its keys give the same grid, else latentdiff's own entry (diffusers
    has no log-sigma "Uniform"); read back, the same grid either way."""
    ns, sampler = NoiseScheduler(NoiseSchedulerConfig(**SD)), sampler_from_name(label)
    write_scheduler_folder(tmp_path, ns, sampler)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == written
    _, loaded = read_scheduler_file(tmp_path / "scheduler_config.json")
    assert loaded.plan(ns, STEPS).sigmas == sampler.plan(ns, STEPS).sigmas
    assert (loaded == sampler) == (written == "DDIMScheduler")
