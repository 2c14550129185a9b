"""GDN MTP verify: T (1..MAX_T = 16) tokens per row from the slot's state, in the two commit modes.

- `verify_intermediate`: the pool is only read; the state after every token goes to a
  batch-indexed buffer inter [B, T, HV, V, K] (FlashInfer's MTP contract).
- `verify_replay`: the slot's pending candidates are folded, the folded state is written back to
  the pool once (it is the state before this call's tokens), and the T tokens produce outputs.
  The caller stores this call's tokens as the slot's new candidates (in XLA: writing them here
  would race with other programs of the same row still reading the old ones).

Both fold the slot's pending candidates into the starting state first. Tokens are unrolled in
Python (static T), the state tile stays in fp32 registers across all of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as cm
from . import _recurrence as rec
from ._pallas import TuningConfig, pallas_call

_STATICS = ("config", "interpret")


def _intermediate_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref,
                         dt_bias_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref,
                         o_ref, inter_ref, *, num_slots, t_max, group, block_v, T):
    # pool_ref: [num_slots, HV, V, K] (read only); o_ref: [B, T, HV, V];
    # inter_ref: [B, T, HV, V, K] in the pool's dtype
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)

    @pl.when(r.valid)
    def _():
        S = cm.load_state(pool_ref, r)                      # [BV, K] fp32
        S = cm.fold_pending(S, pend, r, cm.pending_count(pend, r, t_max, num_slots))
        for t in range(T):
            q, k, v, g, beta = cm.load_token(tok, r, t)
            S = rec.update(S, k, v, g, beta)
            o_ref[r.b, t, r.hv, r.cols] = rec.readout(S, q).astype(o_ref.dtype)
            inter_ref[r.b, t, r.hv, r.cols, :] = S.astype(inter_ref.dtype)

    @pl.when(jnp.logical_not(r.valid))
    def _():  # padding row: zero outputs and zero intermediate states
        for t in range(T):
            o_ref[r.b, t, r.hv, r.cols] = jnp.zeros((block_v,), o_ref.dtype)
            inter_ref[r.b, t, r.hv, r.cols, :] = jnp.zeros(
                (block_v, inter_ref.shape[-1]), inter_ref.dtype)


def _replay_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref,
                   dt_bias_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref,
                   o_ref, pool_out_ref, *, num_slots, t_max, group, block_v, T):
    # pool_ref / pool_out_ref: [num_slots, HV, V, K], the same buffer (aliased); o_ref: [B, T, HV, V]
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)

    @pl.when(r.valid)
    def _():
        S = cm.load_state(pool_ref, r)                      # [BV, K] fp32
        n = cm.pending_count(pend, r, t_max, num_slots)
        S = cm.fold_pending(S, pend, r, n)

        # Nothing folded: the pool already holds S exactly (pool -> fp32 -> pool is exact).
        @pl.when(n > 0)
        def _():
            cm.store_state(pool_out_ref, r, S)

        for t in range(T):
            q, k, v, g, beta = cm.load_token(tok, r, t)
            S = rec.update(S, k, v, g, beta)
            o_ref[r.b, t, r.hv, r.cols] = rec.readout(S, q).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(r.valid))
    def _():
        for t in range(T):
            o_ref[r.b, t, r.hv, r.cols] = jnp.zeros((block_v,), o_ref.dtype)


def _verify_call(kernel, mode: str, dims: cm.Dims, config: TuningConfig, interpret: bool, *args):
    B, T, H, HV, K, V, N, t_max = dims
    q, pool = args[2], args[-1]  # args: (slots, count, q, ..., pool)
    o = jax.ShapeDtypeStruct((B, T, HV, V), q.dtype)
    if mode == "intermediate":
        out_shape = (o, jax.ShapeDtypeStruct((B, T, HV, V, K), pool.dtype))
        aliases = {}
    else:
        out_shape = (o, jax.ShapeDtypeStruct(pool.shape, pool.dtype))
        aliases = {len(args) - 1: 1}
    return pallas_call(
        functools.partial(kernel, num_slots=N, t_max=t_max, group=HV // H,
                          block_v=config.block_v, T=T),
        name=f"gdn_verify_{mode}_t{T}_bv{config.block_v}_w{config.num_warps}",
        config=config,
        interpret=interpret,
        grid=(B, HV, V // config.block_v),
        out_shape=out_shape,
        input_output_aliases=aliases,
    )(*args)


_ARGS_DOC = """
    Args:
      q, k:      [B, T, H, K] bf16 | fp16 | fp32, raw (l2norm and the K**-0.5 scale are fused);
                 T in 1..MAX_T (16).
      v:         [B, T, HV, V]; HV a multiple of H (GVA: value head hv reads key head
                 hv // (HV // H)).
      a, b:      [B, T, HV] raw gate inputs; A_log, dt_bias: [HV]. Fused in fp32:
                 g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b).
      pool:      [num_slots, HV, V, K] bf16 | fp32 (K contiguous).
      cand_k:    [num_slots, T_max, H, K] raw k of each slot's replay candidates.
      cand_v:    [num_slots, T_max, HV, V].
      cand_g, cand_beta: [num_slots, T_max, HV] fp32 (gating already applied).
      count:     [num_slots] int32: candidates t < count[slot] are accepted and still pending;
                 they are folded into the starting state (only read here).
      slots:     [B] int32: row i works on pool[slots[i]]. A slot < 0 or >= num_slots makes the
                 row padding: nothing read, nothing written to the pool, zero outputs. Real slots
                 must be distinct.
      config:    `TuningConfig` (block_v must divide V).
      interpret: run the Pallas interpreter (CPU tests).
"""


def _documented(summary: str, returns: str):
    def attach(fn):
        fn.__doc__ = summary + "\n" + _ARGS_DOC + returns
        return fn
    return attach


@functools.partial(jax.jit, static_argnames=_STATICS)
@_documented(
    "T verify tokens per row, keeping the state after each (pool untouched).",
    """
    Returns:
      o:     [B, T, HV, V] in q's dtype; o[i, t] = S_t q_t with S_t the state after token t.
      inter: [B, T, HV, V, K] in the pool's dtype; inter[i, t] = S_t, rounded once.
             Padding rows get zero o and zero inter.
    """)
def verify_intermediate(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                        count, slots, *, config: TuningConfig = TuningConfig(),
                        interpret: bool = False):
    dims = cm.check_tokens("verify_intermediate", q, k, v, a, b, A_log, dt_bias, pool, cand_k,
                           cand_v, cand_g, cand_beta, count, slots, t_lo=1, t_hi=cm.MAX_T)
    config.check_head_dim("verify_intermediate", dims.V)
    return _verify_call(_intermediate_kernel, "intermediate", dims, config, interpret, slots, count,
                        q, k, v, a, b, A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)


@functools.partial(jax.jit, static_argnames=_STATICS, donate_argnames=("pool",))
@_documented(
    "T verify tokens per row; the pool takes the slot's folded state (replay mode).",
    """
    The pool is donated and updated in place: pool[slot] := the folded state (the state BEFORE
    this call's tokens), written once and only where count[slot] > 0 (otherwise it already holds
    it exactly). The caller then stores this call's tokens as the slot's candidates and sets
    count[slot] := 0 (in XLA).

    Returns:
      o:    [B, T, HV, V] in q's dtype (zeros for padding rows).
      pool: the updated pool (same buffer when donated).
    """)
def verify_replay(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count,
                  slots, *, config: TuningConfig = TuningConfig(), interpret: bool = False):
    dims = cm.check_tokens("verify_replay", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v,
                           cand_g, cand_beta, count, slots, t_lo=1, t_hi=cm.MAX_T)
    config.check_head_dim("verify_replay", dims.V)
    return _verify_call(_replay_kernel, "replay", dims, config, interpret, slots, count, q, k, v,
                        a, b, A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)

