"""The kernels compiled for the GPU (no interpreter) at the real shapes: HV = 32, H = 16,
K = V = 128, B up to 256, T up to 8, against the XLA reference (Precision.HIGHEST) on the same GPU.

Run with `pytest -m gpu tests/kernels` on the GPU runner; elsewhere every test skips.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import (_mgpu, decode, decode_mgpu, fold, verify_intermediate,
                             verify_intermediate_mgpu, verify_replay, verify_replay_mgpu)

pytestmark = pytest.mark.gpu

F32, BF16 = jnp.float32, jnp.bfloat16
REAL = dict(H=16, group=2, K=128)


@pytest.mark.parametrize("B, pool_dtype, in_dtype, block_v, num_warps", [
    (256, BF16, BF16, 32, 4),
    (256, F32, BF16, 64, 4),
    (8, F32, F32, 32, 4),
    (1, BF16, BF16, 8, 1),
])
def test_decode_gpu(B, pool_dtype, in_dtype, block_v, num_warps, on_gpu, make_case, reference,
                    assert_rows, assert_named_slots, assert_untouched):
    case = make_case(seed=B, B=B, T=1, t_max=4, pool_dtype=pool_dtype, in_dtype=in_dtype, **REAL)
    o, pool = decode(*case.kernel_args(), block_v=block_v, num_warps=num_warps)
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)


@pytest.mark.parametrize("B, T, pool_dtype, in_dtype, block_v", [
    (64, 8, BF16, BF16, 32),
    (256, 2, F32, F32, 32),
    (3, 5, F32, BF16, 16),
])
def test_verify_intermediate_gpu(B, T, pool_dtype, in_dtype, block_v, on_gpu, make_case,
                                 reference, assert_rows):
    case = make_case(seed=B + T, B=B, T=T, t_max=8, pool_dtype=pool_dtype, in_dtype=in_dtype,
                     **REAL)
    o, inter = verify_intermediate(*case.kernel_args(), block_v=block_v)
    o_ref, inter_ref = reference(case, "intermediate")
    assert_rows("o", case, o, o_ref)
    assert_rows("inter", case, inter, inter_ref)


@pytest.mark.parametrize("B, T, pool_dtype, in_dtype, block_v", [
    (256, 4, BF16, BF16, 32),
    (128, 8, F32, F32, 32),
    (32, 1, BF16, F32, 64),
])
def test_verify_replay_gpu(B, T, pool_dtype, in_dtype, block_v, on_gpu, make_case, reference,
                           assert_rows, assert_named_slots, assert_untouched):
    case = make_case(seed=B * T, B=B, T=T, t_max=8, pool_dtype=pool_dtype, in_dtype=in_dtype,
                     **REAL)
    o, pool = verify_replay(*case.kernel_args(), block_v=block_v)
    o_ref, pool_ref = reference(case, "replay")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)


@pytest.mark.parametrize("pool_dtype", [BF16, F32])
def test_fold_gpu(pool_dtype, on_gpu, make_case, reference, assert_named_slots,
                  assert_untouched):
    case = make_case(seed=5, B=64, T=1, t_max=8, pool_dtype=pool_dtype, in_dtype=BF16, **REAL)
    pool = fold(jnp.array(case.pool, copy=True), *case.pending, case.slots)
    assert_named_slots("pool", case, pool, reference(case, "fold"))
    assert_untouched(case, pool)


@pytest.mark.parametrize("block_v", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_decode_tuning_grid_gpu(block_v, num_warps, on_gpu, make_case, reference, assert_rows,
                                assert_named_slots):
    """Every tuning point the benchmark may pick compiles and is correct."""
    case = make_case(seed=block_v + num_warps, B=8, T=1, t_max=4, pool_dtype=BF16,
                     in_dtype=BF16, **REAL)
    o, pool = decode(*case.kernel_args(), block_v=block_v, num_warps=num_warps)
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU decode (Hopper and later): same cases and tolerances as the Triton decode above.


@pytest.fixture
def on_hopper(on_gpu):
    """Skip unless the GPU can run Mosaic GPU kernels (capability >= 9.0, Mosaic imports)."""
    cap = tuple(int(x) for x in on_gpu.compute_capability.split("."))
    if cap < (9, 0):
        pytest.skip(f"the Mosaic GPU kernels need compute capability >= 9.0, got {cap}")
    if _mgpu.unavailable() is not None:
        pytest.skip(_mgpu.unavailable())
    return on_gpu


@pytest.mark.parametrize("B, pool_dtype, in_dtype, block_v, tiles_per_cta, stages", [
    (256, BF16, BF16, 64, 4, 2),
    (256, F32, BF16, 64, 4, 2),
    (256, BF16, BF16, 128, 8, 3),
    (32, BF16, BF16, 64, 1, 2),
    (32, F32, F32, 128, 2, 2),
    (1, BF16, BF16, 64, 1, 2),
    (1, F32, BF16, 64, 3, 4),
])
def test_decode_mgpu_gpu(B, pool_dtype, in_dtype, block_v, tiles_per_cta, stages, on_hopper,
                         make_case, reference, assert_rows, assert_named_slots, assert_untouched):
    case = make_case(seed=B + block_v, B=B, T=1, t_max=4, pool_dtype=pool_dtype,
                     in_dtype=in_dtype, **REAL)
    o, pool = decode_mgpu(*case.kernel_args(), block_v=block_v, tiles_per_cta=tiles_per_cta,
                          stages=stages)
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)


@pytest.mark.parametrize("block_v", [64, 128])
@pytest.mark.parametrize("tiles_per_cta", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_decode_mgpu_tuning_grid_gpu(block_v, tiles_per_cta, stages, on_hopper, make_case,
                                     reference, assert_rows, assert_named_slots):
    """Every tuning point the benchmark may pick compiles (SMEM fits) and is correct."""
    case = make_case(seed=block_v + tiles_per_cta + stages, B=8, T=1, t_max=4, pool_dtype=BF16,
                     in_dtype=BF16, **REAL)
    o, pool = decode_mgpu(*case.kernel_args(), block_v=block_v, tiles_per_cta=tiles_per_cta,
                          stages=stages)
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)


def test_decode_mgpu_chain_in_one_jit_gpu(on_hopper, make_case, reference, assert_rows,
                                          assert_named_slots):
    """Two Mosaic decodes in one jit with the pool donated (the in-place path), as the Triton
    chain test does in interpret mode."""
    import jax

    case = make_case(seed=3, B=64, T=1, t_max=3, pool_dtype=BF16, in_dtype=BF16, poison=False,
                     **REAL)

    @jax.jit
    def two_steps(pool, count, slots, toks):
        o1, pool = decode_mgpu(*toks, pool, *case.pending[:-1], count, slots)
        count = count.at[jnp.where(slots >= 0, slots, count.shape[0])].set(0, mode="drop")
        o2, pool = decode_mgpu(*toks, pool, *case.pending[:-1], count, slots)
        return o1, o2, pool

    o1, o2, pool = two_steps(jnp.array(case.pool, copy=True), case.count, case.slots, case.tokens)
    o1_ref, pool1 = reference(case, "decode")
    # Step 2 starts from the kernel's own step-1 pool: a bf16 state one ulp off the reference's
    # (a different fp32 sum order rounding the other way) moves small outputs by more than an ulp.
    _, pool1_kernel = decode_mgpu(*case.tokens, jnp.array(case.pool, copy=True),
                                  *case.pending[:-1], case.count, case.slots)
    assert_named_slots("pool step 1", case, pool1_kernel, pool1)
    count = case.count.at[case.named_slots()].set(0)
    case2 = type(case)(**{**case.__dict__, "pool": pool1_kernel, "count": count})
    o2_ref, pool2 = reference(case2, "decode")
    assert_rows("o step 1", case, o1, o1_ref)
    assert_rows("o step 2", case, o2, o2_ref)
    assert_named_slots("pool", case, pool, pool2)


@pytest.mark.parametrize("B, T, pool_dtype, in_dtype, block_v, tiles_per_cta, stages", [
    (256, 4, BF16, BF16, 64, 2, 2),
    (256, 4, BF16, BF16, 128, 4, 2),  # the dispatch's bf16 tuning at B >= 128
    (128, 8, F32, F32, 64, 2, 2),
    (32, 1, BF16, F32, 128, 1, 2),
    (3, 5, F32, BF16, 64, 3, 3),
])
def test_verify_replay_mgpu_gpu(B, T, pool_dtype, in_dtype, block_v, tiles_per_cta, stages,
                                on_hopper, make_case, reference, assert_rows, assert_named_slots,
                                assert_untouched):
    case = make_case(seed=B * T + 1, B=B, T=T, t_max=8, pool_dtype=pool_dtype,
                     in_dtype=in_dtype, **REAL)
    o, pool = verify_replay_mgpu(*case.kernel_args(), block_v=block_v,
                                 tiles_per_cta=tiles_per_cta, stages=stages)
    o_ref, pool_ref = reference(case, "replay")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)


@pytest.mark.parametrize("B, T, pool_dtype, in_dtype, block_v, tiles_per_cta, stages", [
    (256, 4, BF16, BF16, 64, 2, 2),
    (64, 8, F32, BF16, 64, 2, 2),   # T = 8, fp32: a 4-tile ring, wrapping twice per tile
    (32, 3, BF16, F32, 128, 1, 2),
    (3, 5, F32, F32, 64, 3, 3),     # padding rows and an overshooting last CTA
])
def test_verify_intermediate_mgpu_gpu(B, T, pool_dtype, in_dtype, block_v, tiles_per_cta, stages,
                                      on_hopper, make_case, reference, assert_rows):
    """Every S_t and o_t; padding rows zero (outputs start uninitialised: garbage on a GPU)."""
    case = make_case(seed=B * T + 2, B=B, T=T, t_max=8, pool_dtype=pool_dtype,
                     in_dtype=in_dtype, **REAL)
    pool_before = jnp.array(case.pool, copy=True)
    o, inter = verify_intermediate_mgpu(*case.kernel_args(), block_v=block_v,
                                        tiles_per_cta=tiles_per_cta, stages=stages)
    o_ref, inter_ref = reference(case, "intermediate")
    assert_rows("o", case, o, o_ref)
    assert_rows("inter", case, inter, inter_ref)
    np.testing.assert_array_equal(np.asarray(case.pool.astype(F32)),  # NaN poison included
                                  np.asarray(pool_before.astype(F32)))
