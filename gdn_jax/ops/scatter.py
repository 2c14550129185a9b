"""Writes into slot-indexed buffers (the caches' conv windows, KV positions, replay candidates):
`buf.at[slot, pos].set(x, mode="drop")`, by the row-copy kernel `gdn_jax.kernels.scatter_rows` on
a GPU, XLA's scatter elsewhere (below).

    buf = write_slots(buf, scatter, x)            # buf[scatter[b]] = x[b]
    buf = write_positions(buf, scatter, x, pos)   # buf[scatter[b], pos[b, t]] = x[b, t]
    k_buf, v_buf = write_positions_group((k_buf, v_buf), scatter, (k, v), pos)  # one launch
    bufs = shift_positions_group(bufs, scatter, starts, width)  # buf[scatter[b], :width] :=
                                                  # buf[scatter[b], starts[b]:][:width], each buf

`scatter` [B] int32 is `slot_index`'s scatter index: padding rows hold num_slots (out of range)
and write nothing; so does a position outside [0, L). Indices must be distinct (a slot appears
once per call). x is cast to buf's dtype (but a verify's raw a and b, whose gates
`write_positions_group(..., gating=)` stores).

XLA's GPU scatter spends a thread and its index arithmetic on every element: on an H200 a B = 32
conv window write (3.7 MB) takes 16 us, about 8x the copy, and the caches' scatters add up to
~1.4 ms of a 48-layer B = 32 verify step. The kernel copies each row as one vector; measured in
that step (bench/results/profile_step-h200-b32-scatter-2026-12-01.json, kernel time) it takes
verify from 8.75 to 7.84 ms, the speculative round from 9.89 to 8.98 ms and decode from 5.16 to
5.03 ms. So it is the default where it compiles (`GDN_JAX_SCATTER` unset or "auto": an SM80+ GPU
with Triton); "xla" keeps XLA's scatter, "pallas" is "auto" spelled out, "interpret" runs the
kernel in the interpreter, for tests. Unset, GDN_JAX_BACKEND=xla or =interpret steers it as it
steers the ops. A row that no block of >= 64 elements tiles goes to XLA, unless it rides along
in a group's launch (`write_positions_group`). The variable is read when a program is traced.

Under tensor parallelism the kernel has no partitioning rule: give it local arrays. The model
does (its layers write inside their `shard_map`, and `GatedDeltaNet.commit` / `reset` run per
shard given the layer's mesh); an op called on a head-sharded buffer outside a `shard_map`
(`gdn_jax.ops` on a sharded `GDNState`, `GatedDeltaNet.commit` without `mesh`) would have XLA
gather it: run those under `jax.shard_map`, or with GDN_JAX_SCATTER=xla.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from gdn_jax import kernels
from gdn_jax.ops import reference
from gdn_jax.ops.dispatch import kernel_mode

ENV_VAR = "GDN_JAX_SCATTER"
_MIN_BLOCK = 64  # below this the rows are short enough for XLA's scatter
_MAX_BLOCK = 2048


def write_slots(buf, scatter, x):
    """buf [S, *row], scatter [B] int32, x [B, *row] -> buf with buf[scatter[b]] = x[b] (module
    docstring): `write_positions` of one position per slot."""
    return write_positions_group((buf[:, None],), scatter, (x[:, None],))[0][:, 0]


def write_positions(buf, scatter, x, pos=None):
    """buf [S, L, *row], scatter [B] int32, x [B, T, *row], pos [B, T] int32 (None: 0..T-1) ->
    buf with buf[scatter[b], pos[b, t]] = x[b, t] (module docstring)."""
    return write_positions_group((buf,), scatter, (x,), pos)[0]


def write_positions_group(bufs, scatter, xs, pos=None, *, gating=None) -> tuple:
    """bufs: [S, L, *row_i] each (one S and L), xs: [B, T, *row_i] each (one B and T) -> the bufs
    with buf_i[scatter[b], pos[b, t]] = x_i[b, t], as `write_positions` writes each, the rows
    the kernel takes in one launch: a call's writes of one index (a verify's candidates, an
    attention layer's k and v). A row that no power-of-two block of >= 64 elements tiles (XLA
    alone) rides along where another row takes the kernel, if one of >= 16 does.

    gating: (A_log, dt_bias) [R] or None. Given, the last two bufs are fp32 g and beta [S, L, R]
    and their xs the raw a and b [B, T, R], stored as their gates (`reference.gating`; a = b =
    -inf store g = beta = 0, an identity step): computed in the kernel's launch where it takes
    those rows, by XLA before the writes otherwise."""
    bufs, xs = tuple(bufs), tuple(xs)
    B, T = xs[0].shape[:2]
    S, L = bufs[0].shape[:2]
    for i, (buf, x) in enumerate(zip(bufs, xs)):
        if buf.shape[:2] != (S, L) or x.shape[:2] != (B, T) or x.shape[2:] != buf.shape[2:]:
            raise ValueError(f"write_positions: bufs [S, L, *row] of one S, L and xs [B, T, *row] "
                             f"of one B, T expected, got bufs[{i}]{list(buf.shape)} (S, L = {S}, "
                             f"{L}) and xs[{i}]{list(x.shape)} (B, T = {B}, {T})")
    rows = [math.prod(buf.shape[2:]) for buf in bufs]
    take = []
    if any(_mode(R) for R in rows):  # the short rows ride along
        take = [i for i, R in enumerate(rows) if kernels.pow2_block(R, _MAX_BLOCK)]
    if gating is not None and len(bufs) - 1 not in take:  # XLA's gates, then plain writes
        xs = xs[:-2] + reference.gating(*xs[-2:], *gating)
        gating = None
    n = len(bufs) - 2 * (gating is not None)  # the gates' a and b keep their dtype
    xs = tuple(x.astype(buf.dtype) if i < n else x for i, (buf, x) in enumerate(zip(bufs, xs)))
    out = list(bufs)
    if take:
        if pos is None:
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
        ok = (scatter[:, None] >= 0) & (scatter[:, None] < S) & (pos >= 0) & (pos < L)
        index = jnp.where(ok, scatter[:, None] * L + pos, -1).astype(jnp.int32).reshape(-1)
        tables = kernels.scatter_rows_group(
            tuple(bufs[i].reshape(S * L, rows[i]) for i in take), index,
            tuple(xs[i].reshape(B * T, rows[i]) for i in take), gating=gating,
            config=kernels.ScatterConfig(block=_MAX_BLOCK),
            interpret=kernel_mode(ENV_VAR) == "interpret")
        for i, table in zip(take, tables):
            out[i] = table.reshape(bufs[i].shape)
    sc = jnp.where(scatter < 0, S, scatter)  # XLA: a negative index would wrap, send it out
    for i in (i for i in range(len(bufs)) if i not in take):
        if pos is None:
            out[i] = bufs[i].at[sc, :T].set(xs[i], mode="drop")
        else:
            out[i] = bufs[i].at[sc[:, None], jnp.where(pos < 0, L, pos)].set(xs[i], mode="drop")
    return tuple(out)


def shift_positions_group(bufs, scatter, starts, width: int) -> tuple:
    """bufs: [S, L, *row_i] each (one S and L), scatter [B] int32, starts [B] int32 in
    0..L - width -> the bufs with positions starts[b]..starts[b] + width - 1 of slot scatter[b]
    moved to its positions 0..width - 1: a commit's conv windows (the accepted count's W - 1
    rows), every GDN layer's. One launch of `kernels.shift_rows_group` that touches the moved
    rows alone where the kernel takes every row (>= 64 elements), else XLA's gather of the
    windows and `write_positions_group`. width 0 (a conv of width 1): the bufs as they are."""
    bufs = tuple(bufs)
    if width == 0:
        return bufs
    S, L = bufs[0].shape[:2]
    rows = [math.prod(buf.shape[2:]) for buf in bufs]
    modes = {_mode(R) for R in rows}
    if None not in modes:
        tables = kernels.shift_rows_group(
            tuple(buf.reshape(S, L, R) for buf, R in zip(bufs, rows)), scatter.astype(jnp.int32),
            starts.astype(jnp.int32), width=width, config=kernels.ScatterConfig(block=_MAX_BLOCK),
            interpret=modes == {"interpret"})
        return tuple(t.reshape(buf.shape) for t, buf in zip(tables, bufs))
    gather = jnp.clip(scatter, 0, S - 1)
    pos = starts[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [B, width]
    windows = tuple(buf[gather[:, None], pos] for buf in bufs)
    return write_positions_group(bufs, scatter, windows)


def _mode(R: int) -> str | None:
    """"compiled" or "interpret" where the kernel is asked for and takes rows of R elements,
    else None (XLA)."""
    mode = kernel_mode(ENV_VAR)
    block = kernels.pow2_block(R, _MAX_BLOCK) or 0
    return mode if block >= _MIN_BLOCK else None
