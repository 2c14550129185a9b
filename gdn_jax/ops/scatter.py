"""Writes into slot-indexed buffers (the caches' conv windows, KV positions, replay candidates):
`buf.at[slot, pos].set(x, mode="drop")`, by the row-copy kernel `gdn_jax.kernels.scatter_rows` on
a GPU, XLA's scatter elsewhere (below).

    buf = write_slots(buf, scatter, x)            # buf[scatter[b]] = x[b]
    buf = write_positions(buf, scatter, x, pos)   # buf[scatter[b], pos[b, t]] = x[b, t]

`scatter` [B] int32 is `slot_index`'s scatter index: padding rows hold num_slots (out of range)
and write nothing; so does a position outside [0, L). Indices must be distinct (a slot appears
once per call). x is cast to buf's dtype.

XLA's GPU scatter spends a thread and its index arithmetic on every element: on an H200 a B = 32
conv window write (3.7 MB) takes 16 us, about 8x the copy, and the caches' scatters add up to
~1.4 ms of a 48-layer B = 32 verify step. The kernel copies each row as one vector; measured in
that step (bench/results/profile_step-h200-b32-scatter-2026-12-01.json, kernel time) it takes
verify from 8.75 to 7.84 ms, the speculative round from 9.89 to 8.98 ms and decode from 5.16 to
5.03 ms. So it is the default where it compiles (`GDN_JAX_SCATTER` unset or "auto": an SM80+ GPU
with Triton); "xla" keeps XLA's scatter, "pallas" is "auto" spelled out, "interpret" runs the
kernel in the interpreter, for tests. Unset, GDN_JAX_BACKEND=xla or =interpret steers it as it
steers the ops. Rows too short for a block always go to XLA. The variable is read when a program
is traced.

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
from gdn_jax.ops.dispatch import kernel_mode

ENV_VAR = "GDN_JAX_SCATTER"
_MIN_BLOCK = 64  # below this the rows are short enough for XLA's scatter
_MAX_BLOCK = 2048


def write_slots(buf, scatter, x):
    """buf [S, *row], scatter [B] int32, x [B, *row] -> buf with buf[scatter[b]] = x[b] (module
    docstring)."""
    x = x.astype(buf.dtype)
    S = buf.shape[0]
    R = math.prod(buf.shape[1:])
    mode = _mode(R)
    if mode is None:  # a negative index would wrap around: send it out of range too
        return buf.at[jnp.where(scatter < 0, S, scatter)].set(x, mode="drop")
    index = jnp.where((scatter >= 0) & (scatter < S), scatter, -1).astype(jnp.int32)
    out = _scatter(buf.reshape(S, R), index, x.reshape(-1, R), mode)
    return out.reshape(buf.shape)


def write_positions(buf, scatter, x, pos=None):
    """buf [S, L, *row], scatter [B] int32, x [B, T, *row], pos [B, T] int32 (None: 0..T-1) ->
    buf with buf[scatter[b], pos[b, t]] = x[b, t] (module docstring)."""
    B, T = x.shape[:2]
    x = x.astype(buf.dtype)
    S, L = buf.shape[:2]
    R = math.prod(buf.shape[2:])
    mode = _mode(R)
    if mode is None:  # negative indices would wrap around: send them out of range too
        scatter = jnp.where(scatter < 0, S, scatter)
        if pos is None:
            return buf.at[scatter, :T].set(x, mode="drop")
        return buf.at[scatter[:, None], jnp.where(pos < 0, L, pos)].set(x, mode="drop")
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    ok = (scatter[:, None] >= 0) & (scatter[:, None] < S) & (pos >= 0) & (pos < L)
    index = jnp.where(ok, scatter[:, None] * L + pos, -1).astype(jnp.int32).reshape(-1)
    out = _scatter(buf.reshape(S * L, R), index, x.reshape(B * T, R), mode)
    return out.reshape(buf.shape)


def _block(R: int) -> int:
    block = _MAX_BLOCK
    while block >= _MIN_BLOCK and R % block:
        block //= 2
    return block


def _mode(R: int) -> str | None:
    """"compiled" or "interpret" where the kernel is asked for and takes rows of R elements,
    else None (XLA)."""
    mode = kernel_mode(ENV_VAR)
    return mode if _block(R) >= _MIN_BLOCK else None


def _scatter(table, index, rows, mode):
    config = kernels.ScatterConfig(block=_block(table.shape[1]))
    return kernels.scatter_rows(table, index, rows, config=config,
                                interpret=mode == "interpret")
