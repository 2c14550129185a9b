"""The decode kernel chained in one jit and its argument checks, in interpret mode on CPU (every
kernel against the XLA reference: test_kernel_cases.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import TuningConfig, decode

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def test_decode_chain_in_one_jit(make_case, reference, assert_rows, assert_named_slots):
    """Two decode steps in one jit with the pool donated and the caller clearing count between
    them (the ops layer's use) match two reference steps."""
    import jax

    case = make_case(seed=3, B=3, T=1, H=1, group=2, K=16, pool_dtype=F32, t_max=3, poison=False)

    @jax.jit
    def two_steps(pool, count, slots, toks):
        o1, pool = decode(*toks, pool, *case.pending[:-1], count, slots, config=TuningConfig(8), interpret=True)
        count = count.at[jnp.where(slots >= 0, slots, count.shape[0])].set(0, mode="drop")
        o2, pool = decode(*toks, pool, *case.pending[:-1], count, slots, config=TuningConfig(8), interpret=True)
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
        decode(*case.kernel_args(), interpret=True, config=TuningConfig(**kwargs))


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
