"""`latentdiff generate --controlnet / --control / --ip-adapter` (cli/generate_control.py): the KIND:IMAGE[:SCALE
[:START:END]] syntax, and every mistake refused by name before any model loads."""
from __future__ import annotations

import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.cli.generate_control import ControlSpec, parse_control
from latentdiff.errors import UsageError


@pytest.mark.parametrize("text,expected", [
    ("canny:photo.png", ControlSpec("canny", "photo.png")),
    ("image:mask.png:0.5", ControlSpec("image", "mask.png", 0.5)),
    ("threshold:a.png:1.2:0.1:0.8", ControlSpec("threshold", "a.png", 1.2, 0.1, 0.8)),
    ("canny:C:/x/y.png:0.7", ControlSpec("canny", "C:/x/y.png", 0.7)),     # colons in the name stay in it
    ("canny:2024:01.png", ControlSpec("canny", "2024:01.png")),
])
def test_control_syntax(text, expected):
    assert parse_control(text, where="--control") == expected


@pytest.mark.parametrize("text,match", [
    ("depth:photo.png", "bad --control"),
    ("photo.png", "bad --control"),
    ("canny:", "bad --control"),
    ("canny:a.png:1:0.5", "give SCALE, or SCALE:START:END"),
    ("canny:a.png:1:0.8:0.2", "0 <= START < END <= 1"),
    ("canny:a.png:1:0.5:0.5", "0 <= START < END <= 1"),
    ("canny:a.png:nan", "finite"),
])
def test_bad_control_specs(text, match):
    with pytest.raises(UsageError, match=match):
        parse_control(text, where="--control")


def run(*argv) -> int:
    return main(["generate", "a red circle", *map(str, argv)])


@pytest.fixture
def hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "hint.png")
    return tmp_path / "hint.png"


@pytest.mark.parametrize("flags,where", [
    (["--controlnet", "latentdiff/shapes-64-silhouette"], "--control"),
    (["--control", "image:hint.png"], "--controlnet"),
    (["--controlnet", "nowhere/x", "--controlnet", "b/c", "--control", "image:hint.png"], "--control"),
    (["--controlnet", "./missing-folder", "--control", "image:hint.png"], "--controlnet ./missing-folder"),
    (["--controlnet", "a/b", "--control", "image:missing.png"], "--control image:missing.png"),
    (["--guess-mode"], "--controlnet"),
    (["--ip-adapter", "x.safetensors"], "--ip-image"),
    (["--ip-image", "hint.png"], "--ip-adapter"),
    (["--ip-adapter", "missing.safetensors", "--ip-image", "hint.png"], "--ip-adapter"),
])
def test_mistakes_are_refused_before_loading(hint, capsys, flags, where):
    assert run(*flags) != 0
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err
