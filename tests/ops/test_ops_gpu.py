"""The ops on an NVIDIA GPU at Qwen3-Next shapes (HV = 32, K = V = 128), against the float64 oracle.

The XLA path runs its matrix products at Precision.HIGHEST, so an fp32 pool stays within 1e-5 on the
GPU too (the GPU's default TF32 would not).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, OraclePool, random_state, rel_err, slot_batch, tokens
from gdn_jax import ops

pytestmark = pytest.mark.gpu

H, HV, K, V, T_MAX, NUM_SLOTS = 16, 32, 128, 128, 8, 40


def _real_rows(slots):
    return [(i, int(s)) for i, s in enumerate(np.asarray(slots)) if 0 <= s < NUM_SLOTS]


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["replay", "intermediate"])
@pytest.mark.parametrize("backend", [None, "triton", "mosaic"], ids=["auto", "triton", "mosaic"])
def test_verify_commit_decode(backend, mode, pool_dtype):
    """verify on the given backend (None: the dispatch's choice), then commit and decode."""
    from gdn_jax.ops import dispatch

    why = backend and dispatch.why_not(backend, dispatch.Device.of(), "verify", 4, K=K, V=V)
    if why:
        pytest.skip(why)
    rng = np.random.default_rng(0)
    st = random_state(rng, NUM_SLOTS, H, HV, K, V, T_MAX, pool_dtype, jnp.bfloat16)
    slots = jnp.asarray(np.concatenate([rng.permutation(NUM_SLOTS)[:6], [-1, NUM_SLOTS]]),
                        jnp.int32)
    mirror = OraclePool(st)
    tol = 1e-5 if pool_dtype == jnp.float32 else 2 * BF16_EPS
    tok = tokens(rng, slots.shape[0], 4, H, HV, K, V, jnp.bfloat16)
    o, st, inter = ops.verify(*tok.args(), st, slots, mode=mode, backend=backend)
    n = jnp.asarray(rng.integers(0, 5, slots.shape[0]), jnp.int32)
    st = ops.commit(st, slots, n, inter)
    step = tokens(rng, slots.shape[0], 1, H, HV, K, V, jnp.bfloat16)
    o1, st = ops.decode(*step.args(), st, slots)
    for i, s in _real_rows(slots):
        ref_o, _, states, S0 = mirror.run(s, tok, i)
        assert rel_err(o[i], ref_o) <= tol + BF16_EPS  # bf16 outputs: one more rounding
        mirror.pool[s] = states[int(n[i]) - 1] if int(n[i]) else S0
        mirror.count[s] = 0
        ref_o1, ref_S, _, _ = mirror.run(s, step, i)
        assert rel_err(o1[i], ref_o1) <= tol + BF16_EPS
        assert rel_err(st.pool[s], ref_S) <= tol


def test_prefill_fp32():
    rng = np.random.default_rng(1)
    st = random_state(rng, NUM_SLOTS, H, HV, K, V, T_MAX, jnp.float32, jnp.float32)
    slots = jnp.asarray([3, 17, -1], jnp.int32)
    tok = tokens(rng, 3, 150, H, HV, K, V)
    lengths = jnp.asarray([150, 77, 10], jnp.int32)
    mirror = OraclePool(st)
    o, st = ops.prefill(*tok.args(), st, slots, lengths)
    for i, s in _real_rows(slots):
        n = int(lengths[i])
        ref_o, ref_S, _, _ = mirror.run(s, tok, i, length=n)
        assert rel_err(o[i, :n], ref_o) <= 1e-5
        assert rel_err(st.pool[s], ref_S) <= 1e-5


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_decode_mosaic_backend(pool_dtype):
    """ops.decode forced onto the Mosaic GPU kernel (Hopper and later), pending candidates folded."""
    from gdn_jax.ops import dispatch

    why = dispatch.why_not("mosaic", dispatch.Device.of(), "decode", 1, K=K, V=V)
    if why is not None:
        pytest.skip(why)
    rng = np.random.default_rng(2)
    st = random_state(rng, NUM_SLOTS, H, HV, K, V, T_MAX, pool_dtype, jnp.bfloat16)
    slots = slot_batch(rng, 32, NUM_SLOTS)
    mirror = OraclePool(st)
    tol = 1e-5 if pool_dtype == jnp.float32 else 2 * BF16_EPS
    step = tokens(rng, slots.shape[0], 1, H, HV, K, V, jnp.bfloat16)
    o, st = ops.decode(*step.args(), st, slots, backend="mosaic")
    for i, s in _real_rows(slots):
        ref_o, ref_S, _, _ = mirror.run(s, step, i)
        assert rel_err(o[i], ref_o) <= tol + BF16_EPS
        assert rel_err(st.pool[s], ref_S) <= tol
        assert int(st.count[s]) == 0
    pad = [i for i, s in enumerate(np.asarray(slots)) if not 0 <= s < NUM_SLOTS]
    assert not np.asarray(o[np.asarray(pad)].astype(jnp.float32)).any()
