"""GDN fold (the kernel behind `flush`): apply each slot's pending replay candidates to the pool.

Replay candidates only: a ring-mode state's cand_v holds corrected values u, not raw v, and folds
as one product of them (`gdn_jax.ops.flush` sends ring states to its XLA path).

Decode without a token: kernel body `_fold_kernel` -> launcher `_fold_call` -> public `fold`.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from . import _common as cm
from ._pallas import TuningConfig, pallas_call


def _fold_kernel(slots_ref, count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref,
                 pool_ref, pool_out_ref, *, num_slots, t_max, group, block_v):
    # pool_ref / pool_out_ref: [num_slots, HV, V, K], the same buffer (aliased)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)
    n = cm.pending_count(pend, r, t_max, num_slots)  # 0 for padding rows

    # Only real slots with something pending are read and written.
    @pl.when(n > 0)
    def _():
        S = cm.fold_pending(cm.load_state(pool_ref, r), pend, r, n)
        cm.store_state(pool_out_ref, r, S)


def _fold_call(config: TuningConfig, interpret: bool, slots, count, cand_k, cand_v, cand_g,
               cand_beta, pool):
    N, HV, V, _ = pool.shape
    H, t_max = cand_k.shape[2], cand_k.shape[1]
    kernel = functools.partial(_fold_kernel, num_slots=N, t_max=t_max, group=HV // H,
                               block_v=config.block_v)
    return pallas_call(
        kernel,
        name=f"gdn_fold_bv{config.block_v}_w{config.num_warps}",
        config=config,
        interpret=interpret,
        grid=(slots.shape[0], HV, V // config.block_v),
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        input_output_aliases={6: 0},
    )(slots, count, cand_k, cand_v, cand_g, cand_beta, pool)


@functools.partial(jax.jit, static_argnames=("config", "interpret"),
                   donate_argnames=("pool",))
def fold(pool, cand_k, cand_v, cand_g, cand_beta, count, slots, *,
         config: TuningConfig = TuningConfig(), interpret: bool = False):
    """Fold each row's pending candidates into pool[slot], in place (no tokens, no outputs).

    Args:
      pool:      [num_slots, HV, V, K] bf16 | fp32 (K contiguous). Donated: updated in place.
      cand_k:    [num_slots, T_max, H, K] raw k (l2-normalised here); HV a multiple of H.
      cand_v:    [num_slots, T_max, HV, V].
      cand_g, cand_beta: [num_slots, T_max, HV] fp32 (gating already applied).
      count:     [num_slots] int32: candidates t < count[slot] are folded (only read here).
      slots:     [B] int32; a slot < 0 or >= num_slots is padding (nothing read or written).
                 Real slots must be distinct.
      config:    `TuningConfig` (block_v must divide V).
      interpret: run the Pallas interpreter (CPU tests).

    A slot with count 0 is neither read nor written (its state is already folded). The caller
    sets count[slot] := 0 afterwards.

    Returns:
      pool: the updated pool (same buffer when donated).
    """
    cm.check_pool("fold", pool, cand_k, cand_v, cand_g, cand_beta, count)
    if slots.ndim != 1:
        raise ValueError(f"fold: slots expected rank 1 [B], got shape {slots.shape}")
    cm.check_slots("fold", slots, slots.shape[0])
    config.check_head_dim("fold", pool.shape[2])
    return _fold_call(config, interpret, slots, count, cand_k, cand_v, cand_g, cand_beta, pool)
