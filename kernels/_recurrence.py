"""The per-token math of the gated delta rule on one program's tile, as pure array functions.

One program owns the tile S [BV, K] fp32 of one value head's state (rows: a block of V, columns:
all of K, contiguous in the pool). Every reduction runs over K with multiply + sum (Triton's
`dot` wants 2-D operands of >= 16 and would use TF32 for fp32). All inputs are fp32 already.

Per token (DESIGN.md):
    S = exp(g) * S
    S = S + outer(beta * (v - S k), k)
    o = S q                                  (the UPDATED state)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
L2NORM_EPS = 1e-6


def softplus(x):
    """log(1 + exp(x)) without overflow (max(x, 0) + log1p(exp(-|x|)))."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def gates(a, b, A_log, dt_bias):
    """Scalars (fp32) -> (g, beta): g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)."""
    g = -jnp.exp(A_log) * softplus(a + dt_bias)
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
    kb = k[None, :]                                   # [1, K]
    u = (v - jnp.sum(S * kb, axis=1)) * beta          # [BV]: beta * (v - S k)
    return S + u[:, None] * kb


def readout(S, q):
    """o = S q: S [BV, K], q [K] (prepared) -> [BV]."""
    return jnp.sum(S * q[None, :], axis=1)
