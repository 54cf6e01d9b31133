"""StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline against diffusers' on tiny random SDXL base and
refiner models (tests/_support/sdxl.py): the same folders, seeds and arguments, fp32 max rel err <= 1e-4.

Covered: CFG with and without a negative prompt (zeros for an absent one, the base's force_zeros_for_empty_prompt),
prompt_2, micro-conditioning (and its negative twins), guidance_rescale, clip_skip in SDXL's numbering, several
prompts and images per prompt, other samplers, the denoising_end -> denoising_start hand-off to the refiner with
its aesthetic scores, image-to-image at a strength (refiner and base), folders both ways, Turbo defaults, and bad
input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import Pipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from latentdiff.errors import ConfigError, InputError, UsageError
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sdxl import tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers' base, its folder)"""
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    return tiny_sdxl(folder), folder


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "refiner"
    return tiny_sdxl(folder, kind="refiner"), folder


@pytest.fixture(scope="module")
def ours(base):
    return Pipeline.from_pretrained(base[1])


def seed(value: int = 0):
    return torch.Generator().manual_seed(value)


def both(ref, pipe, *args, **kw):
    """(ours, diffusers') outputs of one call each, fresh generators of the same seeds."""
    gens = kw.pop("seeds", (0,))
    def g():
        return [seed(s) for s in gens] if len(gens) > 1 else seed(gens[0])
    with torch.no_grad():
        expected = ref(*args, generator=g(), **kw).images
    ours = pipe(*args, generator=g(), prompt_syntax="plain", progress=False, **kw).images
    if isinstance(expected, np.ndarray):
        return torch.from_numpy(ours), torch.from_numpy(expected)
    return ours, expected


@pytest.mark.parametrize("kw", [
    dict(),
    dict(negative_prompt="blurry, low quality"),
    dict(negative_prompt="blurry", prompt_2="a painting", negative_prompt_2="dark", guidance_rescale=0.4),
    dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(40, 24),
         negative_original_size=(16, 16), negative_target_size=(8, 8), negative_crops_coords_top_left=(1, 3)),
    dict(clip_skip=1),
], ids=["zero-negative", "negative", "prompt_2", "micro-conditioning", "clip_skip"])
def test_text_to_image_parity(base, ours, kw):
    ref, _ = base
    a, b = both(ref, ours, PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="np", **kw)
    assert_parity(a, b)


def test_the_conditioning_matters(base, ours):
    """Each input changes the image (so the parity above cannot pass by ignoring it)."""
    run = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", progress=False, prompt_syntax="plain")
    plain = ours(PROMPT, generator=seed(), **run).images
    for change in (dict(negative_prompt="blurry"), dict(prompt_2="a painting"), dict(original_size=(8, 8)),
                   dict(crops_coords_top_left=(5, 5)), dict(negative_original_size=(8, 8)), dict(clip_skip=1)):
        other = ours(PROMPT, generator=seed(), **run, **change).images
        assert max_rel_error(torch.from_numpy(other), torch.from_numpy(plain)) > 1e-3, change


def test_batches_and_samplers(base, ours):
    import diffusers

    ref, _ = base
    a, b = both(ref, ours, [PROMPT, "the dog"], negative_prompt=["x", "y"], num_images_per_prompt=2,
                num_inference_steps=3, guidance_scale=4.0, output_type="np", seeds=(1, 2, 3, 4))
    assert a.shape == (4, 32, 32, 3)
    assert_parity(a, b)
    from latentdiff import DDIMSampler

    ours.sampler, saved = DDIMSampler.from_config(ours.sampler.config), ours.sampler
    scheduler = ref.scheduler
    ref.scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
    try:
        a, b = both(ref, ours, PROMPT, num_inference_steps=5, guidance_scale=5.0, output_type="np")
        assert_parity(a, b)
    finally:
        ours.sampler, ref.scheduler = saved, scheduler


def test_the_refiner_takes_the_base_latents(base, refiner, ours):
    """The ensemble of expert denoisers: base to denoising_end as latents, refiner from denoising_start."""
    ref_base, _ = base
    ref, folder = refiner
    pipe = Pipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionXLImg2ImgPipeline and pipe.text_encoder is None
    lat, lat_ref = both(ref_base, ours, PROMPT, num_inference_steps=10, denoising_end=0.7, output_type="latent")
    assert_parity(lat, lat_ref)
    full = ours(PROMPT, num_inference_steps=10, output_type="latent", generator=seed(), progress=False).images
    assert max_rel_error(lat, full) > 1e-2   # stopped part-way: still noisy
    for kw in (dict(), dict(aesthetic_score=8.0, negative_aesthetic_score=1.0, negative_prompt="blurry")):
        a, b = both(ref, pipe, PROMPT, image=lat_ref, num_inference_steps=10, denoising_start=0.7,
                    output_type="np", **kw)
        assert_parity(a, b)


@pytest.mark.parametrize("which", ["refiner", "base"])
def test_image_to_image_at_a_strength(base, refiner, which):
    import diffusers

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    if which == "refiner":
        ref, folder = refiner
    else:
        ref, folder = diffusers.StableDiffusionXLImg2ImgPipeline(**base[0].components), base[1]
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    a, b = both(ref, pipe, PROMPT, image=image, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                negative_prompt="x", output_type="np")
    assert_parity(a, b)


def test_a1111_syntax_reads_weights_for_both_encoders(base, ours):
    """Without syntax "a1111" is "plain" exactly; a weight changes both encoders' halves, each rescaled to its own
    mean (reference: transformers' hidden_states[-2] weighted by hand); the pooled embedding is the unweighted
    first chunk's (A1111); a long prompt is two 77-token chunks."""
    ref, _ = base
    plain = ours.encode_prompt([PROMPT], guidance=False, prompt_syntax="plain")
    same = ours.encode_prompt([PROMPT], guidance=False, prompt_syntax="a1111")
    assert torch.equal(plain[0], same[0]) and torch.equal(plain[2], same[2])
    cond, _, pooled, _ = ours.encode_prompt(["a photo of a (cat:1.5)"], guidance=False)
    assert torch.equal(pooled, plain[2])
    tokenizer = ref.tokenizer
    start = len(tokenizer("a photo of a", add_special_tokens=False)["input_ids"]) + 1   # after BOS
    stop = start + len(tokenizer("cat", add_special_tokens=False)["input_ids"])
    weights = torch.ones(77)
    weights[start:stop] = 1.5
    halves = []
    for encoder, tok in ((ref.text_encoder, ref.tokenizer), (ref.text_encoder_2, ref.tokenizer_2)):
        ids = tok([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            z = encoder(ids, output_hidden_states=True).hidden_states[-2][0]
        weighted = z * weights[:, None]
        halves.append(weighted * (z.mean() / weighted.mean()))
    assert_parity(cond[0], torch.cat(halves, dim=-1))
    assert max_rel_error(cond, plain[0]) > 1e-3
    long = ours.encode_prompt([PROMPT + ", cat" * 60], guidance=False)[0]
    assert long.shape[1] == 154
    with pytest.raises(InputError, match="per step"):
        ours.encode_prompt(["a [cat|dog]"], guidance=False)


def test_folders_both_ways(base, ours, tmp_path):
    import diffusers

    ref, _ = base
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    a, b = both(theirs, ours, PROMPT, negative_prompt="x", num_inference_steps=3, guidance_scale=5.0,
                output_type="np")
    assert_parity(a, b)
    again = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        left, right = getattr(again, name).state_dict(), getattr(ours, name).state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_refiner_folder_round_trip(refiner, tmp_path):
    import diffusers

    _, folder = refiner
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner")
    assert theirs.text_encoder is None and theirs.config.requires_aesthetics_score


def test_turbo_defaults(base, tmp_path):
    """A folder whose scheduler is ancestral Euler on trailing timesteps (SDXL-Turbo's) runs 1 step without
    guidance unless told otherwise, as diffusers' documented Turbo call."""
    import diffusers

    ref, _ = base
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config,
                                                                      timestep_spacing="trailing")
    turbo = diffusers.StableDiffusionXLPipeline(**(ref.components | {"scheduler": scheduler}))
    turbo.set_progress_bar_config(disable=True)
    turbo.save_pretrained(tmp_path / "turbo")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "turbo")
    assert pipe.default_call(None, None) == (1, 0.0)
    expected = turbo(PROMPT, num_inference_steps=1, guidance_scale=0.0, output_type="np",
                     generator=seed()).images
    got = pipe(PROMPT, output_type="np", generator=seed(), progress=False).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))


@pytest.mark.parametrize("kw, where", [
    (dict(original_size=(32,)), "original_size"),
    (dict(target_size="32x32"), "target_size"),
    (dict(crops_coords_top_left=(0, -1)), "crops_coords_top_left"),
    (dict(negative_original_size=(1.5, 2)), "negative_original_size"),
    (dict(denoising_end=1.0), "denoising_end"),
    (dict(denoising_end=0), "denoising_end"),
    (dict(prompt_embeds=torch.zeros(1, 77, 48)), "pooled_prompt_embeds"),
    (dict(clip_skip=2), "clip_skip"),
    (dict(prompt_2=3), "prompt_2"),
])
def test_bad_input_is_refused_before_any_work(ours, kw, where):
    called = []
    hook = ours.unet.register_forward_hook(lambda *a: called.append(1))
    try:
        with pytest.raises(InputError) as info:
            ours(PROMPT if "prompt_embeds" not in kw else None, num_inference_steps=2, progress=False, **kw)
    finally:
        hook.remove()
    assert info.value.where == where and not called


def test_refiner_errors(refiner, base):
    _, folder = refiner
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    with pytest.raises(InputError, match="needs an image") as info:
        pipe(PROMPT, num_inference_steps=2)
    assert info.value.where == "image"
    as_text = StableDiffusionXLPipeline.from_pipe(pipe)
    with pytest.raises(UsageError, match="refiner") as usage:
        as_text(PROMPT, num_inference_steps=2)
    assert usage.value.where == "image"
    with pytest.raises(ConfigError) as config:   # a refiner UNet told it is a base
        StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, requires_aesthetics_score=False)
    assert config.value.where == "requires_aesthetics_score"
    latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(InputError) as late:
        pipe(PROMPT, image=latents, num_inference_steps=4, denoising_start=0.5, denoising_end=0.4)
    assert late.value.where == "denoising_end"


def test_float16_vae_decodes_in_float32(ours):
    """force_upcast (SDXL's VAE config): a float16 VAE decodes in float32 from the start, so the images are those
    of the float16-rounded weights in float32, and the VAE is float16 again afterwards."""
    import copy

    assert ours.vae.config.force_upcast and ours.vae.config.scaling_factor == 0.13025
    latents = torch.randn(1, 4, 16, 16, generator=seed(3))
    reference = copy.deepcopy(ours.vae).to(torch.float16).to(torch.float32)
    saved = ours.vae
    ours.vae = copy.deepcopy(saved).to(torch.float16)
    try:
        images = ours.decode(latents)
        assert images.dtype == torch.float32 and ours.vae.dtype == torch.float16
        with torch.no_grad():
            expected = reference.decode_latents(latents)
        assert torch.equal(images, expected)
    finally:
        ours.vae = saved


def test_tiled_sampling_passes_the_added_conditioning(ours):
    """MultiDiffusion windows over an SDXL UNet: one window covering the image is plain sampling, bit for bit; a
    larger image in windows runs."""
    run = dict(num_inference_steps=2, output_type="np", progress=False, negative_prompt="x")
    plain = ours(PROMPT, generator=seed(), **run).images
    one = ours(PROMPT, generator=seed(), tile_size=32, tile_overlap=0, **run).images
    assert np.array_equal(plain, one)
    wide = ours(PROMPT, generator=seed(), height=32, width=64, tile_size=32, tile_overlap=16, **run).images
    assert wide.shape == (1, 32, 64, 3) and np.isfinite(wide).all()


@pytest.mark.parametrize("kw", [
    dict(crops_coords_top_left=(4, 2), negative_original_size=(16, 16), negative_target_size=(8, 8)),
    dict(crops_coords_top_left=(4, 2)),
], ids=["negative-crop-defaults-to-zero", "no-negative-uses-the-positive"])
def test_negative_micro_conditioning_defaults_as_diffusers(base, ours, kw):
    ref, _ = base
    a, b = both(ref, ours, PROMPT, num_inference_steps=3, guidance_scale=5.0, negative_prompt="x",
                output_type="np", **kw)
    assert_parity(a, b)
