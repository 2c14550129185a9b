"""Feed-forward blocks: the dense SwiGLU `MLP` and the `SparseMoE` block.

SparseMoE (Qwen3-Next / Qwen3.5-MoE):
    probs = softmax(x @ W_router) in fp32; top-k; renormalise (norm_topk_prob); cast to x's dtype
    routed = sum_k w_k * down_e(silu(gate_e x) * up_e x)
    out = routed + sigmoid(x @ w_shared_gate) * shared_expert(x)
The routed experts run as grouped matmuls (`lax.ragged_dot`) over the token-expert pairs sorted by
expert, so each token computes only its top-k experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gdn_jax.modules._linear import HIGHEST, linear

_F32 = jnp.float32


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)). x: [..., hidden] -> [..., hidden] in `dtype`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=HIGHEST, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.gate_proj = linear(hidden_size, intermediate_size, **kw)
        self.up_proj = linear(hidden_size, intermediate_size, **kw)
        self.down_proj = linear(intermediate_size, hidden_size, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nnx.Module):
    """Softmax top-k routed experts plus a sigmoid-gated shared expert.

    Parameters: gate (router) kernel [hidden, E]; experts_gate_proj, experts_up_proj:
    [E, hidden, I]; experts_down_proj: [E, I, hidden]; shared_expert: MLP(hidden, I_shared);
    shared_expert_gate kernel [hidden, 1].
    x: [..., hidden] -> [..., hidden] in `dtype`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, *, norm_topk_prob: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=HIGHEST,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.dtype, self.precision = dtype, precision
        self.gate = linear(hidden_size, num_experts, **kw)
        init = nnx.initializers.normal(0.02)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.experts_gate_proj = nnx.Param(init(rngs.params(), (E, H, I), param_dtype))
        self.experts_up_proj = nnx.Param(init(rngs.params(), (E, H, I), param_dtype))
        self.experts_down_proj = nnx.Param(init(rngs.params(), (E, I, H), param_dtype))
        self.shared_expert = MLP(hidden_size, shared_intermediate_size, **kw)
        self.shared_expert_gate = linear(hidden_size, 1, **kw)

    def route(self, x):
        """x: [N, hidden] -> (weights [N, k] in x's dtype, expert ids [N, k] int32)."""
        logits = self.gate(x)
        probs = jax.nn.softmax(logits.astype(_F32), axis=-1)
        top_w, top_i = lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return top_w.astype(logits.dtype), top_i.astype(jnp.int32)

    def _experts(self, x, weights, ids):
        """Grouped matmuls over the (token, expert) pairs sorted by expert."""
        N, H = x.shape
        flat = ids.reshape(-1)  # [N*k]
        order = jnp.argsort(flat, stable=True)
        token = order // self.top_k
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = x[token].astype(self.dtype)
        mm = lambda a, w: lax.ragged_dot(a, w[...].astype(self.dtype), sizes,
                                          precision=self.precision)
        h = jax.nn.silu(mm(xs, self.experts_gate_proj)) * mm(xs, self.experts_up_proj)
        y = mm(h, self.experts_down_proj) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((N, H), y.dtype).at[token].add(y)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x)
        routed = self._experts(x, weights, ids)
        shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape)
