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
"""

from __future__ import annotations

import jax
import numpy as np
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


def psum(x):
    return jax.lax.psum(x, TP)


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
