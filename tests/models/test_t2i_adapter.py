"""T2IAdapter against diffusers' T2IAdapter: features of the full, SDXL full and light adapters on the same random
weights (every bias and weight randomised), folders both ways, full-size parameter names and shapes, the config
table against diffusers' signature, the fit to a UNet's levels, bad input."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter

from latentdiff.errors import ConfigError, InputError
from latentdiff.models.diffusers_tables import T2I_ADAPTER
from latentdiff.models.residuals import Residuals
from latentdiff.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from latentdiff.models.unet import UNet2DConditional
from latentdiff.registry import COMPONENTS
from tests._support.parity import assert_parity, max_rel_error, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny versions of each layout (widths / 40 of the released ones); hints are 64x64
KINDS = {
    "full": dict(in_channels=3, channels=[8, 16, 32, 32], num_res_blocks=2, downscale_factor=8),
    "full_sketch": dict(in_channels=1, channels=[8, 16, 32, 32], num_res_blocks=1, downscale_factor=8),
    "full_xl": dict(in_channels=3, channels=[8, 16, 32, 32], num_res_blocks=2, downscale_factor=16,
                    adapter_type="full_adapter_xl"),
    "light": dict(in_channels=3, channels=[8, 16, 32], num_res_blocks=2, downscale_factor=8,
                  adapter_type="light_adapter"),
}


def pair(kwargs: dict, *, seed: int = 0) -> tuple[DiffusersT2IAdapter, T2IAdapter]:
    torch.manual_seed(seed)
    ref = randomize_(DiffusersT2IAdapter(**kwargs)).eval()
    ours = T2IAdapter.from_state_dict(T2IAdapter.from_file_config(kwargs), ref.state_dict())
    return ref, ours


def hint(kwargs: dict, *, side: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, kwargs["in_channels"], side, side, generator=torch.Generator().manual_seed(seed))


def check_parity(ref: DiffusersT2IAdapter, ours: T2IAdapter, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert isinstance(got, Residuals) and got.down is None and got.mid is None
    assert got.intrablock is not None and len(got.intrablock) == len(expected)
    for actual, feature in zip(got.intrablock, expected, strict=True):
        assert_parity(actual, feature)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_features_match_diffusers(kind):
    kwargs = KINDS[kind]
    ref, ours = pair(kwargs)
    check_parity(ref, ours, hint(kwargs))
    assert ours.config.total_downscale_factor == ref.total_downscale_factor
    widths = [(f.shape[1], 64 // f.shape[2]) for f in ref(hint(kwargs))]
    assert widths == ours.config.features()


def test_the_hint_moves_every_feature():
    """A parity test that ignored the hint on both sides would pass: flipping it changes each feature."""
    kwargs = KINDS["full"]
    _, ours = pair(kwargs)
    x = hint(kwargs)
    with torch.no_grad():
        a, b = ours(x).intrablock, ours(x.flip(-1)).intrablock
    assert all(max_rel_error(u, v) > 1e-3 for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["full", "light"])
def test_folders_both_ways(kind, tmp_path):
    kwargs = KINDS[kind]
    ref, ours = pair(kwargs, seed=3)
    ref.save_pretrained(tmp_path / "theirs")
    loaded = T2IAdapter.from_pretrained(tmp_path / "theirs")
    assert loaded.config == ours.config
    ours.save_pretrained(tmp_path / "ours")
    back = DiffusersT2IAdapter.from_pretrained(tmp_path / "ours").eval()
    assert dict(back.config)["adapter_type"] == kwargs.get("adapter_type", "full_adapter")
    check_parity(ref, loaded, hint(kwargs))
    check_parity(back, ours, hint(kwargs, seed=2))


def test_defaults_table_matches_diffusers_signature():
    params = inspect.signature(DiffusersT2IAdapter.__init__).parameters
    assert T2I_ADAPTER.defaults == {k: p.default for k, p in params.items() if k != "self"}
    assert COMPONENTS.get("t2i_adapter") is T2IAdapter


@pytest.mark.parametrize("kwargs", [{}, {"in_channels": 1}, {"adapter_type": "full_adapter_xl", "downscale_factor": 16},
                                    {"adapter_type": "light_adapter", "channels": [320, 640, 1280],
                                     "num_res_blocks": 4}], ids=["full", "sketch", "xl", "light"])
def test_released_sizes_build_diffusers_parameters(kwargs):
    """The released adapters' configs: the same names and shapes (meta device: no memory)."""
    with torch.device("meta"):
        ref = DiffusersT2IAdapter(**kwargs)
        ours = T2IAdapter(T2IAdapter.from_file_config(kwargs))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


SD15 = {"channels": (320, 640, 1280, 1280), "attention_levels": (True, True, True, False), "cross_attention_dim": 768}
SDXL = {"channels": (320, 640, 1280), "attention_levels": (False, True, True), "cross_attention_dim": 2048}


@pytest.mark.parametrize("kwargs, unet, fits", [
    ({}, SD15, True),
    ({"adapter_type": "light_adapter", "channels": [320, 640, 1280], "num_res_blocks": 4}, SD15, True),
    ({"adapter_type": "full_adapter_xl", "downscale_factor": 16}, SDXL, True),
    ({"adapter_type": "full_adapter_xl", "downscale_factor": 16}, SD15, False),
    ({}, SDXL, False),
    ({"channels": [320, 640, 1280, 1024]}, SD15, False),
], ids=["sd15", "light-sd15", "xl-sdxl", "xl-on-sd15", "sd15-on-sdxl", "narrow"])
def test_fit_to_the_unet(kwargs, unet, fits):
    with torch.device("meta"):
        adapter = T2IAdapter(T2IAdapter.from_file_config(kwargs))
    unet_config = UNet2DConditional.config_class(**unet)
    if fits:
        adapter.check_fits(unet_config, latent_factor=8)
    else:
        with pytest.raises(ConfigError, match="do not fit the UNet"):
            adapter.check_fits(unet_config, latent_factor=8)


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="adapter_type"):
        T2IAdapter.from_file_config({"adapter_type": "style_adapter"})
    with pytest.raises(ConfigError, match="third on equal"):
        T2IAdapterConfig(adapter_type="full_adapter_xl", channels=(320, 640, 1280, 640), downscale_factor=16)
    with pytest.raises(ConfigError, match="multiples of 4"):
        T2IAdapterConfig(adapter_type="light_adapter", channels=(10, 20))
    with pytest.raises(ConfigError):
        T2IAdapter.from_file_config({"num_res_blocks": 10**9})
    with pytest.raises(ConfigError, match="unknown key"):
        T2IAdapter.from_file_config({"nums_rb": 2})


def test_bad_hints_are_input_errors():
    kwargs = KINDS["full_sketch"]
    _, ours = pair(kwargs)
    with pytest.raises(InputError, match="1 channel"):
        ours(torch.rand(1, 3, 64, 64))
    with pytest.raises(InputError, match="multiples of 8"):
        ours(torch.rand(1, 1, 60, 64))
    with pytest.raises(InputError):
        ours(torch.randint(0, 255, (1, 1, 64, 64)))
    with pytest.raises(InputError, match="generated image's size"):
        ours.check_hint(torch.rand(1, 1, 64, 64), size=(64, 32))
