"""Decode and verify attention over a slot-indexed KV cache that reads only the used length.

XLA's attention gathers each row's whole [max_len, ...] cache and scores every position, so a
step costs max_len whatever the context. Here program (b, h, s) reads row b's slot in the cache
in place, key blocks of KV head h from split s of the key axis, and stops at the row's last
query position: a step reads what the rows have written (flash-decoding: an online softmax per
program, the splits' partial results combined after).

    o = decode_attention(q, k_cache, v_cache, slots, pos, config=AttentionConfig(...))

q:       [B, T, nH, hd] (rope and norm applied), the query heads of KV head h are
         h * G .. h * G + G - 1 with G = nH // nKV (GQA);
k_cache, v_cache: [num_slots, max_len, nKV, hd], the new tokens' keys and values already in;
slots:   [B] int32; a slot < 0 or >= num_slots is padding (nothing read, output zeros);
pos:     [B, T] int32; query t of row b attends keys 0..pos[b, t] (causal, inclusive).
T x nH / nKV <= ATTENTION_MAX_ROWS (decode and verify; a prefill's rows do not fit one program).
Returns o [B, T, nH, hd] in q's dtype; scores in fp32 (scaled by hd ** -0.5); the unnormalised
probabilities exp(s - running max) are rounded to v's dtype for the product with v (XLA's path
rounds the normalised ones), accumulation and the final normalisation in fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _pallas
from ._common import check_launch_fields, dot_rows, is_pow2

_F32 = jnp.float32
_NEG = -1e30  # a finite -inf: exp(_NEG - m) is 0 and exp(_NEG - _NEG) is 1, never NaN
ATTENTION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # fp32: XLA (no TF32)
ATTENTION_MAX_ROWS = 64  # T x (nH // nKV) query rows one program holds ([rows, hd] fp32 acc)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of `decode_attention` (hashable: a static argument).

    block_l:   key positions per loop step (a power of two >= 16, at most max_len).
    splits:    the key axis is cut into this many parts, one program each (more programs for
               long contexts; a part past a row's length costs one launch and nothing else).
    num_warps, num_stages: Triton's.
    """

    block_l: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_launch_fields(self, tiles=("block_l",), counts=("splits",))


def _kernel(slots_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_l: int,
            chunk: int, scale: float):
    """Program (b, h, s): rows [R, hd] of KV head h against keys [s * chunk, ...) of row b."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_len = k_ref.shape[1]
    slot = slots_ref[b]
    R, hd = q_ref.shape[2], q_ref.shape[3]
    valid = (slot >= 0) & (slot < k_ref.shape[0])
    pos = pos_ref[b, h, :]                                         # [R]; -1 on padding rows
    start = s * chunk
    stop = jnp.minimum(start + chunk, jnp.max(pos) + 1)
    steps = jnp.where(valid, jnp.maximum(stop - start, 0) + block_l - 1, 0) // block_l
    q = q_ref[b, h, :, :]                                           # [R, hd]
    safe = jnp.where(valid, slot, 0)

    def step(i, carry):
        acc, m, l = carry
        l0 = start + i * block_l
        # A block that would run past max_len is read from max_len - block_l instead, its keys
        # before l0 (counted by the step before) masked: every read stays inside the cache.
        lc = jnp.minimum(l0, max_len - block_l)
        keys = pl.ds(lc, block_l)
        k = k_ref[safe, keys, h, :]                                 # [block_l, hd]
        v = v_ref[safe, keys, h, :]
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        at = lc + lax.broadcasted_iota(jnp.int32, (R, block_l), 1)
        scores = jnp.where((at >= l0) & (at <= pos[:, None]), scores * scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.exp(scores - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=_F32)
        return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)

    acc, m, l = lax.fori_loop(0, steps, step, (jnp.zeros((R, hd), _F32),
                                               jnp.full((R,), _NEG, _F32),
                                               jnp.zeros((R,), _F32)))
    o_ref[b, h, s, :, :] = acc
    m_ref[b, h, s, :] = m
    l_ref[b, h, s, :] = l


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attention(q, k_cache, v_cache, slots, pos, *,
                     config: AttentionConfig = AttentionConfig(), interpret: bool = False):
    """Module docstring."""
    B, T, nH, _ = q.shape
    nKV = k_cache.shape[2]
    _check(q, k_cache, v_cache, slots, pos, config)
    if B == 0 or T == 0:  # nothing to launch (a grid of size 0 may not launch on a GPU)
        return jnp.zeros(q.shape, q.dtype)
    qr, pr = query_rows(q.astype(k_cache.dtype), pos, nKV)
    return _attend_rows(qr, pr, k_cache, v_cache, slots, T, nH // nKV, config,
                        interpret).astype(q.dtype)


def query_rows(q, pos, num_kv_heads: int):
    """q [B, T, nH, hd] and pos [B, T] laid out as `decode_attention_rows` reads them: qr
    [B, nKV, R, hd], row t * G + g token t of query head h * G + g (G = nH / nKV), padded with
    zero rows to R = dot_rows(T * G) for the tensor cores; pr [B, nKV, R] int32 their positions,
    -1 on the pad rows (they attend nothing)."""
    B, T, nH, hd = q.shape
    nKV, G = num_kv_heads, nH // num_kv_heads
    R = dot_rows(T * G)
    qr = q.reshape(B, T, nKV, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, nKV, T * G, hd)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - T * G), (0, 0)))
    pr = jnp.broadcast_to(pos.astype(jnp.int32)[:, None, :, None], (B, nKV, T, G))
    pr = jnp.pad(pr.reshape(B, nKV, T * G), ((0, 0), (0, 0), (0, R - T * G)),
                 constant_values=-1)
    return qr, pr


@functools.partial(jax.jit, static_argnames=("T", "num_heads", "gate", "config", "interpret"))
def decode_attention_rows(qr, pr, k_cache, v_cache, slots, gate_parts=None, *, T: int,
                          num_heads: int, gate: tuple | None = None,
                          config: AttentionConfig = AttentionConfig(), interpret: bool = False):
    """`decode_attention` on queries already laid out as its programs read them
    (`attention_prologue` writes them so): qr [B, nKV, R, hd] in the cache's dtype, row t * G + g
    the query of head h * G + g at token t (G = num_heads / nKV, R = dot_rows(T * G), rows past
    T * G finite); pr [B, nKV, R] int32 their positions (-1: attends nothing). Returns
    o [B, T, num_heads, hd] in the cache's dtype.

    With gate_parts [S, B * T, N] (a projection's split-K partial sums, S = 1: its output) and
    gate = (start, stride), head i's gate at columns start + i * stride: the output is
    o * sigmoid(gate) [B, T, num_heads * hd] instead, the splits combined and gated in one launch
    (`_combine_kernel`) where XLA took two, rounding where the module's XLA path writes a cast
    (the partials' sum, o and the sigmoid to the cache's dtype, then their product; XLA itself
    may keep o and the sigmoid in fp32 inside its fusion)."""
    B, nKV, R, hd = qr.shape if qr.ndim == 4 else (None,) * 4
    G = num_heads // max(1, k_cache.shape[2])
    if (qr.ndim != 4 or R != dot_rows(T * G) or pr.shape != (B, nKV, R) or pr.dtype != jnp.int32
            or qr.dtype != k_cache.dtype or k_cache.shape[2] != nKV):
        raise ValueError(f"decode_attention_rows: qr [B, nKV, dot_rows(T * G) = "
                         f"{dot_rows(T * G)}, hd] in the cache's dtype and pr [B, nKV, R] int32 "
                         f"expected, got qr {qr.dtype}{list(qr.shape)}, pr {pr.dtype}"
                         f"{list(pr.shape)}, k_cache {k_cache.dtype}{list(k_cache.shape)}")
    _check(jax.ShapeDtypeStruct((B, T, num_heads, hd), qr.dtype), k_cache, v_cache, slots,
           jax.ShapeDtypeStruct((B, T), jnp.int32), config)
    if gate is None:
        return _attend_rows(qr, pr, k_cache, v_cache, slots, T, G, config,
                            interpret).astype(qr.dtype)
    start, stride = gate
    if (gate_parts.ndim != 3 or gate_parts.shape[1] != B * T
            or start + (num_heads - 1) * stride + hd > gate_parts.shape[2]):
        raise ValueError(f"decode_attention_rows: gate_parts [S, B * T = {B * T}, N] holding "
                         f"{num_heads} heads of {hd} columns from {start}, {stride} apart "
                         f"expected, got {list(gate_parts.shape)}")
    acc, m, l = _attend_parts(qr, pr, k_cache, v_cache, slots, config, interpret)
    return _pallas.pallas_call(
        functools.partial(_combine_kernel, T=T, G=G, start=start, stride=stride),
        name=f"gdn_attention_combine_t{T}", config=_COMBINE, interpret=interpret,
        grid=(B * T, num_heads),
        out_shape=jax.ShapeDtypeStruct((B * T, num_heads * hd), qr.dtype),
    )(acc, m, l, gate_parts).reshape(B, T, num_heads * hd)


_COMBINE = AttentionConfig(block_l=16, num_warps=4)  # one program a (token, head): hd values


def _combine_kernel(acc_ref, m_ref, l_ref, gate_ref, y_ref, *, T: int, G: int, start: int,
                    stride: int):
    """Program (m, head): token t = m % T of row b = m // T, query head `head` (of KV head
    head // G): its splits' online-softmax states combined as `_attend_rows` does, rounded to y's
    dtype, times sigmoid(gate) (gate: its columns' partials added in fp32 and rounded first)."""
    m, head = pl.program_id(0), pl.program_id(1)
    b, t = m // T, m % T
    h, r = head // G, t * G + head % G
    splits, hd = acc_ref.shape[2], acc_ref.shape[4]
    dtype = y_ref.dtype
    tops = [m_ref[b, h, s, r] for s in range(splits)]
    top = functools.reduce(jnp.maximum, tops)
    num, den = jnp.zeros((hd,), _F32), jnp.float32(0.0)
    for s in range(splits):  # a split past the row's length left m = _NEG, l = 0: weight 0
        w = jnp.exp(tops[s] - top)
        num = num + acc_ref[b, h, s, r, :] * w
        den = den + l_ref[b, h, s, r] * w
    o = _normalized(num, den).astype(dtype)
    cols = pl.ds(start + head * stride, hd)
    gate = gate_ref[0, m, cols].astype(_F32)
    for s in range(1, gate_ref.shape[0]):
        gate = gate + gate_ref[s, m, cols].astype(_F32)
    sig = jax.nn.sigmoid(gate.astype(dtype).astype(_F32)).astype(dtype)
    y_ref[m, pl.ds(head * hd, hd)] = (o.astype(_F32) * sig.astype(_F32)).astype(dtype)


def _normalized(num, den):
    """The combined splits' output num / den, zeros where den is 0 (a padding slot's rows, which
    read no key: never a NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _attend_parts(qr, pr, k_cache, v_cache, slots, config, interpret):
    """The kernel on laid-out rows: each split's online-softmax state, (acc [B, nKV, splits, R,
    hd], m, l [B, nKV, splits, R]) fp32."""
    B, nKV, R, hd = qr.shape
    L = k_cache.shape[1]
    chunk = -(-L // (config.splits * config.block_l)) * config.block_l
    out_shape = (jax.ShapeDtypeStruct((B, nKV, config.splits, R, hd), _F32),
                 jax.ShapeDtypeStruct((B, nKV, config.splits, R), _F32),
                 jax.ShapeDtypeStruct((B, nKV, config.splits, R), _F32))
    acc, m, l = _pallas.pallas_call(
        functools.partial(_kernel, block_l=config.block_l, chunk=chunk, scale=hd ** -0.5),
        name="gdn_decode_attention",
        config=config,  # pallas_call reads num_warps and num_stages
        interpret=interpret,
        grid=(B, nKV, config.splits),
        out_shape=out_shape,
    )(slots.astype(jnp.int32), pr, qr, k_cache, v_cache)
    return acc, m, l


def _attend_rows(qr, pr, k_cache, v_cache, slots, T, G, config, interpret):
    """The kernel on laid-out rows, its splits combined: o [B, T, nKV * G, hd] fp32."""
    B, nKV, R, hd = qr.shape
    acc, m, l = _attend_parts(qr, pr, k_cache, v_cache, slots, config, interpret)
    # the splits' online-softmax states, combined; a padding slot's rows (no key read) give
    # zeros (the padding query rows past T x G are sliced off below)
    top = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - top)
    num = jnp.sum(acc * w[..., None], axis=2)
    den = jnp.sum(l * w, axis=2)
    o = _normalized(num, den[..., None])
    o = o[:, :, :T * G].reshape(B, nKV, T, G, hd).transpose(0, 2, 1, 3, 4)
    return o.reshape(B, T, nKV * G, hd)


def _check(q, k_cache, v_cache, slots, pos, config):
    op = "decode_attention"
    B, T, nH, hd = q.shape if q.ndim == 4 else (None,) * 4
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape[3] != hd:
        raise ValueError(f"{op}: q [B, T, nH, hd] and k_cache [num_slots, max_len, nKV, hd] "
                         f"expected, got q{list(q.shape)} and k_cache{list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: v_cache expected k_cache's {k_cache.dtype}"
                         f"{list(k_cache.shape)}, got {v_cache.dtype}{list(v_cache.shape)}")
    nKV, L = k_cache.shape[2], k_cache.shape[1]
    if nH % nKV:
        raise ValueError(f"{op}: q's {nH} heads must be a multiple of the cache's {nKV} KV heads")
    if jnp.dtype(k_cache.dtype) not in ATTENTION_DTYPES:
        raise ValueError(f"{op}: k_cache expected one of "
                         f"{[str(d) for d in ATTENTION_DTYPES]}, got {k_cache.dtype}")
    if slots.shape != (B,) or pos.shape != (B, T):
        raise ValueError(f"{op}: slots [B] = [{B}] and pos [B, T] = [{B}, {T}] expected, got "
                         f"slots{list(slots.shape)} and pos{list(pos.shape)}")
    if T * (nH // nKV) > ATTENTION_MAX_ROWS:
        raise ValueError(f"{op}: T x nH / nKV = {T} x {nH // nKV} query rows per KV head, over "
                         f"ATTENTION_MAX_ROWS = {ATTENTION_MAX_ROWS} (prefill is XLA's)")
    if L < config.block_l or not is_pow2(hd) or hd < 16:
        raise ValueError(f"{op}: block_l={config.block_l} must be at most max_len={L} and "
                         f"hd={hd} a power of two >= 16")
