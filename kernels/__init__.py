"""Pallas GPU kernels for GDN decode and MTP verify (installed as `gdn_jax.kernels`).

Depends on jax only: no Flax, no model code, nothing from the rest of gdn_jax. This module is the
kernels' public face: callers (gdn_jax.ops, the benchmarks) use the names below and nothing
private. The kernels without a suffix are lowered through Pallas-Triton (`_pallas.py` is the one
place that knows it); the `*_mgpu` ones are the same decode and verify as Pallas Mosaic GPU
kernels for Hopper and later (`_mgpu.py` holds what is bound to Mosaic GPU and its differences
across jax versions; `_tokens_mgpu.py` the pipeline its three kernels share).

    o, pool = decode(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                     count, slots, config=TuningConfig(...))
    o, inter = verify_intermediate(...same arguments, T in 1..MAX_T...)   # pool untouched
    o, pool = verify_replay(...same arguments...)                         # pool := folded state
    pool = fold(pool, cand_k, cand_v, cand_g, cand_beta, count, slots, config=TuningConfig(...))

    y = project(x, w, config=ProjectionConfig(...))   # x [M <= PROJECTION_MAX_M, K] @ w [K, N]:
                                         # the model's projections at the weight's read bandwidth
    parts = project(x, w, config=..., partials=True)  # [splits, M, N] fp32 (unsplit: [1, M,
                                         # N] in x's dtype), unadded
    y = project_swiglu(gate_up, w_down, config=...)    # silu(gate) * up @ w_down, one launch
    h = project_glu(x, w_gate, w_up, config=...)       # silu(x @ w_gate) * (x @ w_up),
                                         # formed in one launch's epilogue
    y = project_gated_norm(o, z, norm_w, w_out, eps=eps, config=...)   # GDN norm, then out_proj
    outs, conv = project_conv(x, (w_qkvz, w_ba), conv, conv_w, slots, widths=..., config=...)
                                         # GDN's in_proj and its conv (decode, or verify's
                                         # T tokens: keep="all"), one launch
    r, h = add_rms_norm(x_res, parts, norm_w, eps=1e-6)  # residual add + RMSNorm, one launch
    y = gated_rms_norm(o, z, norm_w, eps=1e-6)           # GDN's output norm, one launch
    q, k, v = project_group(x, (w_q, w_k, w_v), config=ProjectionConfig(...))  # one launch
    gate, up = project_group_mgpu(x, (w_gate, w_up), config=MosaicProjectionConfig(...))
                                         # the same on Hopper (8..128 rows, bf16): TMA, wgmma,
                                         # stream-K over the SMs; fp32 out
    o = decode_attention(q, k_cache, v_cache, slots, pos, config=AttentionConfig(...))
                                         # attention over each row's used KV length, in place
    qr, pr, k_cache, v_cache = attention_prologue(Source(parts, start, stride), ..., T=T, ...)
    o = decode_attention_rows(qr, pr, k_cache, v_cache, slots, T=T, num_heads=nH, config=...)
                                         # the same, q / k norms, RoPE and the cache write in
                                         # one launch before it
    h = grouped_matmul(x_rows, w_gate, block_expert, w_up=w_up, config=MoEConfig(...))
                                         # MoE experts, each chosen expert read once per block
    weights, ids = route(logits, k=8, normalize=True)   # the MoE router: softmax, top k and
                                         # their renormalisation in one launch

    table = scatter_rows(table, index, rows, config=ScatterConfig(...))
                                         # table[index[i]] = rows[i] in place (cache bookkeeping)
    tables = shift_rows_group(tables, slots, starts, width=w, config=ScatterConfig(...))
                                         # rows starts[b]..+w-1 of slot slots[b] to 0..w-1, in
                                         # place (a commit's conv windows, all layers in one)
    (q, k, v), conv = conv_step(x, conv, weight, slots, widths=(HK, HK, HVV), config=ConvConfig())
                                         # the GDN layer's causal conv for one token, in place

    o, cand_v, pool = verify_ring(...same arguments, T in 1..RING_MAX_T, reserve=...)  # ring
                                         # mode (cand_v: the ring's corrected values u, fp32,
                                         # this call's written in place): pool written only
                                         # where the committed ring folds

    o, pool = decode_mgpu(...same arguments as decode..., config=MosaicConfig(...))  # SM90+
    o, pool = verify_replay_mgpu(...same arguments as verify_replay...)  # MosaicConfig(wy=True):
                                         # the matrix (WY) form, its state products on Hopper's
                                         # tensor cores (bf16 pool, tokens and candidates)
    o, inter = verify_intermediate_mgpu(...same arguments as verify_intermediate...)
    o, cand_v, pool = verify_ring_mgpu(...same arguments as verify_ring..., T <= 8, W in
                                  (16, 32), T x W <= 128)  # ring mode in matrix form (bf16)

The caller owns `count` and the candidates (set count := 0, store new candidates, in XLA; the
ring kernels write their tokens' u into the ring themselves).
Each kernel takes its launch parameters as one frozen, hashable config (a static argument).

Limits: T <= MAX_T tokens per call (the Mosaic GPU kernels: T, T_max <= MOSAIC_MAX_T); pool
dtypes POOL_DTYPES; K and V powers of two (Triton blocks). The Mosaic GPU kernels also need what
`mosaic_head_dims_misfit` and `mosaic_misfit` say (K, V multiples of 64, K <= MOSAIC_MAX_K, the
SMEM of one CTA) and a jax that builds them (`mosaic_unavailable`).
"""

from . import _mgpu
from ._common import MAX_T, POOL_DTYPES, Dims, Dtypes, pow2_block
from ._mgpu import MAX_K as MOSAIC_MAX_K
from ._mgpu import MosaicConfig
from ._mgpu import head_dims_misfit as mosaic_head_dims_misfit
from ._pallas import TuningConfig, capability
from ._ring_wy_mgpu import MAX_T as MOSAIC_RING_MAX_T
from ._tokens_mgpu import MAX_T as MOSAIC_MAX_T
from ._tokens_mgpu import MODES as MOSAIC_MODES
from ._tokens_mgpu import misfit as mosaic_misfit
from .attention import (ATTENTION_DTYPES, ATTENTION_MAX_ROWS, AttentionConfig,
                        decode_attention, decode_attention_rows)
from .attention_prologue import PrologueConfig, Source, attention_prologue
from .attention_prologue import misfit as attention_prologue_misfit
from .conv import ConvConfig, conv_step
from .decode import decode
from .decode_mgpu import decode_mgpu
from .fold import fold
from .moe import MOE_DTYPES, MoEConfig, grouped_matmul
from .projection import (PROJECTION_MAX_M, ProjectionConfig, project, project_gated_norm,
                         project_glu, project_group, project_swiglu)
from .projection import block_m as projection_block_m
from .projection import misfit as projection_misfit
from .projection import smem_limit as projection_smem_limit
from .projection import source_bytes as projection_source_bytes
from .projection_conv import misfit as projection_conv_misfit
from .projection_conv import project_conv
from .projection_mgpu import MosaicProjectionConfig, project_group_mgpu
from .projection_mgpu import misfit as projection_mgpu_misfit
from .residual_norm import (NORM_DTYPES, GatedNormConfig, NormConfig, add_rms_norm,
                            gated_rms_norm)
from .residual_norm import gated_misfit as gated_rms_norm_misfit
from .residual_norm import misfit as add_rms_norm_misfit
from .ring import RING_MAX_T, RING_MIN, verify_ring
from .router import misfit as route_misfit
from .router import route
from .router import shared_gate_args as route_shared_gate
from .scatter import ScatterConfig, scatter_rows, scatter_rows_group, shift_rows_group
from .verify import verify_intermediate, verify_replay
from .verify_mgpu import verify_intermediate_mgpu, verify_replay_mgpu, verify_ring_mgpu


def mosaic_unavailable() -> str | None:
    """None when this jax can build the Mosaic GPU kernels, else why not."""
    return _mgpu.unavailable()


__all__ = ["ATTENTION_DTYPES", "ATTENTION_MAX_ROWS", "MAX_T", "MOE_DTYPES", "MOSAIC_MAX_K",
           "MOSAIC_MAX_T", "MOSAIC_MODES", "MOSAIC_RING_MAX_T", "NORM_DTYPES", "POOL_DTYPES",
           "PROJECTION_MAX_M", "RING_MAX_T", "RING_MIN", "AttentionConfig", "ConvConfig", "Dims",
           "Dtypes", "GatedNormConfig", "MoEConfig", "MosaicConfig", "MosaicProjectionConfig",
           "NormConfig", "ProjectionConfig", "PrologueConfig", "ScatterConfig", "Source",
           "TuningConfig",
           "add_rms_norm", "add_rms_norm_misfit", "attention_prologue",
           "attention_prologue_misfit", "capability", "conv_step", "decode", "decode_attention",
           "decode_attention_rows", "decode_mgpu", "fold", "gated_rms_norm",
           "gated_rms_norm_misfit", "grouped_matmul", "mosaic_head_dims_misfit", "mosaic_misfit",
           "mosaic_unavailable",
           "project", "project_conv", "project_gated_norm", "project_glu", "project_group",
           "project_group_mgpu", "project_swiglu", "projection_block_m",
           "projection_conv_misfit", "projection_mgpu_misfit", "projection_misfit",
           "projection_smem_limit",
           "projection_source_bytes", "pow2_block", "route", "route_misfit", "route_shared_gate",
           "scatter_rows", "scatter_rows_group", "shift_rows_group", "verify_intermediate",
           "verify_intermediate_mgpu",
           "verify_replay", "verify_replay_mgpu", "verify_ring", "verify_ring_mgpu"]
