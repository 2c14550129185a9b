"""GDN verify (and decode) in ring mode: T tokens from the state and the slot's ring, in matrix form.

The pool holds each slot's folded state; the ring (the candidate buffers, W entries) holds
`count[slot]` committed tokens not yet folded, each as its raw key, its log decay and its
corrected value u (fp32; `_chunk` says why a token's u outlives the call that made it). One
program per (row, value head, V block) reads its state tile once, takes the products of this
call's raw keys and queries with it, adds the ring's part through its u (`_chunk.new_tokens`: no
solve over the ring), solves the T new tokens' u by a triangular inverse of log2(T) levels, and
writes the T outputs, and the T new u into the ring (cand_v, at 0 after a fold, else at count:
only this program reads the slot's ring u of its head and columns). The pool is written only when
the call folds: when count + reserve > W (this call's tokens would not fit after the committed
ones), the ring's committed tokens are folded into the pool (`_chunk.fold`, one rank-W product),
in this same launch. The caller then appends the raw keys and gates to the ring and sets count
(in XLA: other programs of the row still read the ring's keys and gates here).

kernel body `_ring_kernel` -> launcher `_ring_call` -> public `verify_ring` (jitted, pool and cand_v
donated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import _chunk as ch
from . import _common as cm
from . import _recurrence as rec
from ._pallas import TuningConfig, pallas_call

_F32 = jnp.float32
RING_MAX_T = 16  # the most tokens one ring call takes: the new-token tile's rows
RING_MIN = 16  # the smallest ring (W): matrix operands have >= 16 rows on the tensor cores
_TILE = RING_MAX_T

# Tensor cores for every product (exact for 16-bit operands, three TF32 passes for fp32 ones:
# about fp32's accuracy); the interpreter runs them at HIGHEST.
_GPU = ch.Precisions(p16=lax.DotAlgorithmPreset.BF16_BF16_F32,
                     p32=lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
_GPU_F16 = _GPU._replace(p16=lax.DotAlgorithmPreset.F16_F16_F32)


def _select_rows(rows, t, x, tile):
    """tile with row t replaced by the vector x."""
    return jnp.where(rows == t, lax.broadcast_in_dim(x, tile.shape, (1,)), tile)


def _new_tokens(tok: cm.TokenRefs, r: cm.Row, T: int, K: int, rows_v) -> ch.New:
    """This call's T tokens as rows of [_TILE, ...] tiles (rows T..: dead, zeros)."""
    if T == _TILE:
        return _whole_tile(tok, r, K)
    idx = lax.broadcasted_iota(jnp.int32, (_TILE,), 0)
    rows_k = lax.broadcasted_iota(jnp.int32, (_TILE, K), 0)
    qN = jnp.zeros((_TILE, K), tok.q.dtype)
    kN = jnp.zeros((_TILE, K), tok.k.dtype)
    vN = jnp.zeros(rows_v.shape, _F32)
    gN = bN = jnp.zeros((_TILE,), _F32)
    for t in range(T):
        qN = _select_rows(rows_k, t, tok.q[r.b, t, r.hk, :], qN)
        kN = _select_rows(rows_k, t, tok.k[r.b, t, r.hk, :], kN)
        vN = _select_rows(rows_v, t, tok.v[r.b, t, r.hv, r.cols].astype(_F32), vN)
        g, beta = rec.gates(tok.a[r.b, t, r.hv].astype(_F32), tok.b[r.b, t, r.hv].astype(_F32),
                            tok.A_log[r.hv].astype(_F32), tok.dt_bias[r.hv].astype(_F32))
        gN, bN = jnp.where(idx == t, g, gN), jnp.where(idx == t, beta, bN)
    real = idx < T
    rq = jnp.where(real, ch.rsqrt_norm(qN) * K ** -0.5, 0.0)
    rk = jnp.where(real, ch.rsqrt_norm(kN), 0.0)
    return ch.New(kN, rk, qN, rq, vN, gN, bN)


def _whole_tile(tok: cm.TokenRefs, r: cm.Row, K: int) -> ch.New:
    """`_new_tokens` where the call's tokens fill the tile: one block load per input rather than
    a select per token and row (at T = 16, 16 x 3 selects of whole [16, K] tiles) and the gates
    as one vector. H200, W = 32, bf16, fold 20%, JAX's profiler: B = 256 1048.5 -> 498.1 us,
    B = 32 150.9 -> 77.2 (bench/results/ring_t16_whole_tile-h200-2026-12-04.json)."""
    f32 = lambda x: x.astype(_F32)
    q, k = tok.q[r.b, :, r.hk, :], tok.k[r.b, :, r.hk, :]
    g, beta = rec.gates(f32(tok.a[r.b, :, r.hv]), f32(tok.b[r.b, :, r.hv]),
                        f32(tok.A_log[r.hv]), f32(tok.dt_bias[r.hv]))
    return ch.New(k, ch.rsqrt_norm(k), q, ch.rsqrt_norm(q) * K ** -0.5,
                  f32(tok.v[r.b, :, r.hv, r.cols]), g, beta)


def _ring_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref,
                 dt_bias_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref,
                 o_ref, cand_v_out_ref, pool_out_ref, *, num_slots, ring, group, block_v, T,
                 reserve, prec):
    # pool_ref / pool_out_ref: [num_slots, HV, V, K], the same buffer (aliased); cand_v_ref /
    # cand_v_out_ref: the ring's u [num_slots, W, HV, V] fp32, aliased too; o_ref: [B, _TILE,
    # HV, V], the whole token tile (rows T..: never written)
    del cand_beta_ref  # the ring's u hold their beta
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, None)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)
    K = q_ref.shape[-1]

    def store_rows(o):
        # the tile's first T rows, in one masked store: the rows past T (dead tokens) are never
        # written (at T = 4 a quarter of the tile's bytes), and the caller reads only T
        real = lax.broadcasted_iota(jnp.int32, (_TILE, block_v), 0) < T
        pltriton.store(o_ref.at[r.b, :, r.hv, r.cols], o.astype(o_ref.dtype), mask=real)

    def store_ring_u(u, n):
        # the T new u (then zeros up to `reserve`: identity steps) at the ring's rows start..,
        # moved there by a one-hot product (exact: each output is one product by 1), so the
        # store is one masked [W, BV] tile with static bounds (a dynamic row slice of the ring
        # would be clamped into range by the interpreter)
        R = max(T, reserve)
        start = jnp.where(n + reserve > ring, 0, n)
        rows = lax.broadcasted_iota(jnp.int32, (ring, _TILE), 0)
        cols = lax.broadcasted_iota(jnp.int32, (ring, _TILE), 1)
        move = jnp.where((rows == start + cols) & (cols < T), 1.0, 0.0).astype(_F32)
        placed = jnp.dot(move, u, precision=lax.DotAlgorithmPreset.F32_F32_F32)
        dest = lax.broadcasted_iota(jnp.int32, (ring, block_v), 0)
        pltriton.store(cand_v_out_ref.at[r.slot, :, r.hv, r.cols], placed,
                       mask=(dest >= start) & (dest < start + R))

    def ring_and_state(n):  # the slot's ring (n committed) and its state tile, from the refs
        live = lax.broadcasted_iota(jnp.int32, (ring,), 0) < n
        kR = cand_k_ref[r.slot, :, r.hk, :]                               # [W, K] raw
        uR = jnp.where(lax.broadcast_in_dim(live, (ring, block_v), (0,)),
                       cand_v_ref[r.slot, :, r.hv, r.cols], 0.0)          # [W, BV] fp32
        run = ch.Ring(kR, jnp.where(live, ch.rsqrt_norm(kR), 0.0),
                      jnp.where(live, cand_g_ref[r.slot, :, r.hv], 0.0), uR)
        S0 = pool_ref[r.slot, r.hv, r.cols, :]                            # [BV, K], pool dtype
        if S0.dtype != kR.dtype:  # mixed dtypes: the state products run in fp32
            S0 = S0.astype(_F32)
        return run, S0

    @pl.when(r.valid)
    def _():
        n = cm.pending_count(pend, r, ring, num_slots)
        run, S0 = ring_and_state(n)
        new = _new_tokens(tok, r, T, K, lax.broadcasted_iota(jnp.int32, (_TILE, block_v), 0))
        o, u, GR, g_tot = ch.new_tokens(S0, run, new, prec, size=cm.pow2_at_least(T))
        store_rows(o)

        @pl.when((n > 0) & (n + reserve > ring))
        def _():
            # read again (from cache) rather than held in registers through the algebra above
            # (whole: in 64-row parts it was slower, H200, T = 16, B = 256, every row folding:
            # 845.9 -> 909.8 us, bench/results/ring_t16_whole_tile-h200-2026-12-04.json)
            run, S0 = ring_and_state(n)
            cm.store_state(pool_out_ref, r, ch.fold(S0, run, GR, g_tot, prec))

        # after the fold's second read of the ring's u: the fold's products stage their operands
        # through SMEM behind a CTA barrier, so every thread has read them before this store
        store_ring_u(u, n)

    @pl.when(jnp.logical_not(r.valid))
    def _():
        store_rows(jnp.zeros((_TILE, block_v), _F32))


def _ring_call(dims: cm.Dims, config: TuningConfig, interpret: bool, reserve: int, *args):
    B, T, H, HV, _, V, N, ring = dims
    q, cand_v, pool = args[2], args[10], args[-1]
    if interpret:
        prec = ch.Precisions()
    else:
        prec = _GPU_F16 if jnp.dtype(q.dtype) == jnp.float16 else _GPU
    kernel = functools.partial(_ring_kernel, num_slots=N, ring=ring, group=HV // H,
                               block_v=config.block_v, T=T, reserve=reserve, prec=prec)
    o, cand_v, pool = pallas_call(
        kernel,
        name=f"gdn_verify_ring{ring}_t{T}_bv{config.block_v}_w{config.num_warps}",
        config=config,
        interpret=interpret,
        grid=(B, HV, V // config.block_v),
        out_shape=(jax.ShapeDtypeStruct((B, _TILE, HV, V), q.dtype),
                   jax.ShapeDtypeStruct(cand_v.shape, cand_v.dtype),
                   jax.ShapeDtypeStruct(pool.shape, pool.dtype)),
        input_output_aliases={10: 1, len(args) - 1: 2},
    )(*args)
    # o holds the kernel's whole [_TILE, BV] tiles, of which it writes the first T rows (a
    # masked store: a row-by-row one would cost a reduction per row).
    return o[:, :T], cand_v, pool


@functools.partial(jax.jit, static_argnames=("reserve", "config", "interpret"),
                   donate_argnames=("pool", "cand_v"))
def verify_ring(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count,
                slots, *, reserve: int, config: TuningConfig = TuningConfig(block_v=64),
                interpret: bool = False):
    """T tokens per row after the slot's ring of committed tokens (ring mode; decode is T = 1).

    Args:
      q, k:      [B, T, H, K] bf16 | fp16 | fp32, raw; T in 1..RING_MAX_T (16).
      v:         [B, T, HV, V]; HV a multiple of H.
      a, b:      [B, T, HV] raw gate inputs; A_log, dt_bias: [HV] (gating fused, as `decode`).
      pool:      [num_slots, HV, V, K] bf16 | fp32, the folded state. Donated: updated in place.
      cand_k:    [num_slots, W, H, K] the ring's raw keys, in k's dtype; W a power of two >= 16.
      cand_v:    [num_slots, W, HV, V] fp32: the ring's corrected values u. Donated: this
                 call's u are written into it.
      cand_g:    [num_slots, W, HV] fp32 log decays (gating applied); cand_beta: same shape,
                 not read (a token's u holds its beta; the argument keeps the kernels' order).
      count:     [num_slots] int32: ring entries t < count[slot] are committed, not yet folded.
      slots:     [B] int32 (negative or >= num_slots: padding; real slots distinct).
      reserve:   ring entries this call's tokens will take (T_max for verify, 1 for decode):
                 the call folds where count + reserve > W.
      config:    `TuningConfig` (block_v >= 16 dividing V).

    For each real row: o = the outputs of the T tokens run after the count[slot] committed ring
    tokens from pool[slot]; their corrected values u go to cand_v[slot, start + t] (start = 0
    where the call folds, else count[slot]; entries T..reserve - 1 after them: zeros). Where
    count[slot] > 0 and count[slot] + reserve > W, pool[slot] := the state after the ring
    (rounded once); elsewhere the pool is not written. count, cand_k and cand_g are only read:
    the caller appends this call's keys and gates there and sets count.

    Returns:
      o:      [B, T, HV, V] in q's dtype (zeros for padding rows).
      cand_v: the ring's u with this call's (same buffer when donated; padding rows write none).
      pool:   the updated pool (same buffer when donated).
    """
    dims = cm.check_ring("verify_ring", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v,
                         cand_g, cand_beta, count, slots, reserve=reserve, t_hi=RING_MAX_T,
                         ring_min=RING_MIN)
    config.check_head_dim("verify_ring", dims.V)
    if config.block_v < 16:
        raise ValueError(f"verify_ring: block_v expected >= 16 (a matrix operand), got "
                         f"{config.block_v}")
    return _ring_call(dims, config, interpret, reserve, slots, count, q, k, v, a, b, A_log,
                      dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
