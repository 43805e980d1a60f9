#!/usr/bin/env bash
# Everything the GPU checks need, in one or more calls on a CUDA machine (used with the device
# tool): install in place (no downloads), then the steps named in STEPS, in order:
#   tests    GPU twins of the kernel tests (~350 s on an H200, mostly kernel compilation)
#   sweeps   the tile sweeps named in SWEEPS (name:seconds; the stats sweep takes its cases
#            from AVSS_SWEEP_CASES, e.g. "plain mask rel")
#   benches  every bench/gpu_bench*.py
# A device call is limited to 600 s, so split them, e.g. STEPS="tests" then STEPS="sweeps benches".
# Every step has its own time limit and writes its log under $OUT as it goes.
set -uo pipefail
OUT=${OUT:-/tmp/avss_gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS-"tests sweeps benches"}
T_TESTS=${T_TESTS:-420} T_BENCH=${T_BENCH:-120}
SWEEPS=${SWEEPS-"attention:170 stats:120"}  # name:seconds, in order
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for step in $STEPS; do
  case $step in
    tests)
      AVSS_FAST_GPU_TESTS=1 timeout "$T_TESTS" python3 -m pytest -v -m gpu tests/test_gpu.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
      echo "gpu tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -15 ;;
    sweeps)
      for s in $SWEEPS; do
        n=gpu_sweep_${s%%:*}; t=${s##*:}
        AVSS_SWEEP_BUDGET_S=$((t - 40)) timeout "$t" python3 "bench/$n.py" --out "$OUT/$n.json" > "$OUT/$n.log" 2>&1
        echo "$n rc=$?"; tail -6 "$OUT/$n.log"
      done ;;
    benches)
      for b in bench/gpu_bench*.py; do
        n=$(basename "$b" .py)
        timeout "$T_BENCH" python3 "$b" --out "$OUT/$n.json" > "$OUT/$n.log" 2>&1; echo "$n rc=$?"; tail -4 "$OUT/$n.log"
      done ;;
    *) echo "unknown step: $step (tests, sweeps, benches)" ;;
  esac
done
