"""A1111's per-step prompt syntax on SDXL (both text encoders, a pooled embedding per sub-prompt and step range):
prompt editing against diffusers' StableDiffusionXLPipeline whose step callback swaps in the second prompt's
embeddings (context and pooled) at the switch step, AND against its definition (halves of one prompt compose to
the prompt), and the zero negative of an empty negative prompt."""
from __future__ import annotations

import pytest
import torch

from latentdiff import Pipeline
from latentdiff.errors import InputError
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sdxl import tiny_sdxl

RUN = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    ref = tiny_sdxl(folder)
    return ref, Pipeline.from_pretrained(folder)


def seed():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_prompt_editing_matches_diffusers_switching_embeddings(base, negative):
    """[cat:dog:2] = "a photo of a cat" for steps 1-2, "a photo of a dog" for steps 3-4."""
    ref, ours = base
    with torch.no_grad():
        embeds = {}
        for word in ("cat", "dog"):
            embeds[word] = ref.encode_prompt(f"a photo of a {word}", negative_prompt=negative,
                                             do_classifier_free_guidance=True, device="cpu")
    dog, neg, dog_pooled, neg_pooled = embeds["dog"]

    def switch(pipe, i, t, kwargs):
        if i == 1:   # after step 2 (0-based 1): the following steps see "dog"
            return {"prompt_embeds": torch.cat([neg, dog]), "add_text_embeds": torch.cat([neg_pooled, dog_pooled])}
        return {}

    cat = embeds["cat"]
    with torch.no_grad():
        expected = ref(prompt_embeds=cat[0], negative_prompt_embeds=cat[1], pooled_prompt_embeds=cat[2],
                       negative_pooled_prompt_embeds=cat[3], generator=seed(), callback_on_step_end=switch,
                       callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"], **RUN).images
    got = ours("a photo of a [cat:dog:2]", negative_prompt=negative, generator=seed(), progress=False, **RUN).images
    assert_parity(torch.from_numpy(got), torch.from_numpy(expected))
    plain = ours("a photo of a cat", negative_prompt=negative, generator=seed(), progress=False, **RUN).images
    assert max_rel_error(torch.from_numpy(got), torch.from_numpy(plain)) > 1e-3


def test_and_composes_per_sub_prompt(base):
    """uncond + s * sum_j w_j (cond_j - uncond): two halves of one prompt are the prompt; the pooled embedding of
    each sub-prompt is its own (a different second sub-prompt changes the image)."""
    _, ours = base
    whole = ours("a photo of a cat", generator=seed(), progress=False, **RUN).images
    halves = ours("a photo of a cat :0.5 AND a photo of a cat :0.5", generator=seed(), progress=False,
                  **RUN).images
    assert_parity(torch.from_numpy(halves), torch.from_numpy(whole))
    other = ours("a photo of a cat :0.5 AND the dog :0.5", generator=seed(), progress=False, **RUN).images
    assert max_rel_error(torch.from_numpy(other), torch.from_numpy(whole)) > 1e-3


def test_alternation_and_refusals(base):
    _, ours = base
    out = ours("a photo of a [cat|dog]", negative_prompt="", generator=seed(), progress=False, **RUN).images
    assert out.shape == (1, 32, 32, 3)
    with pytest.raises(InputError) as info:
        ours("a [cat|dog]", prompt_2="a painting", num_inference_steps=2, progress=False)
    assert info.value.where == "prompt_2"
    with pytest.raises(InputError, match="per step"):
        ours.encode_prompt(["a [cat|dog]"], guidance=False)


def test_sdxl_runs_without_transformers(base, tmp_path):
    """Both text encoders and tokenizers load natively: an SDXL folder generates without importing transformers."""
    from tests._support.tiny_clip import run_without_transformers

    _, ours = base
    ours.save_pretrained(tmp_path / "sdxl")
    run_without_transformers(f"""
        import torch
        from latentdiff import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained({str(tmp_path / "sdxl")!r})
        image = pipe("a (cat:1.2)", negative_prompt="x", num_inference_steps=1, output_type="np",
                     progress=False).images
        assert image.shape == (1, 32, 32, 3)
    """)
