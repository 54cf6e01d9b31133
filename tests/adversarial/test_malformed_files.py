"""Malformed files and Python-API inputs (issue 14, "every malformed input is a latentdiff error"): each one a
latentdiff error naming the file (or argument), the key, what was expected and what was found; never a raw
KeyError / TypeError / RuntimeError / AssertionError from the layers below, and never silently accepted."""
from __future__ import annotations

import io
import json
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latentdiff import hub
from latentdiff.errors import CheckpointError, InputError
from latentdiff.models.autoencoder_kl import AutoencoderKL
from tests._support.malformed import (
    assert_latentdiff_error,
    first_tensor,
    read_safetensors,
    saved_metadata,
    tiny_files,
    with_metadata,
    write_safetensors,
)
from tests._support.tiny_clip import write_tiny_clip_tokenizer

clear = pytest.mark.outcome("clear_error", fails_as="crash")
silent = pytest.mark.outcome("clear_error", fails_as="unclear")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("malformed"))


def load_weights_file(path):
    return hub.load_safetensors(path)


# ---- safetensors headers ----------------------------------------------------------------------------------------
def broken_header(files, tmp_path, mutate):
    header, data = read_safetensors(files["weights"])
    return write_safetensors(tmp_path / "bad.safetensors", mutate(header), data)


@clear
def test_header_that_is_a_json_list(files, tmp_path):
    path = broken_header(files, tmp_path, lambda h: list(h))
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    assert_latentdiff_error(error.value, str(path), "not a JSON object", "expected:", "found: list")


@clear
def test_header_entry_without_data_offsets(files, tmp_path):
    def drop(h):
        key = first_tensor(h)
        return {**h, key: {k: v for k, v in h[key].items() if k != "data_offsets"}}

    path = broken_header(files, tmp_path, drop)
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    key = first_tensor(read_safetensors(files["weights"])[0])
    assert_latentdiff_error(error.value, str(path), key, "data_offsets", "missing")


@clear
def test_header_with_string_offsets(files, tmp_path):
    def stringify(h):
        key = first_tensor(h)
        return {**h, key: {**h[key], "data_offsets": [str(o) for o in h[key]["data_offsets"]]}}

    path = broken_header(files, tmp_path, stringify)
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    assert_latentdiff_error(error.value, str(path), "data_offsets", "[begin, end]", "found:")


@clear
def test_header_entry_that_is_a_string(files, tmp_path):
    path = broken_header(files, tmp_path, lambda h: {**h, first_tensor(h): "F32"})
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    assert_latentdiff_error(error.value, str(path), first_tensor(read_safetensors(files["weights"])[0]),
                            "not an object", '"F32"')


@clear
def test_header_with_negative_shape_and_list_metadata(files, tmp_path):
    def negative(h):
        key = first_tensor(h)
        return {**h, key: {**h[key], "shape": [-1]}}

    path = broken_header(files, tmp_path, negative)
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    assert_latentdiff_error(error.value, str(path), ".shape", "ints >= 0")
    path = broken_header(files, tmp_path, lambda h: {**h, "__metadata__": ["format", "pt"]})
    with pytest.raises(CheckpointError) as error:
        load_weights_file(path)
    assert_latentdiff_error(error.value, "__metadata__", "str -> str", "list")


# ---- weights of the wrong kind ----------------------------------------------------------------------------------
def folder_with(files, tmp_path, change):
    """A copy of the tiny model folder whose weights file holds `change(state)`."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((files["folder"] / "config.json").read_bytes())
    state = change(dict(load_file(files["weights"])))
    if isinstance(state, dict) and all(v.device.type != "meta" for v in state.values()):
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


KEY = "encoder.conv_in.weight"


@clear
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_weights(files, tmp_path, dtype):
    folder = folder_with(files, tmp_path, lambda s: s | {KEY: s[KEY].to(dtype)})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_pretrained(folder)
    assert_latentdiff_error(error.value, str(folder), KEY, "floating-point", str(dtype))


@silent
def test_complex_weights_are_refused_not_silently_cast(files, tmp_path):
    folder = folder_with(files, tmp_path, lambda s: s | {KEY: s[KEY].to(torch.complex64)})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_pretrained(folder)
    assert_latentdiff_error(error.value, KEY, "real floating-point", "complex64")


@clear
def test_meta_device_tensor_in_a_pickle(files, tmp_path):
    folder = folder_with(files, tmp_path, lambda s: s | {KEY: torch.empty(s[KEY].shape, device="meta")})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_pretrained(folder)
    assert_latentdiff_error(error.value, "diffusion_pytorch_model.bin", KEY, "meta")


# ---- single files: what the pickle holds ----------------------------------------------------------------------
@clear
@pytest.mark.parametrize("state_dict", [[1, 2], "model.diffusion_model"], ids=["list", "string"])
def test_single_file_state_dict_of_the_wrong_type(tmp_path, state_dict):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 1}, path)
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "state_dict", "a dict of name -> tensor", "found:")


@clear
def test_single_file_state_dict_that_is_the_lightning_stand_in(tmp_path, monkeypatch):
    """Old Lightning checkpoints key callback states by a class; the one allowed name resolves to an inert
    stand-in. A file whose state_dict *is* that class is refused, not called with `.items()`."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ModelCheckpoint, "callbacks": {ModelCheckpoint: {}}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "state_dict", "expected:", "found:")


# ---- single files: latentdiff's metadata --------------------------------------------------------------------------
def single_with(files, tmp_path, change):
    header, data = read_safetensors(files["single"])
    return write_safetensors(tmp_path / "single.safetensors", with_metadata(header, change(saved_metadata(header))),
                             data)


@clear
def test_metadata_configs_a_string(files, tmp_path):
    path = single_with(files, tmp_path, lambda m: {**m, "configs": "vae"})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "__metadata__.latentdiff.configs", "JSON object", "found: str")


@silent
def test_metadata_family_a_list(files, tmp_path):
    path = single_with(files, tmp_path, lambda m: {**m, "family": ["vae"]})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "latentdiff.family", "sd1", "list")


@clear
def test_metadata_unknown_hidden_act(files, tmp_path):
    text = {"model_type": "clip_text_model", "hidden_act": "swish", "vocab_size": 10, "hidden_size": 64,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, "max_position_embeddings": 8}
    path = single_with(files, tmp_path, lambda m: {**m, "configs": {**m["configs"], "text_encoder": text}})
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "configs.text_encoder", "hidden_act", "quick_gelu", "'swish'")


@clear
def test_two_element_scale_factor(files, tmp_path):
    state = load_file(files["single"]) | {"scale_factor": torch.tensor([0.18215, 0.5])}
    path = tmp_path / "scaled.safetensors"
    save_file(state, path)  # no latentdiff metadata: the layout is inferred, the scale read from the buffer
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_single_file(path)
    assert_latentdiff_error(error.value, str(path), "scale_factor", "one-element", "shape (2,)")


# ---- tokenizers ------------------------------------------------------------------------------------------------
def clip_tokenizer_folder(tmp_path, **files):
    folder = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text, encoding="utf-8")
    return folder


@clear
@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]"], ids=["not-json", "a-list"])
def test_broken_vocab_json(tmp_path, text):
    from latentdiff.models.tokenizers import load_clip_tokenizer

    folder = clip_tokenizer_folder(tmp_path, vocab_json=text)
    with pytest.raises(CheckpointError) as error:
        load_clip_tokenizer(folder)
    assert_latentdiff_error(error.value, "vocab.json", "malformed tokenizer", "expected:")


@clear
def test_broken_merges_txt(tmp_path):
    from latentdiff.models.tokenizers import load_clip_tokenizer

    folder = clip_tokenizer_folder(tmp_path, merges_txt="#version: 0.2\np h o t o\nq\n")
    with pytest.raises(CheckpointError) as error:
        load_clip_tokenizer(folder)
    assert_latentdiff_error(error.value, "merges.txt", "malformed tokenizer")


def word_level_tokenizer(folder, vocab, *, pattern=None):
    """A tokenizer.json folder (WordLevel, [CLS] ... [SEP] template) that latentdiff's FastTokenizer loads."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated") if pattern else \
        pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8, "pad_token": "[PAD]",
        "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}))
    return folder


@silent
def test_tokenizer_ids_past_the_embedding_table(tmp_path):
    """An id the text model has no embedding for used to surface as an IndexError at generation time (a
    device-side assert on CUDA): refused when tokenizer and model meet."""
    from latentdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
    from latentdiff.models.text_encoder import TextEncoder
    from latentdiff.models.tokenizers import load_fast_tokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "circle": 5000}
    tokenizer = load_fast_tokenizer(word_level_tokenizer(tmp_path / "tok", vocab))
    model = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=2,
                                         eos_token_id=3, pad_token_id=0, projection_dim=8))
    with pytest.raises(CheckpointError) as error:
        TextEncoder(model, tokenizer)
    assert_latentdiff_error(error.value, str(tmp_path / "tok"), "'circle'", "5000", "[0, 16)")


@clear
def test_catastrophic_backtracking_pre_tokenizer(tmp_path):
    """Oniguruma gives up on `(a+)+$` over a long run of a's: tokenizers panics (a PanicException, which is a
    BaseException); latentdiff names the tokenizer instead."""
    from latentdiff.models.tokenizers import load_fast_tokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4}
    tokenizer = load_fast_tokenizer(word_level_tokenizer(tmp_path / "tok", vocab, pattern="(a+)+$"))
    with pytest.raises(CheckpointError) as error:
        tokenizer(["a" * 40 + "b"])
    assert_latentdiff_error(error.value, str(tmp_path / "tok"), "tokenizing", "PanicException")


# ---- the Python API ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def img2img(tmp_path_factory):
    from latentdiff.pipelines.image_to_image import ImageToImagePipeline
    from tests._support.tiny_builtin import make_tiny_shapes_model

    folder = make_tiny_shapes_model(tmp_path_factory.mktemp("shapes") / "shapes-64")
    return ImageToImagePipeline.from_pretrained(folder)


@clear
def test_lazily_opened_truncated_png_as_image(img2img, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:-40])   # the end of the pixel data and IEND are gone
    image = Image.open(path)                    # lazy: nothing decoded yet
    with pytest.raises(InputError) as error:
        img2img("a red circle", image=image, num_inference_steps=1, progress=False)
    assert_latentdiff_error(error.value, "where: image", "cannot be decoded", str(path))


@clear
@pytest.mark.parametrize("name", ["x/..", "owner/na me", "a--b/c"])
def test_from_pretrained_with_an_invalid_hub_id(name):
    with pytest.raises(CheckpointError) as error:
        AutoencoderKL.from_pretrained(name)
    assert_latentdiff_error(error.value, f"where: {name}", "Hub id", "found:")


@clear
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_cuda(files, img2img):
    with pytest.raises(InputError) as error:
        AutoencoderKL.from_pretrained(files["folder"], device="cuda")
    assert_latentdiff_error(error.value, "where: device", "not available", "found: cuda")
    with pytest.raises(InputError) as error:
        img2img.to("cuda")
    assert_latentdiff_error(error.value, "where: device", "cpu")
    with pytest.raises(InputError) as error:
        img2img.to("cuda:banana")
    assert_latentdiff_error(error.value, "not a torch device", "'cuda:banana'")
