"""The math of ring mode's matrix form (`kernels._ring_wy_mgpu`: `ring_scales`, and in each form
the tokens' products with the state after the ring -- the rows form's `ring_row`, the state form's
S_R = e^{G_n} S0 + W^T X' -- with `_wy_mgpu.solve` for the new tokens) as plain JAX, against the
float64 recurrence: the kernel's algebra, its products at fp32.

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


CASES = [(0, 16, 4, 0.05), (5, 16, 1, 0.05), (16, 16, 4, 0.3), (11, 32, 3, 2.0)]


def _case(n, W, T, decay):
    """A ring of W entries (the first n committed, the rest NaN), T tokens, and the float64
    recurrence's S_R, outputs and u."""
    rng = np.random.default_rng(n * 100 + W + T)
    S0 = rng.standard_normal((BV, K))
    gate = lambda: -decay * rng.uniform(0.1, 1.0)
    ring_k = rng.standard_normal((W, K))
    ring_u = rng.standard_normal((W, BV))
    ring_g = np.array([gate() for _ in range(W)])
    ring_k[n:], ring_u[n:], ring_g[n:] = np.nan, np.nan, np.nan  # dead: anything
    tokens = [(rng.standard_normal(K), rng.standard_normal(K), rng.standard_normal(BV), gate(),
               rng.uniform(0.05, 1.0)) for _ in range(T)]

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
    return (S0, ring_k, ring_u, ring_g, tokens), (want_SR, want_o, want_u)


def _scales(n, ring_g, ring_u, norm2):
    c, e_n = ring.ring_scales(jnp.int32(n), [jnp.float32(g) for g in ring_g], norm2)
    # a dead entry's u is zero in the kernel (read from a zero row, or selected out)
    w = [cl * jnp.asarray(ring_u[l] if l < n else np.zeros(BV), jnp.float32)
         for l, cl in enumerate(c)]
    assert all(not np.any(np.asarray(c[l])) for l in range(n, len(ring_g)))  # dead: adds nothing
    return w, e_n


def _solve(tokens, gram, row, **rows):
    return wy.solve(jnp.int32(0), [(jnp.float32(t[3]), jnp.float32(t[4])) for t in tokens], [],
                    lambda r, cc: gram[r, cc], row,
                    lambda t: jnp.asarray(tokens[t][2], jnp.float32), K, **rows)


def _check(got_SR, outs, us, want):
    want_SR, want_o, want_u = want
    for got, w in ((outs, want_o), (us, want_u)):
        got, w = np.array([np.asarray(x) for x in got]), np.array(w)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    np.testing.assert_allclose(np.asarray(got_SR), want_SR, rtol=1e-5,
                               atol=1e-5 * np.abs(want_SR).max())


@pytest.mark.parametrize("n, W, T, decay", CASES)
def test_ring_rows_and_solve_match_the_recurrence(n, W, T, decay):
    """The rows form: X = [0; keys (8..); queries (16..); ring (24..)], each token row's product
    with S_R from S0's and the Gram's."""
    (S0, ring_k, ring_u, ring_g, tokens), want = _case(n, W, T, decay)
    X = np.zeros((ring.RING_ROW + W, K))
    X[wy.GROUP:wy.GROUP + T] = [t[1] for t in tokens]
    X[2 * wy.GROUP:2 * wy.GROUP + T] = [t[0] for t in tokens]
    X[ring.RING_ROW:ring.RING_ROW + n] = ring_k[:n]  # the kernel zeroes the dead entries' rows
    X = jnp.asarray(X, jnp.float32)
    PT, gram = X @ jnp.asarray(S0, jnp.float32).T, X @ X.T
    w, e_n = _scales(n, ring_g, ring_u, lambda l: gram[ring.RING_ROW + l, ring.RING_ROW + l])
    rows = lambda r: ring.ring_row(r, e_n, w, lambda r: PT[r],
                                   lambda r, l: gram[r, ring.RING_ROW + l])
    outs, _, _, us = _solve(tokens, gram, rows)
    got_SR = (e_n * jnp.asarray(S0, jnp.float32)
              + sum(jnp.outer(w[l], X[ring.RING_ROW + l]) for l in range(W)))
    _check(got_SR, outs, us, want)


@pytest.mark.parametrize("n, W, T, decay", CASES + [(32, 32, 16, 0.05), (7, 32, 9, 0.3)])
def test_ring_state_and_solve_match_the_recurrence(n, W, T, decay):
    """The state form: X = [ring (0..); keys (32..); queries (48..)], S_R formed as
    e^{G_n} S0 + W^T X', the token rows' products taken from it."""
    (S0, ring_k, ring_u, ring_g, tokens), want = _case(n, W, T, decay)
    X = np.zeros((wy.ROWS, K))
    X[ring.KEY_ROW:ring.KEY_ROW + T] = [t[1] for t in tokens]
    X[ring.QUERY_ROW:ring.QUERY_ROW + T] = [t[0] for t in tokens]
    X[:n] = ring_k[:n]  # the kernel zeroes the dead entries' rows
    X = jnp.asarray(X, jnp.float32)
    gram = X @ X.T
    w, e_n = _scales(n, ring_g, ring_u, lambda l: gram[l, l])
    SR = e_n * jnp.asarray(S0, jnp.float32) + jnp.stack(w).T @ X[:W]
    PTT = SR @ X.T  # [BV, 64]: row r's product with S_R is column r
    outs, _, _, us = _solve(tokens, gram, lambda r: PTT[:, r], keys=ring.KEY_ROW,
                            queries=ring.QUERY_ROW)
    _check(SR, outs, us, want)
