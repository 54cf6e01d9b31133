"""UNet2DConditional: parity with diffusers' UNet2DConditionModel on the same random weights, config.json
mapping both ways, folders saved by either library, and the errors for bad configs, weights and inputs."""
from __future__ import annotations

import inspect
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.diffusers_tables import UNET_CONDITIONAL
from latentdiff.models.unet import UNet2DConditional, UNetConfig
from latentdiff.registry import COMPONENTS
from tests._support.parity import assert_parity, randomize_

CROSS, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# diffusers kwargs of a tiny SD1-like UNet: two levels, attention on the first, a cross-attention mid block
TINY = dict(sample_size=16, block_out_channels=[32, 64], layers_per_block=2, down_block_types=[CROSS, DOWN],
            up_block_types=[UP, CROSS_UP], attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)


def tiny(**changes):
    return {**TINY, **changes}


def pair(kwargs: dict, *, seed: int = 0, meta: bool = False):
    """(diffusers reference, ours) on the same random weights; ours is loaded from the reference's state dict."""
    torch.manual_seed(seed)
    if meta:  # skip diffusers' initialisation, which randomize_ overwrites anyway (860M parameters)
        with torch.device("meta"):
            ref = UNet2DConditionModel(**kwargs)
        ref.to_empty(device="cpu")
    else:
        ref = UNet2DConditionModel(**kwargs)
    ref = randomize_(ref).eval()
    ours = UNet2DConditional.from_state_dict(UNet2DConditional.from_file_config(kwargs), ref.state_dict())
    return ref, ours


def inputs(kwargs: dict, *, batch: int = 2, size: tuple[int, int] = (16, 16), tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, kwargs.get("in_channels", 4), *size, generator=g)
    cross = kwargs.get("cross_attention_dim", 1280)
    context = torch.randn(batch, tokens, cross, generator=g) if isinstance(cross, int) else None
    return x, context


def check_parity(ref, ours, x, t, context=None, class_labels=None):
    with torch.no_grad():
        expected = ref(x, t, context, class_labels=class_labels).sample
        actual = ours(x, t, context, class_labels=class_labels)
    assert actual.dtype == expected.dtype and actual.device == expected.device
    assert_parity(actual, expected)


# ---- forward parity -------------------------------------------------------------------------------------

PARITY_CASES = {
    "sd1_like": tiny(),
    "attention_on_every_level": tiny(down_block_types=[CROSS, CROSS], up_block_types=[CROSS_UP, CROSS_UP],
                                     norm_num_groups=32),
    "sd2_like": tiny(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True,
                     cross_attention_dim=48),
    "concat_conditioning": tiny(in_channels=9, out_channels=4),
    "transformer_depth_2": tiny(transformer_layers_per_block=2),
    "transformer_depth_per_level": tiny(down_block_types=[CROSS, CROSS], up_block_types=[CROSS_UP, CROSS_UP],
                                        transformer_layers_per_block=[1, 2]),
    "layers_per_level_1": tiny(layers_per_block=1),
    "layers_per_level_tuple": tiny(block_out_channels=[32, 48, 64], down_block_types=[CROSS, CROSS, DOWN],
                                   up_block_types=[UP, CROSS_UP, CROSS_UP], layers_per_block=[1, 2, 1]),
    "mid_block_resnet": tiny(mid_block_type="UNetMidBlock2D"),
    "no_mid_block": tiny(mid_block_type=None),
    # old LDM settings: [sin, cos] order, shifted frequencies, right/bottom padded downsampling
    "ldm_embedding_and_padding": tiny(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                                      mid_block_scale_factor=2.0, time_embedding_dim=48, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_parity_with_diffusers(name):
    kwargs = PARITY_CASES[name]
    ref, ours = pair(kwargs)
    x, context = inputs(kwargs)
    check_parity(ref, ours, x, torch.tensor([3, 801]), context)


def test_parity_class_conditional():
    kwargs = tiny(num_class_embeds=10)
    ref, ours = pair(kwargs)
    x, context = inputs(kwargs)
    check_parity(ref, ours, x, 250, context, class_labels=torch.tensor([0, 7]))


def test_parity_without_cross_attention():
    """cross_attention_dim None: transformer blocks keep only self-attention. diffusers' UNet2DConditionModel
    refuses CrossAttn blocks without a cross_attention_dim, so the reference is a diffusers UNet whose
    transformer blocks have attn2/norm2 removed: what diffusers' BasicTransformerBlock builds for None."""
    kwargs = tiny(down_block_types=[CROSS, CROSS], up_block_types=[CROSS_UP, CROSS_UP])
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**kwargs)
    for module in ref.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.attn2 = module.norm2 = None
    ref = randomize_(ref).eval()
    config = UNet2DConditional.from_file_config({**kwargs, "cross_attention_dim": [None, None]})
    assert config.cross_attention_dim is None and not config.uses_context
    ours = UNet2DConditional.from_state_dict(config, ref.state_dict())
    x, _ = inputs(kwargs)
    check_parity(ref, ours, x, 500, None)
    with pytest.raises(InputError, match="context"):
        ours(x, 500, torch.randn(2, 7, 32))


@pytest.fixture(scope="module")
def sd1_tiny():
    return pair(TINY)


@pytest.mark.parametrize("t", [7, 7.5, torch.tensor(7), torch.tensor(7.5), torch.tensor([7]),
                               torch.tensor([7, 900]), torch.tensor([7.25, 900.5], dtype=torch.float64)],
                         ids=["int", "float", "0d_int", "0d_float", "1_elem", "per_sample", "per_sample_f64"])
def test_timestep_forms(sd1_tiny, t):
    ref, ours = sd1_tiny
    x, context = inputs(TINY)
    check_parity(ref, ours, x, t, context)


@pytest.mark.parametrize("size", [(15, 13), (16, 10), (9, 9)])
@pytest.mark.parametrize("padding", [1, 0])
def test_odd_latent_sizes(size, padding):
    """Sides not divisible by 2^(levels-1): the way up upsamples to the skip's size, as diffusers does."""
    kwargs = tiny(block_out_channels=[32, 32, 64], down_block_types=[CROSS, DOWN, DOWN],
                  up_block_types=[UP, UP, CROSS_UP], layers_per_block=1, downsample_padding=padding)
    ref, ours = pair(kwargs)
    x, context = inputs(kwargs, batch=1, size=size)
    check_parity(ref, ours, x, 40, context)


def test_sd2_architecture_tiny_channels():
    """SD 2.x layout: linear projections, heads per level (5, 10, 20, 20), 1024-wide context, upcast attention."""
    kwargs = dict(sample_size=8, block_out_channels=[40, 80, 160, 160], layers_per_block=2,
                  attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                  upcast_attention=True, norm_num_groups=8)
    ref, ours = pair(kwargs)
    assert ours.config.attention_heads == (5, 10, 20, 20) and ours.config.attention_levels == (True, True, True, False)
    x, context = inputs(kwargs, size=(8, 8), tokens=77)
    check_parity(ref, ours, x, torch.tensor([1, 999]), context)


def test_compiles_without_graph_breaks(sd1_tiny):
    """torch.compile(fullgraph=True) traces forward in one graph: no host syncs or data-dependent branches."""
    ref, ours = sd1_tiny
    x, context = inputs(TINY)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_parity(compiled(x, torch.tensor([3, 801]), context), ours(x, torch.tensor([3, 801]), context), 1e-6)


# ---- config.json mapping ----------------------------------------------------------------------------------

def _diffusers_signature() -> dict:
    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def test_defaults_table_matches_diffusers_signature():
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in _diffusers_signature().items()}
    assert UNET_CONDITIONAL.defaults == plain


def test_every_diffusers_key_is_accounted_for():
    table = UNET_CONDITIONAL
    mapped, supported, inert = set(table.mapped), set(table.supported), set(table.inert)
    assert not (mapped & supported or mapped & inert or supported & inert)
    assert mapped | supported | inert == set(_diffusers_signature())


@pytest.mark.parametrize("kwargs", [{}, TINY, PARITY_CASES["sd2_like"], PARITY_CASES["ldm_embedding_and_padding"],
                                    tiny(num_class_embeds=3, in_channels=9, mid_block_type=None)],
                         ids=["diffusers_defaults", "tiny", "sd2_like", "ldm", "class_concat"])
def test_same_parameters_as_diffusers(kwargs):
    """Keys and shapes equal diffusers' for the same config.json (built on the meta device: no memory, no init);
    an empty config takes diffusers' defaults, the full SD-size UNet with 1280-wide context."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
        ours = UNet2DConditional(UNet2DConditional.from_file_config(kwargs))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_to_file_config_is_complete_and_rebuilds_the_same_config():
    for kwargs in (TINY, PARITY_CASES["sd2_like"], PARITY_CASES["layers_per_level_tuple"], tiny(num_class_embeds=4)):
        config = UNet2DConditional.from_file_config(kwargs)
        with torch.device("meta"):
            file_config = UNet2DConditional(config).to_file_config()
        assert set(file_config) == set(_diffusers_signature())
        assert UNet2DConditional.from_file_config(file_config) == config
        with torch.device("meta"):  # diffusers builds the same parameters from what we write
            ref = UNet2DConditionModel(**file_config)
            assert set(ref.state_dict()) == set(UNet2DConditional(config).state_dict())


def test_absent_keys_take_diffusers_defaults():
    config = UNet2DConditional.from_file_config({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0"})
    assert config.cross_attention_dim == 1280 and config.channels == (320, 640, 1280, 1280)
    assert config.attention_heads == 8 and config.sample_size is None and config.mid_block == "transformer"


def test_sample_size_pair_and_unet_res_aliases():
    config = UNet2DConditional.from_file_config(tiny(sample_size=[16, 16], down_block_types=["UNetRes" + CROSS, DOWN]))
    assert config.sample_size == 16 and config.attention_levels == (True, False)


BAD_FILE_CONFIGS = [
    (tiny(not_a_key=1), "not_a_key"),
    (tiny(addition_embed_type="text_image"), "addition_embed_type"),
    (tiny(addition_embed_type="text_time"), "addition_time_embed_dim"),  # text_time needs its widths
    (tiny(class_embed_type="timestep"), "class_embed_type"),
    (tiny(act_fn="gelu"), "act_fn"),
    (tiny(only_cross_attention=[True, False]), "only_cross_attention"),
    (tiny(num_attention_heads=4), "num_attention_heads"),
    (tiny(time_cond_proj_dim=256), "time_cond_proj_dim"),
    (tiny(layers_per_block=[2, 2, 2]), "layers_per_block"),
    (tiny(attention_head_dim=[2]), "attention_head_dim"),
    (tiny(transformer_layers_per_block=[[1, 1], [1, 1]]), "transformer_layers_per_block"),
    (tiny(block_out_channels=[32, 64, 64]), "block_out_channels"),
    (tiny(up_block_types=[CROSS_UP, UP]), "up_block_types"),
    (tiny(down_block_types=["AttnDownBlock2D", DOWN]), "down_block_types[0]"),
    (tiny(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (tiny(cross_attention_dim=[32, 64]), "cross_attention_dim"),
    (tiny(sample_size=[16, 32]), "sample_size"),
    (tiny(_class_name="UNet2DModel"), "_class_name"),
    (tiny(attention_head_dim=3), "attention_heads"),  # 32 channels, 3 heads: caught by UNetConfig.validate
]


@pytest.mark.parametrize("data,key", BAD_FILE_CONFIGS, ids=[k for _, k in BAD_FILE_CONFIGS])
def test_bad_file_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        UNet2DConditional.from_file_config(data, source="unet/config.json")
    assert key in str(info.value)


@pytest.mark.parametrize("changes,field", [
    (dict(attention_levels=(True, False, False)), "attention_levels"),
    (dict(layers_per_level=(2, 2, 2)), "layers_per_level"),
    (dict(attention_heads=(8, 8)), "attention_heads"),
    (dict(transformer_depth=(1, 0, 1, 1)), "transformer_depth"),
    (dict(attention_heads=7), "attention_heads"),
    (dict(norm_num_groups=24), "norm_num_groups"),
    (dict(downsample_padding=2), "downsample_padding"),
    (dict(channels=()), "channels"),
    (dict(mid_block="cross"), "mid_block"),
    (dict(cross_attention_dim=0), "cross_attention_dim"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        UNetConfig(**changes)
    assert info.value.where == field


# ---- folders, weights and the registry --------------------------------------------------------------------

def test_folder_saved_by_diffusers_loads(tmp_path, sd1_tiny):
    ref, _ = sd1_tiny
    ref.save_pretrained(tmp_path / "unet")
    ours = UNet2DConditional.from_pretrained(tmp_path / "unet")
    assert ours.config == UNet2DConditional.from_file_config(TINY)
    x, context = inputs(TINY)
    check_parity(ref, ours, x, 333, context)


def test_folder_saved_by_us_loads_in_diffusers(tmp_path):
    kwargs = PARITY_CASES["sd2_like"]
    ref, ours = pair(kwargs)
    ours.save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert back.config.attention_head_dim == [2, 4] and back.config.use_linear_projection
    x, context = inputs(kwargs)
    check_parity(back, ours, x, 333, context)
    check_parity(ref, UNet2DConditional.from_pretrained(tmp_path / "unet"), x, 333, context)


def test_fp16_variant_folders_load_both_ways(tmp_path):
    kwargs = tiny(num_class_embeds=5)
    ref, ours = pair(kwargs)
    x, context = inputs(kwargs)
    labels = torch.tensor([1, 4])
    ref.half().save_pretrained(tmp_path / "from_diffusers", variant="fp16")
    ref.float()  # weights now hold their fp16 rounding, as every loaded copy does
    loaded = UNet2DConditional.from_pretrained(tmp_path / "from_diffusers", variant="fp16")
    assert loaded.dtype == torch.float32
    check_parity(ref, loaded, x, 12, context, labels)

    half = UNet2DConditional.from_state_dict(ours.config, ref.state_dict(), torch_dtype=torch.float16)
    half.save_pretrained(tmp_path / "from_us", variant="fp16")
    assert (tmp_path / "from_us" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    back = UNet2DConditionModel.from_pretrained(tmp_path / "from_us", variant="fp16", torch_dtype=torch.float32)
    check_parity(back.eval(), loaded, x, 12, context, labels)


def test_bad_state_dict_is_a_checkpoint_error(sd1_tiny):
    ref, ours = sd1_tiny
    config, state = ours.config, dict(ref.state_dict())
    missing = dict(state)
    del missing["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): mid_block\.attentions\.0\.proj_in\.weight"):
        UNet2DConditional.from_state_dict(config, missing)
    wrong = {**state, "conv_in.weight": torch.zeros(32, 5, 3, 3)}
    with pytest.raises(CheckpointError, match=r"conv_in\.weight: expected \(32, 4, 3, 3\), found \(32, 5, 3, 3\)"):
        UNet2DConditional.from_state_dict(config, wrong)


def test_registry_builds_it():
    config = UNetConfig(channels=(32, 64), attention_levels=(True, False), layers_per_level=1, attention_heads=2,
                        cross_attention_dim=16, norm_num_groups=8, sample_size=8)
    model = COMPONENTS.create("unet", config)
    assert type(model) is UNet2DConditional and model.registry_name == "unet"
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


# ---- input errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,where", [
    (lambda x, c: dict(x=x[:, :3], t=5, context=c), "x"),
    (lambda x, c: dict(x=x[0], t=5, context=c), "x"),
    (lambda x, c: dict(x=x, t=5, context=None), "context"),
    (lambda x, c: dict(x=x, t=5, context=c[:1]), "context"),
    (lambda x, c: dict(x=x, t=5, context=torch.randn(2, 7, 31)), "context"),
    (lambda x, c: dict(x=x, t=torch.tensor([1, 2, 3]), context=c), "t"),
    (lambda x, c: dict(x=x, t=torch.zeros(2, 1), context=c), "t"),
    (lambda x, c: dict(x=x, t="5", context=c), "t"),
    (lambda x, c: dict(x=x, t=5, context=c, class_labels=torch.tensor([1, 2])), "class_labels"),
])
def test_bad_inputs_raise_before_work(sd1_tiny, case, where):
    _, ours = sd1_tiny
    with pytest.raises(InputError) as info:
        ours(**case(*inputs(TINY)))
    assert info.value.where == where


def test_class_labels_are_required_and_integer():
    kwargs = tiny(num_class_embeds=3)
    _, ours = pair(kwargs)
    x, context = inputs(kwargs)
    for labels in (None, torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2])):
        with pytest.raises(InputError) as info:
            ours(x, 5, context, class_labels=labels)
        assert info.value.where == "class_labels"


def test_too_small_latent_with_unpadded_downsampling():
    _, ours = pair(tiny(downsample_padding=0))
    with pytest.raises(InputError, match="too small"):
        ours(torch.randn(1, 4, 1, 1), 5, torch.randn(1, 3, 32))


# ---- full Stable Diffusion v1.5 size ----------------------------------------------------------------------

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
            down_block_types=[CROSS, CROSS, CROSS, DOWN], up_block_types=[UP, CROSS_UP, CROSS_UP, CROSS_UP],
            act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
            mid_block_scale_factor=1, norm_eps=1e-5)


@pytest.fixture(scope="module")
def sd15():
    start = time.perf_counter()
    ref, ours = pair(SD15, meta=True)
    print(f"\nSD1.5 UNet pair (random weights, {ours.num_parameters():,} parameters) built in "
          f"{time.perf_counter() - start:.1f}s")
    return ref, ours


@pytest.mark.slow
def test_sd15_parity(sd15):
    ref, ours = sd15
    assert ours.num_parameters() == 859_520_964  # the published SD1.5 UNet size
    x, context = inputs(SD15, batch=2, size=(8, 8), tokens=77)
    check_parity(ref, ours, x, torch.tensor([981, 1]), context)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_output_is_contiguous(use_linear):
    """A permuted (channels-last) output makes every later convolution copy its weights (benchmarks/RESULTS.md)."""
    from latentdiff.layers.attention import SpatialTransformer

    block = SpatialTransformer(8, 2, 4, context_dim=6, use_linear=use_linear, groups=4)
    out = block(torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6))
    assert out.is_contiguous()
