"""Feed-forward blocks: the dense SwiGLU `MLP` and the `SparseMoE` block.

SparseMoE (Qwen3-Next / Qwen3.5-MoE):
    probs = softmax(x @ W_router) in fp32; top-k; renormalise (norm_topk_prob); cast to x's dtype
    routed = sum_k w_k * down_e(silu(gate_e x) * up_e x)
    out = routed + sigmoid(x @ w_shared_gate) * shared_expert(x)
Each token computes only its top-k experts: as grouped matmuls (`lax.ragged_dot`) over the
token-expert pairs sorted by expert, or, for few tokens (decode, verify at small batch), as
matrix-vector products with the chosen experts' weights gathered (`_gather_experts` says why).
`SparseMoE(expert_path=...)` (or `set_expert_path(model, ...)`) picks the path: "gather",
"grouped", "pallas" (the pairs cut into blocks of one expert each and run by the grouped Pallas
kernel, `gdn_jax.ops.moe.routed`; bf16 / fp16, interpreted off the GPU; it reads each chosen
expert's weights once per block) or "auto" (the default): "pallas" where its kernels run
compiled (`gdn_jax.ops.moe.runs_compiled`), else "gather" or "grouped" by the token count. On
an H200 (Qwen3.5-35B-A3B shape, 40 layers, 256 experts, top 8), a B = 32 decode step's kernels
take 19.4 ms through the Pallas kernel against 36.6 ms through ragged_dot
(bench/results/profile_step-h200-qwen3_5_moe_text-moe_paths-2026-12-01.json).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from gdn_jax.modules._linear import (HIGHEST, dense, dense_group, dense_group_partials,
                                     dense_swiglu, linear)
from gdn_jax.modules.sharding import TP, psum, shard_call, tp_metadata
from gdn_jax.ops import moe as moe_ops
from gdn_jax.ops.residual_norm import WeightedRows

_F32 = jnp.float32
EXPERT_PATHS = ("auto", "gather", "grouped", "pallas")


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)). x: [..., hidden] -> [..., hidden] in `dtype`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=HIGHEST, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        # On a ("tp",) mesh the intermediate dim splits: gate / up by columns, down by rows.
        self.gate_proj = linear(hidden_size, intermediate_size, sharding=(None, TP), **kw)
        self.up_proj = linear(hidden_size, intermediate_size, sharding=(None, TP), **kw)
        self.down_proj = linear(intermediate_size, hidden_size, sharding=(TP, None), **kw)
        self.mesh = None  # a ("tp",) Mesh, set by gdn_jax.models.sharding.shard_model

    def _params(self):
        """The parameters (nnx Variables) the body takes, by its names."""
        return dict(gate=self.gate_proj.kernel, up=self.up_proj.kernel, down=self.down_proj.kernel)

    def _proj(self):
        """dense's keywords for this block's projections."""
        lin = self.down_proj
        return dict(dtype=lin.dtype, precision=lin.precision)

    def __call__(self, x, *, partials: bool = False):
        """x: [..., hidden] -> [..., hidden] in dtype; partials: as [S, ..., hidden] partial sums
        of down_proj (`GatedDeltaNet`'s)."""
        body = functools.partial(_mlp_body, proj=self._proj())
        if self.mesh is not None:
            y = shard_call(self.mesh, _summed(body), self._params(), (x,), (P(),), P())
            return y[None] if partials else y
        return shard_call(None, functools.partial(body, partials=partials), self._params(),
                          (x,), (P(),), P())


def _summed(body):
    """body, its output summed over the shards (the down projection's partial sums)."""
    return lambda p, x: psum(body(p, x))


def _mlp_body(p, x, *, proj, partials=False):
    """SwiGLU on (a shard of) the intermediate dim; partial sums when sharded. proj: dense's
    keywords."""
    return dense_swiglu(x, p["gate"], p["up"], p["down"], **proj, partials=partials)


def _swiglu_down(gate, up, down, proj, partials=False):
    return dense(jax.nn.silu(gate) * up, down, **proj, partials=partials)


class SparseMoE(nnx.Module):
    """Softmax top-k routed experts plus a sigmoid-gated shared expert.

    Parameters: gate (router) kernel [hidden, E]; experts_gate_proj, experts_up_proj:
    [E, hidden, I]; experts_down_proj: [E, I, hidden]; shared_expert: MLP(hidden, I_shared);
    shared_expert_gate kernel [hidden, 1].
    x: [..., hidden] -> [..., hidden] in `dtype`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, *, norm_topk_prob: bool = True,
                 expert_path: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=HIGHEST, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.expert_path = _check_expert_path(expert_path)
        self.dtype, self.precision = dtype, precision
        self.gate = linear(hidden_size, num_experts, **kw)
        init = nnx.initializers.normal(0.02)
        E, H, I = num_experts, hidden_size, intermediate_size
        # On a ("tp",) mesh every expert's intermediate dim splits (gate / up by columns, down by
        # rows); the router and the shared-expert gate stay replicated.
        by_col, by_row = tp_metadata(None, None, TP), tp_metadata(None, TP, None)
        self.experts_gate_proj = nnx.Param(init(rngs.params(), (E, H, I), param_dtype), **by_col)
        self.experts_up_proj = nnx.Param(init(rngs.params(), (E, H, I), param_dtype), **by_col)
        self.experts_down_proj = nnx.Param(init(rngs.params(), (E, I, H), param_dtype), **by_row)
        self.shared_expert = MLP(hidden_size, shared_intermediate_size, **kw)
        self.shared_expert_gate = linear(hidden_size, 1, **kw)
        self.mesh = None  # a ("tp",) Mesh, set by gdn_jax.models.sharding.shard_model

    def __call__(self, x, *, partials: bool = False):
        """x: [..., hidden] -> [..., hidden] in dtype; partials: as [1, ..., hidden] (the routed
        and shared outputs are added in XLA: one partial sum), or, where the shared expert runs
        in the routed experts' launches on one device, as a `WeightedRows` of the expert rows,
        combined by the `add_rms_norm` that takes it (no launch of its own)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        p = dict(router=self.gate.kernel, shared_gate=self.shared_expert_gate.kernel,
                 eg=self.experts_gate_proj, eu=self.experts_up_proj, ed=self.experts_down_proj,
                 shared=self.shared_expert._params())
        body = functools.partial(
            _moe_body, proj=dict(dtype=self.dtype, precision=self.precision),
            shared_proj=self.shared_expert._proj(), top_k=self.top_k,
            norm_topk_prob=self.norm_topk_prob, num_experts=self.num_experts, dtype=self.dtype,
            precision=self.precision,
            expert_path=_check_expert_path(self.expert_path))
        if self.mesh is not None:
            body = _summed(body)
        else:
            body = functools.partial(body, gathered=partials)
        y = shard_call(self.mesh, body, p, (x,), (P(),), P())
        if isinstance(y, WeightedRows):
            return y.replace(lead=tuple(shape[:-1]))
        y = y.reshape(shape)
        return y[None] if partials else y


def _check_expert_path(path: str) -> str:
    if path not in EXPERT_PATHS:
        raise ValueError(f"SparseMoE: expert_path expected one of {EXPERT_PATHS}, got {path!r}")
    return path


def set_expert_path(model, path: str):
    """Set the expert path of every SparseMoE in `model` (any nnx graph; in place; returns it):
    "auto" (the module docstring), "gather" or "grouped" (always that one), or "pallas" (the
    grouped Pallas kernel, `gdn_jax.ops.moe`). The outputs are the same up to rounding; the time
    is not."""
    path = _check_expert_path(path)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SparseMoE):
            node.expert_path = path
    return model


def _moe_body(p, x, *, proj, shared_proj, top_k, norm_topk_prob, num_experts, dtype, precision,
              expert_path="auto", gathered=False):
    """SparseMoE on x [N, hidden] with (a shard of) every expert's intermediate dim: the routed
    and shared outputs are linear in the down projections, so shards return partial sums.
    proj, shared_proj: dense's keywords for the router and shared gate, and for the shared
    expert (the same unless changed after construction: then all four projections of x are one
    group). On the Pallas path, where GDN_JAX_MOE_SHARED asks for it
    (`gdn_jax.ops.moe.folds_shared`: by default at small token counts) a shared expert of the
    experts' size runs in the experts' launches, as one more expert, where its projections'
    keywords are the router's (proj == shared_proj); gathered: that path returns the
    `WeightedRows` of `gdn_jax.ops.moe.routed` (lead (N,))."""
    s = p["shared"]
    # read (and checked) whatever the path
    wants_fold = moe_ops.folds_shared(x.shape[0] * top_k, num_experts)
    # "auto" takes the kernel only where the experts are stored in the compute dtype: it reads
    # every expert's weights as they are, so others would be cast whole on every call
    if (expert_path == "auto" and p["eg"].dtype == jnp.dtype(dtype)
            and moe_ops.runs_compiled(dtype, x.shape[1], p["eg"].shape[2])):
        expert_path = "pallas"
    fold = (wants_fold and expert_path == "pallas" and shared_proj == proj
            and s["gate"].shape == p["eg"].shape[1:] and s["down"].shape == p["ed"].shape[1:])
    if fold:
        # the shared gate's one column goes with the router's launch (`route(shared_gate=)`),
        # which adds the router projection's partial sums as it loads them
        views = dense_group_partials(x, (p["router"],), dtype=dtype)
        (logits,) = views or dense_group(x, (p["router"],), **proj)
        x = x.astype(dtype)
        weights, ids = moe_ops.route(logits, top_k, normalize=norm_topk_prob,
                                     shared_gate=(x, p["shared_gate"].astype(dtype)))
        return _routed_pallas(p, x, weights, ids, num_experts=num_experts, dtype=dtype,
                              precision=precision, shared=s, gathered=gathered)
    if shared_proj == proj:
        logits, shared_logit, s_gate, s_up = dense_group(
            x, (p["router"], p["shared_gate"], s["gate"], s["up"]), **proj)
    else:
        logits, shared_logit = dense_group(x, (p["router"], p["shared_gate"]), **proj)
        s_gate, s_up = dense_group(x, (s["gate"], s["up"]), **shared_proj)
    weights, ids = moe_ops.route(logits, top_k, normalize=norm_topk_prob)
    if expert_path == "pallas":
        routed = _routed_pallas
    elif (_gather_experts(x.shape[0], top_k, num_experts) if expert_path == "auto"
          else expert_path == "gather"):
        routed = _routed_gathered
    else:
        routed = _routed_ragged
    routed = routed(p, x.astype(dtype), weights, ids, num_experts=num_experts, dtype=dtype,
                    precision=precision)
    shared = jax.nn.sigmoid(shared_logit) * _swiglu_down(s_gate, s_up, s["down"], shared_proj)
    return routed + shared


def _gather_experts(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether to gather the chosen experts' weights rather than run the grouped matmuls.

    XLA's GPU ragged_dot reads every expert's weights whatever the routing (a Qwen3-Next layer's
    512 experts: ~0.8 ms per decode step at any batch; bench/results/profile_step-h100-qwen3_next-
    2026-11-26.json), while gathering costs in proportion to the (token, expert) pairs. Measured
    on an H200 (4 Qwen3-Next layers, 512 experts, top 10; bench/results/bench_speculative-h200-
    qwen3_next-moe-2026-11-26.json): 10 pairs (decode, B = 1) 1.18 vs 3.77 ms a step, 40 pairs
    (verify of 4 tokens) 2.75 vs 4.01 ms, 80 pairs (decode, B = 8) 5.02 vs 4.39 ms. So: gather up
    to num_experts / 8 pairs."""
    return 8 * tokens * top_k <= num_experts


def _routed_ragged(p, x, weights, ids, *, num_experts, dtype, precision):
    """Grouped matmuls (`lax.ragged_dot`) over the (token, expert) pairs sorted by expert.
    x [N, hidden] in dtype, weights / ids [N, k] -> [N, hidden]."""
    N, H = x.shape
    flat = ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    token = order // ids.shape[1]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token]
    rmm = lambda a, w: lax.ragged_dot(a, w.astype(dtype), sizes, precision=precision)
    h = jax.nn.silu(rmm(xs, p["eg"])) * rmm(xs, p["eu"])
    y = rmm(h, p["ed"]) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((N, H), y.dtype).at[token].add(y)


def _routed_pallas(p, x, weights, ids, *, num_experts, dtype, precision, shared=None,
                   gathered=False):
    """The grouped Pallas kernel (`gdn_jax.ops.moe.routed`); its products are exact for 16-bit
    weights, so precision has nothing to say. Same arguments and result as `_routed_ragged`;
    shared: the shared expert's params, to run with the routed experts (weights [N, k + 1],
    its gate's last); gathered: the result as `routed`'s WeightedRows."""
    del num_experts, precision
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"SparseMoE: expert_path 'pallas' needs bf16 or fp16, got dtype {dtype}")
    w = [p[name][...].astype(dtype) for name in ("eg", "eu", "ed")]
    if shared is not None:
        shared = tuple(shared[name][...].astype(dtype) for name in ("gate", "up", "down"))
    return moe_ops.routed(x, weights.astype(dtype), ids, *w, shared=shared, gathered=gathered)


def _routed_gathered(p, x, weights, ids, *, num_experts, dtype, precision):
    """Each token's k chosen experts' weights gathered ([N, k, hidden, I]) and applied as batched
    matrix-vector products. Same arguments and result as `_routed_ragged`."""
    del num_experts
    ein = functools.partial(jnp.einsum, precision=precision)
    gate, up, down = (p[name][ids].astype(dtype) for name in ("eg", "eu", "ed"))
    h = jax.nn.silu(ein("nh,nkhi->nki", x, gate)) * ein("nh,nkhi->nki", x, up)
    y = ein("nki,nkih->nkh", h, down)
    return ein("nk,nkh->nh", weights.astype(y.dtype), y)
