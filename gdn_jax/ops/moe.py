"""`routed(...)`: the routed experts of a MoE block through the grouped Pallas kernel
(`gdn_jax.kernels.moe`), which reads each chosen expert's weights once per block of pairs.

    out = routed(x, weights, ids, w_gate, w_up, w_down)   # x [T, H], weights / ids [T, k]

w_gate, w_up: [E, H, I], w_down: [E, I, H] (a tensor-parallel shard: I split; the result is then
that shard's partial sum), all in x's dtype, bf16 or fp16. Returns [T, H] in x's dtype:
sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t) with e = ids[t, j].

`gdn_jax.modules.mlp.SparseMoE(expert_path="pallas")` calls it. On a CUDA GPU of compute
capability >= 8.0 the kernels run compiled; elsewhere (CPU tests) in the Pallas interpreter.
"""

from __future__ import annotations

from gdn_jax import kernels
from gdn_jax.kernels import moe as _moe
from gdn_jax.ops.dispatch import Device
from gdn_jax.ops.projection import pow2_tile



def config_for(pairs: int, num_experts: int, K: int, N: int) -> _moe.MoEConfig:
    """Blocks of 16 pairs while experts get few tokens each (decode, verify), 64 beyond; the
    widest weight tile up to [128, 64] that the expert's dims take."""
    block_m = 16 if pairs <= 16 * num_experts else 64
    return _moe.MoEConfig(block_m=block_m, block_n=pow2_tile(N, 64),
                          block_k=pow2_tile(K, 128))


def routed(x, weights, ids, w_gate, w_up, w_down, *, interpret: bool | None = None):
    """Module docstring. interpret: None = compiled on a CUDA GPU (SM80+), else interpreted."""
    T, H = x.shape
    E, _, I = w_gate.shape
    if ids.shape != weights.shape or ids.shape[0] != T:
        raise ValueError(f"routed: ids and weights expected [T, k] with T = {T}, got "
                         f"{list(ids.shape)} and {list(weights.shape)}")
    if w_gate.shape != (E, H, I) or w_up.shape != (E, H, I) or w_down.shape != (E, I, H):
        raise ValueError(f"routed: expert weights expected [E, H, I], [E, H, I], [E, I, H] with "
                         f"H = {H}, got {list(w_gate.shape)}, {list(w_up.shape)}, "
                         f"{list(w_down.shape)}")
    if interpret is None:
        interpret = not Device.of().runs_triton
    P = ids.size
    up_cfg, down_cfg = config_for(P, E, H, I), config_for(P, E, I, H)
    blocks = _moe.plan(ids, E, up_cfg.block_m)
    h = kernels.grouped_matmul(blocks.rows(x), w_gate, blocks.block_expert, w_up=w_up,
                               config=up_cfg, interpret=interpret)
    y = kernels.grouped_matmul(h, w_down, blocks.block_expert, config=down_cfg,
                               interpret=interpret)
    return blocks.combine(y, weights, T)
