"""Diagnosis, not in run_all (issue 20): where one SD 1.5 UNet call (batch 2 = one CFG step) spends its time, in
latentdiff bf16 (torch.profiler, self CPU time by aten op) and in OpenVINO bf16 (its per-node profiling counters,
by executed kernel type), on the weights of benchmarks/cpu_peers.py. Each side in its own process, 1 thread.

    python benchmarks/probe_peers_ops.py --size 256          # needs `cpu_peers.py setup` and the OpenVINO venv
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import cpu_peers

TORCH = r'''
import json, time, torch
from collections import Counter
from latentdiff import LatentDiffusionPipeline
torch.set_num_threads(1)
unet = LatentDiffusionPipeline.from_pretrained({folder!r}, torch_dtype=torch.bfloat16).unet
x = torch.randn(2, 4, {side}, {side}, dtype=torch.bfloat16)
t = torch.tensor([500, 500])
c = torch.randn(2, 77, 768, dtype=torch.bfloat16)
with torch.no_grad():
    unet(x, t, c)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.process_time(); unet(x, t, c); cpu = time.process_time() - t0
ops = Counter()
for e in prof.key_averages():
    ops[e.key] += e.self_cpu_time_total / 1e6
print(json.dumps(dict(cpu_s=cpu, ops=ops.most_common(14), total=sum(ops.values()))))
'''

OPENVINO = r'''
import json, time, numpy as np, openvino as ov
from collections import Counter
core = ov.Core()
model = core.read_model({xml!r})
model.reshape({{"sample": [2, 4, {side}, {side}], "timestep": [1], "encoder_hidden_states": [2, 77, 768]}})
compiled = core.compile_model(model, "CPU", {{"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": "bf16",
                                             "INFERENCE_NUM_THREADS": "1"}})
request = compiled.create_infer_request()
inputs = {{"sample": np.random.randn(2, 4, {side}, {side}).astype(np.float32),
          "timestep": np.array([500], dtype=np.int64),
          "encoder_hidden_states": np.random.randn(2, 77, 768).astype(np.float32)}}
request.infer(inputs)
t0 = time.process_time(); request.infer(inputs); cpu = time.process_time() - t0
by_type, by_kernel = Counter(), Counter()
for info in request.get_profiling_info():
    seconds = info.real_time.total_seconds()
    by_type[info.node_type] += seconds
    by_kernel[info.exec_type] += seconds
executed = sum(1 for i in request.get_profiling_info() if i.real_time.total_seconds() > 0)
print(json.dumps(dict(cpu_s=cpu, types=by_type.most_common(12), kernels=by_kernel.most_common(10),
                      total=sum(by_type.values()), nodes_executed=executed, graph_ops=len(model.get_ops()))))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image side (latent side = size / 8)")
    p.add_argument("--only", choices=("latentdiff", "openvino"), default=None, help="one side only")
    args = p.parse_args()
    side = args.size // 8
    env = {"PYTHONPATH": str(cpu_peers.common.REPO / "src"), "OMP_NUM_THREADS": "1"}
    for name, python, code in (
            ("latentdiff bf16 (torch.profiler, self CPU s by aten op)", sys.executable,
             TORCH.format(folder=str(cpu_peers.WEIGHTS / "sd15"), side=side)),
            ("OpenVINO bf16 (profiling counters, s by node type and kernel)", str(cpu_peers.OV_PYTHON),
             OPENVINO.format(xml=str(cpu_peers.WEIGHTS / "openvino-fp32" / "unet" / "openvino_model.xml"), side=side))):
        if args.only and not name.lower().startswith(args.only):
            continue
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                          **env})
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"### {name}: one UNet call, batch 2, {args.size} px, 1 thread: {result['cpu_s']:.2f} CPU s\n")
        for key in ("ops", "types", "kernels"):
            if key in result:
                print(f"| {key} | s | share |\n|---|---|---|")
                for what, seconds in result[key]:
                    print(f"| {what} | {seconds:.3f} | {seconds / result['total']:.0%} |")
                print()
        if "nodes_executed" in result:
            print(f"OpenVINO graph: {result['graph_ops']} ops in the IR, {result['nodes_executed']} executed nodes "
                  "after its fusions\n", flush=True)


if __name__ == "__main__":
    main()
