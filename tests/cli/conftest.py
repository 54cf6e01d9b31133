"""Fixtures of the command-line tests that run on the tiny stand-in for the built-in model
(tests/_support/tiny_builtin.py); a module opts in with `pytestmark = pytest.mark.usefixtures("offline_builtin")`
and takes `model` (the stand-in's folder) where it calls the pipeline itself. The helpers they call are in
tests/_support/cli.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests._support.cli import go_offline
from tests._support.tiny_builtin import make_tiny_shapes_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The stand-in's folder, built once per module (its generate settings: 4 DDIM steps, scale 3, 64 px)."""
    return make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64")


@pytest.fixture
def offline_builtin(monkeypatch, tmp_path, model, one_thread) -> None:
    """The stand-in as the built-in model, offline with an empty Hub cache, one thread, in tmp_path."""
    go_offline(monkeypatch, tmp_path, model)
