"""Fixtures shared by the whole suite: tiny configs, the reference library, one-thread runs.

Where things are: plain helpers (tiny diffusers models, tiny tokenizers, the parity measure) live in
tests/_support/ and are imported from there; the fixtures below build on them. Test modules never import from
one another. The layout of tests/ mirrors src/latentdiff/ (see CONTRIBUTING.md).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch

# torch_dtype="auto" and `latentdiff generate`'s default pick bf16 on CPUs with AMX / AVX512-BF16: the suite
# runs as on a CPU without them, so outputs compared bit for bit are the same on every machine.
os.environ.setdefault("LATENTDIFF_CPU_BF16", "0")

if TYPE_CHECKING:  # imported in the fixtures, so that collecting the suite does not import latentdiff's models
    from latentdiff.models.autoencoder_kl import AutoencoderKLConfig


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than two fighting over cores shared with other test runs (and
    subprocess runs use one too, so in-process and subprocess results can be compared bit for bit).

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def diffusers() -> ModuleType:
    """diffusers, the reference implementation of the parity tests; they skip without it (the analytic tests in
    the same module still run)."""
    return pytest.importorskip("diffusers")


@pytest.fixture
def tiny_kl() -> AutoencoderKLConfig:
    """The smallest KL autoencoder config the tests build (tests/_support/tiny.py: two levels, f = 2)."""
    from tests._support.tiny import tiny_kl_config

    return tiny_kl_config()
