"""Configs, the registry, errors, and the Hub / file I/O rules."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiff import hub
from latentdiff.config import ComponentConfig
from latentdiff.errors import CheckpointError, ConfigError, RegistryError
from latentdiff.registry import COMPONENTS, PIPELINES, SAMPLERS, Registry
from tests._support.hub_cache import make_hub_cache


@dataclasses.dataclass(frozen=True)
class _Cfg(ComponentConfig):
    width: int = 4
    levels: tuple[int, ...] = (1, 2)
    heads: int | tuple[int, ...] = 8
    scale: float | None = None


def test_config_strict_from_dict():
    cfg = _Cfg.from_dict({"width": 3, "levels": [3, 4], "heads": [1, 2], "scale": 1, "_meta": "ignored"})
    assert cfg == _Cfg(width=3, levels=(3, 4), heads=(1, 2), scale=1)
    with pytest.raises(ConfigError, match="unknown key.*'depth'"):
        _Cfg.from_dict({"depth": 2})
    with pytest.raises(ConfigError, match="'width'"):
        _Cfg(width="wide")
    with pytest.raises(ConfigError, match="'levels'"):
        _Cfg(levels=(1, "x"))
    assert _Cfg.from_dict(cfg.to_dict()) == cfg


def test_config_json_roundtrip(tmp_path):
    cfg = _Cfg(width=7, levels=(5,))
    cfg.to_json_file(tmp_path / "c.json")
    assert _Cfg.from_json_file(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON.*bad.json"):
        _Cfg.from_json_file(tmp_path / "bad.json")


def test_registry_names_and_errors():
    names = COMPONENTS.names()
    assert {"unet", "autoencoder_kl", "text_encoder", "noise_scheduler"} <= set(names)
    assert {"ddim", "ddpm"} <= set(SAMPLERS.names())
    assert "text-to-image" in PIPELINES.names()
    with pytest.raises(RegistryError, match="unknown component 'unetz'.*one of"):
        COMPONENTS.get("unetz")
    reg = Registry("thing")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a")(type("B", (), {}))


def test_safetensors_truncated_and_corrupt(tmp_path):
    path = tmp_path / "w.safetensors"
    hub.save_safetensors({"a": torch.randn(64, 64)}, path)
    assert hub.load_safetensors(path)["a"].shape == (64, 64)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*trunc.safetensors"):
        hub.load_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        hub.load_safetensors(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        hub.load_safetensors(tmp_path / "tiny.safetensors")


def test_atomic_folder_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "ckpt"
    with hub.atomic_folder(dest) as tmp:
        (tmp / "f.txt").write_text("old")
    with pytest.raises(RuntimeError), hub.atomic_folder(dest) as tmp:
        (tmp / "f.txt").write_text("new, half written")
        raise RuntimeError("crash mid-save")
    assert (dest / "f.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
    with hub.atomic_folder(dest) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (dest / "f.txt").read_text() == "new"


def test_pickle_loading_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import pickle

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        hub.load_torch_pickle(path)
    zipped = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, zipped)
    with pytest.raises(CheckpointError, match="refusing to unpickle.*evil.ckpt"):
        hub.load_torch_pickle(zipped)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(hub.load_torch_pickle(good)["w"], torch.ones(2))


def test_resolve_local_missing_and_offline_cache(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such folder"):
        hub.resolve(tmp_path / "missing" / "deeper")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model_index.json").write_text("{}")
    cache = tmp_path / "cache"
    make_hub_cache(cache, "someone/model", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    folder = hub.resolve("someone/model", cache_dir=cache)
    assert (folder / "model_index.json").is_file()
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        hub.resolve("someone/other", cache_dir=cache)


def test_import_is_cheap_and_never_imports_diffusers():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'diffusers': raise ImportError('diffusers blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import latentdiff\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import at import time'\n"
        "from latentdiff import LatentDiffusionPipeline, COMPONENTS\n"
        "COMPONENTS.names()\n"
        "import latentdiff.cli\n"
        "assert 'diffusers' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_src_never_mentions_diffusers_imports():
    src = Path(__file__).resolve().parents[1] / "src" / "latentdiff"
    import re

    pattern = re.compile(r"^\s*(import diffusers\b|from diffusers(\.\w+)* import )", re.M)
    offenders = [str(p) for p in src.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
