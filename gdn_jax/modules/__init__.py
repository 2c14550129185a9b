"""Flax NNX modules of Qwen3-Next / Qwen3.5: the GDN layer, gated attention, MLP / MoE, norms,
RoPE and the slot-indexed caches. They call `gdn_jax.ops` for the gated delta rule."""

from gdn_jax.modules.attention import Attention
from gdn_jax.modules.cache import GDNCache, KVCache
from gdn_jax.modules.gated_deltanet import GatedDeltaNet, causal_conv
from gdn_jax.modules.mlp import MLP, SparseMoE
from gdn_jax.modules.norms import GatedRMSNorm, RMSNorm
from gdn_jax.modules.rope import apply_rope, rope_cos_sin

__all__ = ["MLP", "Attention", "GDNCache", "GatedDeltaNet", "GatedRMSNorm", "KVCache", "RMSNorm",
           "SparseMoE", "apply_rope", "causal_conv", "rope_cos_sin"]
