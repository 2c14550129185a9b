"""GDN's in_proj and its causal conv in one launch, for a decode or verify step.

    outs, conv = project_conv(x, (w_qkvz, w_ba), conv, conv_weight, slots,
                              widths=(HK, HK, HVV, HVV, HV, HV), config=config)   # decode
    outs, conv = project_conv(..., tokens=T, keep="all")                       # verify
    q, k, v, z, b, a = outs      # q, k, v after the conv and SiLU; z, b, a as projected

The step's GDN layer projects its input (`project_group`) and then runs the conv over the
pre-conv q / k / v channels (`kernels.conv_step`): two launches, the second a few microseconds
that only reads what the first wrote. The conv is depthwise: channel c's output needs channel c
of the row's tokens and of the slot's W - 1 window rows, nothing else. So the projection program
that computes a column block of those channels for all the rows (all of K: one slice, `splits`
= 1) holds everything the conv of that block needs, and no other program reads or writes the
block's conv rows: it convolves its block in the epilogue, with no race and no second launch.
keep="window" (decode, one token a row): it reads the window, then shifts it in place by the
token. keep="all" (verify, T tokens a row, `conv_step`'s keep="all"): it writes the tokens
after the window (zeros to the slot's last row), waits on a barrier of its threads, and reads
each token's W inputs back from the slot's rows (a token's conv takes its row's earlier tokens,
held by other threads of the program).

x: [B T, K] (row b's tokens in rows b T..b T + T - 1), bf16 | fp16; ws: the group's weights
[K, N_i] in x's dtype; widths: the outputs the weights' concatenated columns are cut into, each
within one weight; the first outputs, summing to C = conv_weight.shape[1], are the conv's
channels. conv: [N, L, C] (rows 0..W-2 a slot's window, oldest first, in any float dtype; L >=
W - 1, + T for keep="all"), conv_weight: [W, C], slots: [B]. Each output [B T, width] is in x's
dtype: the projection rounded to it, as `project_group` returns it; the conv's outputs
`silu(conv)` of the window and the tokens (each token rounded to x's dtype, then to the conv
buffer's; fp32 sums in `conv_silu`'s order), rounded to x's dtype. conv is aliased to the result
and updated in place. A slot < 0 or >= N is a padding row: its conv rows are neither read nor
written, its conv outputs are zeros, its other outputs the projection.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _pallas, projection
from ._common import check_weights, column_index, pow2_block
from .conv import conv_silu


def _epilogue(extra_refs, out_refs, acc, col, block_n, tile_rows, real, *, ranges, width: int,
              num_slots: int, tokens: int, keep: str, interpret: bool):
    """Store a program's [block_m, block_n] result at output column col into the output whose
    range (lo, hi, convolved) holds it; a convolved block through the conv first."""
    slots_ref, conv_in, w_ref = extra_refs
    *outs, conv_ref = out_refs  # conv_ref: conv_in's buffer (aliased)

    def store(o_ref, lo, y):
        plgpu.store(o_ref.at[tile_rows, column_index(col - lo, block_n)], y.astype(o_ref.dtype),
                    mask=real)

    def convolve(o_ref, lo):
        y, cols = acc.astype(o_ref.dtype), column_index(col, block_n)
        t = tile_rows % tokens  # tile row m: token t of batch row m // tokens
        slot = plgpu.load(slots_ref.at[tile_rows // tokens], mask=real, other=-1)
        valid = real & (slot >= 0) & (slot < num_slots)
        # a padding row's conv rows lie past the pool (N): masked on the GPU, and the
        # interpreter's masked store (a scatter of the old values) drops it where an index of
        # a real slot (0, say) would rewrite that slot's old rows
        slot = jnp.where(valid, slot, num_slots)
        w = [plgpu.load(w_ref.at[jnp.int32(i), cols]).astype(jnp.float32) for i in range(width)]
        token = y.astype(conv_ref.dtype)
        if keep == "window":  # one token: the window read, then shifted in place by the token
            xs = [plgpu.load(conv_in.at[slot, jnp.int32(i), cols], mask=valid, other=0)
                  for i in range(width - 1)] + [token]
            for i in range(width - 1):  # (W = 1: no window)
                plgpu.store(conv_ref.at[slot, jnp.int32(i), cols], xs[i + 1], mask=valid)
        else:  # the tokens after the window, zeros to the end of the slot's rows; then read
            # back (a token's conv takes its row's earlier tokens, other rows of the tile)
            plgpu.store(conv_ref.at[slot, width - 1 + t, cols], token, mask=valid)
            rows = conv_ref.shape[1]
            for k in range(-(-(rows - width + 1 - tokens) // tokens)):
                row = width - 1 + tokens + t + k * tokens
                plgpu.store(conv_ref.at[jnp.where(row < rows, slot, num_slots), row, cols],
                            jnp.zeros_like(token), mask=valid & (row < rows))
            _pallas.cta_barrier(interpret)
            xs = [plgpu.load(conv_ref.at[slot, t + i, cols], mask=valid, other=0)
                  for i in range(width)]
        store(o_ref, lo, jnp.where(valid, conv_silu(xs, w), 0.0))

    for o_ref, (lo, hi, convolved) in zip(outs, ranges):
        body = convolve if convolved else lambda o_ref, lo: store(o_ref, lo, acc)
        pl.when((col >= lo) & (col < hi))(functools.partial(body, o_ref, lo))


def block_sizes(ws_widths, widths, most: int) -> tuple | None:
    """Each weight's column block: the largest power of two <= most (>= 16) dividing the weight's
    width and every cut between outputs inside it; None where a weight has none, or an output
    spans two weights."""
    cuts = set(itertools.accumulate(widths))
    sizes, lo = [], 0
    for n in ws_widths:
        inside = [c - lo for c in cuts if lo < c < lo + n]
        if lo + n not in cuts:  # (cuts holds the last column too)
            return None
        size = pow2_block(math.gcd(n, *inside), most)
        if size is None:
            return None
        sizes.append(size)
        lo += n
    return tuple(sizes)


def misfit(M: int, K: int, ws_widths, widths, C: int, dtype,
           config: projection.ProjectionConfig) -> str | None:
    """Why `project_conv` cannot take these sizes (C: the conv's channels), or None."""
    if config.splits != 1:
        return f"splits={config.splits}: the conv needs each column block's whole sum (1)"
    if sum(widths) != sum(ws_widths) or any(n <= 0 for n in widths):
        return f"widths {tuple(widths)} do not cut the weights' {sum(ws_widths)} columns"
    if C not in set(itertools.accumulate(widths)):
        return f"the conv's C = {C} channels are not the first outputs of widths {tuple(widths)}"
    sizes = block_sizes(ws_widths, widths, config.block_n)
    if sizes is None:
        return (f"widths {tuple(widths)} over weights {tuple(ws_widths)}: an output spans two "
                f"weights, or a weight has no power-of-two block >= 16 of its outputs")
    return projection.misfit(M, K, tuple(ws_widths), dtype, config)


@functools.partial(jax.jit, static_argnames=("widths", "tokens", "keep", "config", "interpret",
                                             "name"))
def project_conv(x: jax.Array, ws: tuple, conv: jax.Array, conv_weight: jax.Array,
                 slots: jax.Array, *, widths: tuple, tokens: int = 1, keep: str = "window",
                 config: projection.ProjectionConfig = projection.ProjectionConfig(),
                 interpret: bool = False, name: str = "gdn_projection_conv"):
    """x: [M, K] (M = B x tokens: row b's tokens in rows b T..b T + T - 1), ws: weights [K, N_i],
    conv: [N, L, C], conv_weight: [W, C], slots: [B] int32; widths: the outputs (module
    docstring); keep: "window" (one token a row, the window shifted) or "all" (the window kept,
    the tokens after it, zeros to the end: L >= W - 1 + tokens) -> (outs, conv): outs[i]
    [M, widths[i]] in x's dtype, conv the updated buffer. config: `ProjectionConfig` with
    splits = 1."""
    ws = tuple(ws)
    widths = tuple(int(n) for n in widths)
    M, K, ws_widths = check_weights("project_conv", x, ws)
    _check(x, conv, conv_weight, slots, tokens, keep)
    C = conv_weight.shape[1]
    why = misfit(M, K, ws_widths, widths, C, x.dtype, config)
    if why:
        raise ValueError(f"project_conv: x{list(x.shape)} @ {[list(w.shape) for w in ws]}: {why}")
    bounds = tuple(itertools.accumulate([0, *widths]))
    ranges = tuple((lo, hi, hi <= C) for lo, hi in itertools.pairwise(bounds))
    rows = projection.held_rows(M, config, interpret)
    if rows != M:  # the interpreter's padding rows: padding slots
        slots = jnp.pad(slots, (0, -(-rows // tokens) - slots.shape[0]), constant_values=-1)
    epilogue = functools.partial(_epilogue, ranges=ranges, width=conv_weight.shape[0],
                                 num_slots=conv.shape[0], tokens=tokens, keep=keep,
                                 interpret=interpret)
    out_shape = (*(jax.ShapeDtypeStruct((rows, n), x.dtype) for n in widths),
                 jax.ShapeDtypeStruct(conv.shape, conv.dtype))
    *outs, conv = projection.call(
        (x,), (0,), M, K, ws, block_sizes(ws_widths, widths, config.block_n), config,
        interpret, name, out_shape, extras=(slots, conv, conv_weight), epilogue=epilogue,
        aliases={1 + len(ws) + 1: len(widths)})
    return tuple(o[:M] for o in outs), conv


def _check(x, conv, conv_weight, slots, tokens, keep):
    op, M = "project_conv", x.shape[0]
    if keep not in ("window", "all"):
        raise ValueError(f"{op}: keep expected 'window' or 'all', got {keep!r}")
    if not isinstance(tokens, int) or tokens < 1 or M % tokens or (keep == "window"
                                                                   and tokens != 1):
        raise ValueError(f"{op}: tokens expected an int >= 1 dividing x's {M} rows (1 where "
                         f"keep='window'), got tokens={tokens!r}, keep={keep!r}")
    if conv_weight.ndim != 2 or conv_weight.shape[0] < 1:
        raise ValueError(f"{op}: conv_weight expected [W, C] with W >= 1, got "
                         f"conv_weight{list(conv_weight.shape)}")
    W, C = conv_weight.shape
    rows = W - 1 + (tokens if keep == "all" else 0)
    if conv.ndim != 3 or conv.shape[2] != C or conv.shape[1] < rows:
        raise ValueError(f"{op}: conv expected [N, L, C] with C = {C} and L >= {rows} (W - 1"
                         f"{' + tokens' if keep == 'all' else ''}), got conv{list(conv.shape)}")
    if not jnp.issubdtype(conv.dtype, jnp.floating):
        raise ValueError(f"{op}: conv expected a float dtype, got {conv.dtype}")
    B = M // tokens
    if slots.ndim != 1 or slots.dtype != jnp.int32 or slots.shape[0] != B:
        raise ValueError(f"{op}: slots expected int32 [B] = [{B}] (x's rows / tokens), got "
                         f"{slots.dtype}{list(slots.shape)}")
