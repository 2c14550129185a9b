"""The attention layer's prologue for decode and verify in one launch: from the q / k / v
projection's output (its split-K partial sums, added on load), each query and key head's (1 + w)
RMSNorm, partial NeoX RoPE at the token's position, the keys and values written into the
slot-indexed cache, and the queries laid out for `decode_attention_rows`.

XLA runs the same as about ten launches per attention layer (the partials' sum and slice, two
norms, two RoPEs, the queries' padding, the cache write's index and scatter, the positions'
broadcast): at B = 1 most of them cost their launch, not their bytes. H200, a 48-layer
Qwen3.5-shaped step (12 attention layers), kernel time: B = 1 decode 3058.9 -> 2947.7 us, this
kernel 3.2 us a layer; B = 32 decode 4237.9 -> 4130.4, verify 6074.5 -> 5924.6
(bench/results/profile_step-h200-qwen3_5_text-b1_b32-attn_prologue-2026-12-04.json).

    qr, pr, k_cache, v_cache = attention_prologue(q, k, v, q_norm, k_norm, inv_freq, lengths,
                                                  k_cache, v_cache, slots, n, T=T,
                                                  num_heads=nH, eps=eps)

Program (m, head) of the grid (B * T, nH + nKV) takes token t = m % T of row b = m // T: a query
head (head < nH) or a key / value head (head - nH). A head's hd values are held as a
[hd / R2, R2] tile (R2 = rotary_dim / 2): RoPE rotates its rows 0 and 1 into each other and
leaves the others. The arithmetic rounds where XLA's path does (`modules.attention`): the
partials' fp32 sum to dtype, the norm (fp32) to dtype, cos and sin to dtype, each product and
the sum of RoPE to dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _pallas
from ._common import dot_rows, is_pow2

_F32 = jnp.float32


class Source(NamedTuple):
    """Where a projection's heads are: parts [S, M, N] (S split-K partial sums, added in fp32 and
    rounded to the output dtype on load; S = 1: the output itself), head i's hd columns at
    start + i * stride (M = B * T rows)."""

    parts: jax.Array
    start: int
    stride: int


class PrologueConfig(NamedTuple):
    """Triton's launch parameters (one program holds one head's hd values)."""

    num_warps: int = 1
    num_stages: int = 1


def misfit(head_dim: int, rotary_dim: int, sources) -> str | None:
    """None when the kernel takes these heads, else why not: head_dim and rotary_dim / 2 powers
    of two (a head's [hd / R2, R2] tile), every head's first column a multiple of R2."""
    half = rotary_dim // 2
    if rotary_dim % 2 or not is_pow2(head_dim) or not is_pow2(half) or 2 * half > head_dim:
        return (f"head_dim ({head_dim}) and rotary_dim / 2 ({half}) must be powers of two, "
                f"rotary_dim <= head_dim")
    for name, src in zip(("q", "k", "v"), sources):
        if src.start % half or src.stride % half or src.parts.ndim != 3:
            return (f"{name}'s heads must start at multiples of rotary_dim / 2 = {half} columns of "
                    f"a [S, M, N] array, got start {src.start}, stride {src.stride}, "
                    f"{src.parts.ndim} dims")
    return None


def _kernel(lengths_ref, slots_ref, n_ref, q_ref, k_ref, v_ref, qw_ref, kw_ref, freq_ref,
            kc_in, vc_in, qr_ref, pr_ref, kc_ref, vc_ref, *, T, G, nH, starts, strides, eps,
            dtype):
    del kc_in, vc_in  # aliased to kc_ref, vc_ref: written in place
    m, head = pl.program_id(0), pl.program_id(1)
    b, t = m // T, m % T
    num_slots, L = kc_ref.shape[0], kc_ref.shape[1]
    D, R2 = qr_ref.shape[3], qr_ref.shape[4]
    hd, rows = D * R2, qr_ref.shape[2]
    slot = slots_ref[b]
    valid = (slot >= 0) & (slot < num_slots)
    start = jnp.where(valid, lengths_ref[jnp.clip(slot, 0, num_slots - 1)], 0)
    pos = start + t
    tile_row = lax.broadcasted_iota(jnp.int32, (D, R2), 0)

    def load(ref, which, i):  # head i of source `which`, its partials added, rounded
        cols = pl.ds((starts[which] + i * strides[which]) // R2, D)
        acc = ref[0, m, cols, :].astype(_F32)
        for s in range(1, ref.shape[0]):
            acc = acc + ref[s, m, cols, :].astype(_F32)
        return acc.astype(dtype)

    def norm_rope(x, w_ref):
        xf = x.astype(_F32)
        # axis by axis: a whole-array sum fails to lower under jax 0.11's explicit meshes
        scale = lax.rsqrt(jnp.sum(jnp.sum(xf * xf, axis=1), axis=0) / hd + eps)
        y = (xf * scale * (1.0 + w_ref[...].astype(_F32))).astype(dtype).astype(_F32)
        angle = pos.astype(_F32) * freq_ref[...]                      # [R2]
        cos = jnp.cos(angle).astype(dtype).astype(_F32)[None, :]
        sin = jnp.sin(angle).astype(dtype).astype(_F32)[None, :]
        r = lambda z: z.astype(dtype).astype(_F32)  # XLA's rounding after each op  # noqa: E731
        x1 = jnp.sum(jnp.where(tile_row == 0, y, 0.0), axis=0)[None, :]
        x2 = jnp.sum(jnp.where(tile_row == 1, y, 0.0), axis=0)[None, :]
        out1 = r(r(x1 * cos) + r(-x2 * sin))
        out2 = r(r(x2 * cos) + r(x1 * sin))
        return jnp.where(tile_row == 0, out1, jnp.where(tile_row == 1, out2, y)).astype(dtype)

    @pl.when(head < nH)
    def _():
        qr_ref[b, head // G, t * G + head % G, :, :] = norm_rope(
            load(q_ref, 0, head), qw_ref).astype(qr_ref.dtype)

    @pl.when(head >= nH)
    def _():
        kvh = head - nH

        @pl.when(valid & (t < n_ref[b]) & (pos < L))
        def _():
            kc_ref[slot, pos, kvh, :, :] = norm_rope(load(k_ref, 1, kvh), kw_ref).astype(
                kc_ref.dtype)
            vc_ref[slot, pos, kvh, :, :] = load(v_ref, 2, kvh).astype(vc_ref.dtype)

        @pl.when(t == 0)
        def _():  # the row's query positions (pad rows: -1, attend nothing) and pad rows' zeros
            r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
            pr_ref[b, kvh, :] = jnp.where(r < T * G, start + r // G, -1)
            for row in range(T * G, rows):
                qr_ref[b, kvh, row, :, :] = jnp.zeros((D, R2), qr_ref.dtype)


@functools.partial(jax.jit, static_argnames=("T", "eps", "q_src", "k_src", "v_src", "config",
                                             "interpret"))
def _call(q_parts, k_parts, v_parts, q_norm, k_norm, inv_freq, lengths, k_cache, v_cache,
          slots, n, *, T, eps, q_src, k_src, v_src, config, interpret):
    S_, L, nKV, hd = k_cache.shape
    R2 = inv_freq.shape[0]
    D = hd // R2
    M = q_parts.shape[1]
    B = M // T
    nH = q_src[0]
    G = nH // nKV
    rows = dot_rows(T * G)
    dtype = k_cache.dtype
    tiles = lambda x: x.reshape(*x.shape[:-1], x.shape[-1] // R2, R2)  # noqa: E731
    kernel = functools.partial(_kernel, T=T, G=G, nH=nH, starts=(q_src[1], k_src[1], v_src[1]),
                               strides=(q_src[2], k_src[2], v_src[2]), eps=eps, dtype=dtype)
    qr, pr, kc, vc = _pallas.pallas_call(
        kernel, name=f"gdn_attention_prologue_t{T}", config=config, interpret=interpret,
        grid=(M, nH + nKV),
        out_shape=(jax.ShapeDtypeStruct((B, nKV, rows, D, R2), dtype),
                   jax.ShapeDtypeStruct((B, nKV, rows), jnp.int32),
                   jax.ShapeDtypeStruct((S_, L, nKV, D, R2), dtype),
                   jax.ShapeDtypeStruct((S_, L, nKV, D, R2), dtype)),
        input_output_aliases={9: 2, 10: 3},
    )(lengths.astype(jnp.int32), slots.astype(jnp.int32), n.astype(jnp.int32), tiles(q_parts),
      tiles(k_parts), tiles(v_parts), q_norm.reshape(D, R2), k_norm.reshape(D, R2),
      inv_freq.astype(_F32), tiles(k_cache), tiles(v_cache))
    return (qr.reshape(B, nKV, rows, hd), pr, kc.reshape(k_cache.shape),
            vc.reshape(v_cache.shape))


def attention_prologue(q: Source, k: Source, v: Source, q_norm, k_norm, inv_freq, lengths,
                       k_cache, v_cache, slots, n, *, T: int, num_heads: int, eps: float,
                       config: PrologueConfig = PrologueConfig(), interpret: bool = False):
    """Module docstring.

    Args:
      q, k, v:   `Source`s of the query heads (num_heads of them, their hd columns each), the key
                 and the value heads (nKV each), rows m = b * T + t.
      q_norm, k_norm: [hd] the (1 + w) norms' weights.
      inv_freq:  [rotary_dim / 2] fp32, RoPE's inverse frequencies.
      lengths:   [num_slots] int32, the tokens each slot's cache holds: token t of row b sits at
                 position lengths[slot] + t (0 for a padding row).
      k_cache, v_cache: [num_slots, max_len, nKV, hd] bf16 | fp16 (the dtype of everything the
                 kernel rounds to). Donate them: written in place.
      slots:     [B] int32; negative or >= num_slots: padding (nothing written to the cache).
      n:         [B] int32, the real tokens of each row: tokens t >= n[b] are not written.
    Returns (qr [B, nKV, R, hd]: row t * G + g the normed, rotated query of head h * G + g, rows
    past T * G zeros, R = dot_rows(T * G); pr [B, nKV, R] int32 their positions, -1 past T * G;
    k_cache, v_cache with the real tokens' normed, rotated keys and their values written), the
    arguments of `decode_attention_rows`.
    """
    hd = k_cache.shape[3]
    why = misfit(hd, 2 * inv_freq.shape[0], (q, k, v))
    if why:
        raise ValueError(f"attention_prologue: {why}")
    M, nKV, half = q.parts.shape[1], k_cache.shape[2], inv_freq.shape[0]
    for name, src, heads in (("q", q, num_heads), ("k", k, nKV), ("v", v, nKV)):
        N = src.parts.shape[2]
        if N % half or src.start + (heads - 1) * src.stride + hd > N:
            raise ValueError(f"attention_prologue: {name}'s {heads} heads of {hd} columns from "
                             f"{src.start}, {src.stride} apart, must lie in its {N} columns, "
                             f"a multiple of rotary_dim / 2 = {half}")
    if M % T or k.parts.shape[1] != M or v.parts.shape[1] != M:
        raise ValueError(f"attention_prologue: the sources' rows must be B * T with T = {T}, got "
                         f"{q.parts.shape[1]}, {k.parts.shape[1]}, {v.parts.shape[1]}")
    B = M // T
    if (slots.shape != (B,) or n.shape != (B,) or lengths.shape != (k_cache.shape[0],)
            or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype
            or jnp.dtype(k_cache.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
        raise ValueError(f"attention_prologue: slots and n [B] = [{B}], lengths [num_slots] = "
                         f"[{k_cache.shape[0]}], v_cache as k_cache (bf16 or fp16) expected, got "
                         f"slots{list(slots.shape)}, n{list(n.shape)}, "
                         f"lengths{list(lengths.shape)}, k_cache {k_cache.dtype}"
                         f"{list(k_cache.shape)}, v_cache {v_cache.dtype}{list(v_cache.shape)}")
    if num_heads % k_cache.shape[2] or q_norm.shape != (hd,) or k_norm.shape != (hd,):
        raise ValueError(f"attention_prologue: num_heads ({num_heads}) a multiple of the cache's "
                         f"{k_cache.shape[2]} KV heads and norms of [{hd}] expected, got "
                         f"{list(q_norm.shape)}, {list(k_norm.shape)}")
    return _call(q.parts, k.parts, v.parts, q_norm, k_norm, inv_freq, lengths, k_cache, v_cache,
                 slots, n, T=T, eps=eps, q_src=(num_heads, q.start, q.stride),
                 k_src=(k_cache.shape[2], k.start, k.stride),
                 v_src=(k_cache.shape[2], v.start, v.stride), config=config,
                 interpret=interpret)
