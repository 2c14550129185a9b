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

from gdn_jax.ops import _checks, _xla, dispatch
from gdn_jax.ops.state import GDNState

MODES = ("replay", "intermediate")


def _backend(op: str, backend: str | None, T: int = 1, K: int | None = None,
             V: int | None = None, B: int | None = None, mode: str | None = None,
             fits=None):
    """The implementation module for this call: `_xla`, or `_pallas` with its flags."""
    choice = dispatch.select(op, T=T, K=K, V=V, B=B, mode=mode, backend=backend, fits=fits)
    if choice.backend == "xla":
        return _xla, {}
    from gdn_jax.ops import _pallas  # the kernels are imported only where they run
    kw = {"interpret": choice.backend == "interpret"}
    if choice.backend == "mosaic":  # decode and verify (dispatch.MOSAIC_OPS)
        kw["mosaic"] = True
    return _pallas, kw


def _mosaic_fits(op: str, mode: str | None, q, v, state):
    """`fits=` for dispatch.select: the Mosaic GPU kernel takes this call's whole shape."""
    def fits(name):
        if name != "mosaic":
            return None
        from gdn_jax.ops import _pallas  # only where Mosaic GPU can run at all
        return _pallas.mosaic_misfit(op, mode, q, v, state)
    return fits


def _check_mode(op: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: mode expected one of {MODES}, got {mode!r}")


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
    impl, kw = _backend("decode", backend, K=q.shape[-1], V=v.shape[-1], B=q.shape[0],
                        fits=_mosaic_fits("decode", None, q, v, state))
    return impl.decode(q, k, v, a, b, A_log, dt_bias, state, slots, **kw)


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
    impl, kw = _backend("verify", backend, T=q.shape[1], K=q.shape[-1], V=v.shape[-1],
                        B=q.shape[0], mode=mode, fits=_mosaic_fits("verify", mode, q, v, state))
    return impl.verify(q, k, v, a, b, A_log, dt_bias, state, slots, mode=mode, **kw)


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
        dispatch.select("commit", backend=backend)
        return _xla.commit_replay(state, slots, num_accepted)
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
    """Fold the slots' pending candidates into the pool; count := 0. slots: [B] int32."""
    _checks.check_state("flush", state)
    slots = jnp.asarray(slots)
    _checks.check_slots("flush", slots, _checks.batch_size("flush", slots), state.num_slots)
    impl, kw = _backend("flush", backend, K=state.pool.shape[3], V=state.pool.shape[2])
    return impl.flush(state, slots, **kw)


def reset(state: GDNState, slots):
    """Zero the slots' pool entries and counts, for slots handed to new sequences."""
    _checks.check_state("reset", state)
    slots = jnp.asarray(slots)
    _checks.check_slots("reset", slots, _checks.batch_size("reset", slots), state.num_slots)
    return _xla.reset(state, slots)


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
