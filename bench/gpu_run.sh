#!/usr/bin/env bash
# Everything the GPU checks need, in one call on a CUDA machine (used with the device tool):
# install in place (no downloads), GPU twins of the kernel tests, then the GPU benchmarks.
set -uo pipefail
OUT=${OUT:-/tmp/avss_gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
AVSS_FAST_GPU_TESTS=1 timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
for b in bench/gpu_bench*.py; do
  n=$(basename "$b" .py)
  timeout 200 python3 "$b" --out "$OUT/$n.json" 2>&1 | tee "$OUT/$n.log" | tail -15
done
