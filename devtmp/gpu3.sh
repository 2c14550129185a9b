set -u
export TRITON_CACHE_DIR=/tmp/triton-cache XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/r; mkdir -p $R
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -n 4 tests/kernels/test_kernel_projection_prologue.py > $R/pytest_prologue.log 2>&1; tail -n 3 $R/pytest_prologue.log
for mode in replay ring; do
  mkdir -p $R/$mode
  timeout 230 python3 bench/bench_speculative.py --out $R/$mode --layers 48 --batches 1,8,32 --accept-length 3.39 --commit-mode $mode > $R/bench_$mode.log 2>&1; tail -n 14 $R/bench_$mode.log
done
cd $OUT && tar czf results.tgz r && rm -rf r
