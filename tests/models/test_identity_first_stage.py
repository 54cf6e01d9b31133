"""IdentityFirstStage: pixel-space diffusion (LDM-1) through the first-stage interface, and its weightless folder."""
from __future__ import annotations

import json

import pytest
import torch

from latentdiff import registry
from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig


def test_encode_and_decode_are_identities():
    model = IdentityFirstStage(IdentityFirstStageConfig(channels=4))
    assert model.downsample_factor == 1 and model.latent_channels == 4
    x = torch.randn(2, 4, 5, 7)
    for call in (model.encode, model.decode, model, model.encode_latents, model.decode_latents,
                 model.scale_latents, model.unscale_latents):
        assert call(x) is x
    assert model.encode_latents(x, generator=torch.Generator().manual_seed(0), sample=False) is x


def test_dtype_and_device_follow_to():
    model = IdentityFirstStage(IdentityFirstStageConfig())
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.half().dtype == torch.float16
    assert model.to(dtype=torch.bfloat16).dtype == torch.bfloat16
    assert list(model.parameters()) == [] and model.state_dict() == {}


def test_folder_is_a_config_alone_and_loads_back(tmp_path):
    model = IdentityFirstStage(IdentityFirstStageConfig(channels=1))
    model.save_pretrained(tmp_path / "first_stage", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "first_stage").iterdir()) == ["config.json"]
    data = json.loads((tmp_path / "first_stage" / "config.json").read_text())
    assert data["channels"] == 1 and data["_latentdiff_component"] == "identity_first_stage"
    loaded = IdentityFirstStage.from_pretrained(tmp_path / "first_stage", torch_dtype=torch.float16)
    assert loaded.config == model.config and loaded.dtype == torch.float16 and not loaded.training
    loaded = IdentityFirstStage.from_pretrained(tmp_path, subfolder="first_stage")
    assert loaded.config == model.config and loaded.dtype == torch.float32


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        IdentityFirstStage.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"channels": 3, "scaling_factor": 0.5}))
    with pytest.raises(ConfigError, match="scaling_factor") as info:
        IdentityFirstStage.from_pretrained(tmp_path)
    assert info.value.where == str(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        IdentityFirstStage.from_state_dict(IdentityFirstStageConfig(), {"weight": torch.zeros(1)})


def test_bad_config_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="channels"):
        IdentityFirstStageConfig(channels=0)
    model = IdentityFirstStage(IdentityFirstStageConfig(channels=3))
    with pytest.raises(InputError, match="wrong shape"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="wrong shape"):
        model.decode_latents(torch.zeros(3, 8, 8))


def test_registry_creates_it(monkeypatch):
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("latentdiff.models.identity",))
    monkeypatch.setattr(registry, "_loaded", False)
    model = registry.COMPONENTS.create("identity_first_stage")
    assert isinstance(model, IdentityFirstStage) and model.config == IdentityFirstStageConfig()


@torch.no_grad()
def test_pixel_space_diffusion_runs_through_the_text_to_image_pipeline(tmp_path):
    """LDM-1: the UNet denoises images; the pipeline's image is its final x_0, only mapped to [0, 1]."""
    from latentdiff import LatentDiffusionPipeline, TextEncoder
    from latentdiff.models.unet import UNet2DConditional, UNetConfig
    from tests._support.tiny_clip import make_tiny_clip

    make_tiny_clip(tmp_path)
    text_encoder = TextEncoder.from_pretrained(tmp_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditional(UNetConfig(in_channels=3, out_channels=3, channels=(8, 16), attention_levels=(False, True),
                                        attention_heads=2, cross_attention_dim=32, norm_num_groups=4, sample_size=8))
    pipe = LatentDiffusionPipeline(vae=IdentityFirstStage(IdentityFirstStageConfig()), unet=unet,
                                   text_encoder=text_encoder)
    run = dict(num_inference_steps=2, progress=False)
    x_0 = pipe("a cat", output_type="latent", generator=torch.Generator().manual_seed(0), **run).images
    images = pipe("a cat", output_type="pt", generator=torch.Generator().manual_seed(0), **run).images
    assert x_0.shape == images.shape == (1, 3, 8, 8)  # sample_size 8 at f = 1
    assert torch.equal(images, (x_0 / 2 + 0.5).clamp(0, 1))
