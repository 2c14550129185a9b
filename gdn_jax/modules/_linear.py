"""The bias-free projection every module uses: `nnx.Linear` with kernel [in, out] (HF keeps
[out, in]: the checkpoint loader transposes) and an explicit matmul precision."""

from __future__ import annotations

from flax import nnx
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def linear(in_features: int, out_features: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype,
                      param_dtype=param_dtype, precision=precision,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def dense(x, kernel, *, dtype, precision):
    """What `nnx.Linear(use_bias=False)` computes, on a bare kernel array [in, out] (the
    per-shard bodies of the tensor-parallel blocks call it on their local kernels)."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
