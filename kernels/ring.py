"""GDN verify (and decode) in ring mode: T tokens from the state and the slot's ring, in matrix form.

The pool holds each slot's folded state; the ring (the candidate buffers, W entries) holds the
raw inputs of `count[slot]` committed tokens not yet folded. One program per (row, value head, V
block) reads its state tile once, runs the ring and then this call's T tokens in the WY form of
`_chunk` (Gram matrices of the raw keys and queries, two triangular solves, one product of the
state with the [k_ring; k_new; q] tile), and writes the T outputs. The pool is written only when
the call folds: when count + reserve > W (this call's tokens would not fit after the committed
ones), the ring's committed tokens are folded into the pool, in this same launch. The caller
then appends the tokens to the ring (at 0 after a fold, else at count) and sets count (in XLA:
other programs of the row still read the ring here).

The split form (`verify_ring(split=True)`, opt-in until the H200 has measured it) computes the
state-free algebra (`_chunk.token_algebra`) once per (row, value head) in XLA ahead of the kernel
(`_algebra`), leaving `_split_kernel` the products with the state: about 125 registers against
the fused kernel's 255 (bench/ptxas_stats.py), for some 40 small XLA kernels per call.

kernel bodies `_ring_kernel`, `_split_kernel` -> launcher `_ring_call` -> public `verify_ring`
(jitted, pool donated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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


def _raw_tokens(tok: cm.TokenRefs, r: cm.Row, T: int, K: int):
    """This call's raw q, k as rows of [_TILE, K] tiles in the input dtype (rows T..: zero)."""
    rows_k = lax.broadcasted_iota(jnp.int32, (_TILE, K), 0)
    qN = jnp.zeros((_TILE, K), tok.q.dtype)
    kN = jnp.zeros((_TILE, K), tok.k.dtype)
    for t in range(T):
        qN = _select_rows(rows_k, t, tok.q[r.b, t, r.hk, :], qN)
        kN = _select_rows(rows_k, t, tok.k[r.b, t, r.hk, :], kN)
    return qN, kN


def _new_tokens(tok: cm.TokenRefs, r: cm.Row, T: int, K: int):
    """This call's T tokens as rows of [_TILE, ...] tiles (rows T..: dead): raw q, k [_TILE, K]
    in the input dtype; rq (l2-norm scale times K**-0.5), rk, g, beta [_TILE] fp32 (0 if dead)."""
    idx = lax.broadcasted_iota(jnp.int32, (_TILE,), 0)
    qN, kN = _raw_tokens(tok, r, T, K)
    gN = bN = jnp.zeros((_TILE,), _F32)
    for t in range(T):
        g, beta = rec.gates(tok.a[r.b, t, r.hv].astype(_F32), tok.b[r.b, t, r.hv].astype(_F32),
                            tok.A_log[r.hv].astype(_F32), tok.dt_bias[r.hv].astype(_F32))
        gN, bN = jnp.where(idx == t, g, gN), jnp.where(idx == t, beta, bN)
    real = idx < T
    rq = jnp.where(real, ch.rsqrt_norm(qN) * K ** -0.5, 0.0)
    rk = jnp.where(real, ch.rsqrt_norm(kN), 0.0)
    return qN, kN, rq, rk, gN, bN


def _new_values(tok: cm.TokenRefs, r: cm.Row, T: int, rows_v):
    """This call's values on the row's V block, [_TILE, BV] fp32 (rows T..: zero)."""
    vN = jnp.zeros(rows_v.shape, _F32)
    for t in range(T):
        vN = _select_rows(rows_v, t, tok.v[r.b, t, r.hv, r.cols].astype(_F32), vN)
    return vN


def _ring_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref,
                 dt_bias_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref,
                 o_ref, pool_out_ref, *, num_slots, ring, group, block_v, T, reserve, prec):
    # pool_ref / pool_out_ref: [num_slots, HV, V, K], the same buffer (aliased);
    # o_ref: [B, _TILE, HV, V], the whole token tile (rows T..: dead tokens)
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref)
    pend = cm.PendingRefs(count_ref, cand_k_ref, cand_v_ref, cand_g_ref, cand_beta_ref)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)
    K = q_ref.shape[-1]

    @pl.when(r.valid)
    def _():
        n = cm.pending_count(pend, r, ring, num_slots)
        live = lax.broadcasted_iota(jnp.int32, (ring,), 0) < n
        kR = cand_k_ref[r.slot, :, r.hk, :]                               # [W, K] raw
        rR = jnp.where(live, ch.rsqrt_norm(kR), 0.0)
        vR = jnp.where(lax.broadcast_in_dim(live, (ring, block_v), (0,)),
                       cand_v_ref[r.slot, :, r.hv, r.cols].astype(_F32), 0.0)
        ring_run = ch.Run(kR, rR, vR, jnp.where(live, cand_g_ref[r.slot, :, r.hv], 0.0),
                          jnp.where(live, cand_beta_ref[r.slot, :, r.hv], 0.0))

        qN, kN, rq, rk, gN, bN = _new_tokens(tok, r, T, K)
        rows_v = lax.broadcasted_iota(jnp.int32, (_TILE, block_v), 0)
        vN = _new_values(tok, r, T, rows_v)
        new_run = ch.Run(kN, rk, vN, gN, bN)

        S0 = pool_ref[r.slot, r.hv, r.cols, :]                            # [BV, K], pool dtype
        if S0.dtype != kR.dtype:  # mixed dtypes: the state products run in fp32
            S0 = S0.astype(_F32)
        o, v_R, GR, g_tot = ch.ring_then_tokens(S0, ring_run, new_run, qN, rq, prec)
        o_ref[r.b, :, r.hv, r.cols] = o.astype(o_ref.dtype)  # rows T..: dropped by the caller

        @pl.when((n > 0) & (n + reserve > ring))
        def _():
            cm.store_state(pool_out_ref, r, ch.fold_ring(S0, ring_run, v_R, GR, g_tot, prec))

    @pl.when(jnp.logical_not(r.valid))
    def _():
        o_ref[r.b, :, r.hv, r.cols] = jnp.zeros((_TILE, block_v), o_ref.dtype)


def _split_kernel(slots_ref, count_ref, q_ref, k_ref, v_ref, O_R_ref, O_N_ref, F_ref, vec_R_ref,
                  vec_N_ref, g_tot_ref, cand_k_ref, cand_v_ref, pool_ref, o_ref, pool_out_ref, *,
                  num_slots, ring, group, block_v, T, reserve, prec):
    # The split form: the algebra (O_R [B, HV, _TILE, W], O_N [B, HV, _TILE, _TILE],
    # F [B, HV, W, W], vec_R [B, HV, 2, W] = beta, c of the ring, vec_N [B, HV, 3, _TILE] =
    # beta, c, d of the new tokens, g_tot [B, HV]) comes precomputed; this kernel reads the state.
    tok = cm.TokenRefs(q_ref, k_ref, v_ref, None, None, None, None)
    r = cm.this_row(slots_ref, num_slots=num_slots, group=group, block_v=block_v)
    K = q_ref.shape[-1]

    @pl.when(r.valid)
    def _():
        n = jnp.clip(count_ref[r.slot].astype(jnp.int32), 0, ring)
        live = lax.broadcasted_iota(jnp.int32, (ring, block_v), 0) < n
        kR = cand_k_ref[r.slot, :, r.hk, :]                               # [W, K] raw
        vR = jnp.where(live, cand_v_ref[r.slot, :, r.hv, r.cols].astype(_F32), 0.0)
        qN, kN = _raw_tokens(tok, r, T, K)
        vN = _new_values(tok, r, T, lax.broadcasted_iota(jnp.int32, (_TILE, block_v), 0))
        alg = ch.Algebra(O_R_ref[r.b, r.hv, :, :], O_N_ref[r.b, r.hv, :, :],
                         F_ref[r.b, r.hv, :, :], vec_R_ref[r.b, r.hv, 0, :],
                         vec_R_ref[r.b, r.hv, 1, :], vec_N_ref[r.b, r.hv, 0, :],
                         vec_N_ref[r.b, r.hv, 1, :], vec_N_ref[r.b, r.hv, 2, :],
                         g_tot_ref[r.b, r.hv])
        S0 = pool_ref[r.slot, r.hv, r.cols, :]                            # [BV, K], pool dtype
        if S0.dtype != kR.dtype:  # mixed dtypes: the state products run in fp32
            S0 = S0.astype(_F32)
        o, Z_R = ch.state_block(S0, kR, kN, qN, vR, vN, alg, prec)
        o_ref[r.b, :, r.hv, r.cols] = o.astype(o_ref.dtype)  # rows T..: dropped by the caller

        @pl.when((n > 0) & (n + reserve > ring))
        def _():
            cm.store_state(pool_out_ref, r, ch.fold_block(S0, kR, Z_R, alg, prec))

    @pl.when(jnp.logical_not(r.valid))
    def _():
        o_ref[r.b, :, r.hv, r.cols] = jnp.zeros((_TILE, block_v), o_ref.dtype)


def _rsqrt_norm(x):
    """[..., K] -> [...] fp32: the l2-norm scale of each row."""
    x = x.astype(_F32)
    return lax.rsqrt(jnp.sum(x * x, axis=-1) + rec.L2NORM_EPS)


def _algebra(q, k, a, b, A_log, dt_bias, cand_k, cand_g, cand_beta, count, slots,
             prec: ch.Precisions):
    """The split form's state-free algebra for every (row, value head), in XLA: `ch.token_algebra`
    vmapped over rows and key heads, and within a key head over its value heads (so the Gram
    matrices of one key head are computed once). Returns (O_R, O_N, F, vec_R, vec_N, g_tot) as
    `_split_kernel` reads them."""
    B, T, H, K = q.shape
    HV, W, N = a.shape[2], cand_k.shape[1], count.shape[0]
    G = HV // H
    idx = jnp.clip(slots, 0, N - 1)
    n = jnp.where((slots >= 0) & (slots < N), jnp.clip(count[idx], 0, W), 0)
    live = jnp.arange(W)[None, :] < n[:, None]                            # [B, W]
    kR = cand_k[idx]                                                      # [B, W, H, K]
    rkR = jnp.where(live[..., None], _rsqrt_norm(kR), 0.0)                # [B, W, H]
    gR = jnp.where(live[..., None], cand_g[idx], 0.0)                     # [B, W, HV]
    bR = jnp.where(live[..., None], cand_beta[idx], 0.0)
    g, beta = rec.gates(a.astype(_F32), b.astype(_F32), A_log.astype(_F32),
                        dt_bias.astype(_F32))                             # [B, T, HV]
    Tp = 1 << (T - 1).bit_length()  # the inverse takes powers of two
    pad = lambda x, to: jnp.pad(x, [(0, 0), (0, to - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    qp, kp, g, beta = pad(q, Tp), pad(k, Tp), pad(g, Tp), pad(beta, Tp)
    real = (jnp.arange(Tp) < T)[None, :, None]
    rkN = jnp.where(real, _rsqrt_norm(kp), 0.0)                           # [B, Tp, H]
    rq = jnp.where(real, _rsqrt_norm(qp) * K ** -0.5, 0.0)

    by_key = lambda x: jnp.moveaxis(x, 2, 1)                              # [B, H, M, ...]
    by_value = lambda x: x.reshape(x.shape[:2] + (H, G)).transpose(0, 2, 1, 3)  # [B, H, M, G]

    def key_head(kR, rkR, kN, rkN, q, rq, gR, bR, gN, bN):
        def value_head(gR, bR, gN, bN):
            return ch.token_algebra(ch.Keys(kR, rkR, gR, bR), ch.Keys(kN, rkN, gN, bN), q, rq,
                                    prec)
        return jax.vmap(value_head, in_axes=1)(gR, bR, gN, bN)

    alg = jax.vmap(jax.vmap(key_head))(
        by_key(kR), by_key(rkR), by_key(kp), by_key(rkN), by_key(qp), by_key(rq),
        by_value(gR), by_value(bR), by_value(g), by_value(beta))         # fields [B, H, G, ...]
    alg = jax.tree_util.tree_map(lambda x: x.reshape((B, HV) + x.shape[3:]), alg)
    rows = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, _TILE - Tp)] + [(0, 0)] * (x.ndim - 3))
    O_N = jnp.pad(alg.O_N, [(0, 0), (0, 0), (0, _TILE - Tp), (0, _TILE - Tp)])
    vec_R = jnp.stack([alg.beta_R, alg.c_R], axis=2)                      # [B, HV, 2, W]
    vec_N = jnp.stack([alg.beta_N, alg.c_N, alg.d], axis=2)              # [B, HV, 3, Tp]
    vec_N = jnp.pad(vec_N, [(0, 0), (0, 0), (0, 0), (0, _TILE - Tp)])
    return rows(alg.O_R), O_N, alg.F, vec_R, vec_N, alg.g_tot


def _ring_call(dims: cm.Dims, config: TuningConfig, interpret: bool, reserve: int, split: bool,
               *args):
    B, T, H, HV, K, V, N, ring = dims
    slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool = args
    if interpret:
        prec = ch.Precisions()
    else:
        prec = _GPU_F16 if jnp.dtype(q.dtype) == jnp.float16 else _GPU
    statics = dict(num_slots=N, ring=ring, group=HV // H, block_v=config.block_v, T=T,
                   reserve=reserve, prec=prec)
    if split:
        xla = ch.Precisions() if interpret else ch.Precisions(lax.Precision.DEFAULT)
        algebra = _algebra(q, k, a, b, A_log, dt_bias, cand_k, cand_g, cand_beta, count, slots,
                           xla)
        kernel = functools.partial(_split_kernel, **statics)
        args = (slots, count, q, k, v, *algebra, cand_k, cand_v, pool)
    else:
        kernel = functools.partial(_ring_kernel, **statics)
    o, pool = pallas_call(
        kernel,
        name=f"gdn_verify_ring{ring}{'_split' * split}_t{T}_bv{config.block_v}"
             f"_w{config.num_warps}",
        config=config,
        interpret=interpret,
        grid=(B, HV, V // config.block_v),
        out_shape=(jax.ShapeDtypeStruct((B, _TILE, HV, V), q.dtype),
                   jax.ShapeDtypeStruct(pool.shape, pool.dtype)),
        input_output_aliases={len(args) - 1: 1},
    )(*args)
    # The kernel stores its whole [_TILE, BV] output tile (a row-by-row store costs a reduction
    # per row); the first T rows are this call's outputs.
    return o[:, :T], pool


@functools.partial(jax.jit, static_argnames=("reserve", "config", "interpret", "split"),
                   donate_argnames=("pool",))
def verify_ring(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count,
                slots, *, reserve: int, config: TuningConfig = TuningConfig(block_v=64),
                interpret: bool = False, split: bool = False):
    """T tokens per row after the slot's ring of committed tokens (ring mode; decode is T = 1).

    Args:
      q, k:      [B, T, H, K] bf16 | fp16 | fp32, raw; T in 1..RING_MAX_T (16).
      v:         [B, T, HV, V]; HV a multiple of H.
      a, b:      [B, T, HV] raw gate inputs; A_log, dt_bias: [HV] (gating fused, as `decode`).
      pool:      [num_slots, HV, V, K] bf16 | fp32, the folded state. Donated: updated in place.
      cand_k:    [num_slots, W, H, K] the ring's raw keys, in k's dtype; W a power of two >= 16.
      cand_v:    [num_slots, W, HV, V] in v's dtype.
      cand_g, cand_beta: [num_slots, W, HV] fp32 (gating applied).
      count:     [num_slots] int32: ring entries t < count[slot] are committed, not yet folded.
      slots:     [B] int32 (negative or >= num_slots: padding; real slots distinct).
      reserve:   ring entries this call's tokens will take (T_max for verify, 1 for decode):
                 the call folds where count + reserve > W.
      config:    `TuningConfig` (block_v >= 16 dividing V).
      split:     the split form: the state-free algebra (Gram matrices, triangular inverses) once
                 per (row, value head) in XLA, batched, ahead of a kernel left with the products
                 with the state. Off by default until the H200 has measured it.

    For each real row: o = the outputs of the T tokens run after the count[slot] committed ring
    tokens from pool[slot]. Where count[slot] > 0 and count[slot] + reserve > W, pool[slot] :=
    the state after the ring (rounded once); elsewhere the pool is not written. count and the
    ring are only read: the caller appends this call's tokens and sets count.

    Returns:
      o:    [B, T, HV, V] in q's dtype (zeros for padding rows).
      pool: the updated pool (same buffer when donated).
    """
    dims = cm.check_tokens("verify_ring", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v,
                           cand_g, cand_beta, count, slots, t_lo=1, t_hi=RING_MAX_T)
    ring = dims.t_max
    if ring < RING_MIN or ring & (ring - 1):
        raise ValueError(f"verify_ring: cand_k expected a ring of W entries, W a power of two "
                         f">= {RING_MIN} ([num_slots, W, H, K]), got W = {ring}")
    if not 1 <= reserve <= ring:
        raise ValueError(f"verify_ring: reserve expected 1..W = {ring}, got {reserve}")
    if cand_k.dtype != k.dtype or cand_v.dtype != v.dtype:
        raise ValueError(f"verify_ring: cand_k, cand_v expected the dtypes of k, v "
                         f"({k.dtype}, {v.dtype}), got {cand_k.dtype}, {cand_v.dtype}")
    config.check_head_dim("verify_ring", dims.V)
    if config.block_v < 16:
        raise ValueError(f"verify_ring: block_v expected >= 16 (a matrix operand), got "
                         f"{config.block_v}")
    return _ring_call(dims, config, interpret, reserve, split, slots, count, q, k, v, a, b, A_log,
                      dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
