"""SDXL textual-inversion embeddings ({"clip_l": (n, d1), "clip_g": (n, d2)} in one file) on the tiny SDXL: one
`load_textual_inversion` call gives diffusers' text conditioning after its two calls (text_encoder= / tokenizer=
per encoder), hidden states and pooled output, multi-vector tokens included, in both prompt syntaxes; unloading
restores both tokenizers and tables (the very objects); the refiner takes clip_g; an SD 1.x embedding on SDXL, an
SDXL embedding on SD 1.x, and a vector set of the wrong width are CheckpointErrors with neither encoder changed."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import CheckpointError, InputError
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline
from tests._support.sdxl import TE1_HIDDEN, TE2_HIDDEN, tiny_sdxl
from tests._support.sdxl_lora import conditioning, diffusers_conditioning, load_parts

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a mystyle photo of a cat"


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def encoders(parts):
    return [e for e in (parts.text_encoder, parts.text_encoder_2) if e is not None]


def snapshot(parts):
    """Each encoder's tokenizer object, table Parameter object and a copy of its values."""
    out = []
    for encoder in encoders(parts):
        table = encoder.model.get_input_embeddings() if hasattr(encoder.model, "get_input_embeddings") else \
            encoder.model.embeddings.token_embedding
        out.append((encoder.tokenizer, table.weight, table.weight.detach().clone(), table))
    return out


def unchanged(parts, before) -> bool:
    now = snapshot(parts)
    return all(a[0] is b[0] and a[1] is b[1] and torch.equal(b[1], a[2]) and b[3].num_embeddings == a[2].shape[0]
               for a, b in zip(before, now, strict=True))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("sdxl_embeddings")
    ref = tiny_sdxl(root / "base")
    state = {"clip_l": vectors(2, TE1_HIDDEN, 1), "clip_g": vectors(2, TE2_HIDDEN, 2)}
    save_file(state, root / "mystyle.safetensors")
    save_file({"emb_params": vectors(2, TE1_HIDDEN, 3)}, root / "sd15style.safetensors")
    save_file({"clip_l": state["clip_l"], "clip_g": vectors(2, TE2_HIDDEN + 8, 4)}, root / "badwidth.safetensors")
    return root, ref, load_parts(root / "base"), state


@pytest.fixture
def parts(setup):
    parts = setup[2]
    yield parts
    parts.unload_textual_inversion()


def test_one_call_equals_diffusers_two(setup, parts):
    root, ref, _, state = setup
    plain = conditioning(parts, PROMPT)
    before = snapshot(parts)
    ref.load_textual_inversion(state["clip_l"], token="mystyle", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="mystyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    try:
        parts.load_textual_inversion(root / "mystyle.safetensors")        # token: the file's stem, as A1111
        for encoder in encoders(parts):
            assert {"mystyle", "mystyle_1"} <= set(encoder.tokenizer.get_vocab())
        expected = diffusers_conditioning(ref, PROMPT)
        for syntax in ("plain", "a1111"):   # A1111's chunking keeps the embedding's vectors whole
            for a, e, p in zip(conditioning(parts, PROMPT, prompt_syntax=syntax), expected, plain, strict=True):
                assert_parity(a, e, 1e-4)
                assert (a - p).abs().max() > 1e-3          # the embedding changes both hidden states and pooled
    finally:
        ref.unload_textual_inversion()
    parts.unload_textual_inversion()
    assert unchanged(parts, before)
    for a, p in zip(conditioning(parts, PROMPT), plain, strict=True):
        assert torch.equal(a, p)


def test_state_dict_with_token_and_unload_by_token(setup, parts):
    _, _, _, state = setup
    before = snapshot(parts)
    parts.load_textual_inversion(state, token="<a>")
    parts.load_textual_inversion({"clip_l": state["clip_l"][:1], "clip_g": state["clip_g"][:1]}, token="<b>")
    parts.unload_textual_inversion("<a>")
    for encoder in encoders(parts):
        vocab = encoder.tokenizer.get_vocab()
        assert "<b>" in vocab and "<a>" not in vocab
    parts.unload_textual_inversion("<b>")
    assert unchanged(parts, before)
    with pytest.raises(InputError, match="token"):
        parts.load_textual_inversion(state)                     # a state dict has no stem to name its token


def test_sd15_embedding_on_sdxl_is_refused(setup, parts):
    root = setup[0]
    before = snapshot(parts)
    with pytest.raises(CheckpointError) as info:
        parts.load_textual_inversion(root / "sd15style.safetensors")
    message = str(info.value)
    assert "sd15style.safetensors" in message and "emb_params" in message and "clip_l" in message
    assert unchanged(parts, before)


def test_wrong_width_changes_neither_encoder(setup, parts):
    root = setup[0]
    before = snapshot(parts)
    with pytest.raises(CheckpointError) as info:
        parts.load_textual_inversion(root / "badwidth.safetensors")
    assert "badwidth.safetensors: clip_g" in str(info.value) and f"width {TE2_HIDDEN}" in str(info.value)
    assert unchanged(parts, before)           # clip_l fitted text_encoder, and still it was not added


def test_sdxl_embedding_on_sd15_is_refused(setup, diffusers):
    root = setup[0]
    tiny_diffusers_pipeline(root).save_pretrained(root / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd")
    tokenizer = pipe.text_encoder.tokenizer
    with pytest.raises(CheckpointError) as info:
        pipe.load_textual_inversion(root / "mystyle.safetensors")
    assert "an SDXL embedding" in str(info.value) and "mystyle.safetensors" in str(info.value)
    assert pipe.text_encoder.tokenizer is tokenizer


def test_refiner_takes_clip_g(setup):
    root, _, _, state = setup
    ref = tiny_sdxl(root / "refiner", kind="refiner")
    parts = load_parts(root / "refiner", refiner=True)
    ref.load_textual_inversion(state["clip_g"], token="mystyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    parts.load_textual_inversion(root / "mystyle.safetensors")
    for a, e in zip(conditioning(parts, PROMPT), diffusers_conditioning(ref, PROMPT), strict=True):
        assert_parity(a, e, 1e-4)
