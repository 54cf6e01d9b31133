"""The one step-callback contract: every sampler calls callback(i, t, x, denoised) with the step's x0 prediction,
checked against an oracle denoiser that knows x0; callbacks written as (i, t, x), with **kwargs, or as the sigma
loops' former (i, x) keep working; every sampler satisfies SamplerProtocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler
from latentdiff.diffusion.samplers import SamplerProtocol, as_step_callback, check_sampler, switch_sampler
from latentdiff.diffusion.samplers.base import StepCounting
from latentdiff.diffusion.samplers.grids import sigma_table
from latentdiff.diffusion.samplers.sigma_loops import sample_euler
from latentdiff.errors import InputError
from latentdiff.registry import SAMPLERS
from tests._support.parity import max_rel_error

SHAPE = (2, 4, 8, 8)


def _randn(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle(sampler, ns: NoiseScheduler, n: int, x0: torch.Tensor):
    """denoise(x_t, t) returning the exact eps of x_t for the known x0: discrete samplers from abar_t at the integer
    t, sigma-space ones from the sigma the plan pairs with t (x_t = (x0 + sigma eps) / sqrt(sigma^2 + 1)); a
    timestep off the plan (the midpoints of DPM2, DPM++ SDE) from log sigma interpolated at t, which inverts the
    samplers' sigma -> t map."""
    plan = sampler.plan(ns, n)
    sigma_of = dict(zip(plan.timesteps.tolist(), plan.sigmas, strict=False)) if hasattr(plan, "sigmas") else None
    log_table = torch.from_numpy(sigma_table(ns.alphas_cumprod)).double().log().numpy()

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if sigma_of is None:
            abar = float(ns.alphas_cumprod[int(t)])
            return (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        sigma = sigma_of.get(t.item()) or float(np.exp(np.interp(t.item(), np.arange(len(log_table)), log_table)))
        return (x_t * (sigma**2 + 1) ** 0.5 - x0) / sigma

    return denoise


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_passes_the_x0_prediction(name):
    """With an exact denoiser the prediction is x0 itself at every step, stochastic samplers included; i and t are
    the step's, x the new state (the one the next step starts from)."""
    sampler, ns, n = SAMPLERS.get(name)(), NoiseScheduler(), 6
    x0 = _randn(0)
    seen = []

    def callback(i, t, x, denoised):
        seen.append((i, t, x, denoised))

    out = sampler.sample(oracle(sampler, ns, n, x0), _randn(1), ns, n, generator=torch.Generator().manual_seed(2),
                         callback=callback)
    assert [s[0] for s in seen] == list(range(n))
    assert [s[1] for s in seen] == sampler.timesteps(ns, n).tolist()
    for i, _, x, denoised in seen:
        assert denoised.shape == x.shape and denoised.dtype == x.dtype
        # LCM's prediction is the boundary-conditioned c_skip(t) x_t + c_out(t) x0 (c_skip(t) <= 7e-6 for t >= 19)
        assert max_rel_error(denoised, x0) < (1e-6 if name == "lcm" else 1e-9), i
    final_scale = getattr(sampler.plan(ns, n), "final_scale", 1.0)   # DEIS ends at sigma_min > 0, on x_t
    assert torch.equal(out, seen[-1][2] if final_scale == 1.0 else seen[-1][2] * final_scale)


@pytest.mark.parametrize("name", ["ddim", "plms", "euler", "dpmpp_2m"])
def test_the_prediction_is_the_models_own(name):
    """Not an oracle: denoised is the x0 the raw prediction implies at the step's input (DDIM's x0_pred,
    D(x; sigma))."""
    sampler, ns, n = SAMPLERS.get(name)(), NoiseScheduler(), 4
    calls, seen = [], []

    def denoise(x_t, t):
        out = 0.7 * torch.tanh(x_t) + 0.01 * t.double()
        calls.append((x_t, t, out))
        return out

    sampler.sample(denoise, _randn(1), ns, n, callback=lambda i, t, x, denoised: seen.append(denoised))
    plan = sampler.plan(ns, n)
    firsts = [calls[0]] + calls[2:] if name == "plms" else calls    # PLMS's warm-up calls twice at step 0
    assert len(firsts) == len(seen) == n
    for (x_t, t, out), denoised in zip(firsts, seen, strict=True):
        if hasattr(plan, "sigmas"):     # sigma space: the state is x_t sqrt(sigma^2 + 1), D = state - sigma eps
            sigma = dict(zip(plan.timesteps.tolist(), plan.sigmas, strict=False))[t.item()]
            expected = x_t * (sigma**2 + 1) ** 0.5 - sigma * out
        else:                           # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
            abar = float(ns.alphas_cumprod[int(t)])
            expected = (x_t - (1 - abar) ** 0.5 * out) / abar**0.5
        assert max_rel_error(denoised, expected) < 1e-12


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_older_callback_forms_keep_working(name):
    sampler, ns = SAMPLERS.get(name)(), NoiseScheduler()
    three, kw, only = [], [], []
    plain = sampler.sample(lambda x, t: 0.5 * x, _randn(1), ns, 3)
    out = sampler.sample(lambda x, t: 0.5 * x, _randn(1), ns, 3, callback=lambda i, t, x: three.append((i, t)))
    sampler.sample(lambda x, t: 0.5 * x, _randn(1), ns, 3, callback=lambda i, t, x, **extra: kw.append(extra))
    sampler.sample(lambda x, t: 0.5 * x, _randn(1), ns, 3,
                   callback=lambda i, t, x, *, denoised: only.append(denoised.shape))
    assert torch.equal(out, plain)
    assert [i for i, _ in three] == [0, 1, 2] and [sorted(e) for e in kw] == [["denoised"]] * 3
    assert only == [torch.Size(SHAPE)] * 3


def test_the_sigma_loops_former_two_argument_callback():
    sigmas, seen = [2.0, 1.0, 0.0], []
    sample_euler(lambda x, sigma: 0 * x, _randn(1), sigmas, callback=lambda i, x: seen.append((i, x.shape)))
    assert seen == [(0, torch.Size(SHAPE)), (1, torch.Size(SHAPE))]
    full = []
    sample_euler(lambda x, sigma: 0 * x, _randn(1), sigmas,
                 callback=lambda i, sigma, x, denoised: full.append((i, sigma, float(denoised.abs().max()))))
    assert full == [(0, 2.0, 0.0), (1, 1.0, 0.0)]


def test_a_callback_is_normalised_once():
    normalised = as_step_callback(lambda i, t, x: None)
    assert as_step_callback(normalised) is normalised and as_step_callback(None) is None


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_satisfies_the_protocol(name):
    sampler = SAMPLERS.get(name)()
    assert isinstance(sampler, SamplerProtocol) and check_sampler(sampler) is sampler


def test_check_sampler_refuses_what_cannot_start_part_way():
    class Plain:
        init_noise_sigma = 1.0

        def sample(self, *args, **kwargs):
            return args[1]

    with pytest.raises(InputError) as info:
        check_sampler(Plain())
    assert info.value.where == "sampler"


def test_switch_sampler_keeps_the_shared_settings():
    ddim = SAMPLERS.get("ddim")(timestep_spacing="trailing", steps_offset=1, eta=0.5)
    euler = switch_sampler(ddim, "euler")
    assert euler.registry_name == "euler" and (euler.timestep_spacing, euler.steps_offset) == ("trailing", 1)
    assert switch_sampler(ddim, None) is ddim and switch_sampler(ddim, "ddim") is ddim


@pytest.mark.parametrize("start_step", [0, 3])
def test_step_counting_counts_the_steps_not_the_model_calls(start_step):
    """`StepCounting.step` is the step each model call belongs to, counted by the step callback: Heun calls the model
    twice in a step, at a timestep off the plan's grid, and both calls see the same step. `step_started` runs as
    the run starts and after each step; the wrapped callback keeps its form (here the former (i, x))."""
    ns, n = NoiseScheduler(), 4
    steps_done: list[int] = []

    class Wrapper(StepCounting):
        def __init__(self):
            self.seen: list[tuple[int, int]] = []      # (step, start_step + steps the callback has counted)
            self.started = 0

        def step_started(self):
            self.started += 1

        def __call__(self, x_t, t):
            self.seen.append((self.step, start_step + len(steps_done)))
            return 0.5 * x_t

    wrapper = Wrapper()
    callback = wrapper.counting(lambda i, x: steps_done.append(i), start_step)
    SAMPLERS.create("heun").sample(wrapper, _randn(1), ns, n, callback=callback)
    assert steps_done == list(range(n)) and wrapper.started == n + 1 and wrapper.step == start_step + n
    assert [step for step, _ in wrapper.seen] == [counted for _, counted in wrapper.seen]
    assert len(wrapper.seen) > n                        # more model calls than steps: the count is not per call
