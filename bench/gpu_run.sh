#!/usr/bin/env bash
# One GPU-runner session step: install the carried wheels, run the GPU tests, profile the kernels.
#   bash bench/gpu_run.sh tests|ncu|bench|all     (writes under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-deps .wheels/*.whl 2>&1 | grep -v WARNING | tail -n 3
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -n 3
python -c "import jax; d=jax.devices()[0]; print(jax.__version__, d.device_kind, d.compute_capability)"
what=${1:-all}
if [[ $what == tests || $what == all ]]; then
    pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
fi
if [[ $what == ncu || $what == all ]]; then
    python bench/ncu_kernels.py --out "$OUT" --fla ${NCU_ARGS:-} 2>&1 | tail -n 60
fi
if [[ $what == bench ]]; then
    python bench/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -n 80
fi
