"""Tensor parallelism over heads: the ("tp",) mesh axis, the per-head-group column layout, and the
`shard_map` wrapper every head-parallel block runs in.

A module built with `mesh=None` (the default) runs as before on one device. With a mesh that has a
"tp" axis of size tp, each head-parallel block (GDN, attention, MLP / MoE) runs its own math per
shard inside `jax.shard_map` on its local heads (so the Pallas kernels see plain local arrays),
and ends in exactly one `psum` over "tp" (after out_proj / o_proj / down_proj). Everything else
(norms, residuals, embedding and the vocab-split LM head) is left to GSPMD.

Column layout: a projection whose columns are several head-major segments (GDN in_proj_qkvz =
[q | k | v | z], in_proj_ba = [b | a], the conv channels [q | k | v]) is stored, on a mesh of tp
devices, "tp-blocked": device d's block holds segment-by-segment the columns of its heads, so a
plain contiguous split of the column axis hands each device whole key-head groups (key head g with
its r = HV / H value heads). tp = 1 is the flat layout itself.

Partition specs ride on the parameters: a head-parallel parameter carries Flax NNX partition
metadata (`tp_metadata`: its per-axis mesh names, `out_sharding`), read back by `param_spec`; the
few specs that depend on the device count (attention's k / v: split or replicated) come from the
module's `tp_param_specs(tp)`. `shard_call` runs a block's per-shard body with those specs, and
`gdn_jax.models.sharding` places every parameter by the same specs.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP = "tp"


def tp_size(mesh: Mesh | None) -> int:
    """The size of the mesh's "tp" axis (1 without a mesh)."""
    if mesh is None:
        return 1
    if TP not in mesh.axis_names:
        raise ValueError(f"mesh: expected an axis named {TP!r}, got axes {mesh.axis_names}")
    return int(mesh.shape[TP])


def check_divides(what: str, count: int, tp: int) -> None:
    """The load-time error for a head (or column) count that the tp devices cannot split."""
    if count % tp:
        raise ValueError(f"tensor parallel over {tp} devices: {what} = {count} is not divisible "
                         f"by the {tp} devices of the mesh's {TP!r} axis")


def blocked_permutation(sizes, tp: int) -> np.ndarray:
    """Column indices, flat layout -> tp-blocked layout, for head-major segments of `sizes`.

    new[:, j] = flat[:, perm[j]]: block d = [segment 0 part d | segment 1 part d | ...].
    """
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = []
    for d in range(tp):
        for start, size in zip(starts, sizes):
            if size % tp:
                raise ValueError(f"blocked_permutation: segment of {size} not divisible by {tp}")
            n = size // tp
            parts.append(start + d * n + np.arange(n))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def tp_map(mesh: Mesh, fn, in_specs, out_specs):
    """`jax.shard_map` of fn over the mesh (axes other than "tp" see replicated data).

    check_vma is off: the Pallas kernels called inside have no varying-axes rules, and every
    replicated output of our blocks is a psum or a function of replicated inputs.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def tp_metadata(*names) -> dict:
    """Flax NNX metadata for a parameter split over the mesh: one name per axis (TP or None), e.g.
    `nnx.Param(w, **tp_metadata(None, TP))` or `nnx.Linear(..., kernel_metadata=tp_metadata(TP,
    None))`. Nothing is placed at creation (`eager_sharding` off): `shard_model` places it."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def param_spec(var) -> P:
    """The PartitionSpec a parameter's metadata names (replicated without any)."""
    names = var.get_metadata().get("out_sharding")
    return P() if names is None else P(*names)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def shard_call(mesh: Mesh | None, body, params, args, arg_specs, out_specs, *, overrides=None):
    """Run a block's body(arrays, *args) on one device (mesh None) or per shard under `tp_map`.

    params: a (nested) dict of nnx.Variables; body gets their values in the same structure, and
    on a mesh each one's shard by `param_spec` (overrides: {top-level key: PartitionSpec}, for the
    specs that depend on the device count). arg_specs / out_specs: the other inputs' and the
    outputs' specs, as `jax.shard_map` takes them.
    """
    arrays = jax.tree.map(lambda v: v[...], params, is_leaf=_is_var)
    if mesh is None:
        return body(arrays, *args)
    specs = jax.tree.map(param_spec, params, is_leaf=_is_var)
    specs = {**specs, **(overrides or {})}
    return tp_map(mesh, body, (specs, *arg_specs), out_specs)(arrays, *args)


_COLLECTIVES = [True]


@contextlib.contextmanager
def without_collectives():
    """BENCHMARK ONLY -- the results are wrong by design. Inside the block, `psum` (every
    all-reduce of the head-parallel blocks and the vocab-split embedding) traces as the identity,
    so a program traced here does the same local work without the collectives: timing it beside
    the real program shows what the all-reduces cost (bench/bench_speculative.py --no-comm).

    It acts at trace time: trace (jit) a fresh function inside the block, since a cached
    executable traced outside it keeps its collectives, and one traced inside keeps none."""
    _COLLECTIVES.append(False)
    try:
        yield
    finally:
        _COLLECTIVES.pop()


def psum(x):
    """Sum over the "tp" axis (inside `tp_map`); the identity under `without_collectives`."""
    return jax.lax.psum(x, TP) if _COLLECTIVES[-1] else x


def auto_mesh(mesh: Mesh | None) -> Mesh | None:
    """The mesh with every axis in Auto mode (jax.make_mesh defaults to Explicit axes in recent
    jax; the blocks here place their collectives themselves and leave the rest to GSPMD)."""
    if mesh is None:
        return None
    tp_size(mesh)
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(getattr(mesh, "axis_types", auto)) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
