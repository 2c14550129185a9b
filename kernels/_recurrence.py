"""The per-token math of the gated delta rule on one program's tile, as pure array functions.

One program owns the tile S [BV, K] fp32 of one value head's state (rows: a block of V, columns:
all of K, contiguous in the pool). Every reduction runs over K with multiply + sum (Triton's
`dot` wants 2-D operands of >= 16 and would use TF32 for fp32). All inputs are fp32 already.
Vectors are broadcast with `lax.broadcast_in_dim` (not `x[:, None]`): both the Triton and the
Mosaic GPU lowering take it, and Mosaic's layout inference fails on the reshape form.

Per token (README, "Design"; `gdn_jax.ops.reference` is the plain-JAX form):
    S = exp(g) * S
    S = S + outer(beta * (v - S k), k)
    o = S q                                  (the UPDATED state)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
L2NORM_EPS = 1e-6


def log1p_kahan(y):
    """log(1 + y) to a few ulp without a log1p primitive (Mosaic GPU lowers none): Kahan's
    log(u) * y / (u - 1) with u = 1 + y, and y itself where u rounds to 1."""
    u = 1.0 + y
    d = u - 1.0
    return jnp.where(d == 0.0, y, jnp.log(u) * (y / jnp.where(d == 0.0, 1.0, d)))


def softplus(x, log1p=jnp.log1p):
    """log(1 + exp(x)) without overflow (max(x, 0) + log1p(exp(-|x|)))."""
    return jnp.maximum(x, 0.0) + log1p(jnp.exp(-jnp.abs(x)))


def gates(a, b, A_log, dt_bias, *, log1p=jnp.log1p):
    """Scalars (fp32) -> (g, beta): g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b).
    Elementwise: arrays of one shape work too. a = b = -inf gives g = -0.0 and beta = 0 (an
    identity step)."""
    g = -jnp.exp(A_log) * softplus(a + dt_bias, log1p)
    beta = 1.0 / (1.0 + jnp.exp(-b))
    return g, beta


def l2norm(x):
    """x [K] fp32 -> x * rsqrt(sum(x^2) + 1e-6)."""
    return x * lax.rsqrt(jnp.sum(x * x) + L2NORM_EPS)


def prepare_q(q):
    """q [K] fp32 -> l2norm(q) * K**-0.5."""
    return l2norm(q) * (q.shape[-1] ** -0.5)


def update(S, k, v, g, beta):
    """One state step. S [BV, K]; k [K] (normalised); v [BV]; g, beta scalars -> S [BV, K].

    g = beta = 0 is an exact identity (exp(0) = 1, the update adds exact zeros).
    """
    S = S * jnp.exp(g)
    kb = lax.broadcast_in_dim(k, S.shape, (1,))       # [BV, K]
    u = (v - jnp.sum(S * kb, axis=1)) * beta          # [BV]: beta * (v - S k)
    return S + lax.broadcast_in_dim(u, S.shape, (0,)) * kb


def readout(S, q):
    """o = S q: S [BV, K], q [K] (prepared) -> [BV]."""
    return jnp.sum(S * lax.broadcast_in_dim(q, S.shape, (1,)), axis=1)
