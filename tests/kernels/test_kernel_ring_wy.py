"""The math of ring mode's matrix form (`kernels._ring_wy_mgpu`: `ring_scales`, `after_ring`, with
`_wy_mgpu.solve` for the new tokens) as plain JAX, against the float64 recurrence: the
kernel's per-row algebra, apart from its products.

The kernel itself runs in test_kernel_ring.py (interpreted, and on the GPU); this pins the algebra
at fp32 accuracy (1e-5), with dead ring entries holding NaN and gates from mild to strong decay.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import _wy_mgpu as wy
from gdn_jax.kernels import _ring_wy_mgpu as ring

K, BV = 32, 8


def _normalise(x):
    return x / np.sqrt(np.sum(x * x) + 1e-6)


@pytest.mark.parametrize("n, W, T, decay", [(0, 16, 4, 0.05), (5, 16, 1, 0.05), (16, 16, 4, 0.3),
                                            (11, 32, 3, 2.0)])
def test_ring_rows_and_solve_match_the_recurrence(n, W, T, decay):
    rng = np.random.default_rng(n * 100 + W + T)
    S0 = rng.standard_normal((BV, K))
    gate = lambda: -decay * rng.uniform(0.1, 1.0)
    ring_k = rng.standard_normal((W, K))
    ring_u = rng.standard_normal((W, BV))
    ring_g = np.array([gate() for _ in range(W)])
    ring_k[n:], ring_u[n:], ring_g[n:] = np.nan, np.nan, np.nan  # dead: anything
    tokens = [(rng.standard_normal(K), rng.standard_normal(K), rng.standard_normal(BV), gate(),
               rng.uniform(0.05, 1.0)) for _ in range(T)]

    # float64: the ring folded (its u as given), then the tokens with outputs and their u
    S = S0.copy()
    for l in range(n):
        S = np.exp(ring_g[l]) * S + np.outer(ring_u[l], _normalise(ring_k[l]))
    want_SR = S.copy()
    want_o, want_u = [], []
    for q, k, v, g, beta in tokens:
        S = np.exp(g) * S
        kn = _normalise(k)
        u = beta * (v - S @ kn)
        S = S + np.outer(u, kn)
        want_u.append(u)
        want_o.append(S @ (_normalise(q) * K ** -0.5))

    # X as the kernel lays it out (`x_rows`): keys, queries, then the ring
    rows = ring.x_rows(T)
    R = rows.pending
    X = np.zeros((R + W, K))
    X[rows.key:rows.key + T] = [t[1] for t in tokens]
    X[rows.query:rows.query + T] = [t[0] for t in tokens]
    X[R:R + n] = ring_k[:n]  # the kernel zeroes the dead entries' rows
    X = jnp.asarray(X, jnp.float32)
    PT, gram = X @ jnp.asarray(S0, jnp.float32).T, X @ X.T
    c, e_n = ring.ring_scales(jnp.int32(n), [jnp.float32(g) for g in ring_g],
                              lambda l: gram[R + l, R + l])
    # a dead entry's u reads a zero row in the kernel
    w = [cl * jnp.asarray(ring_u[l] if l < n else np.zeros(BV), jnp.float32)
         for l, cl in enumerate(c)]
    # the groups of PT^T as the kernel holds them, the ring's part added
    token_rows = ring.token_rows_after_ring(
        PT[:R].T, e_n, w, lambda first, l: gram[R + l, first:first + wy.GROUP])
    outs, _, _, us = wy.solve(jnp.int32(0), [(jnp.float32(t[3]), jnp.float32(t[4]))
                                             for t in tokens], [],
                              lambda r, cc: gram[r, cc], token_rows,
                              lambda t: jnp.asarray(tokens[t][2], jnp.float32), K, x_rows=rows)

    for got, want in ((outs, want_o), (us, want_u)):
        got, want = np.array([np.asarray(x) for x in got]), np.array(want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    got_SR = np.asarray(e_n * jnp.asarray(S0, jnp.float32)
                        + sum(jnp.outer(w[l], X[R + l]) for l in range(W)))
    np.testing.assert_allclose(got_SR, want_SR, rtol=1e-5, atol=1e-5 * np.abs(want_SR).max())
    assert all(not np.any(np.asarray(c[l])) for l in range(n, W))  # a dead entry adds nothing
