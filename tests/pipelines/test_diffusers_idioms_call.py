"""The Python API as diffusers users type it (issue 15): stage methods without autograd by default (grad=True opts
in), diffusers' __call__ keywords (callback_on_step_end, guidance_rescale, return_dict, interrupt,
set_progress_bar_config), side by side with diffusers on the tiny Stable Diffusion folder where it has the idiom."""
from __future__ import annotations

import pytest
import torch

from latentdiff import InputError
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("idioms")
    sd = tiny_diffusers_pipeline(root)
    sd.save_pretrained(root / "sd")
    return sd, LatentDiffusionPipeline.from_pretrained(root / "sd"), root


# ---- the stages without autograd -------------------------------------------------------------------------
def by_hand(pipe, **grad):
    cond, uncond = pipe.encode_prompt([PROMPT], [""], **grad)
    x_T = pipe.prepare_latents(1, 32, 32, generator=torch.Generator().manual_seed(0), **grad)
    z0 = pipe.denoise(x_T, cond, uncond, num_inference_steps=2, progress=False, **grad)
    return cond, z0, pipe.decode(z0, **grad)


def test_stages_by_hand_record_no_graph(setup):
    _, pipe, _ = setup
    assert torch.is_grad_enabled()
    for tensor in by_hand(pipe):
        assert not tensor.requires_grad and tensor.grad_fn is None


def test_grad_true_lets_a_loss_reach_the_weights(setup):
    _, pipe, _ = setup
    pipe.unet.zero_grad()
    _, z0, image = by_hand(pipe, grad=True)
    assert z0.requires_grad and image.grad_fn is not None
    image.square().mean().backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    pipe.unet.zero_grad(set_to_none=True)


def test_grad_is_the_same_keyword_on_every_stage(setup):
    import inspect
    for method in (LatentDiffusionPipeline.encode_prompt, LatentDiffusionPipeline.prepare_latents,
                   LatentDiffusionPipeline.denoise, LatentDiffusionPipeline.decode, LatentDiffusionPipeline.sample,
                   ImageToImagePipeline.encode_image):
        parameter = inspect.signature(method).parameters["grad"]
        assert parameter.kind is parameter.KEYWORD_ONLY and parameter.default is False


def test_grad_must_be_a_bool(setup):
    _, pipe, _ = setup
    with pytest.raises(TypeError, match="grad"):
        pipe.prepare_latents(1, 32, 32, grad="yes")


# ---- diffusers' __call__ keywords, side by side ------------------------------------------------------------
STEPS = 2


def both(ref, pipe, **kw):
    """(ours, diffusers') "pt" images of one run each with the same seed and keywords."""
    run = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt") | kw
    with torch.no_grad():
        expected = ref(**run, generator=torch.Generator().manual_seed(0)).images
    ours = pipe(**run, generator=torch.Generator().manual_seed(0), progress=False).images
    return ours, expected


def test_callback_on_step_end_sees_and_replaces_the_latents_as_in_diffusers(setup):
    ref, pipe, _ = setup
    seen = {"ours": [], "ref": []}

    def halve_at_0(who):
        def on_step_end(p, i, t, kwargs):
            assert set(kwargs) == {"latents"}
            seen[who].append(kwargs["latents"].clone())
            return {"latents": kwargs["latents"] * 0.5} if i == 0 else kwargs
        return on_step_end

    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
                       callback_on_step_end=halve_at_0("ref")).images
    ours = pipe(PROMPT, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
                callback_on_step_end=halve_at_0("ours"), progress=False).images
    assert len(seen["ours"]) == len(seen["ref"]) == STEPS
    for a, b in zip(seen["ours"], seen["ref"], strict=True):
        assert_parity(a, b)
    assert_parity(ours, expected)


def test_the_old_callback_and_callback_on_step_end_both_run(setup):
    _, pipe, _ = setup
    calls = []
    pipe(PROMPT, num_inference_steps=2, output_type="latent", progress=False,
         callback=lambda i, t, x: calls.append(("old", i)),
         callback_on_step_end=lambda p, i, t, kw: calls.append(("new", i)) or kw,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert calls == [("old", 0), ("new", 0), ("old", 1), ("new", 1)]


def test_guidance_rescale_matches_diffusers(setup):
    ref, pipe, _ = setup
    ours, expected = both(ref, pipe, guidance_rescale=0.7)
    plain, _ = both(ref, pipe)
    assert_parity(ours, expected)
    assert (ours - plain).abs().max() > 1e-4     # it changed something


def test_return_dict_false_is_diffusers_tuple(setup):
    ref, pipe, _ = setup
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=1, output_type="pt", return_dict=False)
    got = pipe(PROMPT, num_inference_steps=1, output_type="pt", return_dict=False, progress=False)
    assert isinstance(got, tuple) and isinstance(expected, tuple) and len(got) == len(expected) == 2
    assert got[1] is None and expected[1] is None      # no safety checker
    assert got[0].shape == expected[0].shape


def test_interrupt_from_a_callback_skips_the_remaining_steps_as_in_diffusers(setup):
    ref, pipe, _ = setup
    steps = {"ours": [], "ref": []}

    def stop_after_0(who):
        def on_step_end(p, i, t, kwargs):
            steps[who].append(i)
            p._interrupt = True
            return kwargs
        return on_step_end

    ours = pipe(PROMPT, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
                progress=False).images
    ours_cut = pipe(PROMPT, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=stop_after_0("ours"), progress=False).images
    with torch.no_grad():
        expected_cut = ref(PROMPT, num_inference_steps=STEPS, output_type="pt",
                           generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_0("ref")).images
    assert steps["ours"] == steps["ref"] == [0]
    assert pipe.interrupt and ref.interrupt
    assert_parity(ours_cut, expected_cut)
    assert (ours_cut - ours).abs().max() > 1e-3
    pipe(PROMPT, num_inference_steps=1, output_type="latent", progress=False)
    assert not pipe.interrupt                           # each call starts uninterrupted


def test_set_progress_bar_config(setup, capsys):
    _, pipe, _ = setup
    try:
        pipe.set_progress_bar_config(desc="idiom-bar", ascii=True)
        pipe(PROMPT, num_inference_steps=2, output_type="latent")
        assert "idiom-bar" in capsys.readouterr().err
        pipe.set_progress_bar_config(disable=True)
        pipe(PROMPT, num_inference_steps=2, output_type="latent")
        assert capsys.readouterr().err == ""
    finally:
        pipe.set_progress_bar_config()


@pytest.mark.parametrize("keyword, value, fragment", [
    ("callback_on_step_end", "print", "callable"),
    ("callback_on_step_end_tensor_inputs", ["latents", "noise_pred"], "callback_on_step_end_tensor_inputs"),
    ("guidance_rescale", 1.5, "[0, 1]"),
    ("guidance_rescale", float("nan"), "finite"),
    ("return_dict", "no", "return_dict"),
])
def test_bad_idiom_arguments_are_refused_before_any_work(setup, keyword, value, fragment):
    _, pipe, _ = setup
    with pytest.raises(InputError) as caught:
        pipe(PROMPT, num_inference_steps=1, progress=False, **{keyword: value})
    assert fragment in str(caught.value) and keyword in str(caught.value)


def test_a_callback_returning_no_dict_or_other_embeddings_is_refused(setup):
    _, pipe, _ = setup
    with pytest.raises(InputError, match="dict"):
        pipe(PROMPT, num_inference_steps=1, progress=False, output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: None)
    with pytest.raises(InputError, match="prompt_embeds"):
        pipe(PROMPT, num_inference_steps=1, progress=False, output_type="latent",
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
             callback_on_step_end=lambda p, i, t, kw: kw | {"prompt_embeds": kw["prompt_embeds"] * 2})


def test_unknown_keywords_stay_a_type_error(setup):
    _, pipe, _ = setup
    with pytest.raises(TypeError):
        pipe(PROMPT, num_inference_steps=1, callback_steps=1)


def test_img2img_and_inpainting_take_the_idioms(setup):
    import numpy as np

    from latentdiff.pipelines.inpaint import InpaintPipeline
    _, _, root = setup
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24] = 1
    seen = []
    for cls, extra in ((ImageToImagePipeline, {}), (InpaintPipeline, {"mask_image": mask})):
        pipe = cls.from_pretrained(root / "sd")
        images, nsfw = pipe(PROMPT, image, **extra, strength=1.0, num_inference_steps=2, output_type="pt",
                            guidance_rescale=0.5, return_dict=False, progress=False,
                            callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
        assert images.shape == (1, 3, 32, 32) and nsfw is None
    assert seen == [0, 1, 0, 1]


# ---- img2img and inpainting inputs, as diffusers takes them ---------------------------------------------------
def img2img_pair(setup):
    import diffusers
    sd, _, root = setup
    ref = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    ref.set_progress_bar_config(disable=True)
    return ref, ImageToImagePipeline.from_pretrained(root / "sd")


def test_img2img_takes_tensors_in_minus_one_one_as_diffusers(setup):
    from tests._support.sd import random_image, run_both
    ref, pipe = img2img_pair(setup)
    unit = torch.from_numpy(random_image()).permute(2, 0, 1)[None].float() / 255
    kw = dict(strength=0.6, num_inference_steps=STEPS)
    (ours, _), (expected, _) = run_both(ref, pipe, PROMPT, image=unit * 2 - 1, **kw)
    (ours_unit, _), _ = run_both(ref, pipe, PROMPT, image=unit, **kw)
    assert_parity(ours, expected)
    assert_parity(ours, ours_unit)


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_img2img_resizes_sizes_off_the_factor_as_diffusers(setup, kind):
    import numpy as np
    from PIL import Image

    from tests._support.sd import run_both
    ref, pipe = img2img_pair(setup)
    array = np.random.default_rng(1).integers(0, 256, (33, 35, 3), dtype=np.uint8)
    image = Image.fromarray(array) if kind == "pil" else torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0
    with pytest.warns(UserWarning, match="33 x 35 .* resized to 32 x 34"):
        (ours, _), (expected, _) = run_both(ref, pipe, PROMPT, image=image, strength=0.6, num_inference_steps=STEPS)
    assert ours.shape == expected.shape == (1, 32, 34, 3)
    assert_parity(ours, expected)


def test_inpainting_takes_height_and_width_as_diffusers(setup):
    import diffusers
    from PIL import Image

    from latentdiff.pipelines.inpaint import InpaintPipeline
    from tests._support.sd import random_image, random_mask, run_both
    sd, _, root = setup
    ref = diffusers.StableDiffusionInpaintPipeline(**sd.components)
    ref.set_progress_bar_config(disable=True)
    pipe = InpaintPipeline.from_pretrained(root / "sd")
    image, mask = Image.fromarray(random_image()), Image.fromarray(random_mask())
    (ours, _), (expected, _) = run_both(ref, pipe, PROMPT, image=image, mask_image=mask, height=24, width=28,
                                        strength=0.7, num_inference_steps=STEPS)
    assert ours.shape == expected.shape == (1, 24, 28, 3)
    assert_parity(ours, expected)
    with pytest.raises(InputError, match="height"):
        pipe(PROMPT, image, mask, height=25, num_inference_steps=1, progress=False)   # diffusers: a ValueError
    with pytest.raises(InputError, match="size of the image"):    # without height / width, sizes must agree
        pipe(PROMPT, image, mask.resize((16, 16)), num_inference_steps=1, progress=False)


def test_return_dict_false_without_a_safety_checker_is_a_one_tuple_as_diffusers(tmp_path):
    import diffusers

    from latentdiff.pipelines.base import Pipeline
    from tests._support.ldm import ldm_scheduler, tiny_unet2d, tiny_vq
    ref = diffusers.LDMPipeline(vqvae=tiny_vq(), unet=tiny_unet2d(), scheduler=ldm_scheduler())
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "ldm")
    with torch.no_grad():
        expected = ref(num_inference_steps=1, output_type="np", return_dict=False)
    got = Pipeline.from_pretrained(tmp_path / "ldm")(num_inference_steps=1, output_type="np", return_dict=False,
                                                      progress=False)
    assert isinstance(got, tuple) and len(got) == len(expected) == 1
    assert got[0].shape == expected[0].shape
