set -u
export TRITON_CACHE_DIR=/tmp/triton-cache XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -n 6 tests/kernels/test_kernel_projection_prologue.py tests/kernels/test_kernel_conv.py tests/kernels/test_kernel_residual_norm.py tests/ops/test_residual_norm.py tests/modules/test_linear_module.py > $R/pytest.log 2>&1; tail -n 12 $R/pytest.log
timeout ${PROF_S:-360} python3 bench/profile_step.py --out $R --layers 48 --batches ${PROF_B:-1,32} --programs decode,verify --variant off:prologue=off --variant on ${PROF_EXTRA:-} > $R/profile.log 2>&1; tail -n 60 $R/profile.log
cd $OUT && tar czf results.tgz r && rm -rf r
