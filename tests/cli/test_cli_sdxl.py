"""`latentdiff generate` with SDXL models (cli/generate_sdxl.py, issue 18) on tiny SDXL folders: the command's
images are the Python API's for the same settings and seed, pixel for pixel (defaults, clip skip in A1111's
numbering, micro-conditioning, the refiner hand-off, img2img, inpainting, the hires fix); the family's flags are
refused on the other family before anything loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.pipelines.images import image_to_tensor
from latentdiff.pipelines.sdxl import StableDiffusionXLPipeline
from latentdiff.pipelines.sdxl_image import StableDiffusionXLImg2ImgPipeline
from latentdiff.utils.images import read_png_params
from tests._support.cli import pixels
from tests._support.sdxl_native import write_tiny_sdxl
from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

PROMPT = "a red church at dusk"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return write_tiny_sdxl(root / "base"), write_tiny_sdxl(root / "refiner", kind="refiner", seed=5)


@pytest.fixture(scope="module")
def base(folders):
    return StableDiffusionXLPipeline.from_pretrained(folders[0])


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


def api(images) -> np.ndarray:
    return np.asarray(images[0].convert("RGB"))


def generators(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


def test_generate_is_the_python_call_with_the_models_defaults(folders, base):
    assert main(["generate", PROMPT, "--model", str(folders[0]), "-o", "a.png", "--seed", "3", "--steps", "3",
                 "--negative", "blurry"]) == 0
    steps, guidance = base.default_call(3, None)
    height, width = base.image_size(None, None)
    expected = base([PROMPT], negative_prompt="blurry", height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance, generator=generators(3), progress=False).images
    assert np.array_equal(pixels("a.png"), api(expected))
    params = read_png_params("a.png")
    assert (params["guidance"], params["height"], params["width"]) == (guidance, height, width)


def test_clip_skip_counts_as_a1111_and_micro_conditioning_flags(folders, base):
    argv = ["generate", PROMPT, "--model", str(folders[0]), "--seed", "1", "--steps", "2"]
    assert main([*argv, "-o", "plain.png"]) == 0
    assert main([*argv, "-o", "two.png", "--clip-skip", "2"]) == 0      # SDXL's own penultimate layer
    assert np.array_equal(pixels("plain.png"), pixels("two.png"))
    assert main([*argv, "-o", "b.png", "--clip-skip", "3", "--original-size", "64x48", "--target-size", "32x16",
                 "--crop-top-left", "4,2"]) == 0
    expected = base([PROMPT], num_inference_steps=2, generator=generators(1), progress=False, clip_skip=1,
                    original_size=(48, 64), target_size=(16, 32), crops_coords_top_left=(4, 2)).images
    assert np.array_equal(pixels("b.png"), api(expected))
    assert not np.array_equal(pixels("b.png"), pixels("plain.png"))
    params = read_png_params("b.png")
    assert (params["clip_skip"], params["original_size"], params["crop_top_left"]) == (3, "64x48", "4,2")


def test_the_refiner_takes_over_the_base_latents_and_from_reproduces(folders, base):
    assert main(["generate", PROMPT, "--model", str(folders[0]), "--refiner", str(folders[1]), "--refiner-switch",
                 "0.5", "--steps", "4", "--seed", "7", "-o", "r.png"]) == 0
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1])
    gens = generators(7)
    common = dict(num_inference_steps=4, generator=gens, progress=False)
    latents = base([PROMPT], denoising_end=0.5, output_type="latent", **common).images
    expected = refiner([PROMPT], image=latents, denoising_start=0.5, **common).images
    assert np.array_equal(pixels("r.png"), api(expected))
    params = read_png_params("r.png")
    assert params["refiner_switch"] == 0.5 and params["refiner"] == str(folders[1].resolve())
    with Image.open("r.png") as image:
        assert "Refiner switch at: 0.5" in image.info["parameters"]
    assert main(["generate", "--from", "r.png", "-o", "again.png"]) == 0
    assert np.array_equal(pixels("again.png"), pixels("r.png"))


def test_an_sdxl_single_file_gives_the_folders_images(folders, base, tmp_path):
    base.save_single_file(tmp_path / "xl.safetensors")
    argv = ["generate", PROMPT, "--seed", "2", "--steps", "2"]
    assert main([*argv, "--model", str(folders[0]), "-o", "folder.png"]) == 0
    assert main([*argv, "--model", str(tmp_path / "xl.safetensors"), "--tokenizer", str(folders[0] / "tokenizer"),
                 "--tokenizer-2", str(folders[0] / "tokenizer_2"), "-o", "file.png"]) == 0
    assert np.array_equal(pixels("file.png"), pixels("folder.png"))
    assert read_png_params("file.png")["tokenizer_2"] == str((folders[0] / "tokenizer_2").resolve())


def test_img2img_runs_the_sdxl_image_to_image_pipeline(folders, base):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save("init.png")
    assert main(["generate", PROMPT, "--model", str(folders[0]), "--init-image", "init.png", "--strength", "0.5",
                 "--steps", "4", "--seed", "2", "-o", "i.png"]) == 0
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    with Image.open("init.png") as init:
        image = image_to_tensor(init.convert("RGB"), channels=3, factor=base.vae_scale_factor, size=(32, 32))
    expected = img2img([PROMPT], image=image, strength=0.5, num_inference_steps=4, generator=generators(2),
                       progress=False).images
    assert np.array_equal(pixels("i.png"), api(expected))


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_a_mask_runs_the_sdxl_inpainting_pipeline(folders, kind, tmp_path_factory):
    from latentdiff.pipelines.sdxl_inpaint import StableDiffusionXLInpaintPipeline

    model = folders[0] if kind == "base" else write_tiny_sdxl(tmp_path_factory.mktemp("inpaint") / "m", kind=kind)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save("init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 8:28] = 255
    Image.fromarray(mask).save("mask.png")
    assert main(["generate", PROMPT, "--model", str(model), "--init-image", "init.png", "--mask", "mask.png",
                 "--steps", "3", "--seed", "4", "-o", "p.png"]) == 0
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(model)
    with Image.open("init.png") as init, Image.open("mask.png") as painted:
        expected = inpaint([PROMPT], image=init.convert("RGB"), mask_image=painted.convert("L"), height=32, width=32,
                           strength=0.75, num_inference_steps=3, guidance_scale=read_png_params("p.png")["guidance"],
                           generator=generators(4), progress=False).images
    assert np.array_equal(pixels("p.png"), api(expected))


@pytest.mark.parametrize("upscaler", ["latent", "image"])
def test_the_hires_fix_is_the_first_pass_upscaled_then_image_to_image(folders, base, upscaler):
    assert main(["generate", PROMPT, "--model", str(folders[0]), "--hires-scale", "1.5", "--hires-steps", "3",
                 "--hires-strength", "0.6", "--hires-upscaler", upscaler, "--steps", "2", "--seed", "5",
                 "-o", "h.png"]) == 0
    gens = generators(5)
    z = base([PROMPT], num_inference_steps=2, generator=gens, progress=False, output_type="latent").images
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    if upscaler == "latent":
        start = torch.nn.functional.interpolate(z, size=(24, 24), mode="bilinear", align_corners=False)
    else:
        start = [image.resize((48, 48), Image.Resampling.LANCZOS) for image in base.output(z, "pil").images]
    expected = img2img([PROMPT], image=start, strength=0.6, num_inference_steps=3, generator=gens,
                       progress=False).images
    assert pixels("h.png").shape == (48, 48, 3)
    assert np.array_equal(pixels("h.png"), api(expected))


@pytest.fixture
def sd_builtin(monkeypatch, tmp_path_factory):
    folder = make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64")
    use_as_builtin(monkeypatch, folder, "latentdiff/shapes-64")


def test_one_familys_flags_are_refused_on_the_other_before_loading(folders, sd_builtin, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    Image.new("RGB", (32, 32)).save("init.png")
    base, refiner = map(str, folders)
    cases = [
        (["x", "--refiner", refiner], ["--refiner is for SDXL models"]),                 # the built-in SD model
        (["x", "--original-size", "64x64"], ["--original-size is for SDXL models"]),
        (["x", "--model", base, "--hires-scale", "2", "--tile-size", "16"], ["--tile-size", "hires"]),
        (["x", "--model", base, "--init-image", "init.png", "--mask", "init.png", "--refiner", refiner],
         ["--mask cannot be combined with --refiner"]),
        (["x", "--model", base, "--refiner-switch", "0.5"], ["--refiner-switch needs --refiner"]),
        (["x", "--model", base, "--refiner", refiner, "--refiner-switch", "1.5"], ["refiner_switch", "between 0"]),
        (["x", "--model", base, "--original-size", "64"], ["--original-size", "WIDTHxHEIGHT"]),
        (["x", "--model", base, "--refiner", "no/such/refiner"], ["no such model folder", "--refiner"]),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusionXLPipeline, "from_pretrained", never)
        for argv, words in cases:
            assert main(["generate", *argv, "-o", "x.png"]) == 2, argv
            err = capsys.readouterr().err
            for word in words:
                assert word in err, (word, err)
    assert main(["generate", "x", "--model", refiner, "-o", "x.png"]) == 2    # a refiner needs an image
    assert "SDXL refiner" in capsys.readouterr().err
    painter = write_tiny_sdxl(Path("painter"), kind="inpaint")
    assert main(["generate", "x", "--model", str(painter), "-o", "x.png"]) == 2    # an inpainting model: a mask
    assert "SDXL inpainting model" in capsys.readouterr().err


def test_an_sd_turbo_folder_generates_with_turbo_defaults(tmp_path):
    """SD-Turbo's convention (ancestral Euler on trailing timesteps in its scheduler folder) on an SD-layout text
    pipeline: `generate` without --steps / --guidance runs 1 step without guidance, the Python call
    `pipe(..., **dict(zip(("num_inference_steps", "guidance_scale"), pipe.default_call(None, None))))`."""
    from latentdiff import EulerAncestralSampler, LatentDiffusionPipeline

    make_tiny_shapes_model(tmp_path / "src")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "src")
    pipe.sampler = EulerAncestralSampler(timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path / "turbo")
    turbo = LatentDiffusionPipeline.from_pretrained(tmp_path / "turbo")
    assert turbo.default_call(None, None) == (1, 0.0) and pipe.default_call(None, 3.0) == (1, 3.0)
    assert main(["generate", "a red circle", "--model", str(tmp_path / "turbo"), "-o", "t.png", "--seed", "2"]) == 0
    params = read_png_params("t.png")
    assert (params["steps"], params["guidance"]) == (1, 0.0)
    expected = turbo(["a red circle"], num_inference_steps=1, guidance_scale=0.0, generator=generators(2),
                     progress=False).images
    assert np.array_equal(pixels("t.png"), api(expected))
