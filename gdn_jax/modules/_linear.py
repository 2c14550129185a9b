"""The bias-free projection every module uses: `nnx.Linear`'s parameters (kernel [in, out]; HF
keeps [out, in]: the checkpoint loader transposes) with an explicit matmul precision, computed by
`gdn_jax.ops.projection.project` (the few-row kernel on a GPU, else XLA's dot); `dense_group`
for the projections of one input (`gdn_jax.ops.projection.project_group`); `dense_swiglu` (the
MLP) and `dense_gated_norm` (GDN's output norm and out_proj) for two projections and the
elementwise step between them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gdn_jax.modules.sharding import tp_metadata
from gdn_jax.ops.projection import (gated_norm_project, project, project_group,
                                    Partials, project_group_partials, swiglu_project)

HIGHEST = lax.Precision.HIGHEST


def linear(in_features: int, out_features: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs,
           sharding: tuple | None = None):
    """sharding: the kernel's mesh names per axis ((None, TP): by columns, (TP, None): by rows;
    `gdn_jax.modules.sharding.tp_metadata`), or None: replicated."""
    metadata = {} if sharding is None else tp_metadata(*sharding)
    return Linear(in_features, out_features, use_bias=False, dtype=dtype,
                      param_dtype=param_dtype, precision=precision,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
                      kernel_metadata=metadata)


class Linear(nnx.Linear):
    """`nnx.Linear` (bias-free here) whose product is `dense`: same parameters, same numbers in
    XLA, the few-row kernel where it runs."""

    def __call__(self, x):
        return dense(x, self.kernel[...], dtype=self.dtype, precision=self.precision)


def dense(x, kernel, *, dtype, precision, partials: bool = False):
    """What `nnx.Linear(use_bias=False)` computes, on a bare kernel array [in, out] (the
    per-shard bodies of the tensor-parallel blocks call it on their local kernels). partials:
    the product as [S, ..., out] partial sums (`gdn_jax.ops.projection.project`), for the
    residual add + norm that adds them (`gdn_jax.ops.residual_norm.add_rms_norm`)."""
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return project(x, kernel, precision=precision, partials=partials)


def dense_group(x, kernels, *, dtype, precision):
    """`dense` of one x through each kernel [in, out_i] (a tuple), as one call where the few-row
    kernel may take them in one launch (`gdn_jax.ops.projection.project_group`)."""
    if dtype is None:  # each weight promotes x as `dense` does: no one dtype to group in
        return tuple(dense(x, k, dtype=None, precision=precision) for k in kernels)
    return project_group(x.astype(dtype), tuple(k.astype(dtype) for k in kernels),
                         precision=precision)


def dense_group_partials(x, kernels, *, dtype):
    """`dense_group` as `gdn_jax.ops.projection.Partials` views of one kernel launch's unadded
    output, for consumers that add them on load (the GDN conv and output norm); None where the
    few-row kernel does not take the group in one launch (call `dense_group`)."""
    if dtype is None:
        return None
    return project_group_partials(x.astype(dtype), tuple(k.astype(dtype) for k in kernels))


def dense_swiglu(x, gate, up, down, *, dtype, precision, partials: bool = False):
    """`dense(silu(dense(x, gate)) * dense(x, up), down)` on bare kernels, as one call where the
    few-row kernel may take it (`gdn_jax.ops.projection.swiglu_project`)."""
    if dtype is None:  # no one dtype to fuse in: each step as `dense` promotes it
        g, u = dense_group(x, (gate, up), dtype=None, precision=precision)
        return dense(jax.nn.silu(g) * u, down, dtype=None, precision=precision,
                     partials=partials)
    return swiglu_project(x.astype(dtype), gate.astype(dtype), up.astype(dtype),
                          down.astype(dtype), precision=precision, partials=partials)


def dense_gated_norm(o, z, norm_weight, kernel, eps: float, *, dtype, precision,
                     partials: bool = False):
    """`dense(gated_rms_norm(o, z, norm_weight, eps), kernel)` (o, z: [..., H, V] in dtype, or z
    a `Partials` view of H * V columns; the product over H * V) as one call where the few-row
    kernel may take it (`gdn_jax.ops.projection.gated_norm_project`)."""
    dtype = dtype or jnp.result_type(o, kernel)
    z = z if isinstance(z, Partials) else z.astype(dtype)
    return gated_norm_project(o.astype(dtype), z, norm_weight,
                              kernel.astype(dtype), eps, precision=precision, partials=partials)
