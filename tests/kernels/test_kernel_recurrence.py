"""The kernels' per-token math helpers against float64 numpy on random inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gdn_jax.kernels import _recurrence as rec

ULP32 = 2.0 ** -24  # fp32 unit roundoff


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float64).tiny)


def test_log1p_kahan_within_a_few_ulp_everywhere():
    """Tiny y (where 1 + y rounds to 1 and log(1 + y) would be 0), y near 0 and 1 (softplus's
    range), large y up to 1e38, and y in (-1, 0)."""
    rng = np.random.default_rng(0)
    y = np.concatenate([
        10 ** rng.uniform(-38, -7, 2000), 10 ** rng.uniform(-7, 0, 2000),
        10 ** rng.uniform(0, 38, 2000), -rng.uniform(0, 0.999, 2000),
        -(10 ** rng.uniform(-38, -3, 2000)), [0.0, 1e-45, 2.0 ** -24, 2.0 ** -23, 1.0],
    ]).astype(np.float32)
    got = np.asarray(rec.log1p_kahan(jnp.asarray(y)))
    assert got.dtype == np.float32
    want = np.log1p(y.astype(np.float64))
    rel = _rel(got, want)
    assert rel.max() <= 4 * ULP32, (y[rel.argmax()], rel.max() / ULP32)
    tiny = np.abs(y) < 2.0 ** -25  # 1 + y rounds to 1: the result is y itself
    np.testing.assert_array_equal(got[tiny], y[tiny])
    # The naive form loses everything there: the test can tell the two apart.
    naive = np.asarray(jnp.log(1.0 + jnp.asarray(y)))
    assert _rel(naive, want)[tiny & (y != 0)].min() == 1.0

