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

import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMPP3MSDESampler,
    DPMSolverMultistepSDESampler,
    brownian,
    grids,
)
from latentdiff.diffusion.samplers.base import noise_sampler_from
from latentdiff.diffusion.samplers.names import resolve_sampler, sampler_from_name
from tests._support.kdiffusion import k_sampling
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

    # the registered name keeps the sampler's own settings (DPM++ SDE's are A1111's already): another image
    registered = sampler_from_name(sampler.registry_name, schedule=schedule)
    assert (registered == sampler) == (label == "DPM++ SDE")
    if registered != sampler:
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
    ("DPM++ 2M", {}), ("Euler a", {}),
    ("dpmpp_2m_sde", {}), ("dpm_2", {}), ("DPMSolverMultistepScheduler", {}), ("KDPM2DiscreteScheduler", {}),
])
def test_labels_carry_a1111_options_and_other_names_none(label, options):
    assert dict(resolve_sampler(label).options) == options


def test_options_override_the_settings_a_base_sampler_carries_over():
    base = DPMSolverMultistepSDESampler(noise_type="gaussian", timestep_spacing="trailing")
    sampler = sampler_from_name("DPM++ 3M SDE", base=base)
    assert sampler == DPMPP3MSDESampler(noise_type="brownian", discard_next_to_last_sigma=True,
                                        sigma_schedule="exponential", timestep_spacing="trailing")
    assert sampler_from_name("DPM++ 2M SDE", base=base, schedule="karras") == DPMSolverMultistepSDESampler(
        noise_type="brownian", sigma_schedule="karras", timestep_spacing="trailing")
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
