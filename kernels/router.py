"""The router of a MoE block: the softmax over the experts, the top k and their renormalisation
in one launch.

XLA runs a MoE router in three launches a layer or more: the softmax (a Triton fusion), the top
k (a sort of every row: 4.0 us at one row of 256 experts on the H200) and the renormalisation
with the casts (bench/results/profile_step-h200-qwen3_5_moe_text-b1-moe_split_k-off-2026-12-04.
json: 40 layers of the 35B shape at B = 1). Here program t takes row t of the logits whole:

    weights, ids = route(logits, k=8, normalize=True)   # [T, E] -> [T, k] logits' dtype, int32

The probabilities are exp(l - max) / sum in fp32, as XLA's softmax computes them, ranked as
lax.top_k ranks them (equal ones, ties or underflows to 0, to the lower index first), the k
largest found by k rounds of max over the experts not yet taken (k distinct experts in range
whatever the logits: a NaN row takes the lowest indices left); with normalize each chosen one
is divided by the chosen ones' sum (Qwen3-Next's norm_topk_prob) before one rounding to the
logits' dtype. The ids are top_k's wherever the exp and the sum come out as XLA's do: their
last bits may differ, and then so may the order of two probabilities an ulp apart.
E must be a power of two (one row is one Triton block); k <= E.

A MoE block whose shared expert runs as every token's k + 1-th (`gdn_jax.ops.moe.routed`) takes
its sigmoid gate from the same launch, where XLA would run the one-column product as a reduction
of its own, the sigmoid and a concatenation with the routed weights (on the H200, 40 layers of
the 35B shape at B = 1, profiled 2026-12-04: 1.6 + 1.2 + 1.1 us a layer; unmeasured since):

    weights, ids = route(logits, k=8, shared_gate=(x, w))  # x [T, H], w [H] -> weights [T, k + 1]

weights[:, k] = sigmoid(x_t . w): exact products (16-bit inputs) summed in fp32, the sigmoid in
fp32, rounded once. H must be a power of two too.

The logits may come as the router projection's split-K partial sums ([S, T, N] fp32, or S = 1
in the projection's dtype: `kernels.project_group(..., partials=True)`), added and rounded to
the projection's dtype on load: XLA's reduction and cast between the two launches go.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _pallas
from ._common import is_pow2, pow2_at_least

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Launch:  # a row of 256-512 logits: a few registers a thread at 4 warps
    num_warps: int = 4
    num_stages: int = 1


WARPS = (1, 2, 4, 8)  # the launches `route` takes (bench/bench_moe.py times them)


def misfit(logits_shape, k: int, hidden: int | None = None) -> str | None:
    """Why `route` cannot take logits of this shape and k (and a shared gate of `hidden`
    inputs), or None."""
    if len(logits_shape) != 2:
        return (f"logits expected [T, E] (or [S, T, N] partial sums), got shape "
                f"{tuple(logits_shape)}")
    E = logits_shape[1]
    if not is_pow2(E) or E < 2:
        return f"E={E} experts is not a power of two >= 2 (a row is one block)"
    if not 1 <= k <= E:
        return f"k={k} is outside 1..E={E}"
    if hidden is not None and not is_pow2(hidden):
        return f"the shared gate's H={hidden} is not a power of two (a row is one block)"
    return None


def _kernel(logits_ref, *refs, k: int, cols: int, normalize: bool,
            columns: tuple[int, int] | None):
    gate_refs, (w_ref, ids_ref) = refs[:-2], refs[-2:]
    t = pl.program_id(0)
    if columns is None:
        E = logits_ref.shape[1]
        logit = logits_ref[t, :].astype(_F32)
    else:  # a projection's partial sums: added, rounded as the projection's output would be
        col, E = columns
        logit = functools.reduce(lambda a, b: a + b, [
            logits_ref[s, t, pl.ds(col, E)].astype(_F32) for s in range(logits_ref.shape[0])])
        logit = logit.astype(w_ref.dtype).astype(_F32)
    expert = lax.broadcasted_iota(jnp.int32, (E,), 0)
    # A row's cols weights and k ids in vectors of the powers of two at or above (a Triton
    # block), lane j holding slot j % n: the lanes past n repeat the first ones, so every lane
    # stores its slot's value at its slot's place in the flat outputs (no mask, no slice after).
    lane_w, lane_i = (lax.broadcasted_iota(jnp.int32, (pow2_at_least(n),), 0) for n in (cols, k))
    slot_w, slot_i = lax.rem(lane_w, cols), lax.rem(lane_i, k)
    unnormalised = jnp.exp(logit - jnp.max(logit))
    total = jnp.sum(unnormalised)
    prob = unnormalised / total  # what lax.top_k ranks in XLA's path
    # A NaN row (one NaN in the sum makes every probability NaN) ranks as all equal: its k
    # lowest experts, with NaN weights. Taken experts drop to -1, below every probability.
    left = jnp.where(total == total, prob, 0.0)
    ids, chosen = jnp.zeros(slot_i.shape, jnp.int32), jnp.zeros(slot_w.shape, _F32)
    once = jnp.zeros(lane_i.shape, _F32)  # the k chosen once each: their sum's order as k's
    for j in range(k):  # k rounds: the likeliest expert left, the lowest index among equals
        best = jnp.max(left)
        first = jnp.min(jnp.where(left == best, expert, E))
        ids = jnp.where(slot_i == j, first, ids)
        chosen = jnp.where(slot_w == j, best, chosen)
        once = jnp.where(lane_i == j, best, once)
        left = jnp.where(expert == first, -1.0, left)
    chosen = jnp.where(total == total, chosen, jnp.nan)
    if normalize:
        chosen = chosen / jnp.sum(once)
    if gate_refs:  # the shared expert's weight, after the routed ones' normalisation
        x_ref, gw_ref = gate_refs
        gate_logit = jnp.sum(x_ref[t, :].astype(_F32) * gw_ref[:].astype(_F32))
        chosen = jnp.where(slot_w == k, jax.nn.sigmoid(gate_logit), chosen)
    plgpu.store(w_ref.at[t * cols + slot_w], chosen.astype(w_ref.dtype))
    plgpu.store(ids_ref.at[t * k + slot_i], ids)


@functools.partial(jax.jit, static_argnames=("k", "normalize", "interpret", "num_warps",
                                             "parts_dtype", "col", "num_experts"))
def route(logits: jax.Array, *, k: int, normalize: bool = True,
          shared_gate: tuple[jax.Array, jax.Array] | None = None, interpret: bool = False,
          num_warps: int = 4, parts_dtype=None, col: int = 0,
          num_experts: int | None = None) -> tuple[jax.Array, jax.Array]:
    """logits: [T, E] (any float dtype; E a power of two) -> (weights [T, k] in logits' dtype,
    ids [T, k] int32), each row's experts in descending order of logit (module docstring).
    shared_gate: (x [T, H], w [H] or [H, 1]) in one float dtype (H a power of two): weights
    [T, k + 1], the last sigmoid(x_t . w). num_warps: a program's (one of WARPS); the kernel is
    named gdn_moe_route_w{num_warps}.

    logits may be [S, T, N] instead: a projection's split-K partial sums (fp32; S = 1: its
    output), the experts its columns col..col + num_experts - 1 (default: col..N - 1), added in
    fp32 in the order s = 0..S - 1 and rounded to parts_dtype (the projection's output dtype;
    default logits') on load, where XLA would add them (in an order of its own: an ulp apart
    from S = 3 on) and round in a launch of its own; the weights then in parts_dtype."""
    columns, dtype = None, jnp.dtype(parts_dtype or logits.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"route: parts_dtype expected a float dtype, got {dtype}")
    if logits.ndim == 3:
        E = logits.shape[2] - col if num_experts is None else num_experts
        if col < 0 or E < 1 or col + E > logits.shape[2]:
            raise ValueError(f"route: col={col} and num_experts={num_experts} expected columns "
                             f"inside the partial sums' N = {logits.shape[2]}, got "
                             f"{col}..{col + E - 1}")
        columns, shape = (col, E), (logits.shape[1], E)
    elif parts_dtype is not None or col or num_experts is not None:
        raise ValueError("route: parts_dtype, col and num_experts go with [S, T, N] partial "
                         f"sums, got logits{list(logits.shape)}")
    else:
        shape = logits.shape
    T = shape[0]
    gate = shared_gate_args(shared_gate, T)
    why = misfit(shape, k, None if gate is None else gate[1].shape[0])
    if why:
        raise ValueError(f"route: {why}")
    if num_warps not in WARPS:
        raise ValueError(f"route: num_warps expected one of {WARPS}, got {num_warps!r}")
    cols = k + (gate is not None)
    if T == 0:
        return jnp.zeros((0, cols), dtype), jnp.zeros((0, k), jnp.int32)
    weights, ids = _pallas.pallas_call(
        functools.partial(_kernel, k=k, cols=cols, normalize=normalize, columns=columns),
        name=f"gdn_moe_route_w{num_warps}",
        config=_Launch(num_warps=num_warps),
        interpret=interpret,
        grid=(T,),
        # flat: [T, k] as the reshape of [T * k] is free, where a slice of a [T, 16] block to
        # k = 10 (Qwen3-Next) was a copy launch before the expert kernels
        out_shape=(jax.ShapeDtypeStruct((T * cols,), dtype),
                   jax.ShapeDtypeStruct((T * k,), jnp.int32)),
    )(logits, *(gate or ()))
    return weights.reshape(T, cols), ids.reshape(T, k)


def shared_gate_args(shared_gate, T: int):
    """`route`'s shared_gate for T rows, checked: (x [T, H], w [H]) or None; a ValueError
    naming what is wrong."""
    if shared_gate is None:
        return None
    if not isinstance(shared_gate, (tuple, list)) or len(shared_gate) != 2:
        raise ValueError("route: shared_gate expected (x [T, H], w [H])")
    x, w = shared_gate
    H = x.shape[-1] if x.ndim == 2 else None
    if not (hasattr(w, "shape") and hasattr(w, "dtype")):
        raise ValueError(f"route: shared_gate expected w an array [H], got {type(w).__name__}")
    if x.ndim != 2 or x.shape[0] != T or w.shape not in ((H,), (H, 1)):
        raise ValueError(f"route: shared_gate expected x [T, H] with T = {T} and w [H] or "
                         f"[H, 1], got x{list(x.shape)} and w{list(w.shape)}")
    if x.dtype != w.dtype or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"route: shared_gate expected x and w in one float dtype, got "
                         f"{x.dtype} and {w.dtype}")
    return x, w.reshape(H)
