"""latentdiff's own CLIP text model and tokenizers (models/clip_text.py, models/tokenizers.py) against
transformers on the same weights and files, the loaders' choice between them, and cold loads that never
import transformers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.builtin import BUILTIN_MODELS, DEFAULT_MODEL, ROOT
from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.clip_text import CLIPTextModel
from latentdiff.models.ldm_bert import load_bert_tokenizer
from latentdiff.models.text_encoder import TextEncoder, TextEncoderConfig, load_text_model, load_tokenizer
from latentdiff.models.tokenizers import CLIPTokenizer, FastTokenizer
from tests._support.parity import assert_parity
from tests._support.tiny_clip import (
    BOS,
    EOS,
    make_tiny_clip,
    random_clip_text_model,
    run_without_transformers,
    tiny_clip_config,
    write_tiny_clip_tokenizer,
)

BUILTIN_TOKENIZER = ROOT / BUILTIN_MODELS[DEFAULT_MODEL] / "tokenizer"
PROMPTS = [
    "a photo of a cat", "A PHOTO OF A CAT", "a  photo   of\ta\ncat", "   leading and trailing   ", "", " ", "\n\t",
    "photo of the dog", "the dog's photo", "it's they're we've I'm you'll he'd", "'s 't 're", "don't stop",
    "hello, world!", "!!!", "a!b?c.d", "(parentheses) [brackets] {braces} <angles>", "semi;colon:dash-under_score",
    "quotes \"double\" 'single' `back`", "#hashtag @mention $100 50% a&b *star* ~tilde^caret", "a/b\\c|d",
    "12345", "3.14159", "1e-3 and 2,000,000", "year 2024, 4k, 8K UHD", "v1.5 vs v2.1", "0 1 2 3 4 5 6 7 8 9",
    "café naïve résumé", "Ünïcödé ß ﬁ ligature", "日本語のテキスト", "中文 한국어 русский العربية",
    "emoji 😀🐱🚀",
    "combining e\u0301 vs é", "zero\u200bwidth", "non\u00a0breaking space", "full-width ＡＢＣ１２３",
    "<|startoftext|> inside", "ends with <|endoftext|>", "<|ENDOFTEXT|> upper", "<|endoftext|><|endoftext|>",
    "masterpiece, best quality, (ultra detailed:1.2), 8k", "oil painting of a castle, by greg rutkowski",
    "a cat " * 40, "photo " * 100, "x" * 300, "abc" * 50 + " end", "word " * 74, "word " * 75, "word " * 76,
    "supercalifragilisticexpialidocious", "The Quick Brown Fox Jumps Over The Lazy Dog.", "tab\tseparated\tvalues",
    "mixed CASE and 123 numbers!", "a, " * 30, "“smart quotes” and ‘apostrophes’ — dashes…",
]
CALLS = [  # the forms src/ uses (TextEncoder._tokenize, _warn_if_truncated) and transformers' other defaults
    dict(padding="max_length", max_length=77, truncation=True, return_attention_mask=True, return_tensors="pt"),
    dict(padding="max_length", max_length=16, truncation=True, return_attention_mask=True, return_tensors="pt"),
    dict(truncation=False, verbose=False), dict(), dict(padding=True), dict(max_length=10), dict(truncation=True),
    dict(padding="max_length"),
]


def added_token(content: str, **flags) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, **flags}


def clip_tokenizer_variants(root) -> dict[str, object]:
    """CLIP tokenizer folders over the tiny vocabulary, with the settings real folders have."""
    folders = {"tiny": write_tiny_clip_tokenizer(root / "tiny")}
    sd15 = write_tiny_clip_tokenizer(root / "sd15")  # SD 1.x: AddedToken dicts (normalized), pad as a string
    special = {"bos_token": added_token(BOS), "eos_token": added_token(EOS), "unk_token": added_token(EOS),
               "pad_token": EOS}
    (sd15 / "special_tokens_map.json").write_text(json.dumps(special))
    config = {k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in special.items()}
    (sd15 / "tokenizer_config.json").write_text(json.dumps({
        **config, "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer"}))
    sd2 = root / "sd2"  # SD 2.x: OpenCLIP pads with "!" (id 0)
    shutil.copytree(sd15, sd2)
    (sd2 / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    decoder = root / "decoder"  # transformers 4.3x: added_tokens_decoder in the config, no special_tokens_map read
    shutil.copytree(sd15, decoder)
    vocab = json.loads((sd15 / "vocab.json").read_text(encoding="utf-8"))
    data = json.loads((sd15 / "tokenizer_config.json").read_text())
    data["added_tokens_decoder"] = {str(vocab[t]): added_token(t, normalized=False, special=True) for t in (BOS, EOS)}
    (decoder / "tokenizer_config.json").write_text(json.dumps(data))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(sd2).save_pretrained(root / "saved")  # transformers 5's own layout (tokenizer.json)
    return folders | {"sd15": sd15, "sd2": sd2, "decoder": decoder, "saved": root / "saved"}


def backend_json(tokenizer) -> dict:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data.pop("truncation"), data.pop("padding")  # set per call by transformers, never by ours
    return data


def assert_same_tokenizer(ours, ref, prompts=PROMPTS, calls=CALLS) -> None:
    assert backend_json(ours) == backend_json(ref)
    for kwargs in calls:
        batches = [[p] for p in prompts] + ([prompts] if kwargs.get("padding") else [])  # padded: a whole batch too
        for batch in batches:
            assert_same_encoding(ours(batch, **kwargs), ref(batch, **kwargs), (kwargs, batch))
    assert ours(prompts[0])["input_ids"] == ref(prompts[0])["input_ids"]  # a string: flat lists
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "pad_token", "model_max_length"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab() and ours.vocab_size == ref.vocab_size
    for ids in ref(prompts[:12])["input_ids"]:
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def assert_same_encoding(actual, expected, context=None) -> None:
    assert sorted(actual) == sorted(expected), context
    for key in expected:
        tensor = torch.is_tensor(expected[key])
        assert torch.equal(actual[key], expected[key]) if tensor else actual[key] == expected[key], (context, key)


# ---- tokenizers ---------------------------------------------------------------------------------------------
def test_enough_varied_prompts():
    assert len(set(PROMPTS)) >= 50


def test_clip_tokenizer_parity_with_transformers(tmp_path):
    from transformers import CLIPTokenizer as RefTokenizer

    for name, folder in clip_tokenizer_variants(tmp_path).items():
        ours = load_tokenizer(folder)
        assert isinstance(ours, CLIPTokenizer), name
        assert_same_tokenizer(ours, RefTokenizer.from_pretrained(folder))


def test_clip_tokenizer_batches_and_errors(tmp_path):
    from transformers import CLIPTokenizer as RefTokenizer

    folder = write_tiny_clip_tokenizer(tmp_path / "tok")
    ours, ref = load_tokenizer(folder), RefTokenizer.from_pretrained(folder)
    for kwargs in ({"padding": True}, {"padding": True, "return_tensors": "pt"}, CALLS[0], {"truncation": False}):
        assert_same_encoding(ours(PROMPTS, **kwargs), ref(PROMPTS, **kwargs), kwargs)
    assert ours(PROMPTS[:2], padding="max_length", max_length=77).input_ids == \
        ref(PROMPTS[:2], padding="max_length", max_length=77).input_ids
    with pytest.raises(InputError, match="different lengths"):
        ours(["a cat", "a photo of the dog"], return_tensors="pt")
    with pytest.raises(InputError, match="text"):
        ours([1, 2])
    with pytest.raises(TypeError):
        ours("a cat", pad_to_multiple_of=8)


def test_left_padding_and_truncation_sides(tmp_path):
    from transformers import CLIPTokenizer as RefTokenizer

    folder = write_tiny_clip_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left",
                                                              "truncation_side": "left"}))
    assert_same_tokenizer(load_tokenizer(folder), RefTokenizer.from_pretrained(folder), calls=CALLS[:3])


def test_clip_tokenizer_saves_files_transformers_loads(tmp_path):
    from transformers import CLIPTokenizer as RefTokenizer

    for name, folder in clip_tokenizer_variants(tmp_path / "in").items():
        ours = load_tokenizer(folder)
        ours.save_pretrained(tmp_path / "out" / name)
        assert_same_tokenizer(load_tokenizer(tmp_path / "out" / name), RefTokenizer.from_pretrained(folder))
        assert_same_tokenizer(ours, RefTokenizer.from_pretrained(tmp_path / "out" / name), calls=CALLS[:2])


def test_unreproduced_settings_fall_back_to_transformers(tmp_path, monkeypatch):
    folder = write_tiny_clip_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": ["<x>"]}))
    assert type(load_tokenizer(folder)).__module__.startswith("transformers")
    plain = write_tiny_clip_tokenizer(tmp_path / "plain")
    monkeypatch.setenv("LATENTDIFF_TEXT_BACKEND", "transformers")
    assert type(load_tokenizer(plain)).__module__.startswith("transformers")
    monkeypatch.setenv("LATENTDIFF_TEXT_BACKEND", "fast")
    with pytest.raises(ConfigError, match="LATENTDIFF_TEXT_BACKEND"):
        load_tokenizer(plain)


def test_word_level_tokenizer_parity_with_transformers():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from latentdiff.data.shapes import VOCABULARY

    ours, ref = load_bert_tokenizer(BUILTIN_TOKENIZER), PreTrainedTokenizerFast.from_pretrained(BUILTIN_TOKENIZER)
    assert type(ours) is FastTokenizer
    captions = ["a red circle on the left, blue background", " ".join(VOCABULARY), "A GREEN Square; top-right!",
                "unknown words galore", "red " * 20, "ＲＥＤ circle", "circle,square.triangle"]
    assert_same_tokenizer(ours, ref, prompts=captions + PROMPTS)
    assert_same_tokenizer(load_tokenizer(BUILTIN_TOKENIZER), AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER),
                          prompts=captions, calls=CALLS[:3])


# ---- the text model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_tiny_clip(root, seed=1, hidden_act=request.param, num_hidden_layers=2 if request.param == "quick_gelu" else 5)
    return root


def test_text_model_parity_with_transformers(clip_folder):
    from transformers import CLIPTextModel as RefModel

    ours, ref = load_text_model(clip_folder / "text_encoder"), RefModel.from_pretrained(clip_folder / "text_encoder")
    assert type(ours) is CLIPTextModel and not ours.training
    ids = torch.randint(0, ours.config.vocab_size, (3, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 40] = ours.config.eos_token_id
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
            b = ref(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
            assert_parity(a.last_hidden_state, b.last_hidden_state)
            assert_parity(a.pooler_output, b.pooler_output)
            assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
            for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
                assert_parity(x, y)
            assert a[0] is a.last_hidden_state and ours(ids).hidden_states is None


@pytest.mark.filterwarnings("ignore:prompt truncated")
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_text_encoder_parity_native_against_transformers(clip_folder, layer):
    config = TextEncoderConfig(layer=layer)
    ours = TextEncoder.from_pretrained(clip_folder, "text_encoder", tokenizer_subfolder="tokenizer", config=config)
    from transformers import CLIPTextModel as RefModel
    from transformers import CLIPTokenizer as RefTokenizer

    ref = TextEncoder(RefModel.from_pretrained(clip_folder / "text_encoder").eval(),
                      RefTokenizer.from_pretrained(clip_folder / "tokenizer"), config)
    assert type(ours.model) is CLIPTextModel and type(ours.tokenizer) is CLIPTokenizer
    with torch.no_grad():
        assert_parity(ours(PROMPTS[:8]), ref(PROMPTS[:8]))
        assert torch.equal(ours.tokenize(PROMPTS), ref.tokenize(PROMPTS))
    assert ours.diffusers_entries() == ref.diffusers_entries() == {
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


def test_legacy_pooling_rule():
    config = tiny_clip_config()
    config.eos_token_id = 2  # configs from before transformers' fix: the highest token id marks the end
    ref = random_clip_text_model(config, seed=3)
    ours = CLIPTextModel.from_state_dict(CLIPTextModel.from_file_config(config.to_dict()), ref.state_dict())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 5] = 500
    with torch.no_grad():
        assert_parity(ours(ids).pooler_output, ref(input_ids=ids).pooler_output)


def test_both_key_layouts_and_old_position_ids(clip_folder, tmp_path):
    weights = load_file(clip_folder / "text_encoder" / "model.safetensors")
    expected = load_text_model(clip_folder / "text_encoder").state_dict()
    for name, state in {"prefixed": {"text_model." + k: v for k, v in weights.items()},
                        "old": {**weights, "embeddings.position_ids": torch.arange(77)[None]}}.items():
        shutil.copytree(clip_folder / "text_encoder", tmp_path / name)
        save_file(state, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        loaded = load_text_model(tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_strict_loading_names_keys(clip_folder, tmp_path):
    weights = load_file(clip_folder / "text_encoder" / "model.safetensors")
    cases = {"missing keys": {k: v for k, v in weights.items() if k != "final_layer_norm.bias"},
             "unexpected keys": {**weights, "text_projection.weight": torch.zeros(4, 4)},
             "wrong shapes": {**weights, "final_layer_norm.bias": torch.zeros(3)}}
    for message, state in cases.items():
        folder = tmp_path / message.replace(" ", "_")
        shutil.copytree(clip_folder / "text_encoder", folder)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message) as info:
            load_text_model(folder)
        assert "final_layer_norm.bias" in str(info.value) or "text_projection" in str(info.value)
        with pytest.raises(CheckpointError, match=message):
            CLIPTextModel.from_pretrained(folder)


def test_config_keys_are_checked_and_other_models_use_transformers(clip_folder, tmp_path):
    data = json.loads((clip_folder / "text_encoder" / "config.json").read_text())
    for change, key in (({"rope_theta": 1.0}, "rope_theta"), ({"hidden_act": "gelu_new"}, "hidden_act"),
                        ({"attention_dropout": 0.1}, "attention_dropout"),
                        ({"architectures": ["CLIPTextModelWithProjection"]}, "architectures")):
        with pytest.raises(ConfigError, match=key):
            CLIPTextModel.from_file_config({**data, **change}, source="config.json")
    folder = tmp_path / "gelu_new"
    shutil.copytree(clip_folder / "text_encoder", folder)
    (folder / "config.json").write_text(json.dumps({**data, "hidden_act": "gelu_new"}))
    assert type(load_text_model(folder)).__module__.startswith("transformers")  # transformers implements it
    assert type(load_text_model(clip_folder / "text_encoder", backend="transformers")).__module__.startswith(
        "transformers")


def test_saved_folder_loads_in_transformers(clip_folder, tmp_path):
    from transformers import CLIPTextModel as RefModel

    encoder = TextEncoder.from_pretrained(clip_folder, "text_encoder", tokenizer_subfolder="tokenizer",
                                          config=TextEncoderConfig(layer="penultimate"))
    encoder.save_pretrained(tmp_path / "text_encoder", tokenizer_directory=tmp_path / "tokenizer")
    ref = RefModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = encoder.tokenize(PROMPTS[:4])
    with torch.no_grad():   # the tower is written truncated (as SD 2.x folders are): its output is the penultimate
        assert_parity(ref(input_ids=ids).last_hidden_state, encoder.encode_ids(ids))
    assert ref.config.hidden_act == encoder.model.config.hidden_act
    reloaded = TextEncoder.from_pretrained(tmp_path, "text_encoder", tokenizer_subfolder="tokenizer")
    with torch.no_grad():
        assert torch.equal(reloaded(PROMPTS[:4]), encoder(PROMPTS[:4]))
    direct = tmp_path / "direct"  # the model alone, flat keys: transformers reads that layout too
    encoder.model.save_pretrained(direct)
    assert_parity(RefModel.from_pretrained(direct).eval()(input_ids=ids).last_hidden_state.detach(),
                  encoder.model(ids).last_hidden_state.detach())


# ---- cold loads ---------------------------------------------------------------------------------------------
def test_stable_diffusion_loads_and_runs_without_transformers(tmp_path):
    from tests._support.sd import tiny_diffusers_pipeline

    tiny_diffusers_pipeline(tmp_path).save_pretrained(tmp_path / "sd")
    run_without_transformers(f"""
        from latentdiff import LatentDiffusionPipeline
        pipe = LatentDiffusionPipeline.from_pretrained({str(tmp_path / "sd")!r})
        pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np", progress=False)
        pipe.save_pretrained({str(tmp_path / "saved")!r})
    """)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    import diffusers  # the saved folder stays a diffusers folder

    diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)


def test_builtin_model_loads_and_runs_without_transformers(tmp_path):
    run_without_transformers(f"""
        from latentdiff import LatentDiffusionPipeline
        from latentdiff.builtin import DEFAULT_MODEL
        pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
        pipe("a red circle on the left", num_inference_steps=2, output_type="np", progress=False)
        pipe.save_pretrained({str(tmp_path / "saved")!r})
    """)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast.from_pretrained(tmp_path / "saved" / "tokenizer")
    assert ref(["a red circle"])["input_ids"] == load_bert_tokenizer(tmp_path / "saved" / "tokenizer")(
        ["a red circle"])["input_ids"]


def test_from_pretrained_does_not_import_the_compiler():
    # Building on the meta device used to run nn.Embedding's normal_ through torch's Python decompositions,
    # which import torch._dynamo (~0.8 s of a cold load); init_skipped_on_meta() leaves meta tensors alone.
    run_without_transformers("""
        from latentdiff import LatentDiffusionPipeline
        from latentdiff.builtin import DEFAULT_MODEL
        pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
        assert 'torch._dynamo' not in sys.modules, 'from_pretrained imported torch._dynamo'
    """)


def test_init_is_skipped_on_meta_only():
    import torch
    from torch import nn

    from latentdiff.models.base import init_skipped_on_meta

    original = nn.init.normal_
    real = torch.zeros(64)
    with init_skipped_on_meta():
        meta = torch.empty(4, device="meta")
        assert nn.init.normal_(meta) is meta
        nn.init.normal_(real)                       # real tensors are initialised as usual
        layer = nn.Linear(8, 8)                     # and so are real modules built inside the block
    assert nn.init.normal_ is original
    assert real.abs().sum() > 0 and layer.weight.abs().sum() > 0
