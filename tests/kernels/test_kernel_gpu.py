"""The kernels compiled for the GPU (no interpreter) at the real shapes: HV = 32, H = 16,
K = V = 128, B up to 256, T up to 8, against the XLA reference (Precision.HIGHEST) on the same GPU.

Run with `pytest -m gpu tests/kernels` on the GPU runner; elsewhere every test skips.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from gdn_jax.kernels import (MosaicConfig, TuningConfig, capability, decode, decode_mgpu,
                             mosaic_unavailable)

pytestmark = pytest.mark.gpu

F32, BF16 = jnp.float32, jnp.bfloat16
REAL = dict(H=16, group=2, K=128)


@pytest.mark.parametrize("block_v", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_decode_tuning_grid_gpu(block_v, num_warps, on_gpu, make_case, reference, assert_rows,
                                assert_named_slots):
    """Every tuning point the benchmark may pick compiles and is correct."""
    case = make_case(seed=block_v + num_warps, B=8, T=1, t_max=4, pool_dtype=BF16,
                     in_dtype=BF16, **REAL)
    o, pool = decode(*case.kernel_args(), config=TuningConfig(block_v, num_warps))
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU decode (Hopper and later): same cases and tolerances as the Triton decode above.


@pytest.fixture
def on_hopper(on_gpu):
    """Skip unless the GPU can run Mosaic GPU kernels (capability >= 9.0, Mosaic imports)."""
    cap = capability(on_gpu)
    if cap < (9, 0):
        pytest.skip(f"the Mosaic GPU kernels need compute capability >= 9.0, got {cap}")
    if mosaic_unavailable() is not None:
        pytest.skip(mosaic_unavailable())
    return on_gpu


def test_decode_triggers_its_successor_on_hopper_gpu(on_gpu, monkeypatch, make_case, reference,
                                                   assert_rows, assert_named_slots):
    """On an SM90+ GPU the default (`GDN_JAX_PDL_TRIGGER` unset: auto) puts the launch trigger
    first in the kernel, and the kernel so compiled is correct."""
    import jax

    from gdn_jax.kernels import _pallas

    if capability(on_gpu) < (9, 0):
        pytest.skip(f"the trigger needs compute capability >= 9.0, got {on_gpu.compute_capability}")
    monkeypatch.delenv(_pallas.TRIGGER_VAR, raising=False)
    jax.clear_caches()  # the trigger is read at trace time: no trace of another setting reused
    case = make_case(seed=3, B=8, T=1, t_max=4, pool_dtype=BF16, in_dtype=BF16, **REAL)
    call = jax.jit(lambda *a: decode(*a, config=TuningConfig(16, 1)))
    [ir] = _pallas.triton_ir(call.trace(*case.kernel_args()).lower())
    assert "griddepcontrol.launch_dependents" in ir
    o, pool = call(*case.kernel_args())
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)


@pytest.mark.parametrize("block_v", [64, 128])
@pytest.mark.parametrize("tiles_per_cta", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_decode_mgpu_tuning_grid_gpu(block_v, tiles_per_cta, stages, on_hopper, make_case,
                                     reference, assert_rows, assert_named_slots):
    """Every tuning point the benchmark may pick compiles (SMEM fits) and is correct."""
    case = make_case(seed=block_v + tiles_per_cta + stages, B=8, T=1, t_max=4, pool_dtype=BF16,
                     in_dtype=BF16, **REAL)
    o, pool = decode_mgpu(*case.kernel_args(),
                          config=MosaicConfig(block_v, tiles_per_cta, stages))
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


