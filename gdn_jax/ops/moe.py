"""`routed(...)`: the routed experts of a MoE block through the grouped Pallas kernel
(`gdn_jax.kernels.moe`), which reads each chosen expert's weights once per block of pairs.

    out = routed(x, weights, ids, w_gate, w_up, w_down)   # x [T, H], weights / ids [T, k]

w_gate, w_up: [E, H, I], w_down: [E, I, H] (a tensor-parallel shard: I split; the result is then
that shard's partial sum), all in x's dtype, bf16 or fp16. Returns [T, H] in x's dtype:
sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t) with e = ids[t, j].

`gdn_jax.modules.mlp.SparseMoE(expert_path="pallas")` calls it. On a CUDA GPU of compute
capability >= 8.0 the kernels run compiled; elsewhere (CPU tests) in the Pallas interpreter.

    weights, ids = route(logits, k, normalize=True)     # the router: softmax, top k, renormalised
    weights, ids = route(logits, k, shared_gate=(x, w))  # and a shared expert's sigmoid gate:
    out = routed(x, weights, ids, ..., shared=(gate, up, down))   # weights [T, k + 1]

`route` is the one-launch kernel (`gdn_jax.kernels.route`) for bf16 / fp16 logits where Triton
runs and the shape fits it, else XLA's softmax, lax.top_k and division (fp32 logits, say of a
model being trained: the kernel has no gradient); GDN_JAX_MOE_ROUTER (ROUTER_VAR) steers it:
"auto" (the default) or "pallas" (compiled where Triton runs), "interpret" (tests), "xla"; unset,
GDN_JAX_BACKEND=xla or interpret steers it too.
Measured on the H200, 2026-12-04, 40-layer 35B-shaped model (profile_step, router=auto vs xla,
bench/results/profile_step-h200-qwen3_5_moe_text-router_fold-2026-12-04.json): kernels per call
decode B = 1 3206 -> 3121 us, verify B = 1 5274 -> 5165, decode B = 32 14295 -> 14192, verify
B = 32 21421 -> 21383 (it replaces a softmax, a sort and a normalise fusion per MoE layer).

GDN_JAX_MOE_SHARED (SHARED_VAR; `folds_shared`) says where a MoE block's shared expert runs, where
its size is the routed experts' (Qwen3.5-35B-A3B, Qwen3-Next-80B: 512): "fold" as every token's
k + 1-th expert in `routed`'s launches (`routed(..., shared=...)`), "apart" as a SwiGLU of its
own (its gate / up in the router's group launch, its down a projection), "auto" (the default)
folded while the routed pairs get a block each (`one_block_per_pair`: decode and verify at
small B), apart beyond; folded, its sigmoid gate is a column of the router's launch (where XLA
ran the one-column product as a reduction, the sigmoid and a concatenation: ~4 us a layer at
B = 1, unmeasured since), which also adds the router projection's partial sums on load.
Measured on the H200, 2026-12-04, 40-layer 35B-shaped model (profile_step shared=fold vs
apart, kernels per call, bench/results/profile_step-h200-qwen3_5_moe_text-
columns_barrier-2026-12-04.json): B = 1 decode 3095 -> 3048 us, verify 4692 -> 4593; B = 32 decode
14181 -> 14260, verify 21368 -> 21482 (there the shared expert's 32 or 128 tokens take blocks
of 16 of their own, where apart reads its weights once).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

from gdn_jax import kernels
from gdn_jax.kernels import moe as _moe
from gdn_jax.ops.dispatch import Device, kernel_mode, sm_count as _sm_count
from gdn_jax.ops.projection import Partials, pow2_tile
from gdn_jax.ops.residual_norm import WeightedRows

ROUTER_VAR = "GDN_JAX_MOE_ROUTER"
SHARED_VAR = "GDN_JAX_MOE_SHARED"


def runs_compiled(dtype, hidden: int, intermediate: int) -> bool:
    """Whether the kernels run compiled here for experts of this dtype and (shard) shape: a CUDA
    GPU of SM80+, bf16 / fp16, dims that its tiles divide. `SparseMoE(expert_path="auto")` picks
    them there."""
    return (Device.of().runs_triton and jnp.dtype(dtype) in _moe.MOE_DTYPES
            and hidden % 16 == 0 and intermediate % 16 == 0)


def one_block_per_pair(pairs: int, num_experts: int) -> bool:
    """Whether to give every pair its own block (`kernels.moe.plan_pairs`) rather than group them
    by expert (`kernels.moe.plan`). Uniformly routed, P pairs re-read about P / (2 E) of the
    experts they touch; up to E / 4 pairs (a decode step at B <= 8 with 256 experts, top 8)
    that is <= 1/8, and the plan's launches cost more (measured when `plan` sorted)."""
    return 4 * pairs <= num_experts


def config_for(pairs: int, num_experts: int, K: int, N: int, *,
               sm_count: int = 132) -> _moe.MoEConfig:
    """Blocks of 16 pairs while experts get few tokens each (decode, verify), 64 beyond; the
    widest weight tile up to [128, 64] that the expert's dims take, its columns narrowed (to 32
    at least) while the blocks are too few to give every SM a program (a decode step at B = 1
    has 8-10 blocks: 64 columns of a 512-wide expert would leave half the SMs idle). Narrower
    than that costs more than it gains: on the H200, 2026-12-04, the 35B gate / up of a B = 1
    verify (32 blocks) took 45.0 us a layer at 32 columns (512 programs), 33.0 at 64 (256), the
    down of a B = 1 decode (8 blocks) 7.2 at 32 (512), 6.6 at 64 (256) (bench/results/
    profile_step-h200-qwen3_5_moe_text-{router_fold,columns_barrier}-2026-12-04.json,
    bench_moe-h200-{sweep,columns}-2026-12-04.json).

    K stays whole (splits = 1). Split-K measured on the H200, 2026-12-04, 40-layer 35B-shaped
    decode at B = 1 (bench/results/profile_step-h200-qwen3_5_moe_text-b1-moe_split_k-*.json):
    gate / up at 64 columns in 2 slices took 11.3 us a layer where this config takes 14.0, but
    the down call forming silu(gate) * up from the fp32 partial sums took 13.9 where it takes
    7.4 from h: the step 3373 vs 3208 us of kernels. With that down forming h from only the
    real rows, and with each block's one real row formed alone (not its 16-row tile), both
    were slower again on an H100, 2026-12-06, 20-layer 35B-shaped model at B = 1 (chained
    decode 1.773 ms split against 1.712-1.726 whole; row's kernels 3177 against 2973 us a
    decode: bench/results/*-h100-qwen3_5_moe_text-20layers-b1-pairs*-2026-12-06.json) and
    were dropped (they were GDN_JAX_MOE_PAIRS=split and =row)."""
    block_m = 16 if pairs <= 16 * num_experts else 64
    blocks = pairs if one_block_per_pair(pairs, num_experts) else \
        _moe.num_blocks(pairs, num_experts, block_m)
    block_n = pow2_tile(N, 64)
    while block_n > 32 and N % (block_n // 2) == 0 and blocks * (N // block_n) < sm_count:
        block_n //= 2
    return _moe.MoEConfig(block_m=block_m, block_n=block_n, block_k=pow2_tile(K, 128))


def routed(x, weights, ids, w_gate, w_up, w_down, *, shared=None,
           interpret: bool | None = None,
           configs: tuple[_moe.MoEConfig, _moe.MoEConfig] | None = None, gathered: bool = False):
    """Module docstring. interpret: None = compiled on a CUDA GPU (SM80+), else interpreted.
    configs: the gate / up and the down kernels' (default `config_for`'s; a benchmark's).
    shared: (gate [H, I], up [H, I], down [I, H]) in x's dtype, a shared expert of the routed
    experts' size run as every token's k + 1-th expert in the same launches (its tokens in
    blocks of their own: its weights read once per block); weights are then [T, k + 1], the
    last the shared expert's (a sigmoid gate's, say: `route(..., shared_gate=)` appends it):
    the result adds weights[t, k] * down(silu(gate x_t) * up x_t); its down output is rounded
    by the down call as the routed ones are, and the weighted sum of all k + 1 taken in fp32
    and rounded once.
    gathered: return the result as a `WeightedRows` (the down kernel's rows, each token's rows
    and weights; `value()` is the result) for `add_rms_norm` to combine as it loads them (with
    the shared counters of the same revision, H200, 40-layer 35B-shaped B = 1 decode, kernel
    time: 2865 -> 2770 us, 572 -> 465 launches: bench/results/profile_step-h200-
    qwen3_5_moe_text-b1-*-2026-12-05.json)."""
    T, H = x.shape
    E, _, I = w_gate.shape
    k, more = ids.shape[-1] if ids.ndim else 0, " + 1" if shared is not None else ""
    if ids.ndim != 2 or ids.shape[0] != T or weights.shape != (T, k + bool(more)):
        raise ValueError(f"routed: ids expected [T, k] and weights [T, k{more}] with T = {T}, "
                         f"got ids{list(ids.shape)} and weights{list(weights.shape)}")
    if w_gate.shape != (E, H, I) or w_up.shape != (E, H, I) or w_down.shape != (E, I, H):
        raise ValueError(f"routed: expert weights expected [E, H, I], [E, H, I], [E, I, H] with "
                         f"H = {H}, got {list(w_gate.shape)}, {list(w_up.shape)}, "
                         f"{list(w_down.shape)}")
    lone = {}
    if shared is not None:
        if not isinstance(shared, (tuple, list)) or len(shared) != 3:
            raise ValueError("routed: shared expected (gate, up, down)")
        s_gate, s_up, s_down = shared
        if (s_gate.shape, s_up.shape, s_down.shape) != ((H, I), (H, I), (I, H)):
            raise ValueError(f"routed: shared expected gate [H, I], up [H, I], down [I, H] with "
                             f"H = {H}, I = {I}, got {[list(a.shape) for a in shared]}")
        if any(a.dtype != x.dtype for a in shared):
            raise ValueError(f"routed: shared expected x's dtype {x.dtype}, got "
                             f"{[str(a.dtype) for a in shared]}")
        lone = dict(gate=dict(w_shared=s_gate, w_up_shared=s_up), down=dict(w_shared=s_down))
    if interpret is None:
        interpret = not Device.of().runs_triton
    up_cfg, down_cfg = configs or default_configs(ids.size, T, E, H, I,
                                                  shared=shared is not None)
    if up_cfg.block_m != down_cfg.block_m:
        raise ValueError(f"routed: configs expected one block_m, got {up_cfg.block_m} and "
                         f"{down_cfg.block_m}")
    blocks = plan_blocks(ids, E, up_cfg.block_m, shared=shared is not None)
    h = kernels.grouped_matmul(x, w_gate, blocks.block_expert, w_up=w_up,
                               row_token=blocks.row_token, shared_blocks=blocks.shared_blocks,
                               config=up_cfg, interpret=interpret,
                               **lone.get("gate", {}))
    split = dict(swiglu=True, row_token=blocks.row_token, num_tokens=T) \
        if up_cfg.splits > 1 else {}
    y = kernels.grouped_matmul(h, w_down, blocks.block_expert, shared_blocks=blocks.shared_blocks,
                               config=down_cfg, interpret=interpret, **split,
                               **lone.get("down", {}))
    if gathered:
        return WeightedRows(y, blocks.token_rows(weights, T), weights, (T,), jnp.dtype(x.dtype))
    return blocks.combine(y, weights, T, dtype=x.dtype)


def default_configs(pairs: int, tokens: int, num_experts: int, H: int, I: int, *,
                    shared: bool = False, sm_count: int | None = None):
    """`routed`'s (gate / up, down) configs (`config_for`) for `pairs` routed pairs of `tokens`
    tokens over num_experts experts of [H, I]; shared: one more expert, every token's pair
    more. sm_count: this device's by default."""
    sms = sm_count or _sm_count()
    pairs, experts = pairs + shared * tokens, num_experts + shared
    return (config_for(pairs, experts, H, I, sm_count=sms),
            config_for(pairs, experts, I, H, sm_count=sms))


def plan_blocks(ids, num_experts: int, block_m: int, *, shared: bool = False) -> _moe.Blocks:
    """ids: [T, k] -> `routed`'s `kernels.moe.Blocks`: a block each for the pairs while
    `one_block_per_pair` (decided on the routed pairs), else grouped by expert; shared: expert
    num_experts as every token's k + 1-th (its tokens in blocks of their own: past
    block_expert's where a block each, `Blocks.shared_blocks`)."""
    if one_block_per_pair(ids.size, num_experts):
        return _moe.plan_pairs(ids, block_m, shared=shared)
    if shared:
        ids = jnp.concatenate([ids.astype(jnp.int32),
                               jnp.full((ids.shape[0], 1), num_experts, jnp.int32)], 1)
    return _moe.plan(ids, num_experts + shared, block_m)


# The router kernel's warps for one row (a B = 1 decode): its top-k rounds are a chain of
# reductions, each a barrier at more than one warp. bench/bench_moe.py --router-warps, H100,
# 256 logits top 8: 1 / 2 / 4 / 8 warps 2.49 / 2.81 / 3.03 / 3.47 us
# (bench/results/bench_moe-h100-router_warps-2026-12-05.json). More rows keep 4 (unmeasured).
_ROUTE_WARPS_ONE_ROW = 1


def route(logits, k: int, *, normalize: bool = True, shared_gate=None):
    """logits: [T, E] (or a `Partials` view of them, lead (T,): the router's projection's
    partial sums, which the kernel adds on load) -> (weights [T, k] in logits' dtype, ids
    [T, k] int32): each row's k likeliest experts under the softmax over E, their
    probabilities (with normalize, over the k chosen ones' sum). The one-launch kernel for
    16-bit logits where it runs and takes the shape, else XLA's steps (module docstring): the
    same ids where the probabilities come out as XLA's (`gdn_jax.kernels.route`), the weights
    within the fp32 sums' order.

    shared_gate: (x [T, H], w [H, 1] or [H]) in one float dtype, a shared expert's sigmoid
    gate: weights [T, k + 1], the last sigmoid(x_t . w) (fp32 products and sum, one rounding),
    as `routed` takes them with `shared=`; the kernel computes it in its launch where H is a
    power of two, else XLA after it."""
    view = isinstance(logits, Partials)
    if view and len(logits.lead) != 1:
        raise ValueError(f"route: a Partials view of logits expected lead (T,), got lead "
                         f"{logits.lead}")
    shape = (logits.lead[0], logits.width) if view else logits.shape
    gate = kernels.route_shared_gate(shared_gate, shape[0])  # checked on every path
    mode = kernel_mode(ROUTER_VAR)
    if (mode and jnp.dtype(logits.dtype) in _moe.MOE_DTYPES
            and kernels.route_misfit(shape, k) is None):
        # a gate of H inputs that is no Triton block (not a power of two) joins after it
        inside = gate is not None and kernels.route_misfit(shape, k, gate[1].shape[0]) is None
        parts = dict(parts_dtype=logits.dtype, col=logits.start,
                     num_experts=logits.width) if view else {}
        weights, ids = kernels.route(logits.parts if view else logits, k=k,
                                     normalize=normalize, shared_gate=gate if inside else None,
                                     interpret=mode == "interpret",
                                     num_warps=_ROUTE_WARPS_ONE_ROW if shape[0] == 1 else 4,
                                     **parts)
        if gate is None or inside:
            return weights, ids
        return _with_gate(weights, gate).astype(logits.dtype), ids
    if view:
        logits = logits.value()
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_i = lax.top_k(probs, k)
    if normalize:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if gate is not None:
        top_w = _with_gate(top_w, gate)
    return top_w.astype(logits.dtype), top_i.astype(jnp.int32)


def _with_gate(weights, gate):
    """weights [T, k] and (x [T, H], w [H]) -> [T, k + 1] fp32, the last sigmoid(x . w) (fp32
    products and sum, as the router kernel's)."""
    x, w = gate
    logit = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)[:, None],
                    precision=lax.Precision.HIGHEST)
    # XLA makes the one-column product a multiply and reduce and fuses it into the
    # concatenation, whose emitter runs each sum in one thread (31 us a layer at T = 4 on the
    # H200): the barrier keeps it a reduction fusion of its own
    gate_w = lax.optimization_barrier(jax.nn.sigmoid(logit))
    return jnp.concatenate([weights.astype(jnp.float32), gate_w], axis=1)


def folds_shared(pairs: int, num_experts: int) -> bool:
    """Whether a MoE block of `pairs` routed (token, expert) pairs over num_experts runs its
    shared expert in the routed experts' launches, as SHARED_VAR asks (module docstring):
    "fold" yes, "apart" no, "auto" (the default) where `one_block_per_pair`. Read at trace
    time."""
    wish = os.environ.get(SHARED_VAR) or "auto"
    if wish not in ("auto", "apart", "fold"):
        raise ValueError(f"{SHARED_VAR}: expected auto, apart or fold, got {wish!r}")
    return wish == "fold" or (wish == "auto" and one_block_per_pair(pairs, num_experts))
