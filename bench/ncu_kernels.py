"""Kernel time of the GDN kernels (and fla's, side by side) from Nsight Compute, on the GPU runner.

Run under ncu, which this script starts itself:

    python bench/ncu_kernels.py --out DIR [--fla] [--fla-jax] [--flashinfer] [--quick] [--no-mosaic]
                                          [--sweep-mosaic decode,replay,intermediate]

It re-runs itself as `ncu ... python bench/ncu_kernels.py --worker`, profiling only the launches
between cudaProfilerStart/Stop (each case: compile and warm up first, then --reps launches), with
`--cache-control all --clock-control none` (caches flushed before each launch, clocks as found).
Every profiled launch is preceded by a one-thread marker kernel (`ncu_case_mark`), so ncu's rows
map back to the launches whatever kernels a call runs. DIR/ncu_kernels.json has, per case: the
median over launches of the call's summed kernel time (`call_us`: every kernel of one call, glue
included) and of its longest kernel (`kernel_us`, with that kernel's DRAM throughput, registers
per thread and achieved occupancy), the byte model, GB/s and % of the copy bandwidth measured in
the same run (torch `copy_`, 1 GiB), both from `call_us`. `--stalls` adds, per case, the main
kernel's issue-slot use and its top stall reasons (warp cycles per issued instruction): whether a
kernel is issue bound or waiting, and on what, before anyone redesigns it.

`--timer jax` times the same cases in one process under JAX's profiler instead (CUPTI kernel
durations, caches warm, no registers or occupancy): a tuning sweep of dozens of configs fits a
runner call, where under ncu each case costs tens of seconds and ncu writes its CSV only at exit.
Confirm a sweep's winner under ncu.

Cases: H = 16, HV = 32, K = V = 128, bf16 inputs; B in {1, 8, 32, 128, 256}; bf16 and fp32 pools.
  decode            T = 1, nothing pending
  mosaic decode     the same call through the Mosaic GPU kernel (kernels/decode_mgpu.py), with
                    dispatch's Mosaic tuning; by default on capability >= 9.0 (--no-mosaic: off)
  replay3+T         3 pending candidates folded, then T tokens (T = 4 by default)
  intermediate T    nothing pending, T states written
  mosaic replay3+T, mosaic intermediate T
                    the same through kernels/verify_mgpu.py, with dispatch's Mosaic tuning
  ring T, ring-decode  (--ring) ring mode through the jitted op (gdn_jax.ops.verify / decode on a
                    ring-mode state, the ring kernel plus its XLA appends; the Triton kernel, and
                    for a bf16 pool at T <= 8 the Mosaic GPU one too), ring W = 16 (T <= 8)
                    or 32 (T = 16): verify in three phases: fold 20% (committed counts uniform
                    over 0..W - T, a fifth of the rows past it, folding), fold 0% and fold 100%;
                    decode in its steady state (counts uniform over 1..W: one row in W folds)
  fla T             fla's fused_recurrent_gated_delta_rule over T tokens from a state of the pool's
                    dtype (it writes its final state in fp32), batch-indexed, no slots
  fla-jax T         the same Triton kernel, the same flags and inputs, launched from a jitted JAX
                    program through jax-triton (bench/fla_jax.py); first checked against
                    gdn_jax.ops.reference at B = 8, T = 4 (fp32 and bf16 state; the errors go into
                    the first fla-jax case's "check"). At T = 1 jax-triton makes T a constexpr.
  flashinfer ...    FlashInfer 0.7.2.post1's CuTe DSL kernels from torch (bench/flashinfer_gdn.py; carried
                    by bench/flashinfer_carry.py), bf16 pool only, no padding rows: decode (T = 1),
                    intermediate T (MTP verify writing [B, T, HV, V, K] bf16 states, pool read only)
                    and ring T (its verify + flush over a 32-slot ring, T in {4, 8}) in three
                    phases: fold 20% (ring fill uniform over 0..flush_min-1, a fifth of the rows at
                    flush_min..16, folding), fold 0% and fold 100%. First checked against the float64
                    oracle (tests/oracle.py) at B = 4; the errors go into the first case's "check".
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import io
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

H, HV, K, V = 16, 32, 128, 128
PENDING = 3
_SWEEP_SMEM = 160 * 1024  # the state tiles' stages a Mosaic sweep case may take of the SM's 227 KiB
RING_FOLD_SHARES = (0.2, 0.0, 1.0)  # FlashInfer's published steady state first, then both ends
METRICS = ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active")
# --stalls: the schedulers' issue-slot use and the warps' stall reasons (Volta's and later)
ISSUE_ACTIVE = "smsp__issue_active.avg.pct_of_peak_sustained_active"
STALLED = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
STALL_REASONS = ("barrier", "branch_resolving", "dispatch_stall", "drain", "lg_throttle",
                 "long_scoreboard", "math_pipe_throttle", "membar", "mio_throttle",
                 "no_instruction", "not_selected", "selected", "short_scoreboard", "wait")


def cases(args):
    if args.sweep or args.sweep_ring or args.sweep_mosaic:
        return _sweep(args)
    from gdn_jax import kernels
    batches = (args.batches or ((8, 256) if args.quick else (1, 8, 32, 128, 256)))
    out = []
    for dtype in args.dtypes:
        for B in batches:
            out.append(dict(impl="gdn", op="decode", B=B, T=1, dtype=dtype))
            if args.mosaic:
                out.append(dict(impl="mosaic", op="decode", B=B, T=1, dtype=dtype))
            for T in args.tokens:
                for op in ("replay", "intermediate"):
                    out.append(dict(impl="gdn", op=op, B=B, T=T, dtype=dtype))
                    if args.mosaic:
                        out.append(dict(impl="mosaic", op=op, B=B, T=T, dtype=dtype))
            # ring mode through the Triton kernel, and the Mosaic GPU one (bf16, the T it takes)
            ring_impls = ("gdn", "mosaic") if args.mosaic and dtype == "bfloat16" else ("gdn",)
            for impl in ring_impls if args.ring else ():
                out.append(dict(impl=impl, op="ring-decode", B=B, T=1, dtype=dtype,
                                ring=16, fold_share=1 / 16))
                for T in (t for t in args.tokens
                          if impl == "gdn" or t <= kernels.MOSAIC_RING_MAX_T):
                    for share in RING_FOLD_SHARES:
                        out.append(dict(impl=impl, op="ring", B=B, T=T, dtype=dtype,
                                        ring=32 if T > 8 else 16, fold_share=share))
            for impl in ("fla",) * args.fla + ("fla-jax",) * args.fla_jax:
                for T in (1,) + tuple(args.tokens):
                    out.append(dict(impl=impl, op="fla", B=B, T=T, dtype=dtype))
            if args.flashinfer and dtype == "bfloat16":
                out.append(dict(impl="flashinfer", op="decode", B=B, T=1, dtype=dtype))
                for T in (t for t in args.tokens if t in (4, 8)):
                    out.append(dict(impl="flashinfer", op="intermediate", B=B, T=T, dtype=dtype))
                    for share in RING_FOLD_SHARES:
                        out.append(dict(impl="flashinfer", op="ring", B=B, T=T, dtype=dtype,
                                        fold_share=share))
    if args.impls:
        out = [c for c in out if c["impl"] in args.impls]
    if args.ops:
        out = [c for c in out if c["op"] in args.ops]
    return out


def _sweep(args):
    """The tuning sweep asked for, kept to --sweep-batches, --dtypes and --ops (each sweep lists
    both dtypes and several ops and batches; a runner call of 600 s takes a few dozen cases)."""
    batches = tuple(int(x) for x in args.sweep_batches.split(","))
    if args.sweep:
        out = sweep_cases()
    elif args.sweep_ring:
        out = sweep_ring_cases(batches, args.dtypes, args.sweep_configs, args.tokens)
    else:
        out = sweep_mosaic_cases(tuple(args.sweep_mosaic.split(",")), batches)
    return [c for c in out if c["B"] in batches and c["dtype"] in args.dtypes
            and (not args.ops or c["op"] in args.ops)]


def sweep_ring_cases(batches=(32, 256), dtypes=("bfloat16", "float32"), configs=None,
                     tokens=(4,)):
    """Tuning sweep of the ring kernel: block_v x num_warps (or the given "bv:w,..." configs),
    verify at each T of `tokens` (W = 16, or 32 above T = 8) at fold 20%. Each config is a fresh
    XLA compile of the ring kernel (tens of seconds under ncu): a runner call of 600 s takes
    about six; sweep in chunks."""
    configs = configs.split(",") if configs else [f"{bv}:{w}" for bv in (16, 32, 64, 128)
                                                  for w in (2, 4, 8)]
    out = []
    for dtype, B, T, cfg in itertools.product(dtypes, batches, tokens, configs):
        case = dict(op="ring", B=B, T=T, dtype=dtype, ring=32 if T > 8 else 16,
                    fold_share=0.2)
        if cfg.startswith("m"):  # the Mosaic GPU kernel (bf16): block_v:tiles:stages
            bv, per, stages = (int(x) for x in cfg[1:].split(":"))
            if dtype == "bfloat16":
                out.append(dict(case, impl="mosaic", block_v=bv, tiles_per_cta=per,
                                stages=stages))
        else:
            bv, w = (int(x) for x in cfg.split(":"))
            out.append(dict(case, impl="gdn", block_v=bv, num_warps=w, num_stages=1))
    return out


def sweep_cases():
    """Tuning sweep: block_v x num_warps (x num_stages for the pending-candidate loop of replay)
    for decode (1, 2 or 4 warps) and replay 3+4 at B = 32 and 256, and intermediate T = 4 at
    B = 256."""
    out = []
    for op in ("decode", "replay", "intermediate"):
        for dtype in ("bfloat16", "float32"):
            for B in (32, 256):
                if op == "intermediate" and (B == 32 or dtype == "float32"):
                    continue
                for bv in ((8, 16, 32, 64) if op == "decode" else (8, 16, 32)):
                    for w in ((1, 2, 4) if op == "decode" else (1, 2)):
                        for stages in ((1, 3) if op == "replay" else (1,)):
                            out.append(dict(impl="gdn", op=op, B=B, T=1 if op == "decode" else 4,
                                            dtype=dtype, block_v=bv, num_warps=w,
                                            num_stages=stages))
    return out


def sweep_mosaic_cases(ops=("decode", "replay", "intermediate"), batches=(32, 256)):
    """Tuning sweep of the Mosaic GPU kernels: block_v x tiles_per_cta x stages (decode: up to
    four, where the state's stages fit _SWEEP_SMEM) for decode,
    replay 3+4 and intermediate T = 4 at B = 32 and 256, with the Triton kernel (dispatch's
    tuning) first in each group as the baseline."""
    out = []
    for op in ops:
        T = 1 if op == "decode" else 4
        for dtype in ("bfloat16", "float32"):
            for B in batches:
                out.append(dict(impl="gdn", op=op, B=B, T=T, dtype=dtype))
                for bv in (64, 128):
                    for per in (1, 2, 4, 8) if op == "decode" else (1, 2, 4):
                        for stages in (2, 3, 4) if op == "decode" else (2, 3):
                            tile = bv * K * (2 if dtype == "bfloat16" else 4)
                            if stages * tile > _SWEEP_SMEM:
                                continue
                            out.append(dict(impl="mosaic", op=op, B=B, T=T, dtype=dtype,
                                            block_v=bv, tiles_per_cta=per, stages=stages))
                            if op == "replay" and dtype == "bfloat16" and bv == 64:
                                out.append(dict(out[-1], wy=True))  # matrix form (Hopper)
    return out


def byte_model(c):
    """Unique bytes a perfect kernel moves: state once in and once out (or T times out), I/O."""
    sb = 2 if c["dtype"] == "bfloat16" else 4
    B, T = c["B"], c["T"]
    state = B * HV * V * K * sb
    tokens = B * T * (2 * H * K + HV * V + 2 * HV) * 2 + B * T * HV * V * 2  # q,k,v,a,b in; o out
    if c["op"] == "intermediate":
        return state + T * state + tokens
    if c["op"] == "replay":
        pend = B * PENDING * (H * K + HV * V) * 2 + B * PENDING * HV * 8
        return 2 * state + tokens + pend
    if c["op"] == "fla":  # reads the state in its dtype, writes fp32
        return state + B * HV * V * K * 4 + tokens
    if c["op"] in ("ring", "ring-decode") and c["impl"] in ("gdn", "mosaic"):
        # state read, the committed ring entries read (raw k in H heads, u in fp32, g), T entries
        # appended (k, u, g and beta: the ring's layout keeps a beta it no longer reads; the
        # kernel writes the u into the ring itself since 2026-12-07, before it wrote them out and
        # the append read them back: 2 x fp32 more a token), the folding rows' state written
        read = H * K * 2 + HV * V * 4 + HV * 4
        append = H * K * 2 + HV * V * 4 + HV * 8
        return (state + B * c["mean_fill"] * read + B * T * append + c["fold_share"] * state
                + tokens)
    if c["op"] == "ring":  # state read, ring window read, T entries appended, folding rows' state
        entry = H * K * 2 + HV * V * 2 + HV * 4  # normalised k, corrected u (bf16), log decay (fp32)
        return (state + B * c["mean_fill"] * entry + B * T * entry + c["fold_share"] * state
                + tokens)
    return 2 * state + tokens


def _marker():
    """A one-thread Triton kernel launched before every profiled call (see the module docstring)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def ncu_case_mark(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1)

    buf = torch.zeros(1, dtype=torch.int32, device="cuda")

    def mark():
        ncu_case_mark[(1,)](buf)
        torch.cuda.synchronize()

    return mark


def _checked(checks, name, check, c):
    """Run `check` once per worker (before its first timing, outside the profiled range; its result
    goes into c["check"]). False, with c["error"] set, when it failed: a wrong or failing kernel
    is not timed."""
    if name not in checks:
        try:
            checks[name] = c["check"] = check()
        except Exception as e:  # noqa: BLE001 - any failure means: time nothing of it
            checks[name] = f"check failed: {type(e).__name__}: {str(e)[:600]}"
        print(f"{name}: {checks[name]}", flush=True)
    if isinstance(checks[name], str):
        c["error"] = checks[name]
        return False
    return True


def _profile_torch(c, make_run, reps, timer):
    """Build a torch case's call, warm it up, then profile `reps` marked calls; a call that cannot
    be built or run (fla or Triton failing here, say) is recorded in c["error"] instead."""
    import torch

    try:
        run = make_run()
        for _ in range(2):
            run()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - record it and go on
        c["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    timer.time(c, reps, lambda: (run(), torch.cuda.synchronize()))


def _flashinfer_case(c, fi, rng):
    """The case's FlashInfer call as a closure over fresh inputs (bench/flashinfer_gdn.py)."""
    import numpy as np
    import torch

    B, T = c["B"], c["T"]
    x = fi.tokens(B, T, seed=int(rng.integers(1 << 30)))
    pool = (0.3 * torch.randn(B, HV, V, K, device="cuda")).to(torch.bfloat16)
    slots = torch.as_tensor(rng.permutation(B), dtype=torch.int32, device="cuda")
    if c["op"] == "decode":
        return lambda: fi.decode(x, pool, slots)
    if c["op"] == "intermediate":
        inter = torch.empty(B, T, HV, V, K, dtype=torch.bfloat16, device="cuda")
        return lambda: fi.intermediate(x, pool, slots, inter)
    flush_min = 16 - T + 1  # FlashInfer's default: fold when the window cannot take T more
    folding = rng.permutation(B) < round(c["fold_share"] * B)
    fill = np.where(folding, rng.integers(flush_min, 17, B), rng.integers(0, flush_min, B))
    c["mean_fill"] = float(fill.mean())
    hist = torch.as_tensor(fill, dtype=torch.int32, device="cuda")
    base = torch.as_tensor(rng.integers(0, fi.RING_SLOTS, B), dtype=torch.int32, device="cuda")
    rings = fi.new_ring(B)
    fi.fill_ring(rings, hist, base, slots)
    return lambda: fi.ring_verify(x, pool, slots, rings, hist, base)


def ring_counts(rng, B, W, reserve, fold_share):
    """Committed counts in a ring-mode steady state: a share of the rows folds (count past
    W - reserve), the rest spread uniformly over 0..W - reserve."""
    import numpy as np

    folding = rng.random(B) < fold_share
    if fold_share in (0.0, 1.0):
        folding[:] = fold_share == 1.0
    low = rng.integers(1 if reserve == 1 else 0, W - reserve + 1, B)
    high = rng.integers(W - reserve + 1, W + 1, B)
    return np.where(folding, high, low).astype(np.int32)


def _ring_case(c, args, timer, rng, mk, toks):
    """A ring-mode case through the jitted op, the state donated; the counts are set to the
    phase's before every call (so the phase holds), the ring holds random committed tokens."""
    import jax
    import jax.numpy as jnp

    from gdn_jax import kernels, ops
    from gdn_jax.ops import dispatch

    B, T, W, dtype = c["B"], c["T"], c["ring"], jnp.dtype(c["dtype"])
    decode = c["op"] == "ring-decode"
    st = ops.GDNState.create(B, H, HV, K, V, max(T, 4), dtype=dtype, input_dtype=jnp.bfloat16,
                             commit_mode="ring", ring_size=W)
    st = st.replace(pool=(0.3 * jax.random.normal(jax.random.key(1), st.pool.shape)).astype(dtype),
                    cand_k=mk(B, W, H, K), cand_v=mk(B, W, HV, V).astype(jnp.float32),
                    cand_g=jnp.full((B, W, HV), -0.05, jnp.float32),
                    cand_beta=jnp.full((B, W, HV), 0.5, jnp.float32))
    counts = ring_counts(rng, B, W, 1 if decode else st.t_max, c["fold_share"])
    c["mean_fill"] = float(counts.mean())
    count = jnp.asarray(counts)
    slots = jnp.arange(B, dtype=jnp.int32)[jnp.asarray(rng.permutation(B))]
    if "tiles_per_cta" in c:
        cfg = kernels.MosaicConfig(c["block_v"], c["tiles_per_cta"], c["stages"])
        choice = dispatch.Choice("mosaic", cfg)
        backend = None
    elif "block_v" in c:
        cfg = (c["block_v"], c["num_warps"])
        choice = dispatch.Choice("triton", kernels.TuningConfig(*cfg))
        backend = None
    else:
        choice = None
        backend = "mosaic" if c["impl"] == "mosaic" else "triton"
        c.update(dataclasses.asdict(dispatch.tuning("verify", backend, state_dtype=dtype, B=B,
                                                    V=V, mode="ring")))

    def call(st, count, toks, slots):
        # the tokens and slots are arguments: closed over, jit would embed them as constants
        # (16 MB at B = 256, T = 4) and XLA could fold the op's gating and slot glue away
        st = st.replace(count=count)
        if choice is not None:  # a swept config: the op's kernel path with that config
            from gdn_jax.ops import _pallas
            o, st = _pallas.ring(*toks, st, slots, reserve=1 if decode else st.t_max,
                                 choice=choice)
        elif decode:
            o, st = ops.decode(*toks, st, slots, backend=backend)
        else:
            o, st, _ = ops.verify(*toks, st, slots, backend=backend)
        return st, o

    f = functools.partial(jax.jit(call, donate_argnums=0), toks=toks, slots=slots)
    try:
        st, _ = jax.block_until_ready(f(st, count))
    except Exception as e:  # noqa: BLE001 - a config that does not compile: record, go on
        c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return
    state = [st]

    def launch():
        state[0], _ = jax.block_until_ready(f(state[0], count))

    timer.time(c, args.reps, launch)


class _Ncu:
    """--timer ncu: the profiled launches between cudaProfilerStart/Stop (ncu runs with
    --profile-from-start off), each after a marker kernel; ncu's rows are read by `summarize`."""

    def __init__(self):
        self.mark = _marker()

    def time(self, c, reps, launch):
        import torch

        torch.cuda.profiler.start()
        for _ in range(reps):
            self.mark()
            launch()
        torch.cuda.profiler.stop()


class _JaxProfiler:
    """--timer jax: the launches under JAX's profiler (CUPTI kernel durations, caches as the
    previous launch left them) in this process, no ncu: the kernel and call times go straight into
    the case. For tuning sweeps, dozens of configs a minute; no registers, occupancy or DRAM %."""

    def time(self, c, reps, launch):
        from gdn_jax.profiling import kernel_trace

        launch()  # after the compile and warm-up outside: nothing but the timed launches traced
        with kernel_trace() as trace:
            for _ in range(reps):
                launch()
        if not trace.totals:
            c["error"] = "no GPU kernels in the trace"
            return
        name = max(trace.totals, key=trace.totals.get)
        c.update(kernel=name[:60], kernel_us=trace.totals[name] / reps / 1e3,
                 call_us=sum(trace.totals.values()) / reps / 1e3,
                 kernels_per_call=round(sum(trace.counts.values()) / reps),
                 call_kernels=[[n[:60], round(trace.totals[n] / reps / 1e3, 2)]
                               for n in sorted(trace.totals, key=trace.totals.get, reverse=True)])


def worker(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gdn_jax import kernels, ops
    from gdn_jax.ops import dispatch

    rng = np.random.default_rng(0)
    results = []
    timer = _Ncu() if args.timer == "ncu" else _JaxProfiler()
    checks = {}  # a check's name -> its result, or why it failed
    todo = cases(args)
    t0 = time.time()
    for i, c in enumerate(todo):
        with open(os.path.join(args.out, "ncu_cases.json"), "w") as fh:
            json.dump(results, fh)  # before every case: what ran survives a crash or time limit
        print(f"[{time.time() - t0:6.1f} s] case {i + 1}/{len(todo)}: {c}", flush=True)
        B, T, dtype = c["B"], c["T"], jnp.dtype(c["dtype"])
        mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(jnp.bfloat16)
        q, k, v, a, b = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, HV, V), mk(B, T, HV), mk(B, T, HV)
        A_log = jnp.asarray(rng.uniform(-3, 0.5, HV), jnp.float32)
        dt = jnp.asarray(rng.standard_normal(HV), jnp.float32)
        if c["impl"] == "fla":
            import torch
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            t = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()
            tq, tk, tv, ta, tb = (t(x).bfloat16() for x in (q, k, v, a, b))
            tdt = torch.bfloat16 if c["dtype"] == "bfloat16" else torch.float32
            h0 = (0.3 * torch.randn(B, HV, V, K, device="cuda")).to(tdt)

            def run():  # gating, sigmoid and l2norm fused, V-first state: our layout and work
                return fused_recurrent_gated_delta_rule(
                    tq, tk, tv, ta, beta=tb, initial_state=h0, output_final_state=True,
                    use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=t(A_log),
                    dt_bias=t(dt), use_beta_sigmoid_in_kernel=True, state_v_first=True)
            _profile_torch(c, lambda: run, args.reps, timer)
            results.append(c)
            continue
        if c["impl"] == "flashinfer":
            import flashinfer_gdn as fi

            if not _checked(checks, "flashinfer vs the float64 oracle", fi.check_against_oracle, c):
                results.append(c)
                continue
            _profile_torch(c, lambda: _flashinfer_case(c, fi, rng), args.reps, timer)
            results.append(c)
            continue
        if c["impl"] == "fla-jax":
            from fla_jax import check_against_reference, fla_decode_jax

            if not _checked(checks, "fla-jax vs gdn_jax.ops.reference", lambda: [
                    check_against_reference(state_dtype=d) for d in ("float32", "bfloat16")], c):
                results.append(c)
                continue
            h0 = (0.3 * jax.random.normal(jax.random.key(1), (B, HV, V, K))).astype(dtype)
            f = jax.jit(fla_decode_jax)  # as the torch case: h0 only read, ht a new fp32 array
            fargs = (q, k, v, a, b, A_log, dt, h0)
            for _ in range(2):
                jax.block_until_ready(f(*fargs))
            timer.time(c, args.reps, lambda: jax.block_until_ready(f(*fargs)))
            results.append(c)
            continue
        if c["op"] in ("ring", "ring-decode"):
            _ring_case(c, args, timer, rng, mk, (q, k, v, a, b, A_log, dt))
            results.append(c)
            continue
        st = ops.GDNState.create(B, H, HV, K, V, 8, dtype=dtype, input_dtype=jnp.bfloat16)
        st = st.replace(pool=(0.3 * jax.random.normal(jax.random.key(1), st.pool.shape)).astype(dtype),
                        cand_k=mk(B, 8, H, K), cand_v=mk(B, 8, HV, V),
                        cand_g=jnp.full((B, 8, HV), -0.1, jnp.float32),
                        cand_beta=jnp.full((B, 8, HV), 0.5, jnp.float32),
                        count=jnp.full((B,), PENDING if c["op"] == "replay" else 0, jnp.int32))
        slots = jnp.asarray(rng.permutation(B), jnp.int32)
        keys = ("block_v", "tiles_per_cta", "stages", "wy", "num_warps", "num_stages")
        cfg = {key: c[key] for key in keys if key in c}
        if not cfg:  # dispatch's own config (replay on Hopper: the matrix form where it fits)
            dtypes = kernels.Dtypes(jnp.dtype(dtype), jnp.dtype(jnp.bfloat16),
                                    jnp.dtype(st.cand_v.dtype))
            cfg = dataclasses.asdict(dispatch.select(
                "decode" if c["op"] == "decode" else "verify", dtypes=dtypes,
                mode=None if c["op"] == "decode" else c["op"],
                backend="mosaic" if c["impl"] == "mosaic" else "triton",
                T=T, K=K, V=V, B=B).config)
        c.update(cfg)
        config = (kernels.MosaicConfig if c["impl"] == "mosaic" else kernels.TuningConfig)(
            **cfg)
        kernel = {"decode": kernels.decode, "replay": kernels.verify_replay,
                  "intermediate": kernels.verify_intermediate}[c["op"]]
        if c["impl"] == "mosaic":
            kernel = {"decode": kernels.decode_mgpu, "replay": kernels.verify_replay_mgpu,
                      "intermediate": kernels.verify_intermediate_mgpu}[c["op"]]
        toks = (q, k, v, a, b, A_log, dt)
        pend = (st.cand_k, st.cand_v, st.cand_g, st.cand_beta, st.count)
        # The inputs are arguments, not constants of the jit: XLA rebuilds a splat constant
        # (the candidates' jnp.full gates) by a broadcast kernel on every call, 2 us each, which
        # no real call (its candidates a state's buffers) pays.
        if c["op"] == "intermediate":  # pool only read; inter is the output (no slice of it:
            # that would add a kernel to the call)
            jitted = jax.jit(lambda pool, ins: (
                pool, kernel(*ins[:7], pool, *ins[7:12], ins[12], config=config)[1]))
        else:
            jitted = jax.jit(lambda pool, ins: (
                kernel(*ins[:7], pool, *ins[7:12], ins[12], config=config)[1], 0),
                donate_argnums=0)
        ins = (*toks, *pend, slots)
        f = lambda pool: jitted(pool, ins)  # noqa: E731
        pool = st.pool
        try:
            pool, _ = jax.block_until_ready(f(pool))
        except Exception as e:  # noqa: BLE001 - a config that does not compile: record, go on
            c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results.append(c)
            continue
        held = [pool]

        def launch():
            held[0], _ = jax.block_until_ready(f(held[0]))

        timer.time(c, args.reps, launch)
        results.append(c)
    with open(os.path.join(args.out, "ncu_cases.json"), "w") as fh:
        json.dump(results, fh)


def flashinfer_over_ours(table, backend_of=None):
    """FlashInfer's time over ours at each B (bf16 pool; > 1: ours is faster), by the longest
    kernel of a call (`ratio`: FlashInfer runs one kernel a call; ours adds the harness's broadcasts
    of its constant candidate arrays, which are not ops glue) and by the summed call time
    (`ratio_call`). Ours is the backend dispatch picks on this device (`backend_of(op, T, B, mode)`,
    default dispatch.select) for that op, B and verify mode: plain decode vs its decode,
    intermediate T vs its MTP verify, and replay (3 pending + T) vs its ring verify in the steady
    state (fold 20%; its fold 0% and 100% phases are in the cases)."""
    if backend_of is None:
        from gdn_jax.ops import dispatch

        def backend_of(op, T, B, mode):
            return dispatch.select(op, T=T, K=K, V=V, B=B, mode=mode).backend

    impl_of = {"triton": "gdn", "mosaic": "mosaic"}
    ok = [c for c in table if "error" not in c]
    rows = []
    for c in ok:
        if c["impl"] != "flashinfer" or c.get("fold_share", 0.2) != 0.2:
            continue
        op, mode = {"decode": ("decode", None), "intermediate": ("verify", "intermediate"),
                    "ring": ("verify", "replay")}[c["op"]]
        backend = backend_of(op, c["T"], c["B"], mode)
        ours_op = "replay" if c["op"] == "ring" else c["op"]
        ours = [o for o in ok if o["impl"] == impl_of.get(backend) and o["op"] == ours_op
                and o["B"] == c["B"] and o["T"] == c["T"] and o["dtype"] == c["dtype"]]
        if ours:
            o = ours[0]
            rows.append(dict(B=c["B"], T=c["T"], what=f"{c['op']} vs our {ours_op}", ours=backend,
                             flashinfer_us=c["kernel_us"], ours_us=o["kernel_us"],
                             ratio=c["kernel_us"] / o["kernel_us"],
                             flashinfer_call_us=c["call_us"], ours_call_us=o["call_us"],
                             ratio_call=c["call_us"] / o["call_us"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for ncu_kernels.json and the raw CSV")
    p.add_argument("--fla", action="store_true", help="also profile fla's fused_recurrent kernel")
    p.add_argument("--fla-jax", action="store_true",
                   help="also profile fla's kernel launched from JAX through jax-triton "
                        "(bench/fla_jax.py), after a check against the XLA reference")
    p.add_argument("--flashinfer", action="store_true",
                   help="also profile FlashInfer's GDN decode, MTP verify and ring verify "
                        "(bench/flashinfer_gdn.py; bf16 pool), after a check against the oracle")
    p.add_argument("--impls", default=None,
                   help="keep only these implementations of the standard cases, comma-separated "
                        "(gdn = our Triton, mosaic, fla, fla-jax, flashinfer)")
    p.add_argument("--ops", default=None,
                   help="keep only these ops (of the standard cases or a sweep), "
                        "comma-separated (decode, replay, intermediate, ring, ring-decode, fla)")
    p.add_argument("--quick", action="store_true", help="B in {8, 256} only")
    p.add_argument("--batches", default=None,
                   help="B values of the standard cases, comma-separated (overrides --quick)")
    p.add_argument("--dtypes", default="bfloat16,float32",
                   help="state dtypes (of the standard cases or a sweep), comma-separated "
                        "(default both)")
    p.add_argument("--tokens", default="4", help="verify T values, comma-separated (default 4)")
    p.add_argument("--reps", type=int, default=3, help="profiled launches per case (median)")
    p.add_argument("--sweep", action="store_true",
                   help="tuning sweep (block_v x num_warps) instead of the standard cases")
    p.add_argument("--no-mosaic", dest="mosaic", action="store_false",
                   help="leave out the Mosaic GPU kernels (on by default where they can run)")
    p.add_argument("--sweep-mosaic", default=None, metavar="OPS",
                   help="tuning sweep of the Mosaic GPU kernels (block_v x tiles_per_cta x "
                        "stages) for OPS, comma-separated of decode, replay, intermediate, "
                        "instead of the standard cases")
    p.add_argument("--sweep-batches", default="32,256",
                   help="B values of the tuning sweeps, comma-separated (default 32,256); "
                        "--dtypes and --ops keep a sweep's cases too")
    p.add_argument("--ring", action="store_true",
                   help="also profile ring mode (verify in three fold phases, decode's cycle)")
    p.add_argument("--sweep-ring", action="store_true",
                   help="tuning sweep of the ring kernel (block_v x num_warps) instead of the "
                        "standard cases")
    p.add_argument("--sweep-configs", default=None, metavar="BV:W,...",
                   help="--sweep-ring's block_v:num_warps pairs (default all twelve of "
                        "16..128 x 2, 4, 8); mBV:TILES:STAGES for the Mosaic GPU kernel")
    p.add_argument("--timer", choices=("ncu", "jax"), default="ncu",
                   help="ncu: kernel time from Nsight Compute, caches flushed (the figures "
                        "quoted); jax: JAX's profiler in this process, no ncu (tuning sweeps: "
                        "dozens of configs a minute, confirm the winner under ncu)")
    p.add_argument("--stalls", action="store_true",
                   help="also collect the schedulers' issue-slot use and the warps' stall reasons "
                        "(warp cycles per issued instruction, by reason): per case the main "
                        "kernel's top reasons, to tell an issue-bound kernel from a waiting one")
    p.add_argument("--summarize", type=float, default=None, metavar="COPY_GBPS",
                   help="only summarize an existing --out directory (its ncu_raw.csv and "
                        "ncu_cases.json) with this copy bandwidth")
    p.add_argument("--note", default=None, help="a note stored in the summary (--summarize)")
    p.add_argument("--device", default=None,
                   help="the device the cases ran on, and --jax its jax version (--summarize)")
    p.add_argument("--jax", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = tuple(int(x) for x in args.tokens.split(","))
    args.dtypes = tuple(args.dtypes.split(","))
    args.impls = args.impls and tuple(args.impls.split(","))
    args.ops = args.ops and tuple(args.ops.split(","))
    args.batches = args.batches and tuple(int(x) for x in args.batches.split(","))
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)
    if args.summarize is not None:
        return summarize(args.out, args.reps, args.summarize, note=args.note,
                         device=args.device, jax_version=args.jax)

    import jax
    import torch

    from gdn_jax.ops import dispatch

    if args.fla_jax:
        from fla_jax import why_unavailable

        why = why_unavailable()
        if why is not None:
            print(f"fla through jax-triton left out: {why}", flush=True)
            args.fla_jax = False
    if args.flashinfer:
        from flashinfer_gdn import why_unavailable as fi_why

        why = fi_why()
        if why is not None:
            print(f"FlashInfer left out: {why}", flush=True)
            args.flashinfer = False
    why = dispatch.why_not("mosaic", dispatch.Device.of(), "decode", 1, K=K, V=V)
    if args.mosaic and why is not None:
        print(f"Mosaic GPU decode left out: {why}", flush=True)
        args.mosaic = False

    from bench_kernels import copy_bandwidth  # one copy-bandwidth method for every bench

    bw = copy_bandwidth(1.0, smoke=False)["GBps"]
    torch.cuda.empty_cache()
    if args.timer == "jax":
        worker(args)
        with open(os.path.join(args.out, "ncu_cases.json")) as fh:
            done = json.load(fh)
        for c in done:
            if "error" not in c:
                _rate(c, c["call_us"] * 1e3, bw)
        return _report(args.out, done, bw, args.reps, timer="jax profiler (CUPTI), warm caches",
                       flashinfer=args.flashinfer)
    raw = os.path.join(args.out, "ncu_raw.csv")
    cmd = ["ncu", "--cache-control", "all", "--clock-control", "none", "--profile-from-start",
           "off", "--metrics", ",".join(METRICS),
           "--csv", "--page", "raw", "--log-file", raw,
           sys.executable, os.path.abspath(__file__), "--worker", "--out", args.out,
           "--tokens", ",".join(map(str, args.tokens)), "--reps", str(args.reps),
           "--dtypes", ",".join(args.dtypes)] + (["--impls", ",".join(args.impls)] if args.impls else []) + (
        ["--ops", ",".join(args.ops)] if args.ops else [])
    cmd += ["--fla"] * args.fla + ["--fla-jax"] * args.fla_jax + ["--quick"] * args.quick + ["--sweep"] * args.sweep
    cmd += ["--flashinfer"] * args.flashinfer + ["--ring"] * args.ring
    cmd += ["--sweep-ring"] * args.sweep_ring
    cmd += ["--sweep-batches", args.sweep_batches] * bool(
        args.sweep or args.sweep_ring or args.sweep_mosaic)
    if args.sweep_ring and args.sweep_configs:
        cmd += ["--sweep-configs", args.sweep_configs]
    if args.batches:
        cmd += ["--batches", ",".join(map(str, args.batches))]
    cmd += ["--no-mosaic"] * (not args.mosaic)
    if args.stalls:
        at = cmd.index("--metrics") + 1
        cmd[at] = ",".join((cmd[at], ISSUE_ACTIVE, *(STALLED.format(r) for r in STALL_REASONS)))
    if args.sweep_mosaic:
        cmd += ["--sweep-mosaic", args.sweep_mosaic]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    summarize(args.out, args.reps, bw, flashinfer=args.flashinfer)


def summarize(out: str, reps: int, bw: float, *, flashinfer: bool = False,
              note: str | None = None, device: str | None = None, jax_version: str | None = None):
    """Map ncu's rows (out/ncu_raw.csv) to the cases the worker ran (out/ncu_cases.json), write
    out/ncu_kernels.json and print the table. Also run alone (--summarize) on a directory whose
    ncu run finished but whose parent did not (a runner call's time limit)."""
    raw = os.path.join(out, "ncu_raw.csv")
    with open(os.path.join(out, "ncu_cases.json")) as fh:
        done = json.load(fh)
    text = open(raw).read()
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    rows = [r for r in rows if r.get("Kernel Name") and not r["ID"].startswith("=")]
    rows = [r for r in rows if r["ID"].isdigit()]
    launches = []  # one list of ncu rows per profiled call, split at the marker kernels
    for r in rows:
        if "ncu_case_mark" in r["Kernel Name"]:
            launches.append([])
        elif launches:
            launches[-1].append(r)
    table = []
    ran = [c for c in done if "error" not in c]
    if len(launches) != len(ran) * reps or not all(launches):
        raise SystemExit(f"{len(launches)} marked launches for {len(ran)} cases x {reps} "
                         "(or a launch without kernels): cannot map them; see ncu_raw.csv")
    for c in done:
        if "error" in c:
            table.append(c)
    val = lambda r, key: float(r[key].replace(",", ""))
    for i, c in enumerate(ran):
        mine = launches[i * reps:(i + 1) * reps]
        main_rows = [max(launch, key=lambda r: val(r, METRICS[0])) for launch in mine]
        num = lambda key: statistics.median(val(r, key) for r in main_rows)
        call_ns = statistics.median(sum(val(r, METRICS[0]) for r in launch) for launch in mine)
        c.update(kernel=main_rows[0]["Kernel Name"][:60], kernel_us=num(METRICS[0]) / 1e3,
                 call_us=call_ns / 1e3, kernels_per_call=len(mine[0]),
                 dram_pct=num(METRICS[1]), regs=num(METRICS[2]), occupancy_pct=num(METRICS[3]),
                 # what the call's time is made of (the first launch): the glue beside the kernel
                 call_kernels=[[r["Kernel Name"][:60], round(val(r, METRICS[0]) / 1e3, 2)]
                               for r in mine[0]])
        c.update(stall_fields(main_rows[0]))
        _rate(c, call_ns, bw)
        table.append(c)
    return _report(out, table, bw, reps, timer="ncu --cache-control all --clock-control none",
                   flashinfer=flashinfer, note=note, device=device, jax_version=jax_version)


def stall_fields(row: dict, top: int = 6) -> dict:
    """From one ncu raw row (a kernel launch) with the --stalls metrics: issue_active_pct (the
    share of cycles a scheduler issued) and stalls, the top reasons as [reason, warp cycles per
    issued instruction]; empty where the row has no such columns."""
    stalls = [[r, round(v, 3)] for r in STALL_REASONS
              if (v := _number(row.get(STALLED.format(r)))) is not None]
    fields = {}
    if stalls:
        fields["stalls"] = sorted(stalls, key=lambda x: -x[1])[:top]
    if (active := _number(row.get(ISSUE_ACTIVE))) is not None:
        fields["issue_active_pct"] = active
    return fields


def _number(text: str | None) -> float | None:
    """An ncu CSV cell as a float (thousands separators dropped); None for "n/a" or no cell."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def _rate(c, call_ns, bw):
    nbytes = byte_model(c)
    c.update(bytes=nbytes, GBps=nbytes / call_ns, pct_copy=100 * nbytes / call_ns / bw)


def _report(out, table, bw, reps, *, timer, flashinfer=False, note=None, device=None,
            jax_version=None):
    """Write out/ncu_kernels.json and print the table."""
    import jax

    dev = jax.devices()[0]
    kind = device or dev.device_kind
    result = dict(device=kind, capability=None if device else getattr(dev, "compute_capability", None),
                  jax=jax_version or jax.__version__, copy_GBps=bw,
                  copy_method="torch copy_ 1 GiB fp32, read+write",
                  timer=timer, reps=reps, cases=table)
    if note:
        result["note"] = note
    if flashinfer:
        result["flashinfer_over_ours"] = flashinfer_over_ours(table)
        for row in result["flashinfer_over_ours"]:
            print(f"FlashInfer / ours, B = {row['B']:3d}, {row['what']}: {row['flashinfer_us']:.1f} / "
                  f"{row['ours_us']:.1f} us ({row['ours']}) = {row['ratio']:.2f} "
                  f"(call time: {row['ratio_call']:.2f})")
    with open(os.path.join(out, "ncu_kernels.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{kind}, jax {result['jax']}, copy {bw:.0f} GB/s")
    print(f"{'cfg':11s} {'impl':10s} {'op':13s} {'dtype':9s} {'B':>4s} {'T':>2s} {'kernel us':>10s} "
          f"{'call us':>8s} {'n':>2s} {'GB/s':>6s} {'%copy':>6s} {'dram%':>6s} {'regs':>5s} {'occ%':>5s}")
    for c in table:
        if "error" in c:
            print(f"{c['impl']:10s} {c['op']:13s} {c['dtype']:9s} {c['B']:4d} {c.get('block_v')} "
                  f"{c.get('num_warps', c.get('tiles_per_cta'))}: {c['error'][:80]}")
            continue
        if "tiles_per_cta" in c:
            cfg = f"bv{c['block_v']}t{c['tiles_per_cta']}s{c['stages']}{'wy' * c.get('wy', 0)}"
        elif "block_v" in c:
            cfg = f"bv{c['block_v']}w{c['num_warps']}s{c.get('num_stages', 1)}"
        elif "fold_share" in c:
            cfg = f"fold{100 * c['fold_share']:.0f}%"
        else:
            cfg = ""
        print(f"{cfg:11s} {c['impl']:10s} {c['op']:13s} {c['dtype']:9s} {c['B']:4d} {c['T']:2d} "
              f"{c['kernel_us']:10.1f} {c['call_us']:8.1f} {c['kernels_per_call']:2d} "
              f"{c['GBps']:6.0f} {c['pct_copy']:6.1f} {_num(c, 'dram_pct', 6, 1)} "
              f"{_num(c, 'regs', 5, 0)} {_num(c, 'occupancy_pct', 5, 1)}")
    for c in table:
        if c.get("stalls"):
            print(f"stalls {c['impl']} {c['op']} B={c['B']} T={c['T']}: issue active "
                  f"{c.get('issue_active_pct', float('nan')):.1f}%; "
                  + ", ".join(f"{r} {v:.2f}" for r, v in c["stalls"]))


def _num(c, key, width, digits):
    return f"{c[key]:{width}.{digits}f}" if key in c else "-".rjust(width)


if __name__ == "__main__":
    main()
