"""`GDNState`: the preallocated recurrent state of one GDN layer, a slot-indexed pool.

The pool is `[num_slots, HV, V, K]` (K contiguous, the layout of sglang, FlashInfer and vLLM
pools), stored in bf16 (default) or fp32. Each batch row of an op names its slot; a slot that is
negative or >= num_slots is padding (nothing read, nothing written).

The state records how a verify's accepted tokens reach the pool (`commit_mode`, static):
- "replay": each slot also keeps the tokens of its last verify call (the candidates) and how many
  of them were accepted but not yet folded into the pool (`count`). The next op that touches the
  slot folds them in first, so the pool is read and written once per round whatever the number
  of verified tokens.
- "ring": the candidate buffers are a per-slot ring of `ring_size` (W) tokens, each kept as its
  raw key, its log decay and its corrected value u (fp32, in `cand_v`: what the token adds to the
  state, u = beta (v - exp(g) S k), which stays valid until the fold). Its first `count` entries
  are committed tokens not yet folded; a verify reads the pool and those entries (the pool is not
  written) and places its T tokens after them as candidates; `commit` keeps n of them
  (count += n). A call whose T tokens would not fit after the committed ones folds those into the
  pool first (one pool write every few rounds). Decode is a verify of one token that commits it.
- "intermediate": a verify writes the state after every token to a caller's buffer and `commit`
  copies the accepted one into the pool (the candidate buffers are unused).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.kernels import POOL_DTYPES, RING_MIN

COMMIT_MODES = ("replay", "intermediate", "ring")  # how a verify's accepted tokens reach the pool
INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class GDNState:
    """Recurrent state of one GDN layer (a pytree; jit it, donate it).

    pool:      [num_slots, HV, V, K] bf16 | fp32, the committed (folded) state
    cand_k:    [num_slots, W, H, K] input dtype, raw k of the candidates (replay: the last
               verify's, W = T_max) or of the ring (ring: W = ring_size)
    cand_v:    [num_slots, W, HV, V] input dtype (ring: fp32, the tokens' corrected values u)
    cand_g:    [num_slots, W, HV] fp32 log decay (gating applied)
    cand_beta: [num_slots, W, HV] fp32
    count:     [num_slots] int32, accepted tokens not yet folded into pool (0..W)
    commit_mode: "replay" | "ring" | "intermediate" (static)
    t_max:     the most tokens one verify call takes (static; cand_k.shape[1] when not given)
    """

    pool: jax.Array
    cand_k: jax.Array
    cand_v: jax.Array
    cand_g: jax.Array
    cand_beta: jax.Array
    count: jax.Array
    commit_mode: str = "replay"
    t_max: int | None = None

    def __post_init__(self):
        # Pytree unflattening rebuilds the state with arbitrary leaves (specs, sentinels): only
        # derive T_max where cand_k is an array.
        if self.t_max is None and hasattr(self.cand_k, "shape"):
            object.__setattr__(self, "t_max", int(self.cand_k.shape[1]))

    @classmethod
    def create(cls, num_slots: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, t_max: int, *, dtype=jnp.bfloat16,
               input_dtype=jnp.bfloat16, commit_mode: str = "replay",
               ring_size: int | None = None) -> "GDNState":
        """A zeroed state for `num_slots` sequences and verify calls of up to `t_max` tokens.

        dtype: the pool's storage dtype (bf16 or fp32); input_dtype: the dtype of the k and v
        the model feeds (the replay candidates and the ring's keys are kept in it; the ring's
        corrected values are fp32).
        commit_mode: "replay" (default), "ring" or "intermediate" (module docstring).
        ring_size: W, ring mode only: a power of two >= max(16, t_max); default
        `default_ring_size(t_max)`.

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
        if commit_mode not in COMMIT_MODES:
            raise ValueError(f"GDNState.create: commit_mode expected one of {COMMIT_MODES}, got "
                             f"{commit_mode!r}")
        T = t_max
        if commit_mode == "ring":
            T = default_ring_size(t_max) if ring_size is None else ring_size
            if (not isinstance(T, (int, np.integer)) or T < max(RING_MIN, t_max) or T & (T - 1)):
                raise ValueError(f"GDNState.create: ring_size expected a power of two >= "
                                 f"max({RING_MIN}, t_max = {t_max}), got {ring_size!r}")
        elif ring_size is not None:
            raise ValueError(f"GDNState.create: ring_size is for commit_mode='ring', got "
                             f"commit_mode={commit_mode!r}")
        S, H, HV, K, V = num_slots, num_k_heads, num_v_heads, head_k_dim, head_v_dim
        return cls(
            pool=jnp.zeros((S, HV, V, K), dtype),
            cand_k=jnp.zeros((S, T, H, K), input_dtype),
            cand_v=jnp.zeros((S, T, HV, V), jnp.float32 if commit_mode == "ring" else input_dtype),
            cand_g=jnp.zeros((S, T, HV), jnp.float32),
            cand_beta=jnp.zeros((S, T, HV), jnp.float32),
            count=jnp.zeros((S,), jnp.int32),
            commit_mode=commit_mode,
            t_max=int(t_max),
        )

    @property
    def num_slots(self) -> int:
        return self.pool.shape[0]

    @property
    def ring_size(self) -> int:
        """W: the candidate buffers' length (the ring's in ring mode, T_max otherwise)."""
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
    meta_fields=["commit_mode", "t_max"],
)


def default_ring_size(t_max: int) -> int:
    """W for verify calls of up to t_max tokens: room for two rounds (a fold every ~W - T_max
    committed tokens), at least RING_MIN, a power of two."""
    return max(RING_MIN, 1 << max(0, 2 * int(t_max) - 1).bit_length())
