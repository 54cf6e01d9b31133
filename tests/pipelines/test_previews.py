"""Step previews with a tiny autoencoder (pipelines.previews): they never change the sample, come every N steps,
and the last one of diffusers' form is the decode of the final latents (computed here independently)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff.errors import InputError
from latentdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from latentdiff.pipelines.base import to_output
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.pipelines.previews import TinyPreview, decode_preview

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                                                 encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))).eval()


def _call(pipe, **kw):
    return pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kw).images


def test_previews_every_n_steps_leave_the_sample_alone(pipe, tiny):
    plain = _call(pipe)
    seen = []
    preview = TinyPreview(tiny, every=2, on_preview=lambda i, images: seen.append((i, [im.size for im in images])))
    assert torch.equal(_call(pipe, callback=preview), plain)
    assert seen == [(1, [(64, 64)]), (3, [(64, 64)])]
    assert preview.step == 3 and len(preview.images) == 1


def test_on_step_end_form_previews_the_latents_after_the_step(pipe, tiny):
    preview = TinyPreview(tiny, every=1)
    final = _call(pipe, callback_on_step_end=preview.on_step_end)
    with torch.no_grad():
        expected = to_output(tiny.decode(final / tiny.config.scaling_factor), "pil")[0]
    assert preview.step == 3
    assert np.array_equal(np.asarray(preview.images[0]), np.asarray(expected))
    assert np.array_equal(np.asarray(decode_preview(tiny, final)[0]), np.asarray(expected))


def test_bad_arguments(tiny):
    with pytest.raises(InputError, match="every"):
        TinyPreview(tiny, every=0)
    with pytest.raises(InputError, match="decode_latents"):
        TinyPreview(object())
