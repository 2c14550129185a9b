"""The GDN ops on a slot-indexed state pool: one contract for every backend (DESIGN.md, "The op API").

Every op checks its arguments (shapes, dtypes, and slot/count values where concrete) and raises a
ValueError before anything runs, then calls a jitted implementation. This module holds the XLA
reference implementation; kernels plug in behind the same signatures.

Slots: row i works on `state.pool[slots[i]]`. A slot that is negative or >= num_slots makes row i
padding: nothing is read or written for it and its outputs are zeros.

Call the ops from your own `jax.jit` with the state donated, so the pool is updated in place:

    step = jax.jit(gdn_jax.ops.decode, donate_argnames="state")
    o, state = step(q, k, v, a, b, A_log, dt_bias, state, slots)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gdn_jax.ops import _checks, reference
from gdn_jax.ops.state import GDNState

_F32 = jnp.float32
MODES = ("replay", "intermediate")
BACKENDS = ("auto", "xla")


def _resolve_backend(op: str, backend: str | None) -> str:
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend expected one of {BACKENDS}, got {backend!r}")
    return "xla"


def _check_mode(op: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: mode expected one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# Slot plumbing shared by every op


def _slot_index(slots, num_slots: int):
    """(gather index clipped into range, valid mask [B], scatter index: invalid rows -> num_slots).

    The scatter index of a padding row is out of bounds, so `.at[...].set(..., mode="drop")`
    drops it. (A negative index would wrap around instead, hence the explicit mapping.)
    """
    slots = slots.astype(jnp.int32)
    valid = (slots >= 0) & (slots < num_slots)
    return jnp.clip(slots, 0, num_slots - 1), valid, jnp.where(valid, slots, num_slots)


def _rows(valid, x):
    """Zero the rows of x (leading axis B) whose slot is padding."""
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _folded_state(state: GDNState, gather):
    """The fp32 state of each row's slot with its pending (accepted, unfolded) candidates applied."""
    S = state.pool[gather].astype(_F32)  # [B, HV, V, K]
    pending = jnp.arange(state.t_max)[None, :] < state.count[gather][:, None]  # [B, T_max]
    g = jnp.where(pending[..., None], state.cand_g[gather], 0.0)
    beta = jnp.where(pending[..., None], state.cand_beta[gather], 0.0)
    k = reference.prepare_k(state.cand_k[gather], state.pool.shape[1])
    _, S, _ = reference.recurrence(None, k, state.cand_v[gather], g, beta, S)
    return S


def _store(state: GDNState, scatter, S):
    """Write each row's final fp32 state into its slot (rounded once) and clear its count."""
    return state.replace(
        pool=state.pool.at[scatter].set(S.astype(state.pool.dtype), mode="drop"),
        count=state.count.at[scatter].set(0, mode="drop"),
    )


# ----------------------------------------------------------------------------------------------
# XLA implementations (jitted; arguments already checked)


@jax.jit
def _decode_xla(q, k, v, a, b, A_log, dt_bias, state, slots):
    gather, valid, scatter = _slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    qp, kp = reference.prepare_qk(q, k, v.shape[2])
    o, S, _ = reference.recurrence(qp, kp, v, g, beta, S0)
    return _rows(valid, o.astype(q.dtype)), _store(state, scatter, S)


@functools.partial(jax.jit, static_argnames="mode")
def _verify_xla(q, k, v, a, b, A_log, dt_bias, state, slots, mode):
    gather, valid, scatter = _slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    qp, kp = reference.prepare_qk(q, k, v.shape[2])
    o, _, states = reference.recurrence(qp, kp, v, g, beta, S0,
                                        return_states=mode == "intermediate")
    o = _rows(valid, o.astype(q.dtype))
    if mode == "intermediate":
        return o, state, _rows(valid, states.astype(state.pool.dtype))
    # replay: the pool takes the folded state; this call's tokens become the new candidates.
    # Positions T..T_max get g = beta = 0 (identity steps), so no stale token can be folded.
    T, pad = q.shape[1], state.t_max - q.shape[1]
    padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    state = _store(state, scatter, S0)
    state = state.replace(
        cand_k=state.cand_k.at[scatter, :T].set(k.astype(state.cand_k.dtype), mode="drop"),
        cand_v=state.cand_v.at[scatter, :T].set(v.astype(state.cand_v.dtype), mode="drop"),
        cand_g=state.cand_g.at[scatter].set(padded(g), mode="drop"),
        cand_beta=state.cand_beta.at[scatter].set(padded(beta), mode="drop"),
    )
    return o, state, None


@jax.jit
def _commit_intermediate_xla(state, slots, num_accepted, inter):
    _, valid, scatter = _slot_index(slots, state.num_slots)
    n = num_accepted.astype(jnp.int32)
    write = valid & (n >= 1) & (n <= inter.shape[1])
    scatter = jnp.where(write, scatter, state.num_slots)
    pick = jnp.clip(n - 1, 0, inter.shape[1] - 1)
    chosen = inter[jnp.arange(inter.shape[0]), pick]  # [B, HV, V, K]
    return state.replace(
        pool=state.pool.at[scatter].set(chosen.astype(state.pool.dtype), mode="drop"),
        count=state.count.at[scatter].set(0, mode="drop"),
    )


@jax.jit
def _commit_replay_xla(state, slots, num_accepted):
    _, valid, scatter = _slot_index(slots, state.num_slots)
    n = jnp.clip(num_accepted.astype(jnp.int32), 0, state.t_max)
    return state.replace(count=state.count.at[scatter].set(n, mode="drop"))


@jax.jit
def _flush_xla(state, slots):
    gather, _, scatter = _slot_index(slots, state.num_slots)
    return _store(state, scatter, _folded_state(state, gather))


@jax.jit
def _reset_xla(state, slots):
    _, _, scatter = _slot_index(slots, state.num_slots)
    zeros = jnp.zeros((slots.shape[0],) + state.pool.shape[1:], state.pool.dtype)
    return state.replace(
        pool=state.pool.at[scatter].set(zeros, mode="drop"),
        count=state.count.at[scatter].set(0, mode="drop"),
    )


@jax.jit
def _prefill_xla(q, k, v, a, b, A_log, dt_bias, state, slots, lengths):
    gather, valid, scatter = _slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    S0 = _folded_state(state, gather)
    o, S = reference.chunk_gated_delta_rule(q, k, v, g, beta, S0, lengths=lengths)
    return _rows(valid, o.astype(q.dtype)), _store(state, scatter, S)


# ----------------------------------------------------------------------------------------------
# Public ops


def decode(q, k, v, a, b, A_log, dt_bias, state: GDNState, slots, *, backend: str | None = None):
    """One token per row: fold the slot's pending candidates, run the token, write the pool once.

    q, k: [B, 1, H, K]; v: [B, 1, HV, V] (bf16, fp16 or fp32, one dtype); a, b: [B, 1, HV];
    A_log, dt_bias: [HV]; state: GDNState; slots: [B] int32 (negative or >= num_slots: padding).
    Returns o: [B, 1, HV, V] in q's dtype, and the new state (count := 0 for the rows' slots).

    >>> step = jax.jit(decode, donate_argnames="state")
    >>> o, state = step(q, k, v, a, b, A_log, dt_bias, state, slots)  # doctest: +SKIP
    """
    slots = jnp.asarray(slots)
    _checks.check_tokens("decode", q, k, v, a, b, A_log, dt_bias, state, slots, t_min=1, t_max=1)
    _resolve_backend("decode", backend)
    return _decode_xla(q, k, v, a, b, A_log, dt_bias, state, slots)


def verify(q, k, v, a, b, A_log, dt_bias, state: GDNState, slots, *, mode: str = "replay",
           backend: str | None = None):
    """T tokens per row from the slot's state (MTP verify): the outputs of every token.

    Inputs as `decode` with T in 1..state.t_max. Returns (o, state, inter):
      o: [B, T, HV, V] in q's dtype;
      mode="replay": the pool takes the slot's folded state (one write) and this call's T tokens
        become the slot's candidates with count := 0; `commit` then says how many are kept.
        inter is None.
      mode="intermediate": state is returned unchanged (pool untouched) and
        inter: [B, T, HV, V, K] in the pool's dtype holds the state after each token;
        `commit(state, slots, num_accepted, inter)` copies the accepted one into the pool.
    Padding rows get zero o and zero inter.
    """
    _check_mode("verify", mode)
    slots = jnp.asarray(slots)
    _checks.check_tokens("verify", q, k, v, a, b, A_log, dt_bias, state, slots, t_min=1,
                         t_max=state.t_max if isinstance(state, GDNState) else None)
    if mode == "replay" and k.dtype != state.input_dtype:
        _checks.fail("verify", "k, v", f"the state's input dtype {state.input_dtype} (replay mode "
                     "stores them as candidates; set GDNState.create(input_dtype=...))", k.dtype)
    _resolve_backend("verify", backend)
    return _verify_xla(q, k, v, a, b, A_log, dt_bias, state, slots, mode=mode)


def commit(state: GDNState, slots, num_accepted, inter=None, *, backend: str | None = None):
    """Keep the first num_accepted[i] tokens (a count, 0..T) of row i's last verify call.

    inter given (intermediate mode): pool[slots[i]] := inter[i, n - 1] for rows with n >= 1.
    inter None (replay mode): count[slots[i]] := n; the next op on the slot folds them in.
    slots, num_accepted: [B] int32. (sglang and FlashInfer pass the index n - 1: add one.)
    """
    _checks.check_state("commit", state)
    slots, num_accepted = jnp.asarray(slots), jnp.asarray(num_accepted)
    if inter is None:
        B = _checks.batch_size("commit", slots)
        _checks.check_slots("commit", slots, B, state.num_slots)
        _checks.check_counts("commit", "num_accepted", num_accepted, B, 0, state.t_max)
        _resolve_backend("commit", backend)
        return _commit_replay_xla(state, slots, num_accepted)
    S, HV, V, K = state.pool.shape
    if inter.ndim != 5 or inter.shape[2:] != (HV, V, K):
        _checks.fail("commit", "inter", f"shape [B, T, HV, V, K] with (HV, V, K) = {(HV, V, K)}",
                     f"shape {inter.shape}")
    if inter.dtype != state.pool.dtype:
        _checks.fail("commit", "inter", f"the pool's dtype {state.pool.dtype}", inter.dtype)
    B, T = inter.shape[:2]
    _checks.check_slots("commit", slots, B, state.num_slots)
    _checks.check_counts("commit", "num_accepted", num_accepted, B, 0, T)
    _resolve_backend("commit", backend)
    return _commit_intermediate_xla(state, slots, num_accepted, inter)


def flush(state: GDNState, slots, *, backend: str | None = None):
    """Fold the slots' pending candidates into the pool; count := 0. slots: [B] int32."""
    _checks.check_state("flush", state)
    slots = jnp.asarray(slots)
    _checks.check_slots("flush", slots, _checks.batch_size("flush", slots), state.num_slots)
    _resolve_backend("flush", backend)
    return _flush_xla(state, slots)


def reset(state: GDNState, slots):
    """Zero the slots' pool entries and counts, for slots handed to new sequences."""
    _checks.check_state("reset", state)
    slots = jnp.asarray(slots)
    _checks.check_slots("reset", slots, _checks.batch_size("reset", slots), state.num_slots)
    return _reset_xla(state, slots)


def prefill(q, k, v, a, b, A_log, dt_bias, state: GDNState, slots, lengths=None, *,
            backend: str | None = None):
    """A prompt per row, in the chunked form (chunk 64), from the slot's state.

    Inputs as `decode` with any T >= 1; lengths: [B] int32 in 0..T (None: all T), row i uses its
    first lengths[i] tokens and its padded positions never touch the state (their o is zero).
    Starts from pool[slot] with pending candidates folded; writes the final state; count := 0.
    Returns (o [B, T, HV, V] in q's dtype, state).
    """
    slots = jnp.asarray(slots)
    dims = _checks.check_tokens("prefill", q, k, v, a, b, A_log, dt_bias, state, slots)
    if lengths is None:
        lengths = jnp.full((dims.B,), dims.T, jnp.int32)
    lengths = jnp.asarray(lengths)
    _checks.check_counts("prefill", "lengths", lengths, dims.B, 0, dims.T)
    _resolve_backend("prefill", backend)
    return _prefill_xla(q, k, v, a, b, A_log, dt_bias, state, slots, lengths)
