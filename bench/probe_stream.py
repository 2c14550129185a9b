"""How fast can a CTA grid stream a weight through TMA, and what does a 128-row x tile beside each
weight tile cost? A probe for the 128-row projections (a B = 32 verify), not a library path.

At 128 rows every projection kernel measured here reads its weight at 33-52% of copy, Triton,
Mosaic GPU and XLA's GEMMs alike (bench/results/bench_projection-h200-rows128_wide-2026-12-02.json;
ncu on an H100, 2026-12-06: the Mosaic kernel's one warpgroup waits at its TMA barrier half its
cycles, DRAM at 64% of peak, L2 at 67%). Each unit of those kernels loads a [bk, bn] weight tile
from HBM and the [128, bk] x tile of the same K step, which at bn = 128 is as many bytes again
(from L2). This probe streams the same tiles with no math:

    w      the weight tiles alone, stream-K over the grid (`kernels.project_group_mgpu`'s order:
           column block after column block, K steps in order), `stages` in flight per CTA
    w+x    the same plus each unit's [128, bk] x tile (the kernel's loads, without its wgmma)
    w+x+mma  the same plus the kernel's product and wait per unit (`plgpu.wgmma`, wait(1)),
           no epilogue: `kernel` less this is what the kernel's column-block sums cost
    w+x+mma+add    the same plus the kernel's epilogue: at a column block's last K step and at
           the CTA's last unit, the accumulator out through a [64, bn] fp32 buffer by TMA
           reduce-adds (64 rows at a time), zeroed for the next block
    w+x+mma+store  the same with plain TMA stores (wrong sums: what the reduction costs)
    w+x+mma+tma    the reduce-adds alone (the buffer as it is, the accumulator untouched)
    w+x+mma+acc    the accumulator into the buffer and zeroed alone (no TMA)
    w+x+mma+nested +add's work with the epilogue out of the unit loop: a loop over the CTA's
           column blocks around a loop over the block's K steps in its range, the sum's store
           after the inner loop (not under a condition inside the loop of wgmmas)
    w+x+mma+scoped1  +nested with an accumulator of the block's own (`pl.run_scoped`, zeroed
           as it is allocated; none carried from block to block)
    w+x+mma+scoped0  the same with each product waited for at once (wgmma wait(0), as JAX's
           Hopper matmul does), so its stage reloads at once: `stages` loads ahead, not one less
    (ptxas, 2026-12-06, H100: C7515 "wgmma.mma_async instructions are serialized due to non
    wgmma instructions defining accumulator registers" in +add, +nested and the kernel, not in
    w+x+mma: MOSAIC_GPU_DUMP_PTXAS=1 prints it)
    kernel `kernels.project_group_mgpu` itself on the same weight (bn, stages as the case's)
    kernel-out128  the same with a column block's sum leaving in one [128, bn] store (its
           `_OUT_ROWS` patched) instead of two 64-row stores through one buffer

at CTAs per SM (1 or 2), tile shapes and stage counts. Kernel time from JAX's profiler, each
call reading `copies` distinct weights (more bytes than L2 holds): `us` the launch itself,
`call_us` with the call's other kernels (the kernel's zeroed output, slices); GB/s of weight read
in `us`.

    python bench/probe_stream.py --out DIR
    python bench/probe_stream.py --out DIR --smoke --interpret    # the script on CPU
JSON: DIR/probe_stream.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from gdn_jax import kernels  # noqa: E402
from gdn_jax.benchmark import copy_bandwidth  # noqa: E402
from gdn_jax.kernels import _mgpu as mg  # noqa: E402
from gdn_jax.kernels import projection_mgpu  # noqa: E402
from gdn_jax.ops.dispatch import sm_count  # noqa: E402
from gdn_jax.profiling import kernel_seconds  # noqa: E402

_BF16 = jnp.bfloat16
MODES = ("w", "w+x", "w+x+mma", "w+x+mma+add", "w+x+mma+store", "w+x+mma+tma", "w+x+mma+acc",
         "w+x+mma+nested", "w+x+mma+scoped1", "w+x+mma+scoped0", "kernel", "kernel-out128")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="2048x10240", help="KxN of the weight (gate / up: 10240)")
    p.add_argument("--rows", type=int, default=128, help="x's rows (w+x, kernel)")
    p.add_argument("--tiles", default="64x128,64x256,128x128", help="bk x bn weight tiles")
    p.add_argument("--stages", default="2,4,6")
    p.add_argument("--per-sm", default="1,2", help="CTAs per SM (where SMEM takes them); a "
                   "fraction < 1 leaves SMs idle (0.61: the Triton kernel's 80 CTAs of 132)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--copies", type=int, default=0, help="distinct weights per call "
                   "(0: enough for 4x a 50 MB L2)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    return p.parse_args(argv)


def _smem_bytes(bk: int, bn: int, stages: int, rows: int, with_x: bool) -> int:
    tiles = [stages * bk * bn * 2] + ([stages * rows * bk * 2] if with_x else [])
    return mg.aligned_bytes(tiles + [8 * stages, mg.REDUCTION_SCRATCH_BYTES])


def _body(refs, *, K, N, bk, bn, stages, ctas, with_x, mma, epi, interpret):
    # sink [bk, bn]: CTA 0's last tile, so the launch is kept; out [rows, N] fp32 (epi)
    w_ref, x_ref, sink_ref, out_ref = refs
    plgpu = mg.plgpu
    KS = K // bk
    units = N // bn * KS
    per = -(-units // ctas)
    c = lax.axis_index("cta")
    lo, hi = c * units // ctas, (c + 1) * units // ctas
    rows = x_ref.shape[0]

    def epilogue(j, acc, out_smem, zero=True):
        # epi: "add" the kernel's; "store" plain stores; "tma" the reduce-adds alone (out_smem as
        # it is, the accumulator untouched); "acc" the accumulator into out_smem and zeroed, no
        # TMA
        if interpret:
            out_ref[:, pl.ds(j * bn, bn)] = acc[...]
            if zero:
                acc[...] = jnp.zeros(acc.shape, jnp.float32)
            return
        y = acc[...] if epi != "tma" else None  # "nested": as "add"
        for r in range(0, rows, 64):
            n = min(64, rows - r)
            if epi != "acc":
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if y is not None:
                out_smem[...] = y[r:r + 64] if rows > 64 else y
                plgpu.commit_smem()
            if epi != "acc":
                plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, n)],
                                        out_ref.at[pl.ds(r, n), pl.ds(j * bn, bn)],
                                        **({} if epi == "store" else {"reduction_op": "add"}))
        if y is not None and zero:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def body(w_smem, x_smem, bars, acc, out_smem):
        def issue(i):
            u = lo + i
            j, kk, s = u // KS, u % KS, i % stages

            @pl.when(u < hi)
            def _():
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                                        w_smem.at[s], bars.at[s])
                if with_x:
                    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(kk * bk, bk)], x_smem.at[s],
                                            bars.at[s])

        wait_all = epi == "scoped0"  # each product waited for at once: its stage is free
        ahead = stages - (1 if mma and not wait_all else 0)  # loads issued ahead of the unit
        for i in range(min(ahead, per)):
            issue(i)

        if mma:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

        def unit(i, guard=True, acc=acc):  # unit lo + i's tiles waited for, its product; a
            # free stage reloaded (guard: the unit may be past the CTA's range)
            @(pl.when(lo + i < hi) if guard else (lambda f: f()))
            def _():
                plgpu.barrier_wait(bars.at[i % stages])
                if mma:  # the kernel's product and wait
                    if interpret:
                        acc[...] += jnp.dot(x_smem[i % stages].astype(jnp.float32),
                                            w_smem[i % stages].astype(jnp.float32))
                    else:
                        plgpu.wgmma(acc, x_smem.at[i % stages], w_smem.at[i % stages])
                        plgpu.wgmma_wait(0 if wait_all else 1)
            if per > ahead:  # mma: as the kernel, the previous unit's stage; else this one
                issue(i + ahead)

        if epi == "nested":
            @pl.loop(lo // KS, (hi - 1) // KS + 1)
            def _(j):
                @pl.loop(jnp.maximum(lo, j * KS) - lo, jnp.minimum(hi, (j + 1) * KS) - lo)
                def _(i):
                    unit(i, guard=False)

                epilogue(j, acc, out_smem)
        elif epi in ("scoped0", "scoped1"):
            @pl.loop(lo // KS, (hi - 1) // KS + 1)
            def _(j):
                def block(block_acc):
                    if interpret:
                        block_acc[...] = jnp.zeros(block_acc.shape, jnp.float32)

                    @pl.loop(jnp.maximum(lo, j * KS) - lo, jnp.minimum(hi, (j + 1) * KS) - lo)
                    def _(i):
                        unit(i, guard=False, acc=block_acc)

                    epilogue(j, block_acc, out_smem, zero=False)

                pl.run_scoped(block, plgpu.SMEM((rows, bn), jnp.float32) if interpret
                              else plgpu.ACC((rows, bn), jnp.float32))
        else:
            @pl.loop(0, per)
            def _(i):
                unit(i)
                if epi:
                    u = lo + i

                    @pl.when((u < hi) & ((u % KS == KS - 1) | (u + 1 == hi)))
                    def _():
                        epilogue(u // KS, acc, out_smem)

        if mma and not interpret:
            plgpu.wgmma_wait(0)
            if epi:
                plgpu.wait_smem_to_gmem(0)

        @pl.when(c == 0)
        def _():
            if mma:  # the products' first rows out through the stage, so they are kept too
                y = acc[...].astype(_BF16)
                if rows >= bk:
                    w_smem[0] = y[:bk]
                else:
                    w_smem[0, :rows] = y
                plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(w_smem.at[0], sink_ref)
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        mg.smem_tile((stages, bk, bn), _BF16, interpret=interpret),
        mg.smem_tile((stages, rows, bk) if with_x else (1, 8, 64), _BF16, interpret=interpret),
        plgpu.Barrier(num_arrivals=2 if with_x else 1, num_barriers=stages),
        (plgpu.SMEM((rows, bn), jnp.float32) if interpret else plgpu.ACC((rows, bn), jnp.float32))
        if mma else plgpu.SMEM((8,), jnp.float32),
        mg.smem_tile((64, bn), jnp.float32, interpret=interpret) if epi
        else plgpu.SMEM((8,), jnp.float32),
    )


@functools.partial(jax.jit, static_argnames=("bk", "bn", "stages", "ctas", "with_x", "mma",
                                             "epi", "interpret"))
def stream(ws, x, *, bk, bn, stages, ctas, with_x, interpret, mma=False, epi=None):
    """Each weight of ws ([K, N] bf16) streamed once (module docstring) -> [len(ws)] fp32 sinks."""
    out = []
    for w in ws:
        K, N = w.shape
        units = N // bn * (K // bk)
        grid = (min(ctas, units),)
        body = functools.partial(_body, K=K, N=N, bk=bk, bn=bn, stages=stages, ctas=grid[0],
                                 with_x=with_x, mma=mma, epi=epi, interpret=interpret)

        def stateful(refs, body=body, grid=grid):
            mg.core_map(lambda: body(refs), grid=grid,
                        name=f"probe_stream_{bk}x{bn}_s{stages}{'_x' if with_x else ''}"
                        f"{'_mma' if mma else ''}{'_' + epi if epi else ''}",
                        interpret=interpret)

        y = jnp.zeros((x.shape[0], N) if epi else (1,), jnp.float32)
        *_, sink, y = pl.run_state(stateful)((w, x, jnp.zeros((bk, bn), _BF16), y))
        out.append(sink[0, 0].astype(jnp.float32) + y[0, 0] if epi else sink[0, 0].astype(
            jnp.float32))
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _kernel_chain(ws, x, *, config, interpret):
    return jnp.stack([kernels.project_group_mgpu(x, (w,), config=config, interpret=interpret)[0]
                      [0, 0] for w in ws])


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        args.shape, args.rows, args.tiles, args.stages, args.reps = "128x256", 16, "64x128", \
            "2", 1
    K, N = (int(v) for v in args.shape.split("x"))
    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    sms = sm_count() if gpu else 4
    copy = copy_bandwidth(1 << 30 if gpu else 1 << 24)
    weight_bytes = K * N * 2
    copies = args.copies or (1 if args.smoke else max(2, -(-200_000_000 // weight_bytes)))
    rng = np.random.default_rng(0)
    ws = tuple(jnp.asarray(rng.standard_normal((K, N)) * 0.02, _BF16) for _ in range(copies))
    x = jnp.asarray(rng.standard_normal((args.rows, K)), _BF16)
    result = {"bench": "probe_stream", "device": dev.device_kind, "jax": jax.__version__,
              "python": platform.python_version(), "argv": sys.argv[1:], "copy_gbps": copy,
              "K": K, "N": N, "rows": args.rows, "copies": copies, "sms": sms,
              "timer": "jax profiler (CUPTI), kernel time per weight, median of reps",
              "cases": []}
    print(f"{dev.device_kind}, copy {copy:.0f} GB/s, w [{K}, {N}] bf16 x {copies}, "
          f"x [{args.rows}, {K}]")
    print(f"{'mode':7} {'bk x bn':>8} {'stages':>6} {'ctas':>5} {'us':>8} {'call us':>8} "
          f"{'GB/s':>7} {'% copy':>6}")
    modes = args.modes.split(",")
    out_rows = projection_mgpu._OUT_ROWS
    for tile, stages, per_sm, mode in itertools.product(
            args.tiles.split(","), [int(s) for s in args.stages.split(",")],
            [float(s) for s in args.per_sm.split(",")], modes):
        bk, bn = (int(v) for v in tile.split("x"))
        ctas = max(1, round(per_sm * sms))
        case = {"mode": mode, "bk": bk, "bn": bn, "stages": stages, "ctas": ctas}
        if mode.startswith("kernel"):
            if per_sm > 1 or bk != 64:  # the kernel: at most one CTA an SM, K steps of 64
                continue
            jax.clear_caches()  # the module constant below is read at trace time
            projection_mgpu._OUT_ROWS = 128 if mode == "kernel-out128" else out_rows
            config = kernels.MosaicProjectionConfig(block_n=bn, stages=stages, ctas=ctas)
            why = kernels.projection_mgpu_misfit(args.rows, K, (N,), _BF16, config)
            fn = functools.partial(_kernel_chain, config=config, interpret=args.interpret)
        else:
            with_x, mma = mode != "w", mode.startswith("w+x+mma")
            epi = mode.split("+")[3] if mode.count("+") == 3 else None
            need = _smem_bytes(bk, bn, stages, args.rows, with_x) + (64 * bn * 4 if epi else 0)
            why = (f"{need} bytes of SMEM for {per_sm:g} CTAs an SM" if need * -(-ctas // sms) >
                   mg.SMEM_BYTES else None)
            if mma and (args.rows * bn > 128 * 128 or bk != 64):
                why = f"a [{args.rows}, {bn}] accumulator, K steps of {bk}: not the kernel's"
            fn = functools.partial(stream, bk=bk, bn=bn, stages=stages, ctas=ctas,
                                   with_x=with_x, mma=mma, epi=epi, interpret=args.interpret)
        if why:
            case["skipped"] = why
            result["cases"].append(case)
            continue
        f = jax.jit(fn)
        name = "gdn_projection_mgpu" if mode.startswith("kernel") else "probe_stream"
        calls, own = [], []
        for _ in range(args.reps):
            t, shares = kernel_seconds(f, (ws, x), reps=1, names=(name,))
            calls.append(t)
            own.append(shares.get(name))
        if None in calls:  # no GPU traced (the interpreter)
            case["us"] = None
        else:  # the launch alone (the kernel's output memset and slices apart), per weight
            us = float(np.median(own)) / copies * 1e6
            case.update(us=us, call_us=float(np.median(calls)) / copies * 1e6,
                        gbps=weight_bytes / us / 1e3,
                        pct_copy=100 * weight_bytes / us / 1e3 / copy)
            print(f"{mode:7} {bk:>3} x {bn:<3} {stages:>6} {case['ctas']:>5} {us:8.2f} "
                  f"{case['call_us']:8.2f} {case['gbps']:7.0f} {case['pct_copy']:6.1f}")
        result["cases"].append(case)
    with open(os.path.join(args.out, "probe_stream.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
