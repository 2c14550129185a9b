"""The math of replay's matrix (WY) form (`kernels._wy_mgpu.solve`) as plain JAX, against the
token-by-token recurrence in float64: the kernel's per-row algebra, apart from its products.

The kernel cases (test_kernel_cases.py, `wy`) run the whole kernel in the Mosaic GPU interpreter
and on the GPU; this pins the algebra itself at fp32 accuracy (1e-5), with dead candidates that
hold data and gates from mild to strong decay.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import _wy_mgpu as wy

K, BV = 32, 8


def _normalise(x):
    return x / np.sqrt(np.sum(x * x) + 1e-6)


def _recurrence(S0, cand, tokens, n):
    """float64: fold the first n candidates (k, v, g, beta), then the tokens (q, k, v, g, beta)
    with outputs. Returns (outputs [T, BV], the state after the candidates [BV, K])."""
    S = S0.astype(np.float64)
    for k, v, g, beta in cand[:n]:
        S = np.exp(g) * S
        kn = _normalise(k)
        S = S + np.outer(beta * (v - S @ kn), kn)
    folded = S.copy()
    outs = []
    for q, k, v, g, beta in tokens:
        S = np.exp(g) * S
        kn = _normalise(k)
        S = S + np.outer(beta * (v - S @ kn), kn)
        outs.append(S @ (_normalise(q) * K ** -0.5))
    return np.array(outs), folded


@pytest.mark.parametrize("n, t_max, T, decay", [(0, 4, 4, 0.05), (2, 4, 3, 0.05), (4, 4, 1, 0.05),
                                                (3, 5, 8, 2.0), (8, 8, 8, 0.3)])
def test_solve_matches_the_recurrence(n, t_max, T, decay):
    rng = np.random.default_rng(n * 100 + t_max * 10 + T)
    S0 = rng.standard_normal((BV, K))
    gates = lambda: (-decay * rng.uniform(0.1, 1.0), rng.uniform(0.05, 1.0))
    cand = [(rng.standard_normal(K), rng.standard_normal(BV), *gates()) for _ in range(t_max)]
    tokens = [(rng.standard_normal(K), rng.standard_normal(K), rng.standard_normal(BV),
               *gates()) for _ in range(T)]
    want_o, want_S = _recurrence(S0, cand, tokens, n)

    # X as the kernel lays it out: candidate keys, keys, queries in groups of wy.GROUP rows
    X = np.zeros((3 * wy.GROUP, K))
    X[:t_max] = [c[0] for c in cand]
    X[wy.GROUP:wy.GROUP + T] = [t[1] for t in tokens]
    X[2 * wy.GROUP:2 * wy.GROUP + T] = [t[0] for t in tokens]
    X = jnp.asarray(X, jnp.float32)
    S0_32 = jnp.asarray(S0, jnp.float32)
    PT, gram = X @ S0_32.T, X @ X.T
    values = [c[1] for c in cand] + [t[2] for t in tokens]
    outs, w, e_n, _ = wy.solve(
        jnp.int32(n), [(jnp.float32(t[3]), jnp.float32(t[4])) for t in tokens],
        [(jnp.float32(c[2]), jnp.float32(c[3])) for c in cand],
        lambda r, c: gram[r, c], lambda r: PT[r], lambda i: jnp.asarray(values[i], jnp.float32),
        K)

    got_o = np.array([np.asarray(o) for o in outs])
    np.testing.assert_allclose(got_o, want_o, rtol=1e-5, atol=1e-5 * np.abs(want_o).max())
    got_S = np.asarray(e_n * S0_32 + sum(jnp.outer(w[j], X[j]) for j in range(t_max)))
    np.testing.assert_allclose(got_S, want_S, rtol=1e-5, atol=1e-5 * np.abs(want_S).max())
    for j in range(n, t_max):  # a dead candidate adds nothing, whatever its data
        assert not np.any(np.asarray(w[j]))
