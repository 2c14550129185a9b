"""The matrix (WY) form of the gated delta rule over a short run of tokens, on one program's tile.

Pure array functions (no refs): the ring kernel's math, also run as plain JAX in the tests. A run
is a ring of W committed tokens (R) followed by TP new tokens (N), both from the state S0 [BV, K]
(rows: a block of V, columns: K). Dead tokens (ring entries past the committed count, new rows
past T) enter with a zero key scale, g = 0 and beta = 0: an exact identity step.

Keys and queries enter raw (the input dtype) with their l2-norm scales apart, so every product
with the state, `raw @ S0^T`, is exact on tensor cores for a bf16 pool and bf16 inputs (the
product of two bf16 numbers is exact in the fp32 accumulator). The token-by-token recurrence
over the run is, with G the inclusive cumulative log decay and k_i = rk_i kraw_i:

    A = strict_lower(beta_i k_i . k_j exp(G_i - G_j)),  X = (I + A)^-1
    v_new = X (beta v - beta exp(G) k S0^T)                    the delta rule's corrected values
    o_i = exp(G_i) q_i S0^T + sum_{j <= i} (q_i . k_j) exp(G_i - G_j) v_new_j
    S_R = exp(G_W) S0 + sum_{j in R} exp(G_W - G_j) v_new_j k_j^T   (the fold of the ring)

X is block lower triangular in (R, N): X_RR and X_NN by substitution, X_NR = -X_NN A_NR X_RR.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from ._recurrence import L2NORM_EPS

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


class Precisions(NamedTuple):
    """How the products run: `p16` for operands of one 16-bit dtype (exact products, fp32
    accumulation), `p32` for fp32 operands. Each is a jax precision or a `lax.DotAlgorithmPreset`
    (the Triton lowering maps BF16_BF16_F32 to the tensor cores, TF32_TF32_F32_X3 to three TF32
    passes, F32_F32_F32 to exact fp32 FMAs); the interpreter takes HIGHEST for both."""

    p16: object = _HI
    p32: object = _HI


class Run(NamedTuple):
    """One side of the run (the ring or the new tokens): M rows."""

    k: object      # [M, K] raw keys (input dtype)
    rk: object     # [M] fp32 key scale (l2-norm; 0 for a dead row)
    v: object      # [M, BV] fp32 values
    g: object      # [M] fp32 log decay (0 for a dead row)
    beta: object   # [M] fp32 (0 for a dead row)


def rsqrt_norm(x):
    """[M, K] -> [M] fp32: rsqrt(sum(x^2) + eps) per row (the l2-norm scale)."""
    x = x.astype(_F32)
    return lax.rsqrt(jnp.sum(x * x, axis=1) + L2NORM_EPS)


def _col(x, shape):  # x[i] along rows
    return lax.broadcast_in_dim(x, shape, (0,))


def _row(x, shape):  # x[j] along columns
    return lax.broadcast_in_dim(x, shape, (1,))


def _iotas(m, n):
    return (lax.broadcasted_iota(jnp.int32, (m, n), 0), lax.broadcasted_iota(jnp.int32, (m, n), 1))


def dot(a, b, prec: Precisions, *, trans_b=False, trans_a=False):
    """a @ b (a^T, b^T as asked) with an fp32 result. Operands of one 16-bit dtype run at
    prec.p16; anything else is cast to fp32 and runs at prec.p32."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if a.dtype == b.dtype and jnp.dtype(a.dtype).itemsize == 2:
        precision = prec.p16
    else:
        a, b, precision = a.astype(_F32), b.astype(_F32), prec.p32
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def unit_lower_inverse(A, prec: Precisions):
    """(I + A)^-1 for A [M, M] fp32 strictly lower triangular, M a power of two: the blocked
    recursive inversion with matrix products only. With D_b the block-diagonal inverse of
    blocks of size b (D_1 = I), D_2b = D_b - D_b E_b D_b, E_b the entries of A in the lower-left
    b x b block of each 2b x 2b diagonal block ([[X11, 0], [L21, X22]]^-1 has the lower-left
    block -X22 L21 X11). Masks stand in for block slices (a register tile has no slicing)."""
    M = A.shape[0]
    rows, cols = _iotas(M, M)
    D = jnp.where(rows == cols, 1.0, 0.0).astype(_F32)
    b = 1
    while b < M:
        lower_left = ((rows // (2 * b)) == (cols // (2 * b))) & ((rows // b) % 2 == 1) & (
            (cols // b) % 2 == 0)
        D = D - dot(D, dot(jnp.where(lower_left, A, 0.0), D, prec), prec)
        b *= 2
    return D


def _decayed(gram, scale_i, scale_j, G_i, G_j, mask):
    """gram[i, j] * scale_i * scale_j * exp(G_i - G_j) where mask, else 0 (masked before exp: the
    other triangle's exponents are positive and could overflow)."""
    shape = gram.shape
    diff = jnp.where(mask, _col(G_i, shape) - _row(G_j, shape), 0.0)
    out = gram * _col(scale_i, shape) * _row(scale_j, shape) * jnp.exp(diff)
    return jnp.where(mask, out, 0.0)


class _Solved(NamedTuple):
    GR: object     # [W] cumulative log decay of the ring
    GN: object     # [TP] of the new tokens (after the ring)
    g_tot: object  # the ring's total log decay
    X_RR: object   # [W, W] blocks of (I + A)^-1
    X_NR: object   # [TP, W]
    X_NN: object   # [TP, TP]
    M_QR: object   # [TP, W] decayed q . k of the new queries with the ring's keys
    M_QN: object   # [TP, TP] and with the new keys (causal, diagonal included)


def _solve(ring, new, q, rq, prec: Precisions) -> _Solved:
    """The state-free algebra of a run: decays, the Gram matrices and (I + A)^-1 by blocks.
    ring, new: `Run` or `Keys` (k, rk, g, beta are what is read)."""
    W, TP = ring.k.shape[0], new.k.shape[0]
    GR = jnp.cumsum(ring.g)
    g_tot = jnp.sum(ring.g)
    GN = g_tot + jnp.cumsum(new.g)
    # Gram matrices of raw keys / queries: one dtype, exact for bf16 and fp16 inputs.
    gram = lambda x, y: dot(x, y, prec, trans_b=True)
    rr_rows, rr_cols = _iotas(W, W)
    nn_rows, nn_cols = _iotas(TP, TP)
    every = jnp.ones((TP, W), bool)
    A_RR = _decayed(gram(ring.k, ring.k), ring.beta * ring.rk, ring.rk, GR, GR, rr_cols < rr_rows)
    A_NR = _decayed(gram(new.k, ring.k), new.beta * new.rk, ring.rk, GN, GR, every)
    A_NN = _decayed(gram(new.k, new.k), new.beta * new.rk, new.rk, GN, GN, nn_cols < nn_rows)
    X_RR, X_NN = unit_lower_inverse(A_RR, prec), unit_lower_inverse(A_NN, prec)
    X_NR = -dot(X_NN, dot(A_NR, X_RR, prec), prec)
    M_QR = _decayed(gram(q, ring.k), rq, ring.rk, GN, GR, every)
    M_QN = _decayed(gram(q, new.k), rq, new.rk, GN, GN, nn_cols <= nn_rows)
    return _Solved(GR, GN, g_tot, X_RR, X_NR, X_NN, M_QR, M_QN)


def ring_then_tokens(S0, ring: Run, new: Run, q, rq, prec: Precisions):
    """Outputs of the new tokens after the ring, and what the ring's fold needs.

    S0: [BV, K] the state tile (the pool's dtype, or fp32); ring: W rows; new: TP rows;
    q: [TP, K] raw queries (input dtype), rq: [TP] fp32 (l2-norm scale times K**-0.5; 0 for dead
    rows). Returns (o [TP, BV] fp32, v_new of the ring [W, BV] fp32, G of the
    ring [W] fp32, its total log decay (scalar)).
    """
    sol = _solve(ring, new, q, rq, prec)
    GR, GN = sol.GR, sol.GN

    # The one product with the state: [k_R; k_N; q] @ S0^T (three dots of one operand).
    state = lambda x: dot(x, S0, prec, trans_b=True)
    P_R, P_N, P_Q = state(ring.k), state(new.k), state(q)

    def corrected(run: Run, G, P):  # beta v - beta exp(G) k S0^T, per row
        shape = P.shape
        return (_col(run.beta, shape) * run.v
                - _col(run.beta * jnp.exp(G) * run.rk, shape) * P)

    Z_R, Z_N = corrected(ring, GR, P_R), corrected(new, GN, P_N)
    v_R = dot(sol.X_RR, Z_R, prec)
    v_N = dot(sol.X_NR, Z_R, prec) + dot(sol.X_NN, Z_N, prec)
    o = (_col(jnp.exp(GN) * rq, P_Q.shape) * P_Q + dot(sol.M_QR, v_R, prec)
         + dot(sol.M_QN, v_N, prec))
    return o, v_R, GR, sol.g_tot


def fold_ring(S0, ring: Run, v_R, GR, g_tot, prec: Precisions):
    """The state after the ring: exp(G_W) S0 + sum_j exp(G_W - G_j) v_new_j k_j^T, [BV, K] fp32."""
    weights = v_R * _col(jnp.exp(g_tot - GR) * ring.rk, v_R.shape)          # [W, BV]
    update = dot(weights, ring.k, prec, trans_a=True)                       # [BV, K]
    return jnp.exp(g_tot) * S0.astype(_F32) + update


# ------------------------------------------------------------------------------------------------
# The split form: the state-free algebra once per (row, value head), batched ahead of the state
# kernel (`token_algebra`), and the state kernel's part per V block (`state_block`, `fold_block`).


class Keys(NamedTuple):
    """One side of the run without its values: M rows (k raw, rk, g, beta as in `Run`)."""

    k: object
    rk: object
    g: object
    beta: object


class Algebra(NamedTuple):
    """What a run's tokens contribute whatever the state (one value head, all of V).

    With Z = beta v - c (k_raw S0^T) per row (the corrected values' right-hand side):
        o   = d (q_raw S0^T) + O_R Z_R + O_N Z_N      (the new tokens' outputs, [TP, BV])
        S_R = exp(g_tot) S0 + (F Z_R)^T k_raw_R        (the ring folded)
    """

    O_R: object     # [TP, W]: M_QR X_RR + M_QN X_NR
    O_N: object     # [TP, TP]: M_QN X_NN
    F: object       # [W, W]: diag(exp(g_tot - G_R) rk_R) X_RR
    beta_R: object  # [W]
    c_R: object     # [W]: beta exp(G) rk of the ring's rows
    beta_N: object  # [TP]
    c_N: object     # [TP]
    d: object       # [TP]: exp(G) rq of the new rows
    g_tot: object   # scalar


def token_algebra(ring: Keys, new: Keys, q, rq, prec: Precisions) -> Algebra:
    """The state-free part of a run of the ring then the new tokens (q, rq as
    `ring_then_tokens`)."""
    W = ring.k.shape[0]
    sol = _solve(ring, new, q, rq, prec)
    O_R = dot(sol.M_QR, sol.X_RR, prec) + dot(sol.M_QN, sol.X_NR, prec)
    O_N = dot(sol.M_QN, sol.X_NN, prec)
    F = _col(jnp.exp(sol.g_tot - sol.GR) * ring.rk, (W, W)) * sol.X_RR
    return Algebra(O_R, O_N, F, ring.beta, ring.beta * jnp.exp(sol.GR) * ring.rk, new.beta,
                   new.beta * jnp.exp(sol.GN) * new.rk, jnp.exp(sol.GN) * rq, sol.g_tot)


def state_block(S0, kR, kN, q, vR, vN, alg: Algebra, prec: Precisions):
    """The new tokens' outputs on one V block of the state, and the ring's corrected right-hand
    side (for a fold). S0: [BV, K] (the pool's dtype, or fp32); kR [W, K], kN, q [TP, K] raw;
    vR [W, BV], vN [TP, BV] fp32. Returns (o [TP, BV] fp32, Z_R [W, BV] fp32)."""
    state = lambda x: dot(x, S0, prec, trans_b=True)  # [k_R; k_N; q] S0^T, three dots
    P_R, P_N, P_Q = state(kR), state(kN), state(q)
    Z_R = _col(alg.beta_R, P_R.shape) * vR - _col(alg.c_R, P_R.shape) * P_R
    Z_N = _col(alg.beta_N, P_N.shape) * vN - _col(alg.c_N, P_N.shape) * P_N
    o = _col(alg.d, P_Q.shape) * P_Q + dot(alg.O_R, Z_R, prec) + dot(alg.O_N, Z_N, prec)
    return o, Z_R


def fold_block(S0, kR, Z_R, alg: Algebra, prec: Precisions):
    """One V block of the state after the ring: exp(g_tot) S0 + (F Z_R)^T k_R, [BV, K] fp32."""
    update = dot(dot(alg.F, Z_R, prec), kR, prec, trans_a=True)   # [BV, K]
    return jnp.exp(alg.g_tot) * S0.astype(_F32) + update
