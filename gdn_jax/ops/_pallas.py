"""The ops on the Pallas kernels of `gdn_jax.kernels`: the kernels move the state, XLA the rest.

The kernels read the pending candidates and read/write the pool (and, in ring mode, write their
tokens' u into the ring); the small per-slot bookkeeping (count := 0, this call's tokens stored
as the new replay candidates, the ring's keys and gates) is an XLA scatter here, since inside a
kernel other programs of the same row would still be reading the old values.
Jitted without donation: the caller's own `jax.jit(..., donate_argnames="state")` makes the
kernels' `input_output_aliases` update the pool (and in ring mode the ring's u) in place.

Each op takes the `dispatch.Choice` that picked it (one static argument): its backend names the
kernel family ("triton", "mosaic"; "interpret": the Triton kernels in the Pallas interpreter) and
its config is the kernel's launch config.
"""

from __future__ import annotations

import functools

import jax

from gdn_jax import kernels
from gdn_jax.ops._slots import (clear_count, ring_start, set_ring_count, slot_index,
                                store_candidates, store_ring)

_TRITON = {"decode": kernels.decode, "replay": kernels.verify_replay,
           "intermediate": kernels.verify_intermediate}
_MOSAIC = {"decode": kernels.decode_mgpu, "replay": kernels.verify_replay_mgpu,
           "intermediate": kernels.verify_intermediate_mgpu}


def _kernel(choice, name: str, interpret: bool):
    """The kernel `name` of the choice's family, with its config and interpret flag bound."""
    family = _MOSAIC if choice.backend == "mosaic" else _TRITON
    return functools.partial(family[name], config=choice.config,
                             interpret=interpret or choice.backend == "interpret")


def _pending(state):
    return (state.cand_k, state.cand_v, state.cand_g, state.cand_beta, state.count)


def _after_kernel(state, pool):
    """The state with the kernel's pool, its count ordered after the kernel (which reads it).

    Unordered, XLA copies count before each scatter that writes it (72 copies in a 48-layer
    B = 32 verify step): the barrier makes the count scatters follow the kernel, in place."""
    pool, count = jax.lax.optimization_barrier((pool, state.count))
    return state.replace(pool=pool, count=count)


@functools.partial(jax.jit, static_argnames=("choice", "interpret"))
def decode(q, k, v, a, b, A_log, dt_bias, state, slots, *, choice, interpret=False):
    """interpret: run the chosen kernel in its interpreter (the Mosaic GPU one's too: tests)."""
    o, pool = _kernel(choice, "decode", interpret)(q, k, v, a, b, A_log, dt_bias, state.pool,
                                                   *_pending(state), slots)
    _, _, scatter = slot_index(slots, state.num_slots)
    return o, clear_count(_after_kernel(state, pool), scatter)


@functools.partial(jax.jit, static_argnames=("mode", "choice", "interpret"))
def verify(q, k, v, a, b, A_log, dt_bias, state, slots, *, mode, choice, interpret=False):
    args = (q, k, v, a, b, A_log, dt_bias, state.pool, *_pending(state), slots)
    if mode == "intermediate":
        o, inter = _kernel(choice, "intermediate", interpret)(*args)
        return o, state, inter
    o, pool = _kernel(choice, "replay", interpret)(*args)
    _, _, scatter = slot_index(slots, state.num_slots)
    state = clear_count(_after_kernel(state, pool), scatter)
    return o, store_candidates(state, scatter, k, v, (a, b, A_log, dt_bias)), None


@functools.partial(jax.jit, static_argnames=("reserve", "choice", "interpret"))
def ring(q, k, v, a, b, A_log, dt_bias, state, slots, *, reserve, choice, interpret=False):
    """Ring mode: decode (reserve 1) and verify (reserve T_max), one kernel (`kernels.ring`, or
    `verify_ring_mgpu` where the choice is Mosaic GPU)."""
    kernel = kernels.verify_ring_mgpu if choice.backend == "mosaic" else kernels.verify_ring
    o, cand_v, pool = kernel(q, k, v, a, b, A_log, dt_bias, state.pool, *_pending(state), slots,
                             reserve=reserve, config=choice.config,
                             interpret=interpret or choice.backend == "interpret")
    gather, valid, scatter = slot_index(slots, state.num_slots)
    state = _after_kernel(state, pool).replace(cand_v=cand_v)
    _, start = ring_start(state, gather, valid, reserve)
    state = store_ring(state, scatter, start, k, None, (a, b, A_log, dt_bias), reserve)
    return o, set_ring_count(state, scatter, start, reserve == 1)


@functools.partial(jax.jit, static_argnames=("choice", "interpret"))
def flush(state, slots, *, choice, interpret=False):
    pool = kernels.fold(state.pool, *_pending(state), slots, config=choice.config,
                        interpret=interpret or choice.backend == "interpret")
    _, _, scatter = slot_index(slots, state.num_slots)
    return clear_count(_after_kernel(state, pool), scatter)
