"""GDN decode: one token per row on a slot-indexed state pool, the pool updated in place.

kernel body `_decode_kernel` -> launcher `_decode_call` -> public `decode` (jitted, pool donated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as cm
from . import _recurrence as rec
from ._pallas import TuningConfig, pallas_call


def _decode_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref,
                   dt_bias_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref,
                   o_ref, pool_out_ref, *, num_slots, t_max, group, block_v):
    # pool_ref / pool_out_ref: [num_slots, HV, V, K], the same buffer (aliased)
    # o_ref: [B, 1, HV, V]
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)

    @pl.when(r.valid)
    def _():
        S = cm.load_state(pool_ref, r)                      # [BV, K] fp32
        S = cm.fold_pending(S, pend, r, cm.pending_count(pend, r, t_max, num_slots))
        q, k, v, g, beta = cm.load_token(tok, r, 0)
        S = rec.update(S, k, v, g, beta)
        o_ref[r.b, 0, r.hv, r.cols] = rec.readout(S, q).astype(o_ref.dtype)
        cm.store_state(pool_out_ref, r, S)

    @pl.when(jnp.logical_not(r.valid))
    def _():  # padding row: nothing read, nothing stored, zero output
        o_ref[r.b, 0, r.hv, r.cols] = jnp.zeros((block_v,), o_ref.dtype)


def _decode_call(dims: cm.Dims, config: TuningConfig, interpret: bool, *args):
    B, _, H, HV, _, V, N, t_max = dims
    q, pool = args[2], args[-1]  # args: (slots, count, q, ..., pool)
    kernel = functools.partial(_decode_kernel, num_slots=N, t_max=t_max, group=HV // H,
                               block_v=config.block_v)
    return pallas_call(
        kernel,
        name=f"gdn_decode_bv{config.block_v}_w{config.num_warps}",
        config=config,
        interpret=interpret,
        grid=(B, HV, V // config.block_v),
        out_shape=(jax.ShapeDtypeStruct((B, 1, HV, V), q.dtype),
                   jax.ShapeDtypeStruct(pool.shape, pool.dtype)),
        input_output_aliases={len(args) - 1: 1},
    )(*args)


@functools.partial(jax.jit, static_argnames=("config", "interpret"),
                   donate_argnames=("pool",))
def decode(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count, slots,
           *, config: TuningConfig = TuningConfig(), interpret: bool = False):
    """One GDN decode step per row, in place on the slot's state (Pallas, Triton lowering).

    Args:
      q, k:      [B, 1, H, K] bf16 | fp16 | fp32, raw (l2norm and the K**-0.5 scale are fused).
      v:         [B, 1, HV, V]; HV a multiple of H (GVA: value head hv reads key head
                 hv // (HV // H)).
      a, b:      [B, 1, HV] raw gate inputs; A_log, dt_bias: [HV]. Fused in fp32:
                 g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b).
      pool:      [num_slots, HV, V, K] bf16 | fp32 (K contiguous). Donated: updated in place.
      cand_k:    [num_slots, T_max, H, K] raw k of each slot's replay candidates.
      cand_v:    [num_slots, T_max, HV, V].
      cand_g, cand_beta: [num_slots, T_max, HV] fp32 (gating already applied).
      count:     [num_slots] int32: candidates t < count[slot] are accepted and still pending.
      slots:     [B] int32: row i works on pool[slots[i]]. A slot < 0 or >= num_slots makes the
                 row padding: nothing read, nothing written, zero output. Real slots must be
                 distinct (two rows on one slot race).
      config:    `TuningConfig` (block_v must divide V).
      interpret: run the Pallas interpreter (CPU tests).

    For each real row: S = pool[slot] in fp32; fold the count[slot] pending candidates (full token
    steps with their stored g, beta; no output); run the token; o = S q; store S once, rounded to
    the pool's dtype. `count` is only read: the caller sets count[slot] := 0 afterwards.

    Returns:
      o:    [B, 1, HV, V] in q's dtype (zeros for padding rows).
      pool: the updated pool (same buffer when donated).
    """
    dims = cm.check_tokens("decode", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g,
                           cand_beta, count, slots, t_lo=1, t_hi=1)
    config.check_head_dim("decode", dims.V)
    return _decode_call(dims, config, interpret, slots, count, q, k, v, a, b, A_log, dt_bias,
                        cand_k, cand_v, cand_g, cand_beta, pool)
