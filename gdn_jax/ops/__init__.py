"""GDN ops on a slot-indexed state pool (README, "The ops" and "Design").

    state = GDNState.create(num_slots, H, HV, K, V, t_max)       # bf16 pool by default
    o, state = decode(q, k, v, a, b, A_log, dt_bias, state, slots)
    o, state, inter = verify(..., state, slots, mode="replay")   # or "intermediate"
    state = commit(state, slots, num_accepted, inter)            # inter None in replay mode

`gdn_jax.ops.reference` holds the plain-JAX math (recurrent and chunked) every path is tested against.
"""

from gdn_jax.kernels import MAX_T  # the most tokens one decode / verify call takes on a GPU
from gdn_jax.ops._slots import slot_index
from gdn_jax.ops.api import check_slot_args, commit, decode, flush, prefill, reset, verify
from gdn_jax.ops.dispatch import describe_dispatch
from gdn_jax.ops.reference import (
    chunk_gated_delta_rule,
    gating,
    recurrent_gated_delta_rule,
)
from gdn_jax.ops.state import COMMIT_MODES, GDNState

__all__ = [
    "COMMIT_MODES",
    "GDNState",
    "MAX_T",
    "check_slot_args",
    "chunk_gated_delta_rule",
    "commit",
    "decode",
    "describe_dispatch",
    "flush",
    "gating",
    "prefill",
    "recurrent_gated_delta_rule",
    "reset",
    "slot_index",
    "verify",
]
