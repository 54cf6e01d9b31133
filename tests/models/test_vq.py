"""VQModel and VectorQuantizer against diffusers' VQModel / VectorQuantizer (the oracle) on the same random
weights: encode, quantization (indices, z_q, loss, gradients), decode, forward; the config mapping; folder
round trips in both directions; the errors they raise."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import VQModel as DiffusersVQModel
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVectorQuantizer

from latentdiff import registry
from latentdiff.errors import ConfigError, InputError
from latentdiff.models.vq import VectorQuantizer, VQModel, VQModelConfig
from tests._support.first_stage import assert_same_state, randomize
from tests._support.parity import assert_parity

PLAIN, ATTN = ("DownEncoderBlock2D", "UpDecoderBlock2D"), ("AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D")


def tiny_config(widths: tuple[int, ...], attention: tuple[bool, ...] | None = None, **overrides) -> dict:
    """A diffusers VQModel config dict with tiny widths, f = 2^(len(widths) - 1)."""
    attention = attention or (False,) * len(widths)
    config = {"block_out_channels": list(widths), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32,
              "down_block_types": [(ATTN if a else PLAIN)[0] for a in attention],
              "up_block_types": [(ATTN if a else PLAIN)[1] for a in reversed(attention)],
              "num_vq_embeddings": 64, "latent_channels": 3}
    return config | overrides


# Tiny versions of LDM's VQ first stages: vq-f4 (3 levels), vq-f8 (4 levels, embed_dim 4), and vq-f16
# (5 levels; attention at the lowest resolution, as in the original's attn_resolutions [16] at 256 px).
VQ_F4 = tiny_config((8, 16, 16))
VQ_F8 = tiny_config((8, 8, 16, 16), latent_channels=4, vq_embed_dim=4, layers_per_block=2)
VQ_F16 = tiny_config((8, 8, 16, 16, 16), (False, False, False, True, True), latent_channels=8, vq_embed_dim=6)


@torch.no_grad()
def make_pair(config: dict, seed: int = 0) -> tuple[VQModel, DiffusersVQModel]:
    """diffusers' model with random weights, and ours built from its config.json dict and a copy of its weights.

    The codebook is spread like the encoder's output, so that many codes are in use and a wrong nearest-code
    search would show (diffusers' init squeezes every code near 0, where one code wins everywhere)."""
    torch.manual_seed(seed)
    theirs = DiffusersVQModel.from_config(config).eval()
    randomize(theirs)
    h = theirs.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latents
    codebook = theirs.quantize.embedding.weight
    codebook.copy_(h.mean((0, 2, 3)) + h.std((0, 2, 3)) * torch.randn_like(codebook))
    ours_config = VQModel.from_file_config(dict(theirs.config), source="diffusers")
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    return VQModel.from_state_dict(ours_config, state), theirs


def image(f: int, batch: int = 2, channels: int = 3) -> torch.Tensor:
    height = max(2 * f, 8)  # non-square, so a transposed H/W shows
    return torch.rand(batch, channels, height, height + f) * 2 - 1


@pytest.mark.parametrize("config, f", [(VQ_F4, 4), (VQ_F8, 8), (VQ_F16, 16)], ids=["vq-f4", "vq-f8", "vq-f16"])
def test_parity(config, f):
    ours, theirs = make_pair(config, seed=f)
    assert ours.downsample_factor == f and ours.latent_channels == theirs.quantize.vq_embed_dim
    assert ours.num_parameters() == theirs.num_parameters()
    x = image(f)
    with torch.no_grad():
        h, ref_h = ours.encode(x), theirs.encode(x).latents
        assert h.shape == (2, ours.latent_channels, x.shape[2] // f, x.shape[3] // f)
        assert_parity(h, ref_h)
        z_q, loss, indices = ours.quantize(ref_h)
        ref_z_q, ref_loss, (_, _, ref_indices) = theirs.quantize(ref_h)
        assert indices.shape == h.shape[:1] + h.shape[2:] and indices.dtype == torch.long
        assert torch.equal(indices.flatten(), ref_indices)
        assert indices.unique().numel() >= 3, "too few codes in use to test the search"
        assert_parity(z_q, ref_z_q)
        assert_parity(loss, ref_loss)
        assert_parity(ours.decode(ref_h), theirs.decode(ref_h).sample)
        assert_parity(ours.decode(ref_h, force_not_quantize=True), theirs.decode(ref_h, force_not_quantize=True).sample)
        assert_parity(ours(x), theirs(x).sample)


@pytest.mark.parametrize("config", [VQ_F4, VQ_F16], ids=["vq-f4", "vq-f16"])
def test_training_gradients_match(config):
    """Straight-through estimator and the (legacy-weighted) codebook/commitment loss: every parameter's
    gradient of reconstruction + codebook loss equals diffusers'."""
    ours, theirs = make_pair(config, seed=3)
    x = image(ours.downsample_factor, batch=1)
    z_q, loss, _ = ours.quantize(ours.encode(x))
    reconstruction = ours.decode(z_q, force_not_quantize=True)
    (reconstruction.square().mean() + loss).backward()
    ref = theirs(x)
    (ref.sample.square().mean() + ref.commit_loss).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith("to_k.bias"):  # softmax ignores a shift shared by all keys: the gradient is 0 + rounding
            assert p.grad.abs().max() < 1e-6 and theirs_params[name].grad.abs().max() < 1e-6, name
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert_parity(p.grad, theirs_params[name].grad)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_weighting(legacy):
    """beta on the codebook term (legacy, as released models were trained) or on the commitment term."""
    torch.manual_seed(0)
    ref = DiffusersVectorQuantizer(16, 4, beta=0.25, legacy=legacy)
    ours = VectorQuantizer(16, 4, beta=0.25, legacy=legacy)
    with torch.no_grad():
        ref.embedding.weight.normal_()
        ours.embedding.weight.copy_(ref.embedding.weight)
    z = torch.randn(2, 4, 3, 5)
    z_ours, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, loss, indices = ours(z_ours)
    ref_out, ref_loss, (_, _, ref_indices) = ref(z_ref)
    assert torch.equal(indices.flatten(), ref_indices)
    assert_parity(out.detach(), ref_out.detach())
    assert_parity(loss.detach(), ref_loss.detach())
    weights = torch.randn_like(out)
    ((out * weights).sum() + loss).backward()
    ((ref_out * weights).sum() + ref_loss).backward()
    assert_parity(z_ours.grad, z_ref.grad)
    assert_parity(ours.embedding.weight.grad, ref.embedding.weight.grad)


@torch.no_grad()
def test_codebook_lookup_matches_diffusers():
    ours, theirs = make_pair(tiny_config((8, 16), lookup_from_codebook=True, vq_embed_dim=5), seed=1)
    indices = torch.randint(0, 64, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    shape = (2, 3, 4, 5)
    expected = theirs.quantize.get_codebook_entry(indices.flatten(), shape)
    assert_parity(ours.quantize.get_codebook_entry(indices), expected)
    assert_parity(ours.quantize.get_codebook_entry(indices.flatten(), shape), expected)
    # lookup_from_codebook: decode(indices, force_not_quantize=True) decodes the looked-up codes.
    assert_parity(ours.decode(indices, force_not_quantize=True),
                  theirs.decode(indices.flatten(), force_not_quantize=True, shape=shape).sample)
    # And the codes of an image decode to what quantizing its latents decodes to.
    x = image(2)
    _, _, codes = ours.quantize(ours.encode(x))
    assert_parity(ours.decode(codes, force_not_quantize=True), ours(x))


@pytest.mark.parametrize("scaling_factor", [None, 1.0, 0.5])
@torch.no_grad()
def test_scaled_latents_follow_the_diffusers_ldm_pipeline(scaling_factor):
    """diffusers' LDM pipelines decode `vqvae.decode(latents / scaling_factor)`; absent, the factor is 0.18215."""
    overrides = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    ours, theirs = make_pair(tiny_config((8, 16, 16), **overrides), seed=2)
    x = image(4)
    c = theirs.config
    z = ours.encode_latents(x, generator=torch.Generator().manual_seed(0))
    assert_parity(z, theirs.encode(x).latents * c.scaling_factor)
    assert_parity(ours.decode_latents(z), theirs.decode(z / c.scaling_factor).sample)


# ---- config.json mapping ------------------------------------------------------------------------
def test_written_config_has_every_diffusers_argument_and_round_trips():
    config = VQModelConfig(channels=(8, 16, 16), norm_num_groups=4, latent_channels=4, vq_embed_dim=6,
                           attention_levels=(False, True, True), num_vq_embeddings=32, layers_per_level=1,
                           lookup_from_codebook=True, mid_block_attention=False, sample_size=None)
    data = VQModel(config).to_file_config()
    arguments = set(inspect.signature(DiffusersVQModel.__init__).parameters) - {"self"}
    assert set(data) == arguments
    assert data["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert data["up_block_types"] == ["AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    assert VQModel.from_file_config(data) == config
    theirs = DiffusersVQModel.from_config(data)
    assert VQModel.from_file_config(dict(theirs.config)) == config
    assert sorted(VQModel(config).state_dict()) == sorted(theirs.state_dict())


def test_absent_keys_take_the_diffusers_defaults():
    assert VQModel.from_file_config({}) == VQModel.from_file_config(dict(DiffusersVQModel().config))


def test_no_attention_is_spelled_one_way():
    config = VQModelConfig(channels=(8, 16), norm_num_groups=4, attention_levels=(False, False))
    assert config.attention_levels is None and config == VQModelConfig(channels=(8, 16), norm_num_groups=4)


@pytest.mark.parametrize("overrides, key", [
    ({"unknown_option": 1}, "unknown_option"),
    ({"act_fn": "relu"}, "act_fn"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"up_block_types": ["UpBlock2D"] * 3}, "up_block_types"),
    ({"num_vq_embeddings": 0}, "num_vq_embeddings"),
    ({"vq_embed_dim": 0}, "vq_embed_dim"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"block_out_channels": [8, 16, 18]}, "block_out_channels"),
    ({"lookup_from_codebook": "yes"}, "lookup_from_codebook"),
    ({"scaling_factor": -1.0}, "scaling_factor"),
])
def test_bad_file_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        VQModel.from_file_config(tiny_config((8, 16, 16)) | overrides, source="vqvae/config.json")


@pytest.mark.parametrize("changes, field", [
    ({"attention_levels": (True,)}, "attention_levels"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"channels": ()}, "channels"),
    ({"sample_size": 0}, "sample_size"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as info:
        VQModelConfig(**{"norm_num_groups": 4, "channels": (8, 16)} | changes)
    assert info.value.where == field


# ---- folders, both directions ---------------------------------------------------------------------
@torch.no_grad()
def test_folders_load_both_ways(tmp_path):
    ours, theirs = make_pair(VQ_F16, seed=5)
    x = image(16, batch=1)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_ours = VQModel.from_pretrained(tmp_path / "theirs")
    assert_same_state(loaded_ours, theirs)
    assert_parity(loaded_ours(x), theirs(x).sample)
    ours.save_pretrained(tmp_path / "ours")
    loaded_theirs = DiffusersVQModel.from_pretrained(tmp_path / "ours")
    assert VQModel.from_file_config(dict(loaded_theirs.config)) == ours.config
    assert_same_state(ours, loaded_theirs)
    assert_parity(ours(x), loaded_theirs(x).sample)


def test_folder_with_an_unknown_config_key_is_refused(tmp_path):
    VQModel(VQModelConfig(channels=(8,), norm_num_groups=4, num_vq_embeddings=4)).save_pretrained(tmp_path / "vq")
    path = tmp_path / "vq" / "config.json"
    path.write_text(path.read_text().replace('"act_fn"', '"use_quant_conv": false, "act_fn"'))
    with pytest.raises(ConfigError, match="use_quant_conv") as info:
        VQModel.from_pretrained(tmp_path / "vq")
    assert info.value.where == str(path)


# ---- errors and smaller behaviour ------------------------------------------------------------------
def test_bad_inputs_are_refused_before_the_networks_run():
    model = VQModel(VQModelConfig(channels=(8, 16), norm_num_groups=4, num_vq_embeddings=8))
    calls = []
    for module in (model.encoder.conv_in, model.decoder.conv_in):
        module.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(InputError, match="H=9, W=8"):
        model.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(InputError, match="wrong shape"):
        model.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(InputError, match="wrong shape"):
        model.quantize(torch.zeros(1, 2, 2, 2))
    with pytest.raises(InputError, match="integers"):
        model.quantize.get_codebook_entry(torch.zeros(1, 2, 2))
    with pytest.raises(InputError, match="shape"):
        model.quantize.get_codebook_entry(torch.zeros(8, dtype=torch.long), (1, 2, 2, 5))
    assert not calls


def test_half_precision_picks_the_codes_of_fp32():
    """Distances are compared in fp32, so half-precision latents pick the same codes as their fp32 values."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(1024, 3)
    with torch.no_grad():  # codes and latents away from 0: |e|^2 and z.e large, their differences small
        quantizer.embedding.weight.normal_().add_(4.0)
        quantizer.embedding.weight.copy_(quantizer.embedding.weight.half())  # the same codes in both precisions
    z = (torch.randn(2, 3, 16, 16) + 4.0).half()
    _, _, expected = quantizer(z.float())
    z_q, _, indices = quantizer.half()(z)
    assert z_q.dtype == torch.float16 and torch.equal(indices, expected)


def test_defaults_are_ldm_vq_f4():
    """VQModelConfig() is the first stage of the paper's LDM-4 models, read from the original YAML."""
    from latentdiff.convert.original_config import original_config_to_configs

    configs = original_config_to_configs("celebahq-ldm-vq-4")
    assert VQModel.from_file_config(configs["vqvae"]) == VQModelConfig()


def test_registry_creates_it(monkeypatch):
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("latentdiff.models.vq",))
    monkeypatch.setattr(registry, "_loaded", False)
    config = VQModelConfig(channels=(8, 16), norm_num_groups=4, num_vq_embeddings=8)
    model = registry.COMPONENTS.create("vq_model", config)
    assert isinstance(model, VQModel) and model.config == config and model.downsample_factor == 2


def test_vq_folder_with_pre_0_14_attention_names_loads(tmp_path):
    """Folders saved by old diffusers (e.g. CompVis/ldm-celebahq-256's vqvae/) name the mid-block attention
    query/key/value/proj_attn; diffusers renames them on load, and so do we."""
    import diffusers

    from latentdiff import hub
    from latentdiff.models.base import DEPRECATED_ATTENTION_NAMES
    from latentdiff.models.vq import VQModel

    torch.manual_seed(0)
    ref = diffusers.VQModel(block_out_channels=(8, 16), norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    ref.save_pretrained(tmp_path / "vq")
    weights = tmp_path / "vq" / "diffusion_pytorch_model.safetensors"
    state = hub.load_safetensors(weights)
    to_old = {new: old for old, new in DEPRECATED_ATTENTION_NAMES.items()}
    renamed = {}
    for key, value in state.items():
        for new, old in to_old.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    hub.save_safetensors(renamed, weights)
    ours = VQModel.from_pretrained(tmp_path / "vq")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x).sample, atol=1e-5)
