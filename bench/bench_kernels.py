"""Time the gdn_jax.kernels Pallas kernels (decode, verify replay, verify intermediate) on a GPU.

    python bench/bench_kernels.py --out DIR            # full sweep (~5-8 min on an H100)
    python bench/bench_kernels.py --out DIR --quick    # a few shapes
    python bench/bench_kernels.py --out DIR --fla      # also fla's fused_recurrent (torch)
    python bench/bench_kernels.py --out DIR --smoke    # tiny shapes in interpret mode (CPU check)
    python bench/bench_kernels.py --out DIR --backends triton,mosaic   # both kernel families

Shapes: H = 16, HV = 32, K = V = 128 (Qwen3-Next), B in {1, 8, 32, 128, 256}, T in {1, 2, 4, 8},
bf16 and fp32 pool, bf16 inputs; one slot per row (num_slots = B, slots a random permutation).
- decode:       T = 1, nothing pending.
- replay:       3 pending candidates per slot folded, then T tokens; the folded state is written.
- intermediate: nothing pending; T states written to inter [B, T, HV, V, K].

Timing: one jitted program runs a `lax.fori_loop` of n calls, each call's output o fed in as the
next call's v (so no call can be merged or dropped), the pool carried and donated. The trip count is
static (two executables, n and 2n calls: a runtime count can make XLA:GPU sync the loop predicate to
the host every iteration, which the 2026-11-25 results still include); the per-call time is (t(2n) -
t(n)) / n, medians over --reps, which removes dispatch and sync overhead
(`gdn_jax.benchmark.time_chain`; where noise makes the difference <= 0, the whole chain of 2n calls
over 2n, and the row says so). The naive t(n) / n is reported too. This is wall-clock: for kernel
time use ncu (pallas-gpu.md section 11).

Byte model per call (the unique bytes a perfect kernel moves): the state read once and written
once (decode, replay with pending > 0) or written T times (intermediate: inter), plus the token
inputs, the pending candidates read, and the outputs. GB/s = bytes / per-call time; "% copy" is
that over a device-to-device copy measured in the same run (torch `copy_` of >= 1 GiB when torch
imports with CUDA, else an XLA `x + 1` over 1 GiB: read + write bytes; the method is recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

# Share the GPU with torch (copy bandwidth, --fla): allocate on demand. Override from the shell.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

H, HV, K, V = 16, 32, 128, 128
PENDING_REPLAY = 3
BATCHES = (1, 8, 32, 128, 256)
TOKENS = (1, 2, 4, 8)
QUICK_BATCHES, QUICK_TOKENS = (8, 256), (4,)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes DIR/bench_kernels-<device>.json and prints a table.")
    p.add_argument("--out", required=True, help="directory for the JSON results")
    p.add_argument("--quick", action="store_true",
                   help=f"B in {QUICK_BATCHES}, T in {QUICK_TOKENS} only")
    p.add_argument("--fla", action="store_true",
                   help="also time fla's fused_recurrent_gated_delta_rule (torch) if importable")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (HV=4, K=V=16, B<=2) in interpret mode: checks the script "
                        "on a CPU; the numbers mean nothing")
    p.add_argument("--backends", default="triton",
                   help="comma-separated kernel families: triton (gdn_jax.kernels' Pallas-Triton "
                        "kernels), mosaic (the Mosaic GPU ones; --smoke runs them at K = V = 64)")
    p.add_argument("--ops", default="decode,replay,intermediate",
                   help="comma-separated subset of decode,replay,intermediate")
    p.add_argument("--batches", default=None, help="comma-separated B values (overrides)")
    p.add_argument("--tokens", default=None, help="comma-separated T values (overrides)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="pool dtypes")
    p.add_argument("--block-v", type=int, default=None,
                   help="kernel block_v (default: gdn_jax's dispatch tuning for the shape)")
    p.add_argument("--num-warps", type=int, default=None,
                   help="kernel num_warps (default: gdn_jax's dispatch tuning for the shape)")
    p.add_argument("--num-stages", type=int, default=1, help="kernel num_stages (default 1)")
    p.add_argument("--tune", action="store_true",
                   help="also sweep block_v {16,32,64} x num_warps {1,2,4,8} for decode and replay "
                        "T=4 at the largest B (about 3 more minutes)")
    p.add_argument("--chain", type=int, default=20, help="calls per timed program (n; >= 20)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per shape")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy for bandwidth")
    args = p.parse_args(argv)
    if args.chain < 20 and not args.smoke:
        p.error("--chain must be >= 20")
    return args


def _ints(text, default):
    return tuple(int(x) for x in text.split(",")) if text else default


# ------------------------------------------------------------------------------------------------
# Copy bandwidth


def copy_bandwidth(gib: float, smoke: bool):
    """Device-to-device copy bandwidth in GB/s (read + write bytes), and how it was measured."""
    nbytes = int(gib * 2**30) if not smoke else 2**24
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch without CUDA")
        x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            for _ in range(10):
                y.copy_(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / 10)
        del x, y
        torch.cuda.empty_cache()
        t = statistics.median(times)
        return {"GBps": 2 * nbytes / t / 1e9, "method": f"torch copy_ of {nbytes / 2**30:.2f} GiB "
                f"fp32 (read+write bytes)", "seconds": t}
    except Exception as e:  # noqa: BLE001 - any torch problem: fall back to XLA
        reason = f"{type(e).__name__}: {e}"
    from gdn_jax.benchmark import copy_bandwidth as xla_copy_bandwidth

    return {"GBps": xla_copy_bandwidth(nbytes), "method": f"XLA x + 1 over {nbytes / 2**30:.2f} "
            f"GiB fp32 (read+write bytes; its kernel time on a GPU; torch unavailable: {reason})"}


# ------------------------------------------------------------------------------------------------
# The kernels, chained


def make_inputs(B, T, pool_dtype, pending, dims, seed=0):
    """Random inputs made on the device (jax.random: no host RNG for the 0.5 GiB pools)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    h, hv, k, v = dims
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    bf = jnp.bfloat16

    def normal(*s, scale=1.0, dtype=bf):
        return (scale * jax.random.normal(next(keys), s, jnp.float32)).astype(dtype)

    n = B  # one slot per row
    t_max = max(8, pending)
    tokens = dict(q=normal(B, T, h, k), k=normal(B, T, h, k), v=normal(B, T, hv, v),
                  a=normal(B, T, hv), b=normal(B, T, hv), A_log=normal(hv, dtype=jnp.float32),
                  dt_bias=normal(hv, dtype=jnp.float32))
    state = dict(pool=normal(n, hv, v, k, scale=0.1, dtype=pool_dtype),
                 cand_k=normal(n, t_max, h, k), cand_v=normal(n, t_max, hv, v),
                 cand_g=-jnp.abs(normal(n, t_max, hv, scale=0.1, dtype=jnp.float32)),
                 cand_beta=jax.nn.sigmoid(normal(n, t_max, hv, dtype=jnp.float32)),
                 count=jnp.full((n,), pending, jnp.int32),
                 slots=jnp.asarray(np.random.default_rng(seed).permutation(n), jnp.int32))
    return tokens, state


def chained(op, tuning, interpret, backend="triton"):
    """jit(f)(pool, n, v, rest...) running n (static) calls of `op` (on `backend`'s kernel) in a
    fori_loop, pool donated."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from gdn_jax import kernels

    fn = {("triton", "decode"): kernels.decode, ("triton", "replay"): kernels.verify_replay,
          ("triton", "intermediate"): kernels.verify_intermediate,
          ("mosaic", "decode"): kernels.decode_mgpu,
          ("mosaic", "replay"): kernels.verify_replay_mgpu,
          ("mosaic", "intermediate"): kernels.verify_intermediate_mgpu}[(backend, op)]
    config = (kernels.MosaicConfig if backend == "mosaic" else kernels.TuningConfig)(**tuning)

    def run(pool, n, v, q, k, a, b, A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, count,
            slots):
        def body(_, carry):
            pool, v, acc = carry
            o, out = fn(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                        count, slots, interpret=interpret, config=config)
            if op == "intermediate":  # pool untouched; keep inter alive with a 1-element read
                acc = acc + out[0, 0, 0, 0, 0].astype(jnp.float32)
            else:
                pool = out
            return pool, o.astype(v.dtype), acc

        return lax.fori_loop(0, n, body, (pool, v, jnp.zeros((), jnp.float32)))

    # n is static: with a trip count known at compile time XLA:GPU need not bring the loop
    # predicate back to the host after every call (a runtime count may cost a sync per iteration).
    return jax.jit(run, static_argnums=(1,), donate_argnums=(0,))


def byte_model(op, B, T, pool_dtype, in_itemsize, pending, dims):
    import jax.numpy as jnp

    h, hv, k, v = dims
    state = B * hv * v * k * jnp.dtype(pool_dtype).itemsize
    tokens = T * B * (2 * h * k + hv * v + 2 * hv) * in_itemsize + 2 * hv * 4 + B * 4
    outputs = T * B * hv * v * in_itemsize
    cands = pending * B * ((h * k + hv * v) * in_itemsize + 2 * hv * 4) + B * 4
    if op == "decode":
        moved = 2 * state
    elif op == "replay":
        moved = state * (2 if pending else 1)
    else:
        moved = state * (1 + T)
    return moved + tokens + outputs + cands


def time_op(op, B, T, pool_dtype, tuning, args, dims, backend="triton"):
    import jax
    import jax.numpy as jnp

    from gdn_jax.benchmark import time_chain

    pending = PENDING_REPLAY if op == "replay" else 0
    tokens, state = make_inputs(B, T, pool_dtype, pending, dims)
    f = chained(op, tuning, args.smoke, backend)
    rest = (tokens["q"], tokens["k"], tokens["a"], tokens["b"], tokens["A_log"],
            tokens["dt_bias"], state["cand_k"], state["cand_v"], state["cand_g"],
            state["cand_beta"], state["count"], state["slots"])
    n = args.chain

    def run(st, calls):
        return f(st[0], calls, st[1], *rest)  # (pool, v, acc): the next call's inputs

    timing, _ = time_chain(run, (state["pool"], tokens["v"], jnp.zeros((), jnp.float32)),
                           calls=n, reps=args.reps)
    per_call = timing.per_call_s
    nbytes = byte_model(op, B, T, pool_dtype, 2, pending, dims)
    return {"op": op, "backend": backend, "pool_dtype": str(jax.numpy.dtype(pool_dtype)), "B": B,
            "T": T, "pending": pending, "tuning": tuning, "per_call_us": per_call * 1e6,
            "method": timing.method, "note": timing.note,
            "naive_per_call_us": timing.whole_s * 1e6, "t_n_s": timing.t_n,
            "t_2n_s": timing.t_2n, "chain": n, "first_call_s": timing.first_s, "bytes": nbytes,
            "GBps": nbytes / per_call / 1e9}


# ------------------------------------------------------------------------------------------------
# fla (torch), for comparison


def time_fla(B, T, args, dims):
    """fla's fused_recurrent_gated_delta_rule: T tokens from an fp32 [B, HV, K, V] state, n calls
    chained (each call's final state is the next call's initial state). g and beta are given
    precomputed (fla does not fuse the gating here); l2norm is fused (use_qk_l2norm_in_kernel)."""
    import torch
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    h, hv, k, v = dims
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, h, k, device=dev, dtype=bf)
    kk = torch.randn(B, T, h, k, device=dev, dtype=bf)
    vv = torch.randn(B, T, hv, v, device=dev, dtype=bf)
    g = -torch.rand(B, T, hv, device=dev, dtype=torch.float32) * 0.1
    beta = torch.rand(B, T, hv, device=dev, dtype=torch.float32)
    h0 = torch.randn(B, hv, k, v, device=dev, dtype=torch.float32) * 0.1

    def call(state):
        o, ht = fused_recurrent_gated_delta_rule(q, kk, vv, g=g, beta=beta, initial_state=state,
                                                 output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
        return ht

    state = call(h0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(args.reps):
        start.record()
        for _ in range(args.chain):
            state = call(state)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / args.chain)
    per_call = statistics.median(times)
    state_bytes = B * hv * k * v * 4
    nbytes = 2 * state_bytes + T * B * (2 * h * k + 2 * hv * v) * 2 + T * B * hv * 8
    return {"op": "fla_fused_recurrent", "state_dtype": "float32", "B": B, "T": T,
            "per_call_us": per_call * 1e6, "bytes": nbytes, "GBps": nbytes / per_call / 1e9}


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    copy = copy_bandwidth(args.copy_gib, args.smoke)  # before JAX touches the GPU

    import jax
    import jax.numpy as jnp

    backends = args.backends.split(",")
    # Smoke: tiny heads, K = V = 64 where a Mosaic kernel (K, V multiples of 64) is in the run.
    dims = ((1, 4, 64 if "mosaic" in backends else 16, 64 if "mosaic" in backends else 16)
            if args.smoke else (H, HV, K, V))
    batches = _ints(args.batches, (1, 2) if args.smoke else
                    (QUICK_BATCHES if args.quick else BATCHES))
    tokens = _ints(args.tokens, (1, 2) if args.smoke else (QUICK_TOKENS if args.quick else TOKENS))
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    ops = args.ops.split(",")
    from gdn_jax.ops import dispatch

    def tuning_for(op, pool_dtype, B, backend="triton"):
        cfg = dataclasses.asdict(dispatch.tuning(
            "decode" if op == "decode" else "verify", state_dtype=pool_dtype, B=B, V=dims[3],
            backend=backend, mode=None if op == "decode" else op))
        if backend == "mosaic":  # the Mosaic kernels take their own (block_v, tiles, stages)
            return cfg
        if args.block_v is not None:
            cfg["block_v"] = min(args.block_v, dims[3])
        if args.num_warps is not None:
            cfg["num_warps"] = args.num_warps
        cfg["num_stages"] = args.num_stages
        return cfg
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; "
          f"copy {copy['GBps']:.0f} GB/s [{copy['method']}]", flush=True)

    plan = []
    for op in ops:
        for pool_dtype in dtypes:
            for B in batches:
                for T in ((1,) if op == "decode" else tokens):
                    for backend in backends:
                        plan.append((op, pool_dtype, B, T, tuning_for(op, pool_dtype, B, backend),
                                     backend))
    if args.tune:
        B = max(batches)
        for op, T in (("decode", 1), ("replay", 4)):
            for pool_dtype in dtypes:
                for block_v in (16, 32, 64):
                    for warps in (1, 2, 4, 8):
                        cfg = dict(block_v=min(block_v, dims[3]), num_warps=warps,
                                   num_stages=args.num_stages)
                        entry = (op, pool_dtype, B, T, cfg, "triton")
                        if cfg != tuning_for(op, pool_dtype, B) and entry not in plan:
                            plan.append(entry)

    results, t_start = [], time.perf_counter()
    header = (f"{'op':<13}{'kernel':<7}{'pool':<9}{'B':>5}{'T':>3} {'tuning':>10}{'us/call':>10}"
              f"{'naive':>9}{'GB/s':>8}{'%copy':>7}")
    print(header)
    for op, pool_dtype, B, T, cfg, backend in plan:
        try:
            r = time_op(op, B, T, pool_dtype, cfg, args, dims, backend)
        except Exception as e:  # noqa: BLE001 - record and go on with the sweep
            r = {"op": op, "backend": backend, "pool_dtype": str(pool_dtype), "B": B, "T": T,
                 "tuning": cfg, "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{op:<13}{backend:<7}{str(pool_dtype):<9}{B:>5}{T:>3}  ERROR "
                  f"{r['error'][:80]}", flush=True)
            results.append(r)
            continue
        r["pct_copy"] = 100 * r["GBps"] / copy["GBps"]
        results.append(r)
        knobs = (f"bv{cfg['block_v']}t{cfg['tiles_per_cta']}s{cfg['stages']}"
                 if backend == "mosaic" else f"bv{cfg['block_v']}w{cfg['num_warps']}")
        print(f"{op:<13}{backend:<7}{r['pool_dtype']:<9}{B:>5}{T:>3} {knobs:>10}"
              f"{r['per_call_us']:>10.1f}{r['naive_per_call_us']:>9.1f}{r['GBps']:>8.0f}"
              f"{r['pct_copy']:>6.0f}%", flush=True)

    fla = []
    if args.fla:
        try:
            import fla  # noqa: F401
            import torch  # noqa: F401
        except Exception as e:  # noqa: BLE001
            fla = [{"error": f"fla not importable: {type(e).__name__}: {e}"}]
            print(fla[0]["error"])
        else:
            for B in batches:
                for T in tokens:
                    try:
                        r = time_fla(B, T, args, dims)
                        r["pct_copy"] = 100 * r["GBps"] / copy["GBps"]
                        print(f"{'fla':<13}{'float32':<9}{B:>5}{T:>3} {'':>7}"
                              f"{r['per_call_us']:>10.1f}{'':>9}{r['GBps']:>8.0f}"
                              f"{r['pct_copy']:>6.0f}%", flush=True)
                    except Exception as e:  # noqa: BLE001
                        r = {"op": "fla_fused_recurrent", "B": B, "T": T,
                             "error": f"{type(e).__name__}: {e}"[:500]}
                        print(f"fla B={B} T={T} ERROR {r['error'][:100]}")
                    fla.append(r)

    report = {
        "device": {"kind": dev.device_kind, "platform": dev.platform, "str": str(dev),
                   "compute_capability": getattr(dev, "compute_capability", None)},
        "jax_version": jax.__version__, "python": platform.python_version(),
        "argv": sys.argv[1:], "shapes": {"H": dims[0], "HV": dims[1], "K": dims[2], "V": dims[3],
                                         "input_dtype": "bfloat16",
                                         "replay_pending": PENDING_REPLAY},
        "timing": "wall clock, (t(2n) - t(n)) / n over a fori_loop chain, medians",
        "copy_bandwidth": copy, "results": results, "fla": fla,
        "sweep_seconds": time.perf_counter() - t_start,
    }
    kind = "".join(c if c.isalnum() else "_" for c in dev.device_kind).strip("_")
    path = os.path.join(args.out, f"bench_kernels-{kind}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path} ({report['sweep_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
