"""The shapes data set: exact palette and geometry, documented regions, determinism, captions, image folders."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import shapes
from latentdiff.data.shapes import (
    COLORS,
    PALETTE,
    SHAPES,
    WHERE,
    Attributes,
    ShapesDataset,
    ShapeSpec,
    caption,
    parse_caption,
    render,
    sample_spec,
    where_of,
    write_imagefolder,
)
from latentdiff.errors import InputError

N_SPECS = 2000
N_IMAGES = 500


@pytest.fixture(scope="module")
def specs() -> list[ShapeSpec]:
    dataset = ShapesDataset(N_SPECS, seed=11)
    return [dataset.spec(i) for i in range(N_SPECS)]


def recovered_coverage(image: Image.Image, spec: ShapeSpec) -> np.ndarray:
    """Coverage in [0, 1] per pixel, read back from the pixels by inverting background * (1 - c) + color * c."""
    pixels = np.asarray(image, dtype=np.float64)
    background, color = np.array(PALETTE[spec.background], float), np.array(PALETTE[spec.color], float)
    axis = color - background
    return (pixels - background) @ axis / (axis @ axis)


def test_palette_is_the_issue_palette():
    assert PALETTE == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
                       "yellow": (235, 205, 40), "white": (240, 240, 240), "black": (25, 25, 25)}
    assert SHAPES == ("circle", "square", "triangle")
    assert set(WHERE) == {"on the left", "on the right", "at the top", "at the bottom", "in the center"}


def test_samples_cover_every_attribute_and_never_hide_the_shape(specs):
    assert all(s.color != s.background for s in specs)
    for field, values in (("color", COLORS), ("background", COLORS), ("shape", SHAPES), ("where", WHERE)):
        counts = {v: sum(getattr(s, field) == v for s in specs) for v in values}
        expected = N_SPECS / len(values)
        assert all(abs(c - expected) < 0.25 * expected for c in counts.values()), (field, counts)
    assert all(shapes.SIZE_RANGE[0] <= s.size <= shapes.SIZE_RANGE[1] for s in specs)


def test_regions_are_the_documented_ones_with_margins(specs):
    for s in specs:
        dx, dy = s.center[0] - 32, s.center[1] - 32
        assert where_of(s.center) == s.where
        if s.where == "in the center":
            assert max(abs(dx), abs(dy)) <= shapes.CENTER_JITTER
            continue
        ux, uy = shapes.DIRECTIONS[s.where]
        along, across = dx * ux + dy * uy, abs(dx * uy + dy * ux)
        assert shapes.OFFSET_RANGE[0] <= along <= shapes.OFFSET_RANGE[1] and across <= shapes.CROSS_JITTER
        # the margins that keep every caption unambiguous (docs/shapes.md)
        assert along - shapes.REGION_BOUNDARY >= 4.5 and along - across >= 8.0


def test_where_of_boundaries():
    assert where_of((32.0, 32.0)) == "in the center"
    assert where_of((32 - 7.4, 32.0)) == "in the center"
    assert where_of((32 - 7.5, 32.0)) == "on the left"
    assert where_of((32 + 9, 32 - 3)) == "on the right"
    assert where_of((32 + 3, 32 - 9)) == "at the top"
    assert where_of((32 - 3, 32 + 9)) == "at the bottom"


@pytest.mark.parametrize("shape", SHAPES)
def test_render_matches_the_geometry(shape):
    """Area against the closed-form area, centroid against spec.center, exact palette inside and outside."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        spec = sample_spec(rng)
        spec = ShapeSpec(spec.color, shape, spec.where, spec.background, spec.size, spec.center)
        image = render(spec)
        assert image.size == (64, 64) and image.mode == "RGB"
        c = recovered_coverage(image, spec)
        exact = {"circle": math.pi * spec.size ** 2 / 4, "square": spec.size ** 2,
                 "triangle": math.sqrt(3) / 4 * spec.size ** 2}[shape]
        perimeter = {"circle": math.pi, "square": 4, "triangle": 3}[shape] * spec.size
        # 4x4 point samples per pixel place an edge to within 1/8 px: the area is off by at most perimeter / 8
        assert abs(c.sum() - exact) <= perimeter / 8
        centers = np.arange(64) + 0.5
        centroid = (c.sum(axis=0) @ centers / c.sum(), c.sum(axis=1) @ centers / c.sum())
        assert math.dist(centroid, spec.center) < 0.2
        pixels = np.asarray(image)
        assert (pixels[int(spec.center[1]), int(spec.center[0])] == PALETTE[spec.color]).all()
        assert (pixels[0, 0] == PALETTE[spec.background]).all()


def test_every_shape_stays_two_pixels_inside():
    dataset = ShapesDataset(N_IMAGES, seed=3)
    for i in range(N_IMAGES):
        pixels = np.asarray(dataset[i][0])
        ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                               pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
        assert (ring == PALETTE[dataset.spec(i).background]).all(), i


def test_determinism_item_depends_only_on_seed_and_index():
    small, large = ShapesDataset(8, seed=4), ShapesDataset(1000, seed=4)
    np.random.seed(0)
    first = [small[i][0].tobytes() for i in range(8)]
    np.random.seed(12345)                                   # the global RNG plays no part
    assert [large[i][0].tobytes() for i in reversed(range(8))][::-1] == first
    assert [small[i][1] for i in range(8)] == [large[i][1] for i in range(8)]
    assert small[-1][1] == small[7][1]
    other = ShapesDataset(8, seed=5)
    assert sum(other[i][0].tobytes() != first[i] for i in range(8)) >= 7
    assert len(list(small)) == 8
    with pytest.raises(IndexError):
        small[8]
    with pytest.raises(InputError, match="seed"):
        ShapesDataset(8, seed=-1)


def test_caption_grammar_round_trip():
    for color, background, shape, where in itertools.product(COLORS, COLORS, SHAPES, WHERE):
        if color == background:
            continue
        attributes = Attributes(color, shape, where, background)
        text = caption(attributes)
        assert text == f"a {color} {shape} {where}, {background} background"
        assert parse_caption(text) == attributes
    assert parse_caption("  A Red Circle On The Left, Blue Background ") == Attributes("red", "circle", "on the left",
                                                                                         "blue")
    spec = sample_spec(np.random.default_rng(0))
    assert parse_caption(caption(spec)) == spec.attributes


@pytest.mark.parametrize("text, part", [
    ("a purple circle on the left, blue background", "color"),
    ("a red hexagon on the left, blue background", "shape"),
    ("a red circle at the left, blue background", "where"),
    ("a red circle on the left, pink background", "background"),
    ("a red circle on the left", "grammar"),
    ("a red circle on the left, red background", "invisible"),
    ("red circle on the left, blue background", "grammar"),
])
def test_parse_caption_rejects_what_is_outside_the_grammar(text, part):
    with pytest.raises(InputError, match=part):
        parse_caption(text)


def test_write_imagefolder_is_read_by_the_training_loader(tmp_path):
    from latentdiff.training.config import DataConfig
    from latentdiff.training.data import ImageDataset, scan_image_folder

    folder = write_imagefolder(tmp_path / "shapes", 12, seed=9)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text("utf-8").splitlines()]
    dataset = ShapesDataset(12, seed=9)
    assert [r["text"] for r in rows] == [dataset[i][1] for i in range(12)]
    assert all(set(r) == {"file_name", "text"} and (folder / r["file_name"]).is_file() for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]    # no temporary folder left behind

    index = scan_image_folder(DataConfig(path=str(folder), resolution=64))
    assert index.labels == "captions" and len(index.records) == 12
    loaded = ImageDataset(index, resolution=64, random_flip=False)
    for i, record in enumerate(index.records):
        item = loaded[i]
        assert item["caption"] == dataset[i][1] == record.caption
        pixels = torch.from_numpy(np.asarray(dataset[i][0]).copy()).permute(2, 0, 1).float()
        assert torch.equal(((item["pixel_values"] + 1) * 127.5).round(), pixels)   # the PNG is lossless


def test_write_imagefolder_never_leaves_half_a_data_set(tmp_path, monkeypatch):
    folder = tmp_path / "shapes"
    with pytest.raises(InputError, match="n must"):
        write_imagefolder(folder, 0)
    calls = []

    def failing_render(spec):
        calls.append(spec)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return Image.new("RGB", (64, 64))

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError):
        write_imagefolder(folder, 10)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    write_imagefolder(folder, 3, seed=1)
    with pytest.raises(InputError, match="already exists"):
        write_imagefolder(folder, 3, seed=2)
    write_imagefolder(folder, 4, seed=2, overwrite=True)
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
