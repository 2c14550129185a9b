"""The plain-JAX gated delta rule (recurrent and chunked) against the float64 NumPy oracle.

fp32 tolerance 1e-5 (normwise relative): both forms compute in fp32 at Precision.HIGHEST, and the
chunked form's triangular solves over 64-token chunks stay near 1e-6 (measured: <= 2e-6).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from gdn_cases import f64, rel_err, tokens
from gdn_jax.ops import chunk_gated_delta_rule, gating, recurrent_gated_delta_rule

FP32_TOL = 1e-5

# (T, H, HV, K, V): every T of {1, 5, 63, 64, 65, 200}, GVA ratios 1, 2, 3, K = V in {16, 64, 128},
# and K != V once.
CASES = [
    (1, 2, 2, 16, 16),
    (5, 1, 2, 64, 64),
    (63, 1, 3, 16, 16),
    (64, 2, 2, 128, 128),
    (65, 1, 2, 16, 16),
    (200, 1, 3, 64, 64),
    (200, 1, 1, 128, 128),
    (65, 2, 6, 128, 128),
    (70, 2, 4, 32, 64),
]


def _case(T, H, HV, K, V, B=2, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    tok = tokens(rng, B, T, H, HV, K, V, dtype)
    S0 = rng.standard_normal((B, HV, V, K)).astype(np.float32)
    g, beta = tok.gates64()
    ref = [oracle.run(S0[i], f64(tok.q[i]), f64(tok.k[i]), f64(tok.v[i]), g[i], beta[i])
           for i in range(B)]
    ref_o, ref_S, ref_states = (np.stack([r[j] for r in ref]) for j in range(3))
    jg, jbeta = gating(tok.a, tok.b, tok.A_log, tok.dt_bias)
    return tok, S0, (jg, jbeta), (ref_o, ref_S, ref_states)


def _ids(c):
    T, H, HV, K, V = c
    return f"T{T}-H{H}-HV{HV}-K{K}-V{V}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_recurrent_matches_oracle(case):
    tok, S0, (g, beta), (ref_o, ref_S, ref_states) = _case(*case)
    o, S, states = recurrent_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0, return_states=True)
    assert o.dtype == S.dtype == states.dtype == jnp.float32
    assert rel_err(o, ref_o) <= FP32_TOL
    assert rel_err(S, ref_S) <= FP32_TOL
    assert rel_err(states, ref_states) <= FP32_TOL


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunked_matches_oracle_and_recurrent(case):
    tok, S0, (g, beta), (ref_o, ref_S, _) = _case(*case)
    o, S = chunk_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0)
    assert rel_err(o, ref_o) <= FP32_TOL
    assert rel_err(S, ref_S) <= FP32_TOL
    o_r, S_r, _ = recurrent_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0)
    assert rel_err(o, f64(o_r)) <= FP32_TOL
    assert rel_err(S, f64(S_r)) <= FP32_TOL


def test_gating_matches_oracle():
    rng = np.random.default_rng(1)
    tok = tokens(rng, 3, 7, 1, 4, 16, 16)
    tok.a = tok.a * 30.0  # reach softplus's linear and vanishing tails
    g, beta = gating(tok.a, tok.b, tok.A_log, tok.dt_bias)
    ref_g, ref_beta = tok.gates64()
    np.testing.assert_allclose(f64(g), ref_g, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(f64(beta), ref_beta, rtol=2e-6)
    assert (f64(g) <= 0).all()


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.slow
def test_split_sequence_equals_one_call(form):
    tok, S0, (g, beta), _ = _case(130, 2, 4, 32, 32, seed=2)
    run = {
        "recurrent": lambda *a: recurrent_gated_delta_rule(*a)[:2],
        "chunked": chunk_gated_delta_rule,
    }[form]
    o, S = run(tok.q, tok.k, tok.v, g, beta, S0)
    cut = 70
    part = lambda x, sl: x[:, sl]
    o1, S1 = run(*(part(x, slice(0, cut)) for x in (tok.q, tok.k, tok.v, g, beta)), S0)
    o2, S2 = run(*(part(x, slice(cut, None)) for x in (tok.q, tok.k, tok.v, g, beta)), S1)
    assert rel_err(np.concatenate([f64(o1), f64(o2)], 1), f64(o)) <= FP32_TOL
    assert rel_err(S2, f64(S)) <= FP32_TOL


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_ragged_lengths(form):
    """Row i uses its first lengths[i] tokens; padded positions output zeros, leave the state."""
    T, lengths = 70, np.array([70, 0, 33, 64])
    tok, S0, (g, beta), _ = _case(T, 1, 2, 16, 16, B=4, seed=3)
    # Garbage (NaN) in padded positions must not leak into anything.
    pad = np.arange(T)[None, :] >= lengths[:, None]
    tok.q = jnp.where(pad[..., None, None], jnp.nan, tok.q)
    tok.v = jnp.where(pad[..., None, None], jnp.nan, tok.v)
    g_np, beta_np = tok.gates64()
    if form == "recurrent":
        o, S, _ = recurrent_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0, lengths=lengths)
    else:
        o, S = chunk_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0, lengths=lengths)
    for i, n in enumerate(lengths):
        ref_o, ref_S, _ = oracle.run(S0[i], f64(tok.q[i, :n]), f64(tok.k[i, :n]),
                                     f64(tok.v[i, :n]), g_np[i, :n], beta_np[i, :n])
        assert rel_err(S[i], ref_S) <= FP32_TOL
        if n:
            assert rel_err(o[i, :n], ref_o) <= FP32_TOL
        assert (np.asarray(o[i, n:]) == 0).all()


def test_bf16_inputs_computed_in_fp32():
    """bf16 inputs are upcast once: against the oracle on the same rounded values, fp32 tolerance."""
    tok, S0, (g, beta), (ref_o, ref_S, _) = _case(65, 1, 2, 64, 64, seed=4, dtype=jnp.bfloat16)
    o, S = chunk_gated_delta_rule(tok.q, tok.k, tok.v, g, beta, S0)
    assert rel_err(o, ref_o) <= FP32_TOL
    assert rel_err(S, ref_S) <= FP32_TOL


# ------------------------------------------------------------------------------------------------
# unit_lower_inverse: (I + A)^-1 for strictly lower triangular A, against numpy in float64


@pytest.mark.parametrize("C", [1, 2, 8, 16, 64])
@pytest.mark.parametrize("scale", [0.25, 1.0, 2.0], ids=["well", "mid", "ill"])
def test_unit_lower_inverse_matches_float64(C, scale):
    """Random strictly lower A with entries up to `scale`: at scale 2 and C = 64, I + A has a
    condition number beyond 1e10 (the inverse's entries grow exponentially down the rows).
    Normwise error within a small multiple of fp32's unit roundoff times the condition number,
    and at most 1e-5 where that bound is looser; exact zeros above the diagonal, ones on it."""
    from gdn_jax.ops.reference import unit_lower_inverse

    rng = np.random.default_rng(C * 10 + int(scale * 4))
    A = np.tril(rng.uniform(-scale, scale, (3, 2, C, C)), -1).astype(np.float32)
    X = np.asarray(unit_lower_inverse(jnp.asarray(A)), np.float64)
    assert X.shape == A.shape
    M = np.eye(C) + A.astype(np.float64)
    want = np.linalg.inv(M)
    err = np.linalg.norm(X - want, axis=(-2, -1)) / np.linalg.norm(want, axis=(-2, -1))
    cond = np.linalg.cond(M)
    assert (err <= np.minimum(1e-5, 64 * 2.0 ** -24 * cond) + 1e-12).all(), (err.max(),
                                                                             cond.max())
    np.testing.assert_array_equal(np.triu(X, 1), 0.0)
    np.testing.assert_array_equal(np.diagonal(X, axis1=-2, axis2=-1), 1.0)


def test_unit_lower_inverse_rejects_a_size_not_a_power_of_two():
    from gdn_jax.ops.reference import unit_lower_inverse

    with pytest.raises(ValueError, match="C must be a power of two, got 12"):
        unit_lower_inverse(jnp.zeros((12, 12), jnp.float32))
