"""ClassEmbedder and SpatialRescaler against direct computations with the same weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.errors import ConfigError, InputError
from latentdiff.models.conditioners import ClassEmbedder, ClassEmbedderConfig, SpatialRescaler, SpatialRescalerConfig


def test_class_embedder_is_a_table_lookup_as_one_token():
    torch.manual_seed(0)
    model = ClassEmbedder(ClassEmbedderConfig(num_classes=11, embed_dim=8, null_class=10))
    labels = torch.tensor([3, 10, 0])
    out = model(labels)
    assert out.shape == (3, 1, 8)
    assert torch.equal(out[:, 0], model.embedding.weight[labels])
    model.check_labels(labels)
    with pytest.raises(InputError, match="class id out of range.*found: 11"):
        model.check_labels(torch.tensor([1, 11]))
    with pytest.raises(InputError, match="integer"):
        model.check_labels(torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="null_class"):
        ClassEmbedderConfig(num_classes=4, null_class=4)


def test_spatial_rescaler_matches_interpolate_and_conv(tmp_path):
    torch.manual_seed(0)
    cfg = SpatialRescalerConfig(n_stages=2, method="bilinear", multiplier=0.5, in_channels=5, out_channels=3)
    model = SpatialRescaler(cfg)
    x = torch.randn(2, 5, 32, 32)
    ref = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    ref = F.conv2d(ref, model.channel_mapper.weight)
    assert torch.allclose(model(x), ref, atol=1e-6) and model(x).shape == (2, 3, 8, 8)
    model.save_pretrained(tmp_path / "r")
    again = SpatialRescaler.from_pretrained(tmp_path / "r")
    assert again.config == cfg and torch.equal(again(x), model(x))
    plain = SpatialRescaler(SpatialRescalerConfig(n_stages=1, in_channels=2, method="nearest"))
    assert torch.equal(plain(x[:, :2]), F.interpolate(x[:, :2], scale_factor=0.5, mode="nearest"))
