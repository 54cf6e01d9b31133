"""Issue 15's image inputs and hires fix bound what they would allocate before any work: a PNG whose header claims
10^10 pixels as --init-image, a hires fix to 32768 x 32768, a clip skip of 10^30 layers (each in a fresh
interpreter under a memory bound, returning within seconds)."""
from __future__ import annotations

import struct
import zlib

import pytest

from tests._support.bounded import run_bounded

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = """
import contextlib, sys
from latentdiff.cli import main
with contextlib.redirect_stderr(sys.stdout):
    code = main({argv!r})
print("exit", code)
"""


def huge_png(path) -> None:
    """A valid PNG signature and IHDR claiming 100000 x 100000 RGB pixels, with one tiny IDAT: a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_an_init_image_claiming_ten_billion_pixels_is_refused_before_decoding(tmp_path):
    huge_png(tmp_path / "huge.png")
    result = run_bounded(CLI.format(argv=["generate", "x", "--init-image", str(tmp_path / "huge.png"),
                                          "-o", str(tmp_path / "out.png")]), timeout_s=60, address_space_gb=8,
                         cwd=tmp_path)
    assert result.raised is None, result.traceback
    assert "exit 2" in result.stdout and "--init-image" in result.stdout and "cannot read this image" in result.stdout
    assert str(178_956_970) in result.stdout          # the bound (limits.MAX_IMAGE_PIXELS)
    assert result.peak_rss_mb < 1500 and not (tmp_path / "out.png").exists()


@pytest.mark.outcome("clear_error", fails_as="crash")
def test_a_hires_fix_to_32768_pixels_a_side_is_refused_before_any_work():
    result = run_bounded("""
        from latentdiff.builtin import builtin_path
        from latentdiff.pipelines.hires import hires_fix
        from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
        pipe = LatentDiffusionPipeline.from_pretrained(builtin_path("latentdiff/shapes-64"))
        hires_fix(pipe, "a red circle", height=4096, width=4096, scale=8, num_inference_steps=2, progress=False)
    """, timeout_s=60, address_space_gb=8)
    assert result.raised == "InputError" and result.is_latentdiff_error, result.traceback
    assert "32768" in result.message and "16384" in result.message    # the size and the bound (limits.MAX_SIDE)
    assert result.peak_rss_mb < 1500


@pytest.mark.outcome("clear_error", fails_as="unclear")
@pytest.mark.parametrize("argv, words", [
    (["--clip-skip", str(10**30)], ["--clip-skip", "A1111"]),
    (["--hires-scale", "1e308"], ["--hires-scale", "[1, 8]"]),
    (["--hires-scale", "inf"], ["--hires-scale"]),
])
def test_absurd_numbers_are_one_line_errors(tmp_path, argv, words, capsys):
    from latentdiff.cli import main

    assert main(["generate", "x", *argv, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentdiff: error: ") and all(word in err for word in words), err
