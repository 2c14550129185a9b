#!/usr/bin/env bash
# The runner calls that decide the switches still off by default for want of a GPU (sessions
# 27-29, 2026-12-05), each part one call of under ten minutes on an H200:
#
#   bash bench/ab/defaults.sh 1   # the new kernels' GPU tests; PDL in the compiled PTX; B = 1
#                                 # decode step profiles: prologue row, conv epilogue, pdl off,
#                                 # GEMV; the MoE's pair forms
#   bash bench/ab/defaults.sh 2   # the conv epilogue at B = 32 and in verify; the MoE router's
#                                 # warps; the speculative loop at B = 1 with the candidates
#
# Writes under $OUT. What each result decides: GDN_JAX_PROJECTION_PROLOGUE=row below views at
# B = 1 -> `ops.projection._prologue_level`'s default; GDN_JAX_CONV_EPILOGUE=on below off ->
# `ops.conv.project_conv_step`'s; pairs=split below tile -> `ops.moe.pairs_mode`'s; the router's
# fastest warps at one row -> `kernels.route`'s default there.
set -uo pipefail
part=${1:?1 or 2}
: "${OUT:?set OUT}"
t0=$(date +%s)
lap() { echo "T $(( $(date +%s) - t0 )) s"; }
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
if [[ $part == 1 ]]; then
    timeout 200 python -m pytest -q -m gpu -x tests/kernels/test_kernel_projection_conv.py \
        tests/modules/test_gated_deltanet_module.py 2>&1 | tail -5
    lap
    for pdl in true false; do  # does XLA put griddepcontrol.wait into the Pallas kernels?
        rm -rf /tmp/dump
        XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_gpu_enable_pdl=$pdl" python -c "
import jax, jax.numpy as jnp
from gdn_jax import kernels
x, w = jnp.ones((1, 2048), jnp.bfloat16), jnp.ones((2048, 2048), jnp.bfloat16)
print(jax.jit(lambda x, w: kernels.project(jnp.tanh(x), w) * 2)(x, w).sum())" 2>&1 | tail -1
        echo "pdl=$pdl: griddepcontrol in $(grep -l griddepcontrol /tmp/dump/*.ptx 2>/dev/null \
            | wc -l) of $(ls /tmp/dump/*.ptx 2>/dev/null | wc -l) PTX files"
        mkdir -p "$OUT/ptx_pdl_$pdl" && cp /tmp/dump/*.ptx "$OUT/ptx_pdl_$pdl/" 2>/dev/null
    done
    python bench/profile_step.py --out "$OUT/dense_b1" --family qwen3_5_text --layers 48 \
        --batches 1 --programs decode --variant views --variant row:prologue=row \
        --variant conv_ep:conv_epilogue=on --variant 'row_conv:prologue=row;conv_epilogue=on' \
        --variant 'pdl_off:xla_gpu_enable_pdl=false' \
        --variant 'row_gemv:prologue=row;gemv=prologues' 2>&1 | tail -50
    lap
    python bench/profile_step.py --out "$OUT/moe_b1" --family qwen3_5_moe_text --layers 40 \
        --batches 1 --programs decode --variant tile --variant row:pairs=row \
        --variant split:pairs=split --variant 'split_row:pairs=split;prologue=row' 2>&1 | tail -40
    lap
else
    python bench/profile_step.py --out "$OUT/dense_conv" --family qwen3_5_text --layers 48 \
        --batches 1,32 --programs decode,verify --variant views \
        --variant conv_ep:conv_epilogue=on 2>&1 | tail -40
    lap
    python bench/bench_moe.py --out "$OUT/router" --tokens 1,4 --router-warps 1,2,4,8 2>&1 \
        | tail -30
    lap
    for v in "views:" "row:GDN_JAX_PROJECTION_PROLOGUE=row" \
             "row_conv:GDN_JAX_PROJECTION_PROLOGUE=row GDN_JAX_CONV_EPILOGUE=on"; do
        name=${v%%:*}
        env ${v#*:} python bench/bench_speculative.py --out "$OUT/spec_$name" --batches 1 2>&1 \
            | tail -8
        lap
    done
fi
