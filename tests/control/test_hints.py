"""Hint preprocessing against OpenCV itself (the oracle: `opencv-python-headless`, a test extra only): Canny edges
pixel for pixel, OpenCV's RGB2GRAY bit for bit; the binary threshold; the A1111 resize modes."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from latentdiff.control import canny, fit, threshold
from latentdiff.control.hints import gray
from latentdiff.errors import InputError

cv2 = pytest.importorskip("cv2")

THRESHOLDS = [(100, 200), (50, 150), (10, 30), (0, 255), (200, 100), (120, 120), (37.7, 99.5)]


def photo_like(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """Smooth gradients, shapes with blurred and sharp borders and sensor noise: edges of every direction and
    strength, long chains for the hysteresis, ties in flat areas."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=2)
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 10), rng.integers(0, height - 10)
        box = (int(x0), int(y0), int(x0 + rng.integers(5, 60)), int(y0 + rng.integers(5, 60)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    draw.line((0, 0, width, height), fill=(255, 255, 255), width=2)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
    noisy = np.asarray(image).astype(int) + rng.normal(0, 4, (height, width, 3)).round().astype(int)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),                  # noise: every tie rule
            rng.integers(0, 4, (33, 47, 3), dtype=np.uint8) * 85,               # few levels: many equal magnitudes
            photo_like(1), photo_like(2, (64, 64)), photo_like(3, (17, 200))]


def edges(hint: Image.Image) -> np.ndarray:
    array = np.asarray(hint)
    assert hint.mode == "RGB" and (array[:, :, 0] == array[:, :, 1]).all() and (array[:, :, 0] == array[:, :, 2]).all()
    assert set(np.unique(array)) <= {0, 255}
    return array[:, :, 0]


def test_gray_is_opencvs_rgb2gray_bit_for_bit():
    rgb = np.random.default_rng(0).integers(0, 256, (512, 1024, 3), dtype=np.uint8)   # half a million colours
    assert np.array_equal(gray(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("low,high", THRESHOLDS)
@pytest.mark.parametrize("l2", [False, True])
def test_canny_is_cv2_canny_pixel_for_pixel(low, high, l2):
    for rgb in images():
        expected = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high, L2gradient=l2)
        found = edges(canny(rgb, low=low, high=high, l2_gradient=l2))
        assert expected.any() or low >= 200                    # the images do have edges at these thresholds
        assert np.array_equal(found, expected), f"{int((found != expected).sum())} pixels differ"


@pytest.mark.parametrize("low,high", THRESHOLDS[:3])
def test_canny_on_colour_is_cv2_canny_on_the_rgb_array(low, high):
    for rgb in images():
        expected = cv2.Canny(rgb, low, high)
        assert np.array_equal(edges(canny(rgb, low=low, high=high, grayscale=False)), expected)


def test_canny_inputs_pil_path_and_gray_arrays_agree(tmp_path):
    rgb = photo_like(4)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    reference = edges(canny(rgb))
    assert np.array_equal(edges(canny(Image.fromarray(rgb))), reference)
    assert np.array_equal(edges(canny(path)), reference)
    assert np.array_equal(edges(canny(str(path))), reference)
    luma = gray(rgb)
    assert np.array_equal(edges(canny(luma)), cv2.Canny(luma, 100, 200))
    assert np.array_equal(edges(canny(luma[:, :, None])), cv2.Canny(luma, 100, 200))


def test_canny_refuses_other_arrays():
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), [[0, 1]]):
        with pytest.raises(InputError, match="uint8"):
            canny(bad)


def test_canny_is_fast_on_512px():
    rgb = np.concatenate([photo_like(5, (256, 512)), np.random.default_rng(5).integers(0, 256, (256, 512, 3),
                                                                                      dtype=np.uint8)])
    start = time.perf_counter()
    found = edges(canny(rgb, low=50, high=100))
    assert time.perf_counter() - start < 2.0       # well under a second on one core; slack for a busy machine
    assert np.array_equal(found, cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 50, 100))


@pytest.mark.parametrize("level", [0, 1, 128, 255, 256])
@pytest.mark.parametrize("invert", [False, True])
def test_threshold_is_cv2_binary_threshold(level, invert):
    rgb = photo_like(6)
    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    kind = cv2.THRESH_BINARY_INV if invert else cv2.THRESH_BINARY
    _, expected = cv2.threshold(luma, level - 1, 255, kind)    # cv2: white where value > level - 1
    assert np.array_equal(edges(threshold(rgb, level=level, invert=invert)), expected)


def test_threshold_refuses_a_level_out_of_range():
    with pytest.raises(InputError, match="gray value"):
        threshold(photo_like(7), level=300)


def _tall_red() -> Image.Image:
    return Image.new("RGB", (20, 40), (200, 10, 10))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_fit_gives_the_requested_size(mode):
    out = fit(_tall_red(), (32, 64), mode=mode)
    assert out.size == (64, 32)
    if mode in (1, 2):       # cover: no border; contain: the edges stretched, no black border either
        assert np.abs(np.asarray(out).astype(int) - [200, 10, 10]).max() <= 3


def test_fit_crop_keeps_the_centre_and_fill_keeps_everything():
    picture = Image.new("RGB", (40, 20), (0, 0, 0))
    ImageDraw.Draw(picture).rectangle((0, 0, 9, 19), fill=(255, 255, 255))     # white left quarter
    cropped = np.asarray(fit(picture, (20, 20), mode=1))
    assert cropped.max() < 8                                                   # centre crop: the left quarter is cut
    filled = np.asarray(fit(picture, (20, 20), mode=2))
    assert filled[10, 0].mean() > 128 and filled[10, -1].mean() < 128          # whole picture, squeezed to the width
    assert filled[0, 2].mean() > 128                                           # border rows: the top row stretched


def test_fit_without_a_mode_only_accepts_the_right_size():
    image = _tall_red()
    assert fit(image, (40, 20), mode=None) is image
    with pytest.raises(InputError) as caught:
        fit(image, (64, 64), mode=None, name="control_image[1]")
    assert caught.value.where == "control_image[1]"
    assert "64 x 64" in str(caught.value.expected) and caught.value.found == "20 x 40"
    with pytest.raises(InputError, match="unknown resize mode"):
        fit(image, (64, 64), mode=3)


def test_the_package_is_reachable_from_a_plain_import():
    """`import latentdiff; latentdiff.control.canny(...)`, as the issue writes it."""
    import subprocess
    import sys

    code = "import latentdiff, numpy as np; print(latentdiff.control.canny(np.zeros((8, 8), np.uint8)).size)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "(8, 8)", done.stderr[-2000:]
