"""Every registered part builds from a tiny config, runs, saves and loads back to the same outputs.

A part registered without an entry here fails `test_every_registered_part_is_covered`, so new parts
cannot skip these checks.
"""
from __future__ import annotations

import pytest
import torch

from latentdiff.registry import COMPONENTS, PIPELINES, SAMPLERS
from tests._support.parity import assert_parity
from tests._support.tiny import tiny_kl_config
from tests._support.tiny_clip import make_tiny_clip


def _unet():
    from latentdiff.models.unet import UNetConfig

    cfg = UNetConfig(channels=(8, 16), attention_levels=(False, True), attention_heads=2, cross_attention_dim=12,
                     norm_num_groups=4, sample_size=8)
    model = COMPONENTS.create("unet", cfg)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 12))
    return model, lambda m: m(*inputs)


def _vae():
    model = COMPONENTS.create("autoencoder_kl", tiny_kl_config())
    x = torch.randn(1, 3, 8, 8)
    return model, lambda m: m.decode(m.encode(x).mode())


def _ldm_bert():
    from latentdiff.models.ldm_bert import LDMBertConfig

    cfg = LDMBertConfig(vocab_size=50, d_model=16, encoder_layers=1, encoder_ffn_dim=32, encoder_attention_heads=2,
                        head_dim=8, max_position_embeddings=77)
    model = COMPONENTS.create("ldm_bert", cfg)
    ids = torch.randint(0, 50, (1, 77), generator=torch.Generator().manual_seed(0))
    return model, lambda m: m(ids)


def _unet2d():
    from latentdiff.models.unet2d import UNet2DConfig

    cfg = UNet2DConfig(in_channels=6, channels=(8, 16), attention_levels=(False, True), attention_head_dim=8,
                       norm_num_groups=4, num_class_embeds=3, sample_size=8)
    model = COMPONENTS.create("unet2d", cfg)
    x, t, labels = torch.randn(1, 6, 8, 8), torch.tensor([10]), torch.tensor([2])
    return model, lambda m: m(x, t, class_labels=labels)


def _vq_model():
    from latentdiff.models.vq import VQModelConfig

    cfg = VQModelConfig(channels=(8, 16), attention_levels=(False, True), norm_num_groups=4, num_vq_embeddings=16,
                        vq_embed_dim=4)
    model = COMPONENTS.create("vq_model", cfg)
    x = torch.randn(1, 3, 8, 8)
    return model, lambda m: m(x)


def _autoencoder_tiny():
    from latentdiff.models.autoencoder_tiny import AutoencoderTinyConfig

    cfg = AutoencoderTinyConfig(latent_channels=4, encoder_channels=(8, 8), decoder_channels=(8, 8),
                                encoder_blocks=(1, 1), decoder_blocks=(1, 1))
    model = COMPONENTS.create("autoencoder_tiny", cfg)
    x = torch.randn(1, 3, 8, 8)
    return model, lambda m: m.decode_latents(m.encode_latents(x))


def _identity_first_stage():
    model = COMPONENTS.create("identity_first_stage")  # no weights: the test checks its config-only folder
    x = torch.randn(1, 3, 8, 8)
    return model, lambda m: m.decode_latents(m.encode_latents(x))


def _class_embedder():
    from latentdiff.models.conditioners import ClassEmbedderConfig

    model = COMPONENTS.create("class_embedder", ClassEmbedderConfig(num_classes=5, embed_dim=4))
    return model, lambda m: m(torch.tensor([0, 4]))


def _spatial_rescaler():
    from latentdiff.models.conditioners import SpatialRescalerConfig

    model = COMPONENTS.create("spatial_rescaler", SpatialRescalerConfig(in_channels=3, out_channels=2))
    x = torch.randn(1, 3, 8, 8)
    return model, lambda m: m(x)


def _controlnet():
    from latentdiff.models.controlnet import ControlNetConfig

    cfg = ControlNetConfig(channels=(8, 16), attention_levels=(False, True), attention_heads=2, cross_attention_dim=12,
                           norm_num_groups=4, conditioning_embedding_out_channels=(4, 8))
    model = COMPONENTS.create("controlnet", cfg)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 12), torch.rand(1, 3, 16, 16))

    def run(m):   # every residual, one tensor
        down, mid = m(*inputs)
        return torch.cat([r.flatten() for r in (*down, mid)])
    return model, run


def _t2i_adapter():
    from latentdiff.models.t2i_adapter import T2IAdapterConfig

    model = COMPONENTS.create("t2i_adapter", T2IAdapterConfig(channels=(8, 16), num_res_blocks=1))
    hint = torch.rand(1, 3, 16, 16)
    return model, lambda m: torch.cat([f.flatten() for f in m(hint).intrablock])


FACTORIES = {"unet": _unet, "controlnet": _controlnet, "t2i_adapter": _t2i_adapter, "unet2d": _unet2d,
             "class_embedder": _class_embedder,
             "spatial_rescaler": _spatial_rescaler, "vq_model": _vq_model,
             "identity_first_stage": _identity_first_stage, "autoencoder_kl": _vae, "ldm_bert": _ldm_bert,
             "autoencoder_tiny": _autoencoder_tiny}
# Parts that wrap a foreign model + tokenizer, or hold no weights, are covered by their own test files:
ELSEWHERE = {
    "text_encoder": "tests/models/test_text_encoder.py (needs a transformers model and tokenizer)",
    "ldm_bert_text_encoder": "tests/models/test_ldm_bert.py (needs a tokenizer)",
    "noise_scheduler": "tests/diffusion/test_noise_scheduler.py (no weights; save/load round trip there)",
}


def test_every_registered_part_is_covered():
    assert set(COMPONENTS.names()) == set(FACTORIES) | set(ELSEWHERE)
    assert set(SAMPLERS.names()) >= {"ddim", "ddpm"}
    assert "text-to-image" in PIPELINES.names()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_component_builds_runs_saves_loads(name, tmp_path):
    torch.manual_seed(0)
    model, run = FACTORIES[name]()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer may hide a save/load error
            p.add_(torch.randn_like(p) * 0.01)
        before = run(model.eval())
    assert torch.isfinite(before).all()
    model.save_pretrained(tmp_path / name)
    loaded = type(model).from_pretrained(tmp_path / name)
    assert loaded.config == model.config
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():  # same weights; kernels may pick another path for another memory alignment
        assert_parity(run(loaded), before, tol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS.names()))
def test_sampler_from_registry(name):
    from latentdiff import NoiseScheduler

    sampler = SAMPLERS.create(name)
    ts = sampler.timesteps(NoiseScheduler(), 10)
    assert len(ts) == 10 and bool((ts[:-1] > ts[1:]).all())
    with pytest.raises(TypeError):
        SAMPLERS.get(name)(bogus_option=1)


def test_text_encoder_in_registry(tmp_path):
    from latentdiff import TextEncoder

    text_dir, tok_dir = make_tiny_clip(tmp_path)
    assert COMPONENTS.get("text_encoder") is TextEncoder
    enc = TextEncoder.from_pretrained(tmp_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    assert enc(["a photo of a cat"]).shape == (1, 77, 32)
