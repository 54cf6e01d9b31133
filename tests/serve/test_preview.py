"""LatentPreview: the fitted latent -> RGB map inverts a linear first stage exactly, shows the built-in model's
colours where they are, keeps the image's size and layout, reads half-precision latents, and is cheap."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from latentdiff.errors import InputError
from latentdiff.serve.preview import LatentPreview, synthetic_images

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearFirstStage(torch.nn.Module):
    """A first stage whose latent is a known affine map of the f x f patch mean: z = s (A pool(x) + c)."""

    downsample_factor = 4

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(4, 3, generator=g), requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)

    def encode_latents(self, x: torch.Tensor, *, sample: bool = True) -> torch.Tensor:
        assert not sample                                   # the posterior's mode, as the pipelines' encode
        pooled = torch.nn.functional.avg_pool2d(x, self.downsample_factor)
        return 0.18215 * (torch.einsum("ij,bjhw->bihw", self.A, pooled) + self.c.view(1, 4, 1, 1))


@pytest.fixture(scope="module")
def builtin_fit():
    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    vae = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64").vae
    return vae, LatentPreview.fit(vae)


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode_latents(images * 2 - 1, sample=False)


def solid(rgb: tuple[float, float, float], side: int = 64) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, side, side).contiguous()


def test_fit_inverts_a_linear_first_stage() -> None:
    stage = LinearFirstStage()
    preview = LatentPreview.fit(stage)
    held_out = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))   # not what it was fitted on
    rgb = preview.rgb(encode(stage, held_out))
    expected = torch.nn.functional.avg_pool2d(held_out, 4).permute(0, 2, 3, 1)
    assert rgb.shape == (3, 8, 12, 3)
    torch.testing.assert_close(rgb, expected, atol=1e-4, rtol=0)


def test_builtin_model_colours(builtin_fit) -> None:
    """Held-out solid colours of the built-in model's palette (the colours its autoencoder was trained on)."""
    from latentdiff.data.shapes import PALETTE

    vae, preview = builtin_fit
    colours = [tuple(v / 255 for v in c) for c in PALETTE.values()]
    errors = [(preview.rgb(encode(vae, solid(c))) - torch.tensor(c)).abs().mean().item() for c in colours]
    mean = torch.tensor(colours).mean(0)
    constant = [(mean - torch.tensor(c)).abs().mean().item() for c in colours]   # the best blind guess
    assert max(errors) < 0.25 and sum(errors) / len(errors) < 0.2, errors
    assert sum(errors) < 0.6 * sum(constant), (errors, constant)


def test_builtin_preview_keeps_the_layout(builtin_fit) -> None:
    from latentdiff.data.shapes import PALETTE

    vae, preview = builtin_fit
    image = torch.empty(1, 3, 64, 64)
    image[..., :32] = torch.tensor(PALETTE["red"]).view(1, 3, 1, 1) / 255
    image[..., 32:] = torch.tensor(PALETTE["blue"]).view(1, 3, 1, 1) / 255
    shown = np.asarray(preview.image(encode(vae, image))).astype(float)
    assert shown.shape == (64, 64, 3)
    left, right = shown[8:56, 4:24].mean((0, 1)), shown[8:56, 40:60].mean((0, 1))
    assert left[0] > right[0] + 100 and right[2] > left[2] + 40, (left, right)   # red left, blue right


def test_image_size_grid_and_errors() -> None:
    preview = LatentPreview.fit(LinearFirstStage())
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    first = preview.image(z)
    assert first.size == (48, 32) and first.mode == "RGB"
    pixels = np.asarray(first)
    assert (pixels[:4, :4] == pixels[0, 0]).all()          # nearest upsampling: one colour per latent pixel
    expected = (preview.rgb(z[:1])[0, 0, 0] * 255).round().to(torch.uint8).numpy()
    assert (pixels[0, 0] == expected).all()
    assert preview.image(z, grid=True).size == (2 * 48 + 2, 2 * 32 + 2)    # utils.images.make_grid, pad 2
    for bad in (torch.randn(1, 3, 8, 8), torch.randn(4, 8, 8), "latents"):
        with pytest.raises(InputError, match="wrong shape"):
            preview.image(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents(dtype: torch.dtype) -> None:
    preview = LatentPreview.fit(LinearFirstStage())
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = np.asarray(preview.image(z)).astype(int)
    reference = np.asarray(preview.image(z.float())).astype(int)   # the same values, upcast first
    assert (ours == reference).all()


def test_fit_in_half_precision_first_stage() -> None:
    stage = LinearFirstStage().to(torch.bfloat16)
    preview = LatentPreview.fit(stage)
    assert preview.weight.dtype == torch.float32
    held_out = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    rgb = preview.rgb(encode(stage, held_out.to(torch.bfloat16)))
    assert (rgb - torch.nn.functional.avg_pool2d(held_out, 4).permute(0, 2, 3, 1)).abs().max() < 0.05


def test_cheap_enough_for_every_step() -> None:
    preview = LatentPreview.fit(LinearFirstStage())
    z = torch.randn(1, 4, 16, 16)                          # a 64 x 64 image
    times = []
    for _ in range(20):
        start = time.perf_counter()
        preview.image(z)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.005


def test_synthetic_images_span_each_channel() -> None:
    images = synthetic_images(64)
    assert images.shape == (8, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    flat = images.permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.linalg.matrix_rank(torch.cat([flat, torch.ones(1, flat.shape[1])])) == 4
