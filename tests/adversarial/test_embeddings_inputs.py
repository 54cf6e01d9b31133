"""Hardening cases for textual-inversion embeddings (issue 16, adapters/embeddings.py): truncated and hostile files,
the wrong width, a taken token, absurd sizes. Each is a latentdiff error naming the file (and key, bound, value)
raised before anything is allocated, and the pipeline's tokenizer and token table are unchanged after it."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import CheckpointError, InputError
from latentdiff.adapters.embeddings import token_table
from latentdiff.limits import MAX_EMBEDDING_FILE_BYTES, MAX_EMBEDDING_VECTORS
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.bounded import run_bounded
from tests._support.tiny_builtin import make_tiny_shapes_model

WIDTH = 32      # the stand-in's LDMBert width


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LatentDiffusionPipeline.from_pretrained(make_tiny_shapes_model(tmp_path_factory.mktemp("m") / "shapes"))


@pytest.fixture
def unchanged(pipe):
    """Asserts after the case that the tokenizer and the token table are the very objects, with the same values."""
    encoder = pipe.text_encoder
    tokenizer, weight = encoder.tokenizer, token_table(encoder.model).weight
    saved = weight.detach().clone()
    yield
    assert encoder.tokenizer is tokenizer and token_table(encoder.model).weight is weight
    assert torch.equal(weight, saved) and encoder.token_expansions == {}


def write_safetensors_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_truncated_safetensors(pipe, unchanged, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"emb_params": torch.randn(4, WIDTH)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as error:
        pipe.load_textual_inversion(path)
    assert str(path) in str(error.value)


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_truncated_pt(pipe, unchanged, tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"string_to_param": {"*": torch.randn(4, WIDTH)}, "name": "x"}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as error:
        pipe.load_textual_inversion(path)
    assert str(path) in str(error.value)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.outcome("clear_error", fails_as="security")
def test_a_pickle_with_code_is_not_run(pipe, unchanged, tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": Payload(str(marker))}}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to unpickle") as error:
        pipe.load_textual_inversion(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.outcome("clear_error", fails_as="unclear")
def test_wrong_width_names_file_key_expected_and_found(pipe, unchanged, tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file({"emb_params": torch.randn(3, 1024)}, str(path))
    with pytest.raises(CheckpointError) as error:
        pipe.load_textual_inversion(path)
    message = str(error.value)
    assert f"{path}: emb_params" in message and f"width {WIDTH}" in message and "(3, 1024)" in message


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_a_token_of_the_vocabulary_is_refused(pipe, unchanged, tmp_path):
    path = tmp_path / "red.safetensors"
    save_file({"emb_params": torch.randn(1, WIDTH)}, str(path))
    with pytest.raises(InputError, match="already in the tokenizer") as error:
        pipe.load_textual_inversion(path)                     # the stem "red" is a word of the model
    assert "token" in str(error.value) and "'red'" in str(error.value)


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_a_failed_second_file_of_a_list_loads_neither(pipe, unchanged, tmp_path):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"emb_params": torch.randn(2, WIDTH)}, str(good))
    save_file({"emb_params": torch.full((2, WIDTH), float("nan"))}, str(bad))
    with pytest.raises(CheckpointError, match="NaN") as error:
        pipe.load_textual_inversion([good, bad])
    assert f"{bad}: emb_params" in str(error.value)


@pytest.mark.outcome("clear_error", fails_as="unclear")
def test_too_many_vectors_names_the_bound(pipe, unchanged, tmp_path):
    path = tmp_path / "long.safetensors"
    save_file({"emb_params": torch.randn(MAX_EMBEDDING_VECTORS + 1, WIDTH)}, str(path))
    with pytest.raises(CheckpointError) as error:
        pipe.load_textual_inversion(path)
    assert str(MAX_EMBEDDING_VECTORS) in str(error.value) and f"({MAX_EMBEDDING_VECTORS + 1}, {WIDTH})" in \
        str(error.value)


@pytest.mark.outcome("clear_error", fails_as="unclear")
@pytest.mark.parametrize("state", [{"a": torch.zeros(WIDTH), "b": torch.zeros(WIDTH)}, ["not", "a", "dict"],
                                   {"emb_params": torch.zeros(2, 2, WIDTH)},
                                   {"emb_params": torch.zeros(3, dtype=torch.int64)}])
def test_not_an_embedding(pipe, unchanged, tmp_path, state):
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        pipe.load_textual_inversion(path)
    assert str(path) in str(error.value)


@pytest.mark.outcome("clear_error", fails_as="security")
def test_weight_name_outside_the_folder(pipe, unchanged, tmp_path):
    (tmp_path / "folder").mkdir()
    torch.save({"<x>": torch.zeros(WIDTH)}, tmp_path / "outside.bin")
    with pytest.raises(CheckpointError, match="outside its folder") as error:
        pipe.load_textual_inversion(tmp_path / "folder", weight_name="../outside.bin")
    assert "weight_name" in str(error.value)


@pytest.mark.outcome("clear_error", fails_as="unclear")
def test_unknown_token_to_unload_lists_the_loaded(pipe, unchanged):
    with pytest.raises(InputError, match="no textual-inversion embedding is loaded"):
        pipe.unload_textual_inversion("nothing")


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_header_claiming_a_terabyte_is_refused_bounded(tmp_path):
    path = tmp_path / "huge.safetensors"
    write_safetensors_header(path, {"emb_params": {"dtype": "F32", "shape": [10**9, 256],
                                                   "data_offsets": [0, 4 * 10**9 * 256]}}, b"\0" * 64)
    result = run_bounded(f"""
        from latentdiff.adapters.embeddings import read_embedding
        read_embedding({str(path)!r})
    """, timeout_s=60, address_space_gb=8)
    assert result.raised == "CheckpointError" and result.is_latentdiff_error, result.traceback
    assert str(path) in result.message and result.peak_rss_mb < 1500


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_header_with_an_absurd_consistent_shape_names_the_bound(tmp_path):
    path = tmp_path / "tall.safetensors"
    write_safetensors_header(path, {"emb_params": {"dtype": "F32", "shape": [100_000, 1],
                                                   "data_offsets": [0, 400_000]}}, b"\0" * 400_000)
    result = run_bounded(f"""
        from latentdiff.adapters.embeddings import read_embedding
        read_embedding({str(path)!r})
    """, timeout_s=60, address_space_gb=8)
    assert result.raised == "CheckpointError" and result.is_latentdiff_error, result.traceback
    assert "emb_params" in result.message and str(MAX_EMBEDDING_VECTORS) in result.message
    assert "100000" in result.message and result.peak_rss_mb < 1500


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_pickled_stride_zero_view_of_absurd_size_is_refused_bounded(tmp_path):
    path = tmp_path / "view.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1).expand(10**6, 10**5)}}, path)
    result = run_bounded(f"""
        from latentdiff.adapters.embeddings import read_embedding
        read_embedding({str(path)!r})
    """, timeout_s=60, address_space_gb=8)
    assert result.raised == "CheckpointError" and result.is_latentdiff_error, result.traceback
    assert str(path) in result.message and result.peak_rss_mb < 1500


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_file_past_the_size_bound_is_refused_unread(tmp_path):
    path = tmp_path / "big.pt"
    with open(path, "wb") as f:
        f.truncate(MAX_EMBEDDING_FILE_BYTES + 1)          # sparse: nothing to read
    from latentdiff.adapters.embeddings import read_embedding

    with pytest.raises(CheckpointError, match="too large") as error:
        read_embedding(path)
    assert str(MAX_EMBEDDING_FILE_BYTES) in str(error.value) and str(path) in str(error.value)
