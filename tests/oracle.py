"""An independent float64 NumPy oracle: plain loops from the math in the README's "Design".

It shares no code with gdn_jax. The state layout is the pool's `[HV, V, K]` per sequence.
"""

from __future__ import annotations

import numpy as np


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def gates(a, b, A_log, dt_bias):
    """a, b: [..., HV]; A_log, dt_bias: [HV] -> g, beta float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g = -np.exp(np.asarray(A_log, np.float64)) * softplus(a + np.asarray(dt_bias, np.float64))
    beta = 1.0 / (1.0 + np.exp(-b))
    return g, beta


def step(S, q, k, v, g, beta):
    """One token for one value head. S: [V, K]; q, k: [K] raw; v: [V]; g, beta: scalars.

    Returns the new S and o = S q (q, k l2-normalised, q scaled by K**-0.5), q may be None.
    """
    K = k.shape[0]
    k = k / np.sqrt(np.sum(k * k) + 1e-6)
    S = np.exp(g) * S
    S = S + np.outer(beta * (v - S @ k), k)
    if q is None:
        return S, None
    q = q / np.sqrt(np.sum(q * q) + 1e-6) * K ** -0.5
    return S, S @ q


def run(S, q, k, v, g, beta):
    """Tokens in order for one sequence.

    S: [HV, V, K]; q, k: [T, H, K]; v: [T, HV, V]; g, beta: [T, HV] (float64).
    Returns (o [T, HV, V], final S [HV, V, K], states [T, HV, V, K] after each token).
    """
    S = np.array(S, np.float64, copy=True)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, H, _ = k.shape
    HV = v.shape[1]
    o = np.zeros((T,) + v.shape[1:])
    states = np.zeros((T,) + S.shape)
    for t in range(T):
        for h in range(HV):
            kh = h // (HV // H)
            S[h], o[t, h] = step(S[h], q[t, kh], k[t, kh], v[t, h], g[t, h], beta[t, h])
        states[t] = S
    return o, S, states
