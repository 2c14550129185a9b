"""The ring kernel (`kernels.verify_ring`) against the XLA ring path.

A ring-mode state with every buffer random (the ring's corrected values u too: any u is a ring's):
committed counts over 0..W (rows that fold and rows that do not), the pool NaN-poisoned at every
slot no real row names (it must come back bit-identical), padding rows (negative and out-of-range
slots). The kernel's outputs, new u and pool are held against `gdn_jax.ops._xla.ring` (the
token-by-token recurrence, which appends its u to the ring). Small heads run in the Pallas
interpreter on CPU; the real heads (H = 16, HV = 32, K = V = 128) on the GPU.

Tolerances (normwise relative): fp32 pool and inputs 1e-5 (the interpreter runs every product at
HIGHEST; the GPU's 16-bit products are exact and its fp32 ones run in three TF32 passes); bf16:
one rounding of the pool and of the outputs, 2 * BF16_EPS. The u are fp32 in both modes, from the
same exact products: 1e-5 (fp32), BF16_EPS (bf16: the state read is the pool's, rounded once; the
reference runs from the same rounded pool, so what remains is fp32 summation and the inputs'
rounding to fp32, far below it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, rel_err, tokens
from gdn_jax import kernels, ops
from gdn_jax.ops import _xla

SMALL = dict(H=2, HV=4, K=16, V=32, block_v=16, num_slots=6, B_real=3)
REAL = dict(H=16, HV=32, K=128, V=128, block_v=64, num_slots=24, B_real=12)


def _case(seed, dims, T, W, pool_dtype, in_dtype):
    rng = np.random.default_rng(seed)
    H, HV, K, V, S = dims["H"], dims["HV"], dims["K"], dims["V"], dims["num_slots"]
    st = ops.GDNState.create(S, H, HV, K, V, T, dtype=pool_dtype, input_dtype=in_dtype,
                             commit_mode="ring", ring_size=W)
    ring = tokens(rng, S, W, H, HV, K, V, in_dtype)
    g, beta = ops.gating(ring.a, ring.b, ring.A_log, ring.dt_bias)
    st = st.replace(pool=jnp.asarray(0.5 * rng.standard_normal(st.pool.shape),
                                     jnp.float32).astype(pool_dtype),
                    cand_k=ring.k, cand_v=jnp.asarray(ring.v, jnp.float32) * 0.5, cand_g=g,
                    cand_beta=beta,
                    count=jnp.asarray(rng.integers(0, W + 1, S), jnp.int32))
    real = rng.permutation(S)[:dims["B_real"]]
    slots = np.concatenate([real, [-1, S + 1]])
    slots = jnp.asarray(slots[rng.permutation(len(slots))], jnp.int32)
    tok = tokens(rng, slots.shape[0], T, H, HV, K, V, in_dtype, ring.A_log, ring.dt_bias)
    untouched = np.setdiff1d(np.arange(S), real)
    pool = st.pool.at[untouched].set(jnp.nan)  # poison: an unnamed slot must not be touched
    return st.replace(pool=pool), slots, tok, untouched


@pytest.mark.parametrize("T,W", [(1, 16), (3, 16), (4, 16), (16, 32)])
@pytest.mark.parametrize("pool_dtype,in_dtype", [(jnp.float32, jnp.float32),
                                                 (jnp.bfloat16, jnp.bfloat16)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ring_kernel_matches_xla(where, pool_dtype, in_dtype, T, W):
    if where == "gpu" and jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform}")
    dims = SMALL if where == "interpret" else REAL
    st, slots, tok, untouched = _case(T * 31 + W, dims, T, W, pool_dtype, in_dtype)
    reserve = T
    ref_o, ref_st = _xla.ring(*tok.args(), st, slots, reserve=reserve)
    o, u, pool = kernels.verify_ring(*tok.args(), jnp.copy(st.pool), st.cand_k, st.cand_v,
                                     st.cand_g, st.cand_beta, st.count, slots, reserve=reserve,
                                     config=kernels.TuningConfig(dims["block_v"], 4),
                                     interpret=where == "interpret")
    tol = 1e-5 if pool_dtype == jnp.float32 else 2 * BF16_EPS
    tol_u = 1e-5 if pool_dtype == jnp.float32 else BF16_EPS
    valid = np.asarray((slots >= 0) & (slots < dims["num_slots"]))
    assert u.dtype == jnp.float32 and u.shape == o.shape
    assert (np.asarray(o)[~valid] == 0).all() and (np.asarray(u)[~valid] == 0).all()
    assert rel_err(o[valid], np.asarray(ref_o[valid], np.float32)) <= tol
    np.testing.assert_array_equal(np.isnan(np.asarray(pool, np.float32))[untouched], True)
    for row, s in enumerate(np.asarray(slots)):
        if not valid[row]:
            continue
        # folding rows take the ring folded; the others must be bit-identical (read only)
        count = int(st.count[s])
        folds = count > 0 and count + reserve > W
        if folds:
            assert rel_err(pool[s], np.asarray(ref_st.pool[s], np.float32)) <= tol
        else:
            np.testing.assert_array_equal(np.asarray(pool[s]), np.asarray(st.pool[s]))
        # the reference appended its u at the row's start in the ring (0 after a fold)
        start = 0 if count + reserve > W else count
        assert rel_err(u[row], ref_st.cand_v[s, start:start + T]) <= tol_u
