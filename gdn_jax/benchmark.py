"""Time this package's GDN ops on this device (`gdn-jax bench`): decode and replay verify + commit;
and `time_chain`, the one per-call timer of every benchmark here and in bench/.

A timed program is a chain: one jitted program runs n calls in a `lax.fori_loop`, each call's
output fed in as the next call's input (no call can be merged or dropped), the state carried and
donated. `time_chain` times it two ways:
- "difference" (GPU): per call = (t(2n) - t(n)) / n, the median over reps (dispatch, sync and the
  program's fixed cost cancel); wall-clock per call inside a jitted loop, the glue around a kernel
  included. Where noise beats the difference (it reads <= 0) the whole-chain figure of 2n calls
  replaces it and the timing says so.
- "whole" (CPU): per call = t(n) / n, the median over reps, n doubled until one chain takes at
  least `min_seconds` (far above the timer's resolution and the fixed cost): it cannot read zero.
Beside it, on a GPU, the kernel time per call: the GPU's busy time in one traced run of the n-call
program (`gdn_jax.profiling`), over n: every kernel of a call, without the gaps between them.
Nsight Compute's per-kernel numbers: `bench/ncu_kernels.py`.

Bytes per call (what a perfect kernel moves): the state read once and written once, plus the
token inputs and the outputs; replay verify also reads the T pending candidates it folds and
writes its T new ones. On a GPU, GB/s = bytes / kernel time, and "% copy" is that over the copy
bandwidth measured the same way in the same run (a jitted `x + 1` over 1 GiB, read + write bytes,
by its kernel time). On CPU, GB/s = bytes / per-call time, and no "% copy": the op's state is a
few KiB to MiB that stay in the CPU's caches, so a copy through memory is no yardstick for it.
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


def _chained(op: str, T: int, static: bool):
    """run(state, args, slots, n) -> state after n calls of `op`, state donated; n static (one
    executable per n: on a GPU a runtime trip count can cost a host sync per iteration) or a
    runtime int32 (one executable for every n)."""

    def run(state, args, slots, n):
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

    return jax.jit(run, donate_argnums=0, static_argnums=(3,) if static else ())


def _bytes(op: str, B: int, T: int, shape: Shape, state_dtype) -> int:
    H, HV, K, V = shape.H, shape.HV, shape.K, shape.V
    state = B * HV * V * K * jnp.dtype(state_dtype).itemsize
    tokens = B * T * (2 * H * K + 2 * HV * V + 2 * HV) * 2  # bf16 q, k, v, a, b in and o out
    if op == "verify":  # fold T pending candidates (k, v, g, beta) and store T new ones
        tokens += 2 * B * T * (H * K * 2 + HV * V * 2 + 2 * HV * 4)
    return 2 * state + tokens


@dataclasses.dataclass(frozen=True)
class ChainTiming:
    """What `time_chain` measured (seconds)."""

    per_call_s: float  # the per-call figure (by `method`)
    method: str        # "difference" or "whole" (module docstring)
    whole_s: float     # median t(n) / n: the whole chain over n (its fixed cost spread over n)
    calls: int         # n
    first_s: float     # the first run of n calls: compile and warm-up
    t_n: tuple = ()
    t_2n: tuple = ()
    note: str = ""     # why the method is not the one asked for, if it is not


def time_chain(run, state, *, calls: int, reps: int, method: str = "difference",
               min_seconds: float = 0.0, max_calls: int = 1 << 22, setup=None):
    """Per-call time of a chained program (module docstring). Returns (ChainTiming, state).

    run(state, n) -> state: n chained calls (the state donated; any pytree, blocked on).
    setup(state) -> state: untimed, before every timed run (e.g. rewind a cache).
    method "difference": runs of n and 2n calls (a static n compiles two programs);
    "whole": runs of n calls, n doubled (up to max_calls) until a run takes >= min_seconds (run
    must then take any n: a runtime trip count).
    """
    if method not in ("difference", "whole"):
        raise ValueError(f"time_chain: method expected 'difference' or 'whole', got {method!r}")

    def timed(n):
        nonlocal state
        if setup is not None:
            state = jax.block_until_ready(setup(state))
        t = time.perf_counter()
        state = jax.block_until_ready(run(state, n))
        return time.perf_counter() - t

    first = timed(calls)
    if method == "whole":
        t = timed(calls)
        while t < min_seconds and calls < max_calls:
            calls = min(max_calls, 2 * calls)
            t = timed(calls)
        ts = tuple(timed(calls) for _ in range(reps))
        whole = statistics.median(ts) / calls
        return ChainTiming(whole, "whole", whole, calls, first, ts), state
    timed(2 * calls)
    t1, t2 = [], []
    for _ in range(reps):  # interleaved: a drift moves both alike
        t1.append(timed(calls))
        t2.append(timed(2 * calls))
    diff = statistics.median(b - a for a, b in zip(t1, t2)) / calls
    timing = ChainTiming(diff, "difference", statistics.median(t1) / calls, calls, first,
                         tuple(t1), tuple(t2))
    if diff <= 0:  # noise beat the difference: the whole chain of 2n calls (an upper bound)
        timing = dataclasses.replace(
            timing, per_call_s=statistics.median(t2) / (2 * calls), method="whole",
            note="t(2n) - t(n) <= 0 (noise): the whole chain of 2n calls / 2n")
    return timing, state


def time_op(op: str, B: int, shape: Shape, state_dtype, *, T: int = 4, calls: int = 20,
            reps: int = 5, min_seconds: float = 0.2) -> dict:
    """Per-call time of `op` ("decode" | "verify") at batch B (module docstring): on a GPU by
    difference with the kernel time beside it, elsewhere the whole chain of >= min_seconds."""
    T = 1 if op == "decode" else T
    on_gpu = jax.devices()[0].platform == "gpu"
    args, state, slots = _inputs(B, T, shape, state_dtype)
    chain = _chained(op, T, static=on_gpu)

    def run(state, n):
        return chain(state, args, slots, n if on_gpu else jnp.int32(n))

    timing, state = time_chain(run, state, calls=calls, reps=reps,
                               method="difference" if on_gpu else "whole",
                               min_seconds=0.0 if on_gpu else min_seconds)
    busy = None
    if on_gpu:
        with kernel_trace() as trace:
            state = jax.block_until_ready(run(state, timing.calls))
        busy = trace.busy_ns()
    nbytes = _bytes(op, B, T, shape, state_dtype)
    kernel_s = None if not busy else busy / timing.calls / 1e9
    return {"op": op, "B": B, "T": T, "state_dtype": jnp.dtype(state_dtype).name,
            "per_call_us": timing.per_call_s * 1e6, "method": timing.method,
            "note": timing.note, "calls": timing.calls, "naive_us": timing.whole_s * 1e6,
            "kernel_us": None if kernel_s is None else kernel_s * 1e6, "bytes": nbytes,
            "GBps": nbytes / (kernel_s or timing.per_call_s) / 1e9,
            "GBps_by": "per call" if kernel_s is None else "kernel time"}


def _us(x: float) -> str:
    """A time in us, 3 significant digits below 100 (never rounded to 0)."""
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def run(batches, shape: Shape, state_dtype, *, T: int = 4, calls: int = 20, reps: int = 5,
        copy_bytes: int = 1 << 28, min_seconds: float = 0.2, report=print) -> dict:
    """Time decode and verify at every B; `report(line)` gets the table as it fills, then a
    legend of its columns (`legend`)."""
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    copy = copy_bandwidth(copy_bytes) if on_gpu else None
    head = (f"device {device.device_kind} ({device.platform}); shape H={shape.H} HV={shape.HV} "
            f"K={shape.K} V={shape.V}; state {jnp.dtype(state_dtype).name}")
    report(head + (f"; copy {copy:.0f} GB/s by kernel time" if on_gpu else ""))
    if on_gpu:
        report(f"{'op':>8} {'B':>5} {'T':>3} {'per call':>12} {'naive':>12} {'kernels':>12} "
               f"{'GB/s':>8} {'% copy':>7}")
    else:
        report(f"{'op':>8} {'B':>5} {'T':>3} {'per call':>12} {'GB/s':>8}")
    rows, notes = [], []
    for B in batches:
        for op in ("decode", "verify"):
            r = time_op(op, B, shape, state_dtype, T=T, calls=calls, reps=reps,
                        min_seconds=min_seconds)
            by_kernels = copy is not None and r["GBps_by"] == "kernel time"
            r["pct_copy"] = 100 * r["GBps"] / copy if by_kernels else None
            rows.append(r)
            per = _us(r["per_call_us"]) + " us" + ("*" if r["note"] else "")
            if r["note"]:
                notes.append(f"* {op} B={B}: {r['note']}")
            if on_gpu:
                kernels = "-" if r["kernel_us"] is None else _us(r["kernel_us"]) + " us"
                pct = "-" if r["pct_copy"] is None else f"{r['pct_copy']:.1f}%"
                report(f"{op:>8} {B:>5} {r['T']:>3} {per:>12} {_us(r['naive_us']) + ' us':>12} "
                       f"{kernels:>12} {r['GBps']:>8.1f} {pct:>7}")
            else:
                report(f"{op:>8} {B:>5} {r['T']:>3} {per:>12} {r['GBps']:>8.2f}")
    for line in notes + legend(on_gpu, calls=calls, reps=reps, min_seconds=min_seconds):
        report(line)
    return {"device": f"{device.device_kind} ({device.platform})", "copy_GBps": copy,
            "shape": dataclasses.asdict(shape), "results": rows}


def legend(on_gpu: bool, *, calls: int, reps: int, min_seconds: float) -> list[str]:
    """The lines under `run`'s table that say what each column is (and what is not shown)."""
    lines = ["legend:",
             "  op       decode: one token per row; verify: replay verify of T tokens, then "
             "commit all T",
             "  B, T     rows per call (one state slot each), tokens per row"]
    if on_gpu:
        return lines + [
            f"  per call (t(2n) - t(n)) / n, n = {calls} chained calls in one jitted loop (state "
            f"donated), median of {reps}: wall time per call, dispatch and sync cancelled",
            "  naive    t(n) / n: the whole chain over n, the program's fixed cost included",
            "  kernels  GPU busy time of one n-call run / n (JAX profiler), gaps excluded",
            "  GB/s     bytes a perfect kernel moves per call (state read + written once, inputs, "
            "outputs) / kernel time (/ per call where no kernel was traced)",
            "  % copy   that GB/s over the copy bandwidth, both by kernel time (jitted x + 1 over "
            "a large buffer); '-' where no kernel was traced"]
    return lines + [
        f"  per call a chain of n calls in one jitted loop (each call's output feeds the next, "
        f"state donated) timed whole with block_until_ready, / n; n doubled from {calls} until "
        f"a chain takes >= {min_seconds:g} s; median of {reps}",
        "  GB/s     bytes a perfect kernel moves per call (state read + written once, inputs, "
        "outputs) / per call",
        "  not shown on CPU: kernel time (no GPU trace) and % of copy bandwidth (the state sits "
        "in the CPU caches: a copy through memory is no yardstick for it)"]
