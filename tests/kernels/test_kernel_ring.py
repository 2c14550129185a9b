"""The ring kernels (`kernels.verify_ring`, Triton; `kernels.verify_ring_mgpu`, Mosaic GPU, bf16)
against the XLA ring path.

A ring-mode state with every buffer random (the ring's corrected values u too: any u is a ring's):
committed counts over 0..W (rows that fold and rows that do not), the pool NaN-poisoned at every
slot no real row names (it must come back bit-identical), the ring's u NaN past each count (the
rows a call that does not fold writes), padding rows (negative and out-of-range slots). The
kernel's outputs, the u it writes into the ring and the pool are held against
`gdn_jax.ops._xla.ring` (the token-by-token recurrence, which appends its u to the ring); every
ring entry it must not write comes back bit-identical. Small heads run in the Pallas interpreter
on CPU; the real heads (H = 16, HV = 32, K = V = 128) on the GPU.

Tolerances (normwise relative): fp32 pool and inputs 1e-5 (the interpreter runs every product at
HIGHEST; the GPU's 16-bit products are exact and its fp32 ones run in three TF32 passes); bf16:
one rounding of the pool and of the outputs, 2 * BF16_EPS. The u are fp32 in both modes, from the
same exact products: 1e-5 (fp32), BF16_EPS (bf16: the state read is the pool's, rounded once; the
reference runs from the same rounded pool, so what remains is fp32 summation and the inputs'
rounding to fp32, far below it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, rel_err, tokens
from gdn_jax import kernels, ops
from gdn_jax.ops import _xla

SMALL = dict(H=2, HV=4, K=16, V=32, block_v=16, num_slots=6, B_real=3)
REAL = dict(H=16, HV=32, K=128, V=128, block_v=64, num_slots=24, B_real=12)
# The Mosaic GPU kernel's smallest heads (64: the WGMMA layout), two V blocks per head: a key
# group's four tiles cross CTAs of two tiles each
MOSAIC_SMALL = dict(H=1, HV=2, K=64, V=128, block_v=64, num_slots=6, B_real=3)
_NO_MOSAIC = kernels.mosaic_unavailable()


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


def _check(dims, st, slots, untouched, T, reserve, o, ring_u, cand_v, pool, ref_o, ref_st, tol,
           tol_u):
    """The kernel's o, ring u (cand_v) and pool against the XLA ring path's (`_xla.ring`) on the
    same call; ring_u: the kernel's cand_v as it went in."""
    W = st.cand_k.shape[1]
    valid = np.asarray((slots >= 0) & (slots < dims["num_slots"]))
    assert cand_v.dtype == jnp.float32 and cand_v.shape == ring_u.shape
    assert (np.asarray(o)[~valid] == 0).all()
    assert rel_err(o[valid], np.asarray(ref_o[valid], np.float32)) <= tol
    np.testing.assert_array_equal(np.isnan(np.asarray(pool, np.float32))[untouched], True)
    kept = np.ones(cand_v.shape[:2], bool)  # ring entries the call must leave as they were
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
        # the u at the row's start in the ring (0 after a fold), as the reference appended
        # them, then zeros up to reserve (identity steps)
        start = 0 if count + reserve > W else count
        assert rel_err(cand_v[s, start:start + T], ref_st.cand_v[s, start:start + T]) <= tol_u
        np.testing.assert_array_equal(np.asarray(cand_v[s, start + T:start + reserve]), 0.0)
        kept[s, start:start + max(T, reserve)] = False
    np.testing.assert_array_equal(np.asarray(cand_v)[kept], np.asarray(ring_u)[kept])


@pytest.mark.parametrize("T,W,reserve", [(1, 16, 1), (3, 16, 3), (4, 16, 4), (16, 32, 16),
                                         (3, 16, 8)])  # the last: zero rows after its tokens
@pytest.mark.parametrize("pool_dtype,in_dtype", [(jnp.float32, jnp.float32),
                                                 (jnp.bfloat16, jnp.bfloat16)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ring_kernel_matches_xla(where, pool_dtype, in_dtype, T, W, reserve):
    if where == "gpu" and jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform}")
    dims = SMALL if where == "interpret" else REAL
    st, slots, tok, untouched = _case(T * 31 + W + reserve, dims, T, W, pool_dtype, in_dtype)
    ref_o, ref_st = _xla.ring(*tok.args(), st, slots, reserve=reserve)
    dead = np.arange(W)[None, :] >= np.asarray(st.count)[:, None]  # [num_slots, W]
    ring_u = jnp.where(dead[:, :, None, None], jnp.nan, st.cand_v)
    o, cand_v, pool = kernels.verify_ring(
        *tok.args(), jnp.copy(st.pool), st.cand_k, jnp.copy(ring_u), st.cand_g, st.cand_beta,
        st.count, slots, reserve=reserve, config=kernels.TuningConfig(dims["block_v"], 4),
        interpret=where == "interpret")
    tol = 1e-5 if pool_dtype == jnp.float32 else 2 * BF16_EPS
    tol_u = 1e-5 if pool_dtype == jnp.float32 else BF16_EPS
    _check(dims, st, slots, untouched, T, reserve, o, ring_u, cand_v, pool, ref_o, ref_st, tol,
           tol_u)


# (T, W, reserve, block_v, tiles per CTA, stages, H): decode (T = 1), verify with reserve > T,
# CTA runs that cross key groups (a group's X, X' and Gram loaded for the next group mid-run:
# block_v 128 and odd runs), H = HV (a key group of one value head), W = 32
_MOSAIC_CASES = [(1, 16, 1, 64, 2, 2, 1), (4, 16, 4, 128, 3, 2, 1), (3, 16, 8, 64, 5, 3, 1),
                 (8, 16, 8, 64, 3, 2, 2), (4, 32, 4, 64, 4, 2, 1)]


def _mosaic_case(seed, dims, T, W, reserve):
    """A ring-mode case whose real rows' committed counts are W - reserve (the fold threshold,
    not folding), W - reserve + 1 (folding) and 0, in turn; the ring past each count NaN (a dead
    entry may hold anything). Returns the case (unpoisoned: the XLA reference's input) and the
    poisoned ring (cand_k, cand_v, cand_g)."""
    st, slots, tok, untouched = _case(seed, dims, T, W, jnp.bfloat16, jnp.bfloat16)
    count = np.asarray(st.count).copy()
    real = [int(s) for s in np.asarray(slots) if 0 <= s < dims["num_slots"]]
    for j, s in enumerate(real):
        count[s] = (W - reserve, W - reserve + 1, 0)[j % 3]
    st = st.replace(count=jnp.asarray(count, jnp.int32))
    dead = np.arange(W)[None, :] >= count[:, None]  # [num_slots, W]
    ring = (jnp.where(dead[:, :, None, None], jnp.nan, st.cand_k),
            jnp.where(dead[:, :, None, None], jnp.nan, st.cand_v),
            jnp.where(dead[:, :, None], jnp.nan, st.cand_g))
    return st, slots, tok, untouched, ring


@pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))
@pytest.mark.parametrize("T,W,reserve,block_v,tiles,stages,H", _MOSAIC_CASES)
@pytest.mark.parametrize("where", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ring_mgpu_kernel_matches_xla(where, T, W, reserve, block_v, tiles, stages, H):
    """The Mosaic GPU kernel (matrix form; bf16), its ring's dead entries NaN: a committed
    entry's data only may reach the outputs or the pool. Tolerances as the Triton kernel's: o
    and a folded pool one bf16 rounding each (2 eps); u BF16_EPS (fp32 from the same pool; the
    fold's weights enter as bf16 high + low parts, about 16 bits, far below it)."""
    if where == "gpu" and jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform}")
    dims = dict(MOSAIC_SMALL if where == "interpret" else REAL, block_v=block_v)
    if where == "interpret":
        dims["H"] = H
    st, slots, tok, untouched, ring = _mosaic_case(T * 37 + W + reserve, dims, T, W, reserve)
    ref_o, ref_st = _xla.ring(*tok.args(), st, slots, reserve=reserve)
    cand_k, ring_u, cand_g = ring
    o, cand_v, pool = kernels.verify_ring_mgpu(
        *tok.args(), jnp.copy(st.pool), cand_k, jnp.copy(ring_u), cand_g, st.cand_beta, st.count,
        slots, reserve=reserve, config=kernels.MosaicConfig(block_v, tiles, stages),
        interpret=where == "interpret")
    _check(dims, st, slots, untouched, T, reserve, o, ring_u, cand_v, pool, ref_o, ref_st,
           2 * BF16_EPS, BF16_EPS)


@pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))
def test_ring_mgpu_nan_token_stays_out_of_the_pool():
    """A NaN in one row's token key (a draft the caller may reject) leaves every other row's
    outputs and every folded state as the reference's: the fold takes the ring's keys only."""
    T, W, reserve = 4, 16, 4
    st, slots, tok, untouched, ring = _mosaic_case(3, MOSAIC_SMALL, T, W, reserve)
    real = np.flatnonzero((np.asarray(slots) >= 0) & (np.asarray(slots) < 6))
    bad = real[1]  # a folding row (counts go below, at and past the threshold in turn)
    assert int(st.count[slots[bad]]) + reserve > W
    ref_o, ref_st = _xla.ring(*tok.args(), st, slots, reserve=reserve)
    tok = dataclasses.replace(tok, k=tok.k.at[bad, 0, 0, 0].set(jnp.nan))
    o, _, pool = kernels.verify_ring_mgpu(
        *tok.args(), jnp.copy(st.pool), *ring, st.cand_beta, st.count, slots, reserve=reserve,
        config=kernels.MosaicConfig(64, 2, 2), interpret=True)
    keep = np.setdiff1d(real, [bad])
    assert rel_err(o[keep], np.asarray(ref_o[keep], np.float32)) <= 2 * BF16_EPS
    for row in real:
        s = int(slots[row])
        if int(st.count[s]) + reserve > W and int(st.count[s]) > 0:
            assert rel_err(pool[s], np.asarray(ref_st.pool[s], np.float32)) <= 2 * BF16_EPS
        else:
            np.testing.assert_array_equal(np.asarray(pool[s]), np.asarray(st.pool[s]))


@pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))
def test_ring_mgpu_refuses_what_it_cannot_take():
    st, slots, tok, _ = _case(5, MOSAIC_SMALL, 4, 16, jnp.float32, jnp.float32)
    args = (*tok.args(), st.pool, st.cand_k, st.cand_v, st.cand_g, st.cand_beta, st.count, slots)
    with pytest.raises(ValueError, match="verify_ring_mgpu: the Mosaic GPU ring kernel takes a "
                                         "bf16 pool and bf16 tokens"):
        kernels.verify_ring_mgpu(*args, reserve=4, interpret=True)
    st, slots, tok, _ = _case(5, MOSAIC_SMALL, 9, 16, jnp.bfloat16, jnp.bfloat16)
    args = (*tok.args(), st.pool, st.cand_k, st.cand_v, st.cand_g, st.cand_beta, st.count, slots)
    with pytest.raises(ValueError, match=r"verify_ring_mgpu: T \(q.shape\[1\]\) expected 1..8"):
        kernels.verify_ring_mgpu(*args, reserve=9, interpret=True)
    st, slots, tok, _ = _case(5, MOSAIC_SMALL, 8, 32, jnp.bfloat16, jnp.bfloat16)
    args = (*tok.args(), st.pool, st.cand_k, st.cand_v, st.cand_g, st.cand_beta, st.count, slots)
    with pytest.raises(ValueError, match=r"verify_ring_mgpu: reserve expected T..W = 8..32"):
        kernels.verify_ring_mgpu(*args, reserve=33, interpret=True)
    with pytest.raises(ValueError, match=r"verify_ring_mgpu: reserve expected T..W = 8..32"):
        kernels.verify_ring_mgpu(*args, reserve=7, interpret=True)
    with pytest.raises(ValueError, match="takes T x W <= 128 .*got T = 8, W = 32"):
        kernels.verify_ring_mgpu(*args, reserve=8, interpret=True)


@pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))
def test_ops_ring_mosaic_path_interpret():
    """gdn_jax.ops' ring path with the Mosaic GPU kernel (interpreted): a verify, a commit of
    random accepted counts and a decode leave o and the whole ring-mode state as the XLA path's
    (the ring's appends and counts are the op's XLA, around the kernel)."""
    from gdn_jax.ops import _pallas, dispatch

    T = 4
    st, slots, tok, untouched = _case(11, MOSAIC_SMALL, T, 16, jnp.bfloat16, jnp.bfloat16)
    st = st.replace(pool=st.pool.at[untouched].set(0.0))
    choice = dispatch.Choice("mosaic", kernels.MosaicConfig(64, 2, 2), "forced")
    rng = np.random.default_rng(11)
    valid = np.asarray((slots >= 0) & (slots < MOSAIC_SMALL["num_slots"]))
    accepted = jnp.asarray(np.where(valid, rng.integers(0, T + 1, len(valid)), 0), jnp.int32)
    dec = tokens(rng, slots.shape[0], 1, 1, 2, 64, 128, jnp.bfloat16, tok.A_log, tok.dt_bias)

    def run(verify_fn, decode_fn):
        o1, s = verify_fn(*tok.args(), st, slots)
        s = ops.commit(s, slots, accepted)
        o2, s = decode_fn(*dec.args(), s, slots)
        return o1, o2, s

    got = run(lambda *a: _pallas.ring(*a, reserve=T, choice=choice, interpret=True),
              lambda *a: _pallas.ring(*a, reserve=1, choice=choice, interpret=True))
    want = run(lambda *a: _xla.ring(*a, reserve=T), lambda *a: _xla.ring(*a, reserve=1))
    for g, w in zip(got[:2], want[:2]):
        assert rel_err(g[valid], np.asarray(w[valid], np.float32)) <= 2 * BF16_EPS
    s, r = got[2], want[2]
    np.testing.assert_array_equal(np.asarray(s.count), np.asarray(r.count))
    np.testing.assert_array_equal(np.asarray(s.cand_k), np.asarray(r.cand_k))
    assert rel_err(s.pool, np.asarray(r.pool, np.float32)) <= 2 * BF16_EPS
    assert rel_err(s.cand_v, np.asarray(r.cand_v)) <= BF16_EPS
