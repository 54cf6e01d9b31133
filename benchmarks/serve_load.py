"""Load test of `latentdiff serve` (issue 17): many concurrent A1111 clients against one server, then clients that
hang up mid-request while others call interrupt and skip. Not a unit test: it prints tables, and exits 1 when a
correctness check fails (a request lost, duplicated or answered with another seed's image, an image that differs
from the sequential one by more than 1/255, or a server that stops serving).

The server runs in its own process (`create_app(ServeSettings(...))` under uvicorn), so that its RSS is its own;
the built-in model `latentdiff/shapes-64` (64 px), so it runs offline. Phases:

1. one client sends every request one after the other (seeds S..S+N-1): the reference images, and the sequential
   throughput and latency; the first few are also checked against the Python API in this process
   (`pipe(prompt, generator=Generator().manual_seed(seed))`, bit for bit);
2. `--clients` threads each send `--requests` requests at once (the same seeds, distinct per request): every
   request must be answered once, with its own seed, and its image must equal the sequential one (the server
   batches compatible requests up to --max-batch images per call: a batched image may differ by 1/255 in a few
   values; the table counts identical images, images off by one, and images off by more, which fail);
3. `--rounds` rounds of the same load where a fraction of requests (`--disconnect`) close their connection after a
   random 0.05-1 s and a thread posts /sdapi/v1/interrupt (and every third time /skip) at random intervals; after
   each round, once the queue is empty, a final request must give the sequential image of its seed bit for bit;
   the server's RSS after each round is compared with its RSS after phase 2 (flat: no growth round over round).

    python benchmarks/serve_load.py                  # 16 clients x 8 requests, 20 steps (a few minutes on 2 cores)
    python benchmarks/serve_load.py --quick          # 4 clients x 4 requests, 10 steps, 1 round
    python benchmarks/serve_load.py --threads 1 --max-batch 8 --json serve.json
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import numpy as np
import requests
from PIL import Image

PROMPTS = ["a red circle on the left, blue background", "a blue square at the top, white background",
           "a yellow triangle in the center, black background", "a green circle at the bottom, red background"]
GUIDANCE, SIZE = 1.5, 64      # shapes-64's own guidance and size
SERVER = """
import sys, uvicorn
from latentdiff.serve.app import create_app
from latentdiff.serve.settings import ServeSettings
settings = ServeSettings(host="127.0.0.1", port={port}, max_batch={max_batch}, max_queue={max_queue},
                         device={device!r})
uvicorn.run(create_app(settings), host="127.0.0.1", port={port}, log_level="warning")
"""


@dataclass
class Answer:
    """One request and what came back."""

    seed: int
    start: float
    end: float = float("nan")
    status: str = "pending"          # ok | disconnected | http NNN | error: ...
    got_seed: int | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)

    @property
    def latency(self) -> float:
        return self.end - self.start


# ---- the server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: Any) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    code = SERVER.format(port=port, max_batch=args.max_batch, max_queue=max(256, 2 * args.clients * args.requests),
                         device=common.device_of(args))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(common.REPO), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/sdapi/v1/progress", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer within 120 s")


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and its peak (VmHWM), from /proc; psutil's rss where /proc is not."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
    except OSError:
        import psutil

        rss = psutil.Process(pid).memory_info().rss / 2**20
        return {"VmRSS": rss, "VmHWM": float("nan")}


def wait_idle(url: str, timeout: float = 120) -> None:
    """Until the server reports no job queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=10).json()["state"]
        if not state.get("job_count"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server still had jobs after {timeout} s")


# ---- clients --------------------------------------------------------------------------------------------
def body(seed: int, steps: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[seed % len(PROMPTS)], "negative_prompt": "", "seed": seed, "steps": steps,
            "cfg_scale": GUIDANCE, "width": SIZE, "height": SIZE}


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB"))


def post(session: requests.Session, url: str, seed: int, steps: int, *, hang_up_after: float | None = None,
         ) -> Answer:
    """One txt2img request; with hang_up_after, the client closes the connection after that many seconds."""
    answer = Answer(seed, time.perf_counter())
    try:
        response = session.post(f"{url}/sdapi/v1/txt2img", json=body(seed, steps),
                                timeout=(10, hang_up_after if hang_up_after is not None else 600))
        if response.status_code != 200:
            answer.status = f"http {response.status_code}"
        else:
            data = response.json()
            answer.got_seed = int(json.loads(data["info"])["seed"])
            answer.pixels = decode(data["images"][0])
            answer.status = "ok"
    except requests.Timeout:
        answer.status = "disconnected" if hang_up_after is not None else "error: timeout"
        session.close()                  # the socket goes: the server sees the client gone
    except requests.RequestException as e:
        answer.status = f"error: {type(e).__name__}"
    answer.end = time.perf_counter()
    return answer


def run_clients(url: str, seeds: list[int], *, clients: int, steps: int, disconnect: float = 0.0,
                rng: random.Random | None = None) -> tuple[list[Answer], float]:
    """`clients` threads, client c sending seeds[c::clients] one after another. Returns the answers and the wall."""
    answers: list[list[Answer]] = [[] for _ in range(clients)]
    plans = [[(s, rng.uniform(0.05, 1.0) if rng is not None and rng.random() < disconnect else None)
              for s in seeds[c::clients]] for c in range(clients)]

    def client(c: int) -> None:
        session = requests.Session()
        for seed, hang_up in plans[c]:
            answers[c].append(post(session, url, seed, steps, hang_up_after=hang_up))
            if hang_up is not None:
                session = requests.Session()
        session.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [a for mine in answers for a in mine], time.perf_counter() - start


def interrupter(url: str, stop: threading.Event, rng: random.Random, counts: dict[str, int]) -> None:
    """Post /interrupt (and every third time /skip) every 0.5-2 s until stopped."""
    sent = 0
    while not stop.wait(rng.uniform(0.5, 2.0)):
        route = "skip" if sent % 3 == 2 else "interrupt"
        sent += 1
        try:
            ok = requests.post(f"{url}/sdapi/v1/{route}", timeout=10).status_code == 200
        except requests.RequestException:
            ok = False
        counts[route if ok else "failed"] += 1


# ---- checks ---------------------------------------------------------------------------------------------
def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def compare(answers: list[Answer], reference: dict[int, np.ndarray], seeds: list[int]) -> dict[str, Any]:
    """Every seed answered once, with its own seed, and its image against the sequential one."""
    sent = sorted(a.seed for a in answers)
    ok = [a for a in answers if a.status == "ok"]
    result = {"sent": len(seeds), "answered": len(ok), "lost": len(set(seeds) - {a.seed for a in ok}),
              "duplicated": len(sent) - len(set(sent)), "wrong_seed": sum(a.got_seed != a.seed for a in ok),
              "identical": 0, "off_by_one": 0, "off_by_one_values": 0, "worse": 0, "max_diff": 0,
              "errors": sorted({a.status for a in answers if a.status != "ok"})}
    for a in ok:
        diff = np.abs(a.pixels.astype(int) - reference[a.seed].astype(int))
        worst = int(diff.max())
        result["max_diff"] = max(result["max_diff"], worst)
        key = "identical" if worst == 0 else "off_by_one" if worst == 1 else "worse"
        result[key] += 1
        result["off_by_one_values"] += int((diff == 1).sum())
    return result


def python_api_check(reference: dict[int, np.ndarray], steps: int, count: int, device: str) -> tuple[int, int]:
    """How many of the first `count` sequential images equal the Python API's for their seed, bit for bit."""
    import torch

    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64", device=device)
    same = 0
    for seed in sorted(reference)[:count]:
        image = pipe(PROMPTS[seed % len(PROMPTS)], negative_prompt="", num_inference_steps=steps,
                     guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed),
                     progress=False).images[0]
        same += bool(np.array_equal(np.asarray(image), reference[seed]))
    return same, min(count, len(reference))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---- the run --------------------------------------------------------------------------------------------
def note(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def throughput_row(table: common.Table, what: str, answers: list[Answer], wall: float, base: float | None) -> float:
    ok = [a.latency for a in answers if a.status == "ok"]
    rate = len(ok) / wall
    ratio = "1.00x" if base is None else f"{rate / base:.2f}x"
    table.add(what, len(answers), len(ok), f"{wall:.1f} s", f"{rate:.2f}", ratio, common.fmt_time(percentile(ok, 50)),
              common.fmt_time(percentile(ok, 95)), data=dict(what=what, requests=len(answers), answered=len(ok),
                                                             wall_s=wall, images_per_s=rate, p50_s=percentile(ok, 50),
                                                             p95_s=percentile(ok, 95)))
    return rate


def sequential_and_concurrent(url: str, args: Any, seeds: list[int],
                              tables: dict[str, common.Table]) -> dict[int, np.ndarray]:
    """Sequential, then concurrent: the reference images, throughput, latency, and the correctness counts."""
    note(f"phase 1: one client, {len(seeds)} requests")
    sequential, seq_wall = run_clients(url, seeds, clients=1, steps=args.steps)
    if any(a.status != "ok" or a.got_seed != a.seed for a in sequential):
        raise RuntimeError(f"the sequential client failed: {sorted({a.status for a in sequential})}")
    reference = {a.seed: a.pixels for a in sequential}
    note(f"phase 2: {args.clients} clients x {args.requests} requests")
    concurrent, wall = run_clients(url, seeds, clients=args.clients, steps=args.steps)
    speed = tables["speed"]
    base = throughput_row(speed, "1 client, sequential", sequential, seq_wall, None)
    throughput_row(speed, f"{args.clients} clients x {args.requests}, concurrent", concurrent, wall, base)
    result = compare(concurrent, reference, seeds)
    same, checked = python_api_check(reference, args.steps, args.api_checks, common.device_of(args))
    checks = tables["checks"]
    checks.add("answered / sent", f"{result['answered']} / {result['sent']}", data=result)
    checks.add("lost / duplicated / answered with another seed",
               f"{result['lost']} / {result['duplicated']} / {result['wrong_seed']}")
    checks.add("images identical to the sequential client's", result["identical"])
    checks.add("images off by 1/255 (pixel values off by one, of all)",
               f"{result['off_by_one']} ({result['off_by_one_values']} of {len(seeds) * SIZE * SIZE * 3})")
    checks.add("images off by more (fail)", f"{result['worse']} (max diff {result['max_diff']})")
    checks.add("sequential images = the Python API's (bit for bit)", f"{same} / {checked}",
               data=dict(python_api_same=same, python_api_checked=checked))
    failed = (result["answered"] != result["sent"] or result["lost"] or result["duplicated"] or result["wrong_seed"]
              or result["worse"] or same != checked)
    args.failures += ["phase 2 (concurrent clients)"] if failed else []
    return reference


def chaos(url: str, pid: int, args: Any, seeds: list[int], reference: dict[int, np.ndarray],
              tables: dict[str, common.Table]) -> None:
    """Rounds with hang-ups, interrupts and skips; after each, a final request and the server's RSS."""
    rng = random.Random(args.seed)
    wait_idle(url)
    before = memory_mb(pid)
    memory = tables["memory"]
    memory.add("after phases 1-2 (steady state)", f"{before['VmRSS']:.0f}", f"{before['VmHWM']:.0f}", "-",
               data=dict(what="before", **before))
    for round_no in range(1, args.rounds + 1):
        note(f"phase 3, round {round_no}: hang-ups, interrupts, skips")
        counts = {"interrupt": 0, "skip": 0, "failed": 0}      # answered 200; failed: any other answer
        stop = threading.Event()
        thread = threading.Thread(target=interrupter, args=(url, stop, rng, counts))
        if not args.no_interrupts:
            thread.start()
        answers, wall = run_clients(url, seeds, clients=args.clients, steps=args.steps, disconnect=args.disconnect,
                                    rng=rng)
        stop.set()
        if thread.is_alive():
            thread.join()
        wait_idle(url)
        final = post(requests.Session(), url, seeds[0], args.steps)
        final_ok = final.status == "ok" and np.array_equal(final.pixels, reference[seeds[0]])
        after = memory_mb(pid)
        statuses = {s: sum(a.status == s for a in answers) for s in sorted({a.status for a in answers})}
        cut = sum(a.status == "ok" and max_diff(a.pixels, reference[a.seed]) > 1 for a in answers)
        wrong = sum(a.status == "ok" and a.got_seed != a.seed for a in answers)
        tables["chaos"].add(round_no, len(answers), statuses.get("ok", 0), cut, statuses.get("disconnected", 0),
                            ", ".join(f"{k}: {v}" for k, v in statuses.items() if k not in ("ok", "disconnected"))
                            or "-", f"{counts['interrupt']} / {counts['skip']}", f"{wall:.1f} s",
                            "yes" if final_ok else f"NO ({final.status})",
                            data=dict(round=round_no, statuses=statuses, wall_s=wall, final_ok=final_ok,
                                      ok_but_cut_short=cut, wrong_seed=wrong, **counts))
        memory.add(f"after round {round_no}", f"{after['VmRSS']:.0f}", f"{after['VmHWM']:.0f}",
                   f"{after['VmRSS'] - before['VmRSS']:+.0f}", data=dict(what=f"round {round_no}", **after))
        errors = [s for s in statuses if s.startswith("error") or s in ("http 500", "http 502")]
        if not final_ok or errors or wrong or counts["failed"]:
            args.failures.append(f"phase 3 round {round_no}")


def make_tables() -> dict[str, common.Table]:
    return {
        "speed": common.Table("Throughput and latency (phases 1-2)",
                              ["client", "requests", "answered", "wall", "images/s", "vs sequential", "p50", "p95"]),
        "checks": common.Table("Correctness (phase 2 against phase 1)", ["check", "result"]),
        "chaos": common.Table("Hang-ups, interrupts and skips (phase 3)",
                              ["round", "requests", "ok", "of which cut short (differ by > 1/255)", "hung up", "other",
                               "interrupts / skips", "wall",
                               "final request = sequential image"]),
        "memory": common.Table("Server memory (MB)", ["when", "RSS", "peak RSS (VmHWM)", "RSS change"]),
    }


def versions() -> str:
    import platform
    from importlib.metadata import version

    return ", ".join([f"python {platform.python_version()}"] + [f"{name} {version(name)}" for name in
                                                                  ("torch", "latentdiff", "fastapi", "uvicorn")])


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; --quick 4)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 8; --quick 4)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --quick 10)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch")
    p.add_argument("--rounds", type=int, default=None, help="disconnect/interrupt rounds (default 2; --quick 1)")
    p.add_argument("--disconnect", type=float, default=0.3, help="fraction of requests that hang up mid-request")
    p.add_argument("--no-interrupts", action="store_true",
                   help="phase 3 without interrupts and skips (with --disconnect 0: a control for the RSS trend)")
    p.add_argument("--api-checks", type=int, default=8, help="sequential images checked against the Python API")
    p.add_argument("--seed", type=int, default=1000, help="first request seed (and the random plan's seed)")
    args = p.parse_args()
    quick = args.quick
    args.clients = args.clients or (4 if quick else 16)
    args.requests = args.requests or (4 if quick else 8)
    args.steps = args.steps or (10 if quick else 20)
    args.rounds = args.rounds or (1 if quick else 2)
    args.failures = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    seeds = list(range(args.seed, args.seed + args.clients * args.requests))
    tables = make_tables()
    print("## latentdiff serve under load (benchmarks/serve_load.py)\n")
    print(f"- mode: {'quick' if quick else 'full'}; {args.clients} clients x {args.requests} requests, "
          f"{args.steps} steps, {SIZE} px, latentdiff/shapes-64, server --max-batch {args.max_batch}; "
          f"{args.rounds} chaos round(s), {args.disconnect:.0%} hang-ups, "
          f"{'no interrupts' if args.no_interrupts else 'interrupts and skips every 0.5-2 s'}")
    print(f"- machine: {common.cpu_model()}, {os.cpu_count()} cores; device {common.device_of(args)}; server threads: "
          f"{args.threads or 'torch default'}; load average at start: {common.load()}", flush=True)
    print(f"- {versions()}; date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n", flush=True)
    proc, url = start_server(args)
    started = memory_mb(proc.pid)
    tables["memory"].add("after start", f"{started['VmRSS']:.0f}", f"{started['VmHWM']:.0f}", "-",
                         data=dict(what="start", **started))
    try:
        reference = sequential_and_concurrent(url, args, seeds, tables)
        chaos(url, proc.pid, args, seeds, reference, tables)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for table in tables.values():
        table.print()
    common.write_json(args.json, list(tables.values()), failures=args.failures, clients=args.clients,
                      requests=args.requests, steps=args.steps, max_batch=args.max_batch)
    common.footer()
    print("FAILED: " + ", ".join(args.failures) if args.failures else "all checks passed")
    return 1 if args.failures else 0


if __name__ == "__main__":
    sys.exit(main())
