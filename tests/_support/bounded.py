"""Run a piece of code in a fresh interpreter under a memory and time bound, and read back what it raised and its
peak RSS: how the hardening suite proves that a few bytes of input never cost gigabytes or hours."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_WRAPPER = """
import json, resource, sys, traceback
limit = {address_space}
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
result = {{"raised": None, "module": None, "message": None}}
try:
    exec(compile({code!r}, "<bounded>", "exec"), {{"__name__": "__bounded__"}})
except BaseException as e:
    result.update(raised=type(e).__name__, module=type(e).__module__, message=str(e)[:2000],
                  traceback=traceback.format_exc()[-4000:])
# VmHWM: this process's own peak since exec. ru_maxrss also counts the parent's pages, which a vfork-ed child
# shares until exec (so it read 600 MB for a bare `import latentdiff.errors` under a large pytest process).
try:
    with open("/proc/self/status") as _status:
        _hwm = [line for line in _status if line.startswith("VmHWM:")]
    result["peak_rss_mb"] = int(_hwm[0].split()[1]) / 1024
except (OSError, IndexError, ValueError):
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("\\n@@BOUNDED@@" + json.dumps(result))
"""


@dataclass
class Bounded:
    raised: str | None        # the exception's class name, None when the code returned
    module: str | None        # the exception's module (latentdiff.errors for ours)
    message: str | None
    peak_rss_mb: float
    stdout: str
    traceback: str | None = None

    @property
    def is_latentdiff_error(self) -> bool:
        return self.module == "latentdiff.errors"


def run_bounded(code: str, *, timeout_s: float = 60, address_space_gb: float = 16,
                cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Bounded:
    """Run `code` (dedented) in `python -c` with one torch thread, an address-space limit (so a runaway
    allocation fails instead of taking the machine) and a timeout (TimeoutExpired fails the test)."""
    program = _WRAPPER.format(code=textwrap.dedent(code), address_space=int(address_space_gb * 1024**3))
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    paths = (str(REPO / "src"), str(REPO), run_env.get("PYTHONPATH", ""))  # this checkout's latentdiff first
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout_s,
                          cwd=cwd, env=run_env)
    marker = done.stdout.rfind("@@BOUNDED@@")
    if marker < 0:
        raise AssertionError(f"the bounded run died (rc {done.returncode}) without a result:\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout[marker + len("@@BOUNDED@@"):])
    return Bounded(result["raised"], result["module"], result["message"], result["peak_rss_mb"],
                   done.stdout[:marker], result.get("traceback"))
