"""The GDN layer's short causal conv for T tokens per row, in place on the slot's conv rows:
a decode or verify step's conv in one launch.

    outs, conv = conv_step(x, conv, weight, slots, widths=(H*K, H*K, HV*V), keep="window")
    # x [B, T, C] (the tokens' pre-conv channels), conv [N, L, C] (rows 0..W-2 of a slot: its
    # last W - 1 inputs, oldest first), weight [W, C]; outs[i] [B, T, widths[i]] = the channel
    # range i of silu(sum_j xp[t + j] * weight[j]) over xp = [window; x]. keep="window"
    # (decode): conv[slot, :W - 1] := the last W - 1 rows of xp. keep="all" (verify): conv[slot]
    # := xp, zero-padded to L rows (the window stays; `commit` then picks the window of the
    # accepted count)

In XLA the step is a concatenate, the conv's slices (one fusion per consumer of q, k, v) and the
window's gather and scatter: five or six launches of a microsecond or two per GDN layer. Here
program (b, j) reads column block j of row b's window and tokens, writes its outputs (each block
lies inside one of `widths`) and the slot's rows: one launch, no gather, no scatter. On an H200
at T = 1 it took a 48-layer decode step from 3.52 to 3.38 ms of kernels at B = 1
and from 5.01 to 4.69 ms at B = 32
(bench/results/profile_step-h200-qwen3_5_text-conv_kernel-2026-12-02.json); verify's is
unmeasured. The math is the fp32 sum of `gdn_jax.ops.conv.causal_conv`, term by term in the same
order.

Slots are distinct within a call; a negative or out-of-range slot is a padding row: nothing read
or written in the conv buffer, zero outputs. The conv buffer is aliased to the result: inside a
jit that donates it, nothing is copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _pallas
from ._common import BlockConfig, is_pow2


@dataclasses.dataclass(frozen=True)
class ConvConfig(BlockConfig):
    """Launch parameters of `conv_step`: block, the channels one program takes, a power of two
    >= 16 dividing every width; num_warps, num_stages (`BlockConfig`)."""

    block: int = 512

    def misfit(self, widths) -> str | None:
        """Why this config cannot take outputs of these widths, or None."""
        bad = [n for n in widths if n % self.block]
        if bad:
            return f"block={self.block} does not divide the output widths {bad}"
        return None


def _kernel(slots_ref, x_ref, w_ref, conv_in, *refs, width, tokens, keep, block, starts,
            num_slots, x_col, parts_dtype, sides):
    *out_refs, conv_ref = refs  # conv_ref: conv_in's buffer (aliased)
    out_refs, side_refs = out_refs[:len(starts)], out_refs[len(starts):]
    b, j = pl.program_id(0), pl.program_id(1)
    s = slots_ref[b]
    valid = (s >= 0) & (s < num_slots)
    c0 = j * block
    cols = pl.ds(c0, block)

    def store(t, y):
        for out_ref, (lo, hi) in zip(out_refs, starts):
            @pl.when((c0 >= lo) & (c0 < hi))
            def _():
                out_ref[b, t, pl.ds(c0 - lo, block)] = y.astype(out_ref.dtype)

    def token(t):  # x's channels of token t; partial sums [S, B, T, N] added, as x's dtype
        if len(x_ref.shape) == 3:
            return x_ref[b, t, cols]
        return added(t, x_col + c0, block)

    def added(t, col, n):  # columns col..col + n of token t's partial sums, added and rounded
        parts = [x_ref[i, b, t, pl.ds(col, n)].astype(jnp.float32) for i in range(x_ref.shape[0])]
        return functools.reduce(lambda p, q: p + q, parts).astype(parts_dtype)

    @pl.when(j == 0)
    def _():  # the side columns (whatever the row's slot: their consumers mask padding rows)
        for side_ref, (col, n) in zip(side_refs, sides):
            for t in range(tokens):
                side_ref[b, t, :] = added(t, col, n).astype(side_ref.dtype)

    @pl.when(valid)
    def _():
        xs = [conv_in[s, i, cols] for i in range(width - 1)]  # the window, then the tokens
        xs += [token(t).astype(conv_ref.dtype) for t in range(tokens)]
        w = [w_ref[i, cols].astype(jnp.float32) for i in range(width)]
        for t in range(tokens):
            store(t, conv_silu(xs[t:t + width], w))
        if keep == "window":  # the last W - 1 inputs (W = 1: nothing to keep)
            for i, xi in enumerate(xs[tokens:]):
                conv_ref[s, i, cols] = xi
        else:  # the window stays; the tokens after it, zeros to the end of the slot's rows
            for t in range(tokens):
                conv_ref[s, width - 1 + t, cols] = xs[width - 1 + t]
            for i in range(width - 1 + tokens, conv_ref.shape[1]):
                conv_ref[s, i, cols] = jnp.zeros((block,), conv_ref.dtype)

    @pl.when(jnp.logical_not(valid))
    def _():
        for t in range(tokens):
            store(t, jnp.zeros((block,), jnp.float32))


def conv_silu(xs, w):
    """One token's conv output: silu(sum_i xs[i] * w[i]) in fp32, the terms added in order
    i = 0..W-1 (xs: the W - 1 window inputs, then the token; w: the W taps, fp32), as
    `gdn_jax.ops.conv.causal_conv` adds them."""
    acc = jnp.zeros(jnp.broadcast_shapes(xs[0].shape, w[0].shape), jnp.float32)
    for x, wi in zip(xs, w):
        acc = acc + x.astype(jnp.float32) * wi
    return acc * jax.nn.sigmoid(acc)


@functools.partial(jax.jit, static_argnames=("widths", "keep", "dtype", "config", "interpret",
                                             "x_col", "parts_dtype", "sides"))
def conv_step(x: jax.Array, conv: jax.Array, weight: jax.Array, slots: jax.Array, *,
              widths: tuple, keep: str = "window", dtype=None,
              config: ConvConfig = ConvConfig(), interpret: bool = False, x_col: int = 0,
              parts_dtype=None, sides: tuple = ()):
    """x: [B, T, C], conv: [N, L, C], weight: [W, C], slots: [B] int32; widths: output widths
    summing to C; keep: "window" (L >= W - 1) or "all" (L >= W - 1 + T); dtype: the outputs'
    (default x's) -> (outs, conv) with outs[i]: [B, T, widths[i]] (module docstring).

    x may instead be a projection's split-K partial sums [S, B, T, N] (fp32, unadded; S = 1:
    the product itself, in its dtype) whose
    columns x_col..x_col + C are the tokens' channels: added in fp32 and rounded to parts_dtype
    (the projection's output dtype) in the kernel, with no launch of their own. sides: more
    (column, width) ranges of those partial sums (width a power of two), each returned added
    and rounded as its own [B, T, width] array in parts_dtype, after outs: (outs, conv, sides)
    (the GDN layer's gate inputs b and a, with no launch for their sum and slices)."""
    widths = tuple(int(n) for n in widths)
    parts = x.ndim == 4
    _check(x, conv, weight, slots, widths, keep, config, x_col, sides)
    B, T = x.shape[-3:-1]
    C = weight.shape[1]
    N = conv.shape[0]
    dtype = jnp.dtype(dtype or (parts_dtype if parts else x.dtype))
    side_dtype = jnp.dtype(parts_dtype or x.dtype)
    if B == 0 or T == 0:  # nothing to run (a grid of size 0 may not launch on a GPU)
        outs = tuple(jnp.zeros((B, T, n), dtype) for n in widths)
        return (outs, conv, tuple(jnp.zeros((B, T, n), side_dtype) for _, n in sides)
                ) if sides else (outs, conv)
    bounds = [0]
    for n in widths:
        bounds.append(bounds[-1] + n)
    kernel = functools.partial(_kernel, width=weight.shape[0], tokens=T, keep=keep,
                               block=config.block, starts=tuple(zip(bounds[:-1], bounds[1:])),
                               num_slots=N, x_col=x_col,
                               parts_dtype=side_dtype if parts else None, sides=sides)
    *outs, conv = _pallas.pallas_call(
        kernel,
        name=f"gdn_conv_{keep}_t{T}",
        config=config,
        interpret=interpret,
        grid=(B, C // config.block),
        out_shape=(*(jax.ShapeDtypeStruct((B, T, n), dtype) for n in widths),
                   *(jax.ShapeDtypeStruct((B, T, n), side_dtype) for _, n in sides),
                   jax.ShapeDtypeStruct(conv.shape, conv.dtype)),
        input_output_aliases={3: len(widths) + len(sides)},
    )(slots, x, weight, conv)
    if sides:
        return tuple(outs[:len(widths)]), conv, tuple(outs[len(widths):])
    return tuple(outs), conv


def _check(x, conv, weight, slots, widths, keep, config, x_col, sides):
    op = "conv_step"
    C = weight.shape[-1]
    for col, n in sides:
        if x.ndim != 4 or not 0 <= col <= x.shape[3] - n or not is_pow2(n):
            raise ValueError(f"{op}: sides expected (column, width) ranges of x's partial sums "
                             f"[S, B, T, N], width a power of two, got {(col, n)} of "
                             f"x{list(x.shape)}")
    if x.ndim == 4:  # partial sums, the channels at x_col
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{op}: x's partial sums [S, B, T, N] expected a float dtype, got "
                             f"{x.dtype}")
        if not 0 <= x_col <= x.shape[3] - C or x_col % config.block:
            raise ValueError(f"{op}: x's partial sums [S, B, T, N] expected columns x_col.."
                             f"x_col + C within N, x_col a multiple of block={config.block} "
                             f"(C = {C}), got x{list(x.shape)}, x_col={x_col}")
    elif x.ndim != 3:
        raise ValueError(f"{op}: x expected [B, T, C] (or partial sums [S, B, T, N]), got "
                         f"x{list(x.shape)}")
    elif x_col:
        raise ValueError(f"{op}: x_col is for partial sums [S, B, T, N], got x{list(x.shape)}")
    B, T = x.shape[-3:-1]
    C = x.shape[2] if x.ndim == 3 else C
    if conv.ndim != 3 or conv.shape[2] != C:
        raise ValueError(f"{op}: conv expected [N, L, C] with C = {C} (x's channels), got "
                         f"conv{list(conv.shape)}")
    if weight.ndim != 2 or weight.shape[1] != C or weight.shape[0] < 1:
        raise ValueError(f"{op}: weight expected [W, C] with W >= 1 and C = {C}, got "
                         f"weight{list(weight.shape)}")
    if keep not in ("window", "all"):
        raise ValueError(f"{op}: keep expected 'window' or 'all', got {keep!r}")
    rows = weight.shape[0] - 1 + (T if keep == "all" else 0)
    if conv.shape[1] < rows:
        raise ValueError(f"{op}: conv expected at least {rows} rows per slot (W - 1"
                         f"{' + T' if keep == 'all' else ''}), got conv{list(conv.shape)}")
    if slots.ndim != 1 or slots.dtype != jnp.int32 or slots.shape[0] != B:
        raise ValueError(f"{op}: slots expected int32 [B] = [{B}], got "
                         f"{slots.dtype}{list(slots.shape)}")
    if sum(widths) != C or any(n <= 0 for n in widths):
        raise ValueError(f"{op}: widths expected positive widths summing to C = {C}, got "
                         f"{widths}")
    why = config.misfit(widths)
    if why:
        raise ValueError(f"{op}: {why}")
