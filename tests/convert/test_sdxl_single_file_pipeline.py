"""SDXL pipelines from original single files, without a YAML, against diffusers' pipelines from the diffusers folders
of the same weights (tests/_support/sdxl_file.py): the base (CFG, a negative prompt, micro-conditioning) and the
refiner (image-to-image from the base's latents, aesthetic score), fp32 max rel err <= 1e-4; `save_single_file`
back to the same file; `latentdiff convert` both ways."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff import (
    CheckpointError,
    InputError,
    Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from latentdiff.cli import main
from latentdiff.convert import to_single_file
from latentdiff.convert.checkpoints import convert_checkpoint
from tests._support.parity import assert_parity
from tests._support.sdxl_file import original_file, released_sdxl

warnings.filterwarnings("ignore", category=FutureWarning)
PROMPT, NEGATIVE = "a photo of a cat", "blurry, the dog"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kind -> (diffusers pipeline, its folder, its original single file (no metadata), the tokenizers' folder)."""
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for kind in ("base", "refiner"):
        pipe = released_sdxl(root / kind, kind=kind)
        save_file(original_file(root / kind, to_single_file), root / f"{kind}.safetensors")
        out[kind] = (pipe, root / kind, root / f"{kind}.safetensors", root / f"{kind}_sources")
    return out


def tokenizers(files, kind):
    sources = files[kind][3]
    first = {} if kind == "refiner" else {"tokenizer": sources / "tokenizer"}
    return dict(tokenizer_2=sources / "tokenizer_2", **first)


def run_both(ref, ours, **kw):
    with torch.no_grad():
        expected = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kw, generator=torch.Generator().manual_seed(0), prompt_syntax="plain", progress=False).images
    return torch.as_tensor(got), torch.as_tensor(expected)


@pytest.fixture(scope="module")
def base(files):
    return StableDiffusionXLPipeline.from_single_file(files["base"][2], **tokenizers(files, "base"))


def test_base_from_single_file_matches_diffusers(files, base):
    ref = files["base"][0]
    assert type(base) is StableDiffusionXLPipeline and base.force_zeros_for_empty_prompt
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    a, b = run_both(ref, base, prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_inference_steps=3,
                    guidance_scale=5.0, latents=latents, output_type="np", original_size=(64, 48),
                    crops_coords_top_left=(4, 2), negative_original_size=(16, 16), negative_target_size=(8, 8),
                    negative_crops_coords_top_left=(1, 3))
    assert_parity(a, b)


def test_refiner_from_single_file_takes_the_base_latents(files, base):
    """The refiner file is an image-to-image pipeline (any SDXL class's from_single_file gives it), with the
    refiner's aesthetic-score conditioning, which no tensor of the file names."""
    ref_base, ref = files["base"][0], files["refiner"][0]
    refiner = StableDiffusionXLPipeline.from_single_file(files["refiner"][2], **tokenizers(files, "refiner"))
    assert type(refiner) is StableDiffusionXLImg2ImgPipeline and refiner.text_encoder is None
    assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
    with torch.no_grad():
        latents = ref_base(PROMPT, num_inference_steps=6, denoising_end=0.7, output_type="latent", height=32, width=32,
                           generator=torch.Generator().manual_seed(1)).images
    a, b = run_both(ref, refiner, prompt=PROMPT, image=latents, num_inference_steps=6, denoising_start=0.7,
                    negative_prompt=NEGATIVE, aesthetic_score=8.0, output_type="np")
    assert_parity(a, b)


def test_base_file_in_the_image_to_image_pipeline(files):
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(files["base"][2], **tokenizers(files, "base"))
    assert type(pipe) is StableDiffusionXLImg2ImgPipeline and pipe.text_encoder is not None
    assert not pipe.requires_aesthetics_score


def test_save_single_file_writes_the_same_file(files, base, tmp_path):
    """Every tensor of the original file comes back bit for bit (the position ids and logit scale too, which no
    model holds: they are written as the released files have them)."""
    original = load_file(files["base"][2])
    written = load_file(base.save_single_file(tmp_path / "again.safetensors"))
    kept_aside = {k for k in original if k.endswith(("position_ids", "logit_scale"))}
    assert sorted(set(original) - kept_aside) == sorted(written)
    for key, value in written.items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key
    again = Pipeline.from_single_file(tmp_path / "again.safetensors", **tokenizers(files, "base"))  # metadata
    assert type(again) is StableDiffusionXLPipeline


def test_convert_both_ways(files, tmp_path):
    """`latentdiff convert` file -> diffusers folder (loads in diffusers' StableDiffusionXLImg2ImgPipeline, the
    refiner's options set) -> file: the same tensors."""
    import diffusers

    _, _, path, sources = files["refiner"]
    folder = tmp_path / "folder"
    assert main(["convert", str(path), str(folder), "--tokenizer-2", str(sources / "tokenizer_2")]) == 0
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    assert theirs.text_encoder is None and theirs.config.requires_aesthetics_score
    back = convert_checkpoint(folder, tmp_path / "back.safetensors", progress=False)
    original, again = load_file(path), load_file(back)
    for key, value in again.items():
        assert torch.equal(value, original[key]), key


def test_tokenizers_are_asked_for_by_name(files, tmp_path):
    """The refiner has no CLIP-L, so `tokenizer=` has no encoder to serve; a missing bigG tokenizer, offline, names
    the repository it looked for and `tokenizer_2`'s encoder."""
    with pytest.raises(InputError, match="tokenizer= is for the text encoder"):
        StableDiffusionXLPipeline.from_single_file(files["refiner"][2], tokenizer=files["refiner"][3] / "tokenizer_2")
    with pytest.raises(CheckpointError, match="stable-diffusion-xl-base-1.0"):
        StableDiffusionXLPipeline.from_single_file(files["refiner"][2], cache_dir=tmp_path, local_files_only=True)


def test_inpainting_file_runs_as_the_inpainting_pipeline(tmp_path):
    """A 9-channel SDXL file opens as StableDiffusionXLInpaintPipeline and inpaints as diffusers does."""
    import numpy as np
    from PIL import Image

    from latentdiff import StableDiffusionXLInpaintPipeline

    ref = released_sdxl(tmp_path / "inpaint", kind="inpaint")
    save_file(original_file(tmp_path / "inpaint", to_single_file), tmp_path / "inpaint.safetensors")
    sources = tmp_path / "inpaint_sources"
    pipe = Pipeline.from_single_file(tmp_path / "inpaint.safetensors", tokenizer=sources / "tokenizer",
                                     tokenizer_2=sources / "tokenizer_2")
    assert type(pipe) is StableDiffusionXLInpaintPipeline and pipe.unet.config.in_channels == 9
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    a, b = run_both(ref, pipe, prompt=PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=Image.fromarray(mask),
                    num_inference_steps=3, guidance_scale=5.0, strength=1.0, output_type="np")
    assert_parity(a, b)
