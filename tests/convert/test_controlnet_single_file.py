"""lllyasviel's original ControlNet files: v1.0 (`control_model.*` beside the SD model), v1.1 (`control_model.*`
alone), bare cldm keys, fp16 repacks, "difference" files, SD 1.x / 2.x / SDXL structures, with and without YAML.

The oracle is diffusers: the layout the tests write is checked against diffusers' own reader
(`convert_controlnet_checkpoint` must consume every key and give back the reference model's tensors bit for bit),
and every load is compared with `diffusers.ControlNetModel.from_single_file` on the same file (its residuals,
fp32, random weights everywhere, zero convolutions included). diffusers 0.42's `original_config=` path is broken
for ControlNets (create_controlnet_diffusers_config_from_ldm calls the UNet's config builder without its checkpoint
argument), so diffusers reads the files with `config=` (the reference's config.json), and the YAMLs are checked
against the config diffusers' own UNet YAML reader builds from them.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm
from safetensors.torch import load_file, save_file

from latentdiff import ControlNet
from latentdiff.convert.checkpoints import convert_checkpoint
from latentdiff.convert.controlnet_ldm import controlnet_file_state
from latentdiff.errors import CheckpointError, InputError
from latentdiff.models.diffusers_tables import CONTROLNET
from latentdiff.models.unet import UNet2DConditional
from tests._support.parity import assert_parity, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

CROSS, DOWN, UP, CROSS_UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
# GroupNorm(32) as cldm's normalization(): the group count is in no tensor, so shape inference takes SD's
SD1 = dict(block_out_channels=[32, 64], down_block_types=[CROSS, DOWN], layers_per_block=2, cross_attention_dim=16,
           attention_head_dim=8, norm_num_groups=32)
# SD 2.x: linear projections, 64-wide heads (diffusers' attention_head_dim is the head count here)
SD2 = dict(block_out_channels=[64, 128], down_block_types=[CROSS, DOWN], layers_per_block=1, cross_attention_dim=32,
           attention_head_dim=[1, 2], use_linear_projection=True, norm_num_groups=32)
STRUCTURES = {"sd1": SD1, "sd2": SD2}


def reference(kind: str, *, seed: int = 0) -> ControlNetModel:
    torch.manual_seed(seed)
    return randomize_(ControlNetModel(**STRUCTURES[kind])).eval()


def cldm_state(model: ControlNetModel, kwargs: dict) -> dict[str, torch.Tensor]:
    """The bare cldm keys of `model` (checked against diffusers' reader in test_layout_is_what_diffusers_reads)."""
    ours = ControlNet.from_state_dict(ControlNet.from_file_config(kwargs), model.state_dict())
    return controlnet_file_state(ours, layout="bare")


def unet_original(kwargs: dict, *, seed: int) -> tuple[UNet2DConditional, dict[str, torch.Tensor]]:
    """A random UNet of the ControlNet's structure, and its keys as an SD file holds them (model.diffusion_model.*)."""
    torch.manual_seed(seed)
    up = [CROSS_UP if t == CROSS else UP for t in reversed(kwargs["down_block_types"])]
    ref = randomize_(UNet2DConditionModel(**kwargs, up_block_types=up)).eval()
    unet = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(ref.config), ref.state_dict())
    return unet, unet_keys(unet)


def unet_keys(unet: UNet2DConditional) -> dict[str, torch.Tensor]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = unet.save_single_file(Path(tmp) / "unet.safetensors")
        return {k: v.clone() for k, v in load_file(path).items()}


def tiny_yaml(kwargs: dict, *, hint_channels: int = 3) -> dict:
    """A ControlLDM YAML of the tiny structure (cldm_v15 / cldm_v21 at reduced width)."""
    widths = kwargs["block_out_channels"]
    net = dict(in_channels=4, model_channels=widths[0], attention_resolutions=[1],
               num_res_blocks=kwargs["layers_per_block"], channel_mult=[w // widths[0] for w in widths],
               use_spatial_transformer=True, transformer_depth=1, context_dim=kwargs["cross_attention_dim"],
               legacy=False)
    if kwargs.get("use_linear_projection"):
        net.update(num_head_channels=64, use_linear_in_transformer=True)
    else:
        net.update(num_heads=kwargs["attention_head_dim"])
    vae = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                          ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0))
    return {"model": {"target": "cldm.cldm.ControlLDM", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64, "channels": 4,
        "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": {**net, "hint_channels": hint_channels}},
        "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": {**net, "out_channels": 4}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}


def write(path, state: dict, *, layout: str, extra: dict | None = None):
    """A file of the given layout, without latentdiff's metadata: .safetensors, or .pth (torch.save)."""
    prefix = "" if layout == "bare" else "control_model."
    tensors = {prefix + k: v.contiguous() for k, v in state.items()} | dict(extra or {})
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors} if layout == "v1.0" else tensors, path)
    return path


def residuals(model, kwargs: dict, *, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, kwargs["cross_attention_dim"], generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    t = torch.tensor([400])
    with torch.no_grad():
        if isinstance(model, ControlNetModel):
            down, mid = model(x.to(dtype), t, context.to(dtype), hint.to(dtype), return_dict=False)
        else:
            down, mid = model(x.to(dtype), t, context.to(dtype), hint.to(dtype))
    return [*down, mid]


def diffusers_load(path, ref: ControlNetModel, tmp_path, **options) -> ControlNetModel:
    folder = tmp_path / "diffusers-config"
    ref.save_config(folder)
    return ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True, **options).eval()


@pytest.fixture(scope="module")
def sd1():
    ref = reference("sd1")
    return ref, cldm_state(ref, SD1)


class Recording(dict):
    """A state dict that records which keys are read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_layout_is_what_diffusers_reads(kind):
    ref = reference(kind)
    state = Recording(cldm_state(ref, STRUCTURES[kind]))
    converted = convert_controlnet_checkpoint(state, dict(ref.config))
    assert state.read == set(state), sorted(set(state) - state.read)   # every key written is one diffusers reads
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    # the published layout: one zero conv per input block, the hint encoder's convs at even indices to 14
    blocks = {k.split(".")[1] for k in state if k.startswith("input_blocks.")}
    assert {k.split(".")[1] for k in state if k.startswith("zero_convs.")} == blocks
    assert {int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")} == set(range(0, 16, 2))


@pytest.mark.parametrize("layout,suffix", [("v1.1", ".safetensors"), ("v1.1", ".pth"), ("v1.0", ".pth"),
                                           ("bare", ".safetensors")])
@pytest.mark.parametrize("with_yaml", [False, True], ids=["shapes", "yaml"])
def test_sd1_files_load_as_diffusers_does(sd1, tmp_path, layout, suffix, with_yaml):
    ref, state = sd1
    extra = {}
    if layout == "v1.0":   # the whole SD model beside the ControlNet (its UNet stands for it)
        extra = unet_original(SD1, seed=5)[1]
    path = write(tmp_path / f"control{suffix}", state, layout=layout, extra=extra)
    yaml_path = None
    if with_yaml:
        yaml_path = tmp_path / "cldm.yaml"
        yaml_path.write_text(yaml.safe_dump(tiny_yaml(SD1)))
    ours = ControlNet.from_single_file(path, original_config=yaml_path)
    theirs = diffusers_load(path, ref, tmp_path)
    for a, b in zip(residuals(ours, SD1), residuals(theirs, SD1), strict=True):
        assert_parity(a, b)


def test_sd2_file_with_and_without_yaml(tmp_path):
    ref = reference("sd2")
    path = write(tmp_path / "control_v21.safetensors", cldm_state(ref, SD2), layout="v1.1")
    yaml_path = tmp_path / "cldm_v21_tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(tiny_yaml(SD2)))
    theirs = residuals(diffusers_load(path, ref, tmp_path), SD2)
    for config in (None, yaml_path):
        ours = ControlNet.from_single_file(path, original_config=config)
        assert ours.config.use_linear_projection and ours.config.cross_attention_dim == 32
        for a, b in zip(residuals(ours, SD2), theirs, strict=True):
            assert_parity(a, b)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_yaml_reads_as_diffusers_reads_it(kind, tmp_path):
    """The YAML's architecture as diffusers' YAML reader (the UNet builder its ControlNet reader calls) sees it."""
    kwargs = STRUCTURES[kind]
    ref = reference(kind)
    path = write(tmp_path / "c.safetensors", cldm_state(ref, kwargs), layout="v1.1")
    data = tiny_yaml(kwargs)
    ours = CONTROLNET.to_file(ControlNet.from_single_file(path, original_config=data).config)
    theirs = create_unet_diffusers_config_from_ldm(data, load_file(path))
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "in_channels"):
        assert plain(ours[key]) == plain(theirs[key]), key
    assert plain(ours["attention_head_dim"]) == plain(theirs["attention_head_dim"])


def plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_shipped_yamls_describe_the_released_networks():
    """cldm_v15 / cldm_v21 give the configs of diffusers' released SD 1.5 / 2.1 ControlNets' architecture."""
    from latentdiff.convert.controlnet_ldm import arch_from_original_config

    hint = {f"input_hint_block.{i}.weight": torch.zeros(w, 3, 1, 1)
            for i, w in zip(range(0, 16, 2), [16, 16, 32, 32, 96, 96, 256, 320], strict=True)}
    v15 = CONTROLNET.to_file(arch_from_original_config("cldm_v15", hint, source="t").to_config(source="t"))
    v21 = CONTROLNET.to_file(arch_from_original_config("cldm_v21", hint, source="t").to_config(source="t"))
    assert v15["block_out_channels"] == [320, 640, 1280, 1280] and v15["cross_attention_dim"] == 768
    assert v15["attention_head_dim"] == 8 and not v15["use_linear_projection"]
    assert v21["attention_head_dim"] == [5, 10, 20, 20] and v21["use_linear_projection"]
    assert v21["cross_attention_dim"] == 1024 and v15["conditioning_embedding_out_channels"] == [16, 32, 96, 256]


def test_fp16_repack_loads_and_round_trips(sd1, tmp_path):
    ref, state = sd1
    half = {k: v.half() for k, v in state.items()}
    path = write(tmp_path / "control_canny-fp16.safetensors", half, layout="bare")
    ours = ControlNet.from_single_file(path)
    theirs = diffusers_load(path, ref, tmp_path, torch_dtype=torch.float32)
    for a, b in zip(residuals(ours, SD1), residuals(theirs, SD1), strict=True):
        assert_parity(a, b)
    out = ControlNet.from_single_file(path, torch_dtype=torch.float16).save_single_file(tmp_path / "o.safetensors",
                                                                                       layout="bare")
    back = load_file(out)
    assert set(back) == set(half)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], half[k]) for k in half)


@pytest.mark.parametrize("layout", ["v1.1", "bare"])
def test_round_trip_bit_for_bit(sd1, tmp_path, layout):
    _, state = sd1
    src = write(tmp_path / "in.safetensors", state, layout=layout)
    out = ControlNet.from_single_file(src).save_single_file(tmp_path / "out.safetensors", layout=layout)
    a, b = load_file(src), load_file(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_config_comes_back_without_yaml(tmp_path):
    """What no tensor records (GroupNorm groups, heads) comes back from the metadata of a file written here."""
    kwargs = {**SD1, "norm_num_groups": 8, "attention_head_dim": 2}
    torch.manual_seed(1)
    model = ControlNet.from_state_dict(ControlNet.from_file_config(kwargs),
                                       randomize_(ControlNetModel(**kwargs)).state_dict())
    back = ControlNet.from_single_file(model.save_single_file(tmp_path / "c.safetensors"))
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_sdxl_structure_by_shapes(tmp_path):
    """SDXL's text_time embedding (label_emb.0) read from a 2048-wide context; no diffusers reader exists for this
    layout, so the model read back must be the written one (its parity with diffusers is tests/models')."""
    kwargs = dict(block_out_channels=[64, 128], down_block_types=[DOWN, CROSS], transformer_layers_per_block=[1, 2],
                  attention_head_dim=[1, 2], cross_attention_dim=2048, use_linear_projection=True, layers_per_block=1,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=32 + 6 * 256, norm_num_groups=32)
    torch.manual_seed(2)
    model = ControlNet.from_state_dict(ControlNet.from_file_config(kwargs),
                                       randomize_(ControlNetModel(**kwargs)).state_dict())
    path = write(tmp_path / "xl.safetensors", controlnet_file_state(model, layout="bare"), layout="v1.1")
    back = ControlNet.from_single_file(path)
    # the depth of a level without attention is in no tensor (read as the middle block's, as for UNets)
    depth = back.config.per_level(back.config.transformer_depth)
    assert depth[1] == 2 and dataclasses.replace(back.config, transformer_depth=(1, 2)) == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert any(k.startswith("control_model.label_emb.0.0.") for k in load_file(path))


def test_difference_file_needs_its_base_unet(sd1, tmp_path):
    ref, state = sd1
    unet, base = unet_original(SD1, seed=7)
    base = {k.removeprefix("model.diffusion_model."): v for k, v in base.items()}
    shared = [k for k in state if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")]
    assert shared and all(k in base for k in shared)
    diff = {**state, **{k: state[k] - base[k] for k in shared}}
    path = write(tmp_path / "diff_control.safetensors", diff, layout="v1.1", extra={"difference": torch.tensor([1.0])})
    with pytest.raises(CheckpointError) as e:
        ControlNet.from_single_file(path)
    assert "difference" in str(e.value) and "unet=" in str(e.value.expected)
    ours = ControlNet.from_single_file(path, unet=unet)
    theirs = residuals(diffusers_load(write(tmp_path / "full.safetensors", state, layout="v1.1"), ref, tmp_path), SD1)
    for a, b in zip(residuals(ours, SD1), theirs, strict=True):
        assert_parity(a, b)
    other, _ = unet_original(SD2, seed=7)
    with pytest.raises(CheckpointError, match="not made from this base UNet"):
        ControlNet.from_single_file(path, unet=other)
    with pytest.raises(InputError, match="difference"):
        ControlNet.from_single_file(write(tmp_path / "plain.safetensors", state, layout="v1.1"), unet=unet)


def test_bad_files_name_file_key_expected_found(sd1, tmp_path):
    _, state = sd1
    unet_only = tmp_path / "sd_unet.safetensors"
    save_file(unet_original(SD1, seed=5)[1], str(unet_only))
    with pytest.raises(CheckpointError, match="without a ControlNet") as e:
        ControlNet.from_single_file(unet_only)
    assert str(unet_only) in str(e.value.where)

    kept = {k: v for k, v in state.items() if not k.startswith("zero_convs.3.")}
    missing = write(tmp_path / "missing.safetensors", kept, layout="v1.1")
    with pytest.raises(CheckpointError, match=r"controlnet_down_blocks\.3\.weight") as e:
        ControlNet.from_single_file(missing)
    assert str(missing) in str(e.value.where)

    gray = {**state, "input_hint_block.0.weight": state["input_hint_block.0.weight"][:, :1].clone()}
    gray_path = write(tmp_path / "gray.safetensors", gray, layout="v1.1")
    assert ControlNet.from_single_file(gray_path).config.conditioning_channels == 1   # shapes: a 1-channel hint
    with pytest.raises(CheckpointError) as e:   # its YAML says 3: the file's key, expected and found shapes
        ControlNet.from_single_file(gray_path, original_config=tiny_yaml(SD1, hint_channels=3))
    message = str(e.value)
    assert "control_model.input_hint_block.0.weight" in message and "(16, 3, 3, 3)" in message and \
        "(16, 1, 3, 3)" in message

    broken = write(tmp_path / "hint.safetensors", {k: v for k, v in state.items()
                                                   if not k.startswith("input_hint_block.14.")}, layout="v1.1")
    with pytest.raises(CheckpointError, match="hint encoder"):
        ControlNet.from_single_file(broken)

    model = ControlNet.from_single_file(write(tmp_path / "ok.safetensors", state, layout="v1.1"))
    with pytest.raises(InputError, match="layout"):
        model.save_single_file(tmp_path / "x.safetensors", layout="v1.0")
    with pytest.raises(InputError, match="safetensors"):
        model.save_single_file(tmp_path / "x.pth")
    with pytest.raises(InputError, match="prediction type"):
        ControlNet.from_single_file(gray_path, prediction_type="epsilon")
    assert not (tmp_path / "x.safetensors").exists()


def test_latentdiff_convert_both_ways(sd1, tmp_path):
    from latentdiff.cli import main

    ref, state = sd1
    src = write(tmp_path / "control_v11p_sd15_canny.pth", state, layout="v1.1")
    folder = tmp_path / "canny"
    assert main(["convert", str(src), str(folder)]) == 0
    loaded = ControlNetModel.from_pretrained(folder)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(InputError, match="not ControlNets"):
        convert_checkpoint(src, tmp_path / "other", tokenizer="openai/clip-vit-large-patch14", progress=False)
    back = convert_checkpoint(folder, tmp_path / "canny.safetensors", progress=False)
    written = load_file(back)
    assert set(written) == {"control_model." + k for k in state}
    assert all(torch.equal(written["control_model." + k], v) for k, v in state.items())


def test_sd_loaders_read_the_model_beside_a_v1_0_controlnet(sd1, tmp_path):
    """A v1.0 file is also an SD checkpoint: its UNet loads as from any SD file; a v1.1 file names the right class."""
    _, state = sd1
    unet, keys = unet_original(SD1, seed=5)
    path = write(tmp_path / "control_sd15_canny.pth", state, layout="v1.0", extra=keys)
    back = UNet2DConditional.from_single_file(path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in unet.state_dict().items())
    with pytest.raises(CheckpointError, match="ControlNet.from_single_file"):
        UNet2DConditional.from_single_file(write(tmp_path / "v11.safetensors", state, layout="v1.1"))
