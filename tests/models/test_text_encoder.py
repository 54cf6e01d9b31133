"""TextEncoder: parity with transformers and with diffusers' encode_prompt, padding and truncation, loading
(local folders, diffusers layout, an offline Hub cache), saving, and errors."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.text_encoder import CONFIG_FILE, TextEncoder, TextEncoderConfig
from tests._support.hub_cache import make_hub_cache
from tests._support.parity import assert_parity
from tests._support.tiny_clip import BOS, EOS, TINY_VOCAB_SIZE, make_tiny_clip, random_clip_text_model, tiny_clip_config

PROMPTS = ["a photo of the cat", "", "A DOG, photographed at night; 3 stars!"]
LONG_PROMPT = "the cat " * 60  # 120 words -> 122 tokens with start and end


@dataclass
class Tiny:
    root: Path
    model_dir: Path
    tokenizer_dir: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny_sd")
    return Tiny(root, *make_tiny_clip(root, seed=0))


def reference(tiny: Tiny):
    """The same weights and tokenizer straight from transformers: the oracle."""
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTextModel.from_pretrained(tiny.model_dir).eval(), CLIPTokenizer.from_pretrained(tiny.tokenizer_dir)


class DiffusersView:
    """What diffusers' encode_prompt reads from `self.text_encoder`. diffusers 0.42 reaches the final layer norm
    as `text_encoder.text_model.final_layer_norm` (the transformers 4 layout), which transformers 5 flattened
    into the model itself; this view points that path at the same module, so clip_skip runs unchanged."""

    def __init__(self, model):
        self.model, self.config, self.dtype = model, model.config, model.dtype
        self.text_model = getattr(model, "text_model", model)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@torch.no_grad()
def diffusers_encode(model, tokenizer, prompts, *, clip_skip=None) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline.encode_prompt on (model, tokenizer): (B, 77, D)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    holder = SimpleNamespace(text_encoder=DiffusersView(model), tokenizer=tokenizer, unet=None)
    embeds, _ = StableDiffusionPipeline.encode_prompt(holder, prompts, torch.device("cpu"), 1, False,
                                                      clip_skip=clip_skip)
    return embeds


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_parity(actual, expected)
    assert torch.equal(actual, expected)  # same weights, same ops on the CPU: bit-identical


# ---- the tiny tokenizer helper ---------------------------------------------------------------
def test_tiny_tokenizer_loads_in_every_clip_tokenizer_class(tiny):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    vocab = json.loads((tiny.tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == TINY_VOCAB_SIZE and vocab[EOS] == TINY_VOCAB_SIZE - 1
    ids = [cls.from_pretrained(tiny.tokenizer_dir)(PROMPTS[0])["input_ids"]
           for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer)]
    assert ids[0] == ids[1] == ids[2]
    words = [BOS, "a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>", EOS]  # whole-word merges apply
    assert ids[0] == [vocab[w] for w in words]


# ---- parity ----------------------------------------------------------------------------------
def test_last_layer_parity_with_transformers_and_diffusers(tiny):
    model, tokenizer = reference(tiny)
    encoder = TextEncoder.from_pretrained(tiny.root, "text_encoder", tokenizer_subfolder="tokenizer")
    assert encoder.max_length == 77 and encoder.hidden_size == 32
    expected_ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(encoder.tokenize(PROMPTS), expected_ids)
    with torch.no_grad():
        actual = encoder(PROMPTS)
        assert actual.shape == (3, 77, 32)
        assert_same(actual, model(expected_ids).last_hidden_state)
        assert_same(encoder.encode_ids(expected_ids), actual)
    assert_same(actual, diffusers_encode(model, tokenizer, PROMPTS))


def test_penultimate_layer_matches_diffusers_clip_skip(tiny):
    model, tokenizer = reference(tiny)
    last = TextEncoder.from_pretrained(tiny.root, "text_encoder", tokenizer_subfolder="tokenizer")
    penultimate = TextEncoder(last.model, last.tokenizer, TextEncoderConfig(layer="penultimate"))
    raw = TextEncoder(last.model, last.tokenizer, TextEncoderConfig(layer="penultimate", apply_final_norm=False))
    with torch.no_grad():
        actual = penultimate(PROMPTS)
        hidden = model(last.tokenize(PROMPTS), output_hidden_states=True).hidden_states
        assert_same(raw(PROMPTS), hidden[-2])
        assert not torch.allclose(actual, last(PROMPTS), atol=1e-3)  # a different layer, really
    assert_same(actual, diffusers_encode(model, tokenizer, PROMPTS, clip_skip=1))


def test_sd2_like_gelu_penultimate(tmp_path):
    model_dir, tokenizer_dir = make_tiny_clip(tmp_path, seed=1, hidden_act="gelu", num_hidden_layers=5)
    (model_dir / CONFIG_FILE).write_text(json.dumps({"layer": "penultimate"}))
    encoder = TextEncoder.from_pretrained(tmp_path, "text_encoder", tokenizer_subfolder="tokenizer")
    assert encoder.config.layer == "penultimate" and encoder.model.config.hidden_act == "gelu"
    from transformers import CLIPTextModel, CLIPTokenizer

    model, tokenizer = CLIPTextModel.from_pretrained(model_dir).eval(), CLIPTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        actual = encoder(PROMPTS)
    assert_same(actual, diffusers_encode(model, tokenizer, PROMPTS, clip_skip=1))


# ---- padding, truncation, batches ------------------------------------------------------------
def test_long_prompt_truncates_with_one_warning(tiny):
    model, tokenizer = reference(tiny)
    encoder = TextEncoder(model, tokenizer)
    dropped = len(tokenizer(LONG_PROMPT)["input_ids"]) - 77
    assert dropped > 0
    with pytest.warns(UserWarning, match=rf"truncated to 77 tokens: {dropped} token\(s\) dropped"):
        ids = encoder.tokenize([LONG_PROMPT, "a cat"])
    assert torch.equal(ids, tokenizer([LONG_PROMPT, "a cat"], padding="max_length", max_length=77,
                                      truncation=True, return_tensors="pt").input_ids)
    assert ids[0, -1] == tokenizer.eos_token_id  # truncation keeps the end token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = encoder([LONG_PROMPT])
    assert out.shape == (1, 77, 32) and not caught  # warned once per encoder
    assert_same(out, diffusers_encode(model, tokenizer, [LONG_PROMPT]))


def test_prompt_of_exactly_max_length_does_not_warn(tiny):
    model, tokenizer = reference(tiny)
    encoder = TextEncoder(model, tokenizer)
    exact = " ".join(["cat"] * 75)  # 75 words + start + end = 77 tokens
    assert len(tokenizer(exact)["input_ids"]) == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.tokenize(exact).shape == (1, 77)


def test_batch_rows_are_independent_and_string_is_a_batch_of_one(tiny):
    encoder = TextEncoder(*reference(tiny))
    with torch.no_grad():
        batch = encoder(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            single = encoder(prompt)
            assert single.shape == (1, 77, 32)
            assert_parity(single[0], batch[i])
        empty = encoder("")
    assert torch.isfinite(empty).all()
    assert encoder.tokenize("")[0, :2].tolist() == [encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id]


def test_custom_max_length(tiny):
    model, tokenizer = reference(tiny)
    encoder = TextEncoder(model, tokenizer, TextEncoderConfig(max_length=16))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad(), pytest.warns(UserWarning, match="truncated to 16 tokens"):
        actual = encoder(PROMPTS)
    assert actual.shape == (3, 16, 32)
    with torch.no_grad():
        assert_same(actual, model(ids).last_hidden_state)
    with pytest.raises(ConfigError, match="max_length"):
        TextEncoder(model, tokenizer, TextEncoderConfig(max_length=78))


# ---- saving and loading ----------------------------------------------------------------------
def test_save_load_round_trip_diffusers_layout(tiny, tmp_path):
    encoder = TextEncoder(*reference(tiny), TextEncoderConfig(layer="penultimate"))
    root = tmp_path / "pipe"
    encoder.save_pretrained(root / "text_encoder", tokenizer_directory=root / "tokenizer")
    assert (root / "text_encoder" / "model.safetensors").is_file()
    assert not list((root / "text_encoder").glob("*.bin")) and (root / "tokenizer").is_dir()
    loaded = TextEncoder.from_pretrained(root, subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    # the penultimate layer is written as diffusers' SD 2.x folders are: the tower without its last layer, read
    # at its (last) output, so that every reader of the folder conditions on the same layer
    assert loaded.config == TextEncoderConfig(layer="last")
    assert loaded.model.config.num_hidden_layers == encoder.model.config.num_hidden_layers - 1
    with torch.no_grad():
        assert_same(loaded(PROMPTS), encoder(PROMPTS))
    # the folders are plain transformers folders, with the `text_model.` keys older loaders expect
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    with safe_open(root / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    plain = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    written, own = plain.state_dict(), encoder.model.state_dict()
    last = encoder.model.config.num_hidden_layers - 1
    assert set(written) == {k for k in own if f"layers.{last}." not in k}   # all but the last layer
    assert all(torch.equal(written[k], own[k]) for k in written)
    assert CLIPTokenizer.from_pretrained(root / "tokenizer")(PROMPTS)["input_ids"] == \
        encoder.tokenizer(PROMPTS)["input_ids"]
    # one folder for both, as transformers users keep them
    single = encoder.save_pretrained(tmp_path / "single")
    with torch.no_grad():
        assert_same(TextEncoder.from_pretrained(single)(PROMPTS), encoder(PROMPTS))


def test_interrupted_save_leaves_old_folder(tiny, tmp_path, monkeypatch):
    encoder = TextEncoder(*reference(tiny))
    dest = tmp_path / "saved"
    dest.mkdir()
    (dest / "old.txt").write_text("previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(encoder.tokenizer, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        encoder.save_pretrained(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    with pytest.raises(InputError, match="inside the tokenizer folder"):
        encoder.save_pretrained(tmp_path / "a" / "model", tokenizer_directory=tmp_path / "a")


def test_folder_with_only_a_pickle_loads(tiny, tmp_path):
    from safetensors.torch import load_file

    shutil.copytree(tiny.root, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    expected = TextEncoder.from_pretrained(tiny.root, "text_encoder", tokenizer_subfolder="tokenizer")
    loaded = TextEncoder.from_pretrained(tmp_path, "text_encoder", tokenizer_subfolder="tokenizer")
    with torch.no_grad():
        assert_same(loaded(PROMPTS), expected(PROMPTS))


def test_dtype_and_device_options(tiny):
    encoder = TextEncoder.from_pretrained(tiny.root, "text_encoder", tokenizer_subfolder="tokenizer",
                                          torch_dtype=torch.bfloat16, device="cpu")
    assert encoder.dtype == torch.bfloat16 and encoder.device == torch.device("cpu")
    with torch.no_grad():
        assert encoder(PROMPTS[:1]).dtype == torch.bfloat16


def test_loads_from_offline_hub_cache_without_network(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "someone/tiny-sd", tiny.root)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    from huggingface_hub.utils import _http

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", no_network)  # any Hub HTTP client would be built here
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = TextEncoder.from_pretrained(tiny.root, "text_encoder", tokenizer_subfolder="tokenizer")
    encoder = TextEncoder.from_pretrained("someone/tiny-sd", "text_encoder", tokenizer_subfolder="tokenizer",
                                          cache_dir=cache)
    with torch.no_grad():
        assert_same(encoder(PROMPTS), expected(PROMPTS))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert TextEncoder.from_pretrained("someone/tiny-sd", "text_encoder", tokenizer_subfolder="tokenizer",
                                       cache_dir=cache, local_files_only=True).max_length == 77
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        TextEncoder.from_pretrained("someone/other", "text_encoder", cache_dir=cache, local_files_only=True)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_tokenizer_names_folder_and_tokenizer_argument(tiny, tmp_path):
    shutil.copytree(tiny.model_dir, tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="pass tokenizer=") as info:
        TextEncoder.from_pretrained(tmp_path, "text_encoder", tokenizer_subfolder="tokenizer")
    assert str(tmp_path / "tokenizer") in str(info.value)
    with pytest.raises(CheckpointError, match="pass tokenizer="):
        TextEncoder.from_pretrained(tmp_path / "text_encoder")
    from transformers import CLIPTokenizer

    encoder = TextEncoder.from_pretrained(tmp_path, "text_encoder",
                                          tokenizer=CLIPTokenizer.from_pretrained(tiny.tokenizer_dir))
    assert encoder.tokenize("a cat").shape == (1, 77)


def test_bad_checkpoints_raise_checkpoint_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as info:
        TextEncoder.from_pretrained(tiny.root, "unet", tokenizer_subfolder="tokenizer")
    assert "unet" in str(info.value)
    bad = tmp_path / "bad"
    shutil.copytree(tiny.root, bad)
    config_path = bad / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))  # a weight the file lacks
    with pytest.raises(CheckpointError, match="missing keys") as info:
        TextEncoder.from_pretrained(bad, "text_encoder", tokenizer_subfolder="tokenizer")
    assert str(bad / "text_encoder") in str(info.value)
    config_path.write_text(json.dumps({**config, "intermediate_size": 40}))  # weights of the wrong shape
    with pytest.raises(CheckpointError, match="could not load the text encoder"):
        TextEncoder.from_pretrained(bad, "text_encoder", tokenizer_subfolder="tokenizer")
    config_path.write_text(json.dumps(config))
    weights = bad / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        TextEncoder.from_pretrained(bad, "text_encoder", tokenizer_subfolder="tokenizer")
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        TextEncoder.from_pretrained(bad, "text_encoder", tokenizer_subfolder="tokenizer")


def test_config_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="layer"):
        TextEncoderConfig(layer="middle")
    with pytest.raises(ConfigError, match="max_length"):
        TextEncoderConfig(max_length=1)
    folder = tmp_path / "te"
    shutil.copytree(tiny.root, folder)
    (folder / "text_encoder" / CONFIG_FILE).write_text(json.dumps({"layer": "last", "clip_skip": 2}))
    with pytest.raises(ConfigError, match="clip_skip"):
        TextEncoder.from_pretrained(folder, "text_encoder", tokenizer_subfolder="tokenizer")
    model, tokenizer = reference(tiny)
    with pytest.raises(ConfigError, match="TextEncoderConfig"):
        TextEncoder(model, tokenizer, {"layer": "last"})
    del model.final_layer_norm  # a model whose final norm cannot be found
    with pytest.raises(ConfigError, match="final layer norm"):
        TextEncoder(model, tokenizer, TextEncoderConfig(layer="penultimate"))
    TextEncoder(model, tokenizer, TextEncoderConfig(layer="penultimate", apply_final_norm=False))


def test_bad_inputs_raise_input_errors(tiny):
    encoder = TextEncoder(*reference(tiny))
    for bad in ([], 3, ["a cat", None], None):
        with pytest.raises(InputError, match="prompts"):
            encoder(bad)
    with pytest.raises(InputError, match="integer token ids"):
        encoder.encode_ids(torch.zeros(1, 77))
    with pytest.raises(InputError, match="integer token ids"):
        encoder.encode_ids(torch.zeros(77, dtype=torch.long))
    with pytest.raises(InputError, match="position embeddings"):
        encoder.encode_ids(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(InputError, match="position embeddings"):  # no tokens at all: not even the start token
        encoder.encode_ids(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="integer token ids"):
        encoder.encode_ids(torch.zeros(1, 77, dtype=torch.complex64))


def test_registry_and_model_index_entries(tiny):
    import transformers

    assert TextEncoder.registry_name == "text_encoder"  # set by COMPONENTS.register("text_encoder")
    encoder = TextEncoder(*reference(tiny))
    entries = encoder.diffusers_entries()
    assert set(entries) == {"text_encoder", "tokenizer"}
    for (library, name), part in zip(entries.values(), (encoder.model, encoder.tokenizer), strict=True):
        assert library == "transformers" and getattr(transformers, name) is type(part)
    assert entries["text_encoder"][1] == "CLIPTextModel"


def test_import_does_not_load_transformers():
    code = "import sys, latentdiff.models.text_encoder; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- Stable Diffusion v1.5 size --------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_text_model():
    """CLIP ViT-L/14's text tower as in SD v1.5's text_encoder/config.json, random weights."""
    config = tiny_clip_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)
    config.bos_token_id, config.eos_token_id, config.pad_token_id, config.projection_dim = 0, 2, 1, 768
    return random_clip_text_model(config, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_sd15_text_encoder_parity(sd15_text_model, tiny, layer):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.tokenizer_dir)
    encoder = TextEncoder(sd15_text_model, tokenizer, TextEncoderConfig(layer=layer))
    prompts = PROMPTS[:2]
    with torch.no_grad():
        actual = encoder(prompts)
    assert actual.shape == (2, 77, 768)
    assert_same(actual, diffusers_encode(sd15_text_model, tokenizer, prompts,
                                         clip_skip=1 if layer == "penultimate" else None))


def test_a_tokenizer_left_to_transformers_says_why_in_the_debug_log(tmp_path, caplog):
    """A tokenizer.json the native classes do not reproduce (no post-processor) goes to transformers; a debug
    line names the folder and the reason, so a user can see which setting sent it there."""
    import json
    import logging

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from latentdiff.models.text_encoder import _native_tokenizer

    backend = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "red": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with caplog.at_level(logging.DEBUG, logger="latentdiff.models.text_encoder"):
        assert _native_tokenizer(tmp_path, ["tokenizer.json", "tokenizer_config.json"]) is None
    assert str(tmp_path) in caplog.text and "post-processor" in caplog.text
