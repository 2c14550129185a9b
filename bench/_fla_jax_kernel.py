"""The Triton kernel bench/fla_jax.py launches through jax-triton: fla's fused_recurrent forward
kernel (fla-core 0.6.0), called as a function from a kernel whose parameters are in
`jax_triton.triton_call`'s order (array inputs, scalars, outputs, then constexprs by name).
Imported only by bench/fla_jax.py, lazily: it needs triton and fla (with torch)."""

import triton
import triton.language as tl
from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel

# The JITFunction under @triton.heuristics: a Heuristics object cannot be called from a kernel.
# bench/fla_jax.py's launch_config computes the heuristics' values instead.
_fla_fwd = fused_recurrent_gated_delta_rule_fwd_kernel.fn


@triton.jit
def fused_recurrent_gated_delta_rule_fwd_jax(
    q, k, v, g, beta, A_log, dt_bias, h0, scale, T, o, ht,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
    USE_QK_L2NORM_IN_KERNEL: tl.constexpr, IS_BETA_HEADWISE: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    STATE_V_FIRST: tl.constexpr, USE_GATE_IN_KERNEL: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    APPLY_BETA_SIGMOID: tl.constexpr, ALLOW_NEG_EIGVAL: tl.constexpr,
):
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; A_log, dt_bias [HV]; h0 the initial
    state ([B, HV, V, K] if STATE_V_FIRST else [B, HV, K, V]); scale fp32; T int32 (a constexpr
    when 1: jax-triton's specialisation). Outputs o [B, T, HV, V] and ht (h0's layout, fp32).
    Grid (cdiv(V, BV) * B * HV,), as fla's launcher. A pointer whose flag is off is never read."""
    # By keyword, so a reordering of fla's parameters cannot mis-bind silently; gk, gv and
    # cu_seqlens are None, as fla's launcher passes them for equal-length rows without gk/gv.
    _fla_fwd(q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=A_log, dt_bias=dt_bias,
             o=o, h0=h0, ht=ht, cu_seqlens=None, scale=scale, T=T, H=H, HV=HV, K=K, V=V,
             BK=BK, BV=BV, USE_G=USE_G, USE_GK=False, USE_GV=False,
             USE_QK_L2NORM_IN_KERNEL=USE_QK_L2NORM_IN_KERNEL, IS_BETA_HEADWISE=IS_BETA_HEADWISE,
             USE_INITIAL_STATE=USE_INITIAL_STATE, STORE_FINAL_STATE=STORE_FINAL_STATE,
             STATE_V_FIRST=STATE_V_FIRST, IS_VARLEN=False, USE_GATE_IN_KERNEL=USE_GATE_IN_KERNEL,
             HAS_DT_BIAS=HAS_DT_BIAS, APPLY_BETA_SIGMOID=APPLY_BETA_SIGMOID,
             ALLOW_NEG_EIGVAL=ALLOW_NEG_EIGVAL)
