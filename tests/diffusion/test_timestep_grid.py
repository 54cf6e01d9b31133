"""`samplers.grids.timestep_grid`: one function for the timesteps of every sampler, by `kind`: the analytic grids,
the dtypes, the errors, the diffusers scheduler of each kind, and the former three functions (now shims over it)."""
from __future__ import annotations

import numpy as np
import pytest

from latentdiff.diffusion import sampling, sigmas
from latentdiff.diffusion.samplers import timestep_grid
from latentdiff.errors import InputError

SPACINGS = ("leading", "trailing", "linspace")


@pytest.mark.parametrize("kind", ["discrete", "euler", "dpm_solver"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_a_descending_grid_of_n_training_timesteps(kind, spacing):
    for n in (1, 2, 7, 10, 50, 333):
        grid = timestep_grid(1000, n, kind=kind, spacing=spacing)
        assert grid.shape == (n,) and grid.dtype == (np.float32 if kind == "euler" else np.int64)
        assert (np.diff(grid) < 0).all() and grid[-1] >= 0 and grid[0] <= 999


def test_the_analytic_grids():
    """leading: k (T // N) + offset; trailing: round(T - k T / N) - 1; linspace: rounded (unrounded for "euler");
    DPM-Solver spans N + 1 points and drops t = 0."""
    T, N = 1000, 7
    assert timestep_grid(T, N, spacing="leading", steps_offset=1).tolist() == [k * 142 + 1 for k in range(6, -1, -1)]
    assert timestep_grid(T, N, spacing="trailing").tolist() == [round(T - k * T / N) - 1 for k in range(N)]
    assert timestep_grid(T, 4, spacing="linspace").tolist() == [999, 666, 333, 0]
    assert timestep_grid(T, 4, kind="euler", spacing="linspace").tolist() == [999.0, 666.0, 333.0, 0.0]
    assert timestep_grid(T, 3, kind="euler", spacing="linspace").tolist() == [999.0, 499.5, 0.0]
    assert timestep_grid(T, 4, kind="dpm_solver", spacing="linspace").tolist() == [999, 749, 500, 250]
    assert timestep_grid(T, 4, kind="dpm_solver", spacing="leading").tolist() == [800, 600, 400, 200]
    assert timestep_grid(T, 4, kind="dpm_solver", spacing="linspace", last_timestep=901).tolist() == \
        [900, 675, 450, 225]
    # last_timestep concerns DPM-Solver's clipped grid only
    assert timestep_grid(T, 4, spacing="linspace", last_timestep=901).tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("kind,cls,key", [("discrete", "DDIMScheduler", {}), ("euler", "EulerDiscreteScheduler", {}),
                                          ("dpm_solver", "DPMSolverMultistepScheduler", {})])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_each_kind_is_its_diffusers_schedulers_grid(kind, cls, key, spacing):
    diffusers = pytest.importorskip("diffusers")
    for n, offset in ((4, 0), (10, 1), (25, 0), (50, 1)):
        offset = offset if spacing == "leading" else 0
        ref = getattr(diffusers, cls)(timestep_spacing=spacing, steps_offset=offset, **key)
        ref.set_timesteps(n)
        ours = timestep_grid(1000, n, kind=kind, spacing=spacing, steps_offset=offset)
        assert np.array_equal(ours, ref.timesteps.numpy().astype(ours.dtype)), (n, offset)


def test_the_former_functions_are_the_kinds():
    for spacing in SPACINGS:
        for n in (1, 9, 61, 1000):
            assert sampling.select_timesteps(1000, n, spacing=spacing) == \
                timestep_grid(1000, n, spacing=spacing).tolist()
            assert np.array_equal(sigmas.spaced_timesteps(1000, n, spacing=spacing),
                                  timestep_grid(1000, n, kind="euler", spacing=spacing))
    assert np.array_equal(sigmas.dpm_solver_timesteps(1000, 9, spacing="linspace", last_timestep=950),
                          timestep_grid(1000, 9, kind="dpm_solver", spacing="linspace", last_timestep=950))


@pytest.mark.parametrize("kwargs,where", [
    (dict(kind="karras"), "kind"), (dict(spacing="cosine"), "timestep_spacing"),
    (dict(spacing="leading", steps_offset=200), "steps_offset"),
])
def test_bad_arguments_are_input_errors(kwargs, where):
    with pytest.raises(InputError) as info:
        timestep_grid(1000, 10, **kwargs)
    assert info.value.where == where


@pytest.mark.parametrize("n", [0, 1001, 2.0, True])
def test_the_step_count_is_checked(n):
    with pytest.raises(InputError) as info:
        timestep_grid(1000, n)
    assert info.value.where == "num_inference_steps"


def test_dpm_solver_grids_never_repeat_a_timestep():
    with pytest.raises(InputError, match="repeat"):
        timestep_grid(1000, 600, kind="dpm_solver", spacing="linspace", last_timestep=500)
