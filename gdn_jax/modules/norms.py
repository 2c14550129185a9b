"""RMS norms of Qwen3-Next / Qwen3.5.

`RMSNorm`: `x * rsqrt(mean(x^2) + eps) * (1 + w)` in fp32, cast back to x's dtype (the weight is
zero-initialised: `1 + w`, Gemma style). Used for the layer norms, the final norm, q/k norms and
the MTP norms.
`GatedRMSNorm`: the GDN output norm, `w * norm(x)` (plain `w`, initialised to ones), then
`* silu(z)`; the gate multiply runs in fp32 (as transformers).

`RMSNorm.add(x, delta)` is a decoder layer's residual add and the norm after it in one op
(`gdn_jax.ops.residual_norm.add_rms_norm`: one kernel launch on a GPU where XLA takes two or
three), delta the block's output as partial sums ([S, ...]; `residual_add` adds them alone).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

# the two norms on bare weight arrays: their XLA formulas (one definition, the ops')
from gdn_jax.ops.residual_norm import add_partials, add_rms_norm, gated_rms_norm, rms_norm


class RMSNorm(nnx.Module):
    """`(1 + w)` RMSNorm over the last axis. x: [..., dim] any float dtype -> same shape and dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)

    def add(self, x, delta, *, fused: bool = True):
        """(r, h) = (x + delta's sum in x's dtype, this norm of r); delta: [S, *x.shape] partial
        sums, a `WeightedRows` of x's shape (a MoE block's expert rows) or None (r = x).
        fused=False keeps XLA (the kernel's dispatch otherwise)."""
        return add_rms_norm(x, delta, self.weight[...], self.eps,
                            backend=None if fused else "xla")


def residual_add(x, delta):
    """x + delta's sum ([S, *x.shape] partial sums or a `WeightedRows`, `RMSNorm.add`'s), in
    x's dtype."""
    return add_partials(x, delta)


class GatedRMSNorm(nnx.Module):
    """GDN output norm: x, z: [..., dim] -> `w * norm(x)` (rounded to x's dtype) `* silu(z)`."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x, z):
        return gated_rms_norm(x, z, self.weight[...], self.eps)


__all__ = ["GatedRMSNorm", "RMSNorm", "gated_rms_norm", "residual_add", "rms_norm"]
