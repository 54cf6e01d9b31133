"""Hardening cases for what `latentdiff generate --from` reads from images it did not write (issue 15): A1111's
parameters text in a PNG chunk or an EXIF UserComment, latentdiff's JSON in XMP, and sampler / schedule names
from any of them. Every bad input is a UsageError naming the file and the setting; sizes are bounded before
anything large is built; a model named by an image from elsewhere is never read from this machine."""
from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from latentdiff import limits
from latentdiff.cli.generate_model import locate_model
from latentdiff.cli.generate_settings import read_from_png, settle
from latentdiff.cli.main import build_parser
from latentdiff.errors import UsageError
from tests._support.bounded import run_bounded

REAL = ("a lighthouse, (dramatic sky:1.2)\nNegative prompt: lowres, bad anatomy\nSteps: 3, Sampler: DPM++ 2M, "
        'Schedule type: Karras, CFG scale: 6.5, Seed: 31, Size: 64x64, Model hash: 6ce0161689, Model: sd15, '
        'Clip skip: 2, Lora hashes: "detail: 2a3f", Version: v1.10.1')


def png_with_text(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def webp_with_comment(path: Path, comment: bytes, *, xmp: bytes | None = None) -> Path:
    exif = Image.Exif()
    exif[0x8769] = {0x9286: comment}
    Image.new("RGB", (4, 4)).save(path, format="WEBP", exif=exif.tobytes(), **({"xmp": xmp} if xmp else {}))
    return path


def settle_from(path: Path, *flags: str):
    args = build_parser().parse_args(["generate", "--from", str(path), "-o", str(path.with_name("o.png")), *flags])
    stored = read_from_png(args.from_png)
    return settle(args, stored, locate_model(args.model or stored.get("model") or "latentdiff/shapes-64"))


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_garbled_a1111_texts_are_usage_errors(tmp_path):
    rng = random.Random(1111)
    errors = 0
    for k in range(60):
        chars = list(REAL)
        for _ in range(rng.randint(1, 8)):
            chars[rng.randrange(len(chars))] = rng.choice(',:"\\\nx9-.()\x00\u00e9')
        path = png_with_text(tmp_path / f"g{k}.png", "".join(chars))
        try:
            settle_from(path)
        except UsageError as e:
            errors += 1
            assert str(path) in str(e), str(e)
    assert errors > 0


@pytest.mark.outcome("clear_error", fails_as="unclear")
@pytest.mark.parametrize("setting, value, words", [
    ("Sampler", "DPM adaptive", ["not implemented yet", "sampler", "dpmpp_2m"]),
    ("Sampler", '"Warp, 9"', ["unknown sampler", "sampler"]),
    ("Schedule type", "KL Optimal", ["not implemented yet", "schedule"]),
    ("Steps", "100000", ["steps", "at most 10000"]),
    ("Size", "99999x99999", ["height", "at most 16384"]),
    ("Seed", "-1", ["seed", "-1"]),
])
def test_bad_a1111_settings_name_the_file_and_the_setting(tmp_path, setting, value, words):
    text = f"p\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, {setting}: {value}"
    path = png_with_text(tmp_path / "bad.png", text)
    with pytest.raises(UsageError) as info:
        settle_from(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.outcome("correct", fails_as="security")
def test_a_model_path_in_an_a1111_text_is_never_read(tmp_path):
    """A1111's "Model:" names its checkpoint; an image from elsewhere must not make latentdiff open a local path."""
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "model_index.json").write_text("{}")
    for model in (str(tmp_path / "private"), "../private", "someone/some-repo"):
        path = png_with_text(tmp_path / "m.png", f"p\nSteps: 3, Sampler: Euler, Seed: 1, Model: {model}")
        stored = read_from_png(str(path))
        assert "model" not in stored
        assert settle_from(path).model == "latentdiff/shapes-64"


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_an_oversized_user_comment_is_refused_within_bounds(tmp_path):
    """50 MB of UTF-16 in a WebP EXIF UserComment: refused as too long, decoding no more than the bound, fast."""
    path = webp_with_comment(tmp_path / "big.webp", b"UNICODE\0" + ("Steps: 1, " * 2_500_000).encode("utf-16-be"))
    code = textwrap.dedent(f"""
        from latentdiff.cli.generate_settings import read_from_png
        read_from_png({str(path)!r})
    """)
    result = run_bounded(code, timeout_s=60, address_space_gb=8)
    assert result.raised == "UsageError" and result.is_latentdiff_error, result.traceback
    assert "too long" in result.message and str(limits.MAX_INFOTEXT_CHARS) in result.message
    assert result.peak_rss_mb < 600, result.peak_rss_mb


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_an_oversized_xmp_packet_is_refused(tmp_path):
    xmp = b"<x:xmpmeta><latentdiff:params>" + b"[" * (limits.MAX_XMP_BYTES + 10) + b"</latentdiff:params></x:xmpmeta>"
    path = webp_with_comment(tmp_path / "x.webp", b"UNICODE\0" + "p\nSteps: 1, Seed: 1, CFG scale: 2".encode(
        "utf-16-be"), xmp=xmp)
    with pytest.raises(UsageError) as info:
        read_from_png(str(path))
    assert str(path) in str(info.value) and "cannot read" in str(info.value)


@pytest.mark.outcome("correct", fails_as="unclear")
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_a_user_comment_in_either_byte_order_reads(tmp_path, encoding):
    """piexif (A1111) writes UTF-16 big-endian; some tools write little-endian after the same "UNICODE" code."""
    path = webp_with_comment(tmp_path / "c.webp", b"UNICODE\0" + REAL.encode(encoding))
    settings = settle_from(path)
    assert (settings.prompt, settings.sampler, settings.schedule, settings.seed) == (
        "a lighthouse, (dramatic sky:1.2)", "dpmpp_2m", "karras", 31)
