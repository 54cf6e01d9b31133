"""The forward process (NoiseScheduler) and scheduler_config.json io, against diffusers and float64 math."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    DPMSolverMultistepSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LMSSampler,
    PLMSSampler,
)
from latentdiff.diffusion.scheduler_io import (
    FOREIGN_CLASSES,
    load_scheduler_folder,
    read_scheduler_config,
    write_scheduler_folder,
)
from latentdiff.errors import ConfigError, InputError
from tests._support.parity import assert_parity

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _config(schedule: str, rescale: bool = False, prediction_type: str = "epsilon", **kw) -> NoiseSchedulerConfig:
    if rescale and prediction_type == "epsilon":
        prediction_type = "v_prediction"
    return NoiseSchedulerConfig(beta_schedule=schedule, rescale_zero_terminal_snr=rescale,
                                prediction_type=prediction_type, **kw)


def _diffusers_ddpm(schedule: str, rescale: bool = False, prediction_type: str = "epsilon", **kw):
    import diffusers

    if rescale and prediction_type == "epsilon":
        prediction_type = "v_prediction"
    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule,
                                   rescale_betas_zero_snr=rescale, prediction_type=prediction_type, **kw)


# ---- float64 references, written from the papers, sharing no code with src -----------------------------
def _betas64(schedule: str, T: int = 1000, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    if schedule == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2

    def f(u):  # Nichol & Dhariwal 2021, eq. 17
        return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

    i = np.arange(T, dtype=np.float64)
    return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)


def _zero_snr64(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in float64."""
    s = np.sqrt(np.cumprod(1 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    return 1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


# ---- the schedule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_diffusers_and_float64(diffusers, schedule, rescale):
    ours = NoiseScheduler(_config(schedule, rescale))
    ref = _diffusers_ddpm(schedule, rescale)
    assert ours.betas.dtype == torch.float32 and ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas), "same float32 ops as diffusers: bit-identical betas"
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ref_ddim = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule,
                                       rescale_betas_zero_snr=rescale,
                                       prediction_type="v_prediction" if rescale else "epsilon")
    assert torch.equal(ours.alphas_cumprod, ref_ddim.alphas_cumprod)
    betas64 = _betas64(schedule)
    if rescale:
        betas64 = _zero_snr64(betas64)
    assert_parity(ours.betas, torch.from_numpy(betas64))
    assert_parity(ours.alphas_cumprod, torch.from_numpy(np.cumprod(1 - betas64)))
    if rescale:
        assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.betas[-1]) == 1.0
        assert float(ours.snr(torch.tensor([999]))) == 0.0
        plain = NoiseScheduler(_config(schedule))   # Algorithm 1 keeps abar_0
        assert math.isclose(float(ours.alphas_cumprod[0]), float(plain.alphas_cumprod[0]), rel_tol=1e-6)


def test_linear_schedule_with_ddpm_defaults_and_trained_betas(diffusers):
    cfg = NoiseSchedulerConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=50)
    ref = diffusers.DDPMScheduler(num_train_timesteps=50)
    assert torch.equal(NoiseScheduler(cfg).alphas_cumprod, ref.alphas_cumprod)
    betas = tuple(np.linspace(0.001, 0.05, 20).tolist())
    ours = NoiseScheduler(NoiseSchedulerConfig(num_train_timesteps=20, trained_betas=betas))
    ref = diffusers.DDPMScheduler(num_train_timesteps=20, trained_betas=list(betas))
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


# ---- the forward process ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,rescale", [("scaled_linear", False), ("linear", False), ("scaled_linear", True)])
def test_add_noise_velocity_targets_snr(diffusers, schedule, rescale):
    ours = NoiseScheduler(_config(schedule, rescale))
    ref = _diffusers_ddpm(schedule, rescale)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert_parity(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert_parity(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    # float64 reference of x_t and v (Ho et al. eq. 4; Salimans & Ho sec. 4)
    abar = ours.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x0d, nd = x0.double(), noise.double()
    assert_parity(ours.add_noise(x0, noise, t), abar.sqrt() * x0d + (1 - abar).sqrt() * nd)
    assert_parity(ours.velocity(x0, noise, t), abar.sqrt() * nd - (1 - abar).sqrt() * x0d)
    snr = ours.snr(t)
    assert snr.dtype == torch.float32 and snr.shape == (6,)
    assert_parity(snr, (abar / (1 - abar)).flatten())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_and_predict_x0_eps_invert_each_other(diffusers, prediction_type):
    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type=prediction_type))
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    target = ns.training_target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": ref.get_velocity(x0, noise, t)}[prediction_type]
    assert_parity(target, expected)
    x_t = ns.add_noise(x0, noise, t)
    x0_pred, eps = ns.predict_x0_eps(target, x_t, t)
    assert_parity(x0_pred, x0, tol=1e-9)
    assert_parity(eps, noise, tol=1e-9)


def test_tensors_follow_input_dtype_and_scalar_t():
    ns = NoiseScheduler()
    x0 = torch.randn(2, 3, 4, 4)
    for dtype in (torch.float64, torch.bfloat16):
        out = ns.add_noise(x0.to(dtype), x0.to(dtype), torch.tensor([5, 7]))
        assert out.dtype == dtype
    whole = ns.add_noise(x0, x0, 100)
    assert torch.equal(whole, ns.add_noise(x0, x0, torch.tensor([100, 100])))


def test_bad_inputs_raise_input_error():
    ns = NoiseScheduler()
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(InputError, match="one timestep per sample"):
        ns.add_noise(x0, x0, torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="integer"):
        ns.add_noise(x0, x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match="out of range"):
        ns.add_noise(x0, x0, torch.tensor([1, 1000]))
    with pytest.raises(InputError, match="shape of the sample"):
        ns.add_noise(x0, x0[:1], torch.tensor([1, 2]))


def test_config_validation():
    with pytest.raises(ConfigError, match="divides by zero"):
        NoiseSchedulerConfig(rescale_zero_terminal_snr=True, prediction_type="epsilon")
    NoiseSchedulerConfig(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="beta_schedule"):
        NoiseSchedulerConfig(beta_schedule="sigmoid")
    with pytest.raises(ConfigError, match="prediction_type"):
        NoiseSchedulerConfig(prediction_type="flow_prediction")
    with pytest.raises(ConfigError, match="beta_start"):
        NoiseSchedulerConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ConfigError, match="one beta per training timestep"):
        NoiseSchedulerConfig(num_train_timesteps=10, trained_betas=(0.1,) * 9)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        NoiseSchedulerConfig(num_train_timesteps=2, trained_betas=(0.1, 1.5))
    with pytest.raises(TypeError):
        NoiseSchedulerConfig(timestep_spacing="leading")  # a sampler setting, not the forward process's
    with pytest.raises(ConfigError, match="unknown key"):
        NoiseSchedulerConfig.from_dict({"beta_shedule": "linear"})


def test_immutable_and_registered():
    ns = NoiseScheduler()
    with pytest.raises(AttributeError, match="immutable"):
        ns.betas = torch.zeros(1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ns.config.beta_start = 0.1
    assert NoiseScheduler.registry_name == "noise_scheduler"
    clone = pickle.loads(pickle.dumps(ns))
    assert clone == ns and clone is not ns and torch.equal(clone.alphas_cumprod, ns.alphas_cumprod)
    assert copy.deepcopy(ns) == ns and ns != NoiseScheduler(NoiseSchedulerConfig(beta_schedule="linear"))
    with pytest.raises(ConfigError):
        NoiseScheduler({"beta_start": 0.1})


def test_concurrent_add_noise_fills_the_cache_once_per_key():
    ns = NoiseScheduler()
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([3, 30, 300, 999])
    results = []
    threads = [threading.Thread(target=lambda: results.append(ns.add_noise(x0, x0, t))) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, results[0]) for r in results)


# ---- scheduler_config.json --------------------------------------------------------------------------------
SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD21_SCHEDULER = {  # stabilityai/stable-diffusion-2-1: a DDIM config carrying PNDM's skip_prk_steps
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def _write(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(data))
    return folder


def _load_quiet(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns, sampler = load_scheduler_folder(folder)
    return ns, sampler, [w for w in caught if issubclass(w.category, UserWarning)]


def _assert_same_as_diffusers_ddim(ns, sampler, ref):
    """Our (noise schedule, DDIM sampler) equals a diffusers DDIMScheduler in everything that sampling uses."""
    assert isinstance(sampler, DDIMSampler)
    assert torch.equal(ns.alphas_cumprod, ref.alphas_cumprod)
    assert sampler.final_alpha_cumprod(ns) == float(ref.final_alpha_cumprod)
    assert (sampler.clip_sample, sampler.clip_sample_range) == (ref.config.clip_sample, ref.config.clip_sample_range)
    assert ns.config.prediction_type == ref.config.prediction_type
    for n in (10, 50):
        ref.set_timesteps(n)
        assert sampler.timesteps(ns, n).tolist() == ref.timesteps.tolist()


def test_sd15_pndm_config_maps_to_plms_without_warning(diffusers, tmp_path):
    folder = _write(tmp_path / "scheduler", SD15_SCHEDULER)
    ns, sampler, caught = _load_quiet(folder)
    assert caught == []
    assert sampler == PLMSSampler(steps_offset=1, set_alpha_to_one=False)
    pndm = diffusers.PNDMScheduler.from_pretrained(folder)
    assert torch.equal(ns.alphas_cumprod, pndm.alphas_cumprod)
    assert sampler.final_alpha_cumprod(ns) == float(pndm.final_alpha_cumprod)
    pndm.set_timesteps(50)   # PLMS visits t_1 twice (its warm-up step calls the model at t_1 and t_2)
    assert sampler.timesteps(ns, 50).tolist() == torch.unique_consecutive(pndm.timesteps).tolist()
    assert NoiseScheduler.from_pretrained(tmp_path).config == ns.config   # subfolder="scheduler" by default


def test_pndm_with_runge_kutta_warm_up_loads_as_plms_with_one_warning(tmp_path):
    folder = _write(tmp_path / "scheduler", {**SD15_SCHEDULER, "skip_prk_steps": False})
    _, sampler, caught = _load_quiet(folder)
    assert sampler == PLMSSampler(steps_offset=1)
    assert len(caught) == 1 and "skip_prk_steps" in str(caught[0].message)


def test_sd21_ddim_config_loads_without_warning(diffusers, tmp_path):
    folder = _write(tmp_path / "s", SD21_SCHEDULER)
    ns, sampler, caught = _load_quiet(folder)
    assert caught == []
    assert ns.config.prediction_type == "v_prediction"
    _assert_same_as_diffusers_ddim(ns, sampler, diffusers.DDIMScheduler.from_pretrained(folder))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices from inside diffusers
@pytest.mark.parametrize("class_name", FOREIGN_CLASSES)
def test_foreign_scheduler_saved_by_diffusers_maps_like_ddim_from_config(diffusers, tmp_path, class_name):
    cls = getattr(diffusers, class_name)
    wanted = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    accepted = inspect.signature(cls.__init__).parameters
    cls(**{k: v for k, v in wanted.items() if k in accepted}).save_pretrained(tmp_path)
    ns, sampler, caught = _load_quiet(tmp_path)
    assert len(caught) == 1 and class_name in str(caught[0].message)
    ref = diffusers.DDIMScheduler.from_config(cls.from_pretrained(tmp_path).config)
    _assert_same_as_diffusers_ddim(ns, sampler, ref)


@pytest.mark.parametrize("kwargs", [
    dict(),  # diffusers' own defaults: linear 1e-4 -> 0.02, clip_sample True, set_alpha_to_one True
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="v_prediction",
         rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample_range=2.0,
         timestep_spacing="linspace", prediction_type="sample"),
])
def test_ddim_folder_saved_by_diffusers(diffusers, tmp_path, kwargs):
    ref = diffusers.DDIMScheduler(**kwargs)
    ref.save_pretrained(tmp_path)
    ns, sampler, caught = _load_quiet(tmp_path)
    assert caught == []
    _assert_same_as_diffusers_ddim(ns, sampler, ref)


def test_ddpm_folder_saved_by_diffusers(diffusers, tmp_path):
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  variance_type="fixed_large", timestep_spacing="trailing", prediction_type="sample")
    ref.save_pretrained(tmp_path)
    ns, sampler, caught = _load_quiet(tmp_path)
    assert caught == []
    assert sampler == DDPMSampler(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=True)
    assert torch.equal(ns.alphas_cumprod, ref.alphas_cumprod) and ns.config.prediction_type == "sample"
    ref.set_timesteps(20)
    assert sampler.timesteps(ns, 20).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("sampler", [
    DDIMSampler(), DDIMSampler(eta=0.5, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=True),
    DDPMSampler(variance_type="fixed_large", steps_offset=1, timestep_spacing="linspace"),
])
@pytest.mark.parametrize("config", [
    NoiseSchedulerConfig(),
    NoiseSchedulerConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         rescale_zero_terminal_snr=True),
    NoiseSchedulerConfig(num_train_timesteps=4, trained_betas=(0.1, 0.2, 0.3, 0.4), prediction_type="sample"),
])
def test_round_trip_ours_to_diffusers_and_back(diffusers, tmp_path, config, sampler):
    ns = NoiseScheduler(config)
    write_scheduler_folder(tmp_path, ns, sampler)
    ns2, sampler2, caught = _load_quiet(tmp_path)
    assert caught == [] and ns2.config == config and sampler2 == sampler
    ref_cls = diffusers.DDPMScheduler if isinstance(sampler, DDPMSampler) else diffusers.DDIMScheduler
    ref = ref_cls.from_pretrained(tmp_path)
    assert torch.equal(ref.alphas_cumprod, ns.alphas_cumprod)
    assert ref.config.prediction_type == config.prediction_type
    n = min(10, config.num_train_timesteps)
    ref.set_timesteps(n)
    assert ref.timesteps.tolist() == sampler.timesteps(ns, n).tolist()
    if isinstance(sampler, DDIMSampler):
        assert float(ref.final_alpha_cumprod) == sampler.final_alpha_cumprod(ns)
        assert ref.config.clip_sample == sampler.clip_sample
    else:
        assert ref.config.variance_type == sampler.variance_type
    ns.save_pretrained(tmp_path / "alone", sampler=sampler)
    assert NoiseScheduler.from_pretrained(tmp_path / "alone", subfolder=None).config == config


@pytest.mark.parametrize("key,value,match", [
    ("thresholding", True, "thresholding"),
    ("timestep_type", "continuous", "timestep_type"),
    ("use_flow_sigmas", True, "use_flow_sigmas"),
    ("variance_type", "learned_range", "variance_type"),
    ("beta_schedule", "sigmoid", "beta_schedule"),
    ("prediction_type", "flow_prediction", "prediction_type"),
    ("timestep_spacing", "karras", "timestep_spacing"),
    ("steps_offset", "1", "steps_offset"),
    ("rescale_betas_zero_snr", True, "divides by zero"),   # with epsilon prediction
    ("beta_shedule", "linear", "beta_shedule"),                   # unknown key
])
def test_unsupported_values_and_unknown_keys_raise_config_error(key, value, match):
    data = {**SD21_SCHEDULER, "prediction_type": "epsilon", key: value}
    with pytest.raises(ConfigError, match=match) as e:
        read_scheduler_config(data, source="x/scheduler_config.json")
    assert "x/scheduler_config.json" in str(e.value)


def test_unsupported_class_and_ddpm_variance_raise_config_error():
    with pytest.raises(ConfigError, match="_class_name"):
        read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ConfigError, match="_class_name"):
        read_scheduler_config({"beta_start": 0.001})
    with pytest.raises(ConfigError, match="variance_type"):
        read_scheduler_config({"_class_name": "DDPMScheduler", "variance_type": "learned"})
    _, sampler = read_scheduler_config({"_class_name": "DDPMScheduler", "variance_type": "fixed_small_log"})
    assert sampler.variance_type == "fixed_small"   # exp(log(v) / 2) = sqrt(v)


# ---- scheduler_config.json of PLMS and the sigma-space samplers -------------------------------------------
NUMPY_NOTICES = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notices from inside diffusers
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
EULER, EULER_A, HEUN, LMS, DPM, PNDM = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                        "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                        "DPMSolverMultistepScheduler", "PNDMScheduler")


def _assert_same_grids(ns, sampler, ref):
    end = -1 if ref.config.get("rescale_betas_zero_snr") else None   # diffusers puts 2^-24 at zero SNR
    assert torch.equal(ns.alphas_cumprod[:end], ref.alphas_cumprod[:end])
    assert ns.config.prediction_type == ref.config.prediction_type
    for n in (10, 25):
        ref.set_timesteps(n)
        if isinstance(sampler, PLMSSampler):
            assert sampler.timesteps(ns, n).tolist() == ref.timesteps[:1].tolist() + ref.timesteps[2:].tolist()
            assert sampler.final_alpha_cumprod(ns) == float(ref.final_alpha_cumprod)
            continue
        plan = sampler.plan(ns, n)
        step = 2 if isinstance(sampler, HeunSampler) else 1
        assert plan.timesteps.tolist() == ref.timesteps[::step].tolist()
        assert plan.sigmas == (torch.cat([ref.sigmas[:1], ref.sigmas[1::2]]) if step == 2 else ref.sigmas).tolist()


FOLDERS = [
    (PNDM, dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False), PLMSSampler(steps_offset=1)),
    (EULER, dict(use_karras_sigmas=True, sigma_min=0.05, final_sigmas_type="sigma_min", prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, timestep_spacing="trailing"),
     EulerSampler(sigma_schedule="karras", sigma_min=0.05, final_sigmas_type="sigma_min", timestep_spacing="trailing")),
    (EULER_A, dict(timestep_spacing="leading", steps_offset=1), EulerAncestralSampler(timestep_spacing="leading",
                                                                                     steps_offset=1)),
    (HEUN, dict(use_exponential_sigmas=True, clip_sample=True, prediction_type="sample"),
     HeunSampler(sigma_schedule="exponential", clip_sample=True)),
    (LMS, dict(use_karras_sigmas=True), LMSSampler(sigma_schedule="karras")),
    (DPM, dict(), DPMSolverMultistepSampler()),
    (DPM, dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_type="heun", euler_at_final=True,
               lower_order_final=False, solver_order=1, final_sigmas_type="sigma_min", lambda_min_clipped=-5.1),
     DPMSolverMultistepSDESampler(sigma_schedule="karras", solver_type="heun", euler_at_final=True,
                                  lower_order_final=False, solver_order=1, final_sigmas_type="sigma_min",
                                  lambda_min_clipped=-5.1)),
]


@NUMPY_NOTICES
@pytest.mark.parametrize("cls,options,expected", FOLDERS, ids=lambda v: v if isinstance(v, str) else None)
def test_folder_saved_by_diffusers_loads_as_our_sampler(diffusers, tmp_path, cls, options, expected):
    ref = getattr(diffusers, cls)(**SD_BETAS, **options)
    ref.save_pretrained(tmp_path)
    ns, sampler, caught = _load_quiet(tmp_path)
    assert caught == [] and sampler == expected
    _assert_same_grids(ns, sampler, ref)


ROUND_TRIPS = [PLMSSampler(), PLMSSampler(timestep_spacing="trailing", set_alpha_to_one=True),
               EulerSampler(sigma_schedule="exponential", sigma_max=30.0), EulerAncestralSampler(steps_offset=1),
               HeunSampler(sigma_schedule="karras", clip_sample=True, clip_sample_range=2.0), LMSSampler(),
               DPMSolverMultistepSampler(sigma_schedule="karras", timestep_spacing="leading", steps_offset=1),
               DPMSolverMultistepSDESampler(solver_type="heun", final_sigmas_type="sigma_min")]


@NUMPY_NOTICES
@pytest.mark.parametrize("sampler", ROUND_TRIPS, ids=lambda s: repr(s)[:50])
@pytest.mark.parametrize("config", [NoiseSchedulerConfig(),
                                    NoiseSchedulerConfig(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
                                    NoiseSchedulerConfig(num_train_timesteps=40, trained_betas=tuple(
                                        np.linspace(0.001, 0.2, 40).tolist()), prediction_type="v_prediction")])
def test_sampler_round_trip_ours_to_diffusers_and_back(diffusers, tmp_path, config, sampler):
    ns = NoiseScheduler(config)
    write_scheduler_folder(tmp_path, ns, sampler)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    ref_cls = getattr(diffusers, data["_class_name"])
    assert {k for k in data if not k.startswith("_")} == set(inspect.signature(ref_cls.__init__).parameters) - {"self"}
    ns2, sampler2, caught = _load_quiet(tmp_path)
    assert caught == [] and ns2.config == config and sampler2 == sampler
    _assert_same_grids(ns, sampler, ref_cls.from_pretrained(tmp_path))


@NUMPY_NOTICES
def test_zero_terminal_snr_only_where_the_diffusers_class_has_it(tmp_path):
    ns = NoiseScheduler(NoiseSchedulerConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    for sampler in (HeunSampler(), LMSSampler(), PLMSSampler()):
        with pytest.raises(ConfigError, match="rescale_zero_terminal_snr"):
            write_scheduler_folder(tmp_path, ns, sampler)
        data = {"_class_name": {HeunSampler: HEUN, LMSSampler: LMS, PLMSSampler: PNDM}[type(sampler)],
                "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
        with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
            read_scheduler_config(data, source="s/scheduler_config.json")
    write_scheduler_folder(tmp_path, ns, DPMSolverMultistepSampler(timestep_spacing="trailing"))
    ns2, sampler, _ = _load_quiet(tmp_path)
    assert ns2.config.rescale_zero_terminal_snr and isinstance(sampler, DPMSolverMultistepSampler)


@NUMPY_NOTICES
@pytest.mark.parametrize("cls,key,value", [
    (EULER, "interpolation_type", "log_linear"),
    (EULER, "use_beta_sigmas", True),
    (LMS, "use_exponential_sigmas", True),       # together with use_karras_sigmas below
    (DPM, "use_lu_lambdas", True),
    (DPM, "algorithm_type", "dpmsolver"),
    (DPM, "algorithm_type", "sde-dpmsolver"),
    (DPM, "solver_order", 3),
    (DPM, "solver_type", "rk4"),
    (DPM, "variance_type", "learned_range"),
    (DPM, "thresholding", True),
    (EULER, "timestep_type", "continuous"),
    (HEUN, "clip_sample_range", -1.0),
    (EULER_A, "steps_offset", "1"),
    (LMS, "use_karras_sigmas", "yes"),
    (PNDM, "skip_prk_steps", 1),
    (EULER, "mystery_key", 1),
])
def test_unsupported_values_raise_config_error_naming_the_key(cls, key, value):
    data = {"_class_name": cls, "use_karras_sigmas": True, key: value}
    with pytest.raises(ConfigError, match=key) as e:
        read_scheduler_config(data, source="x/scheduler_config.json")
    assert "x/scheduler_config.json" in str(e.value)


@NUMPY_NOTICES
def test_diffusers_aliases_and_keys_of_other_classes():
    """diffusers itself maps algorithm_type "deis" and solver types logrho / bh1 / bh2 (a UniPC config loaded as
    DPM-Solver) to DPM-Solver++ midpoint; keys the class does not have are ignored, as diffusers ignores them."""
    _, sampler = read_scheduler_config({"_class_name": DPM, "algorithm_type": "deis", "solver_type": "bh2"})
    assert sampler == DPMSolverMultistepSampler()
    _, sampler = read_scheduler_config({"_class_name": EULER, "clip_sample": True, "skip_prk_steps": True,
                                        "set_alpha_to_one": False, "solver_order": 3})
    assert sampler == EulerSampler()


def test_file_methods_reach_scheduler_io_through_its_hook(tmp_path):
    """noise_scheduler imports neither scheduler_io nor the samplers; its file methods load scheduler_io on first
    use."""
    import subprocess
    import sys

    code = ("import sys\nfrom latentdiff.diffusion.noise_scheduler import NoiseScheduler\n"
            "assert not {'latentdiff.diffusion.scheduler_io', 'latentdiff.diffusion.samplers'} & set(sys.modules)\n"
            "ns = NoiseScheduler()\nns.save_pretrained(sys.argv[1])\n"
            "assert NoiseScheduler.from_pretrained(sys.argv[1], subfolder=None) == ns\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
