"""The GDN ops on a slot-indexed state pool: one contract for every backend (README, "The ops").

Every op checks its arguments (shapes, dtypes, and slot/count values where concrete) and raises a
ValueError before anything runs, then calls the jitted implementation `dispatch` picks for the
device: `_xla` (the reference path) or `_pallas` (the kernels of `gdn_jax.kernels`).

Slots: row i works on `state.pool[slots[i]]`. A slot that is negative or >= num_slots makes row i
padding: nothing is read or written for it and its outputs are zeros.

Call the ops from your own `jax.jit` with the state donated, so the pool is updated in place:

    step = jax.jit(gdn_jax.ops.decode, donate_argnames="state")
    o, state = step(q, k, v, a, b, A_log, dt_bias, state, slots)
"""

from __future__ import annotations

import jax.numpy as jnp

from gdn_jax import kernels
from gdn_jax.ops import _checks, _xla, dispatch
from gdn_jax.ops.state import COMMIT_MODES, GDNState

def _run(op: str, choice: dispatch.Choice, *args, **kwargs):
    """Run `op` on the implementation `choice` names: `_xla`, or `_pallas` with the choice."""
    if choice.backend == "xla":
        return getattr(_xla, op)(*args, **kwargs)
    from gdn_jax.ops import _pallas  # the kernel paths are imported only where they run
    return getattr(_pallas, op)(*args, choice=choice, **kwargs)


def _dtypes(q, state: GDNState) -> kernels.Dtypes:
    return kernels.Dtypes.of(q, state.pool, state.cand_k, state.cand_v)


def _verify_mode(state, mode: str | None) -> str:
    """The mode a verify runs in: the state's commit mode unless given. replay and intermediate
    share one state layout and may be chosen per call; a ring state runs only in ring mode."""
    if mode is not None and mode not in COMMIT_MODES:
        raise ValueError(f"verify: mode expected one of {COMMIT_MODES}, got {mode!r}")
    if not isinstance(state, GDNState):
        return mode or "replay"  # check_tokens names the bad state
    if mode is None:
        return state.commit_mode
    if (mode == "ring") != (state.commit_mode == "ring"):
        raise ValueError(f"verify: mode expected the state's commit mode "
                         f"{state.commit_mode!r} (GDNState.create(commit_mode=...)), got {mode!r}")
    return mode


def _ring(op, q, k, v, a, b, A_log, dt_bias, state, slots, dims, backend, reserve):
    """decode and verify on a ring-mode state: one path, `reserve` ring entries per call."""
    if k.dtype != state.input_dtype or v.dtype != state.input_dtype:
        _checks.fail(op, "k, v", f"the state's input dtype {state.input_dtype} (ring mode keeps "
                     "k in the ring; set GDNState.create(input_dtype=...))",
                     f"{k.dtype}, {v.dtype}")
    # the kernels' t_max in ring mode is the ring's size W (their candidate buffers' length)
    choice = dispatch.select(op, dims=dims._replace(t_max=state.ring_size),
                             dtypes=_dtypes(q, state), mode="ring", backend=backend)
    if choice.backend == "xla":
        return _xla.ring(q, k, v, a, b, A_log, dt_bias, state, slots, reserve=reserve)
    from gdn_jax.ops import _pallas
    return _pallas.ring(q, k, v, a, b, A_log, dt_bias, state, slots, reserve=reserve,
                        choice=choice)


# ----------------------------------------------------------------------------------------------
# Public ops


def decode(q, k, v, a, b, A_log, dt_bias, state: GDNState, slots, *, backend: str | None = None):
    """One token per row: fold the slot's pending candidates, run the token, write the pool once.

    q, k: [B, 1, H, K]; v: [B, 1, HV, V] (bf16, fp16 or fp32, one dtype); a, b: [B, 1, HV];
    A_log, dt_bias: [HV]; state: GDNState; slots: [B] int32 (negative or >= num_slots: padding).
    Returns o: [B, 1, HV, V] in q's dtype, and the new state (count := 0 for the rows' slots).
    On a ring-mode state decode is output-only: the token runs after the ring's committed ones
    and is appended to the ring, committed (count += 1); the pool is written only when the ring
    is full (the committed tokens are folded first, count := 1).

    >>> step = jax.jit(decode, donate_argnames="state")
    >>> o, state = step(q, k, v, a, b, A_log, dt_bias, state, slots)  # doctest: +SKIP
    """
    slots = jnp.asarray(slots)
    dims = _checks.check_tokens("decode", q, k, v, a, b, A_log, dt_bias, state, slots, t_min=1,
                                t_max=1)
    if state.commit_mode == "ring":
        return _ring("decode", q, k, v, a, b, A_log, dt_bias, state, slots, dims, backend, 1)
    choice = dispatch.select("decode", dims=dims, dtypes=_dtypes(q, state), backend=backend)
    return _run("decode", choice, q, k, v, a, b, A_log, dt_bias, state, slots)


def verify(q, k, v, a, b, A_log, dt_bias, state: GDNState, slots, *, mode: str | None = None,
           backend: str | None = None):
    """T tokens per row from the slot's state (MTP verify): the outputs of every token.

    Inputs as `decode` with T in 1..state.t_max. mode: the state's commit mode by default.
    Returns (o, state, inter):
      o: [B, T, HV, V] in q's dtype;
      mode="replay": the pool takes the slot's folded state (one write) and this call's T tokens
        become the slot's candidates with count := 0; `commit` then says how many are kept.
        inter is None.
      mode="intermediate": state is returned unchanged (pool untouched) and
        inter: [B, T, HV, V, K] in the pool's dtype holds the state after each token;
        `commit(state, slots, num_accepted, inter)` copies the accepted one into the pool.
      mode="ring": the pool is read, not written (unless the ring folds: where count + T_max
        would pass the ring size W, the committed ring tokens are folded into the pool first);
        this call's tokens are appended to the ring after the committed ones, and `commit` keeps
        num_accepted of them (count += n). inter is None.
    Padding rows get zero o and zero inter.
    """
    mode = _verify_mode(state, mode)
    slots = jnp.asarray(slots)
    dims = _checks.check_tokens("verify", q, k, v, a, b, A_log, dt_bias, state, slots, t_min=1,
                                t_max=state.t_max if isinstance(state, GDNState) else None)
    if mode == "ring":
        return (*_ring("verify", q, k, v, a, b, A_log, dt_bias, state, slots, dims, backend,
                       state.t_max), None)
    if mode == "replay" and k.dtype != state.input_dtype:
        _checks.fail("verify", "k, v", f"the state's input dtype {state.input_dtype} (replay mode "
                     "stores them as candidates; set GDNState.create(input_dtype=...))", k.dtype)
    choice = dispatch.select("verify", dims=dims, dtypes=_dtypes(q, state), mode=mode,
                             backend=backend)
    return _run("verify", choice, q, k, v, a, b, A_log, dt_bias, state, slots, mode=mode)


def commit(state: GDNState, slots, num_accepted, inter=None, *, backend: str | None = None):
    """Keep the first num_accepted[i] tokens (a count, 0..T) of row i's last verify call.

    inter given (intermediate mode): pool[slots[i]] := inter[i, n - 1] for rows with n >= 1.
    inter None (replay mode): count[slots[i]] := n; the next op on the slot folds them in.
    inter None (ring mode): count[slots[i]] += n; they stay in the ring until it folds.
    slots, num_accepted: [B] int32. (sglang and FlashInfer pass the index n - 1: add one.)
    """
    slots, num_accepted = jnp.asarray(slots), jnp.asarray(num_accepted)
    if inter is None:
        check_slot_args("commit", state, slots, num_accepted)
        dispatch.select("commit", backend=backend)
        if state.commit_mode == "ring":
            return _xla.commit_ring(state, slots, num_accepted)
        return _xla.commit_replay(state, slots, num_accepted)
    _checks.check_state("commit", state)
    if state.commit_mode == "ring":
        _checks.fail("commit", "inter", "None for a ring-mode state (its verify returns no inter)",
                     f"an array of shape {getattr(inter, 'shape', '?')}")
    S, HV, V, K = state.pool.shape
    if inter.ndim != 5 or inter.shape[2:] != (HV, V, K):
        _checks.fail("commit", "inter", f"shape [B, T, HV, V, K] with (HV, V, K) = {(HV, V, K)}",
                     f"shape {inter.shape}")
    if inter.dtype != state.pool.dtype:
        _checks.fail("commit", "inter", f"the pool's dtype {state.pool.dtype}", inter.dtype)
    B, T = inter.shape[:2]
    _checks.check_slots("commit", slots, B, state.num_slots)
    _checks.check_counts("commit", "num_accepted", num_accepted, B, 0, T)
    dispatch.select("commit", backend=backend)
    return _xla.commit_intermediate(state, slots, num_accepted, inter)


def flush(state: GDNState, slots, *, backend: str | None = None):
    """Fold the slots' pending candidates (ring mode: committed ring tokens) into the pool;
    count := 0. slots: [B] int32."""
    slots = jnp.asarray(slots)
    check_slot_args("flush", state, slots)
    choice = dispatch.select("flush", K=state.pool.shape[3], V=state.pool.shape[2],
                             B=slots.shape[0], backend=backend, dtypes=kernels.Dtypes(
                                 state.dtype, state.input_dtype, state.input_dtype))
    if state.commit_mode == "ring":  # a product of the ring's u (the fold kernel replays raw v)
        return _xla.flush(state, slots)
    return _run("flush", choice, state, slots)


def reset(state: GDNState, slots):
    """Zero the slots' pool entries and counts, for slots handed to new sequences."""
    slots = jnp.asarray(slots)
    check_slot_args("reset", state, slots)
    return _xla.reset(state, slots)


def check_slot_args(op: str, state: GDNState, slots, num_accepted=None) -> None:
    """The checks `commit` (replay and ring modes), `flush` and `reset` make before anything runs:
    the state, slots [B] int32 (distinct real slots), num_accepted [B] int32 in 0..t_max. Each
    raises a ValueError naming op and the argument; values are checked where concrete. Callers
    that run these ops per shard (`GatedDeltaNet.commit` on a mesh, where they see tracers) call
    it first on the whole arrays."""
    _checks.check_state(op, state)
    slots = jnp.asarray(slots)
    B = _checks.batch_size(op, slots)
    _checks.check_slots(op, slots, B, state.num_slots)
    if num_accepted is not None:
        _checks.check_counts(op, "num_accepted", jnp.asarray(num_accepted), B, 0, state.t_max)


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
    dispatch.select("prefill", T=dims.T, backend=backend)
    return _xla.prefill(q, k, v, a, b, A_log, dt_bias, state, slots, lengths)
