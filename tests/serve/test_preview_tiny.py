"""The server's live preview through a tiny autoencoder (`latentdiff serve --preview-vae`): the x0 prediction
decoded by it (compared with a direct decode), the linear map where its latent space does not fit the model, and
the flag checked at start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.cli.serve import preview_vae
from latentdiff.errors import UsageError
from latentdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from latentdiff.pipelines.previews import decode_preview
from latentdiff.serve.models import ModelCatalog
from latentdiff.serve.preview import LatentPreview, TinyDecoderPreview
from latentdiff.serve.settings import ServeSettings
from tests._support.tiny_builtin import make_tiny_shapes_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(folder, latent_channels):
    torch.manual_seed(0)
    return AutoencoderTiny(AutoencoderTinyConfig(latent_channels=latent_channels, encoder_channels=(8, 8, 8),
                                                 decoder_channels=(8, 8, 8), encoder_blocks=(1, 1, 1),
                                                 decoder_blocks=(1, 1, 1))).save_pretrained(folder)


def test_catalog_previews_with_the_tiny_autoencoder_that_fits(tmp_path):
    model = make_tiny_shapes_model(tmp_path / "models" / "tiny-model")
    fits, other = _tiny(tmp_path / "taesd", 4), _tiny(tmp_path / "taesd16", 16)
    catalog = ModelCatalog(ServeSettings(model=str(model), preview_vae=str(fits)))
    preview = catalog.preview(catalog.current)
    assert isinstance(preview, TinyDecoderPreview)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = decode_preview(AutoencoderTiny.from_pretrained(fits), z[:1])[0]
    assert np.array_equal(np.asarray(preview.image(z)), np.asarray(expected))
    assert isinstance(ModelCatalog(ServeSettings(model=str(model), preview_vae=str(other))).preview(catalog.current),
                      LatentPreview)
    assert isinstance(ModelCatalog(ServeSettings(model=str(model))).preview(catalog.current), LatentPreview)


def test_preview_vae_flag_is_checked(tmp_path):
    assert preview_vae(None) is None
    assert preview_vae(str(_tiny(tmp_path / "t", 4))) == str((tmp_path / "t").resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="tiny autoencoder"):
        preview_vae(str(tmp_path / "empty"))
