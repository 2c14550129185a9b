"""The bias-free projection every module uses: `nnx.Linear` with kernel [in, out] (HF keeps
[out, in]: the checkpoint loader transposes) and an explicit matmul precision."""

from __future__ import annotations

from flax import nnx
from jax import lax

from gdn_jax.modules.sharding import tp_metadata

HIGHEST = lax.Precision.HIGHEST


def linear(in_features: int, out_features: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs,
           sharding: tuple | None = None):
    """sharding: the kernel's mesh names per axis ((None, TP): by columns, (TP, None): by rows;
    `gdn_jax.modules.sharding.tp_metadata`), or None: replicated."""
    metadata = {} if sharding is None else tp_metadata(*sharding)
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype,
                      param_dtype=param_dtype, precision=precision,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
                      kernel_metadata=metadata)


def dense(x, kernel, *, dtype, precision):
    """What `nnx.Linear(use_bias=False)` computes, on a bare kernel array [in, out] (the
    per-shard bodies of the tensor-parallel blocks call it on their local kernels)."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
