"""Time this package's GDN ops on this device (`gdn-jax bench`): decode and replay verify + commit.

Per-call time: one jitted program runs a `lax.fori_loop` of n calls, each call's output fed in as
the next call's v (no call can be merged or dropped), the state carried and donated. The trip
count is static (two executables, n and 2n calls) and per call = (t(2n) - t(n)) / n, the median
over reps: dispatch, sync and the fixed cost of a program cancel. That is wall-clock per call
inside a jitted loop, the glue around a kernel included. Beside it, on a GPU, the kernel time per
call: the GPU's busy time in one traced run of the n-call program (`gdn_jax.profiling`, JAX's
profiler), over n: every kernel of a call (the op's Pallas kernel and XLA's bookkeeping), without
the gaps between them. Nsight Compute's per-kernel numbers: `bench/ncu_kernels.py`.

Bytes per call (what a perfect kernel moves): the state read once and written once, plus the
token inputs and the outputs; replay verify also reads the T pending candidates it folds and
writes its T new ones. GB/s = bytes / per-call time; "% copy" is that over the device's copy
bandwidth measured in the same run (a jitted `x + 1` over a large buffer, read + write bytes, by
its kernel time on a GPU).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gdn_jax import ops
from gdn_jax.profiling import kernel_trace


@dataclasses.dataclass(frozen=True)
class Shape:
    """Head counts and dims of one GDN layer (Qwen3-Next: H 16, HV 32, K = V = 128)."""

    H: int = 16
    HV: int = 32
    K: int = 128
    V: int = 128


QWEN3_NEXT = Shape()
SMALL = Shape(H=2, HV=4, K=32, V=32)  # CPU: the XLA path at a size that times in seconds


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """GB/s of a jitted `x + 1` over nbytes of fp32 (read + write bytes): from its kernel time on
    a GPU (a wall-clock time per call would count dispatch too), else the median wall time."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    jax.block_until_ready(f(x))
    with kernel_trace() as trace:
        for _ in range(reps):
            jax.block_until_ready(f(x))
    busy = trace.busy_ns()
    if busy:
        return 2 * x.nbytes / (busy / reps)  # bytes per ns = GB/s
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times) / 1e9


def _inputs(B: int, T: int, shape: Shape, state_dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    bf = jnp.bfloat16

    def normal(*s, scale=1.0):
        return jnp.asarray(rng.standard_normal(s) * scale, jnp.float32).astype(bf)

    H, HV, K, V = shape.H, shape.HV, shape.K, shape.V
    args = dict(q=normal(B, T, H, K), k=normal(B, T, H, K), v=normal(B, T, HV, V),
                a=normal(B, T, HV), b=normal(B, T, HV),
                A_log=jnp.log(jnp.linspace(1.0, 16.0, HV)).astype(jnp.float32),
                dt_bias=jnp.zeros((HV,), jnp.float32))
    state = ops.GDNState.create(B, H, HV, K, V, max(T, 1), dtype=state_dtype, input_dtype=bf)
    slots = jnp.asarray(rng.permutation(B), jnp.int32)
    return args, state, slots


def _chained(op: str, n: int, T: int):
    """jit(state, args, slots) -> state after n calls of `op` (static n), state donated."""

    def run(state, args, slots):
        def body(_, carry):
            state, v = carry
            a = dict(args, v=v)
            if op == "decode":
                o, state = ops.decode(**a, state=state, slots=slots)
            else:  # replay verify of T tokens, then keep all T: the next call folds them
                o, state, _ = ops.verify(**a, state=state, slots=slots, mode="replay")
                state = ops.commit(state, slots, jnp.full(slots.shape, T, jnp.int32))
            return state, o.astype(v.dtype)

        return lax.fori_loop(0, n, body, (state, args["v"]))[0]

    return jax.jit(run, donate_argnums=0)


def _bytes(op: str, B: int, T: int, shape: Shape, state_dtype) -> int:
    H, HV, K, V = shape.H, shape.HV, shape.K, shape.V
    state = B * HV * V * K * jnp.dtype(state_dtype).itemsize
    tokens = B * T * (2 * H * K + 2 * HV * V + 2 * HV) * 2  # bf16 q, k, v, a, b in and o out
    if op == "verify":  # fold T pending candidates (k, v, g, beta) and store T new ones
        tokens += 2 * B * T * (H * K * 2 + HV * V * 2 + 2 * HV * 4)
    return 2 * state + tokens


def time_op(op: str, B: int, shape: Shape, state_dtype, *, T: int = 4, calls: int = 20,
            reps: int = 5) -> dict:
    """Per-call time of `op` ("decode" | "verify") at batch B (module docstring)."""
    T = 1 if op == "decode" else T
    args, state, slots = _inputs(B, T, shape, state_dtype)
    runs = {c: _chained(op, c, T) for c in (calls, 2 * calls)}

    def timed(c):
        nonlocal state
        t = time.perf_counter()
        state = jax.block_until_ready(runs[c](state, args, slots))
        return time.perf_counter() - t

    for c in runs:  # compile and warm up
        timed(c)
    per, naive = [], []
    for _ in range(reps):
        t1, t2 = timed(calls), timed(2 * calls)
        per.append((t2 - t1) / calls)
        naive.append(t1 / calls)
    t = max(statistics.median(per), 1e-9)
    with kernel_trace() as trace:
        timed(calls)
    busy = trace.busy_ns()
    nbytes = _bytes(op, B, T, shape, state_dtype)
    return {"op": op, "B": B, "T": T, "state_dtype": jnp.dtype(state_dtype).name,
            "per_call_us": t * 1e6, "naive_us": statistics.median(naive) * 1e6,
            "kernel_us": None if busy is None else busy / calls / 1e3,
            "bytes": nbytes, "GBps": nbytes / t / 1e9}


def run(batches, shape: Shape, state_dtype, *, T: int = 4, calls: int = 20, reps: int = 5,
        copy_bytes: int = 1 << 28, report=print) -> dict:
    """Time decode and verify at every B; `report(line)` gets the table as it fills."""
    device = jax.devices()[0]
    copy = copy_bandwidth(copy_bytes)
    report(f"device {device.device_kind} ({device.platform}); shape H={shape.H} HV={shape.HV} "
           f"K={shape.K} V={shape.V}; state {jnp.dtype(state_dtype).name}; copy {copy:.0f} GB/s")
    report(f"{'op':>8} {'B':>5} {'T':>3} {'per call':>12} {'kernels':>12} {'naive':>12} "
           f"{'GB/s':>8} {'% copy':>7}")
    rows = []
    for B in batches:
        for op in ("decode", "verify"):
            r = time_op(op, B, shape, state_dtype, T=T, calls=calls, reps=reps)
            r["pct_copy"] = 100 * r["GBps"] / copy
            rows.append(r)
            kernels = "-" if r["kernel_us"] is None else f"{r['kernel_us']:.1f} us"
            report(f"{op:>8} {B:>5} {r['T']:>3} {r['per_call_us']:>9.1f} us {kernels:>12} "
                   f"{r['naive_us']:>9.1f} us {r['GBps']:>8.1f} {r['pct_copy']:>6.1f}%")
    return {"device": f"{device.device_kind} ({device.platform})", "copy_GBps": copy,
            "shape": dataclasses.asdict(shape), "results": rows}
