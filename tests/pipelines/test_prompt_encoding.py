"""A1111's prompt syntax through the text-to-image pipelines (pipelines/prompt_encoding.py), on the tiny Stable
Diffusion folder: the weighted, chunked conditioning against a reference implementation of A1111's chunking and
"Original" emphasis written here on transformers' CLIP; a syntax-free prompt exactly as "plain" (= diffusers);
prompt editing, alternation and AND against the steps run by hand with the switched conditioning."""
from __future__ import annotations

import pytest
import torch

from latentdiff import InputError
from latentdiff.diffusion.guidance import classifier_free_guidance
from latentdiff.pipelines.image_to_image import ImageToImagePipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.prompt_syntax import parse_attention
from tests._support.parity import assert_parity
from tests._support.sd import random_image, tiny_diffusers_pipeline, tiny_ldm_text2im_pipeline

LONG = ("a (photo:1.3) of a cat, [the dog] on a hill, " * 5 + "((sunny)) weather BREAK a small house, "
        + "unusual words zxq vvy, " * 4 + "(the end:0.8)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("prompt_encoding")
    sd = tiny_diffusers_pipeline(root, clip_layers=3)
    sd.save_pretrained(root / "sd")
    return sd, LatentDiffusionPipeline.from_pretrained(root / "sd")


# ---- a reference implementation of A1111's chunking and emphasis, on transformers' tokenizer and model ----------
def reference_chunks(tokenizer, pieces):
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, current, last_comma = [], [], -1
    for text, weight in pieces:
        if weight == -1 and text == "BREAK":
            chunks.append(current)
            current, last_comma = [], -1
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(current)
            elif len(current) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                chunks.append(current[:last_comma + 1])
                current, last_comma = current[last_comma + 1:], -1
            if len(current) == 75:
                chunks.append(current)
                current, last_comma = [], -1
            current.append((token, weight))
    if current or not chunks:
        chunks.append(current)
    return chunks


def reference_encode(sd, prompt, clip_skip=None):
    tokenizer, model = sd.tokenizer, sd.text_encoder
    out = []
    for chunk in reference_chunks(tokenizer, parse_attention(prompt)):
        ids = [tokenizer.bos_token_id] + [t for t, _ in chunk] + [tokenizer.eos_token_id] * (76 - len(chunk))
        weights = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
        with torch.no_grad():
            result = model(torch.tensor([ids]), output_hidden_states=True)
            if clip_skip:
                norm = getattr(model, "text_model", model).final_layer_norm
                z = norm(result.hidden_states[-(clip_skip + 1)])
            else:
                z = result.last_hidden_state
        mean = z.mean()
        z = z * weights[None, :, None]
        out.append(z * (mean / z.mean()))
    return torch.cat(out, dim=1)


# ---- encoding ------------------------------------------------------------------------------------------------
def test_syntax_free_prompt_is_exactly_plain(setup):
    sd, pipe = setup
    for prompt in ("a photo of a cat", ["a photo of a cat", "the dog"]):
        a1111, _ = pipe.encode_prompt(prompt, guidance=False)
        plain, _ = pipe.encode_prompt(prompt, guidance=False, prompt_syntax="plain")
        assert torch.equal(a1111, plain)
    with torch.no_grad():
        expected, _ = sd.encode_prompt("a photo of a cat", "cpu", 1, False)
    assert_parity(pipe.encode_prompt("a photo of a cat", guidance=False)[0], expected, 1e-4)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_weighted_long_prompt_matches_reference(setup, clip_skip):
    sd, pipe = setup
    expected = reference_encode(sd, LONG, clip_skip)
    assert expected.shape[1] == 77 * 4          # the comma backtrack and BREAK are part of the count
    cond, _ = pipe.encode_prompt(LONG, guidance=False, clip_skip=clip_skip)
    assert cond.shape == expected.shape
    assert_parity(cond, expected, 1e-4)
    short = "a (photo:1.4) of [[a cat]]"
    assert_parity(pipe.encode_prompt(short, guidance=False)[0], reference_encode(sd, short), 1e-4)


def test_prompt_and_negative_of_different_chunks_pad_with_the_empty_prompt(setup):
    sd, pipe = setup
    cond, uncond = pipe.encode_prompt(LONG, "blurry")
    assert cond.shape == uncond.shape == (1, 77 * 4, 32)
    assert_parity(uncond[:, :77], reference_encode(sd, "blurry"), 1e-4)
    for k in range(1, 4):
        assert_parity(uncond[:, 77 * k: 77 * (k + 1)], reference_encode(sd, ""), 1e-4)
    with pytest.warns(UserWarning, match="truncated"):
        plain, _ = pipe.encode_prompt(LONG, "blurry", prompt_syntax="plain")
    assert plain.shape == (1, 77, 32)          # as diffusers: cut to 77 tokens


def test_bad_prompt_syntax_and_per_step_syntax_in_encode_prompt(setup):
    _, pipe = setup
    with pytest.raises(InputError, match="prompt_syntax"):
        pipe.encode_prompt("a cat", prompt_syntax="comfy")
    with pytest.raises(InputError, match="prompt_syntax"):
        pipe("a cat", num_inference_steps=2, prompt_syntax=1, output_type="latent")
    with pytest.raises(InputError, match="prompt") as caught:
        pipe.encode_prompt("a cat AND a dog")
    assert "a cat AND a dog" in str(caught.value)
    plain, _ = pipe.encode_prompt("a cat AND a dog", guidance=False, prompt_syntax="plain")
    assert plain.shape == (1, 77, 32)


# ---- conditioning per step -----------------------------------------------------------------------------------
def run(pipe, prompt, **kw):
    return pipe(prompt, num_inference_steps=4, height=32, width=32, output_type="latent", progress=False,
                generator=torch.Generator().manual_seed(0), **kw).images


def by_hand(pipe, conds_per_step, uncond, combine=None):
    """The steps run with the conditioning switched by hand: DDIM calls denoise once per step, so the k-th new
    timestep is step k."""
    seen = []

    def denoise(x, t):
        key = float(t)
        if key not in seen:
            seen.append(key)
        conds = conds_per_step[seen.index(key)]
        if combine is None:
            return classifier_free_guidance(pipe.unet, context=conds, uncond_context=uncond, guidance_scale=7.5)(x, t)
        return combine(x, t, conds)

    with torch.inference_mode():
        x_T = pipe.prepare_latents(1, 32, 32, generator=torch.Generator().manual_seed(0))
        return pipe.sampler.sample(denoise, x_T, pipe.noise_scheduler, 4, progress=False)


def test_prompt_editing_and_alternation_equal_the_steps_by_hand(setup):
    _, pipe = setup
    cat, uncond = pipe.encode_prompt("a cat")
    dog, _ = pipe.encode_prompt("a dog")
    assert_parity(run(pipe, "a [cat:dog:2]"), by_hand(pipe, [cat, cat, dog, dog], uncond), 1e-5)
    assert_parity(run(pipe, "a [cat|dog]"), by_hand(pipe, [cat, dog, cat, dog], uncond), 1e-5)
    assert (cat - dog).abs().max() > 1e-3      # the switch is seen


def test_and_is_composable_diffusion(setup):
    _, pipe = setup
    cat, uncond = pipe.encode_prompt("a cat")
    dog, _ = pipe.encode_prompt("a dog")

    def composed(x, t, conds):
        u = pipe.unet(x, t, context=uncond)
        c1, c2 = (pipe.unet(x, t, context=c) for c in conds)
        return u + 7.5 * (1.0 * (c1 - u) + 0.5 * (c2 - u))

    expected = by_hand(pipe, [(cat, dog)] * 4, uncond, combine=composed)
    assert_parity(run(pipe, "a cat AND a dog :0.5"), expected, 1e-4)
    with pytest.raises(InputError, match="guidance"):
        run(pipe, "a cat AND a dog", guidance_scale=1.0)


def test_image_to_image_takes_scheduled_prompts(setup):
    _, pipe = setup
    img2img = ImageToImagePipeline.from_pipe(pipe)
    out = img2img("a [cat:dog:0.5]", random_image(), strength=0.5, num_inference_steps=4, output_type="latent",
                  progress=False, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_ldm_bert_reads_syntax_free_prompts_and_warns_on_weights(tmp_path, diffusers):
    """LDMBert has no chunks: a syntax-free prompt is exactly "plain"; a weighted one is encoded as written, with a
    warning (A1111 PNGs still run on the built-in model)."""
    tiny_ldm_text2im_pipeline(tmp_path / "ldm").save_pretrained(tmp_path / "ldm")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "ldm")
    a1111, _ = pipe.encode_prompt("a photo of a cat", guidance=False)
    assert torch.equal(a1111, pipe.encode_prompt("a photo of a cat", guidance=False, prompt_syntax="plain")[0])
    weighted = "a (photo:1.3) of a [cat:dog:2]"
    with pytest.warns(UserWarning, match="LDMBert") as caught:
        a1111, _ = pipe.encode_prompt(weighted, guidance=False)
    assert "encoded as written" in str(caught[0].message)
    assert torch.equal(a1111, pipe.encode_prompt(weighted, guidance=False, prompt_syntax="plain")[0])
