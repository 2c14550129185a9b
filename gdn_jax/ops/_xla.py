"""The XLA implementation of every op (the reference path): jitted, arguments already checked.

Runs anywhere; compute in fp32, matrix products at Precision.HIGHEST (see `reference`). The
slot writes go through `gdn_jax.ops.scatter` (the row-copy kernel on an SM80+ GPU unless
GDN_JAX_SCATTER or GDN_JAX_BACKEND says xla).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gdn_jax.ops import reference
from gdn_jax.ops._slots import (clear_count, ring_start, set_ring_count, slot_index,
                                store_candidates, store_ring, store_state, zero_padding_rows)
from gdn_jax.ops.state import GDNState

_F32 = jnp.float32


def _folded_state(state: GDNState, gather):
    """The fp32 state of each row's slot with its pending (accepted, unfolded) candidates applied
    (ring mode: the committed ring tokens, through their corrected values u)."""
    S = state.pool[gather].astype(_F32)  # [B, HV, V, K]
    pending = jnp.arange(state.ring_size)[None, :] < state.count[gather][:, None]  # [B, W]
    g = jnp.where(pending[..., None], state.cand_g[gather], 0.0)
    k = reference.prepare_k(state.cand_k[gather], state.pool.shape[1])
    if state.commit_mode == "ring":
        # S_W = exp(G_W) S + sum_j exp(G_W - G_j) u_j k_j^T, token by token in that order
        u = jnp.where(pending[..., None, None], state.cand_v[gather], 0.0)

        def step(S, x):
            k_t, u_t, g_t = x
            return S * jnp.exp(g_t)[..., None, None] + u_t[..., :, None] * k_t[..., None, :], None

        time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
        return lax.scan(step, S, (time_major(k), time_major(u), time_major(g)))[0]
    beta = jnp.where(pending[..., None], state.cand_beta[gather], 0.0)
    _, S, _ = reference.recurrence(None, k, state.cand_v[gather], g, beta, S)
    return S


@jax.jit
def decode(q, k, v, a, b, A_log, dt_bias, state, slots):
    gather, valid, scatter = slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    qp, kp = reference.prepare_qk(q, k, v.shape[2])
    o, S, _ = reference.recurrence(qp, kp, v, g, beta, S0)
    return zero_padding_rows(valid, o.astype(q.dtype)), store_state(state, scatter, S)


@functools.partial(jax.jit, static_argnames="mode")
def verify(q, k, v, a, b, A_log, dt_bias, state, slots, mode):
    gather, valid, scatter = slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    qp, kp = reference.prepare_qk(q, k, v.shape[2])
    o, _, states = reference.recurrence(qp, kp, v, g, beta, S0,
                                        return_states=mode == "intermediate")
    o = zero_padding_rows(valid, o.astype(q.dtype))
    if mode == "intermediate":
        return o, state, zero_padding_rows(valid, states.astype(state.pool.dtype))
    # replay: the pool takes the folded state; this call's tokens become the new candidates
    state = store_candidates(store_state(state, scatter, S0), scatter, k, v,
                             (a, b, A_log, dt_bias))
    return o, state, None


@functools.partial(jax.jit, static_argnames="reserve")
def ring(q, k, v, a, b, A_log, dt_bias, state, slots, reserve):
    """Ring mode, decode (reserve 1: the token is committed) and verify (reserve T_max)."""
    gather, valid, scatter = slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    qp, kp = reference.prepare_qk(q, k, v.shape[2])
    o, _, u = reference.recurrence(qp, kp, v, g, beta, S0, return_deltas=True)
    fold, start = ring_start(state, gather, valid, reserve)
    pool = state.pool.at[jnp.where(fold, scatter, state.num_slots)].set(
        S0.astype(state.pool.dtype), mode="drop")
    u = zero_padding_rows(valid, u)
    state = store_ring(state.replace(pool=pool), scatter, start, k, u, (a, b, A_log, dt_bias),
                       reserve)
    return zero_padding_rows(valid, o.astype(q.dtype)), set_ring_count(state, scatter, start,
                                                                       reserve == 1)


@jax.jit
def commit_ring(state, slots, num_accepted):
    _, _, scatter = slot_index(slots, state.num_slots)
    n = jnp.clip(num_accepted.astype(jnp.int32), 0, state.t_max)
    count = jnp.minimum(state.count.at[scatter].add(n, mode="drop"), state.ring_size)
    return state.replace(count=count)


@jax.jit
def commit_intermediate(state, slots, num_accepted, inter):
    _, valid, scatter = slot_index(slots, state.num_slots)
    n = num_accepted.astype(jnp.int32)
    write = valid & (n >= 1) & (n <= inter.shape[1])  # anything else (under jit) writes nothing
    scatter = jnp.where(write, scatter, state.num_slots)
    chosen = inter[jnp.arange(inter.shape[0]), jnp.clip(n - 1, 0, inter.shape[1] - 1)]
    pool = state.pool.at[scatter].set(chosen.astype(state.pool.dtype), mode="drop")
    return clear_count(state.replace(pool=pool), scatter)


@jax.jit
def commit_replay(state, slots, num_accepted):
    _, _, scatter = slot_index(slots, state.num_slots)
    n = jnp.clip(num_accepted.astype(jnp.int32), 0, state.t_max)
    return state.replace(count=state.count.at[scatter].set(n, mode="drop"))


@jax.jit
def flush(state, slots):
    gather, _, scatter = slot_index(slots, state.num_slots)
    return store_state(state, scatter, _folded_state(state, gather))


@jax.jit
def reset(state, slots):
    _, _, scatter = slot_index(slots, state.num_slots)
    zeros = jnp.zeros((slots.shape[0],) + state.pool.shape[1:], _F32)
    return store_state(state, scatter, zeros)


@jax.jit
def prefill(q, k, v, a, b, A_log, dt_bias, state, slots, lengths):
    gather, valid, scatter = slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    o, S = reference.chunk_gated_delta_rule(q, k, v, g, beta, S0, lengths=lengths)
    return zero_padding_rows(valid, o.astype(q.dtype)), store_state(state, scatter, S)
