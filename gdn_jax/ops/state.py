"""`GDNState`: the preallocated recurrent state of one GDN layer, a slot-indexed pool.

The pool is `[num_slots, HV, V, K]` (K contiguous, the layout of sglang, FlashInfer and vLLM
pools), stored in bf16 (default) or fp32. Each batch row of an op names its slot; a slot that is
negative or >= num_slots is padding (nothing read, nothing written).

For the `replay` commit mode each slot also keeps the tokens of its last verify call (the
candidates) and how many of them were accepted but not yet folded into the pool (`count`).
The next op that touches the slot folds them in first, so the pool is read and written once per
round whatever the number of verified tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.kernels import POOL_DTYPES

COMMIT_MODES = ("replay", "intermediate")  # how a verify's accepted tokens reach the pool
INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class GDNState:
    """Recurrent state of one GDN layer (a pytree; jit it, donate it).

    pool:      [num_slots, HV, V, K] bf16 | fp32, the committed state
    cand_k:    [num_slots, T_max, H, K] input dtype, raw k of the last replay verify
    cand_v:    [num_slots, T_max, HV, V] input dtype
    cand_g:    [num_slots, T_max, HV] fp32 log decay (gating applied)
    cand_beta: [num_slots, T_max, HV] fp32
    count:     [num_slots] int32, accepted candidates not yet folded into pool (0..T_max)
    """

    pool: jax.Array
    cand_k: jax.Array
    cand_v: jax.Array
    cand_g: jax.Array
    cand_beta: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, num_slots: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, t_max: int, *, dtype=jnp.bfloat16,
               input_dtype=jnp.bfloat16) -> "GDNState":
        """A zeroed state for `num_slots` sequences and verify calls of up to `t_max` tokens.

        dtype: the pool's storage dtype (bf16 or fp32); input_dtype: the dtype of the k and v
        the model feeds (the replay candidates are kept in it).

        >>> st = GDNState.create(num_slots=8, num_k_heads=16, num_v_heads=32, head_k_dim=128,
        ...                      head_v_dim=128, t_max=4)
        >>> st.pool.shape, st.pool.dtype
        ((8, 32, 128, 128), dtype(bfloat16))
        """
        dtype, input_dtype = jnp.dtype(dtype), jnp.dtype(input_dtype)
        for name, value in (("num_slots", num_slots), ("num_k_heads", num_k_heads),
                            ("num_v_heads", num_v_heads), ("head_k_dim", head_k_dim),
                            ("head_v_dim", head_v_dim), ("t_max", t_max)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GDNState.create: {name} must be a positive int, got {value!r}")
        if num_v_heads % num_k_heads:
            raise ValueError(f"GDNState.create: num_v_heads ({num_v_heads}) must be a multiple of "
                             f"num_k_heads ({num_k_heads})")
        if dtype not in POOL_DTYPES:
            raise ValueError(f"GDNState.create: dtype must be bfloat16 or float32, got {dtype}")
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"GDNState.create: input_dtype must be one of "
                             f"{[str(d) for d in INPUT_DTYPES]}, got {input_dtype}")
        S, H, HV, K, V, T = num_slots, num_k_heads, num_v_heads, head_k_dim, head_v_dim, t_max
        return cls(
            pool=jnp.zeros((S, HV, V, K), dtype),
            cand_k=jnp.zeros((S, T, H, K), input_dtype),
            cand_v=jnp.zeros((S, T, HV, V), input_dtype),
            cand_g=jnp.zeros((S, T, HV), jnp.float32),
            cand_beta=jnp.zeros((S, T, HV), jnp.float32),
            count=jnp.zeros((S,), jnp.int32),
        )

    @property
    def num_slots(self) -> int:
        return self.pool.shape[0]

    @property
    def t_max(self) -> int:
        return self.cand_k.shape[1]

    @property
    def dtype(self):
        return self.pool.dtype

    @property
    def input_dtype(self):
        return self.cand_k.dtype

    def replace(self, **changes) -> "GDNState":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    GDNState,
    data_fields=["pool", "cand_k", "cand_v", "cand_g", "cand_beta", "count"],
    meta_fields=[],
)
