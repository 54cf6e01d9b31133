"""TencentARC's original T2I-Adapter files: full adapters (RGB and the sketch adapters' grey input) and light
adapters, as .pth pickles and .safetensors, load with their config inferred from the shapes and give diffusers'
features on the same tensors; the released sizes map key for key and shape for shape onto diffusers' T2IAdapter;
save_single_file writes the original layout back bit for bit; other TencentARC networks and broken files are
refused by name."""
from __future__ import annotations

import pytest
import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter
from safetensors.torch import load_file, save_file

from latentdiff.convert.keymap import apply_keymap
from latentdiff.convert.t2i_adapter import infer_config, original_table
from latentdiff.errors import CheckpointError, InputError
from latentdiff.models.t2i_adapter import T2IAdapter
from tests._support.parity import assert_parity, randomize_
from tests._support.t2i_adapter import original_full_shapes, original_light_shapes, to_original

pytestmark = pytest.mark.usefixtures("one_thread")

# four levels, as TencentARC's full adapters have (one per SD UNet level)
FULL = dict(in_channels=3, channels=[8, 16, 32, 32], num_res_blocks=2)
SKETCH = dict(in_channels=1, channels=[8, 16, 32, 32], num_res_blocks=1)
LIGHT = dict(in_channels=3, channels=[8, 16, 32], num_res_blocks=2, adapter_type="light_adapter")


def reference(kwargs: dict, seed: int = 0) -> DiffusersT2IAdapter:
    torch.manual_seed(seed)
    return randomize_(DiffusersT2IAdapter(**kwargs)).eval()


def write_original(ref: DiffusersT2IAdapter, kwargs: dict, path, *, pickle: bool) -> dict[str, torch.Tensor]:
    state = to_original(ref.state_dict(), light=kwargs.get("adapter_type") == "light_adapter",
                        nums_rb=kwargs["num_res_blocks"])
    if pickle:
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return state


@pytest.mark.parametrize("kwargs, suffix", [(FULL, ".pth"), (SKETCH, ".safetensors"), (LIGHT, ".pth")],
                         ids=["full-pth", "sketch-safetensors", "light-pth"])
def test_original_files_give_diffusers_features(kwargs, suffix, tmp_path):
    ref = reference(kwargs)
    write_original(ref, kwargs, tmp_path / f"adapter{suffix}", pickle=suffix == ".pth")
    ours = T2IAdapter.from_single_file(tmp_path / f"adapter{suffix}")
    assert ours.config == T2IAdapter.from_file_config(kwargs)
    x = torch.rand(2, kwargs["in_channels"], 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x), ours(x).intrablock
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert_parity(a, b)


@pytest.mark.parametrize("kwargs", [FULL, LIGHT], ids=["full", "light"])
def test_save_single_file_writes_the_original_layout_bit_for_bit(kwargs, tmp_path):
    ref = reference(kwargs, seed=2)
    original = write_original(ref, kwargs, tmp_path / "in.safetensors", pickle=False)
    ours = T2IAdapter.from_single_file(tmp_path / "in.safetensors")
    ours.save_single_file(tmp_path / "out.safetensors")
    written = load_file(str(tmp_path / "out.safetensors"))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    half = T2IAdapter.from_single_file(tmp_path / "out.safetensors", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and half.config == ours.config


def test_any_config_reads_back_from_its_own_file(tmp_path):
    """Three levels: no TencentARC file has them, so the shapes alone would not say; the metadata does."""
    ref = reference(dict(FULL, channels=[8, 16, 16]), seed=4)
    ours = T2IAdapter.from_state_dict(T2IAdapter.from_file_config(dict(FULL, channels=[8, 16, 16])), ref.state_dict())
    ours.save_single_file(tmp_path / "three.safetensors")
    assert T2IAdapter.from_single_file(tmp_path / "three.safetensors").config == ours.config


@pytest.mark.parametrize("kwargs", [FULL, dict(FULL, downscale_factor=16, adapter_type="full_adapter_xl"),
                                    dict(SKETCH, downscale_factor=16, adapter_type="full_adapter_xl"), LIGHT],
                         ids=["full", "xl", "xl-sketch", "light"])
def test_diffusers_weights_files_load_alone(kwargs, tmp_path):
    """diffusers' weights file without its config.json (how ComfyUI / A1111 users hold the SDXL adapters): the
    type from the input width (x 256: full_adapter_xl), the rest from the shapes; SDXL adapters are written back
    with diffusers' keys (TencentARC's layout has none for them)."""
    ref = reference(kwargs, seed=5)
    ref.save_pretrained(tmp_path / "folder")
    ours = T2IAdapter.from_single_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    assert ours.config == T2IAdapter.from_file_config(kwargs)
    side = 64 if kwargs.get("downscale_factor", 8) == 8 else 128
    x = torch.rand(1, kwargs["in_channels"], side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours(x).intrablock, ref(x), strict=True):
            assert_parity(a, b)
    ours.save_single_file(tmp_path / "back.safetensors")
    keys = set(load_file(str(tmp_path / "back.safetensors")))
    assert keys == set(ref.state_dict()) if kwargs.get("adapter_type") == "full_adapter_xl" else \
        not any(k.startswith("adapter.") for k in keys)


@pytest.mark.parametrize("light", [False, True], ids=["full", "light"])
@pytest.mark.parametrize("cin", [192, 64], ids=["rgb", "sketch"])
def test_released_sizes_map_onto_diffusers(light, cin):
    """t2iadapter_*_sd14v1 (full: 4 levels of 2 units, widths 320 / 640 / 1280 / 1280; light, e.g. color: 4
    units per level): inferred config, and every key and shape after the table equal to diffusers' T2IAdapter."""
    channels = [320, 640, 1280, 1280]
    shapes = original_light_shapes(channels, 4, cin) if light else original_full_shapes(channels, 2, cin)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = infer_config(state, source="test")
    kwargs = {"in_channels": cin // 64, "channels": channels[:3] if light else channels,
              "num_res_blocks": 4 if light else 2, "adapter_type": "light_adapter" if light else "full_adapter"}
    assert config == T2IAdapter.from_file_config(kwargs)
    converted = apply_keymap(state, original_table(config), source="test")
    with torch.device("meta"):
        ref = DiffusersT2IAdapter(**kwargs)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_other_networks_and_broken_files_are_refused(tmp_path):
    style = {"style_embedding": torch.zeros(1, 8, 16), "ln_pre.weight": torch.zeros(16)}
    save_file(style, str(tmp_path / "style.safetensors"))
    with pytest.raises(CheckpointError, match="style adapter"):
        T2IAdapter.from_single_file(tmp_path / "style.safetensors")
    state = to_original(reference(FULL).state_dict(), light=False, nums_rb=2)
    bad = dict(state)
    del bad["body.3.block2.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="body.3.block2.weight"):
        T2IAdapter.from_single_file(tmp_path / "missing.safetensors")
    extra = dict(state, **{"body.9.block1.weight": torch.zeros(32, 32, 3, 3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError):
        T2IAdapter.from_single_file(tmp_path / "extra.safetensors")
    odd = dict(state, **{"conv_in.weight": torch.zeros(8, 100, 3, 3)})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="multiple of 64"):
        T2IAdapter.from_single_file(tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match="original_config"):
        T2IAdapter.from_single_file(tmp_path / "odd.safetensors", original_config="v1-inference.yaml")
    assert not (tmp_path / "out.safetensors").exists()
