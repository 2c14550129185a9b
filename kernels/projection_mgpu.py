"""A projection of 8 to 128 rows, `x @ w`, as a Pallas **Mosaic GPU** kernel for Hopper: TMA loads,
wgmma, and the work split evenly over a fixed number of CTAs (stream-K), partial sums reduced into
the fp32 result by TMA's reduce-add.

`projection.py` (Triton) cuts K into a fixed number of slices per column block: with 80 column
blocks of 128 (an MLP's gate / up at 10240 columns) and 132 SMs, a wave and a fifth. At 128 rows
it reads the weight at 40-65% of copy on the H200
(bench/results/bench_projection-h200-rows128_wide-2026-12-02.json). Here the work is the list of
units (column block j, K step kk), column block after column block, K steps in order, and CTA c
takes the units [c U / G, (c + 1) U / G) of U: every CTA streams the same number of weight tiles
whatever the shape. A CTA accumulates the units of one column block in a [block_m, block_n] fp32
wgmma accumulator and, at the block's last K step or its own last unit, adds the sum into the
output by one TMA reduce-add (fp32, in L2): a column block shared by two CTAs is summed there. So
the output starts as zeros and is fp32; the caller casts it (XLA fuses the cast into consumers).

    ys = project_group_mgpu(x, (w_gate, w_up), config=MosaicProjectionConfig())

x: [M, K] bf16 (M a multiple of 8, 8..128), ws: [K, N_i] bf16, N_i multiples of block_n, K a
multiple of block_k -> (x @ w_i [M, N_i] fp32 for each). The rows past M in the [block_m, block_k]
x tiles hold whatever SMEM held: a row of the product depends only on its own row of x, and rows
past M are never stored. bf16 x bf16 products are exact in the fp32 accumulator; the sum's
order (per CTA, then the reduce-adds) is not fixed, so results may differ in the last fp32 bits
from run to run.

Under the interpreter (CPU tests) the accumulator is an fp32 SMEM buffer, the product a plain dot,
and the reduce-add a read-modify-write of the output (the interpreter runs CTAs one at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mgpu as mg
from ._common import check_group

_F32, _BF16 = jnp.float32, jnp.bfloat16
ROW_MULTIPLE = 8   # x's rows: whole (8, 64) SMEM tiles of the swizzled x buffer
MAX_M = 128        # two wgmma M tiles of 64 in one warpgroup's accumulator
_OUT_ROWS = 64     # the rows of the fp32 tile a column block's sum leaves through


@dataclasses.dataclass(frozen=True)
class MosaicProjectionConfig:
    """Launch parameters of `project_group_mgpu` (hashable: a static argument).

    block_n: columns of a weight tile and of the accumulator (64, 128 or 256; divides each N_i).
    block_k: rows of a weight tile, the K step (64: one 128-byte swizzle row of bf16).
    stages:  SMEM buffers of (x tile, weight tile) in the load ring (>= 2).
    ctas:    the grid: CTAs sharing the units (the GPU's SM count: one CTA per SM).
    """

    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    ctas: int = 132

    def __post_init__(self):
        if self.block_n not in (64, 128, 256):
            raise ValueError(f"MosaicProjectionConfig: block_n must be 64, 128 or 256, "
                             f"got {self.block_n=}")
        if self.block_k != 64:
            raise ValueError(f"MosaicProjectionConfig: block_k must be 64, got {self.block_k=}")
        for field in ("stages", "ctas"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < (2 if field == "stages" else 1):
                raise ValueError(f"MosaicProjectionConfig: {field} must be an int >= "
                                 f"{2 if field == 'stages' else 1}, got {field}={value}")

    def smem_bytes(self, M: int) -> int:
        """One CTA's SMEM: the stages' x and weight tiles (bf16), the fp32 output tile, the
        barriers, each buffer 1 KiB aligned."""
        bm = block_m(M)
        buffers = [self.stages * bm * self.block_k * 2, self.stages * self.block_k *
                   self.block_n * 2, _OUT_ROWS * self.block_n * 4, 8 * self.stages,
                   mg.REDUCTION_SCRATCH_BYTES]
        return mg.aligned_bytes(buffers)


def block_m(M: int) -> int:
    """The accumulator's rows for M rows of x: 64 or 128 (wgmma's M tiles)."""
    return 64 if M <= 64 else 128


def misfit(M: int, K: int, widths, dtype, config: MosaicProjectionConfig) -> str | None:
    """Why `project_group_mgpu` cannot take M rows of x against [K, N_i] weights (widths: the
    N_i) of this dtype, or None."""
    why = mg.unavailable()
    if why:
        return why
    if jnp.dtype(dtype) != jnp.dtype(_BF16):
        return f"dtype {jnp.dtype(dtype)} is not bfloat16"
    if not (ROW_MULTIPLE <= M <= MAX_M and M % ROW_MULTIPLE == 0):
        return f"M={M} rows is not a multiple of {ROW_MULTIPLE} in {ROW_MULTIPLE}..{MAX_M}"
    if K % config.block_k:
        return f"block_k={config.block_k} does not divide K={K}"
    for n in widths:
        if n % config.block_n:
            return f"block_n={config.block_n} does not divide N={n}"
    if block_m(M) * config.block_n > 128 * 128:
        return (f"a [{block_m(M)}, {config.block_n}] fp32 accumulator is over the 128 x 128 "
                f"one warpgroup holds")
    if config.smem_bytes(M) > mg.SMEM_BYTES:
        return (f"{config} needs {config.smem_bytes(M)} bytes of SMEM for M={M}, over "
                f"{mg.SMEM_BYTES}")
    return None


def _body(refs, *, M: int, K: int, firsts: tuple, config: MosaicProjectionConfig,
          interpret: bool):
    x_ref, *w_refs, out_ref = refs  # out_ref [M, sum N_i] fp32, zeros in
    plgpu = mg.plgpu
    BN, BK, ST, G = config.block_n, config.block_k, config.stages, config.ctas
    BM = block_m(M)
    KS = K // BK
    units = firsts[-1] * KS
    per = -(-units // G)  # the most units one CTA takes
    c = lax.axis_index("cta")
    lo, hi = c * units // G, (c + 1) * units // G
    rows = pl.ds(0, M)

    def body(x_smem, w_smem, out_smem, bars):
        def issue(i):  # unit lo + i's loads into stage i % ST
            u = lo + i
            j, kk, s = u // KS, u % KS, i % ST
            ks = pl.ds(kk * BK, BK)

            @pl.when(u < hi)
            def _():
                plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[s, rows], bars.at[s])
                for w_ref, first, last in zip(w_refs, firsts, firsts[1:]):
                    @pl.when((j >= first) & (j < last))
                    def _():
                        plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds((j - first) * BN, BN)],
                                                w_smem.at[s], bars.at[s])

        for i in range(min(ST, per)):
            issue(i)

        def block(j, acc):  # column block j's K steps in the CTA's range; its sum out
            if interpret:  # the GPU's accumulator starts as zeros, the interpreter's SMEM not
                acc[...] = jnp.zeros(acc.shape, _F32)

            @pl.loop(jnp.maximum(lo, j * KS) - lo, jnp.minimum(hi, (j + 1) * KS) - lo)
            def _(i):
                s = i % ST
                plgpu.barrier_wait(bars.at[s])
                _mma(acc, x_smem.at[s], w_smem.at[s], interpret)
                if per > ST:  # the product is done: its stage takes unit i + ST's loads
                    issue(i + ST)

            y = acc[...]
            if interpret:
                cols = pl.ds(j * BN, BN)
                out_ref[:, cols] = out_ref[:, cols] + y[:M]
                return
            for lo_row in range(0, M, _OUT_ROWS):  # in slices of 64 rows through out_smem:
                n = min(_OUT_ROWS, M - lo_row)     # a smaller buffer, more stages
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out_smem's last store
                out_smem[...] = y if BM == _OUT_ROWS else y[lo_row:lo_row + _OUT_ROWS]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    out_smem.at[pl.ds(0, n)],
                    out_ref.at[pl.ds(lo_row, n), pl.ds(j * BN, BN)], reduction_op="add")

        # A loop over the CTA's column blocks, each with an accumulator of its own (zeroed as it
        # is allocated) and its K steps in a loop of their own, every product waited for at
        # once: ptxas serialized the wgmmas where one accumulator, zeroed after each block's
        # sum, ran through a single loop over the units (C7515 "non wgmma instructions defining
        # accumulator registers"): gate / up at 128 rows 23.5 us on an H100 where the same
        # loads and wgmmas without the sums took 15.6 (bench/results/probe_stream-h100-*). Not
        # the cause, it turned out: 23.3 us without C7515, as slow as the probe's loads and
        # products with the epilogue's TMA reduce-adds, serialized or not (+add, +scoped0/1:
        # 23.2-24.8; bench/results/probe_stream-h100-rebuilt_688a155-2026-12-07.json).
        @pl.loop(lo // KS, (hi - 1) // KS + 1)
        def _(j):
            pl.run_scoped(functools.partial(block, j),
                          plgpu.SMEM((BM, BN), _F32) if interpret else plgpu.ACC((BM, BN), _F32))

        if not interpret:
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        mg.smem_tile((ST, BM, BK), _BF16, interpret=interpret),
        mg.smem_tile((ST, BK, BN), _BF16, interpret=interpret),
        mg.smem_tile((_OUT_ROWS, BN), _F32, interpret=interpret),
        plgpu.Barrier(num_arrivals=2, num_barriers=ST),
    )


def _mma(acc, x, w, interpret: bool):
    """acc += x @ w (x [BM, BK], w [BK, BN] bf16 SMEM refs), waited for (its stage is then free
    for the next loads)."""
    if interpret:
        acc[...] = acc[...] + lax.dot(x[...].astype(_F32), w[...].astype(_F32),
                                      precision=lax.Precision.HIGHEST)
        return
    mg.plgpu.wgmma(acc, x, w)
    mg.plgpu.wgmma_wait(0)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name"))
def project_group_mgpu(x: jax.Array, ws: tuple, *,
                       config: MosaicProjectionConfig = MosaicProjectionConfig(),
                       interpret: bool = False, name: str = "gdn_projection_mgpu") -> tuple:
    """x: [M, K] bf16, ws: weights [K, N_i] bf16 -> (x @ w_i [M, N_i] fp32 for each), in one
    launch (`misfit` says what it takes). name: the kernel's (what a profile shows)."""
    ws, M, K, widths = check_group("project_group_mgpu", x, ws, misfit, config)
    offsets = tuple(itertools.accumulate([0, *widths]))
    firsts = tuple(n // config.block_n for n in offsets)
    grid = (min(config.ctas, firsts[-1] * (K // config.block_k)),)
    grid_config = dataclasses.replace(config, ctas=grid[0])
    body = functools.partial(_body, M=M, K=K, firsts=firsts, config=grid_config,
                             interpret=interpret)

    def stateful(refs):
        mg.core_map(lambda: body(refs), grid=grid, name=name, interpret=interpret)

    *_, out = pl.run_state(stateful)((x, *ws, jnp.zeros((M, offsets[-1]), _F32)))
    return tuple(out[:, lo:hi] for lo, hi in itertools.pairwise(offsets))
