"""latentdiff.data.quick_shapes: the tiny training examples' data set, moved from examples/train/make_shapes.py into
the package (issue 15). The digests below were recorded from that script's output (pixels, names, captions and
tokenizer files), so the package writes what it wrote, for the same arguments."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.data.quick_shapes import write_shapes_folder, write_word_tokenizer
from latentdiff.data.shapes import COLORS, SHAPES, parse_caption
from latentdiff.errors import InputError

# digest(make_shapes(folder, **kwargs)) of the removed script, kwargs as the ids say
SCRIPT_DIGESTS = {
    "captions-12x16": "73e1906e78f4e92454fbd7bd130d02e99233e952729d146ac9787ca3c6d766a5",
    "classes-12x20-seed3": "c4770ad651e5f96686c86e0fea37c14760017eb2796595f59fcc3629443d841b",
    "tokenizer": "1afe66b0acd88c7e17516e8bd642ae9cf9d46b5c9efea3f604b6d0a5ad7abca5",
}


def digest(folder: Path) -> str:
    """Every file's relative path and content; a PNG by its decoded RGB pixels (the encoder's bytes may differ
    between zlib builds, the pixels may not)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_dir():
            continue
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.suffix == ".png":
            pixels = np.asarray(Image.open(path).convert("RGB"))
            h.update(str(pixels.shape).encode())
            h.update(pixels.tobytes())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def test_the_package_writes_what_the_script_wrote(tmp_path):
    assert digest(write_shapes_folder(tmp_path / "a", 12, size=16)) == SCRIPT_DIGESTS["captions-12x16"]
    classes = write_shapes_folder(tmp_path / "b", 12, size=20, seed=3, labels="classes")
    assert digest(classes) == SCRIPT_DIGESTS["classes-12x20-seed3"]
    assert digest(write_word_tokenizer(tmp_path / "t")) == SCRIPT_DIGESTS["tokenizer"]
    assert digest(write_shapes_folder(tmp_path / "c", 12, size=16, labels="captions")) == digest(tmp_path / "a")


def test_captions_follow_the_shapes_grammar_and_classes_the_shapes(tmp_path):
    folder = write_shapes_folder(tmp_path / "d", 20, size=24, seed=1)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(20)]
    for row in rows:
        words = parse_caption(row["text"])
        assert words.color in COLORS and words.shape in SHAPES
        assert Image.open(folder / row["file_name"]).size == (24, 24)
    classes = write_shapes_folder(tmp_path / "e", 20, size=8, labels="classes")
    assert {p.name for p in classes.iterdir()} <= set(SHAPES) and len(list(classes.rglob("*.png"))) == 20


def test_a_folder_with_files_is_refused_unless_overwrite_and_then_replaced_whole(tmp_path):
    folder = write_shapes_folder(tmp_path / "d", 10, size=8)
    with pytest.raises(InputError, match="not empty") as caught:
        write_shapes_folder(folder, 3, size=8)
    assert str(folder) in str(caught.value) and "overwrite" in str(caught.value)
    write_shapes_folder(folder, 3, size=8, overwrite=True)    # never a mix of the two data sets
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "metadata.jsonl"]
    (tmp_path / "empty").mkdir()
    assert len(list(write_shapes_folder(tmp_path / "empty", 2, size=8).iterdir())) == 3


@pytest.mark.parametrize("labels", ["text", "classes"])
def test_an_overwrite_never_deletes_files_it_did_not_write(tmp_path, labels):
    folder = write_shapes_folder(tmp_path / "d", 4, size=8, labels=labels)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="does not write") as caught:
        write_shapes_folder(folder, 4, size=8, labels=labels, overwrite=True)
    assert "notes.txt" in str(caught.value)
    assert (folder / "notes.txt").read_text() == "mine"
    tokenizer = write_word_tokenizer(tmp_path / "t")
    (tokenizer / "special_tokens_map.json").write_text("{}")
    with pytest.raises(InputError, match="does not write"):
        write_word_tokenizer(tokenizer, overwrite=True)


def test_arguments_are_checked_before_anything_is_written(tmp_path):
    for kwargs, key in [({"count": 0}, "count"), ({"count": 10**9}, "count"), ({"size": 4}, "size"),
                        ({"size": 10**6}, "size"), ({"seed": -1}, "seed"), ({"labels": "words"}, "labels")]:
        args = {"count": 2, "size": 8} | kwargs
        with pytest.raises(InputError, match=key):
            write_shapes_folder(tmp_path / "x", args.pop("count"), **args)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        write_shapes_folder(tmp_path / "file", 2, size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
