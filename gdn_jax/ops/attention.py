"""`decode_attention(...)`: attention of decode / verify queries over a slot-indexed KV cache,
reading each row's used length in place (`gdn_jax.kernels.decode_attention`), where XLA's path
gathers and scores the whole max_len.

    o = decode_attention(q, k_cache, v_cache, slots, pos)   # q [B, T, nH, hd] -> o, same shape
    o, k_cache, v_cache = prologue_attention(q_src, k_src, v_src, ...)  # norms, RoPE and the
                                                # cache write in one launch before it

Arguments as the kernel's (its docstring). `gdn_jax.modules.attention.Attention(impl="pallas")`
calls it (bf16 / fp16 caches). On a CUDA GPU of compute capability >= 8.0 the kernel runs
compiled; elsewhere (CPU tests) in the Pallas interpreter.
"""

from __future__ import annotations

import os

from gdn_jax import kernels
from gdn_jax.ops.dispatch import Device, sm_count

_BLOCK_L = 64
_WAVES = 2
# "auto": `prologue_attention` runs the prologue kernel where it fits; "off": the caller's XLA
# steps (tests and A/B runs)
PROLOGUE_VAR = "GDN_JAX_ATTENTION_PROLOGUE"
PROLOGUES = ("auto", "off")
# "kernel": `prologue_attention` with a gate combines the attention kernel's splits and applies
# the sigmoid gate in one launch; "xla" (the default): XLA's two fusions (the 48-layer step at
# B = 1 and 32 within its runs' spread either way: H100, 2026-12-06, README)
COMBINE_VAR = "GDN_JAX_ATTENTION_COMBINE"
COMBINES = ("xla", "kernel")
Source = kernels.Source  # where `prologue_attention` reads a projection's heads


def config_for(B: int, num_kv_heads: int, max_len: int, rows: int = 8, *,
               sm_count: int = 132):
    """Key blocks of 64 positions (fewer for a shorter cache); the key axis cut into enough
    splits to put `_WAVES` programs per SM, one block per split at most (splits past a row's
    length return at once); 8 warps where a program holds more than 32 query rows."""
    block_l = min(_BLOCK_L, 1 << (max_len.bit_length() - 1))
    blocks = -(-max_len // block_l)
    splits = max(1, min(blocks, -(-_WAVES * sm_count // (B * num_kv_heads))))
    return kernels.AttentionConfig(block_l=block_l, splits=splits,
                                   num_warps=4 if rows <= 32 else 8)


def takes(T: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the kernel takes T tokens of num_heads query heads (decode and verify: yes;
    a prefill's rows do not fit one program, and stay with XLA)."""
    return T * (num_heads // num_kv_heads) <= kernels.ATTENTION_MAX_ROWS


def misfit(k_cache) -> str | None:
    """Why the kernel cannot take this cache, or None."""
    if k_cache.dtype not in kernels.ATTENTION_DTYPES:
        return f"cache dtype {k_cache.dtype} (the kernel takes bf16 and fp16)"
    if k_cache.shape[1] < 16:
        return f"max_len {k_cache.shape[1]} < 16"
    hd = k_cache.shape[3]
    if hd < 16 or hd & (hd - 1):
        return f"head_dim {hd} is not a power of two >= 16"
    return None


def runs_compiled(k_cache) -> bool:
    """Whether the kernel runs compiled here on this cache (a CUDA GPU of SM80+, a cache it
    takes): where `Attention(impl="auto")` picks it."""
    return Device.of().runs_triton and misfit(k_cache) is None


def decode_attention(q, k_cache, v_cache, slots, pos, *, interpret: bool | None = None):
    """Module docstring. interpret: None = compiled on a CUDA GPU (SM80+), else interpreted."""
    if interpret is None:
        interpret = not Device.of().runs_triton
    why = misfit(k_cache)
    if why:
        raise ValueError(f"decode_attention: the kernel cannot take this cache: {why}")
    B, T, nH, _ = q.shape
    _, L, nKV, _ = k_cache.shape
    config = config_for(B, nKV, L, T * (nH // nKV), sm_count=sm_count())
    return kernels.decode_attention(q, k_cache, v_cache, slots, pos, config=config,
                                    interpret=interpret)


def prologue_misfit(k_cache, head_dim: int, rotary_dim: int, dtype, sources=()) -> str | None:
    """Why `prologue_attention` cannot take this cache (and these q / k / v `Source`s, where
    given), or None. Also not None where GDN_JAX_ATTENTION_PROLOGUE is "off"."""
    level = os.environ.get(PROLOGUE_VAR, "auto")
    if level not in PROLOGUES:
        raise ValueError(f"{PROLOGUE_VAR} expected one of {PROLOGUES}, got {level!r}")
    if level == "off":
        return f"{PROLOGUE_VAR} is off"
    if k_cache.dtype != dtype:
        return f"the cache's dtype {k_cache.dtype} is not the layer's {dtype}"
    return misfit(k_cache) or kernels.attention_prologue_misfit(head_dim, rotary_dim, sources)


def combines_in_kernel() -> bool:
    """Whether `prologue_attention` takes the gate (GDN_JAX_ATTENTION_COMBINE, `COMBINES`)."""
    wish = os.environ.get(COMBINE_VAR) or "xla"
    if wish not in COMBINES:
        raise ValueError(f"{COMBINE_VAR} expected one of {COMBINES}, got {wish!r}")
    return wish == "kernel"


def prologue_attention(q_src, k_src, v_src, q_norm, k_norm, inv_freq, lengths, k_cache, v_cache,
                       slots, n, *, T: int, num_heads: int, eps: float, gate=None,
                       interpret: bool | None = None):
    """`kernels.attention_prologue` (the q / k norms, RoPE and the cache write of T tokens per row,
    from the q / k / v projection's `kernels.Source`s) then `kernels.decode_attention_rows`: two
    launches where XLA's steps take about ten. Arguments as the prologue's (its docstring); check
    `prologue_misfit` first. Returns (o [B, T, num_heads, hd] in the cache's dtype, k_cache,
    v_cache); with gate, the `Source` of the heads' gates (rows B * T), o * sigmoid(gate)
    [B, T, num_heads * hd] in place of o (`kernels.decode_attention_rows`)."""
    if interpret is None:
        interpret = not Device.of().runs_triton
    qr, pr, k_cache, v_cache = kernels.attention_prologue(
        q_src, k_src, v_src, q_norm, k_norm, inv_freq, lengths, k_cache, v_cache, slots, n, T=T,
        num_heads=num_heads, eps=eps, interpret=interpret)
    B, nKV, L = qr.shape[0], k_cache.shape[2], k_cache.shape[1]
    config = config_for(B, nKV, L, T * (num_heads // nKV), sm_count=sm_count())
    gated = {} if gate is None else dict(gate_parts=gate.parts, gate=(gate.start, gate.stride))
    o = kernels.decode_attention_rows(qr, pr, k_cache, v_cache, slots, T=T, num_heads=num_heads,
                                      config=config, interpret=interpret, **gated)
    return o, k_cache, v_cache
