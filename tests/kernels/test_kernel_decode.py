"""Decode and fold kernels in interpret mode on CPU, against the XLA reference (gdn_jax.ops.api)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import TuningConfig, decode, fold

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

# A sample of B x H x GVA x K=V x pool dtype x input dtype x block_v (not the whole product).
DECODE_CASES = [
    pytest.param(dict(B=1, H=1, group=1, K=16, pool_dtype=F32, in_dtype=F32), 8, id="B1-H1-g1-K16-f32pool-f32in-bv8"),
    pytest.param(dict(B=3, H=2, group=2, K=32, pool_dtype=BF16, in_dtype=BF16), 16, id="B3-H2-g2-K32-bf16pool-bf16in-bv16"),
    pytest.param(dict(B=3, H=1, group=2, K=16, pool_dtype=F32, in_dtype=BF16), 16, id="B3-H1-g2-K16-f32pool-bf16in-bv16"),
    pytest.param(dict(B=1, H=2, group=1, K=32, pool_dtype=BF16, in_dtype=F32), 32, id="B1-H2-g1-K32-bf16pool-f32in-bv32"),
    pytest.param(dict(B=3, H=2, group=1, K=32, pool_dtype=F32, in_dtype=F16), 8, id="B3-H2-g1-K32-f32pool-f16in-bv8"),
]


@pytest.mark.parametrize("dims, block_v", DECODE_CASES)
def test_decode_matches_reference(dims, block_v, make_case, reference, assert_rows,
                                  assert_named_slots, assert_untouched):
    case = make_case(seed=dims["B"] * 100 + dims["K"] + block_v, T=1,
                     t_max=4, **dims)
    o, pool = decode(*case.kernel_args(), block_v=block_v, interpret=True)
    o_ref, pool_ref = reference(case, "decode")
    assert o.dtype == case.q.dtype and pool.dtype == case.pool.dtype
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)


FOLD_CASES = [
    pytest.param(dict(B=3, H=2, group=2, K=16, pool_dtype=BF16, in_dtype=BF16), 8, id="B3-H2-g2-K16-bf16pool-bv8"),
    pytest.param(dict(B=1, H=1, group=1, K=32, pool_dtype=F32, in_dtype=F32), 32, id="B1-H1-g1-K32-f32pool-bv32"),
]


@pytest.mark.parametrize("dims, block_v", FOLD_CASES)
def test_fold_matches_flush(dims, block_v, make_case, reference, assert_named_slots,
                            assert_untouched):
    case = make_case(seed=7 + dims["B"], T=1, t_max=4, **dims)
    pool = fold(jnp.array(case.pool, copy=True), *case.pending, case.slots, block_v=block_v,
                interpret=True)
    assert_named_slots("pool", case, pool, reference(case, "fold"))
    assert_untouched(case, pool)
    # A named slot with nothing pending keeps its exact bits (it is neither read nor written).
    count = np.asarray(case.count)
    idle = np.array([s for s in case.named_slots() if count[s] == 0], np.int32)
    np.testing.assert_array_equal(np.asarray(pool.astype(F32))[idle],
                                  np.asarray(case.pool.astype(F32))[idle])


def test_decode_chain_in_one_jit(make_case, reference, assert_rows, assert_named_slots):
    """Two decode steps in one jit with the pool donated and the caller clearing count between
    them (the ops layer's use) match two reference steps."""
    import jax

    case = make_case(seed=3, B=3, T=1, H=1, group=2, K=16, pool_dtype=F32, t_max=3, poison=False)

    @jax.jit
    def two_steps(pool, count, slots, toks):
        o1, pool = decode(*toks, pool, *case.pending[:-1], count, slots, block_v=8, interpret=True)
        count = count.at[jnp.where(slots >= 0, slots, count.shape[0])].set(0, mode="drop")
        o2, pool = decode(*toks, pool, *case.pending[:-1], count, slots, block_v=8, interpret=True)
        return o1, o2, pool

    o1, o2, pool = two_steps(jnp.array(case.pool, copy=True), case.count, case.slots, case.tokens)
    o1_ref, pool1 = reference(case, "decode")
    count = np.asarray(case.count).copy()
    count[case.named_slots()] = 0
    case2 = type(case)(**{**case.__dict__, "pool": pool1, "count": jnp.asarray(count)})
    o2_ref, pool2 = reference(case2, "decode")
    assert_rows("o step 1", case, o1, o1_ref)
    assert_rows("o step 2", case, o2, o2_ref)
    assert_named_slots("pool", case, pool, pool2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_v=12), "block_v must be a power of two"),
    (dict(block_v=64), "block_v must divide V"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"),
])
def test_decode_rejects_bad_tuning(kwargs, match, make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=16, pool_dtype=F32)
    with pytest.raises(ValueError, match=match):
        decode(*case.kernel_args(), interpret=True, **kwargs)


def test_decode_rejects_bad_shapes(make_case):
    case = make_case(seed=0, B=1, T=2, H=1, group=1, K=16, pool_dtype=F32)
    with pytest.raises(ValueError, match=r"decode: T \(q.shape\[1\]\) expected 1..1"):
        decode(*case.kernel_args(), interpret=True)
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=16, pool_dtype=F32)
    args = list(case.kernel_args())
    args[7] = args[7].astype(F16)
    with pytest.raises(ValueError, match="pool expected dtype bfloat16 or float32"):
        decode(*args, interpret=True)


def test_tuning_config_is_hashable_and_validated():
    assert hash(TuningConfig()) == hash(TuningConfig(32, 4, 1))
    with pytest.raises(ValueError, match="block_v"):
        TuningConfig(block_v=0)
