"""Slot plumbing shared by every backend: gather/scatter indices, padding rows, count and candidates.

A slot that is negative or >= num_slots makes its row padding. Gathers read a clipped (harmless)
index; scatters send padding rows to index num_slots, out of bounds, which `mode="drop"` drops
(a negative index would wrap around instead, hence the explicit mapping).
"""

from __future__ import annotations

import jax.numpy as jnp

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
    pool = state.pool.at[scatter].set(S.astype(state.pool.dtype), mode="drop")
    return clear_count(state.replace(pool=pool), scatter)


def store_candidates(state: GDNState, scatter, k, v, g, beta) -> GDNState:
    """This verify call's T tokens become each row's slot's replay candidates.

    k: [B, T, H, K]; v: [B, T, HV, V] (stored in the state's input dtype); g, beta: [B, T, HV]
    fp32. Positions T..T_max get g = beta = 0, an exact identity step, so a count past T can never
    fold a stale token.
    """
    T, pad = k.shape[1], state.t_max - k.shape[1]
    padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return state.replace(
        cand_k=state.cand_k.at[scatter, :T].set(k.astype(state.cand_k.dtype), mode="drop"),
        cand_v=state.cand_v.at[scatter, :T].set(v.astype(state.cand_v.dtype), mode="drop"),
        cand_g=state.cand_g.at[scatter].set(padded(g), mode="drop"),
        cand_beta=state.cand_beta.at[scatter].set(padded(beta), mode="drop"),
    )
