"""A decoder layer's residual add + RMSNorm alone: XLA's fusions beside the one-launch kernel
(gdn_jax.kernels.add_rms_norm), at the row counts of decode and verify; or (--gated) GDN's
output norm before out_proj beside `gdn_jax.kernels.gated_rms_norm`.

    python bench/bench_residual_norm.py --out DIR                 # rows 1, 4, 32, 128
    python bench/bench_residual_norm.py --out DIR --warps 2,4,8,16 --rows 1,32
    python bench/bench_residual_norm.py --out DIR --gated --heads 1,2,4,8,16
    python bench/bench_residual_norm.py --out DIR --interpret     # CPU smoke test of the script

Each case is what a Qwen3.5-shaped layer hands its norm: x [M, 2048] bf16 (the residual), the
block's last projection as S fp32 split-K partials [S, M, 2048] (S as the dispatch splits a
4096 x 2048 out_proj at M rows: `gdn_jax.ops.projection.config_for`), the norm's fp32 weight.
Paths: `xla` (the partials summed and cast, the add and the norm as the modules wrote them:
`gdn_jax.ops.residual_norm.add_rms_norm(..., backend="xla")`) and `kernel_w{n}` (the kernel with
n warps a program). The figure is the GPU kernel time per call from JAX's profiler (every kernel
of the jitted call), the median of --reps traces of --calls calls each. The bytes (partials,
x and weight read; r and h written) over the copy bandwidth of the same run give the byte floor
beside it, though at these sizes a kernel's latency, not its bytes, sets the time.
--gated: o [M, 32 x 128] bf16 (the recurrence's output), z read from in_proj's fp32 partial sums
[1, M, 12352] at column 8192 (as the GDN layer hands them), the bf16 weight [128]; paths `xla`
(`gated_norm(..., backend="xla")`: XLA's normalisation fusion) and `kernel_h{n}` (n heads a
program; warps: the first of --warps). JSON: DIR/bench_residual_norm.json (gated_norm.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdn_jax import kernels  # noqa: E402
from gdn_jax.benchmark import copy_bandwidth  # noqa: E402
from gdn_jax.ops import projection  # noqa: E402
from gdn_jax.ops.residual_norm import add_rms_norm, gated_norm  # noqa: E402
from gdn_jax.profiling import kernel_trace  # noqa: E402

HIDDEN = 2048


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="directory for bench_residual_norm.json")
    p.add_argument("--rows", default="1,4,32,128", help="M values, comma-separated")
    p.add_argument("--warps", default="1,2,4,8,16", help="kernel num_warps values, comma-separated")
    p.add_argument("--gated", action="store_true", help="GDN's output norm instead (docstring)")
    p.add_argument("--heads", default="1,2,4,8,16",
                   help="--gated: the kernel's heads a program, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="profiled traces per case (median)")
    p.add_argument("--calls", type=int, default=20, help="calls per trace")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    return p.parse_args(argv)


def _per_call_us(fn, args, reps, calls):
    """Median over reps of the GPU kernel time of one call (wall time where no GPU traced)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with kernel_trace() as trace:
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        busy = trace.busy_ns()
        times.append(busy / calls / 1e3 if busy else (time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    copy = copy_bandwidth(1 << 30 if dev.platform == "gpu" else 1 << 24)
    rng = np.random.default_rng(0)
    rows = [int(m) for m in args.rows.split(",")]
    warps = [int(w) for w in args.warps.split(",")]
    w = jnp.asarray(rng.standard_normal(HIDDEN) * 0.1, jnp.float32)
    results = []
    print(f"{dev.device_kind}, jax {jax.__version__}, copy {copy:.0f} GB/s")
    print(f"{'M':>4} {'S':>3} {'path':>10} {'us':>8} {'floor us':>9}")
    for M in rows if args.gated else ():
        # in_proj's output as the GDN layer holds it: [1, M, 12352] fp32, z at 8192..12287
        o = jnp.asarray(rng.standard_normal((M, 4096)), jnp.bfloat16)
        z = jnp.asarray(rng.standard_normal((1, M, 12352)), jnp.float32)
        gw = jnp.asarray(1 + 0.1 * rng.standard_normal(128), jnp.bfloat16)
        nbytes = 2 * o.nbytes + 4 * M * 4096 + gw.nbytes
        floor_us = nbytes / copy / 1e3
        paths = {"xla": jax.jit(lambda o, z, w: gated_norm(
            o.reshape(M, 32, 128), z, w, 1e-6, z_col=8192, backend="xla"))}
        for n in (int(h) for h in args.heads.split(",")):
            cfg = kernels.GatedNormConfig(heads=n, num_warps=warps[0])
            paths[f"kernel_h{n}"] = jax.jit(
                lambda o, z, w, cfg=cfg: kernels.gated_rms_norm(
                    o, z, w, eps=1e-6, z_col=8192, config=cfg, interpret=args.interpret))
        for name, fn in paths.items():
            us = _per_call_us(fn, (o, z, gw), args.reps, args.calls)
            results.append(dict(M=M, S=1, path=name, us=us, bytes=nbytes, floor_us=floor_us))
            print(f"{M:4d} {1:3d} {name:>10} {us:8.2f} {floor_us:9.2f}", flush=True)
    for M in rows if not args.gated else ():
        S = projection.config_for(M, 2 * HIDDEN, HIDDEN).splits
        x = jnp.asarray(rng.standard_normal((M, HIDDEN)), jnp.bfloat16)
        delta = jnp.asarray(rng.standard_normal((S, M, HIDDEN)), jnp.float32)
        nbytes = delta.nbytes + x.nbytes + w.nbytes + 2 * x.nbytes
        floor_us = nbytes / copy / 1e3  # copy: GB/s = bytes per ns
        paths = {"xla": jax.jit(lambda x, d, w: add_rms_norm(x, d, w, 1e-6, backend="xla"))}
        for n in warps:
            cfg = kernels.NormConfig(num_warps=n)
            paths[f"kernel_w{n}"] = jax.jit(
                lambda x, d, w, cfg=cfg: kernels.add_rms_norm(x, d, w, eps=1e-6, config=cfg,
                                                              interpret=args.interpret))
        for name, fn in paths.items():
            us = _per_call_us(fn, (x, delta, w), args.reps, args.calls)
            results.append(dict(M=M, S=S, path=name, us=us, bytes=nbytes, floor_us=floor_us))
            print(f"{M:4d} {S:3d} {name:>10} {us:8.2f} {floor_us:9.2f}", flush=True)
    out = dict(bench="bench_residual_norm", device=dev.device_kind, jax=jax.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"),
               copy_bandwidth_GBps=copy, hidden=HIDDEN, reps=args.reps, calls=args.calls,
               timer="jax profiler (CUPTI) kernel time, median of reps" if dev.platform == "gpu"
               else "wall time (no GPU)", results=results)
    path = os.path.join(args.out, "gated_norm.json" if args.gated else "bench_residual_norm.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
