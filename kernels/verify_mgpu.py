"""GDN MTP verify, replay mode, as a Pallas **Mosaic GPU** kernel: `decode_mgpu`'s pipelined body
with T tokens (mode "replay"). Same contract as `verify.verify_replay`.

Per tile: TMA the pool tile and the row's T q/k/v into SMEM; fold the slot's pending candidates;
where anything was folded, store the folded state (the state BEFORE this call's tokens) once;
then the T tokens in fp32 registers, their outputs staged through SMEM and stored by TMA. The
caller stores this call's tokens as the slot's new candidates and sets count := 0 (in XLA).
"""

from __future__ import annotations

import functools

import jax

from . import _common as cm
from . import _mgpu as mg
from ._mgpu import MosaicConfig
from .decode_mgpu import tokens_call


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
    config.check_shapes("verify_replay_mgpu", dims.K, dims.V, pool.dtype, q.dtype, T=dims.T)
    return tokens_call("replay", dims, config, interpret, slots, count, q, k, v, a, b, A_log,
                       dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
