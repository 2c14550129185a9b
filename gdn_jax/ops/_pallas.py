"""The ops on the Pallas kernels of `gdn_jax.kernels`: the kernels move the state, XLA the rest.

The kernels read the pending candidates and read/write the pool; the small per-slot bookkeeping
(count := 0, this call's tokens stored as the new replay candidates) is an XLA scatter here, since
inside a kernel other programs of the same row would still be reading the old values.
Jitted without donation: the caller's own `jax.jit(..., donate_argnames="state")` makes the
kernels' `input_output_aliases` update the pool in place.
"""

from __future__ import annotations

import functools

import jax

from gdn_jax import kernels
from gdn_jax.ops import dispatch, reference
from gdn_jax.ops._slots import clear_count, slot_index, store_candidates


def _tuning(op, state, B, backend="triton", mode=None):
    return dispatch.tuning(op, state_dtype=state.pool.dtype, B=B, V=state.pool.shape[2],
                           backend=backend, mode=mode)


def mosaic_misfit(op, mode, q, v, state):
    """None when this call fits the Mosaic GPU kernel with the dispatch's tuning, else why not
    (the SMEM its tile, candidates and state-store ring need; dispatch then passes it over)."""
    from gdn_jax.kernels._common import Dims

    B, T, H, K = q.shape
    dims = Dims(B, T, H, v.shape[2], K, v.shape[3], state.pool.shape[0], state.cand_k.shape[1])
    config = kernels.MosaicConfig(**_tuning(op, state, B, "mosaic", mode))
    try:
        kernels.check_mosaic_config(op, mode or "decode", config, dims, q, state.pool,
                                    state.cand_k, state.cand_v)
    except ValueError as e:
        return str(e)
    return None


def _pending(state):
    return (state.cand_k, state.cand_v, state.cand_g, state.cand_beta, state.count)


@functools.partial(jax.jit, static_argnames=("interpret", "mosaic"))
def decode(q, k, v, a, b, A_log, dt_bias, state, slots, *, interpret=False, mosaic=False):
    """mosaic: the Mosaic GPU kernel (`kernels.decode_mgpu`) instead of the Triton one; with
    interpret, run by the Mosaic GPU interpreter."""
    backend = "mosaic" if mosaic else "triton"
    kernel = kernels.decode_mgpu if mosaic else kernels.decode
    cfg = _tuning("decode", state, q.shape[0], backend)
    o, pool = kernel(q, k, v, a, b, A_log, dt_bias, state.pool, *_pending(state), slots,
                     interpret=interpret, **cfg)
    _, _, scatter = slot_index(slots, state.num_slots)
    return o, clear_count(state.replace(pool=pool), scatter)


@functools.partial(jax.jit, static_argnames=("mode", "interpret", "mosaic"))
def verify(q, k, v, a, b, A_log, dt_bias, state, slots, *, mode, interpret=False, mosaic=False):
    """mosaic: the Mosaic GPU kernels (`kernels.verify_replay_mgpu`, `verify_intermediate_mgpu`)."""
    cfg = _tuning("verify", state, q.shape[0], "mosaic" if mosaic else "triton", mode)
    args = (q, k, v, a, b, A_log, dt_bias, state.pool, *_pending(state), slots)
    if mode == "intermediate":
        kernel = kernels.verify_intermediate_mgpu if mosaic else kernels.verify_intermediate
        o, inter = kernel(*args, interpret=interpret, **cfg)
        return o, state, inter
    kernel = kernels.verify_replay_mgpu if mosaic else kernels.verify_replay
    o, pool = kernel(*args, interpret=interpret, **cfg)
    _, _, scatter = slot_index(slots, state.num_slots)
    g, beta = reference.gating(a, b, A_log, dt_bias)
    state = clear_count(state.replace(pool=pool), scatter)
    return o, store_candidates(state, scatter, k, v, g, beta), None


@functools.partial(jax.jit, static_argnames="interpret")
def flush(state, slots, *, interpret=False):
    cfg = _tuning("flush", state, slots.shape[0])
    pool = kernels.fold(state.pool, *_pending(state), slots, interpret=interpret, **cfg)
    _, _, scatter = slot_index(slots, state.num_slots)
    return clear_count(state.replace(pool=pool), scatter)
