"""Bad input raises a ValueError naming the argument, the expected and the given shape or dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import random_state, tokens
from gdn_jax import ops
from gdn_jax.ops import GDNState

B, T, H, HV, K, V, SLOTS, T_MAX = 2, 3, 2, 4, 16, 32, 5, 4


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    tok = tokens(rng, B, T, H, HV, K, V)
    st = random_state(rng, SLOTS, H, HV, K, V, T_MAX)
    return tok, st, jnp.asarray([0, 3], jnp.int32)


def _verify(tok, st, slots, mode="replay", **over):
    args = dict(q=tok.q, k=tok.k, v=tok.v, a=tok.a, b=tok.b, A_log=tok.A_log,
                dt_bias=tok.dt_bias)
    args.update(over)
    return ops.verify(*args.values(), st, slots, mode=mode)


@pytest.mark.parametrize("arg, bad, pattern", [
    ("q", lambda t: t.q[0], r"q expected rank 4 \[B, T, H, K\], got shape \(3, 2, 16\)"),
    ("k", lambda t: t.k[:, :, :1], r"k expected shape \[B, T, H, K\] = \(2, 3, 2, 16\), got shape \(2, 3, 1, 16\)"),
    ("v", lambda t: t.v[:1], r"v expected shape \[B, T, HV, V\] with B, T = \(2, 3\)"),
    ("v", lambda t: t.v[:, :, :3], r"v expected HV \(v.shape\[2\]\) a multiple of H = 2"),
    ("a", lambda t: t.a[..., :2], r"a expected shape \[B, T, HV\] = \(2, 3, 4\), got shape \(2, 3, 2\)"),
    ("b", lambda t: t.b[:, :1], r"b expected shape \[B, T, HV\]"),
    ("A_log", lambda t: t.A_log[:3], r"A_log expected shape \[HV\] = \(4,\), got shape \(3,\)"),
    ("dt_bias", lambda t: t.dt_bias[None], r"dt_bias expected shape \[HV\]"),
    ("q", lambda t: t.q.astype(jnp.int32), r"q expected dtype in \['bfloat16', 'float16', 'float32'\], got dtype int32"),
    ("v", lambda t: t.v.astype(jnp.bfloat16), r"q, k, v expected one dtype, got float32, float32, bfloat16"),
    ("a", lambda t: t.a.astype(jnp.int32), r"a expected a floating dtype, got dtype int32"),
])
def test_bad_inputs(case, arg, bad, pattern):
    tok, st, slots = case
    with pytest.raises(ValueError, match=r"verify: " + pattern):
        _verify(tok, st, slots, **{arg: bad(tok)})


@pytest.mark.parametrize("dim", [8, 24, 512])
def test_head_dim_power_of_two_in_range(dim):
    rng = np.random.default_rng(1)
    tok = tokens(rng, 1, 1, 1, 1, dim, 16)
    st = GDNState.create(2, 1, 1, dim, 16, 2)
    with pytest.raises(ValueError, match=rf"decode: K \(q.shape\[3\]\) expected a power of two in \[16, 256\], got {dim}"):
        ops.decode(*tok.args(), st, jnp.zeros(1, jnp.int32))


def test_state_mismatch(case):
    tok, st, slots = case
    other = GDNState.create(SLOTS, H, HV, 2 * K, V, T_MAX)
    with pytest.raises(ValueError, match=r"state.pool expected K = 16 from the inputs"):
        _verify(tok, other, slots)
    with pytest.raises(ValueError, match=r"state expected a GDNState, got dict"):
        _verify(tok, {"pool": st.pool}, slots)
    bad = st.replace(count=st.count.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"state.count expected dtype int32, got dtype float32"):
        _verify(tok, bad, slots)


def test_slots(case):
    tok, st, _ = case
    with pytest.raises(ValueError, match=r"slots expected shape \[B\] = \(2,\), got shape \(3,\)"):
        _verify(tok, st, jnp.asarray([0, 1, 2], jnp.int32))
    with pytest.raises(ValueError, match=r"slots expected an integer dtype \(int32\), got dtype float32"):
        _verify(tok, st, jnp.asarray([0.0, 1.0]))


def test_t_above_t_max_and_decode_t(case):
    tok, st, slots = case
    long = tokens(np.random.default_rng(2), B, T_MAX + 1, H, HV, K, V)
    with pytest.raises(ValueError, match=r"verify: T \(q.shape\[1\]\) expected 1..4 \(the state's T_max\), got 5"):
        ops.verify(*long.args(), st, slots)
    # decode's limit is its own one token, not the state's T_max (which bounds verify).
    with pytest.raises(ValueError, match=r"decode: T \(q.shape\[1\]\) expected 1 \(decode takes one "
                       r"token per row; verify takes 1..4, the state's T_max\), got 2"):
        ops.decode(*tokens(np.random.default_rng(3), B, 2, H, HV, K, V).args(), st, slots)


def test_mode_and_backend(case):
    tok, st, slots = case
    with pytest.raises(ValueError, match=r"verify: mode expected one of \('replay', 'intermediate', 'ring'\), got 'fast'"):
        _verify(tok, st, slots, mode="fast")
    with pytest.raises(ValueError, match=r"decode: backend expected one of"):
        ops.decode(*tokens(np.random.default_rng(3), B, 1, H, HV, K, V).args(), st, slots,
                   backend="cuda-magic")


def test_replay_needs_the_states_input_dtype(case):
    tok, _, slots = case
    st = GDNState.create(SLOTS, H, HV, K, V, T_MAX, input_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"verify: k, v expected the state's input dtype bfloat16"):
        _verify(tok, st, slots)
    _verify(tok, st, slots, mode="intermediate")  # intermediate stores no tokens: fine


def test_commit_arguments(case):
    tok, st, slots = case
    _, st_i, inter = _verify(tok, st, slots, mode="intermediate")
    with pytest.raises(ValueError, match=r"commit: num_accepted expected shape \[B\] = \(2,\), got shape \(1,\)"):
        ops.commit(st_i, slots, jnp.asarray([1], jnp.int32), inter)
    with pytest.raises(ValueError, match=r"commit: num_accepted expected values in 0..3, got \[4, 0\]"):
        ops.commit(st_i, slots, jnp.asarray([4, 0], jnp.int32), inter)
    with pytest.raises(ValueError, match=r"commit: num_accepted expected values in 0..4, got \[-1, 0\]"):
        ops.commit(st, slots, jnp.asarray([-1, 0], jnp.int32))
    with pytest.raises(ValueError, match=r"commit: num_accepted expected an integer dtype"):
        ops.commit(st, slots, jnp.asarray([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"commit: inter expected the pool's dtype float32, got bfloat16"):
        ops.commit(st_i, slots, jnp.asarray([1, 1], jnp.int32), inter.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"commit: inter expected shape \[B, T, HV, V, K\]"):
        ops.commit(st_i, slots, jnp.asarray([1, 1], jnp.int32), inter[..., :8])
    with pytest.raises(ValueError, match=r"commit: slots expected rank 1 \[B\], got shape \(\)"):
        ops.commit(st, jnp.int32(0), jnp.asarray([1], jnp.int32))


def test_prefill_lengths(case):
    tok, st, slots = case
    with pytest.raises(ValueError, match=r"prefill: lengths expected values in 0..3, got \[4, 1\]"):
        ops.prefill(*tok.args(), st, slots, jnp.asarray([4, 1], jnp.int32))
    with pytest.raises(ValueError, match=r"prefill: lengths expected shape \[B\] = \(2,\)"):
        ops.prefill(*tok.args(), st, slots, jnp.asarray([1], jnp.int32))


def test_values_are_data_under_jit(case):
    """Under jit, out-of-range counts cannot raise; they must not corrupt the pool either."""
    tok, st, slots = case
    _, st_i, inter = _verify(tok, st, slots, mode="intermediate")
    got = jax.jit(ops.commit)(st_i, slots, jnp.asarray([9, -2], jnp.int32), inter)
    np.testing.assert_array_equal(np.asarray(got.pool), np.asarray(st_i.pool))


@pytest.mark.parametrize("kw, pattern", [
    (dict(num_v_heads=3), r"num_v_heads \(3\) must be a multiple of num_k_heads \(2\)"),
    (dict(dtype=jnp.float16), r"dtype must be bfloat16 or float32, got float16"),
    (dict(input_dtype=jnp.int8), r"input_dtype must be one of"),
    (dict(t_max=0), r"t_max must be a positive int, got 0"),
])
def test_state_create(kw, pattern):
    args = dict(num_slots=2, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, t_max=2)
    args.update(kw)
    with pytest.raises(ValueError, match=pattern):
        GDNState.create(**args)
