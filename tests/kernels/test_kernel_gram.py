"""The gram form's math (kernels/_gram.py) on plain arrays against the sequential recurrence
(kernels/_recurrence.py, DESIGN.md's per-token rule), and its masked pending slots in a kernel."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import _gram as gm
from gdn_jax.kernels import _recurrence as rec
from gdn_jax.kernels import verify_replay

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _decays(rng, regime, n):
    """Log decays g <= 0: weak (~0), gated (A_log up to +2, large gate inputs) or strong
    (down to -20)."""
    if regime == "weak":
        return rng.uniform(-0.05, 0.0, n)
    if regime == "strong":
        return rng.uniform(-20.0, -5.0, n)
    A_log = rng.uniform(-1.0, 2.0, n)
    return np.asarray(rec.gates(jnp.asarray(rng.normal(0, 3, n), F32), 0.0,
                                jnp.asarray(A_log, F32), 0.0)[0])


def _sequential(S0, qn, kn, vn, gn, bn, kp, vp, gp, bp, count):
    S = S0
    for t in range(count):
        S = rec.update(S, rec.l2norm(kp[t]), vp[t], gp[t], bp[t])
    S_pend, outs, states = S, [], []
    for t in range(qn.shape[0]):
        S = rec.update(S, rec.l2norm(kn[t]), vn[t], gn[t], bn[t])
        outs.append(rec.readout(S, rec.prepare_q(qn[t])))
        states.append(S)
    return jnp.stack(outs), S_pend, jnp.stack(states)


@pytest.mark.parametrize("regime", ["weak", "gated", "strong"])
@pytest.mark.parametrize("T, t_max, count", [(1, 1, 0), (4, 8, 3), (8, 8, 8), (5, 2, 1)])
def test_gram_matches_sequential(T, t_max, count, regime, assert_close):
    rng = np.random.default_rng(T * 100 + t_max * 10 + count + len(regime))
    K, BV = 64, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), F32)
    S0 = 0.5 * f(BV, K)
    qn, kn, vn, kp, vp = f(T, K), f(T, K), f(T, BV), f(t_max, K), f(t_max, BV)
    gn, gp = (jnp.asarray(_decays(rng, regime, n), F32) for n in (T, t_max))
    bn, bp = (jnp.asarray(rng.uniform(0.0, 1.0, n), F32) for n in (T, t_max))
    # stale candidates past count must not matter, whatever they hold
    stale = np.arange(t_max) >= count
    kp = jnp.where(stale[:, None], jnp.nan, kp)
    vp = jnp.where(stale[:, None], jnp.inf, vp)
    gp, bp = jnp.where(stale, jnp.nan, gp), jnp.where(stale, jnp.nan, bp)

    o_ref, S_pend_ref, states_ref = _sequential(S0, qn, kn, vn, gn, bn, kp, vp, gp, bp, count)
    X, V, g, beta, lay = gm.chunk_from_arrays(qn, kn, vn, gn, bn, kp, vp, gp, bp, count)
    sol = gm.solve(S0, X, V, g, beta, lay, n_tokens=t_max + T, precision=gm.HIGHEST)
    state = lambda last: gm.state_after(S0, X, sol.U, g, sol.G, lay, last, precision=gm.HIGHEST)
    for x in (sol.U, sol.Y, sol.G):
        assert np.isfinite(np.asarray(x)).all()
    assert_close("o", sol.Y[:T], o_ref)
    assert_close("state after the pending slots", state(t_max - 1), S_pend_ref)
    assert_close("states after each new token",
                 jnp.stack([state(t_max + t) for t in range(T)]), states_ref)


def test_unit_lower_inverse():
    rng = np.random.default_rng(0)
    for n_rows, n in ((16, 12), (32, 24), (16, 1)):
        N = np.tril(rng.uniform(-1, 1, (n_rows, n_rows)), -1).astype(np.float32)
        N[n:, :] = 0.0  # only n rows take part (a chain of at most n - 1 links)
        N[:, n:] = 0.0
        inv = gm.unit_lower_inverse(jnp.asarray(N), gm.solve_factors(n))
        want = np.linalg.inv(np.eye(n_rows) - N.astype(np.float64))
        np.testing.assert_allclose(np.asarray(inv), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_num_rows_and_precision():
    assert gm.num_rows(1, 1) == 16 and gm.num_rows(4, 8) == 16 and gm.num_rows(8, 8) == 32
    assert gm.state_precision(BF16, BF16) == gm.DEFAULT  # TF32 only where all results are bf16
    for pool, out in ((BF16, F32), (BF16, F16), (F32, BF16), (F32, F32)):
        assert gm.state_precision(pool, out) == gm.HIGHEST


def test_gram_kernel_ignores_stale_candidates(make_case, reference, assert_rows,
                                              assert_named_slots, assert_untouched):
    """Candidates past count[slot] of the slots in use are NaN/inf: the gram kernel masks them
    off (identity steps), so o and the folded state match the reference."""
    case = make_case(seed=31, B=3, T=2, H=1, group=2, K=16, pool_dtype=F32, t_max=4)
    o_ref, pool_ref = reference(case, "replay")  # the XLA reference multiplies stale ones by 0
    stale = np.arange(4)[None, :] >= np.asarray(case.count)[:, None]  # [num_slots, T_max]
    bad = lambda x, val: jnp.where(stale.reshape(stale.shape + (1,) * (x.ndim - 2)), val, x)
    case.cand_k, case.cand_v = bad(case.cand_k, jnp.nan), bad(case.cand_v, jnp.inf)
    case.cand_g, case.cand_beta = bad(case.cand_g, jnp.nan), bad(case.cand_beta, jnp.nan)
    o, pool = verify_replay(*case.kernel_args(), block_v=16, form="gram", interpret=True)
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)
