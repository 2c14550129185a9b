"""A projection of up to 128 rows whose work is cut evenly over the GPU's SMs (stream-K).

At 128 rows (a B = 32 verify) `project_group` gives each program a whole column block of 128:
the MLP's gate / up (10240 columns) is 80 programs on an H100's 132 SMs, which ncu found 47%
active and the weight read at 65% of copy (bench/results/ncu_projection128-h100-2026-12-06/).
Splitting K to fill the SMs made the partial sums cost more than the programs gained
(`ops.projection.config_for`). Here the grid is one program an SM, and the work -- units of
(column block, K step), the column blocks of all the weights one after another -- is cut into
`programs` equal contiguous ranges, so a column block may be summed by two or three programs:

    q, k, v = project_group_streamk(x, (w_q, w_k, w_v), config=StreamKConfig(programs=132))

Each program runs its range as segments, one a column block. A segment that covers its whole
block stores the result; one that does not stores its fp32 partial sum in a workspace (a
program has at most two such segments: its first, which may start inside a block, and its
last) and adds one to its block's counter; the program whose add completes the count (the
block's last segment to finish, whichever it is) adds the others' partials from the workspace
(L2) to its own and stores the result. No program waits for another, so the grid needs no
co-residency, and no launch sums partials afterwards: the partials cross L2 once, about one
[block_m, block_n] fp32 tile a program.

x: [M, K], weights [K, N_i] of x's dtype (bf16 | fp16), M <= 128; fp32 accumulation, the result
rounded to x's dtype once. Not dispatched by default (`gdn_jax.ops.projection.STREAMK_VAR`): on
an H100 (2026-12-07) it ran the 128-row groups 1.6-2.1x slower than `project_group`, with 211
registers against 109 (offline, `bench/ptxas_stats.py --kernel projection-streamk`); README.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _pallas
from ._common import (check_group, check_launch_fields, column_blocks, column_index, dot_rows,
                      pow2_block)
from .projection import smem_limit

_F32 = jnp.float32
STREAMK_MAX_M = 128


@dataclasses.dataclass(frozen=True)
class StreamKConfig:
    """Launch parameters of `project_group_streamk` (hashable: a static argument).

    block_n, block_k: the weight's tile [block_k, block_n] (powers of two >= 16); a narrower
               weight takes blocks of its largest power-of-two width <= block_n dividing it.
    programs:  the grid (one program an SM: 132 on an H100 / H200); fewer where the call has
               fewer units (column block, K step).
    num_warps, num_stages: Triton's; the stages pipeline a segment's loop over K.
    """

    block_n: int = 128
    block_k: int = 64
    programs: int = 132
    num_warps: int = 8
    num_stages: int = 4

    def __post_init__(self):
        check_launch_fields(self, tiles=("block_n", "block_k"),
                            counts=("programs", "num_warps", "num_stages"))


def plan(K: int, widths, config: StreamKConfig):
    """The work's layout: (blocks, steps, units, programs) with blocks[i] = (first, last,
    block_n, col): weight i's column blocks of block_n are blocks first..last - 1 and fill the
    output's columns from col on; steps = K // block_k units a block; units = blocks x steps,
    cut into `programs` ranges."""
    blocks = column_blocks(widths, [pow2_block(n, config.block_n) for n in widths])
    steps = K // config.block_k
    units = blocks[-1][1] * steps
    return blocks, steps, units, min(config.programs, units)


def misfit(M: int, K: int, widths, dtype, config: StreamKConfig) -> str | None:
    """Why `project_group_streamk` cannot take these sizes, or None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} is not bf16 or fp16"
    if not 1 <= M <= STREAMK_MAX_M:
        return f"M={M} rows is outside 1..{STREAMK_MAX_M}"
    if K % config.block_k:
        return f"block_k={config.block_k} does not divide K={K}"
    smem = config.num_stages * (dot_rows(M) + config.block_n) * config.block_k * 2
    if smem > smem_limit():
        return (f"{config.num_stages} stages of [{dot_rows(M)} + {config.block_n}, "
                f"{config.block_k}] tiles take {smem} B of shared memory, over {smem_limit()}")
    for n in widths:
        if pow2_block(n, config.block_n) is None:
            return f"N={n} has no power-of-two block of 16..{config.block_n} columns dividing it"
    return None


def _first_unit(p, units: int, programs: int):
    """The first unit of program p's range (p may be traced)."""
    return (p * units) // programs


def _program_of(u, units: int, programs: int):
    """The program whose range holds unit u: the largest p with _first_unit(p) <= u (every
    range holds a unit: programs <= units)."""
    return ((u + 1) * programs + units - 1) // units - 1


def _kernel(x_ref, *refs, rows: int, block_m: int, block_k: int, blocks, steps: int,
            units: int, programs: int, interpret: bool):
    # after the weights: the counters' zeros and their aliased output (the one counted on)
    w_refs, (count_ref, o_ref, part_ref) = refs[:len(blocks)], refs[len(blocks) + 1:]
    p = pl.program_id(0)
    tile_rows = lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    real = tile_rows < rows
    start, end = _first_unit(p, units, programs), _first_unit(p + 1, units, programs)

    def segment(w_ref, first: int, block_n: int, col: int, b, k0, k1):
        local = pl.ds((b - first) * block_n, block_n)

        def step(i, acc):
            x = plgpu.load(x_ref.at[tile_rows, column_index(i * block_k, block_k)], mask=real,
                           other=0)
            w = w_ref[pl.ds(i * block_k, block_k), local]
            return acc + lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                         preferred_element_type=_F32)

        acc = lax.fori_loop(k0, k1, step, jnp.zeros((block_m, block_n), _F32))
        out_cols = column_index(col + (b - first) * block_n, block_n)
        part_cols = column_index(0, block_n)

        def store(total):
            plgpu.store(o_ref.at[tile_rows, out_cols], total.astype(o_ref.dtype), mask=real)

        whole = (k0 == 0) & (k1 == steps)
        pl.when(whole)(lambda: store(acc))

        @pl.when(~whole)
        def _():
            # slot 0: a segment starting inside its block (a range's first); 1: the block's
            # first units (a range's last)
            plgpu.store(part_ref.at[p, jnp.where(k0 > 0, 0, 1), tile_rows, part_cols], acc)
            _pallas.cta_barrier(interpret)  # every thread's partial stored before the count
            u0 = b * steps
            q0, q1 = _program_of(u0, units, programs), _program_of(u0 + steps - 1, units,
                                                                   programs)
            done = plgpu.atomic_add(count_ref, (b,), jnp.int32(1))  # acq_rel, GPU scope

            @pl.when(done == q1 - q0)  # the block's last segment: the others' partials are in
            def _():
                def add(q, total):
                    slot = jnp.where(_first_unit(q, units, programs) > u0, 0, 1)
                    # volatile: from L2, past this SM's L1 (not coherent with the others')
                    other = plgpu.load(part_ref.at[q, slot, tile_rows, part_cols], volatile=True)
                    return total + jnp.where(q == p, 0.0, other)

                store(lax.fori_loop(q0, q1 + 1, add, acc))

    def body(cur):
        b = cur // steps
        k0 = cur - b * steps
        k1 = jnp.minimum(steps, k0 + end - cur)
        for w_ref, (first, last, block_n, col) in zip(w_refs, blocks):
            pl.when((b >= first) & (b < last))(
                functools.partial(segment, w_ref, first, block_n, col, b, k0, k1))
        return cur + (k1 - k0)

    lax.while_loop(lambda cur: cur < end, body, start)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name"))
def project_group_streamk(x: jax.Array, ws: tuple, *, config: StreamKConfig = StreamKConfig(),
                          interpret: bool = False, name: str = "gdn_projection_streamk"):
    """x: [M, K] bf16 | fp16, ws: weights [K, N_i] of x's dtype -> (x @ w_i [M, N_i] x.dtype for
    each), in one launch of `programs` programs (module docstring). name: the kernel's."""
    ws, M, K, widths = check_group("project_group_streamk", x, ws, misfit, config)
    blocks, steps, units, programs = plan(K, widths, config)
    bm = dot_rows(M)
    held = bm if interpret else M  # the interpreter slices refs as XLA does: pad x's rows
    if held != M:
        x = jnp.pad(x, ((0, held - M), (0, 0)))
    _, out, _ = _pallas.pallas_call(
        functools.partial(_kernel, rows=M, block_m=bm, block_k=config.block_k, blocks=blocks,
                          steps=steps, units=units, programs=programs, interpret=interpret),
        name=name, config=config, interpret=interpret, grid=(programs,),
        out_shape=(jax.ShapeDtypeStruct((blocks[-1][1],), jnp.int32),
                   jax.ShapeDtypeStruct((held, sum(widths)), x.dtype),
                   jax.ShapeDtypeStruct((programs, 2, bm, config.block_n), _F32)),
        input_output_aliases={1 + len(ws): 0},
    )(x, *ws, jnp.zeros((blocks[-1][1],), jnp.int32))
    out = out[:M]
    return tuple(out[:, lo:hi] for lo, hi in itertools.pairwise(
        itertools.accumulate([0, *widths])))
