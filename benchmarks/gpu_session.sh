#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call of about 6 minutes (a session's lease is 15 minutes):
#   1. the CUDA-only tests (they skip on the CPU-only CI);
#   2. benchmarks/bench_gpu.py: SD 1.5 512 px it/s, eager and pipe.compile() against diffusers eager, and batch 16's
#      share of the measured bf16 matmul rate, eager and compiled.
# Logs and the JSON rows go to $OUT (the device tool's output folder) or ./gpu-out. Packages the device image lacks
# (diffusers; transformers at the tested pin) travel as wheels in .whl/ (see benchmarks/README.md).
set -uo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rA tests/pipelines/test_acceleration.py tests/diffusion/test_samplers.py \
  tests/diffusion/test_k_samplers.py tests/models/test_autoencoder_kl.py -k "cuda or gpu" 2>&1 | tee "$out/cuda-tests.log" | tail -15
timeout 330 python3 benchmarks/bench_gpu.py --reps 3 --deadline 200 --json "$out/gpu.json" > "$out/bench.log" 2>&1
echo "bench_gpu exit $?"
grep -v -i "warn\|deprecat\|Writing model" "$out/bench.log" | tail -20
