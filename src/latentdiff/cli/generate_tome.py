"""`latentdiff generate`'s cheaper-step switches (issue 20): token merging and CFG truncation.

    latentdiff generate "a castle" --tome 0.5                 # ToMe for SD: half the tokens of the full-res attention
    latentdiff generate "a castle" --cfg-truncation 0.5       # guidance for the first half of the steps only

Both change pixels, so a PNG records them (`--from` reads them back). ToMe merges in the transformer blocks at
the latent's full resolution (tomesd's default max_downsample=1): SDXL has none there, and a run is told so.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..config import is_real
from ..errors import UsageError

FAST_KEYS = ("tome", "cfg_truncation")


def add_tome_flags(gen: argparse.ArgumentParser) -> None:
    """The flags of this module, in one group of `latentdiff generate --help`."""
    group = gen.add_argument_group("cheaper steps (docs/fast.md)")
    add = group.add_argument
    add("--tome", type=float, metavar="RATIO", default=None,
        help="token merging: merge this fraction of the tokens in the full-resolution self-attention (0.3-0.5)")
    add("--cfg-truncation", type=float, metavar="F", default=None,
        help="classifier-free guidance for this fraction of the steps only, then one UNet pass per step")


def check_fast_values(values: dict[str, Any], origin: dict[str, str]) -> None:
    """--tome in [0, 1), --cfg-truncation in [0, 1] (from a flag or a PNG), named by where they came from."""
    for key, upper, closed in (("tome", 1.0, False), ("cfg_truncation", 1.0, True)):
        value = values.get(key)
        if value is None:
            continue
        try:
            ok = is_real(value) and not isinstance(value, bool) and float(value) >= 0.0 and \
                (float(value) <= upper if closed else float(value) < upper)
        except OverflowError:      # an int too large for a float (from a PNG) is not a number in range
            ok = False
        if not ok:
            raise UsageError(f"bad value for {key}", where=origin.get(key, key),
                             expected="a number in [0, 1)" if not closed else "a number in [0, 1]", found=repr(value))


def apply_tome(pipe: Any, ratio: float | None, warn: Any) -> None:
    """--tome on the pipeline (and nothing without it); a warning when no block merges (SDXL)."""
    if ratio is None:
        return
    if not hasattr(pipe, "enable_tome"):
        raise UsageError("--tome needs a text-to-image model with transformer blocks", where="--tome",
                         expected="no --tome with this model", found=type(pipe).__name__)
    try:
        pipe.enable_tome(float(ratio))
    except UsageError as error:   # no block at the full resolution (SDXL): the flag has tomesd's reach only
        if error.where != "max_downsample":
            raise
        warn("--tome: this model has no attention at the latent's full resolution (SDXL), so nothing is merged")


def fast_call_options(settings: Any) -> dict[str, Any]:
    """The pipeline call's keywords of these switches (none when unset: every pipeline call stays as it was)."""
    return {} if settings.cfg_truncation is None else {"cfg_truncation": float(settings.cfg_truncation)}
