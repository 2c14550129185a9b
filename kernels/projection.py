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
from ._common import check_launch_fields, check_weights, dot_rows, pow2_block

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
    """

    block_n: int = 128
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False

    def __post_init__(self):
        check_launch_fields(self, tiles=("block_n", "block_k"), counts=("splits",))

    def smem_bytes(self, M: int, itemsize: int = 2) -> int:
        """The shared memory the pipelined loads take: num_stages tiles of x and of w."""
        return self.num_stages * (block_m(M) + self.block_n) * self.block_k * itemsize

    def misfit(self, K: int, N: int, M: int = 1) -> str | None:
        """Why this config cannot run M rows of a [K, N] weight, or None."""
        if self.smem_bytes(M) > _SMEM_BYTES:
            return (f"{self.num_stages} stages of [{block_m(M)} + {self.block_n}, "
                    f"{self.block_k}] tiles take {self.smem_bytes(M)} B of shared memory, "
                    f"over {_SMEM_BYTES}")
        if N % self.block_n:
            return f"block_n={self.block_n} does not divide N={N}"
        if K % self.splits or (K // self.splits) % self.block_k:
            return (f"K={K} is not a multiple of splits * block_k = "
                    f"{self.splits} * {self.block_k}")
        return None


def smem_limit() -> int:
    """The shared memory a config may take (`ProjectionConfig.misfit`)."""
    return _SMEM_BYTES


def block_m(M: int) -> int:
    """The padded row count of a call of M rows: the tile every program multiplies."""
    return dot_rows(M)


def misfit(M: int, K: int, N, dtype, config: ProjectionConfig) -> str | None:
    """Why `project` (N an int) or `project_group` (N the weights' widths) cannot take these
    sizes, or None (the dispatcher's question)."""
    if jnp.dtype(dtype) not in PROJECTION_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not one of {[str(d) for d in PROJECTION_DTYPES]}"
    if not 1 <= M <= PROJECTION_MAX_M:
        return f"M={M} rows is outside 1..{PROJECTION_MAX_M}"
    if isinstance(N, int):
        return config.misfit(K, N, M)
    for n in N:  # a group: each weight in blocks of its own (a narrow one keeps the others')
        bn = pow2_block(n, config.block_n)
        if bn is None:
            return (f"N={n} has no power-of-two block of 16..{config.block_n} columns dividing "
                    f"it")
        why = dataclasses.replace(config, block_n=bn).misfit(K, n, M)
        if why:
            return why
    return None


def _kernel(x_ref, *refs, rows: int, block_m: int, block_k: int, k_split: int, swap_ab: bool,
            blocks: tuple[tuple[int, int, int, int], ...]):
    """Program (n, s): o[s, :, block n] = x[:, slice s of K] @ w[slice s of K, block n] (fp32
    accumulation; o is fp32 partial sums, or the result where there is one slice), for the weight
    whose blocks hold n: blocks[i] = (first, last, block_n, col): w_i's column blocks of block_n
    are programs first..last - 1, and fill o's columns from col on.

    x and o hold `rows` real rows (fewer than the tile's block_m, or padded to it in the
    interpreter): the tile's rows past them are masked, read as zeros and never stored."""
    *w_refs, o_ref = refs
    n, s = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(0, block_m)
    real = lax.broadcasted_iota(jnp.int32, (block_m, 1), 0) < rows
    # The tile's rows may run past x's (M < block_m): a static slice Pallas lets through (its
    # bounds check passes a start of 0), every row past M masked. The CUDA lowering tests at
    # M = 1 pin this on each jax CI runs.

    def block(w_ref, first: int, block_n: int, col: int):  # this program's block of w_ref
        local = pl.ds((n - first) * block_n, block_n)

        def step(i, acc):
            ks = pl.ds(s * k_split + i * block_k, block_k)
            x = plgpu.load(x_ref.at[tile_rows, ks], mask=real, other=0)
            if swap_ab:  # [block_n, block_m]
                return acc + lax.dot_general(w_ref[ks, local], x, (((0,), (1,)), ((), ())),
                                             preferred_element_type=_F32)
            return acc + lax.dot_general(x, w_ref[ks, local], (((1,), (0,)), ((), ())),
                                         preferred_element_type=_F32)

        shape = (block_n, block_m) if swap_ab else (block_m, block_n)
        acc = lax.fori_loop(0, k_split // block_k, step, jnp.zeros(shape, _F32))
        if swap_ab:
            acc = acc.T
        cols = pl.ds(col + (n - first) * block_n, block_n)
        plgpu.store(o_ref.at[s, tile_rows, cols], acc.astype(o_ref.dtype), mask=real)

    if len(w_refs) == 1:
        block(w_refs[0], 0, blocks[0][2], 0)
        return
    for w_ref, (first, last, block_n, col) in zip(w_refs, blocks):  # one static branch each
        pl.when((n >= first) & (n < last))(functools.partial(block, w_ref, first, block_n, col))


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name", "partials"))
def project(x: jax.Array, w: jax.Array, *, config: ProjectionConfig = ProjectionConfig(),
            interpret: bool = False, name: str = "gdn_projection",
            partials: bool = False) -> jax.Array:
    """x: [M, K] bf16 | fp16, w: [K, N] same dtype -> [M, N] x.dtype (fp32 accumulation).
    name: the kernel's (what a profile shows). partials: return the [splits, M, N] fp32 partial
    sums unadded, for a consumer that adds them itself (`add_rms_norm`: no launch for the sum)."""
    return _launch(x, (w,), config, interpret, name, partials)[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret", "name"))
def project_group(x: jax.Array, ws: tuple, *, config: ProjectionConfig = ProjectionConfig(),
                  interpret: bool = False, name: str = "gdn_projection_group") -> tuple:
    """x: [M, K] bf16 | fp16, ws: weights [K, N_i] of x's dtype -> (x @ w_i [M, N_i] x.dtype for
    each), in one launch: each weight in column blocks of `pow2_block(N_i, config.block_n)`.
    name: the kernel's."""
    if not isinstance(ws, (tuple, list)) or not ws:
        raise ValueError(f"project_group: ws must be a non-empty tuple of [K, N] weights, "
                         f"got {type(ws).__name__}")
    return _launch(x, tuple(ws), config, interpret, name)


def _launch(x, ws: tuple, config: ProjectionConfig, interpret: bool, name: str,
            partials: bool = False) -> tuple:
    M, K = _check(x, ws, config)
    widths = [w.shape[1] for w in ws]
    offsets = tuple(itertools.accumulate([0, *widths]))
    N = offsets[-1]
    sizes = [config.block_n] if len(ws) == 1 else [pow2_block(n, config.block_n)
                                                   for n in widths]
    firsts = tuple(itertools.accumulate([0, *(n // bn for n, bn in zip(widths, sizes))]))
    blocks = tuple(zip(firsts, firsts[1:], sizes, offsets))
    bm = block_m(M)
    # On the GPU the kernel's masked loads and stores read and write the M rows in place. The
    # interpreter slices refs as XLA does (no access past the end), so there x and the output
    # are padded to the tile's rows (zeros: the same products) and the pad is dropped after.
    rows_held = bm if interpret else M
    if rows_held != M:
        x = jnp.pad(x, ((0, rows_held - M), (0, 0)))
    out_dtype = x.dtype if config.splits == 1 and not partials else _F32
    out = _pallas.pallas_call(
        functools.partial(_kernel, rows=M, block_m=bm, block_k=config.block_k,
                          k_split=K // config.splits, swap_ab=config.swap_ab, blocks=blocks),
        name=name,
        config=config,  # pallas_call reads num_warps and num_stages
        interpret=interpret,
        grid=(firsts[-1], config.splits),
        out_shape=jax.ShapeDtypeStruct((config.splits, rows_held, N), out_dtype),
    )(x, *ws)
    if partials:
        return (out[:, :M],)
    # several slices: fp32 partial sums, added (and cast) by XLA
    out = out[0] if config.splits == 1 else out.sum(0).astype(x.dtype)
    if rows_held != M:
        out = out[:M]
    if len(ws) == 1:
        return (out,)
    return tuple(out[:, lo:hi] for lo, hi in itertools.pairwise(offsets))


def _check(x, ws: tuple, config):
    M, K, widths = check_weights("project", x, ws)
    why = misfit(M, K, widths[0] if len(ws) == 1 else widths, x.dtype, config)
    if why:
        shapes = " ".join(f"w{list(w.shape)}" for w in ws)
        raise ValueError(f"project: x{list(x.shape)} @ {shapes} {x.dtype}: {why}")
    return M, K
