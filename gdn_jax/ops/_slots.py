"""Slot plumbing shared by every backend: gather/scatter indices, padding rows, count and candidates.

A slot that is negative or >= num_slots makes its row padding. Gathers read a clipped (harmless)
index; scatters send padding rows to index num_slots, out of bounds, which `mode="drop"` drops
(a negative index would wrap around instead, hence the explicit mapping).
"""

from __future__ import annotations

import jax.numpy as jnp

from gdn_jax.ops.scatter import write_positions_group, write_slots
from gdn_jax.ops.state import GDNState


def slot_index(slots, num_slots: int):
    """(gather index [B] clipped into range, valid [B] bool, scatter index [B]: padding ->
    num_slots). Scatter with `mode="drop"`: the out-of-range index of a padding row writes
    nothing."""
    slots = jnp.asarray(slots).astype(jnp.int32)
    valid = (slots >= 0) & (slots < num_slots)
    return jnp.clip(slots, 0, num_slots - 1), valid, jnp.where(valid, slots, num_slots)


def zero_padding_rows(valid, x):
    """Zero the rows of x (leading axis B) whose slot is padding."""
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def clear_count(state: GDNState, scatter) -> GDNState:
    """count := 0 for the rows' slots: their pending candidates are folded."""
    return state.replace(count=state.count.at[scatter].set(0, mode="drop"))


def store_state(state: GDNState, scatter, S) -> GDNState:
    """pool[slot] := S (fp32 [B, HV, V, K], rounded once to the pool's dtype); count := 0."""
    pool = write_slots(state.pool, scatter, S)
    return clear_count(state.replace(pool=pool), scatter)


def store_candidates(state: GDNState, scatter, k, v, gates) -> GDNState:
    """This verify call's T tokens become each row's slot's replay candidates.

    k: [B, T, H, K]; v: [B, T, HV, V] (stored in the state's input dtype); gates: (a, b, A_log,
    dt_bias) as the op took them, stored as fp32 g and beta [B, T, HV] (`reference.gating`, in
    the writes' launch where the row kernel runs). Positions T..T_max get g = beta = 0, an exact
    identity step, so a count past T can never fold a stale token (k = v = 0 there too: the four
    are written by one index, in one launch where the row kernel runs).
    """
    return _put_candidates(state, scatter, (k, v), gates, state.t_max)


def ring_start(state: GDNState, gather, valid, reserve: int):
    """Where each row's tokens go in its slot's ring, and whether the call folds first.

    Returns (fold [B] bool: count + reserve > W, the committed tokens are folded into the pool by
    this call; start [B] int32: 0 after a fold, else count)."""
    count = jnp.clip(state.count[gather], 0, state.ring_size)
    fold = valid & (count + reserve > state.ring_size)
    return fold, jnp.where(fold, 0, count)


def store_ring(state: GDNState, scatter, start, k, u, gates, reserve: int) -> GDNState:
    """Append a call's T tokens to each row's ring at [start, start + T); entries T..reserve - 1
    past them get g = beta = 0 and u = 0 (an exact identity step: a commit past T folds nothing
    stale).

    k: [B, T, H, K]; u: [B, T, HV, V] fp32, the corrected values, or None where the kernel has
    written them (`kernels.verify_ring`); gates: (a, b, A_log, dt_bias) as `store_candidates`;
    start: [B] int32 with start + reserve <= W (`ring_start`)."""
    n = max(reserve, k.shape[1])
    pos = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, n]
    return _put_candidates(state, scatter, (k, u), gates, n, pos)


def _put_candidates(state: GDNState, scatter, kv, gates, n: int, pos=None) -> GDNState:
    """cand_k, cand_v := kv (each [B, T, ...], zero-padded to n tokens; a None v leaves cand_v
    as it is) and cand_g, cand_beta := the gates of (a, b, A_log, dt_bias) (a and b padded with
    -inf: g = beta = 0) at positions pos ([B, n]; None: 0..n-1) of each row's slot, one index
    for them all."""
    a, b, A_log, dt_bias = gates

    def pad(x, fill=0):
        return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                       constant_values=fill)

    names = ("cand_k", "cand_v")[:1 + (kv[1] is not None)] + ("cand_g", "cand_beta")
    new = write_positions_group(
        tuple(getattr(state, name) for name in names), scatter,
        (*(pad(x) for x in kv if x is not None), pad(a, -jnp.inf), pad(b, -jnp.inf)), pos,
        gating=(A_log, dt_bias))
    return state.replace(**dict(zip(names, new)))


def set_ring_count(state: GDNState, scatter, start, decode: bool) -> GDNState:
    """count := start after a ring call: its tokens are candidates until `commit` (decode's one
    token is committed by the call itself: count := start + 1)."""
    return state.replace(count=state.count.at[scatter].set(start + int(decode), mode="drop"))
