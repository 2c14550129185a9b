"""Ring commit mode (GDNState.create(commit_mode="ring")) against a float64 mirror of its contract.

The mirror keeps, per slot, the true state (the pool with its committed ring tokens applied, run
token by token in float64 by tests/oracle.py), what the pool must hold (the state at the last
fold), and the count. Every call's outputs are held against the mirror; between folds the pool
must be bit-identical (ring mode reads it, never writes it), and every slot no real row names is
bit-identical in every buffer. Random accepted counts (0..T), decode calls in between, padding
rows (negative and out-of-range slots), slots repeated across calls in a new order each time.

Every test runs on the XLA path and on the ring kernel in the Pallas interpreter.

Tolerances (normwise relative, gdn_cases.rel_err): fp32 pool and fp32 inputs 1e-5 (the kernel's
interpreter runs its products at HIGHEST). bf16 pool: the pool is rounded once per fold and the
ring keeps its corrected values in fp32 (nothing of it is rounded to bf16), so R folds stay within
R * BF16_EPS; outputs in bf16 add one rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from gdn_cases import (BF16_EPS, RingMirror, assert_untouched, f64, real_rows, rel_err,
                        tokens)
from gdn_jax import ops
from gdn_jax.ops import dispatch

FP32_TOL = 1e-5
NUM_SLOTS, T_MAX, W = 6, 4, 16
H, HV, K, V = 2, 4, 16, 32


@pytest.fixture(autouse=True, params=["xla", "interpret"])
def backend(request, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, request.param)
    return request.param


_real_rows = functools.partial(real_rows, num_slots=NUM_SLOTS)
_assert_untouched = functools.partial(assert_untouched, num_slots=NUM_SLOTS)


def _slots(rng, B_real=3):
    real = rng.permutation(NUM_SLOTS)[:B_real]
    s = np.concatenate([real, [-1, NUM_SLOTS + 2]])
    return jnp.asarray(s[rng.permutation(len(s))], jnp.int32)


def _state(rng, pool_dtype, input_dtype, dims=(H, HV, K, V)):
    st = ops.GDNState.create(NUM_SLOTS, *dims, T_MAX, dtype=pool_dtype,
                             input_dtype=input_dtype, commit_mode="ring", ring_size=W)
    pool = jnp.asarray(0.5 * rng.standard_normal(st.pool.shape), jnp.float32).astype(pool_dtype)
    return st.replace(pool=pool)


def _rounds(seed, pool_dtype, input_dtype, rounds, mild=False, dims=(H, HV, K, V)):
    """Random rounds of verify + commit with decode calls in between, checked call by call.
    Returns (state, mirror, number of folds seen)."""
    rng = np.random.default_rng(seed)
    st = _state(rng, pool_dtype, input_dtype, dims)
    HV = dims[1]
    mirror = RingMirror(st)
    fp32 = pool_dtype == jnp.float32 and input_dtype == jnp.float32
    folds = 0
    A_log = jnp.asarray(rng.uniform(-6.0, -4.0, HV) if mild else rng.uniform(-3.0, 0.5, HV),
                        jnp.float32)
    dt_bias = jnp.asarray(rng.standard_normal(HV), jnp.float32)
    for r in range(rounds):
        slots = _slots(rng)
        decode = r % 3 == 2
        T = 1 if decode else int(rng.integers(1, T_MAX + 1))
        tok = tokens(rng, slots.shape[0], T, *dims, input_dtype, A_log, dt_bias)
        if decode:
            o, new = ops.decode(*tok.args(), st, slots)
        else:
            o, new, inter = ops.verify(*tok.args(), st, slots)
            assert inter is None
        tol = FP32_TOL if fp32 else (folds + 2) * BF16_EPS
        for i, s in _real_rows(slots):
            ref_o, folded = mirror.call(s, tok, i, 1 if decode else T_MAX, decode)
            folds += folded
            assert rel_err(o[i], ref_o) <= tol, (r, i, s, folded)
            if folded:
                assert rel_err(new.pool[s], mirror.pool[s]) <= tol
            else:  # ring mode reads the pool; only a fold writes it
                np.testing.assert_array_equal(np.asarray(new.pool[s]), np.asarray(st.pool[s]))
        pad = [i for i, s in enumerate(np.asarray(slots)) if not 0 <= s < NUM_SLOTS]
        assert (np.asarray(o)[pad] == 0).all()
        _assert_untouched(st, new, slots)
        if not decode:
            n = rng.integers(0, T + 1, slots.shape[0])
            before = new
            new = ops.commit(new, slots, jnp.asarray(n, jnp.int32))
            _assert_untouched(before, new, slots)
            for i, s in _real_rows(slots):
                mirror.commit(s, int(n[i]))
        np.testing.assert_array_equal(np.asarray(new.count), mirror.count)
        st = new
    return st, mirror, folds


@pytest.mark.parametrize("pool_dtype,input_dtype", [(jnp.float32, jnp.float32),
                                                    (jnp.bfloat16, jnp.bfloat16)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [(H, HV, K, V), (2, 16, 16, 16)], ids=["hv4", "hv16"])
def test_rounds_match_oracle(pool_dtype, input_dtype, dims):
    """hv16: the interpret backend stores the ring's gates in the scatter kernel's launch (rows
    of 16 ride along the u rows; rows of 4 are too short and take XLA's gates)."""
    st, mirror, folds = _rounds(0, pool_dtype, input_dtype, rounds=24, dims=dims)
    assert folds >= 2  # the rounds exercise folds inside calls, not only appends
    fp32 = pool_dtype == jnp.float32
    flushed = ops.flush(st, jnp.arange(NUM_SLOTS, dtype=jnp.int32))
    assert (np.asarray(flushed.count) == 0).all()
    for s in range(NUM_SLOTS):
        assert rel_err(flushed.pool[s], mirror.true[s]) <= (FP32_TOL if fp32
                                                            else (folds + 2) * BF16_EPS)


def test_state_records_mode_and_ring():
    st = ops.GDNState.create(4, H, HV, K, V, 4, commit_mode="ring")
    assert (st.commit_mode, st.t_max, st.ring_size) == ("ring", 4, 16)
    assert st.cand_k.shape == (4, 16, H, K)
    assert st.cand_v.dtype == jnp.float32  # the ring's corrected values, whatever the inputs
    assert ops.GDNState.create(4, H, HV, K, V, 16, commit_mode="ring").ring_size == 32
    leaves, tree = jax.tree_util.tree_flatten(st)
    assert jax.tree_util.tree_unflatten(tree, leaves).commit_mode == "ring"
    replay = ops.GDNState.create(4, H, HV, K, V, 4)
    assert (replay.commit_mode, replay.t_max, replay.ring_size) == ("replay", 4, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(commit_mode="ring", ring_size=8), "ring_size expected a power of two >= max"),
    (dict(commit_mode="ring", ring_size=24), "ring_size expected a power of two"),
    (dict(ring_size=16), "ring_size is for commit_mode='ring'"),
    (dict(commit_mode="fifo"), "commit_mode expected one of"),
])
def test_create_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.GDNState.create(4, H, HV, K, V, 4, **kwargs)


def test_mode_must_match_the_state():
    rng = np.random.default_rng(3)
    st = _state(rng, jnp.float32, jnp.float32)
    tok = tokens(rng, 2, 2, H, HV, K, V)
    slots = jnp.asarray([0, 1], jnp.int32)
    with pytest.raises(ValueError, match="mode expected the state's commit mode 'ring'"):
        ops.verify(*tok.args(), st, slots, mode="replay")
    replay = ops.GDNState.create(NUM_SLOTS, H, HV, K, V, T_MAX, input_dtype=jnp.float32)
    with pytest.raises(ValueError, match="mode expected the state's commit mode 'replay'"):
        ops.verify(*tok.args(), replay, slots, mode="ring")
    with pytest.raises(ValueError, match="input dtype"):
        ops.verify(*tokens(rng, 2, 2, H, HV, K, V, jnp.bfloat16).args(), st, slots)
    with pytest.raises(ValueError, match="commit: inter expected None for a ring-mode state"):
        ops.commit(st, slots, jnp.asarray([1, 1], jnp.int32),
                   jnp.zeros((2, 2, HV, V, K), jnp.float32))
    # a ring whose u would be rounded to bf16 (a state built by hand) is refused
    with pytest.raises(ValueError, match=r"state.cand_v expected dtype float32 \(ring mode"):
        ops.verify(*tok.args(), st.replace(cand_v=st.cand_v.astype(jnp.bfloat16)), slots)


def test_decode_is_output_only_until_the_ring_fills():
    """W decodes of one slot: the pool is untouched for the first W, the (W+1)-th folds."""
    rng = np.random.default_rng(4)
    st = _state(rng, jnp.float32, jnp.float32)
    mirror = RingMirror(st)
    slots = jnp.asarray([2], jnp.int32)
    pool0 = np.asarray(st.pool)
    for i in range(W + 1):
        tok = tokens(rng, 1, 1, H, HV, K, V)
        o, st = ops.decode(*tok.args(), st, slots)
        ref_o, folded = mirror.call(2, tok, 0, 1, decode=True)
        assert folded == (i == W)
        assert rel_err(o[0], ref_o) <= FP32_TOL
        if i < W:
            np.testing.assert_array_equal(np.asarray(st.pool), pool0)
        assert int(st.count[2]) == mirror.count[2] == (i + 1 if i < W else 1)
    assert rel_err(st.pool[2], mirror.pool[2]) <= FP32_TOL


def test_reset_and_prefill_on_a_ring_slot():
    rng = np.random.default_rng(5)
    st, mirror, _ = _rounds(6, jnp.float32, jnp.float32, rounds=6)
    slots = jnp.asarray([1, 3], jnp.int32)
    tok = tokens(rng, 2, 9, H, HV, K, V)
    o, new = ops.prefill(*tok.args(), st, slots)
    g, beta = tok.gates64()
    for i, s in enumerate((1, 3)):  # prefill starts from the slot's committed ring tokens
        ref_o, ref_S, _ = oracle.run(mirror.true[s], f64(tok.q[i]), f64(tok.k[i]),
                                     f64(tok.v[i]), g[i], beta[i])
        assert rel_err(o[i], ref_o) <= FP32_TOL
        assert rel_err(new.pool[s], ref_S) <= FP32_TOL
        assert int(new.count[s]) == 0
    _assert_untouched(st, new, slots)
    reset = ops.reset(new, slots)
    assert (np.asarray(reset.pool)[[1, 3]] == 0).all() and (np.asarray(reset.count)[[1, 3]] == 0).all()
    _assert_untouched(new, reset, slots)


def test_ring_replay_intermediate_agree():
    """The same inputs and accepted counts in the three modes give the same outputs (fp32)."""
    rng = np.random.default_rng(7)
    pool = jnp.asarray(0.5 * rng.standard_normal((NUM_SLOTS, HV, V, K)), jnp.float32)
    states = {m: ops.GDNState.create(NUM_SLOTS, H, HV, K, V, T_MAX, input_dtype=jnp.float32,
                                     dtype=jnp.float32, commit_mode=m).replace(pool=pool)
              for m in ("ring", "replay", "intermediate")}
    A_log = jnp.asarray(rng.uniform(-3.0, 0.5, HV), jnp.float32)
    dt_bias = jnp.asarray(rng.standard_normal(HV), jnp.float32)
    slots = jnp.asarray([4, 0, 5], jnp.int32)
    for _ in range(8):
        tok = tokens(rng, 3, T_MAX, H, HV, K, V, jnp.float32, A_log, dt_bias)
        n = jnp.asarray(rng.integers(0, T_MAX + 1, 3), jnp.int32)
        outs = {}
        for m, st in states.items():
            o, st, inter = ops.verify(*tok.args(), st, slots)
            states[m] = ops.commit(st, slots, n, inter)
            outs[m] = o
        assert rel_err(outs["ring"], f64(outs["replay"])) <= FP32_TOL
        assert rel_err(outs["ring"], f64(outs["intermediate"])) <= FP32_TOL


def test_drift_short_mild_decay():
    """bf16 pool, mild decay (e^g about 0.99): after many rounds the ring's state error against
    the oracle stays within the folds' roundings (the GPU runner runs the long version)."""
    _, mirror, folds = _rounds(8, jnp.bfloat16, jnp.bfloat16, rounds=30, mild=True)
    assert folds >= 3


@pytest.mark.slow
def test_drift_ring_at_most_replay(backend):
    """bench/ring_drift.py's measurement, short: bf16 pool, mild decay, 384 committed tokens, the
    same inputs and accepted counts in both modes. The ring rounds the pool once per fold, replay
    once per round, so the ring's error against the fp32 reference must not exceed replay's
    (the GPU runner runs 16K tokens at the real heads)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "ring_drift.py"
    spec = importlib.util.spec_from_file_location("ring_drift", path)
    drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drift)
    result = drift.run(384, 2, (H, HV, K, V), backend, every=128)
    assert result["finite"]
    assert 0 < result["curve"][-1]["ring"] <= result["curve"][-1]["replay"]
    assert result["ring_over_replay"] <= 1.0
