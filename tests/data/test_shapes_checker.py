"""The shapes checker: exact on renders, robust to mild noise and blur, and it catches every wrong attribute."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentdiff.data import shapes_checker
from latentdiff.data.shapes import COLORS, DIRECTIONS, PALETTE, SHAPES, WHERE, ShapesDataset, ShapeSpec, caption, render
from latentdiff.data.shapes_checker import ATTRIBUTES, analyze, check, compare, score
from latentdiff.errors import InputError

N_IMAGES = 600


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[ShapeSpec], list[Image.Image], list[str]]:
    dataset = ShapesDataset(N_IMAGES, seed=2024)
    specs = [dataset.spec(i) for i in range(N_IMAGES)]
    return specs, [render(s) for s in specs], [caption(s) for s in specs]


def degrade(image: Image.Image, rng: np.random.Generator, *, blur: bool, noise: float) -> Image.Image:
    """A 3x3 box blur, then Gaussian noise of `noise` (in 0..255 units), rounded and clipped to uint8."""
    if blur:
        image = image.filter(ImageFilter.BoxBlur(1))
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, noise, (64, 64, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def test_ground_truth_is_read_exactly(ground_truth):
    specs, images, captions = ground_truth
    assert score(images, captions) == {**{name: 1.0 for name in ATTRIBUTES}, "all": 1.0, "count": N_IMAGES}
    for spec, image in zip(specs[:100], images, strict=False):
        found = analyze(image)
        # the measurement, against the spec that drew the image (4x4 supersampling: edges within 1/8 px)
        assert math.dist(found.centroid, spec.center) < 0.2
        exact = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}[spec.shape] * spec.size ** 2
        assert found.area == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("blur, noise", [(True, 0.0), (False, 10.0), (True, 10.0)])
def test_robust_to_mild_blur_and_noise(ground_truth, blur, noise):
    _, images, captions = ground_truth
    rng = np.random.default_rng(7)
    accuracy = score([degrade(image, rng, blur=blur, noise=noise) for image in images], captions)
    assert all(accuracy[name] >= 0.98 for name in ATTRIBUTES), accuracy


def wrong(spec: ShapeSpec, attribute: str, rng: np.random.Generator) -> ShapeSpec:
    """`spec` with one attribute changed to another valid value (colors stay distinct from the background)."""
    field = "where" if attribute == "position" else attribute
    taken = {spec.color, spec.background} if field in ("color", "background") else {getattr(spec, field)}
    choices = [v for v in {"color": COLORS, "background": COLORS, "shape": SHAPES, "where": WHERE}[field]
               if v not in taken]
    return dataclasses.replace(spec, **{field: choices[rng.integers(len(choices))]})


def test_wrong_captions_are_caught(ground_truth):
    specs, images, _ = ground_truth
    rng = np.random.default_rng(0)
    caught = {name: 0 for name in ATTRIBUTES}
    for spec, image in zip(specs, images, strict=True):
        found = analyze(image)
        for attribute in ATTRIBUTES:
            result = compare(found, wrong(spec, attribute, rng).attributes)
            caught[attribute] += not getattr(result, attribute)
            # only the changed attribute is wrong
            assert all(getattr(result, other) for other in ATTRIBUTES if other != attribute)
    assert all(count / len(specs) >= 0.99 for count in caught.values()), caught


def test_wrong_images_are_caught(ground_truth):
    """The caption is right, the image is not: a shape of another color, class or place, another background."""
    specs, _, captions = ground_truth
    rng = np.random.default_rng(1)
    for attribute in ATTRIBUTES:
        bad = []
        for spec in specs[:150]:
            changed = wrong(spec, attribute, rng)
            if attribute == "position":                     # move the shape 15 px into the new region
                ux, uy = DIRECTIONS.get(changed.where, (0, 0))
                changed = dataclasses.replace(changed, center=(32.0 + 15 * ux, 32.0 + 15 * uy))
            bad.append(render(changed))
        accuracy = score(bad, captions[:150])
        assert accuracy[attribute] <= 0.01, (attribute, accuracy)
        assert all(accuracy[other] == 1.0 for other in ATTRIBUTES if other != attribute), (attribute, accuracy)


def test_no_shape_fails_every_shape_attribute():
    result = check(Image.new("RGB", (64, 64), PALETTE["green"]), "a red circle in the center, green background")
    assert result.background and not (result.color or result.shape or result.position or result.all)
    assert result.found.shape is None and result.found.centroid is None


def test_checker_is_deterministic_and_takes_arrays(ground_truth):
    _, images, captions = ground_truth
    rng = np.random.default_rng(3)
    noisy = degrade(images[0], rng, blur=True, noise=10.0)
    assert analyze(noisy) == analyze(np.asarray(noisy)) == analyze(noisy.convert("RGBA"))
    assert check(images[0], captions[0]).all


def test_bad_input_is_an_error_before_any_image_is_measured(ground_truth):
    _, images, captions = ground_truth
    with pytest.raises(InputError, match="one caption per image"):
        score(images[:2], captions[:3])
    with pytest.raises(InputError, match="nothing to score"):
        score([], [])
    with pytest.raises(InputError, match="grammar"):
        score([None], ["a red blob"])                       # the caption fails before the bad image is looked at
    with pytest.raises(InputError, match="64x64"):
        check(Image.new("RGB", (32, 32)), captions[0])
    with pytest.raises(InputError, match="RGB image"):
        check(np.zeros((64, 64, 3), np.float32), captions[0])


def test_components_and_holes_against_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((64, 64)) < density
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        assert shapes_checker.largest_component(mask).sum() == sizes.max()
        four, _ = ndimage.label(mask)
        ours = shapes_checker.component_labels(mask, diagonal=False)
        # the same partition: a one-to-one map between their labels and ours
        pairs = {(a, b) for a, b in zip(four[mask], ours[mask], strict=True)}
        assert len(pairs) == len(np.unique(four[mask])) == len(np.unique(ours[mask]))
        assert np.array_equal(shapes_checker.fill_holes(mask), ndimage.binary_fill_holes(mask))
