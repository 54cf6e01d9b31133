"""Process start-up costs that a library can avoid (imports nothing heavy: safe on the CLI's error paths)."""
from __future__ import annotations

import gc
import os
import sys

_FROZEN = False


def freeze_startup_objects() -> bool:
    """Once per process, before the first model is built: move every object alive now (torch's and
    latentdiff's modules, functions and classes: ~10^5 objects that live as long as the process) to the
    garbage collector's permanent generation (gc.freeze). Without it, the burst of allocations of the first
    load triggers a full collection that walks all of them: a visible share of a cold start
    (benchmarks/RESULTS.md). Frozen objects are still freed by reference counting; only cyclic garbage that
    already exists at that moment is never collected. LATENTDIFF_GC_FREEZE=0 turns it off. Returns whether
    this call froze (not before torch is imported: its objects are most of what is worth freezing)."""
    global _FROZEN
    if _FROZEN or "torch" not in sys.modules:
        return False
    _FROZEN = True
    if os.environ.get("LATENTDIFF_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    gc.freeze()
    return True
