"""The matrix (WY) form of the gated delta rule for a short run of new tokens after a ring of
committed ones, on one program's tile.

Pure array functions (no refs): the ring kernel's math, also run as plain JAX in the tests. The
state S0 [BV, K] (rows: a block of V, columns: K) is the pool's; the ring holds W committed tokens
(R) not yet folded into it, each as its raw key, its log decay g and its corrected value u (fp32)
-- what the delta rule adds to the state, S_j = exp(g_j) S_{j-1} + u_j k_j^T with
u_j = beta_j (v_j - exp(g_j) S_{j-1} k_j): a token's u does not depend on where a run starts, so
the ring's u stay valid until the fold. TP new tokens (N) follow. Dead tokens (ring entries past
the committed count, new rows past T) enter with a zero key scale, g = 0, beta = 0 and u = 0: an
exact identity step.

Keys and queries enter raw (the input dtype) with their l2-norm scales apart, so every product
with the state, `raw @ S0^T`, is exact on tensor cores for a bf16 pool and bf16 inputs (the
product of two bf16 numbers is exact in the fp32 accumulator). With G the inclusive cumulative
log decay from S0 (over the ring, then the new tokens) and k_i = rk_i kraw_i:

    A_NN = strict_lower(beta_i k_i . k_j exp(G_i - G_j)),  A_NR = beta_i k_i . k_j exp(G_i - G_j)
    u_N = (I + A_NN)^-1 (beta v - beta exp(G) k S0^T - A_NR u_R)    the new tokens' u
    o_i = exp(G_i) q_i S0^T + sum_{j in R} (q_i . k_j) exp(G_i - G_j) u_j
                            + sum_{j in N, j <= i} (q_i . k_j) exp(G_i - G_j) u_j
    S_R = exp(G_W) S0 + sum_{j in R} exp(G_W - G_j) u_j k_j^T        (the fold of the ring)

So a call reads the state once for the products with its own keys and queries, and the ring's
contribution costs [TP, W] products of its u: nothing of the ring is solved again.
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


class Ring(NamedTuple):
    """The ring's committed tokens: W rows (dead rows: rk = g = 0, u = 0)."""

    k: object      # [W, K] raw keys (input dtype)
    rk: object     # [W] fp32 key scale (l2-norm; 0 for a dead row)
    g: object      # [W] fp32 log decay
    u: object      # [W, BV] fp32 corrected values


class New(NamedTuple):
    """This call's tokens: TP rows (rows past T dead: rk = rq = g = beta = 0)."""

    k: object      # [TP, K] raw keys (input dtype)
    rk: object     # [TP] fp32
    q: object      # [TP, K] raw queries (input dtype)
    rq: object     # [TP] fp32 query scale (l2-norm times K**-0.5)
    v: object      # [TP, BV] fp32 values
    g: object      # [TP] fp32
    beta: object   # [TP] fp32


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


def unit_lower_inverse(A, prec: Precisions, size: int | None = None):
    """(I + A)^-1 for A [M, M] fp32 strictly lower triangular, M a power of two: the blocked
    recursive inversion with matrix products only. With D_b the block-diagonal inverse of
    blocks of size b (D_1 = I), D_2b = D_b - D_b E_b D_b, E_b the entries of A in the lower-left
    b x b block of each 2b x 2b diagonal block ([[X11, 0], [L21, X22]]^-1 has the lower-left
    block -X22 L21 X11). Masks stand in for block slices (a register tile has no slicing).
    size: a power of two with A zero outside its leading [size, size] block (the tile's rows
    past T): the levels stop there, log2(size) of them instead of log2(M)."""
    M = A.shape[0]
    rows, cols = _iotas(M, M)
    D = jnp.where(rows == cols, 1.0, 0.0).astype(_F32)
    b = 1
    while b < (M if size is None else size):
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


def new_tokens(S0, ring: Ring, new: New, prec: Precisions, size: int | None = None):
    """The new tokens' outputs and corrected values after the ring, on one V block of the state.

    S0: [BV, K] the state tile (the pool's dtype, or fp32); size: a power of two >= T (the new
    tokens' triangular solve stops there; None: TP). Returns (o [TP, BV] fp32, u [TP, BV] fp32,
    the ring's cumulative log decay G_R [W] and total g_tot, for `fold`)."""
    W, TP = ring.k.shape[0], new.k.shape[0]
    GR = jnp.cumsum(ring.g)
    g_tot = jnp.sum(ring.g)
    GN = g_tot + jnp.cumsum(new.g)
    # Gram matrices of raw keys / queries: one dtype, exact for bf16 and fp16 inputs.
    gram = lambda x, y: dot(x, y, prec, trans_b=True)
    nn_rows, nn_cols = _iotas(TP, TP)
    every = jnp.ones((TP, W), bool)
    A_NR = _decayed(gram(new.k, ring.k), new.beta * new.rk, ring.rk, GN, GR, every)
    A_NN = _decayed(gram(new.k, new.k), new.beta * new.rk, new.rk, GN, GN, nn_cols < nn_rows)
    M_QR = _decayed(gram(new.q, ring.k), new.rq, ring.rk, GN, GR, every)
    M_QN = _decayed(gram(new.q, new.k), new.rq, new.rk, GN, GN, nn_cols <= nn_rows)

    # The products with the state: [k_N; q] @ S0^T.
    P_N, P_Q = dot(new.k, S0, prec, trans_b=True), dot(new.q, S0, prec, trans_b=True)
    shape = P_N.shape
    Z = (_col(new.beta, shape) * new.v - _col(new.beta * jnp.exp(GN) * new.rk, shape) * P_N
         - dot(A_NR, ring.u, prec))
    u = Z if size == 1 else dot(unit_lower_inverse(A_NN, prec, size), Z, prec)
    o = (_col(jnp.exp(GN) * new.rq, shape) * P_Q + dot(M_QR, ring.u, prec)
         + dot(M_QN, u, prec))
    return o, u, GR, g_tot


def fold(S0, ring: Ring, GR, g_tot, prec: Precisions):
    """The state after the ring: exp(G_W) S0 + sum_j exp(G_W - G_j) u_j k_j^T, [BV, K] fp32."""
    weights = ring.u * _col(jnp.exp(g_tot - GR) * ring.rk, ring.u.shape)    # [W, BV]
    update = dot(weights, ring.k, prec, trans_a=True)                       # [BV, K]
    return jnp.exp(g_tot) * S0.astype(_F32) + update
