"""UnconditionalPipeline: parity with diffusers' LDMPipeline on tiny random weights (VQ and KL first stages, fixed
latents, DDIM with and without eta), folders both ways, the identity first stage (pixel space) against a manual
loop, single files both ways, and bad input refused before any UNet call."""
from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch

from latentdiff import ConfigError, DDPMSampler, InputError
from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig
from latentdiff.models.unet2d import UNet2D
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.unconditional import UnconditionalPipeline
from tests._support.ldm import (
    STEPS,
    ldm_scheduler,
    manual_ddim,
    no_unet_calls,
    noise,
    ours,
    schedule,
    seeded,
    tiny_unet2d,
    tiny_vq,
)
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """diffusers LDMPipelines (VQ and KL first stages) saved by diffusers, and latentdiff's loads of their folders."""
    root = tmp_path_factory.mktemp("uncond")
    unet = tiny_unet2d()
    kl = seeded(lambda: diffusers.AutoencoderKL(
        block_out_channels=(32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, sample_size=16, scaling_factor=0.5), 3)
    refs, pipes = {}, {}
    for name, first_stage in (("vq", tiny_vq(scaling_factor=0.7)), ("kl", kl)):
        refs[name] = diffusers.LDMPipeline(vqvae=first_stage, unet=unet, scheduler=ldm_scheduler())
        refs[name].set_progress_bar_config(disable=True)
        refs[name].save_pretrained(root / name)
        pipes[name] = Pipeline.from_pretrained(root / name)
    return refs, pipes, root


@pytest.mark.parametrize("first_stage", ["vq", "kl"])
def test_parity_with_diffusers(setup, first_stage):
    refs, pipes, _ = setup
    pipe = pipes[first_stage]
    assert type(pipe) is UnconditionalPipeline and pipe.vae_scale_factor == 2
    with torch.no_grad():
        expected = refs[first_stage](batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np",
                                     num_inference_steps=STEPS).images
    ours_np = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np",
                   num_inference_steps=STEPS, progress=False).images
    assert ours_np.shape == expected.shape == (2, 16, 16, 3)
    assert_parity(torch.from_numpy(ours_np), torch.from_numpy(expected))
    fixed = pipe(batch_size=2, latents=noise((2, 3, 8, 8)), output_type="np", num_inference_steps=STEPS,
                 progress=False).images  # the generator's draw, given as latents
    assert_parity(torch.from_numpy(fixed), torch.from_numpy(expected))


def test_parity_with_diffusers_eta(setup):
    """DDIM eta > 0: diffusers draws x_T and the step noise from the global RNG; so does latentdiff without a
    generator, in the same order."""
    refs, pipes, _ = setup
    torch.manual_seed(5)
    with torch.no_grad():
        expected = refs["vq"](eta=0.8, output_type="np", num_inference_steps=STEPS).images
    torch.manual_seed(5)
    ours_np = pipes["vq"](eta=0.8, output_type="np", num_inference_steps=STEPS, progress=False).images
    assert_parity(torch.from_numpy(ours_np), torch.from_numpy(expected))


def test_saved_folder_loads_in_diffusers(setup, tmp_path):
    _, pipes, _ = setup
    pipes["vq"].save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "VQModel"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    back = diffusers.LDMPipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = back(generator=torch.Generator().manual_seed(3), output_type="np", num_inference_steps=STEPS).images
    ours_np = pipes["vq"](generator=torch.Generator().manual_seed(3), output_type="np", num_inference_steps=STEPS,
                          progress=False).images
    assert_parity(torch.from_numpy(ours_np), torch.from_numpy(expected))


def test_vq_config_without_scaling_factor_decodes_unscaled(setup, tmp_path):
    """The released LDM VQ configs predate `scaling_factor` (diffusers #6725): such a first stage gets LDM's 1.0,
    i.e. diffusers' LDMPipeline with the VQModel's scaling_factor set to 1."""
    refs, _, root = setup
    folder = shutil.copytree(root / "vq", tmp_path / "old")
    config = json.loads((folder / "vqvae" / "config.json").read_text())
    (folder / "vqvae" / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                              if k != "scaling_factor"}))
    pipe = UnconditionalPipeline.from_pretrained(folder)
    assert pipe.vae.config.scaling_factor == 1.0
    vq = diffusers.VQModel.from_config({**refs["vq"].vqvae.config, "scaling_factor": 1.0})
    vq.load_state_dict(refs["vq"].vqvae.state_dict())
    ref = diffusers.LDMPipeline(vqvae=vq, unet=refs["vq"].unet, scheduler=refs["vq"].scheduler)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = ref(generator=torch.Generator().manual_seed(1), output_type="np", num_inference_steps=2).images
    ours_np = pipe(generator=torch.Generator().manual_seed(1), output_type="np", num_inference_steps=2,
                   progress=False).images
    assert_parity(torch.from_numpy(ours_np), torch.from_numpy(expected))


def test_identity_first_stage_is_pixel_space_diffusion(tmp_path):
    """LDM-1: the sample is the image. Against diffusers' UNet and DDIMScheduler stepping by hand; the folder holds
    ["latentdiff", "IdentityFirstStage"] and a config-only vqvae/, and loads back as it was."""
    unet = tiny_unet2d(sample_size=16)
    noise_scheduler, sampler = schedule(ldm_scheduler(), tmp_path / "scheduler")
    pipe = UnconditionalPipeline(vae=IdentityFirstStage(IdentityFirstStageConfig(channels=3)),
                                 unet=ours(unet, UNet2D, tmp_path / "unet"), noise_scheduler=noise_scheduler,
                                 sampler=sampler)
    x_T = noise((1, 3, 16, 16), seed=4)
    expected = (manual_ddim(lambda x, t: unet(x, t).sample, x_T, ldm_scheduler()) / 2 + 0.5).clamp(0, 1)
    assert_parity(pipe(latents=x_T, output_type="pt", num_inference_steps=STEPS, progress=False).images, expected)
    pipe.save_pretrained(tmp_path / "pixels")
    index = json.loads((tmp_path / "pixels" / "model_index.json").read_text())
    assert index["vqvae"] == ["latentdiff", "IdentityFirstStage"]
    assert sorted(p.name for p in (tmp_path / "pixels" / "vqvae").iterdir()) == ["config.json"]
    back = Pipeline.from_pretrained(tmp_path / "pixels")
    assert isinstance(back.vae, IdentityFirstStage) and back.sampler == pipe.sampler
    assert torch.equal(back(latents=x_T, output_type="pt", num_inference_steps=2, progress=False).images,
                       pipe(latents=x_T, output_type="pt", num_inference_steps=2, progress=False).images)


def test_text_to_image_takes_every_first_stage(tmp_path):
    """The first-stage table is shared: an LDMTextToImagePipeline folder with a VQ first stage (f = 8, which that
    pipeline assumes) gives diffusers' images and saves back as VQModel; an identity first stage (pixel-space
    text-to-image) saves and loads."""
    from latentdiff import LatentDiffusionPipeline
    from tests._support.sd import tiny_ldm_text2im_pipeline

    parts = tiny_ldm_text2im_pipeline(tmp_path / "parts")
    ref = diffusers.LDMTextToImagePipeline(vqvae=tiny_vq(4, latent_channels=4, scaling_factor=0.5), bert=parts.bert,
                                           tokenizer=parts.tokenizer, unet=parts.unet, scheduler=parts.scheduler)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "vq")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "vq")
    run = dict(guidance_scale=3.0, latents=noise((1, 4, 8, 8)), num_inference_steps=2, output_type="np")
    with torch.no_grad():
        expected = ref("a red cat", **run).images
    assert_parity(torch.from_numpy(pipe("a red cat", progress=False, **run).images), torch.from_numpy(expected))
    pipe.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "model_index.json").read_text())["vqvae"] == ["diffusers", "VQModel"]
    pixels = LatentDiffusionPipeline(vae=IdentityFirstStage(IdentityFirstStageConfig(channels=4)), unet=pipe.unet,
                                     text_encoder=pipe.text_encoder, noise_scheduler=pipe.noise_scheduler)
    pixels.save_pretrained(tmp_path / "pixels")
    back = Pipeline.from_pretrained(tmp_path / "pixels")
    assert isinstance(back.vae, IdentityFirstStage) and back.vae_scale_factor == 1
    run = dict(run, output_type="latent", progress=False)
    assert torch.equal(back("a red cat", **run).images, pixels("a red cat", **run).images)


def test_single_file_both_ways(setup, tmp_path):
    _, pipes, _ = setup
    pipe = pipes["vq"]
    pipe.save_single_file(tmp_path / "ldm.safetensors")
    back = Pipeline.from_single_file(tmp_path / "ldm.safetensors")
    assert type(back) is UnconditionalPipeline and back.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    run = dict(latents=noise((1, 3, 8, 8)), output_type="pt", num_inference_steps=2, progress=False)
    assert_parity(back(**run).images, pipe(**run).images)


def test_options_pass_through_and_parts_that_do_not_fit(setup):
    _, pipes, root = setup
    sampler = DDPMSampler()
    pipe = UnconditionalPipeline.from_pretrained(root / "vq", sampler=sampler, torch_dtype=torch.float64)
    assert pipe.sampler is sampler and pipe.unet.dtype == pipe.vae.dtype == torch.float64
    with pytest.raises(TypeError, match="bogus"):
        UnconditionalPipeline.from_pretrained(root / "vq", bogus=1)
    with pytest.raises(ConfigError, match="in_channels"):
        UnconditionalPipeline(vae=pipe.vae, unet=UNet2D(pipe.unet.config.replace(in_channels=6)))
    labelled = UNet2D(pipe.unet.config.replace(num_class_embeds=4))
    with pytest.raises(ConfigError, match="class_labels"):
        UnconditionalPipeline(vae=pipe.vae, unet=labelled)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(height=15), "height"),
    (dict(width=0), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
    (dict(batch_size=2, latents=torch.zeros(1, 3, 8, 8)), "latents"),
    (dict(generator=[torch.Generator()] * 3), "generator"),
])
def test_bad_input_is_refused_before_any_unet_call(setup, kwargs, match):
    _, pipes, _ = setup
    pipe = pipes["vq"]
    with no_unet_calls(pipe), pytest.raises(InputError, match=match) as info:
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", 2), progress=False, **kwargs)
    assert match in info.value.where


def test_eta_needs_a_sampler_that_has_one(setup):
    _, pipes, root = setup
    pipe = UnconditionalPipeline.from_pretrained(root / "vq", sampler=DDPMSampler())
    with no_unet_calls(pipe), pytest.raises(InputError, match="eta"):
        pipe(eta=0.5, num_inference_steps=2, progress=False)
