"""Per-layer inference caches: preallocated, slot-indexed pytrees (jit them, donate them).

Each batch row names a slot (int32); a slot that is negative or >= num_slots is padding (nothing
read or written, as in `gdn_jax.ops`). Verify calls write their T tokens without committing them;
`commit(..., num_accepted)` (a count, 0..T) then keeps the first num_accepted of them.

`KVCache` (full-attention layer):
    k, v:    [num_slots, max_len, num_kv_heads, head_dim] in the compute dtype
    lengths: [num_slots] int32, tokens committed per slot (the next token's position)
`GDNCache` (Gated DeltaNet layer):
    state:   gdn_jax.ops.GDNState, pool [num_slots, HV, V, K] bf16 | fp32 (+ replay candidates,
             or the ring of committed tokens in "ring" commit mode); it records the commit mode
    conv:    [num_slots, width - 1 + T_max, conv_dim] pre-conv [q | k | v] inputs; rows
             0..width-2 are the committed window; a verify writes window + its T inputs, and
             commit keeps rows n..n+width-2 (the window after n accepted tokens)
    inter:   [num_slots, T_max, HV, V, K] pool dtype, the per-token states of the last verify
             ("intermediate" commit mode), or None ("replay" and "ring" commit modes)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gdn_jax.modules.sharding import TP
from gdn_jax.ops import COMMIT_MODES, GDNState, slot_index
from gdn_jax.ops.dispatch import commit_mode_for  # the models' and the loop's "auto" mode

__all__ = ["COMMIT_MODES", "GDNCache", "KVCache", "commit_mode_for", "conv_dim",
           "gdn_cache_specs", "kv_cache_specs", "slot_index"]


def conv_dim(num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int) -> int:
    """Channels of the GDN layer's causal conv: [q | k | v] = 2 H K + HV V."""
    return 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim


@dataclasses.dataclass(frozen=True)
class KVCache:
    """KV cache of one full-attention layer (see the module docstring)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int, *,
               dtype=jnp.bfloat16) -> "KVCache":
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((num_slots,), jnp.int32))

    @property
    def num_slots(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def commit(self, slots, num_accepted) -> "KVCache":
        """Keep num_accepted[i] tokens of row i's last verify: lengths[slot] += num_accepted."""
        _, _, scatter = slot_index(slots, self.num_slots)
        n = jnp.asarray(num_accepted).astype(jnp.int32)
        return self.replace(lengths=self.lengths.at[scatter].add(n, mode="drop"))

    def reset(self, slots) -> "KVCache":
        """Empty the slots (lengths := 0) for new sequences."""
        _, _, scatter = slot_index(slots, self.num_slots)
        return self.replace(lengths=self.lengths.at[scatter].set(0, mode="drop"))


@dataclasses.dataclass(frozen=True)
class GDNCache:
    """Recurrent state, conv window and verify buffers of one GDN layer (module docstring)."""

    state: GDNState
    conv: jax.Array
    inter: jax.Array | None

    @classmethod
    def create(cls, num_slots: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, conv_kernel: int, *, t_max: int, state_dtype=jnp.bfloat16,
               dtype=jnp.bfloat16, commit_mode: str = "replay") -> "GDNCache":
        """A zeroed cache. dtype: the model's compute dtype (conv window, replay candidates)."""
        if commit_mode not in COMMIT_MODES:
            raise ValueError(f"GDNCache.create: commit_mode expected one of {COMMIT_MODES}, got "
                             f"{commit_mode!r}")
        state = GDNState.create(num_slots, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                                t_max, dtype=state_dtype, input_dtype=dtype,
                                commit_mode=commit_mode)
        channels = conv_dim(num_k_heads, head_k_dim, num_v_heads, head_v_dim)
        conv = jnp.zeros((num_slots, conv_kernel - 1 + t_max, channels), dtype)
        inter = None
        if commit_mode == "intermediate":
            inter = jnp.zeros((num_slots, t_max, num_v_heads, head_v_dim, head_k_dim),
                              state.pool.dtype)
        return cls(state, conv, inter)

    @property
    def commit_mode(self) -> str:
        return self.state.commit_mode

    @property
    def num_slots(self) -> int:
        return self.state.num_slots

    @property
    def t_max(self) -> int:
        return self.state.t_max

    def replace(self, **changes) -> "GDNCache":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "lengths"], meta_fields=[])
jax.tree_util.register_dataclass(GDNCache, data_fields=["state", "conv", "inter"], meta_fields=[])


def gdn_cache_specs(cache: GDNCache):
    """PartitionSpecs of a GDNCache on a ("tp",) mesh (a pytree like the cache): everything per
    head is split by head (pool and candidates on H / HV, the conv window on its tp-blocked
    channels, inter on HV); count is replicated."""
    head2 = P(None, None, TP)
    state = cache.state.replace(pool=P(None, TP), cand_k=head2, cand_v=head2, cand_g=head2,
                                cand_beta=head2, count=P())
    return GDNCache(state=state, conv=head2, inter=None if cache.inter is None else head2)


def kv_cache_specs(sharded_heads: bool):
    """PartitionSpecs of a KVCache: k / v split by KV head, or replicated when the KV heads are
    fewer than the devices."""
    kv = P(None, None, TP) if sharded_heads else P()
    return KVCache(k=kv, v=kv, lengths=P())
