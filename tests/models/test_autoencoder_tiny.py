"""AutoencoderTiny (TAESD): parity with diffusers' AutoencoderTiny on random weights, its folders both ways,
madebyollin's original files (an independent nn.Sequential of the published layout as the oracle), and its use
as a pipeline's first stage."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig, load_tiny_autoencoder
from tests._support.parity import assert_parity, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
             num_encoder_blocks=(1, 2, 2), num_decoder_blocks=(2, 2, 1), latent_channels=4)


def _pair(diffusers, tmp_path, **kw):
    torch.manual_seed(0)
    ref = randomize_(diffusers.AutoencoderTiny(**(SMALL | kw))).eval()
    ref.save_pretrained(tmp_path / "ref")
    return ref, AutoencoderTiny.from_pretrained(tmp_path / "ref").eval()


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_parity_with_diffusers_encode_and_decode(diffusers, tmp_path, latent_channels):
    ref, ours = _pair(diffusers, tmp_path, latent_channels=latent_channels)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    z = torch.randn(2, latent_channels, 4, 6, generator=g) * 3   # past the soft clamp's knee
    with torch.no_grad():
        assert_parity(ours.encode(x), ref.encode(x).latents)
        assert_parity(ours.decode(z), ref.decode(z).sample)
        assert_parity(ours(x), ref.decode(ref.encode(x).latents).sample)
        assert_parity(ours.latents_to_unit(z), ref.scale_latents(z))
        assert_parity(ours.unit_to_latents(z.sigmoid()), ref.unscale_latents(z.sigmoid()))


def test_folder_written_here_loads_in_diffusers(diffusers, tmp_path):
    ref, ours = _pair(diffusers, tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "ours").eval()
    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
    assert plain(back.config) == plain(ref.config)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(back.decode(z).sample, ref.decode(z).sample)


def test_default_config_is_taesd_and_diffusers_defaults(diffusers):
    import inspect

    from latentdiff.models.autoencoder_tiny import AUTOENCODER_TINY

    plain = {k: (list(v.default) if isinstance(v.default, tuple) else v.default)
             for k, v in inspect.signature(diffusers.AutoencoderTiny.__init__).parameters.items() if k != "self"}
    assert {k: v for k, v in AUTOENCODER_TINY.defaults.items() if k != "block_out_channels"} == plain
    assert AutoencoderTiny.from_file_config({}) == AutoencoderTinyConfig()
    assert AutoencoderTinyConfig().downsample_factor == 8


def test_unsupported_config_values_are_refused():
    with pytest.raises(ConfigError, match="act_fn"):
        AutoencoderTiny.from_file_config({"act_fn": "silu"})
    with pytest.raises(ConfigError, match="decoder_channels"):
        AutoencoderTinyConfig(decoder_channels=(64, 64), decoder_blocks=(3, 1))
    with pytest.raises(ConfigError, match="encoder_blocks"):
        AutoencoderTinyConfig(encoder_blocks=(1, 3))


# ---- madebyollin's original layout, written out from the published description as an independent oracle ------
class _Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def _original(latent_channels):
    def conv(a, b, **kw):
        return nn.Conv2d(a, b, 3, padding=1, **kw)

    def down():
        return [conv(64, 64, stride=2, bias=False), _Block(64), _Block(64), _Block(64)]

    def up():
        return [_Block(64), _Block(64), _Block(64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]

    encoder = nn.Sequential(conv(3, 64), _Block(64), *down(), *down(), *down(), conv(64, latent_channels))
    decoder = nn.Sequential(_Clamp(), conv(latent_channels, 64), nn.ReLU(), *up(), *up(), *up(), _Block(64),
                            conv(64, 3))
    for part in (encoder, decoder):
        randomize_(part)
    return encoder.eval(), decoder.eval()


@pytest.mark.parametrize(("prefix", "latent_channels", "suffix"),
                         [("taesd", 4, ".pth"), ("taef1", 16, ".safetensors")])
def test_original_files_load_and_round_trip(tmp_path, prefix, latent_channels, suffix):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    encoder, decoder = _original(latent_channels)
    paths = {}
    for name, part in (("encoder", encoder), ("decoder", decoder)):
        paths[name] = tmp_path / f"{prefix}_{name}{suffix}"
        state = {k: v.contiguous() for k, v in part.state_dict().items()}
        torch.save(state, paths[name]) if suffix == ".pth" else save_file(state, paths[name])
    ours = load_tiny_autoencoder(tmp_path).eval()
    assert ours.config.latent_channels == latent_channels
    x = torch.rand(1, 3, 16, 16)
    z = torch.randn(1, latent_channels, 2, 2) * 2
    with torch.no_grad():
        assert_parity(ours.encode(x * 2 - 1), encoder(x))          # TAESD: [0, 1] images
        assert_parity(ours.decode(z), decoder(z) * 2 - 1)
        written = ours.save_taesd_files(tmp_path / "out", prefix=prefix)
        for path, part in zip(written, (encoder, decoder), strict=True):
            saved = load_file(path)
            assert saved.keys() == part.state_dict().keys()
            assert all(torch.equal(saved[k], v) for k, v in part.state_dict().items())


def test_original_files_errors(tmp_path):
    torch.save({"weird": torch.zeros(1)}, tmp_path / "taesd_encoder.pth")
    torch.save({"1.weight": torch.zeros(1)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises(CheckpointError, match="TAESD"):
        load_tiny_autoencoder(tmp_path)
    (tmp_path / "taesd_decoder.pth").unlink()
    with pytest.raises(CheckpointError, match="exactly one"):
        load_tiny_autoencoder(tmp_path)


def test_first_stage_interface_and_checks():
    torch.manual_seed(0)
    ae = AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                                               encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1),
                                               scaling_factor=1.5, shift_factor=0.25)).eval()
    assert (ae.downsample_factor, ae.latent_channels, ae.image_channels) == (4, 4, 3)
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        z = ae.encode_latents(x, generator=torch.Generator(), sample=True)
        assert torch.allclose(z, (ae.encode(x) - 0.25) * 1.5)
        assert torch.allclose(ae.decode_latents(z), ae.decode(ae.encode(x)), atol=1e-6)
        ae.enable_slicing()
        assert torch.allclose(ae.decode_latents(z), ae.decode(ae.encode(x)), atol=1e-6)
    with pytest.raises(InputError):
        ae.encode(torch.zeros(1, 3, 6, 8))
    with pytest.raises(InputError):
        ae.decode(torch.zeros(1, 3, 2, 2))


def test_pipeline_decodes_with_the_tiny_autoencoder():
    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    torch.manual_seed(0)
    tiny = AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                                                 encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))).eval()
    fast = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64", vae=tiny)
    common = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    latents = fast("a red circle", output_type="latent", **common).images
    images = fast("a red circle", output_type="pt", **(common | {"generator": torch.Generator().manual_seed(0)}))
    with torch.no_grad():
        expected = (tiny.decode_latents(latents).clamp(-1, 1) + 1) / 2
    assert_parity(images.images, expected, tol=1e-5)
    assert pipe.vae.downsample_factor == fast.vae.downsample_factor


def test_img2img_encodes_with_the_tiny_autoencoder():
    from latentdiff.pipelines.image_to_image import ImageToImagePipeline

    torch.manual_seed(0)
    tiny = AutoencoderTiny(AutoencoderTinyConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                                                 encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))).eval()
    pipe = ImageToImagePipeline.from_pretrained("latentdiff/shapes-64", vae=tiny)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z0 = pipe.encode_image(image, batch_size=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(z0, tiny.encode_latents(image).expand(2, -1, -1, -1))
    out = pipe("a red circle", image=image, strength=0.5, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)



def test_builtin_tiny_autoencoder_fits_the_builtin_model():
    """The shipped latentdiff/shapes-64-tiny-vae: the built-in model's latent space, fp16 on disk and small, and
    its decode of the built-in autoencoder's latents of shapes images close to the full decode."""
    import numpy as np

    from latentdiff.builtin import builtin_path
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    tiny = AutoencoderTiny.from_pretrained("latentdiff/shapes-64-tiny-vae").eval()
    vae = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64").vae
    assert (tiny.latent_channels, tiny.downsample_factor) == (vae.latent_channels, vae.downsample_factor)
    weights = builtin_path("latentdiff/shapes-64-tiny-vae") / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 2 * 1024**2
    data = ShapesDataset(8, seed=123)
    x = torch.stack([torch.from_numpy(np.asarray(data[i][0], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for i in range(8)])
    with torch.no_grad():
        z = vae.encode_latents(x, sample=False)
        full, fast = vae.decode_latents(z).clamp(-1, 1), tiny.decode_latents(z).clamp(-1, 1)
    mse = ((full - fast) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 25.0
