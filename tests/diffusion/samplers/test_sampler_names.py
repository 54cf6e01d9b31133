"""Samplers by the names people type (diffusion/samplers/names.py): A1111 labels with their "Automatic" schedules,
the older "<sampler> <schedule>" labels and k-diffusion aliases, diffusers class names, registered names; names
that are known but not implemented yet; and whole runs against the diffusers scheduler each name stands for."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import DDIMSampler, DPMSolverMultistepSampler, EulerSampler
from latentdiff.diffusion.samplers.names import (
    A1111_GRID,
    A1111_MISSING,
    DIFFUSERS_MISSING,
    SamplerName,
    accepted_names,
    check_schedule,
    has_schedule,
    resolve_sampler,
    resolve_schedule,
    sampler_from_name,
)
from latentdiff.diffusion.scheduler_io import FOREIGN_CLASSES, NATIVE_CLASSES, matching_sampler
from latentdiff.errors import UsageError
from latentdiff.registry import SAMPLERS
from latentdiff.utils.infotext import A1111_SAMPLER_LABELS
from tests._support.parity import assert_parity

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notices inside diffusers


@pytest.mark.parametrize("text, name, schedule", [
    ("DPM++ 2M", "dpmpp_2m", "karras"),            # A1111 >= 1.9: "Automatic" is karras for DPM++ 2M
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
    ("DPM++ 2M Exponential", "dpmpp_2m", "exponential"),
    ("DPM++ 2M Uniform", "dpmpp_2m", "default"),
    ("dpm++ 2m karras", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde", "exponential"),   # with solver_type heun: test_a1111_labels.py
    ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde", "karras"),
    ("Euler a", "euler_ancestral", None),
    ("euler A", "euler_ancestral", None),
    ("Euler", "euler", "default"),
    ("LMS", "lms", "default"),
    ("LMS Karras", "lms", "karras"),
    ("Heun", "heun", "default"),
    ("DDIM", "ddim", None),
    ("PLMS", "plms", None),
    ("k_euler_a", "euler_ancestral", None),
    ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", None),       # diffusers: the folder's schedule is kept
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", None),
    ("PNDMScheduler", "plms", None),
    ("DDIMScheduler", "ddim", None),
    ("EulerSampler", "euler", None),
    ("euler", "euler", None),                                # a registered name as spelled: itself
    ("dpmpp_2m", "dpmpp_2m", None),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", None),
    ("DPM2", "dpm_2", "karras"),                             # A1111 >= 1.9's Automatic for the DPM family
    ("DPM2 a", "dpm_2_ancestral", "karras"),
    ("DPM2 a Uniform", "dpm_2_ancestral", "default"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "karras"),
    ("DPM++ SDE", "dpmpp_sde", "karras"),
    ("DPM++ SDE Simple", "dpmpp_sde", "simple"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", "exponential"),
    ("DPM++ 3M SDE SGM Uniform", "dpmpp_3m_sde", "sgm_uniform"),
    ("k_dpm_2_a", "dpm_2_ancestral", "karras"),
    ("k_dpmpp_sde_ka", "dpmpp_sde", "karras"),
    ("KDPM2DiscreteScheduler", "dpm_2", None),
    ("KDPM2AncestralDiscreteScheduler", "dpm_2_ancestral", None),
    ("DPMSolverSDEScheduler", "dpmpp_sde", None),
    ("UniPC", "uni_pc", "default"),                             # A1111's: bh1, third order (ComfyUI's uni_pc)
    ("uni_pc", "uni_pc", None), ("uni_pc_bh2", "uni_pc_bh2", None), ("deis", "deis", None),   # ComfyUI's
    ("unipc", "unipc", None),                                # as spelled: diffusers' UniPCMultistepScheduler
    ("UniPCMultistepScheduler", "unipc", None), ("DEISMultistepScheduler", "deis", None),
    ("TCDScheduler", "tcd", None), ("UniPCSampler", "unipc", None),
])
def test_names_resolve_to_the_sampler_and_schedule_their_tool_means(text, name, schedule):
    resolved = resolve_sampler(text)
    assert (resolved.name, resolved.schedule) == (name, schedule)


def test_the_split_form_and_schedule_names():
    assert resolve_sampler("DPM++ 2M", schedule="Exponential") == \
        SamplerName("dpmpp_2m", "exponential", "a1111", tuple(sorted(A1111_GRID.items())))
    assert resolve_sampler("DPM++ 2M", schedule="Automatic").schedule == "karras"
    assert resolve_sampler("DPM++ 2M", schedule="Uniform").schedule == "default"
    assert resolve_sampler("dpmpp_2m", schedule="karras").schedule == "karras"
    assert resolve_sampler("DPM++ 2M Karras", schedule="exponential").schedule == "exponential"   # the flag wins
    assert [resolve_schedule(s) for s in ("default", "KARRAS", "exponential", "uniform", "Automatic")] == \
        ["default", "karras", "exponential", "default", None]
    assert [resolve_schedule(s) for s in ("SGM Uniform", "Simple", "Beta", "Align Your Steps", "sgm_uniform")] == \
        ["sgm_uniform", "simple", "beta", "align_your_steps", "sgm_uniform"]
    assert resolve_sampler("Euler", schedule="Align Your Steps").schedule == "align_your_steps"


@pytest.mark.parametrize("text, closest", [
    ("DDIM CFG++", "ddim"), ("dpm_fast", "dpmpp_2m"), ("Restart", "heun"), ("DPM adaptive", None),
])
def test_names_not_implemented_yet_say_so_and_name_the_closest(text, closest):
    with pytest.raises(UsageError) as info:
        resolve_sampler(text, where="--sampler")
    message = str(info.value)
    assert "not implemented yet" in message and "unknown" not in message and "--sampler" in message
    assert "the closest: " in message and (closest is None or closest in message)


@pytest.mark.parametrize("text", ["warp_drive", "", "x" * 500, 5, None])
def test_unknown_names_list_the_accepted_ones(text):
    with pytest.raises(UsageError) as info:
        resolve_sampler(text, where="--sampler")
    assert "--sampler" in str(info.value) and "euler_ancestral" in str(info.value)


def test_a_close_misspelling_is_suggested():
    with pytest.raises(UsageError, match="unknown sampler") as info:
        resolve_sampler("Eular a")
    assert "Euler a" in info.value.hint


@pytest.mark.parametrize("text, words", [
    ("KL Optimal", ["not implemented yet", "KL Optimal"]), ("Align Your Steps GITS", ["not implemented yet"]),
    ("rho", ["unknown schedule"]), (7, ["a schedule must be a name"]),
])
def test_bad_schedules(text, words):
    with pytest.raises(UsageError) as info:
        resolve_schedule(text, where="--schedule")
    assert all(word in str(info.value) for word in ["--schedule", *words])


def test_a_schedule_on_a_sampler_without_one_names_both_flags():
    check_schedule("ddim", "default", where="x")          # the default grid: nothing to set
    for name, schedule in (("ddim", "karras"), ("euler_ancestral", "exponential"), ("plms", "karras")):
        with pytest.raises(UsageError) as info:
            check_schedule(name, schedule, where="--schedule, --sampler")
        assert all(word in str(info.value) for word in ("--schedule", "--sampler", name, schedule))
    with pytest.raises(UsageError, match="euler_ancestral"):
        sampler_from_name("Euler a Karras")


def test_one_table_covers_every_registered_sampler_and_diffusers_class():
    # A1111 has no DEIS, TCD or diffusers-default UniPC: those are written (infotext) and read as their own names
    assert set(SAMPLERS.names()) - set(A1111_SAMPLER_LABELS) <= {"unipc", "uni_pc_bh2", "deis", "tcd"}
    assert set(A1111_SAMPLER_LABELS) <= set(SAMPLERS.names())
    for diffusers_class in NATIVE_CLASSES:
        assert resolve_sampler(diffusers_class).name == matching_sampler(diffusers_class).registry_name
    assert set(FOREIGN_CLASSES) <= set(DIFFUSERS_MISSING)
    for closest in (*A1111_MISSING.values(), *DIFFUSERS_MISSING.values()):
        assert closest in SAMPLERS.names()
    groups = accepted_names()
    assert groups["registered"] == SAMPLERS.names() and "DPM++ 2M Karras" in groups["A1111"]
    assert "DPMSolverMultistepScheduler" in groups["diffusers"] and "DPM adaptive" in groups["not implemented yet"]
    for label in groups["A1111"] + groups["diffusers"] + groups["registered"]:
        resolve_sampler(label)                            # every listed name resolves


def test_sampler_from_name_keeps_the_base_spacing_and_offset_unless_a1111s():
    base = DDIMSampler(timestep_spacing="leading", steps_offset=1)
    sampler = sampler_from_name("DPMSolverMultistepScheduler", base=base, schedule="karras")
    assert sampler == DPMSolverMultistepSampler(timestep_spacing="leading", steps_offset=1, sigma_schedule="karras")
    a1111 = sampler_from_name("DPM++ 2M Karras", base=base)        # A1111's grid: the model's sigmas alone
    assert a1111 == DPMSolverMultistepSampler(sigma_schedule="karras", **A1111_GRID)
    kept = sampler_from_name("EulerDiscreteScheduler", base=EulerSampler(sigma_schedule="exponential"))
    assert kept.sigma_schedule == "exponential"                     # a diffusers name keeps the folder's schedule
    assert sampler_from_name("Euler", base=EulerSampler(sigma_schedule="exponential")).sigma_schedule == "default"
    assert has_schedule("lms") and not has_schedule("ddim")


# ---- whole runs against the diffusers scheduler each name means ---------------------------------------------------
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: bounded and t-dependent (t may be fractional)."""
    return 0.8 * torch.tanh(x) + 0.2 * (t.to(x.dtype) / 1000) * x + 0.05


# (A1111's DPM++ 2M SDE, DPM2 and DPM2 a are not diffusers': Brownian noise, a sigma dropped; test_a1111_labels.py)
@pytest.mark.parametrize("text, ref_cls, ref_kw", [
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),   # A1111's Automatic: karras
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", dict()),   # "Euler a": k-diffusion's uniform grid
    ("LMS Karras", "LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", "EulerDiscreteScheduler", dict()),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("KDPM2DiscreteScheduler", "KDPM2DiscreteScheduler", dict()),
    ("KDPM2AncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", dict()),
])
def test_a_name_samples_as_the_diffusers_scheduler_it_stands_for(diffusers, text, ref_cls, ref_kw):
    n, shape = 16, (1, 4, 8, 8)
    ns = NoiseScheduler(NoiseSchedulerConfig(**SD))
    sampler = sampler_from_name(text)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler.sample(toy_model, x_T, ns, n, generator=[torch.Generator().manual_seed(1)])

    ref = getattr(diffusers, ref_cls)(**SD, **ref_kw)
    ref.set_timesteps(n)
    x, generator = x_T * ref.init_noise_sigma, [torch.Generator().manual_seed(1)]
    for t in ref.timesteps:
        step_kw = {"generator": generator} if "generator" in ref.step.__code__.co_varnames else {}
        x = ref.step(toy_model(ref.scale_model_input(x, t), t), t, x, **step_kw).prev_sample
    assert_parity(out, x, tol=1e-5)
    label_options = dict(resolve_sampler(text).options)     # A1111's grid, the same here (karras / exponential)
    assert dataclasses.asdict(sampler) == dataclasses.asdict(type(sampler).from_config(dict(ref.config),
                                                                                       **label_options))
