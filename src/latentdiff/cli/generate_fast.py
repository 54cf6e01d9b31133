"""`latentdiff generate`'s step switches (issue 20, docs/fast.md): DeepCache and FreeU.

    latentdiff generate "a castle" --deepcache 3                   # a full UNet pass every 3rd step
    latentdiff generate "a castle" --deepcache 3 --deepcache-branch 1
    latentdiff generate "a castle" --freeu 0.9,0.2,1.5,1.6          # s1,s2,b1,b2 (diffusers' order)

Both change pixels, so the PNG records them and `--from` reads them back. Checked before the model loads; the
branch against the model's UNet once it is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from .. import limits
from ..config import is_int, is_real
from ..errors import InputError, UsageError
from .generate_settings import FLAGS, GenerateSettings

KEYS = ("deepcache", "deepcache_branch", "freeu")


def add_fast_flags(gen: argparse.ArgumentParser) -> None:
    """The flags of this module, in one group of `latentdiff generate --help`."""
    group = gen.add_argument_group("step switches: DeepCache, FreeU (docs/fast.md)")
    add = group.add_argument
    add("--deepcache", type=int, metavar="N", default=None,
        help="DeepCache: a full UNet pass every N steps, the shallow skip branch between (1: every step)")
    add("--deepcache-branch", type=int, metavar="B", default=None,
        help="DeepCache's skip branch (default 0: conv_in's skip, the shallowest and fastest)")
    add("--freeu", metavar="S1,S2,B1,B2", default=None,
        help="FreeU's factors, diffusers' order (SD 1.x: 0.9,0.2,1.5,1.6; SDXL: 0.6,0.4,1.1,1.2)")


def _origin(args: argparse.Namespace, key: str) -> str:
    return FLAGS[key] if getattr(args, key, None) is not None else f"{args.from_png}: {key}"


def settle_fast(args: argparse.Namespace, settings: GenerateSettings) -> GenerateSettings:
    """This module's settings (from the flags or the --from PNG, picked by `settle`) checked; --freeu as written
    becomes its four numbers. A UsageError naming the flag or PNG key."""
    values = {key: getattr(settings, key) for key in KEYS}
    if values["deepcache"] is not None and not (is_int(values["deepcache"]) and
                                                1 <= values["deepcache"] <= limits.MAX_STEPS):
        raise UsageError("bad value for deepcache", where=_origin(args, "deepcache"),
                         expected=f"an integer in [1, {limits.MAX_STEPS}] (1: no caching)",
                         found=repr(values["deepcache"]))
    branch = values["deepcache_branch"]
    if branch is not None and (not is_int(branch) or branch < 0 or values["deepcache"] is None):
        raise UsageError("bad value for deepcache_branch", where=_origin(args, "deepcache_branch"),
                         expected="an integer >= 0, with --deepcache", found=repr(branch))
    freeu = values["freeu"]
    if isinstance(freeu, str):
        try:
            freeu = [float(part) for part in freeu.split(",")]
        except ValueError:
            freeu = values["freeu"]
    if freeu is not None and not (isinstance(freeu, list) and len(freeu) == 4 and all(map(_positive, freeu))):
        raise UsageError("bad value for freeu", where=_origin(args, "freeu"),
                         expected="four positive numbers S1,S2,B1,B2 (e.g. 0.9,0.2,1.5,1.6)", found=repr(freeu))
    return dataclasses.replace(settings, freeu=freeu)


def _positive(value: Any) -> bool:
    """A finite positive number (an int too large for a float is not one)."""
    try:
        return is_real(value) and 0 < float(value) < math.inf
    except OverflowError:
        return False


def apply_fast(pipe: Any, settings: GenerateSettings, args: argparse.Namespace) -> None:
    """Switch DeepCache / FreeU on for the run; a pipeline without them, or a branch the UNet does not have, is a
    UsageError before any image is made."""
    for key, method in (("deepcache", "enable_deepcache"), ("freeu", "enable_freeu")):
        if getattr(settings, key) is not None and not hasattr(pipe, method):
            raise UsageError(f"{type(pipe).__name__} has no {key} switch", where=_origin(args, key),
                             expected=f"no {FLAGS[key]} with this model", found=getattr(settings, key))
    try:
        if settings.deepcache is not None:
            pipe.enable_deepcache(settings.deepcache, settings.deepcache_branch or 0)
    except InputError as e:
        raise UsageError(e.message, where=_origin(args, "deepcache_branch"), expected=e.expected,
                         found=settings.deepcache_branch) from None
    if settings.freeu is not None:
        pipe.enable_freeu(*settings.freeu)
