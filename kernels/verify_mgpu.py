"""GDN MTP verify in both commit modes as Pallas **Mosaic GPU** kernels: `decode_mgpu`'s pipelined
body with T tokens. Same contracts as `verify.verify_replay` and `verify.verify_intermediate`.

Per tile: TMA the pool tile and the row's T q/k/v into SMEM; fold the slot's pending candidates;
then the T tokens in fp32 registers, their outputs staged through SMEM and stored by TMA.
- replay: where anything was folded, the folded state (the state BEFORE this call's tokens) is
  stored to the pool once. The caller stores this call's tokens as the slot's new candidates and
  sets count := 0 (in XLA).
- intermediate: the pool is only read; each S_t is rounded once to the pool's dtype and stored by
  TMA to inter[b, t] from a ring of SMEM tiles, so the stores of tokens t and t + 1 overlap the
  math of the next.
"""

from __future__ import annotations

import functools

import jax

from . import _common as cm
from . import _mgpu as mg
from ._mgpu import MosaicConfig
from .decode_mgpu import check_config, tokens_call


@functools.partial(jax.jit, static_argnames=("block_v", "tiles_per_cta", "stages", "interpret"),
                   donate_argnames=("pool",))
def verify_replay_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                       count, slots, *, block_v: int = 64, tiles_per_cta: int = 2,
                       stages: int = 2, interpret: bool = False):
    """T verify tokens per row (T in 1..8); the pool takes the slot's folded state (replay mode).

    Arguments as `gdn_jax.kernels.verify_replay` (q, k [B, T, H, K]; v [B, T, HV, V]; a, b
    [B, T, HV]; ...), tuning as `decode_mgpu` (`MosaicConfig`).

    The pool is donated and updated in place: pool[slot] := the folded state, written once and
    only where count[slot] > 0. Returns o [B, T, HV, V] in q's dtype (zeros for padding rows)
    and the pool.
    """
    mg.require("verify_replay_mgpu")
    config = MosaicConfig(block_v, tiles_per_cta, stages)
    dims = cm.check_tokens("verify_replay_mgpu", q, k, v, a, b, A_log, dt_bias, pool, cand_k,
                           cand_v, cand_g, cand_beta, count, slots, t_lo=1, t_hi=cm.MAX_T)
    check_config("verify_replay_mgpu", "replay", config, dims, q, pool, cand_k, cand_v)
    return tokens_call("replay", dims, config, interpret, slots, count, q, k, v, a, b, A_log,
                       dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)


@functools.partial(jax.jit, static_argnames=("block_v", "tiles_per_cta", "stages", "interpret"))
def verify_intermediate_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g,
                             cand_beta, count, slots, *, block_v: int = 64, tiles_per_cta: int = 2,
                             stages: int = 2, interpret: bool = False):
    """T verify tokens per row (T in 1..8), keeping the state after each; the pool is only read.

    Arguments as `gdn_jax.kernels.verify_intermediate`, tuning as `decode_mgpu` (`MosaicConfig`;
    the SMEM also holds up to min(T, 4) [block_v, K] tiles staging the state stores).

    Returns o [B, T, HV, V] in q's dtype and inter [B, T, HV, V, K] in the pool's dtype
    (inter[i, t] = S_t rounded once); padding rows get zero o and zero inter.
    """
    mg.require("verify_intermediate_mgpu")
    config = MosaicConfig(block_v, tiles_per_cta, stages)
    dims = cm.check_tokens("verify_intermediate_mgpu", q, k, v, a, b, A_log, dt_bias, pool,
                           cand_k, cand_v, cand_g, cand_beta, count, slots, t_lo=1,
                           t_hi=cm.MAX_T)
    check_config("verify_intermediate_mgpu", "intermediate", config, dims, q, pool, cand_k,
                 cand_v)
    return tokens_call("intermediate", dims, config, interpret, slots, count, q, k, v, a, b,
                       A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
