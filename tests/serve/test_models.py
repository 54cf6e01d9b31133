"""ModelCatalog: the A1111 lists (names only, no server paths), name resolution and refusal of paths, the LRU of
loaded pipelines, one load per model under concurrent callers, failures shared and retried, embeddings, LoRAs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from latentdiff.errors import CheckpointError
from latentdiff.serve import models
from latentdiff.serve.models import ModelCatalog
from latentdiff.serve.requests import RequestError
from latentdiff.serve.settings import ServeSettings
from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

pytestmark = pytest.mark.usefixtures("one_thread")
STARTUP = "latentdiff/shapes-64"
FAKE_A = b"not really a checkpoint, only listed " * 10
FAKE_B = b"another listed file " * 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64", seed=1)


@pytest.fixture
def folders(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """models/: a.safetensors, sub/b.ckpt, tiny/ (a pipeline folder), noise the catalog must not list; the
    built-in name resolving to a tiny random model."""
    use_as_builtin(monkeypatch, tiny)
    root = tmp_path / "models"
    make_tiny_shapes_model(root / "tiny", seed=2)
    (root / "a.safetensors").write_bytes(FAKE_A)
    (root / "sub").mkdir()
    (root / "sub" / "b.ckpt").write_bytes(FAKE_B)
    (root / "notes.txt").write_text("not a model")
    (root / "sub" / "deep").mkdir()
    (root / "sub" / "deep" / "c.safetensors").write_bytes(b"two levels down: not listed")
    (root / ".hidden.safetensors").write_bytes(b"hidden")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "kl-f4.safetensors").write_bytes(b"vae")
    (vae / "other.pt").write_bytes(b"vae")
    return ServeSettings(models_dir=root, vae_dir=vae)


class FakePipe:
    """What the LRU and the embeddings need of a pipeline: networks with a size, load_textual_inversion."""

    def __init__(self, name: str, nbytes: int):
        self.name = name
        self.components = {"unet": torch.nn.Linear(nbytes // 4, 1, bias=False)}
        self.tokens: list[str] = []

    def load_textual_inversion(self, state, token=None):
        self.tokens.append(token)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """models.load_checkpoint replaced by one making 1000-byte FakePipes; the list of its calls."""
    calls: list[tuple[str, str | None]] = []

    def fake(entry, vae, *, dtype, device):
        calls.append((entry.name, None if vae is None else vae.name))
        return FakePipe(entry.name, 1000)

    monkeypatch.setattr(models, "load_checkpoint", fake)
    return calls


# ---- the lists ---------------------------------------------------------------------------------------------------
def test_checkpoints_list_names_hashes_and_no_server_paths(folders: ServeSettings, tmp_path: Path) -> None:
    catalog = ModelCatalog(folders)
    items = catalog.checkpoints()
    assert [i["filename"] for i in items] == [STARTUP, "a.safetensors", "sub/b.ckpt", "tiny"]
    by_name = {i["filename"]: i for i in items}
    sha = hashlib.sha256(FAKE_A).hexdigest()
    assert by_name["a.safetensors"] == {"title": f"a.safetensors [{sha[:10]}]", "model_name": "a", "hash": sha[:10],
                                        "sha256": sha, "filename": "a.safetensors", "config": None}
    assert by_name["sub/b.ckpt"]["model_name"] == "sub_b"
    assert by_name["sub/b.ckpt"]["sha256"] == hashlib.sha256(FAKE_B).hexdigest()
    assert by_name["tiny"] == {"title": "tiny", "model_name": "tiny", "hash": None, "sha256": None,
                               "filename": "tiny", "config": None}
    assert catalog.current == STARTUP
    assert catalog.vaes() == [{"model_name": "kl-f4.safetensors", "filename": "kl-f4.safetensors"},
                              {"model_name": "other.pt", "filename": "other.pt"}]
    text = json.dumps([items, catalog.vaes(), catalog.loras()])
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text


def test_hash_is_cached_per_file_version(folders: ServeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = ModelCatalog(folders)
    catalog.checkpoints()
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    catalog.checkpoints()
    assert not opened                                        # nothing read again
    path = folders.models_dir / "a.safetensors"
    path.write_bytes(FAKE_A + b"changed")
    item = next(i for i in catalog.checkpoints() if i["filename"] == "a.safetensors")
    assert item["sha256"] == hashlib.sha256(FAKE_A + b"changed").hexdigest()


def test_startup_file_outside_models_dir_is_listed_by_its_name(folders: ServeSettings, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "mine.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"startup file")
    catalog = ModelCatalog(dataclasses.replace(folders, model=str(outside)))
    assert catalog.current == "mine.safetensors"
    assert catalog.checkpoints()[0]["title"] == f"mine.safetensors [{hashlib.sha256(b'startup file').hexdigest()[:10]}]"
    inside = ModelCatalog(dataclasses.replace(folders, model=str(folders.models_dir / "sub" / "b.ckpt")))
    assert inside.current == "sub/b.ckpt"
    assert [i["filename"] for i in inside.checkpoints()] == ["sub/b.ckpt", "a.safetensors", "tiny"]


def test_refresh_sees_new_and_removed_files(folders: ServeSettings) -> None:
    catalog = ModelCatalog(folders)
    (folders.models_dir / "new.ckpt").write_bytes(b"new")
    assert "new.ckpt" not in [i["filename"] for i in catalog.checkpoints()]
    catalog.refresh()
    assert catalog.resolve("new", field="f") == "new.ckpt"
    catalog.current = "new.ckpt"
    (folders.models_dir / "new.ckpt").unlink()
    catalog.refresh()
    assert catalog.current == STARTUP
    with pytest.raises(RequestError):
        catalog.resolve("new.ckpt", field="f")


# ---- names -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling, expected", [
    ("a.safetensors [{a}]", "a.safetensors"), ("a.safetensors", "a.safetensors"), ("a", "a.safetensors"),
    ("sub/b.ckpt [{b}]", "sub/b.ckpt"), ("sub/b.ckpt", "sub/b.ckpt"), ("sub_b", "sub/b.ckpt"),
    ("tiny", "tiny"), (STARTUP, STARTUP), ("latentdiff_shapes-64", STARTUP)])
def test_resolve_accepts_every_listed_spelling(folders: ServeSettings, spelling: str, expected: str) -> None:
    catalog = ModelCatalog(folders)
    hashes = {"a": hashlib.sha256(FAKE_A).hexdigest()[:10], "b": hashlib.sha256(FAKE_B).hexdigest()[:10]}
    assert catalog.resolve(spelling.format(**hashes), field="sd_model_checkpoint") == expected
    titles = {i["title"]: i["filename"] for i in catalog.checkpoints()}
    assert all(catalog.resolve(title, field="f") == name for title, name in titles.items())


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..\\x", "sub/../../models/a.safetensors",
                                  "sub/../a.safetensors", "C:\\models\\a.safetensors", "~/a.safetensors",
                                  "\\\\server\\share\\a.ckpt", "a.safetensors\x00", ".."])
def test_paths_are_refused(folders: ServeSettings, name: str) -> None:
    catalog = ModelCatalog(folders)
    for resolve, field in ((catalog.resolve, "sd_model_checkpoint"), (catalog.resolve_vae, "sd_vae")):
        with pytest.raises(RequestError) as caught:
            resolve(name, field=field)
        assert caught.value.status == 422 and caught.value.field == field
        assert "outside the server's folders" in caught.value.message and caught.value.found == name
    with pytest.raises(RequestError):
        catalog.pipeline(name)


def test_unknown_names_are_422_listing_the_names(folders: ServeSettings) -> None:
    catalog = ModelCatalog(folders)
    with pytest.raises(RequestError) as caught:
        catalog.resolve("b.ckpt", field="override_settings.sd_model_checkpoint")
    error = caught.value
    assert (error.status, error.field, error.found) == (422, "override_settings.sd_model_checkpoint", "b.ckpt")
    assert "sub/b.ckpt" in error.expected and STARTUP in error.expected
    with pytest.raises(RequestError):
        catalog.resolve("", field="f")
    with pytest.raises(RequestError, match="hash differs"):
        catalog.resolve("a.safetensors [0123456789]", field="f")
    with pytest.raises(RequestError, match="hash differs"):
        catalog.resolve("tiny [0123456789]", field="f")       # a folder has no hash
    with pytest.raises(RequestError) as caught:
        catalog.resolve_vae("missing.pt", field="sd_vae")
    assert "Automatic" in caught.value.expected and caught.value.field == "sd_vae"


@pytest.mark.parametrize("name, expected", [(None, None), ("Automatic", None), ("None", None), ("", None),
                                            ("kl-f4.safetensors", "kl-f4.safetensors"), ("kl-f4", "kl-f4.safetensors"),
                                            ("other.pt", "other.pt"), ("other", "other.pt")])
def test_resolve_vae(folders: ServeSettings, name: str | None, expected: str | None) -> None:
    assert ModelCatalog(folders).resolve_vae(name, field="sd_vae") == expected


# ---- loaded pipelines ----------------------------------------------------------------------------------------------
def test_lru_keeps_the_budget_the_last_used_and_the_current(folders: ServeSettings, loads: list) -> None:
    catalog = ModelCatalog(dataclasses.replace(folders, model_budget_bytes=2500))   # two 1000-byte pipelines
    startup = catalog.pipeline(STARTUP)
    a = catalog.pipeline("a")
    assert catalog.pipeline("a.safetensors") is a and catalog.pipeline(STARTUP) is startup
    catalog.pipeline("sub_b")                                # 3000 bytes: the oldest not kept goes
    assert catalog.loaded() == [(STARTUP, None), ("sub/b.ckpt", None)]
    assert catalog.pipeline("a") is not a                    # loaded again
    assert loads == [(STARTUP, None), ("a.safetensors", None), ("sub/b.ckpt", None), ("a.safetensors", None)]
    catalog.pipeline("tiny", "kl-f4")                        # a VAE makes another pipeline
    assert loads[-1] == ("tiny", "kl-f4.safetensors")
    assert catalog.loaded() == [(STARTUP, None), ("tiny", "kl-f4.safetensors")]

    tight = ModelCatalog(dataclasses.replace(folders, model_budget_bytes=0))
    tight.pipeline("a")
    tight.pipeline("tiny")
    assert tight.loaded() == [("tiny", None)]                # the last used, even over budget
    tight.set_current("a")
    tight.pipeline("sub/b.ckpt")
    assert (tight.current, tight.loaded()) == ("a.safetensors", [("a.safetensors", None), ("sub/b.ckpt", None)])


def _race(catalog: ModelCatalog, name: str, n: int = 4) -> list:
    """n threads call catalog.pipeline(name) at once; -> what each got (a pipeline or the exception)."""
    barrier, got = threading.Barrier(n), [None] * n

    def call(i: int) -> None:
        barrier.wait()
        try:
            got[i] = catalog.pipeline(name)
        except Exception as e:   # noqa: BLE001  # the test compares what each thread saw
            got[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return got


def test_concurrent_callers_share_one_load(folders: ServeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow(entry, vae, *, dtype, device):
        calls.append(entry.name)
        time.sleep(0.3)                                      # the others arrive while this loads
        return FakePipe(entry.name, 1000)

    monkeypatch.setattr(models, "load_checkpoint", slow)
    got = _race(ModelCatalog(folders), "tiny")
    assert calls == ["tiny"]
    assert all(isinstance(g, FakePipe) for g in got) and all(g is got[0] for g in got)


def test_a_failed_load_reaches_every_waiter_and_is_retried(folders: ServeSettings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(entry, vae, *, dtype, device):
        calls.append(entry.name)
        time.sleep(0.3)
        if len(calls) == 1:
            raise CheckpointError("corrupt file", where=entry.name)
        return FakePipe(entry.name, 1000)

    monkeypatch.setattr(models, "load_checkpoint", flaky)
    catalog = ModelCatalog(folders)
    got = _race(catalog, "a")
    assert calls == ["a.safetensors"]
    assert all(isinstance(g, CheckpointError) and "corrupt file" in str(g) for g in got)
    assert catalog.loaded() == []
    assert isinstance(catalog.pipeline("a"), FakePipe) and len(calls) == 2


def test_a_folder_entry_loads_the_pipeline_the_python_api_gives(folders: ServeSettings) -> None:
    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    catalog = ModelCatalog(folders)
    pipe = catalog.pipeline("tiny")
    reference = LatentDiffusionPipeline.from_pretrained(folders.models_dir / "tiny")
    kwargs = dict(num_inference_steps=2, output_type="pt", progress=False)
    ours = pipe("a red circle", generator=torch.Generator().manual_seed(3), **kwargs)
    theirs = reference("a red circle", generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(getattr(ours, "images", ours), getattr(theirs, "images", theirs))
    assert catalog.loaded() == [("tiny", None)]
    assert catalog._sizes[("tiny", None)] == sum(p.numel() * 4 for m in (reference.unet, reference.vae,
                                                                         reference.text_encoder)
                                                 for p in [*m.parameters(), *m.buffers()])
    preview = catalog.preview("tiny")
    assert catalog.preview("tiny") is preview and preview.factor == 4


# ---- embeddings and LoRAs ------------------------------------------------------------------------------------------
def test_embeddings_load_into_every_pipeline_or_are_skipped(folders: ServeSettings, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from latentdiff.adapters.embeddings import token_table

    emb = tmp_path / "embeddings"
    emb.mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))   # the tiny LDMBert's width
    save_file({"emb_params": vectors}, str(emb / "myemb.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}}, emb / "wide.pt")  # another model's width
    (emb / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    (emb / "readme.md").write_text("not an embedding")
    catalog = ModelCatalog(dataclasses.replace(folders, embeddings_dir=emb))
    report = catalog.embeddings()                            # loads the current model
    blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert report == {"loaded": {"myemb": {**blank, "shape": 32, "vectors": 2}},
                      "skipped": {"broken": {**blank, "shape": None, "vectors": None},
                                  "wide": {**blank, "shape": 64, "vectors": 1}}}
    for name in (STARTUP, "tiny"):
        encoder = catalog.pipeline(name).text_encoder
        ids = [encoder.tokenizer.get_vocab()[t] for t in ("myemb", "myemb_1")]
        table = token_table(encoder.model).weight
        assert torch.equal(table[ids], vectors)


def test_loras_list_names_paths_and_header_metadata(folders: ServeSettings, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    first, second = tmp_path / "loras1", tmp_path / "loras2"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}
    meta = {"ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"set": {"red": 3}}),
            "ss_network_dim": "4"}
    save_file(tensors, str(first / "style.safetensors"), metadata=meta)
    save_file(tensors, str(first / "sub" / "detail.safetensors"))
    save_file(tensors, str(second / "style.safetensors"), metadata={"ss_network_dim": "8"})   # shadowed
    save_file(tensors, str(second / "extra.safetensors"))
    (first / "model.ckpt").write_bytes(b"not a LoRA the tags load")
    catalog = ModelCatalog(dataclasses.replace(folders, lora_dirs=(first, second)))
    items = catalog.loras()
    assert [(i["name"], i["alias"], i["path"]) for i in items] == [
        ("style", "style", "style.safetensors"), ("sub/detail", "sub/detail", "sub/detail.safetensors"),
        ("extra", "extra", "extra.safetensors")]
    assert items[0]["metadata"] == {"ss_base_model_version": "sd_v1", "ss_tag_frequency": {"set": {"red": 3}},
                                    "ss_network_dim": "4"}
    assert items[1]["metadata"] == {}
    assert catalog.lora_dirs == (first, second)
    assert str(tmp_path) not in json.dumps(items)
