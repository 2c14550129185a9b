#!/usr/bin/env bash
# The runner calls that decide the switches left to measure (sessions 27-30, 2026-12-05), each
# part one call of under ten minutes on an H200. Decided since (session 30): a verify's conv
# epilogue up to 32 rows (H100, B = 8) and the router's one warp at one row (H100, bench_moe);
# the GLU above 32 rows stays off (H200, B = 32 verify, 64-column blocks: still slower). Left:
#
#   bash bench/ab/defaults.sh 1   # the new kernels' GPU tests; PDL in the compiled PTX; the
#                                 # B = 1 dense decode step under each switch (ran 2026-12-06
#                                 # on an H100: tests pass, prologue=row no faster, 3414.4
#                                 # against 3402.8 us; the PTX probe found no dump: XLA puts
#                                 # its PDL wait in every Triton kernel on Hopper, README)
#   bash bench/ab/defaults.sh 2   # the epilogues at B = 1 and 32 on an H200 (its B = 1 verify
#                                 # gave the GLU 15.24 us a layer where 12-04's gate / up took
#                                 # 12.94 + the product: is the GLU slower there at few rows?)
#                                 # (it ran the MoE's pair forms at B = 1 too: on an H100,
#                                 # 20 layers: split lost by chained step time, decode 1.773 /
#                                 # 1.773 against tile's 1.712 / 1.726 ms, verify 2.96 against
#                                 # 2.77; row lost in the profile, 3177 against 2973 us of
#                                 # kernels: both forms dropped, `ops.moe.config_for`)
#   bash bench/ab/defaults.sh 3   # the MoE router's warps; the GEMV; the speculative loop at
#                                 # B = 1 under the candidates
#   bash bench/ab/defaults.sh 4   # the headline's step figures (dense replay and ring, MoE;
#                                 # an H200: the MoE model runs out of an H100's memory), then
#                                 # a B = 1 dense decode's kernels with PDL off, time allowing
#   bash bench/ab/defaults.sh 5   # (ran 2026-12-06 on an H100 with REVS="4ab6bcf 55e4345":
#                                 # kept, README) session 31's changes, their GPU tests and a tree
#                                 # A/B of a 48-layer verify (its commit included): 55e4345
#                                 # (before), 441082e (the candidates' gating in the scatter's
#                                 # launch), 4ab6bcf (+ every GDN layer's conv window moved by
#                                 # one launch at commit, not a gather and a row copy a layer).
#                                 # Make the trees here first (`bash bench/ab/tree.sh make REV`
#                                 # for each) and carry devtmp/trees; keep what is faster
#   bash bench/ab/defaults.sh 6   # why the 128-row projections (a B = 32 verify) stay at 33-52%
#                                 # of copy, Triton and Mosaic alike (12-03: gate / up 18.8 /
#                                 # 25.0 us against a 9.7 us floor, out_proj 11.9 / 13.4 against
#                                 # 3.9): ncu's speed-of-light, occupancy, warp-state and memory
#                                 # sections of each kernel, caches flushed. Gate / up ran on an
#                                 # H100 (2026-12-06, bench/results/ncu_projection128-h100-*):
#                                 # Triton's 80 CTAs leave SMs idle (SM active 46% of the
#                                 # cycles), Mosaic's warps stall half their cycles at a CTA
#                                 # barrier
#   bash bench/ab/defaults.sh 7   # the 128-row groups at other configs: split K with 3 stages
#                                 # (96 KB: 2 CTAs per SM, every SM busy), 64-column blocks;
#                                 # faster than the dispatch's -> `config_for`'s wide rule (ran
#                                 # 2026-12-06 on an H100: the dispatch's config is the fastest
#                                 # for all five groups, Mosaic's too; rule kept,
#                                 # bench/results/bench_projection-h100-groups128_configs-*).
#                                 # Next: GROUP_CONFIGS=256:64:2:8:3,256:64:1:8:3 (each of the
#                                 # 80 CTAs re-reads all of x, as many bytes as its weight
#                                 # tiles at 128 columns: 256 columns in 2 K slices read
#                                 # 768 KB a CTA where 1 MB now; offline sm_90: 171 registers,
#                                 # no spill, 144 KB; 4 stages pass the kernel's 160 KB)
#   bash bench/ab/defaults.sh 8   # switches A/B by chained step time (bench_speculative, not
#                                 # summed kernel times, which PDL blurs): each of VARIANTS
#                                 # (words "name:ENV=V,ENV=V"; default the prologue at one
#                                 # row against the views) at BATCHES (default 1), ROUNDS (2)
#                                 # times, interleaved; the table's lines prefixed by the name.
#                                 # Ran 2026-12-06 on an H100, twice each, interleaved: the
#                                 # ring verify at B = 32 in Mosaic GPU against Triton (the
#                                 # latter keeps the PDL chain): 5.86 / 5.85 against 6.77 /
#                                 # 6.83 ms, Mosaic stays; GDN_JAX_ATTENTION_COMBINE=kernel
#                                 # against xla at B = 1 and 32: within the runs' spread
#                                 # (decode 3.197 against 3.204 / 3.207 ms at B = 1, verify
#                                 # 6.252 against 6.213 / 6.237 at B = 32), xla stays
#   bash bench/ab/defaults.sh 9   # the MoE kernels' configs at a B = 1 decode (256 experts,
#                                 # top 8, the shared expert folded), each config its own
#                                 # program, every call a fresh routing (from HBM, not L2; one
#                                 # layer's experts: fits an H100): 12-05's H200 profile had the
#                                 # gate / up at 57% of copy (15.5 us a layer against 8.9),
#                                 # 144 programs of [2048, 32] x 2 streaming 16 KB a stage in
#                                 # 3 stages, where 64-column blocks in two K slices (32 KB a
#                                 # stage) took 11.3 us: more bytes in flight a program (deeper
#                                 # stages, block_k 256) may get there without partial sums.
#                                 # The part then runs the best pair against the defaults by
#                                 # chained step time (bench_speculative --moe-configs, 20
#                                 # layers, twice each); a winner -> `ops.moe.config_for`.
#                                 # (2026-12-06, H100: the sweep never finished -- every
#                                 # program embedded the expert stacks as constants, minute-long
#                                 # compiles and a profile past 2 GB; fixed in bench_moe, unrun
#                                 # since: bench/results/bench_moe-h100-b1-sweep_closure_
#                                 # constants-2026-12-06.log). Ran later that day on an H100:
#                                 # the sweep's best pair (gate / up 32 x 256 in 5 stages,
#                                 # down 64 x 128 in 5) lost to the defaults by chained step
#                                 # time, decode 1.835 / 1.832 against 1.757 / 1.754 ms
#                                 # (verify and round within 0.3%): the defaults stay
#                                 # (bench/results/bench_speculative-h100-qwen3_5_moe_text-
#                                 # 20layers-b1-moe_configs_*-2026-12-06.json)
#   bash bench/ab/defaults.sh 10  # where a ring-mode verify's time goes at B = 32, the loop's
#                                 # mode there (profile_step had traced replay only): ncu,
#                                 # 2026-12-04, gave the ring op 44.4 us a call against 33.8 of
#                                 # kernel (10.5 us of XLA appends and counts) where the plain
#                                 # decode is 21.8; in the step, which launches stay per layer?
#                                 # (ran 2026-12-06 on an H100 with --hlo: per GDN layer the
#                                 # ring kernel 31.0 us, gdn_scatter_rows, the b / a slices
#                                 # and XLA's gated norm before out_proj; per layer the MLP's
#                                 # silu(gate) * up: bench/results/profile_step-h100-qwen3_5_
#                                 # text-b32-ring-2026-12-06.json; other kernels' times there
#                                 # are PDL-blurred)
#   bash bench/ab/defaults.sh 11  # what caps the 128-row projections at 33-52% of copy: the
#                                 # weight's TMA stream alone, with each unit's [128, bk] x tile
#                                 # beside it (as many bytes again, from L2), and the Mosaic
#                                 # kernel, at 1 and 2 CTAs an SM (bench/probe_stream.py).
#                                 # Ran 2026-12-06 on an H100 (gate / up, 4 stages): the tiles
#                                 # stream at 89% of copy, with the kernel's wgmmas at 87-88%,
#                                 # the kernel at 57.5%: its epilogue, where ptxas serialized
#                                 # the wgmmas (C7515), bench/results/probe_stream-h100-*
#   bash bench/ab/defaults.sh 12  # the kernel rebuilt without that (688a155): GPU tests, ptxas,
#                                 # the probe, the groups against Triton at 32 / 64 / 128 rows,
#                                 # and the B = 32 step with it wherever it fits (~7 min). Ran
#                                 # 2026-12-07 on an H100 (ROUNDS=1, MOSAIC_CONFIGS=128:4,64:6):
#                                 # tests pass; the kernel still 23.3 us against w+x+mma's 15.8
#                                 # (no C7515 now: the probe's own +add mode, 24.1, is as slow);
#                                 # the step with it 5.596 / 9.136 ms (decode / round) against
#                                 # 4.742 / 7.809: MOSAIC_ROWS stays empty (bench/results/
#                                 # *-h100-*rebuilt_688a155*, *-b32-projection_*-2026-12-07)
#   bash bench/ab/defaults.sh 13  # the Mosaic ring kernel's ring part as outer products in the
#                                 # token groups' own layout (`_ring_wy_mgpu.after_ring`; offline
#                                 # sm_90a SASS: the T = 4, W = 16 kernel 2832 -> 2704
#                                 # instructions, 296 -> 168 FFMA): its GPU tests, then its
#                                 # kernel time against the tree of REV (e0a5d8e then, the
#                                 # [BV]-vector form) at B = 32 and 256, ROUNDS times
#                                 # interleaved. Make the tree here first (`bash bench/ab/tree.sh
#                                 # make REV`) and carry devtmp/trees (~7 min). Ran
#                                 # 2026-12-07 on an H100 with the rows packed too (`x_rows`):
#                                 # tests pass; B = 256 verify 214.1 -> 199.9 us, ring decode
#                                 # 166.8 -> 155.3 (bench/results/ncu_kernels-h100-ring_after_*).
#                                 # Then REV=aca63ea against the ring scales c_l and e^{G_n}
#                                 # once a value head, kept in SMEM for its second tile
#                                 # (89a9fae; offline, that tile 2592 -> ~2320 instructions):
#                                 # 2026-12-07 on an H100, 7% slower (B = 256 verify fold 20%
#                                 # 198.7 -> 212, ring decode 154 -> 162 us), reverted
#                                 # (bench/results/ncu_kernels-h100-ring_scales_smem_*)
#   bash bench/ab/defaults.sh 15  # GDN's output norm kernel (`kernels.gated_rms_norm`, opt-in
#                                 # GDN_JAX_GATED_NORM=pallas until this runs): its GPU tests,
#                                 # alone against XLA's fusion by heads a program and warps
#                                 # (bench_residual_norm --gated), the B = 32 ring decode and
#                                 # verify and the B = 1 decode profiled both ways with PDL off
#                                 # (XLA's fusion_1109: 4.38 us x 36 a B = 32 verify, H100).
#                                 # Where the kernel wins: GATED_AUTO_KERNEL = True and
#                                 # `gated_config`'s heads from the sweep (~6 min)
#   bash bench/ab/defaults.sh 16  # the ring kernels writing their u into the ring (no XLA
#                                 # append of the fp32 u: gdn_scatter_rows moved 5.3 MB a layer
#                                 # at a B = 32 verify, 3.6 us x 36 on an H100), unsplit
#                                 # partials in bf16 (the B = 32 verify's in_proj wrote 6.3 MB
#                                 # of fp32 a layer, read by the conv and the output norm) and
#                                 # the gated norm, in one call: GPU tests, the B = 32 ring
#                                 # decode and verify profiled with PDL off on this tree (norm
#                                 # XLA and kernel) and on REV's (before both changes; make it
#                                 # here with `bash bench/ab/tree.sh make REV` and carry
#                                 # devtmp/trees), then the norm alone by heads (~7 min). Ran
#                                 # 2026-12-07 on an H100 (REV=aa7907d, 218 s): verify kernel
#                                 # time 5900.9 -> 5771.8 us, decode 4626.4 -> 4646.2 (the T = 1
#                                 # ring kernel +33 us); the norm kernel faster everywhere (4
#                                 # heads); pytest's 120 s ended in the ring tests (they pass)
#
# Writes under $OUT. What each result decides (a variant's kernel time per step below the
# default's): GDN_JAX_PROJECTION_PROLOGUE=row -> `ops.projection._prologue_level`'s default;
# glu_off / conv_off below views at a row count -> `ops.projection._glu`'s and
# `ops.conv.project_conv_step`'s bounds; the router's fastest warps ->
# `ops.moe._ROUTE_WARPS_ONE_ROW` (one row) and the 4 it keeps above.
set -uo pipefail
part=${1:?1 .. 16}
: "${OUT:?set OUT}"
t0=$(date +%s)
lap() { echo "T $(( $(date +%s) - t0 )) s"; }
profile() {  # profile FAMILY LAYERS BATCHES PROGRAMS NAME VARIANT...
    local family=$1 layers=$2 batches=$3 programs=$4 name=$5; shift 5
    local args=(); for v in "$@"; do args+=(--variant "$v"); done
    python bench/profile_step.py --out "$OUT/$name" --family "$family" --layers "$layers" \
        --batches "$batches" --programs "$programs" "${args[@]}" 2>&1 | tail -60
    lap
}
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
# 2026-12-06, after `pip install -e .` (pip, not `python -m pip`: perhaps another interpreter's)
# python found no gdn_jax.kernels from the repo root and no gdn_jax from bench/ scripts: import
# the checkout itself whatever is installed, its kernels linked in as the install maps them
# (tree.sh does the same for its trees; the link is .gitignore'd)
[[ -e gdn_jax/kernels ]] || ln -s ../kernels gdn_jax/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case $part in
1)
    timeout 240 python -m pytest -q -m gpu -x tests/kernels/test_kernel_projection_conv.py \
        tests/kernels/test_kernel_projection_glu.py tests/modules/test_gated_deltanet_module.py \
        tests/modules/test_linear_module.py 2>&1 | tail -5
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
    profile qwen3_5_text 48 1 decode dense_b1 views 'apart:conv_epilogue=off;glu=off' \
        row:prologue=row 'row_apart:prologue=row;conv_epilogue=off;glu=off' \
        'pdl_off:xla_gpu_enable_pdl=false'
    ;;
2)
    profile qwen3_5_text 48 1,32 decode,verify dense_ep views glu_off:glu=off \
        conv_off:conv_epilogue=off 'apart:conv_epilogue=off;glu=off'
    ;;
3)
    python bench/bench_moe.py --out "$OUT/router" --tokens 1,4 --router-warps 1,2,4,8 2>&1 \
        | tail -30
    lap
    profile qwen3_5_text 48 1 decode dense_gemv views 'row_gemv:prologue=row;gemv=prologues' \
        all_gemv:gemv=on
    for v in "views:" "row:GDN_JAX_PROJECTION_PROLOGUE=row" \
             "apart:GDN_JAX_CONV_EPILOGUE=off GDN_JAX_PROJECTION_GLU=off"; do
        name=${v%%:*}
        env ${v#*:} python bench/bench_speculative.py --out "$OUT/spec_$name" --batches 1 \
            2>&1 | tail -8
        lap
    done
    ;;
4)  # the scoreboard's step figures with the defaults (one H200 call, ~6 min): replace
    # headline.json's dense48_* (replay: decode; ring: round / decode, speculative / plain at
    # B = 32) and moe35b_* entries from these files
    for run in "dense:" "ring:--commit-mode ring" "moe:--family qwen3_5_moe_text"; do
        name=${run%%:*}
        python bench/bench_speculative.py --out "$OUT/$name" --batches 1,32 ${run#*:} 2>&1 \
            | tail -5
        lap
    done
    # where a B = 1 dense decode's kernel time goes there, each kernel's own (PDL off): the H200
    # gave 1.689x the floor on 12-05 where an H100 gives 1.37 (2026-12-07), time allowing
    (( $(date +%s) - t0 < 470 )) && timeout $(( 590 - $(date +%s) + t0 )) python \
        bench/profile_step.py --out "$OUT/b1_pdl_off" --family qwen3_5_text --layers 48 \
        --batches 1 --programs decode --variant 'pdl_off:xla_gpu_enable_pdl=false' 2>&1 | tail -30
    ;;
5)
    timeout 200 python -m pytest -q -m gpu -x tests/kernels/test_kernel_scatter.py \
        tests/ops/test_scatter.py tests/ops/test_ops_gpu.py tests/ops/test_ops_ring_gpu.py \
        tests/models/test_model_cache.py 2>&1 | tail -5
    lap
    # kernel time of a 48-layer verify, launches listed (REVS: fewer trees where time is short;
    # SOON: a tree only while the call has run fewer seconds, so a short call keeps what it has)
    for rev in ${REVS:-55e4345 441082e 4ab6bcf}; do
        (( $(date +%s) - t0 < ${SOON:-100000} )) || { echo "skipped $rev: SOON"; continue; }
        bash bench/ab/tree.sh run "$rev" profile_step.py --out "$OUT/gating_$rev" \
            --family qwen3_5_text --layers 48 --batches 1,32 --programs verify 2>&1 | tail -40
        lap
    done
    ;;
6)  # under ncu the JAX profiler (bench_projection's timer) crashes (CUPTI): a plain loop here
    for shape in ${SHAPES:-gate_up out_proj}; do
        for kernel in ${KERNELS:-gdn_projection_group gdn_projection_mgpu}; do
            timeout ${NCU_S:-120} ncu --clock-control none --cache-control all \
                -k "regex:^$kernel" --launch-skip 4 --launch-count 2 --section SpeedOfLight \
                --section Occupancy --section LaunchStats --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --csv \
                --page details python - "$kernel" "$shape" > "$OUT/ncu_${shape}_$kernel.csv" \
                2> "$OUT/ncu_${shape}_$kernel.err" <<'PY'
import sys, jax, jax.numpy as jnp, numpy as np
from gdn_jax import kernels
from gdn_jax.ops import projection
kernel, shape, M = sys.argv[1], sys.argv[2], 128
K, widths = {"gate_up": (2048, (5120, 5120)), "out_proj": (4096, (2048,))}[shape]
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
ws = tuple(jnp.asarray(rng.standard_normal((K, n)) * 0.02, jnp.bfloat16) for n in widths)
if kernel == "gdn_projection_group":
    cfg = projection.config_for(M, K, widths)
    f = jax.jit(lambda x, ws: kernels.project_group(x, ws, config=cfg))
else:
    cfg = projection.mosaic_config_for(M, K, widths)
    f = jax.jit(lambda x, ws: kernels.project_group_mgpu(x, ws, config=cfg))
print(kernel, shape, M, cfg)
for _ in range(8):
    jax.block_until_ready(f(x, ws))
PY
            echo "$shape $kernel: rc $?, $(wc -l < "$OUT/ncu_${shape}_$kernel.csv") lines"
            lap
        done
    done
    ;;
7)
    swept=128:64:2:8:3,128:64:1:8:3,128:64:4:8:3,64:64:1:8:3,64:64:2:8:3  # (2026-12-06)
    python bench/bench_projection.py --out "$OUT/groups128" --rows 128 --shapes k_proj --reps 3 \
        --groups --groups-only mlp_gate_up,gdn_in,attn_qkv,out_proj,down_proj \
        --group-configs "${GROUP_CONFIGS:-$swept}" \
        --mosaic "${MOSAIC_CONFIGS:-128:4,128:5,128:6}" 2>&1 | tail -40
    lap
    ;;
8)
    for round in $(seq "${ROUNDS:-2}"); do
        for v in ${VARIANTS:-views: row:GDN_JAX_PROJECTION_PROLOGUE=row}; do
            name=${v%%:*} settings=${v#*:}
            env ${settings//,/ } python bench/bench_speculative.py --out "$OUT/ab_${name}_$round" \
                --batches "${BATCHES:-1}" 2>&1 | grep -E "^ +[0-9]+ +[0-9]+ |Error" \
                | sed "s/^/$name /"
            lap
        done
    done
    ;;
9)  # then the best pair against the defaults by chained step time, 20 layers (fits an H100)
    python bench/bench_moe.py --out "$OUT/moe_b1_sweep" --tokens 1 --shared --sweep \
        --router-warps '' --sweep-block-n 32,64 --sweep-block-k 128,256 --sweep-splits 1 \
        --sweep-warps 4 --sweep-stages 3,4,5,6 2>&1 | tail -30
    lap
    for round in 1 2; do
        for v in defaults swept; do
            extra=(); [[ $v == swept ]] && extra=(--moe-configs "$OUT/moe_b1_sweep/bench_moe.json")
            python bench/bench_speculative.py --out "$OUT/moe_ab_${v}_$round" --batches 1 \
                --family qwen3_5_moe_text --layers 20 "${extra[@]}" 2>&1 \
                | grep -E "^ +[0-9]+ +[0-9]+ |Error" | sed "s/^/$v /"
            lap
        done
    done
    ;;
10)
    python bench/profile_step.py --out "$OUT/ring_b32" --family qwen3_5_text --layers 48 \
        --batches 32 --programs verify,round --commit-mode ring --top 30 2>&1 | tail -70
    lap
    ;;
12)  # the Hopper projection kernel without the wgmma serialization (688a155): its GPU tests;
    # ptxas's C7515 and the probe's side by side; the five groups at 32, 64 and 128 rows,
    # Triton's one launch against the Mosaic kernel; then the dense B = 32 step with the Mosaic
    # kernel wherever it fits (GDN_JAX_PROJECTION=mosaic) against the defaults, twice each
    timeout 150 python -m pytest -q -m gpu -x tests/kernels/test_kernel_projection_mgpu.py 2>&1 \
        | tail -2
    lap
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python bench/probe_stream.py --out "$OUT/probe" \
        --tiles 64x128,64x64 --stages 4,6 --per-sm 1 --reps 3 \
        --modes w+x+mma,w+x+mma+add,w+x+mma+scoped1,w+x+mma+scoped0,kernel > "$OUT/probe.log" 2>&1
    grep -E "^w\+x|^kernel|copy" "$OUT/probe.log"
    grep -E "C7515" "$OUT/probe.log" | sed 's/.*function//' | sort | uniq -c
    lap
    python bench/bench_projection.py --out "$OUT/groups" --rows 32,64,128 --shapes k_proj \
        --reps 3 --groups --groups-only mlp_gate_up,gdn_in,attn_qkv,out_proj,down_proj \
        --mosaic "${MOSAIC_CONFIGS:-128:4,128:6,64:6}" 2>&1 | tail -30
    lap
    for round in ${ROUNDS:-1 2}; do
        for v in default: mosaic:GDN_JAX_PROJECTION=mosaic; do
            env ${v#*:} python bench/bench_speculative.py --out "$OUT/ab_${v%%:*}_$round" \
                --batches 32 2>&1 | grep -E "^ +[0-9]+ +[0-9]+ |Error" | sed "s/^/${v%%:*} /"
            lap
        done
    done
    ;;
13)  # the ring kernel before / after a change (REV): GPU tests, then kernel and call time in one
    # process a side (JAX's profiler), the sides interleaved
    timeout 200 python -m pytest -q -m gpu -x tests/kernels/test_kernel_ring.py \
        tests/ops/test_ops_ring_gpu.py 2>&1 | tail -3
    lap
    before=$PWD/devtmp/trees/${REV:-aca63ea}
    [[ -d $before ]] || { echo "no tree $before: make it here and carry devtmp/trees"; exit 2; }
    for round in ${ROUNDS:-1 2}; do
        for side in before after; do
            path=$PYTHONPATH; [[ $side == before ]] && path=$before:$PYTHONPATH
            PYTHONPATH=$path timeout 200 python bench/ncu_kernels.py --ring --batches 32,256 \
                --dtypes bfloat16 --timer jax --out "$OUT/ring_${side}_$round" 2>&1 \
                | grep -E "ring|decode|Error" | sed "s/^/$side /"
            lap
        done
    done
    ;;
11)  # the 128-row projections' ceiling: TMA streams of the weight alone, with each unit's x
    # tile beside, and the Mosaic kernel itself, side by side (bench/probe_stream.py, ~3 min)
    timeout 400 python bench/probe_stream.py --out "$OUT/probe_stream" 2>&1 | tail -45
    lap
    ;;
16)
    timeout 120 python -m pytest -q -m gpu -x tests/kernels/test_kernel_ring.py \
        tests/ops/test_ops_ring_gpu.py tests/kernels/test_kernel_residual_norm.py \
        tests/ops/test_residual_norm.py tests/kernels/test_kernel_projection_prologue.py \
        tests/kernels/test_kernel_conv.py -k "gated or ring or prologue or conv" 2>&1 | tail -4
    lap
    ring_profile() {  # ring_profile NAME VARIANT... (B = 32 decode and verify, PDL off)
        local name=$1; shift
        local args=(); for v in "$@"; do args+=(--variant "$v;xla_gpu_enable_pdl=false"); done
        python bench/profile_step.py --out "$OUT/$name" --family qwen3_5_text --layers 48 \
            --commit-mode ring --batches 32 --programs decode,verify --top 14 "${args[@]}" \
            2>&1 | grep -E "^B=|gated|fusion_|gdn_scatter|gdn_verify_ring|Error"
        lap
    }
    ring_profile after "xla:gated_norm=xla" "kernel:gated_norm=pallas"
    before=$PWD/devtmp/trees/${REV:?the tree before the ring change}
    [[ -d $before ]] || { echo "no tree $before: make it here and carry devtmp/trees"; exit 2; }
    (cd "$before" && PYTHONPATH=$before:$PYTHONPATH ring_profile before "xla:gated_norm=xla")
    (( $(date +%s) - t0 < 400 )) && python bench/bench_residual_norm.py --out "$OUT/gated_w4" \
        --gated --rows 1,32,128 --heads 1,2,4,8,16 --warps 4 2>&1 | tail -19
    lap
    ;;
15)
    timeout 150 python -m pytest -q -m gpu tests/kernels/test_kernel_residual_norm.py \
        tests/ops/test_residual_norm.py -k gated 2>&1 | tail -3
    lap
    for w in 4 8; do
        python bench/bench_residual_norm.py --out "$OUT/gated_w$w" --gated --rows 1,32,128 \
            --heads 1,2,4,8,16 --warps $w 2>&1 | tail -19
    done
    lap
    for b in 32 1; do
        (( $(date +%s) - t0 < 420 )) || break
        python bench/profile_step.py --out "$OUT/gated_b$b" --family qwen3_5_text --layers 48 \
            --commit-mode ring --batches $b --programs "decode$( ((b > 1)) && echo ,verify)" \
            --top 14 --variant "xla:gated_norm=xla;xla_gpu_enable_pdl=false" \
            --variant "kernel:gated_norm=pallas;xla_gpu_enable_pdl=false" 2>&1 \
            | grep -E "^B=|gated|fusion_|gdn_projection "
        lap
    done
    ;;
esac
