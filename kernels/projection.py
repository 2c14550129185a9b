"""A projection of few rows, `x @ w` for M <= PROJECTION_MAX_M rows, at the weight's read bandwidth.

XLA lowers one-to-few-row bf16 projections as reductions or small GEMMs that read the weight at
about a fifth of the copy bandwidth on an H200 (../shared/notes/verify-anchors.md, section 5).
A decode step is nothing but such projections, so this kernel streams the weight once with many
loads in flight: the grid is (N // block_n, splits), program (n, s) reduces its K / splits slice
of the weight's column block [K / splits, block_n] against all M rows (a tile of block_m >= 16
rows, the tensor cores' smallest, with the rows past M masked), in fp32. The splits (split-K) put
enough programs on the GPU when N is small (an out_proj has 2048 columns: 32 blocks of 64); each
writes an fp32 partial sum, added in XLA. With one split the kernel writes the result itself.

    y = project(x, w, config=ProjectionConfig(block_n=128, block_k=128, splits=4))
    q, k, v = project_group(x, (w_q, w_k, w_v), config=config)    # one launch, three weights

x: [M, K], w: [K, N] (the [in, out] kernel of `nnx.Linear`), both bf16 or fp16 (the products are
exact in the fp32 accumulator; an fp32 projection stays with XLA, which can honour its precision).
Returns [M, N] in x's dtype.

`project_group` takes several weights of one x (a layer's q / k / v, gate / up, in_proj_qkvz /
in_proj_ba) in one launch: the grid's column blocks run over the weights one after another, each
program streaming a block of one of them. A small weight then costs no launch of its own (k_proj,
2 MB, reads at 12% of copy alone on the H200: bench/results/bench_projection-h200-2026-12-01.json)
and the larger launch amortises the ramp and tail that keep 20-50 MB weights at 50-70% of copy.

One row may instead run as a GEMV (`ProjectionConfig.gemv`): the row times the weight's tile on
the CUDA cores, summed over K after the loop, with no 16-row tile.

Two projections form their x from their producers' outputs on the tile they load (a prologue), so
that the elementwise step between two launches costs no launch of its own (a microsecond or two
at one row, the sum of the producer's split-K partials included):

    y = project_swiglu(gate_up, w_down, config=config)       # silu(gate) * up, then @ w_down
    y = project_gated_norm(o, z, norm_w, w_out, eps=1e-6, config=config)   # GDN's out_proj

Or the product silu * up is formed in the epilogue of the gate / up launch, each program
streaming the same column block of both weights (one slice of K), and down_proj runs plain:

    h = project_glu(x, w_gate, w_up, config=config)          # silu(x @ w_gate) * (x @ w_up)

gate_up is the gate / up group's output as `project_group(..., partials=True)` returns it: [S, M,
2I] fp32 partial sums, or where the group is unsplit S = 1 in w's dtype (the product itself, as
rounded as the group's outputs), summed and rounded to w's dtype as the group would have
returned gate and up.
`project_gated_norm` normalises o per head of V = norm_w's width (the RMSNorm over each V-wide
column block, times norm_w), then multiplies by silu(z): the GDN output norm
(`gdn_jax.ops.residual_norm.gated_rms_norm`); its K-steps are one head wide (block_k = V).
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
from ._common import (check_launch_fields, check_weights, column_blocks, column_index, dot_rows,
                      gated_norm, in_row_zero, pow2_block, summed_parts)

_F32 = jnp.float32
PROJECTION_MAX_M = 128  # the most rows one call takes: all rows share one pass over the weight
PROJECTION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SMEM_BYTES = 160 * 1024  # what an SM80+ block may take (A100: 163 KB; H100/H200: 227 KB), less
                          # Triton's own scratch


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Launch parameters of `project` (hashable: a static argument).

    block_n:    columns of w per program (a power of two >= 16 dividing N).
    block_k:    rows of w per loop step (a power of two >= 16).
    splits:     K is cut into this many slices, one program each; K // splits must be a multiple
                of block_k.
    num_warps, num_stages: Triton's; the stages pipeline the loads of the loop over K.
    swap_ab:    multiply w's block by x (w_block^T x^T, the [block_n, block_m] product) rather
                than x by w's block: the weight's columns fill the tensor-core tile's long side
                and the few rows its short one (on Hopper, the wgmma the x-first order's 16 to
                32 rows are too few for).
    gemv:       one row (M = 1) only: its products on the CUDA cores, x one [block_k] row and
                the [block_k, block_n] fp32 products summed over K once, after the loop (they
                take block_k * block_n / (32 num_warps) registers a thread: 64 at [128, 64] and
                4 warps). Its loop has no tt.dot, whose loads Triton pipelines only where the
                loop says its stages (`_pallas.pipelined_fori_loop`: num_stages; offline, sm_90,
                bench/ptxas_stats.py --gemv: 3 async copies a step at one weight, none without).
                Not with swap_ab (another form of the tile's product).
    """

    block_n: int = 128
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    gemv: bool = False

    def __post_init__(self):
        check_launch_fields(self, tiles=("block_n", "block_k"), counts=("splits",))
        if self.gemv and self.swap_ab:
            raise ValueError("ProjectionConfig: gemv and swap_ab are two forms of the product "
                             "(a row on the CUDA cores, a tile on the tensor cores): pick one")

    def smem_bytes(self, M: int, itemsize: int = 2, x_bytes: int | None = None,
                   weights: int = 1) -> int:
        """The shared memory the pipelined loads take: num_stages tiles of x and of w (of each
        of `weights` weights a program streams: 2 in `project_glu`). x_bytes (given only where a
        prologue forms x): a column of a row of its sources (`source_bytes`), staged for
        `staged_rows` rows; None: x itself, at itemsize."""
        x_tile = self.staged_rows(M, x_bytes is not None) * (
            itemsize if x_bytes is None else x_bytes)
        return self.num_stages * (x_tile + weights * self.block_n * itemsize) * self.block_k

    def staged_rows(self, M: int, prologue: bool) -> int:
        """The rows of x (or of a prologue's sources) staged each K-step: the tile's (`rows`),
        but one where a prologue forms one row's x from that row alone (`_kernel`)."""
        return 1 if prologue and M == 1 else self.rows(M)

    def rows(self, M: int) -> int:
        """The rows of x's tile for a call of M rows: one as a GEMV, else `block_m`."""
        return 1 if self.gemv else block_m(M)

    def misfit(self, K: int, N: int, M: int = 1, x_bytes: int | None = None,
               weights: int = 1) -> str | None:
        """Why this config cannot run M rows of a [K, N] weight (x's sources at x_bytes a
        column of a row: `smem_bytes`), or None."""
        if self.gemv and M != 1:
            return f"gemv takes one row, got M={M}"
        smem = self.smem_bytes(M, x_bytes=x_bytes, weights=weights)
        if smem > _SMEM_BYTES:
            rows = self.staged_rows(M, x_bytes is not None)
            w_tiles = self.block_n if weights == 1 else f"{weights} x {self.block_n}"
            return (f"{self.num_stages} stages of [{rows} + {w_tiles}, "
                    f"{self.block_k}] tiles take {smem} B of shared memory, over {_SMEM_BYTES}")
        if N % self.block_n:
            return f"block_n={self.block_n} does not divide N={N}"
        if K % self.splits or (K // self.splits) % self.block_k:
            return (f"K={K} is not a multiple of splits * block_k = "
                    f"{self.splits} * {self.block_k}")
        return None


def source_bytes(prologue: str | None, parts_bytes: int = 2, itemsize: int = 2) -> int:
    """The bytes of one column of one row the kernel loads for x each K-step: x's itemsize, or a
    prologue's sources', parts_bytes being a partial-sum source's column of a row over its S
    slices (S x its itemsize: fp32 partials 4 S, a plain array its itemsize). swiglu: gate and
    up from the partials; gated_norm: o (itemsize) and z."""
    if prologue == "swiglu":
        return 2 * parts_bytes
    if prologue == "gated_norm":
        return itemsize + parts_bytes
    return itemsize


def _parts_bytes(a) -> int:
    """parts_bytes (`source_bytes`) of a source: [S, M, N] partial sums, or [M, N]."""
    return (a.shape[0] if a.ndim == 3 else 1) * jnp.dtype(a.dtype).itemsize


def smem_limit() -> int:
    """The shared memory a config may take (`ProjectionConfig.misfit`)."""
    return _SMEM_BYTES


def block_m(M: int) -> int:
    """The padded row count of a call of M rows: the tile every program multiplies."""
    return dot_rows(M)


def misfit(M: int, K: int, N, dtype, config: ProjectionConfig,
           x_bytes: int | None = None, weights: int = 1) -> str | None:
    """Why `project` (N an int) or `project_group` (N the weights' widths) cannot take these
    sizes, or None (the dispatcher's question). x_bytes: a prologue's sources (`source_bytes`)."""
    if jnp.dtype(dtype) not in PROJECTION_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not one of {[str(d) for d in PROJECTION_DTYPES]}"
    if not 1 <= M <= PROJECTION_MAX_M:
        return f"M={M} rows is outside 1..{PROJECTION_MAX_M}"
    if isinstance(N, int):  # weights: how many a program streams (2: `project_glu`'s pair)
        return config.misfit(K, N, M, x_bytes, weights)
    for n in N:  # a group: each weight in blocks of its own (a narrow one keeps the others')
        bn = pow2_block(n, config.block_n)
        if bn is None:
            return (f"N={n} has no power-of-two block of 16..{config.block_n} columns dividing "
                    f"it")
        why = dataclasses.replace(config, block_n=bn).misfit(K, n, M)
        if why:
            return why
    return None


def _kernel(*refs, rows: int, block_m: int, block_k: int, k_split: int, swap_ab: bool,
            gemv: bool, stages: int, blocks: tuple[tuple[int, int, int, int], ...],
            prologue: tuple | None, extras: int = 0, epilogue=None, paired: bool = False):
    """Program (n, s): o[s, :, block n] = x[:, slice s of K] @ w[slice s of K, block n] (fp32
    accumulation; o is fp32 partial sums, or the result where there is one slice), for the weight
    whose blocks hold n: blocks[i] = (first, last, block_n, col): w_i's column blocks of block_n
    are programs first..last - 1, and fill o's columns from col on.

    x is the first ref, or (prologue) formed from the first refs tile by tile (`_x_tile`). x (or
    its sources) and o hold `rows` real rows (fewer than the tile's block_m, or padded to it in
    the interpreter): the tile's rows past them are masked, read as zeros and never stored.
    gemv (one row, block_m = 1): x's tile is that row, [1, block_k], and the products are summed
    on the CUDA cores (`ProjectionConfig.gemv`).

    epilogue (with `extras` more input refs after the weights, and any outputs): called as
    `epilogue(extra_refs, out_refs, acc, col, block_n, tile_rows, real)` with a program's fp32
    [block_m, block_n] result at output column col (one slice: splits = 1), to store it itself
    (`kernels.projection_conv`); None: o[s, :, block n] as above, the one output.
    paired: two weights of one shape streamed by every program, one block table for both
    (`project_glu`): the epilogue gets the pair of results."""
    sources = 1 if prologue is None else {"swiglu": 1, "gated_norm": 3}[prologue[0]]
    weights = 2 if paired else len(blocks)
    in_refs, w_refs = refs[:sources], refs[sources:sources + weights]
    extra_refs, out_refs = (refs[sources + weights:sources + weights + extras],
                            refs[sources + weights + extras:])
    n, s = pl.program_id(0), pl.program_id(1)
    # The tile's rows may run past x's (M < block_m): indexed by an array, every row past M
    # masked (jax 0.12 refuses the static slice past a ref's end that 0.10-0.11 let through).
    tile_rows = lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    real = tile_rows < rows
    dtype = w_refs[0].dtype
    x_tile = functools.partial(_x_tile, prologue, in_refs, tile_rows, real, block_k, dtype,
                               w_refs[0].shape[0])
    if prologue is not None and rows == 1 < block_m:
        # One row's prologue forms that row alone, the tile's other rows zeros: forming the
        # [block_m, block_k] tile would load and transform its block_m - 1 padding rows too, in
        # every program, each K-step (offline, sm_90: the swiglu launch's 158 registers and 96 KB
        # of staged sources a program become 62 and 40 KB, a plain projection's 46 and 40 KB;
        # bench/ptxas_stats.py --kernel projection-swiglu)
        one = functools.partial(_x_tile, prologue, in_refs, jnp.zeros((1, 1), jnp.int32),
                                jnp.ones((1, 1), jnp.bool_), block_k, dtype, w_refs[0].shape[0])
        x_tile = lambda start: in_row_zero(one(start), block_m)  # noqa: E731

    def block(ws, first: int, block_n: int, col: int):  # this program's block of each of ws
        local = pl.ds((n - first) * block_n, block_n)

        def product(x, w):
            if gemv:  # [block_k, block_n] products, summed over K after the loop
                return x.astype(_F32).T * w.astype(_F32)
            if swap_ab:  # [block_n, block_m]
                return lax.dot_general(w, x, (((0,), (1,)), ((), ())),
                                       preferred_element_type=_F32)
            return lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=_F32)

        def step(i, accs):
            ks = pl.ds(s * k_split + i * block_k, block_k)
            x = x_tile(s * k_split + i * block_k)
            return tuple(acc + product(x, w_ref[ks, local]) for acc, w_ref in zip(accs, ws))

        shape = ((block_k, block_n) if gemv else (block_n, block_m) if swap_ab
                 else (block_m, block_n))
        steps, zeros = k_split // block_k, tuple(jnp.zeros(shape, _F32) for _ in ws)
        # a GEMV's loop has no tt.dot: only a loop that says its stages pipelines its loads
        accs = (_pallas.pipelined_fori_loop(0, steps, step, zeros, stages=stages) if gemv
                else lax.fori_loop(0, steps, step, zeros))
        if gemv:
            accs = tuple(jnp.sum(acc, axis=0, keepdims=True) for acc in accs)
        elif swap_ab:
            accs = tuple(acc.T for acc in accs)
        start = col + (n - first) * block_n
        if epilogue is not None:
            epilogue(extra_refs, out_refs, accs if paired else accs[0], start, block_n,
                     tile_rows, real)
            return
        o_ref = out_refs[0]
        plgpu.store(o_ref.at[s, tile_rows, column_index(start, block_n)],
                    accs[0].astype(o_ref.dtype), mask=real)

    if paired or len(w_refs) == 1:  # one block table: of the weight, or of the pair's columns
        block(tuple(w_refs), 0, blocks[0][2], 0)
        return
    for w_ref, (first, last, block_n, col) in zip(w_refs, blocks):  # one static branch each
        pl.when((n >= first) & (n < last))(functools.partial(block, (w_ref,), first, block_n,
                                                             col))


def _load(ref, rows, start: int, block_k: int, real):
    """Columns start..start + block_k of a [rows, N] ref's tile, rows: [block_m, 1] int32 (rows
    past the real ones: 0)."""
    return plgpu.load(ref.at[rows, column_index(start, block_k)], mask=real, other=0)


def _summed(ref, rows, start: int, block_k: int, real, dtype):
    """The same tile of a [S, rows, N] ref of partial sums, added in fp32 and rounded to dtype
    (what the producer's output would have held)."""
    return summed_parts(ref, rows, column_index(start, block_k), dtype, mask=real, other=0)


def _x_tile(prologue, refs, rows, real, block_k: int, dtype, K: int, start):
    """x's [block_m, block_k] tile at column `start`, in dtype: loaded, or formed by the prologue
    (module docstring), its arithmetic in fp32 and rounded where the unfused ops round."""
    if prologue is None:
        return _load(refs[0], rows, start, block_k, real)
    if prologue[0] == "swiglu":  # refs: gate_up [S, rows, 2K]
        gate = _summed(refs[0], rows, start, block_k, real, dtype).astype(_F32)
        up = _summed(refs[0], rows, K + start, block_k, real, dtype).astype(_F32)
        return (gate * jax.nn.sigmoid(gate) * up).astype(dtype)
    # "gated_norm": refs o [rows, K], z [rows, K] (or partial sums [S, rows, Nz] holding z from
    # column z_col), norm weight [V = block_k]; prologue = ("gated_norm", eps, z_col)
    o_ref, z_ref, w_ref = refs
    o = _load(o_ref, rows, start, block_k, real).astype(_F32)
    z = (_load(z_ref, rows, start, block_k, real) if len(z_ref.shape) == 2 else
         _summed(z_ref, rows, prologue[2] + start, block_k, real, dtype)).astype(_F32)
    return gated_norm(o, z, w_ref[...], prologue[1], dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name", "partials"))
def project(x: jax.Array, w: jax.Array, *, config: ProjectionConfig = ProjectionConfig(),
            interpret: bool = False, name: str = "gdn_projection",
            partials: bool = False) -> jax.Array:
    """x: [M, K] bf16 | fp16, w: [K, N] same dtype -> [M, N] x.dtype (fp32 accumulation).
    name: the kernel's (what a profile shows). partials: return the [splits, M, N] partial sums
    unadded (fp32; unsplit, [1, M, N] in x's dtype), for a consumer that adds them itself
    (`add_rms_norm`: no launch for the sum)."""
    M, K = _check(x, (w,), config)
    return _launch((x,), (0,), M, K, (w,), config, interpret, name, partials)[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name", "partials"))
def project_group(x: jax.Array, ws: tuple, *, config: ProjectionConfig = ProjectionConfig(),
                  interpret: bool = False, name: str = "gdn_projection_group",
                  partials: bool = False):
    """x: [M, K] bf16 | fp16, ws: weights [K, N_i] of x's dtype -> (x @ w_i [M, N_i] x.dtype for
    each), in one launch: each weight in column blocks of `pow2_block(N_i, config.block_n)`.
    name: the kernel's. partials: return the one [splits, M, sum N_i] output unadded and unsplit
    (fp32 partial sums; where unsplit, S = 1 in x's dtype): `project_swiglu`'s gate_up."""
    if not isinstance(ws, (tuple, list)) or not ws:
        raise ValueError(f"project_group: ws must be a non-empty tuple of [K, N] weights, "
                         f"got {type(ws).__name__}")
    ws = tuple(ws)
    M, K = _check(x, ws, config)
    out = _launch((x,), (0,), M, K, ws, config, interpret, name, partials, group=True)
    return out[0] if partials else out


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name", "partials"))
def project_swiglu(gate_up: jax.Array, w: jax.Array, *,
                   config: ProjectionConfig = ProjectionConfig(), interpret: bool = False,
                   name: str = "gdn_projection_swiglu", partials: bool = False) -> jax.Array:
    """gate_up: [S, M, 2K] (fp32 partial sums, `project_group(x, (w_gate, w_up), partials=True)`;
    or S = 1 in w's dtype), w: [K, N] bf16 | fp16 -> silu(gate) * up @ w [M, N] in w's dtype,
    gate and up the sums of gate_up's [..., :K] and [..., K:] rounded to w's dtype (module
    docstring). partials: as `project`'s."""
    M, K = _check_sources("project_swiglu", (("gate_up", gate_up, None),), w, config,
                          source_bytes("swiglu", _parts_bytes(gate_up)),
                          swiglu=True)
    return _launch((gate_up,), (1,), M, K, (w,), config, interpret, name, partials,
                   prologue=("swiglu",))[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name"))
def project_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *,
                config: ProjectionConfig = ProjectionConfig(), interpret: bool = False,
                name: str = "gdn_projection_glu") -> jax.Array:
    """x: [M, K], w_gate, w_up: [K, I] (x's dtype, bf16 | fp16) -> silu(x @ w_gate) * (x @ w_up)
    [M, I] in x's dtype: every program streams the same column block of both weights and forms
    the product in its epilogue, from gate and up rounded to x's dtype as `project_group` would
    return them (fp32 arithmetic, one rounding: `project_swiglu`'s prologue's). One slice of K
    (config.splits = 1): the epilogue needs the whole sums."""
    check_weights("project_glu", x, (w_gate, w_up))
    if w_gate.shape != w_up.shape:
        raise ValueError(f"project_glu: w_gate and w_up expected one shape [K, I], got "
                         f"w_gate{list(w_gate.shape)} and w_up{list(w_up.shape)}")
    M, K = x.shape
    why = misfit(M, K, w_gate.shape[1], x.dtype, config, weights=2)  # one block table, two tiles
    if why:
        raise ValueError(f"project_glu: x{list(x.shape)} @ w_gate, w_up{list(w_gate.shape)} "
                         f"{x.dtype}: {why}")
    if config.splits != 1:
        raise ValueError(f"project_glu: splits={config.splits}: the product needs each column "
                         f"block's whole sums (1)")
    rows = held_rows(M, config, interpret)
    out = call((x,), (0,), M, K, (w_gate, w_up), (config.block_n,), config, interpret, name,
               jax.ShapeDtypeStruct((rows, w_gate.shape[1]), x.dtype), epilogue=_glu_epilogue,
               paired=True)
    return out[:M]


def _glu_epilogue(_extra_refs, out_refs, accs, col, block_n, tile_rows, real):
    gate, up = (acc.astype(out_refs[0].dtype).astype(_F32) for acc in accs)
    plgpu.store(out_refs[0].at[tile_rows, column_index(col, block_n)],
                (gate * jax.nn.sigmoid(gate) * up).astype(out_refs[0].dtype), mask=real)


@functools.partial(jax.jit, static_argnames=("eps", "z_col", "config", "interpret", "name",
                                             "partials"))
def project_gated_norm(o: jax.Array, z: jax.Array, norm_weight: jax.Array, w: jax.Array, *,
                       eps: float, z_col: int = 0, config: ProjectionConfig = ProjectionConfig(),
                       interpret: bool = False, name: str = "gdn_projection_gated_norm",
                       partials: bool = False) -> jax.Array:
    """o, z: [M, K] in w's dtype (K = heads x V), norm_weight: [V], w: [K, N] bf16 | fp16 ->
    gated_rms_norm(o, z) @ w [M, N] in w's dtype: each V-wide head of o RMS-normalised (eps),
    times norm_weight, rounded, times silu(z) in fp32 (module docstring). config.block_k must be
    V (one head a K-step). partials: as `project`'s.

    z may instead be its producer's split-K partial sums [S, M, Nz] (fp32; or S = 1 in w's
    dtype) whose columns z_col..z_col + K are z: added and rounded to w's dtype on load."""
    if z.ndim == 3:
        K = w.shape[0] if w.ndim == 2 else 0
        if z.dtype not in (jnp.dtype(_F32), jnp.dtype(w.dtype)) or not (
                0 <= z_col <= z.shape[2] - K and z.shape[1] == o.shape[0]):
            raise ValueError(f"project_gated_norm: z's partial sums [S, M, Nz] (fp32 or "
                             f"{w.dtype}) expected M = {o.shape[0]} rows and columns z_col.."
                             f"z_col + {K} within Nz, got {z.dtype}{list(z.shape)}, "
                             f"z_col={z_col}")
        M, K = _check_sources("project_gated_norm", (("o", o, w.dtype),), w, config,
                              source_bytes("gated_norm", _parts_bytes(z)))
    else:
        if z_col:
            raise ValueError(f"project_gated_norm: z_col is for z's partial sums [S, M, Nz], "
                             f"got z{list(z.shape)}")
        M, K = _check_sources("project_gated_norm", (("o", o, w.dtype), ("z", z, w.dtype)), w,
                              config, source_bytes("gated_norm", _parts_bytes(z)))
    V = config.block_k
    if norm_weight.shape != (V,):
        raise ValueError(f"project_gated_norm: norm_weight expected [V] = [{V}] (config.block_k:"
                         f" one head a K-step), got norm_weight{list(norm_weight.shape)}")
    return _launch((o, z, norm_weight), (0, z.ndim - 2, None), M, K, (w,), config, interpret,
                   name, partials, prologue=("gated_norm", float(eps), z_col))[0]


def _launch(sources: tuple, row_axes: tuple, M: int, K: int, ws: tuple,
            config: ProjectionConfig, interpret: bool, name: str, partials: bool = False,
            group: bool = False, prologue: tuple | None = None) -> tuple:
    """Run the kernel on x's sources (x itself, or a prologue's inputs: their rows on row_axes,
    None for a source without rows) -> the outputs (`project_group`'s per weight, or one)."""
    widths = [w.shape[1] for w in ws]
    offsets = tuple(itertools.accumulate([0, *widths]))
    sizes = [config.block_n] if not group else [pow2_block(n, config.block_n) for n in widths]
    rows_held = held_rows(M, config, interpret)
    # unsplit, the product itself: a consumer of partials adds one slice and rounds it to this
    # dtype, so fp32 would only double the bytes written and read (the B = 32 verify's in_proj:
    # [1, 128, 12352] fp32, 6.3 MB a layer, read by the conv and the output norm)
    out_dtype = ws[0].dtype if config.splits == 1 else _F32
    out = call(sources, row_axes, M, K, ws, sizes, config, interpret, name,
               jax.ShapeDtypeStruct((config.splits, rows_held, offsets[-1]), out_dtype),
               prologue=prologue)
    if partials:
        return (out[:, :M],)
    # several slices: fp32 partial sums, added (and cast) by XLA
    out = out[0] if config.splits == 1 else out.sum(0).astype(ws[0].dtype)
    if rows_held != M:
        out = out[:M]
    if len(ws) == 1:
        return (out,)
    return tuple(out[:, lo:hi] for lo, hi in itertools.pairwise(offsets))


def held_rows(M: int, config: ProjectionConfig, interpret: bool) -> int:
    """The rows the sources and outputs of a call of M rows hold: M on the GPU, where the
    kernel's masked loads and stores read and write the M rows in place; the tile's in the
    interpreter, which slices refs as XLA does (no access past the end): there the sources are
    padded with zeros (the same products) and the outputs' pad dropped after."""
    return config.rows(M) if interpret else M


def call(sources: tuple, row_axes: tuple, M: int, K: int, ws: tuple, sizes, config, interpret,
         name: str, out_shape, *, prologue=None, extras: tuple = (), epilogue=None,
         aliases=None, paired: bool = False):
    """The kernel's pallas_call: weight i in column blocks of sizes[i], the sources' rows padded
    to `held_rows` (row_axes as `_launch`'s), extras and epilogue as `_kernel` takes them
    (aliases: pallas_call's input_output_aliases, numbered over sources, weights and extras;
    paired: ws a pair of one shape, sizes its one block size)."""
    blocks = column_blocks([w.shape[1] for w in ws[:1 if paired else len(ws)]], sizes)
    rows_held = held_rows(M, config, interpret)
    if rows_held != M:
        sources = tuple(src if axis is None else jnp.pad(src, [
            (0, rows_held - M if a == axis else 0) for a in range(src.ndim)])
            for src, axis in zip(sources, row_axes))
    return _pallas.pallas_call(
        functools.partial(_kernel, rows=M, block_m=config.rows(M), block_k=config.block_k,
                          k_split=K // config.splits, swap_ab=config.swap_ab,
                          gemv=config.gemv, stages=config.num_stages, blocks=blocks,
                          prologue=prologue, extras=len(extras), epilogue=epilogue,
                          paired=paired),
        name=name,
        config=config,  # pallas_call reads num_warps and num_stages
        interpret=interpret,
        grid=(blocks[-1][1], config.splits),
        out_shape=out_shape,
        input_output_aliases=aliases or {},
    )(*sources, *ws, *extras)


def _check(x, ws: tuple, config):
    M, K, widths = check_weights("project", x, ws)
    why = misfit(M, K, widths[0] if len(ws) == 1 else widths, x.dtype, config)
    if why:
        shapes = " ".join(f"w{list(w.shape)}" for w in ws)
        raise ValueError(f"project: x{list(x.shape)} @ {shapes} {x.dtype}: {why}")
    return M, K


def _check_sources(op: str, sources, w, config, x_bytes: int,
                   swiglu: bool = False) -> tuple[int, int]:
    """A prologue's sources against w [K, N]: (name, array, dtype or None) with arrays [M, K]
    of that dtype, or (swiglu) gate_up [S, M, 2K] fp32 or of w's dtype -> (M, K); a ValueError
    naming the argument otherwise, or the config's misfit (x_bytes: `source_bytes`)."""
    if w.ndim != 2:
        raise ValueError(f"{op}: w expected [K, N], got w{list(w.shape)}")
    K, N = w.shape
    M = None
    for name, x, dtype in sources:
        if swiglu:
            ok = x.ndim == 3 and x.shape[2] == 2 * K and x.shape[0] >= 1
            want, M = f"[S, M, 2K] with 2K = {2 * K}", x.shape[1] if x.ndim == 3 else None
            dtypes = (jnp.dtype(_F32), jnp.dtype(w.dtype))
        else:
            ok = x.ndim == 2 and x.shape[1] == K and (M is None or x.shape[0] == M)
            want = f"[M, K] with K = {K}" + ("" if M is None else f", M = {M}")
            M = x.shape[0] if M is None and x.ndim == 2 else M
            dtypes = (jnp.dtype(dtype),)
        if not ok:
            raise ValueError(f"{op}: {name} expected {want} (w{list(w.shape)}), got "
                             f"{name}{list(x.shape)}")
        if x.dtype not in dtypes:
            raise ValueError(f"{op}: {name} expected dtype {' or '.join(map(str, dtypes))}, got "
                             f"{x.dtype}")
    why = misfit(M, K, N, w.dtype, config, x_bytes)
    if why:
        raise ValueError(f"{op}: {M} rows @ w{list(w.shape)} {w.dtype}: {why}")
    return M, K
