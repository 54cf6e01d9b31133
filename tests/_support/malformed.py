"""Malformed-file helpers for the hardening suite (tests/adversarial/test_malformed_files.py, test_fuzz_files.py,
test_cli_errors.py): a tiny model folder and single file to break, and byte-level access to safetensors headers.

    files = tiny_files(tmp_path)                  # {"folder": .../vae, "weights": ...safetensors, "single": ...}
    header, data = read_safetensors(files["single"])
    write_safetensors(path, header | {"x": "y"}, data)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# LatentDiffError subclasses are the only exceptions a malformed input may raise (plus a clean return).
LATENTDIFF_ERRORS_MODULE = "latentdiff.errors"


def tiny_files(root: Path) -> dict[str, Path]:
    """A tiny AutoencoderKL saved as a model folder (config.json + safetensors) and as a latentdiff single file
    (its config in the metadata)."""
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from tests._support.tiny import tiny_kl_config

    torch.manual_seed(0)
    model = AutoencoderKL(tiny_kl_config()).eval()
    folder = model.save_pretrained(root / "vae")
    single = model.save_single_file(root / "vae.safetensors")
    return {"folder": Path(folder), "weights": Path(folder) / "diffusion_pytorch_model.safetensors",
            "single": Path(single)}


def read_safetensors(path: Path) -> tuple[Any, bytes]:
    """(the parsed JSON header, the data bytes after it)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: Any, data: bytes, *, raw_header: bytes | None = None) -> Path:
    """A safetensors file with `header` (any JSON, or `raw_header` bytes as they are) in front of `data`."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data)
    return Path(path)


def first_tensor(header: dict[str, Any]) -> str:
    return next(k for k in header if k != "__metadata__")


def saved_metadata(header: dict[str, Any]) -> dict[str, Any]:
    """latentdiff's own metadata entry of a single file's header, parsed."""
    return json.loads(header["__metadata__"]["latentdiff"])


def with_metadata(header: dict[str, Any], described: Any) -> dict[str, Any]:
    """`header` with latentdiff's metadata entry replaced by `described` (JSON-encoded unless a str)."""
    text = described if isinstance(described, str) else json.dumps(described)
    return {**header, "__metadata__": {**header["__metadata__"], "latentdiff": text}}


def assert_latentdiff_error(error: BaseException, *words: str) -> None:
    """`error` is one of latentdiff's exception types and its message holds every word."""
    kind = f"{type(error).__module__}.{type(error).__name__}"
    assert type(error).__module__ == LATENTDIFF_ERRORS_MODULE, f"{kind}: {error}"
    for word in words:
        assert word in str(error), (word, str(error))
