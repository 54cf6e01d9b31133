"""AutoencoderKL against diffusers' AutoencoderKL (the oracle) on the same random weights, plus its config
mapping, folder round trips in both directions, and the errors it raises."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from latentdiff import hub, registry
from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from tests._support.first_stage import assert_same_state, make_pair, tiny_config
from tests._support.parity import assert_parity
from tests._support.tiny import tiny_kl_config

# The VAE config.json of Stable Diffusion v1.5 (scaling_factor absent: diffusers' default 0.18215 applies).
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def image_size(f: int) -> tuple[int, int]:
    """Non-square (so a transposed H/W shows) and at least 8 pixels high."""
    height = max(2 * f, 8)
    return height, height + f


@torch.no_grad()
def check_parity(ours: AutoencoderKL, theirs: DiffusersAutoencoderKL, x: torch.Tensor) -> None:
    post, ref = ours.encode(x), theirs.encode(x).latent_dist
    for name in ("mean", "logvar", "std", "var"):
        assert_parity(getattr(post, name), getattr(ref, name))
    assert_parity(post.mode(), ref.mode())
    assert_parity(post.sample(torch.Generator().manual_seed(1)), ref.sample(generator=torch.Generator().manual_seed(1)))
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(x.shape[0])]  # noqa: E731
    assert_parity(post.sample(gens()), ref.sample(generator=gens()))
    # A second posterior for KL(q || other), from moments alone: no second encoder pass needed.
    moments = ref.parameters.flip(0) + 0.1
    other, ref_other = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert_parity(post.kl(), ref.kl())
    assert_parity(post.kl(other), ref.kl(ref_other))
    z = ref.sample(generator=torch.Generator().manual_seed(2))
    assert_parity(post.nll(z), ref.nll(z))
    assert_parity(ours.decode(z), theirs.decode(z).sample)
    assert_parity(ours(x), theirs(x).sample)
    assert_parity(ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)),
                  theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 6])
def test_parity_at_every_downsampling_factor(levels):
    ours, theirs = make_pair(tiny_config(levels), seed=levels)
    f = 2 ** (levels - 1)
    assert ours.downsample_factor == f
    height, width = image_size(f)
    x = torch.rand(2, 3, height, width) * 2 - 1
    assert ours.encode(x).mean.shape == (2, 4, height // f, width // f)
    check_parity(ours, theirs, x)


@pytest.mark.parametrize("overrides", [
    {"mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False},
    {"latent_channels": 16, "in_channels": 4, "out_channels": 2, "layers_per_block": 2, "shift_factor": 0.1},
], ids=["no-attention-no-quant-convs", "wide-latent-odd-io"])
def test_parity_of_architecture_options(overrides):
    ours, theirs = make_pair(tiny_config(3, **overrides))
    check_parity(ours, theirs, torch.rand(2, overrides.get("in_channels", 3), 8, 12) * 2 - 1)


@pytest.mark.parametrize("stats", [
    {},
    {"shift_factor": 0.0609, "scaling_factor": 1.5305},
    {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.9, 1.1, 0.8, 1.2], "scaling_factor": 0.5},
], ids=["sd", "shift", "per-channel"])
@torch.no_grad()
def test_scaled_latents_follow_the_diffusers_pipelines(stats):
    """The formulas diffusers' SD, SD3 and SDXL pipelines apply around vae.encode / vae.decode."""
    ours, theirs = make_pair(tiny_config(3, **stats))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    latent = theirs.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    c = theirs.config
    if c.latents_mean is not None:
        mean, std = (torch.tensor(v).view(1, 4, 1, 1) for v in (c.latents_mean, c.latents_std))
        expected_z = (latent - mean) * c.scaling_factor / std
    else:
        expected_z = (latent - (c.shift_factor or 0.0)) * c.scaling_factor
    z = ours.encode_latents(x, generator=torch.Generator().manual_seed(0))
    assert_parity(z, expected_z)
    assert_parity(ours.encode_latents(x, sample=False), ours.scale_latents(theirs.encode(x).latent_dist.mode()))
    if c.latents_mean is not None:
        expected_latent = z * std / c.scaling_factor + mean
    else:
        expected_latent = z / c.scaling_factor + (c.shift_factor or 0.0)
    assert_parity(ours.unscale_latents(z), latent)
    assert_parity(ours.decode_latents(z), theirs.decode(expected_latent).sample)


# ---- Stable Diffusion v1.5's VAE architecture (random weights) --------------------------------------
@pytest.fixture(scope="module")
def sd_pair():
    return make_pair(SD_VAE_CONFIG, seed=0)


@pytest.mark.slow
def test_sd_vae_config_maps_to_our_defaults(sd_pair):
    ours, theirs = sd_pair
    assert ours.config == AutoencoderKLConfig()
    assert ours.downsample_factor == 8
    assert ours.num_parameters() == theirs.num_parameters()


@pytest.mark.slow
def test_sd_vae_parity(sd_pair):
    ours, theirs = sd_pair
    check_parity(ours, theirs, torch.rand(1, 3, 32, 24) * 2 - 1)


# ---- config.json mapping ------------------------------------------------------------------------
def test_written_config_has_every_diffusers_argument_and_round_trips():
    config = tiny_kl_config(latent_channels=16, shift_factor=0.1, scaling_factor=0.3, use_quant_conv=False,
                            mid_block_attention=False)
    data = AutoencoderKL(config).to_file_config()
    arguments = set(inspect.signature(DiffusersAutoencoderKL.__init__).parameters) - {"self"}
    assert set(data) == arguments
    assert AutoencoderKL.from_file_config(data) == config
    assert AutoencoderKL.from_file_config(dict(DiffusersAutoencoderKL.from_config(data).config)) == config


def test_folder_with_an_unknown_config_key_is_refused(tmp_path):
    AutoencoderKL(AutoencoderKLConfig(channels=(8,), norm_num_groups=4)).save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    path.write_text(path.read_text().replace('"act_fn"', '"time_embedding_type": "positional", "act_fn"'))
    with pytest.raises(ConfigError, match="time_embedding_type") as info:
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert info.value.where == str(path)


def test_absent_keys_take_the_diffusers_defaults():
    assert AutoencoderKL.from_file_config({}) == AutoencoderKL.from_file_config(dict(DiffusersAutoencoderKL().config))


@pytest.mark.parametrize("overrides, key", [
    ({"unknown_option": 1}, "unknown_option"),
    ({"act_fn": "relu"}, "act_fn"),
    ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"latents_mean": [0.0] * 4}, "latents_std"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "latents_mean"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"block_out_channels": [8, 16, 18]}, "block_out_channels"),
    ({"mid_block_add_attention": "yes"}, "mid_block_add_attention"),
    ({"scaling_factor": 0.0}, "scaling_factor"),
    ({"sample_size": [64, 64]}, "sample_size"),
])
def test_bad_file_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        AutoencoderKL.from_file_config(tiny_config(3, **overrides), source="vae/config.json")


@pytest.mark.parametrize("changes, field", [
    ({"channels": ()}, "channels"),
    ({"channels": (8, 10)}, "channels"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"shift_factor": float("nan")}, "shift_factor"),
    ({"latents_mean": (0.0,) * 4, "latents_std": (1.0, 1.0, 0.0, 1.0)}, "latents_std"),
    ({"latents_mean": (0.0,) * 4, "latents_std": (1.0,) * 4, "shift_factor": 0.1}, "shift_factor"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as info:
        tiny_kl_config(**changes)
    assert info.value.where == field


# ---- folders, both directions ---------------------------------------------------------------------
@pytest.fixture
def tiny_pair():
    return make_pair(tiny_config(3, layers_per_block=2), seed=7)


@torch.no_grad()
def test_diffusers_folder_loads_in_ours(tiny_pair, tmp_path):
    _, theirs = tiny_pair
    theirs.save_pretrained(tmp_path / "vae")
    ours = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert_same_state(ours, theirs)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert_parity(ours(x), theirs(x).sample)


@torch.no_grad()
def test_our_folder_loads_in_diffusers(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    ours.save_pretrained(tmp_path / "vae")
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_file_config(dict(theirs.config)) == ours.config
    assert_same_state(ours, theirs)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert_parity(ours(x), theirs(x).sample)


@torch.no_grad()
def test_fp16_variant_in_both_directions(tiny_pair, tmp_path):
    ours, theirs = tiny_pair
    ours.half().save_pretrained(tmp_path / "ours", variant="fp16")
    assert (tmp_path / "ours" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded_theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "ours", variant="fp16", torch_dtype=torch.float16)
    assert_same_state(ours, loaded_theirs)
    theirs.half().save_pretrained(tmp_path / "theirs", variant="fp16")
    loaded_ours = AutoencoderKL.from_pretrained(tmp_path / "theirs", variant="fp16", torch_dtype=torch.float16)
    assert loaded_ours.dtype == torch.float16
    assert_same_state(loaded_ours, theirs)
    x = torch.rand(1, 3, 8, 8) * 2 - 1  # fp16 weights, run in fp32 on both sides (CPU)
    assert_parity(loaded_ours.float()(x), theirs.float()(x).sample)


def test_interrupted_save_leaves_the_previous_folder(tiny_pair, tmp_path, monkeypatch):
    ours, _ = tiny_pair
    ours.save_pretrained(tmp_path / "vae")
    real_save = hub.save_safetensors

    def save_half_then_fail(tensors, path, metadata=None):
        real_save(dict(list(tensors.items())[: len(tensors) // 2]), path, metadata)
        raise OSError("disk full")

    other, _ = make_pair(tiny_config(3, layers_per_block=2), seed=8)
    monkeypatch.setattr(hub, "save_safetensors", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path / "vae")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert_same_state(AutoencoderKL.from_pretrained(tmp_path / "vae"), ours)


# ---- errors ------------------------------------------------------------------------------------------
def test_bad_image_size_is_refused_before_the_encoder_runs(tiny_pair):
    ours, _ = tiny_pair
    calls = []
    ours.encoder.conv_in.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(InputError, match="H=10, W=8"):
        ours.encode(torch.zeros(1, 3, 10, 8))
    with pytest.raises(InputError, match="wrong shape"):
        ours(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="wrong shape"):
        ours.decode_latents(torch.zeros(1, 3, 2, 2))
    assert not calls


def test_one_generator_per_sample_is_required():
    posterior = DiagonalGaussian(torch.zeros(3, 8, 2, 2))
    with pytest.raises(InputError, match="generator"):
        posterior.sample([torch.Generator().manual_seed(0)] * 2)


def test_posterior_clamps_logvar_like_diffusers():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 3) * 40  # log-variances far past both clamp bounds
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() > moments[:, 4:].min() and ours.logvar.max() < moments[:, 4:].max()
    for name in ("logvar", "std", "var"):
        assert_parity(getattr(ours, name), getattr(ref, name))
    assert_parity(ours.kl(), ref.kl())


def test_state_dict_with_a_wrong_shape_lists_the_key(tiny_pair):
    ours, _ = tiny_pair
    state = dict(ours.state_dict())
    state["decoder.up_blocks.1.resnets.2.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    del state["quant_conv.bias"]
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.1\.resnets\.2\.conv1\.weight") as info:
        AutoencoderKL.from_state_dict(ours.config, state)
    assert "quant_conv.bias" in str(info.value)


def test_registry_creates_it(monkeypatch, tiny_kl):
    # Load only this module's registrations: the other built-in parts are tested in their own files.
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("latentdiff.models.autoencoder_kl",))
    monkeypatch.setattr(registry, "_loaded", False)
    config = tiny_kl
    model = registry.COMPONENTS.create("autoencoder_kl", config)
    assert isinstance(model, AutoencoderKL) and model.config == config and model.downsample_factor == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@torch.no_grad()
def test_a_seed_gives_the_same_latent_on_cpu_and_gpu(tiny_pair):
    ours, _ = tiny_pair
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    cpu = ours.encode_latents(x, generator=torch.Generator().manual_seed(0))
    gpu = ours.cuda().encode_latents(x.cuda(), generator=torch.Generator().manual_seed(0))
    assert_parity(gpu.cpu(), cpu)


# ---- per-level attention (kl-f16 / kl-f32: `attn_resolutions` in the original YAML) ----------------
def attention_config(flags: tuple[bool, ...], **overrides) -> dict:
    """tiny_config with diffusers' Attn* block types where `flags` (level 0 = full resolution) ask for them."""
    down = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in flags]
    up = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(flags)]
    return tiny_config(len(flags), down_block_types=down, up_block_types=up, **overrides)


@pytest.mark.parametrize("flags", [(False, False, False, False, True), (True, True, False)],
                         ids=["kl-f16-lowest-level", "two-highest-levels"])
def test_parity_with_attention_levels(flags):
    ours, theirs = make_pair(attention_config(flags, layers_per_block=2), seed=11)
    assert ours.config.attention_levels == flags
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert any(".attentions.1." in k for k in ours.state_dict())  # one attention per resnet, not per level
    f = ours.downsample_factor
    check_parity(ours, theirs, torch.rand(2, 3, 2 * f, 3 * f) * 2 - 1)


def test_attention_levels_map_to_diffusers_block_types():
    config = AutoencoderKLConfig(channels=(8, 16, 16), norm_num_groups=4, attention_levels=(True, True, False))
    data = AutoencoderKL(config).to_file_config()
    assert data["down_block_types"] == ["AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    assert data["up_block_types"] == ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D"]
    theirs = DiffusersAutoencoderKL.from_config(data)
    assert AutoencoderKL.from_file_config(dict(theirs.config)) == config
    assert sorted(AutoencoderKL(config).state_dict()) == sorted(theirs.state_dict())
    # No attention outside the mid block has one spelling, None, whatever the flags said.
    plain = tiny_kl_config(attention_levels=(False, False))
    assert plain.attention_levels is None and plain == tiny_kl_config()
    assert AutoencoderKL.from_file_config(AutoencoderKL(plain).to_file_config()) == plain


@torch.no_grad()
def test_attention_levels_folders_load_both_ways(tmp_path):
    ours, theirs = make_pair(attention_config((False, True)), seed=12)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_state(AutoencoderKL.from_pretrained(tmp_path / "theirs"), theirs)
    ours.save_pretrained(tmp_path / "ours")
    loaded = DiffusersAutoencoderKL.from_pretrained(tmp_path / "ours")
    assert_same_state(ours, loaded)
    assert_parity(ours(x), loaded(x).sample)


@pytest.mark.parametrize("overrides, key", [
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 3}, "up_block_types"),  # encoder and decoder differ
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, "down_block_types"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
])
def test_unsupported_block_types_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        AutoencoderKL.from_file_config(tiny_config(3, **overrides), source="vae/config.json")


def test_attention_levels_need_one_flag_per_level():
    with pytest.raises(ConfigError, match="attention_levels") as info:
        tiny_kl_config(attention_levels=(True,))
    assert info.value.where == "attention_levels"


def test_defaults_table_matches_diffusers_signature():
    from latentdiff.models.diffusers_tables import AUTOENCODER_KL

    params = inspect.signature(DiffusersAutoencoderKL.__init__).parameters
    plain = {k: list(p.default) if isinstance(p.default, tuple) else p.default
             for k, p in params.items() if k != "self"}
    assert AUTOENCODER_KL.defaults == plain


def test_a_table_that_misses_a_key_is_refused():
    from latentdiff.models.diffusers_config import DiffusersConfigMap

    with pytest.raises(ValueError, match="not accounted for"):
        DiffusersConfigMap(class_name="X", defaults={"a": 1, "b": 2}, same=("a",))
    with pytest.raises(ValueError, match="twice"):
        DiffusersConfigMap(class_name="X", defaults={"a": 1}, same=("a",), inert=("a",))
