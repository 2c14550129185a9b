"""A decoder layer's residual add and the next RMSNorm, as one op.

    r, h = add_rms_norm(x, delta, weight, eps)   # r = x + block output; h = rms_norm(r)

x: [..., N] the residual stream; delta: the block's output as partial sums [S, ..., N] (what
`gdn_jax.ops.projection.project(..., partials=True)` returns: S split-K slices in fp32, or the
product itself with S = 1), or None (h is x's norm, r is x); weight: [N], the norm computed as
`r * rsqrt(mean(r^2) + eps) * (1 + w)` in fp32 and rounded to x's dtype (`modules.norms.RMSNorm`).
The sum of delta is rounded to x's dtype before the add, as the block would have returned it,
so r and h are the unfused `x + y` and `rms_norm(x + y)` (up to the order the partials are added
in).

On an SM80+ GPU with Triton it is one launch of `gdn_jax.kernels.add_rms_norm` (bf16 and fp16 x;
XLA spends two on it, plus the split-K sum where it cannot fuse that); elsewhere (CPU, fp32) XLA.
GDN_JAX_NORM=xla keeps XLA, "pallas" is the default "auto" spelled out, "interpret" runs the
kernel in the Pallas interpreter (tests); unset, GDN_JAX_BACKEND=xla or =interpret steers it.
Read when a program is traced.

delta may also be a `WeightedRows`: a MoE block's output held as its expert rows, each output
row's rows and routing weights (`gdn_jax.ops.moe.routed(..., gathered=True)`), which the kernel
gathers and weights as it loads them: the MoE combine then costs no launch of its own.

    y = gated_norm(o, z, weight, eps)   # GDN's output norm per V-wide head (o, z: [..., H, V])

one launch of `gdn_jax.kernels.gated_rms_norm` under a switch of its own, GDN_JAX_GATED_NORM
(same values; "auto" keeps XLA until the kernel is measured: `GATED_AUTO_KERNEL`; z may be the
in_proj's partial sums: `z_col`). `rms_norm` and `gated_rms_norm`
are the two norms' XLA formulas, the modules' (`gdn_jax.modules.norms`) and the unfused paths'
one definition.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from gdn_jax import kernels
from gdn_jax.ops.dispatch import kernel_mode

ENV_VAR = "GDN_JAX_NORM"
GATED_VAR = "GDN_JAX_GATED_NORM"  # `gated_norm`'s own switch, the same values
# Whether GDN_JAX_GATED_NORM's "auto" (unset) runs the kernel: not until its GPU tests have run.
# Measured on an H100 (2026-12-07): faster at every row count, 2.19 / 2.74 us against XLA's
# 2.76 / 3.85 at a B = 32 ring decode / verify, the chained decode 4.677 -> 4.638 ms at B = 32
# and 3.229 -> 3.204 at B = 1 (bench/results/*gated_{xla,kernel}-2026-12-07.json); its GPU tests
# were cut off by the call's time limit (`bench/ab/defaults.sh 15` runs them): "pallas" runs it.
GATED_AUTO_KERNEL = False
_F32 = jnp.float32
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class WeightedRows:
    """A block output of rows [*lead, N] held as weighted rows of another array: row m (of the
    lead axes flattened) is sum_s weights[m, s] * y[rows[m, s]] in fp32, rounded to dtype (a MoE
    block's combine: y the expert kernel's output rows [R, N], or its split-K partial sums [S, R,
    N]; rows and weights [M, S], each token's k pairs). `value()` is that output (XLA). A pytree
    (y, rows and weights its leaves): it passes through jit, scan and remat."""

    y: jax.Array
    rows: jax.Array
    weights: jax.Array
    lead: tuple
    dtype: jnp.dtype

    @property
    def shape(self) -> tuple:
        return (*self.lead, self.y.shape[-1])

    def replace(self, **changes) -> "WeightedRows":
        return dataclasses.replace(self, **changes)

    def value(self) -> jax.Array:
        """[*lead, N] in dtype."""
        out = kernels.moe.combine_rows(self.y, self.rows, self.weights, self.dtype)
        return out.reshape(self.shape)


jax.tree_util.register_dataclass(WeightedRows, data_fields=["y", "rows", "weights"],
                                 meta_fields=["lead", "dtype"])


def add_rms_norm(x, delta, weight, eps: float, *, backend: str | None = None):
    """x: [..., N]; delta: [S, ..., N], a `WeightedRows` of x's shape, or None; weight: [N] ->
    (r, h), both [..., N] in x's dtype (module docstring). backend: None (dispatch,
    GDN_JAX_NORM), "xla" or "interpret"."""
    *lead, N = x.shape
    if isinstance(delta, WeightedRows):
        M, S = math.prod(delta.lead), delta.rows.shape[-1] if delta.rows.ndim else 0
        if delta.shape != x.shape or delta.rows.shape != (M, S) or delta.weights.shape != (M, S):
            raise ValueError(f"add_rms_norm: delta's rows [*x.shape] = {list(x.shape)} with rows "
                             f"and weights [M, S] (M = {M}) expected, got {list(delta.shape)}, "
                             f"rows{list(delta.rows.shape)}, weights{list(delta.weights.shape)}")
    elif delta is not None and (delta.ndim != x.ndim + 1 or delta.shape[1:] != x.shape):
        raise ValueError(f"add_rms_norm: delta [S, *x.shape] = [S, {', '.join(map(str, x.shape))}]"
                         f" expected, got delta{list(delta.shape)}")
    if weight.shape != (N,):
        raise ValueError(f"add_rms_norm: weight [N] = [{N}] expected, got weight"
                         f"{list(weight.shape)}")
    if backend not in (None, "auto", "xla", "interpret"):
        raise ValueError(f"add_rms_norm: backend expected one of ['auto', 'xla', 'interpret'], "
                         f"got {backend!r}")
    mode = backend if backend in ("xla", "interpret") else kernel_mode(ENV_VAR)
    M = math.prod(lead)
    if mode in ("compiled", "interpret") and jnp.dtype(x.dtype) in _KERNEL_DTYPES and M:
        x2 = x.reshape(M, N)
        gather, fits = {}, True
        if isinstance(delta, WeightedRows):  # the kernel's rows are the unsplit expert rows
            gather = dict(rows=delta.rows, row_weights=delta.weights)
            d2, fits = delta.y, delta.dtype == x.dtype  # the kernel rounds to x's dtype
        else:
            d2 = None if delta is None else delta.reshape(delta.shape[0], M, N)
        if fits and not kernels.add_rms_norm_misfit(x2, d2, weight, **gather):
            r, h = kernels.add_rms_norm(x2, d2, weight, eps=eps, config=config_for(M, N),
                                        interpret=mode == "interpret", **gather)
            return r.reshape(x.shape), h.reshape(x.shape)
    return _xla(x, delta, weight, eps)


def config_for(M: int, N: int) -> kernels.NormConfig:
    """The kernel's launch config for M rows of N: one program a row, its warps by row width."""
    return kernels.NormConfig(num_warps=_WARPS)


_WARPS = 16  # bench_residual_norm on the H200: best at 1-128 rows (1.6-2.0 us; 4 warps 2.0-2.7)


def gated_config(rows: int) -> kernels.GatedNormConfig:
    """`gated_norm`'s launch config for rows (token, head) rows: GDN_JAX_GATED_NORM_HEADS heads a
    program where set (a sweep's knob), else _HEADS, fewer where the rows would leave fewer than
    _PROGRAMS programs (one row of 32 heads: 32 programs of one)."""
    heads = int(os.environ.get("GDN_JAX_GATED_NORM_HEADS") or 0)
    if not heads:
        heads = _HEADS
        while heads > 1 and rows // heads < _PROGRAMS:
            heads //= 2
    return kernels.GatedNormConfig(heads=heads)


# alone (H100, 4 warps): 4 heads a program the fastest at 32 and 128 tokens (1.54 / 2.35 us,
# 8: 1.67 / 2.48), 1 to 4 alike at one token (bench_residual_norm-h100-gated_heads_w4-2026-12-07)
_HEADS, _PROGRAMS = 4, 128


def _xla(x, delta, weight, eps):
    if delta is not None:
        x = add_partials(x, delta)
    return x, rms_norm(x, weight, eps)


def _normalize(x, eps: float):
    """x * rsqrt(mean(x^2) + eps) over the last axis, in fp32."""
    x = x.astype(_F32)
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_norm(x, weight, eps: float):
    """The (1 + w) RMSNorm in XLA: x [..., N], weight [N] -> [..., N] in x's dtype (fp32 math)."""
    return (_normalize(x, eps) * (1.0 + weight.astype(_F32))).astype(x.dtype)


def gated_norm(o, z, weight, eps: float, *, z_col: int | None = None,
               backend: str | None = None):
    """`gated_rms_norm(o, z, weight, eps)` per V-wide head, one launch of
    `kernels.gated_rms_norm` on a GPU (bf16 and fp16 o; XLA's normalisation fusion of it runs at
    ~1/3 of the copy bandwidth) where GDN_JAX_GATED_NORM asks ("pallas"; "auto", the default,
    as GATED_AUTO_KERNEL says), else XLA. o: [..., H, V]; z: [..., H, V] in o's dtype, or with
    z_col its producer's partial sums [S, M, Nz] (M = the lead axes' size; fp32, or S = 1 in o's
    dtype) holding z at columns z_col..z_col + H * V, added in fp32 and rounded to o's dtype;
    weight: [V] -> [..., H, V] in o's dtype. backend: None (dispatch), "xla" or "interpret"."""
    *lead, H, V = o.shape
    M, N = math.prod(lead), H * V
    expected = (f"[S, {M}, Nz >= z_col + {N}]" if z_col is not None
                else f"[{', '.join(map(str, o.shape))}]")
    if (z.shape != o.shape if z_col is None else
            (z.ndim != 3 or z.shape[1] != M or not 0 <= z_col <= z.shape[2] - N)):
        raise ValueError(f"gated_norm: z {expected} expected, got z{list(z.shape)}"
                         + ("" if z_col is None else f", z_col={z_col}"))
    if weight.shape != (V,):
        raise ValueError(f"gated_norm: weight [V] = [{V}] expected, got weight"
                         f"{list(weight.shape)}")
    if backend in ("xla", "interpret"):
        mode = backend
    else:
        asked = os.environ.get(GATED_VAR, "auto") not in ("", "auto")
        mode = kernel_mode(GATED_VAR) if asked or GATED_AUTO_KERNEL else None
    z2 = z.reshape(M, N) if z_col is None else z
    if (mode in ("compiled", "interpret") and jnp.dtype(o.dtype) in _KERNEL_DTYPES and M
            and not kernels.gated_rms_norm_misfit(o.reshape(M, N), z2, weight, z_col or 0)):
        y = kernels.gated_rms_norm(o.reshape(M, N), z2, weight, eps=eps, z_col=z_col or 0,
                                   config=gated_config(M * H), interpret=mode == "interpret")
        return y.reshape(o.shape)
    if z_col is not None:
        z = partials_value(z[:, :, z_col:z_col + N], o.dtype).reshape(o.shape)
    return gated_rms_norm(o, z, weight, eps)


def gated_rms_norm(x, z, weight, eps: float):
    """The GDN output norm in XLA: `weight * rmsnorm(x)` over the last axis, rounded to x's dtype,
    then `* silu(z)` in fp32. x, z: [..., V]; weight: [V] -> [..., V] in x's dtype."""
    dtype = x.dtype
    y = weight * _normalize(x, eps).astype(dtype)
    return (y.astype(_F32) * jax.nn.silu(z.astype(_F32))).astype(dtype)


def add_partials(x, delta):
    """x + the block output delta holds ([S, ..., N] partial sums or a `WeightedRows`, as
    `add_rms_norm` takes), in x's dtype: the residual add with no norm after it."""
    y = delta.value() if isinstance(delta, WeightedRows) else partials_value(delta, x.dtype)
    return x + y.astype(x.dtype)


def partials_value(parts, dtype):
    """Split-K partial sums [S, ...] -> their sum [...] in dtype, as the producer would have
    returned it: added in fp32 (the one part itself where S = 1), rounded once."""
    y = parts[0] if parts.shape[0] == 1 else jnp.sum(parts.astype(_F32), axis=0)
    return y.astype(dtype)


__all__ = ["ENV_VAR", "GATED_VAR", "WeightedRows", "add_partials", "add_rms_norm", "gated_norm",
           "gated_rms_norm", "partials_value", "rms_norm"]
