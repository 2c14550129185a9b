"""Ring mode on an NVIDIA GPU at Qwen3-Next shapes (H = 16, HV = 32, K = V = 128), through the
backend dispatch picks (the ring kernel), against the float64 mirror (gdn_cases.RingMirror).

The kernel's products run on the tensor cores: 16-bit operands exactly (fp32 accumulation), fp32
ones in three TF32 passes, so an fp32 pool with fp32 inputs stays within 1e-5 of the oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, RingMirror, rel_err, tokens
from gdn_jax import ops

pytestmark = pytest.mark.gpu

H, HV, K, V, NUM_SLOTS = 16, 32, 128, 128, 9


@pytest.mark.parametrize("t_max, backend", [(4, None), (16, None), (4, "mosaic"), (8, "mosaic")])
@pytest.mark.parametrize("pool_dtype,input_dtype", [(jnp.float32, jnp.float32),
                                                    (jnp.bfloat16, jnp.bfloat16)],
                         ids=["fp32", "bf16"])
def test_ring_rounds_gpu(pool_dtype, input_dtype, t_max, backend):
    """backend None: what dispatch picks (on Hopper the Mosaic GPU kernel for a bf16 pool at
    T <= 8, else the Triton kernel); "mosaic": the Mosaic GPU kernel (Hopper, bf16 only)."""
    import jax

    if backend == "mosaic" and (pool_dtype != jnp.bfloat16
                                or jax.devices()[0].compute_capability.split(".")[0] != "9"):
        pytest.skip("the Mosaic GPU ring kernel runs a bf16 pool on Hopper")
    rng = np.random.default_rng(0)
    st = ops.GDNState.create(NUM_SLOTS, H, HV, K, V, t_max, dtype=pool_dtype,
                             input_dtype=input_dtype, commit_mode="ring")
    st = st.replace(pool=jnp.asarray(0.5 * rng.standard_normal(st.pool.shape),
                                     jnp.float32).astype(pool_dtype))
    mirror = RingMirror(st)
    fp32 = pool_dtype == jnp.float32
    folds = 0
    for r in range(12):
        real = rng.permutation(NUM_SLOTS)[:5]
        slots = jnp.asarray(np.concatenate([real, [-1, NUM_SLOTS]])[rng.permutation(7)],
                            jnp.int32)
        decode = r % 3 == 2
        T = 1 if decode else t_max
        tok = tokens(rng, 7, T, H, HV, K, V, input_dtype)
        if decode:
            o, new = ops.decode(*tok.args(), st, slots, backend=backend)
        else:
            o, new, _ = ops.verify(*tok.args(), st, slots, backend=backend)
        tol = 1e-5 if fp32 else (folds + 2) * BF16_EPS
        for i, s in enumerate(np.asarray(slots)):
            if not 0 <= s < NUM_SLOTS:
                assert (np.asarray(o[i]) == 0).all()
                continue
            ref_o, folded = mirror.call(int(s), tok, i, 1 if decode else t_max, decode)
            folds += folded
            assert rel_err(o[i], ref_o) <= tol, (r, i, int(s), folded)
            if folded:
                assert rel_err(new.pool[s], mirror.pool[s]) <= tol
            else:
                np.testing.assert_array_equal(np.asarray(new.pool[s]), np.asarray(st.pool[s]))
        if not decode:
            n = rng.integers(0, T + 1, 7)
            new = ops.commit(new, slots, jnp.asarray(n, jnp.int32))
            for i, s in enumerate(np.asarray(slots)):
                if 0 <= s < NUM_SLOTS:
                    mirror.commit(int(s), int(n[i]))
        np.testing.assert_array_equal(np.asarray(new.count), mirror.count)
        st = new
    assert folds >= 1
