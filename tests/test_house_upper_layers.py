"""The house (issue 13), helper H: typed training configs, one spelling for found values and integer checks, and
the rewrites made for the type checker giving the numbers they gave before."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.diffusion.noise_scheduler import NoiseScheduler
from latentdiff.diffusion.samplers import DDIMSampler, EulerSampler
from latentdiff.diffusion.samplers.base import as_step_callback, check_start_step, initial_sample
from latentdiff.diffusion.samplers.discrete_loops import PLMS_COEFFICIENTS, plms_eps
from latentdiff.errors import InputError
from latentdiff.models.autoencoder_kl import AutoencoderKLConfig
from latentdiff.models.unet2d import UNet2DConfig
from latentdiff.models.vq import VQModelConfig
from latentdiff.training.autoencoder_loss import AutoencoderLossConfig
from latentdiff.training.config import build_component_configs, train_config_from_dict
from latentdiff.training.ema import EMA


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_plms_eps_is_the_adams_bashforth_sum(count):
    history = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(count)]
    expected = 0
    for c, e in zip(PLMS_COEFFICIENTS[count - 1], reversed(history), strict=True):
        expected = expected + c * e
    assert torch.equal(plms_eps(history), expected)


def test_a_bad_tensor_is_described_with_its_dtype_and_shape():
    plan = DDIMSampler().plan(NoiseScheduler(), 10)
    with pytest.raises(InputError) as info:
        initial_sample(plan, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4, dtype=torch.float16))
    assert info.value.found == "a torch.float16 Tensor of shape (1, 4, 4, 4)"


def test_integer_checks_take_numpy_integers_and_refuse_bools():
    assert check_start_step(np.int64(2), 10) == 2
    with pytest.raises(InputError):
        check_start_step(True, 10)
    t = NoiseScheduler()._check_t(np.int64(5), None)
    assert t.dtype == torch.long and int(t) == 5


def test_step_callback_forms_are_still_read_from_the_signature():
    seen = []
    as_step_callback(lambda i, x: seen.append(("i_x", i)))(3, 0.5, torch.zeros(1))
    as_step_callback(lambda i, t, x: seen.append(("i_t_x", i, t)))(3, 0.5, torch.zeros(1))
    as_step_callback(lambda i, t, x, denoised: seen.append(("denoised", denoised)))(3, 0.5, torch.zeros(1), "d")
    assert seen == [("i_x", 3), ("i_t_x", 3, 0.5), ("denoised", "d")]
    assert as_step_callback(None) is None


def test_heun_clips_and_the_other_sigma_samplers_do_not():
    from latentdiff.diffusion.samplers import HeunSampler

    assert EulerSampler()._clip is None
    assert HeunSampler(clip_sample=True, clip_sample_range=2.0)._clip == 2.0
    assert HeunSampler()._clip is None


def _sections(kind, **model):
    data = {"data": {"path": "images"}, "train": {"output_dir": "out", "max_steps": 1}, "model": model}
    return train_config_from_dict(data, kind)


@pytest.mark.parametrize(("kind", "architecture"), [("autoencoder_kl", AutoencoderKLConfig),
                                                     ("vq_model", VQModelConfig)])
def test_autoencoder_component_configs_are_typed(kind, architecture):
    config = _sections("autoencoder", type=kind, loss={"disc_start": 1})
    built = build_component_configs(config)
    assert set(built) == {"architecture", "loss"}
    assert type(built["architecture"]) is architecture and isinstance(built["loss"], AutoencoderLossConfig)


def test_diffusion_component_configs_are_typed():
    config = _sections("diffusion", autoencoder="vae", conditioning="none", unet_type="unet2d")
    built = build_component_configs(config)
    assert set(built) == {"unet", "noise_scheduler", "text_encoder"}
    assert type(built["unet"]) is UNet2DConfig and built["text_encoder"] is None
    assert config.to_dict()["model"]["unet_type"] == "unet2d"


def test_ema_state_round_trip():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    state = ema.state_dict()
    assert set(state) == {"decay", "warmup", "num_updates", "shadow"} and state["num_updates"] == 1
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict({"shadow": state["shadow"], "num_updates": 1})
    assert other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
