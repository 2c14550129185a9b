"""The residual add and the next RMSNorm of a decoder layer, one launch: `add_rms_norm`.

A pre-norm decoder layer ends each block with `x = x + block(h)` and starts the next with
`h = rms_norm(x)`. XLA runs that as two kernels a norm (the add, with the split-K sum of the
block's last projection and the sum of squares, then the scaling: 3.5 + 1.3 us at one row on the
H200, 96 of each in a 48-layer step), since it does not fuse a row reduction with its broadcast
consumer. Here one program per row does all of it: it sums the projection's partials (fp32,
or unsplit the product itself: `gdn_jax.kernels.project(..., partials=True)`), rounds that to
x's dtype as the projection would have, adds the residual (rounded, as XLA's add of two bf16
arrays), and writes the new residual and its norm.

    r, h = add_rms_norm(x, delta, weight, eps=1e-6)   # r = x + sum(delta); h = rms_norm(r)

x: [M, N] bf16 | fp16 | fp32; delta: [S, M, N] (S >= 1 partial sums, any float dtype) or None (h
is the norm of x, r is x); weight: [N] (the norm is `r * rsqrt(mean(r^2) + eps) * (offset + w)`
in fp32: offset 1 for Qwen's zero-initialised norms). Returns (r, h), both [M, N] in x's dtype.

A MoE block's output is a weighted sum of expert rows, which the kernel can gather itself:

    r, h = add_rms_norm(x, y, weight, eps=1e-6, rows=rows, row_weights=w)

y: [R, N] (the expert kernel's output rows, any float dtype), rows: [M, S] int32 (in 0..R-1) and
row_weights: [M, S] (any float dtype): row m's block output is sum_s w[m, s] * y[rows[m, s]]
(fp32 multiply-adds in order s = 0..S-1, rounded to x's dtype: the MoE combine's one rounding),
so the combine costs no launch of its own.

GDN's output norm before out_proj, one launch (XLA's normalisation fusion of it took 4.4 us at
128 rows on an H100, ~3x its bytes at the copy bandwidth):

    y = gated_rms_norm(o, z, weight, eps=1e-6)   # per V-wide head: weight * rmsnorm(o) * silu(z)

o: [M, H * V] bf16 | fp16 | fp32; z: [M, H * V] in o's dtype, or the in_proj's split-K partial
sums [S, M, Nz] (fp32, or S = 1 in o's dtype) holding z at columns z_col..z_col + H * V, added in
fp32 and rounded to o's dtype as they load; weight: [V] (V a power of two). Returns [M, H * V] in
o's dtype, `gdn_jax.ops.residual_norm.gated_rms_norm`'s roundings.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _pallas
from ._common import check_launch_fields, gated_norm, is_pow2, pow2_at_least, summed_parts

_F32 = jnp.float32
NORM_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NORM_MAX_N = 16384  # a row is one block of registers: wider rows would spill
NORM_MAX_S = 64     # partial sums are added one load each, unrolled
GATED_NORM_MAX_V = 1024  # a program's heads are [heads, V] registers


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Launch parameters of `add_rms_norm`: Triton's warps per program (one row each)."""

    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        check_launch_fields(self, counts=("num_warps", "num_stages"))


def _kernel(*refs, n: int, block: int, splits: int, gather: bool, eps: float, offset: float):
    if gather:
        x_ref, d_ref, rows_ref, rw_ref, w_ref, r_ref, h_ref = refs
    elif splits:
        x_ref, d_ref, w_ref, r_ref, h_ref = refs
    else:
        x_ref, w_ref, h_ref = refs
    m = pl.program_id(0)
    cols = pl.ds(0, block)
    real = lax.broadcasted_iota(jnp.int32, (block,), 0) < n
    x = plgpu.load(x_ref.at[m, cols], mask=real, other=0)
    w = plgpu.load(w_ref.at[cols], mask=real, other=0).astype(_F32)  # early: off the chain
    r = x
    if splits:
        acc = jnp.zeros((block,), _F32)
        for s in range(splits):  # static: S is the projection's split count (or the rows')
            if gather:  # row rows[m, s] of the expert rows, times its weight
                part = d_ref.at[rows_ref[m, s], cols]
                scale = rw_ref[m, s].astype(_F32)
                acc += scale * plgpu.load(part, mask=real, other=0).astype(_F32)
            else:
                acc += plgpu.load(d_ref.at[jnp.int32(s), m, cols], mask=real,
                                  other=0).astype(_F32)
        y = acc.astype(x.dtype).astype(_F32)  # the block's output, as the block returns it
        r = (x.astype(_F32) + y).astype(x.dtype)
        plgpu.store(r_ref.at[m, cols], r, mask=real)
    rf = r.astype(_F32)
    inv = lax.rsqrt(jnp.sum(rf * rf) / n + eps)  # masked columns are zeros
    plgpu.store(h_ref.at[m, cols], (rf * inv * (offset + w)).astype(h_ref.dtype), mask=real)


def misfit(x, delta, weight, rows=None, row_weights=None) -> str | None:
    """Why `add_rms_norm` cannot take these arrays, or None (the dispatcher's question)."""
    if x.ndim != 2:
        return f"x [M, N] expected, got x{list(x.shape)}"
    M, N = x.shape
    if jnp.dtype(x.dtype) not in NORM_DTYPES:
        return f"x dtype {jnp.dtype(x.dtype)} is not one of {[str(d) for d in NORM_DTYPES]}"
    if not 1 <= N <= NORM_MAX_N:
        return f"N={N} is outside 1..{NORM_MAX_N}"
    if weight.shape != (N,):
        return f"weight [N] = [{N}] expected, got weight{list(weight.shape)}"
    if (rows is None) != (row_weights is None):
        return "rows and row_weights go together"
    if rows is not None:
        if delta is None or delta.ndim != 2 or delta.shape[1] != N:
            return (f"delta [R, N] with N = {N} expected with rows, got "
                    f"{None if delta is None else list(delta.shape)}")
        if rows.ndim != 2 or rows.shape[0] != M or row_weights.shape != rows.shape:
            return (f"rows and row_weights [M, S] with M = {M} expected, got rows"
                    f"{list(rows.shape)} and row_weights{list(row_weights.shape)}")
        if rows.dtype != jnp.int32 or not jnp.issubdtype(row_weights.dtype, jnp.floating):
            return (f"rows int32 and float row_weights expected, got {rows.dtype} and "
                    f"{row_weights.dtype}")
        if not 1 <= rows.shape[1] <= NORM_MAX_S:
            return f"S = {rows.shape[1]} rows a row is outside 1..{NORM_MAX_S}"
    elif delta is not None:
        if delta.ndim != 3 or delta.shape[1:] != (M, N):
            return f"delta [S, M, N] with M, N = {M}, {N} expected, got delta{list(delta.shape)}"
        if not 1 <= delta.shape[0] <= NORM_MAX_S:
            return f"delta's S = {delta.shape[0]} partial sums is outside 1..{NORM_MAX_S}"
    return None


@functools.partial(jax.jit, static_argnames=("eps", "offset", "config", "interpret"))
def add_rms_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array, *, eps: float,
                 offset: float = 1.0, rows: jax.Array | None = None,
                 row_weights: jax.Array | None = None, config: NormConfig = NormConfig(),
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(r, h) = (x + sum(delta, 0) rounded to x's dtype, its RMSNorm); with rows / row_weights
    the sum is of delta's rows, weighted: module docstring. A row index outside 0..R-1 is the
    caller's error (a GPU would read past delta: the ops hand the MoE plan's rows)."""
    why = misfit(x, delta, weight, rows, row_weights)
    if why:
        raise ValueError(f"add_rms_norm: {why}")
    M, N = x.shape
    block = pow2_at_least(N)
    # The GPU's masked loads and stores touch the N real columns in place; the interpreter
    # slices refs as XLA does (no access past the end), so there the columns are padded.
    if interpret and block != N:
        pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, block - N)])  # noqa: E731
        x, weight = pad(x), pad(weight)
        delta = None if delta is None else pad(delta)
    width = x.shape[1]
    gather = rows is not None
    splits = rows.shape[1] if gather else 0 if delta is None else delta.shape[0]
    out = jax.ShapeDtypeStruct((M, width), x.dtype)
    args = ((x, weight) if delta is None else (x, delta, rows, row_weights, weight) if gather
            else (x, delta, weight))
    outs = _pallas.pallas_call(
        functools.partial(_kernel, n=N, block=block, splits=splits, gather=gather, eps=eps,
                          offset=offset),
        name="gdn_add_rms_norm" if splits else "gdn_rms_norm", config=config,
        interpret=interpret, grid=(M,), out_shape=(out,) * (2 if splits else 1),
    )(*args)
    r, h = outs if splits else (x, outs[0])  # nothing added: r is x
    return r[:, :N], h[:, :N]


@dataclasses.dataclass(frozen=True)
class GatedNormConfig:
    """Launch parameters of `gated_rms_norm`: heads, the (token, head) rows a program normalises
    (a power of two; fewer where they do not divide the M x H rows); Triton's warps."""

    heads: int = 8
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        check_launch_fields(self, counts=("heads", "num_warps", "num_stages"))
        if not is_pow2(self.heads):
            raise ValueError(f"GatedNormConfig: heads must be a power of two, got heads="
                             f"{self.heads}")


def _gated_kernel(o_ref, z_ref, w_ref, y_ref, *, H: int, V: int, heads: int, z_col: int,
                  eps: float):
    # (token, head) rows r of this program (heads divides the rows: no masks): o's row r // H,
    # columns (r % H) * V + 0..V-1
    r = pl.program_id(0) * heads + lax.broadcasted_iota(jnp.int32, (heads, 1), 0)
    m, col = r // H, (r % H) * V + lax.broadcasted_iota(jnp.int32, (1, V), 1)
    o = plgpu.load(o_ref.at[m, col])
    z = (summed_parts(z_ref, m, z_col + col, o.dtype) if len(z_ref.shape) == 3
         else plgpu.load(z_ref.at[m, col]))
    y = gated_norm(o.astype(_F32), z.astype(_F32), w_ref[...], eps, o.dtype)
    plgpu.store(y_ref.at[m, col], y)


def gated_misfit(o, z, weight, z_col: int = 0) -> str | None:
    """Why `gated_rms_norm` cannot take these arrays, or None (the dispatcher's question)."""
    if o.ndim != 2 or weight.ndim != 1:
        return f"o [M, H * V] and weight [V] expected, got o{list(o.shape)}, weight" \
               f"{list(weight.shape)}"
    (M, N), V = o.shape, weight.shape[0]
    if jnp.dtype(o.dtype) not in NORM_DTYPES:
        return f"o dtype {jnp.dtype(o.dtype)} is not one of {[str(d) for d in NORM_DTYPES]}"
    if not (is_pow2(V) and 16 <= V <= GATED_NORM_MAX_V) or N % V:
        return (f"weight [V] with V a power of two in 16..{GATED_NORM_MAX_V} dividing o's {N} "
                f"columns expected, got V = {V}")
    if z.ndim == 3:
        if z.dtype not in (jnp.dtype(_F32), jnp.dtype(o.dtype)) or z.shape[1] != M or not (
                0 <= z_col <= z.shape[2] - N) or not 1 <= z.shape[0] <= NORM_MAX_S:
            return (f"z's partial sums [S <= {NORM_MAX_S}, M = {M}, Nz] (fp32 or {o.dtype}) "
                    f"holding columns z_col..z_col + {N} expected, got {z.dtype}"
                    f"{list(z.shape)}, z_col={z_col}")
    elif z.shape != o.shape or z.dtype != o.dtype or z_col:
        return (f"z [M, H * V] = {list(o.shape)} {o.dtype} (z_col 0) expected, got {z.dtype}"
                f"{list(z.shape)}, z_col={z_col}")
    return None


@functools.partial(jax.jit, static_argnames=("eps", "z_col", "config", "interpret"))
def gated_rms_norm(o: jax.Array, z: jax.Array, weight: jax.Array, *, eps: float, z_col: int = 0,
                   config: GatedNormConfig = GatedNormConfig(),
                   interpret: bool = False) -> jax.Array:
    """GDN's output norm, per V-wide head: o [M, H * V], z (or its partial sums [S, M, Nz] from
    column z_col), weight [V] -> [M, H * V] in o's dtype (module docstring)."""
    why = gated_misfit(o, z, weight, z_col)
    if why:
        raise ValueError(f"gated_rms_norm: {why}")
    (M, N), V = o.shape, weight.shape[0]
    rows = M * N // V
    heads = math.gcd(config.heads, rows)  # a power of two dividing the rows
    return _pallas.pallas_call(
        functools.partial(_gated_kernel, H=N // V, V=V, heads=heads, z_col=z_col, eps=eps),
        name="gdn_gated_rms_norm", config=config, interpret=interpret, grid=(rows // heads,),
        out_shape=jax.ShapeDtypeStruct((M, N), o.dtype),
    )(o, z, weight)
