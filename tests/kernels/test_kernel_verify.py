"""Verify kernels (intermediate, replay) in interpret mode on CPU, against the XLA reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import verify_intermediate, verify_replay

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _case(B, H, group, K, T, pool, inp, bv):
    dims = dict(B=B, H=H, group=group, K=K, T=T, pool_dtype=pool, in_dtype=inp)
    name = lambda d: jnp.dtype(d).name.replace("float", "f").replace("bf16", "bf16")
    return pytest.param(dims, bv, id=f"B{B}-H{H}-g{group}-K{K}-T{T}-{name(pool)}pool-"
                                     f"{name(inp)}in-bv{bv}")


# A sample of B x H x GVA x K=V x T x pool dtype x input dtype x block_v (not the product).
INTERMEDIATE_CASES = [
    _case(1, 1, 2, 16, 1, F32, F32, 16),
    _case(3, 2, 1, 32, 4, BF16, BF16, 8),
    _case(3, 1, 2, 32, 8, F32, F32, 32),
    _case(1, 2, 2, 16, 3, BF16, F32, 8),
    _case(3, 2, 2, 16, 6, F32, F16, 16),
]
REPLAY_CASES = [
    _case(3, 2, 2, 32, 2, F32, F32, 16),
    _case(1, 1, 1, 16, 8, BF16, BF16, 16),
    _case(3, 1, 1, 16, 5, BF16, F32, 8),
    _case(1, 2, 2, 32, 7, F32, BF16, 32),
    _case(3, 2, 1, 16, 1, F32, F32, 8),
]


def _seed(dims, bv):
    return dims["B"] * 1000 + dims["K"] * 10 + dims["T"] + bv


@pytest.mark.parametrize("dims, block_v", INTERMEDIATE_CASES)
def test_verify_intermediate_matches_reference(dims, block_v, make_case, reference, assert_rows):
    case = make_case(seed=_seed(dims, block_v), t_max=8, **dims)
    pool_bits = np.asarray(case.pool.astype(F32)).copy()
    o, inter = verify_intermediate(*case.kernel_args(), block_v=block_v, interpret=True)
    o_ref, inter_ref = reference(case, "intermediate")
    assert o.dtype == case.q.dtype and inter.dtype == case.pool.dtype
    assert_rows("o", case, o, o_ref)
    assert_rows("inter", case, inter, inter_ref)
    np.testing.assert_array_equal(np.asarray(case.pool.astype(F32)), pool_bits)


@pytest.mark.parametrize("dims, block_v", REPLAY_CASES)
def test_verify_replay_matches_reference(dims, block_v, make_case, reference, assert_rows,
                                         assert_named_slots, assert_untouched):
    case = make_case(seed=_seed(dims, block_v), t_max=8, **dims)
    o, pool = verify_replay(*case.kernel_args(), block_v=block_v, interpret=True)
    o_ref, pool_ref = reference(case, "replay")
    assert o.dtype == case.q.dtype and pool.dtype == case.pool.dtype
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool (folded state)", case, pool, pool_ref)
    assert_untouched(case, pool)


def test_verify_replay_then_intermediate_agree(make_case, assert_close):
    """Replay's outputs equal intermediate's; replay's pool is the fold of the pending tokens."""
    case = make_case(seed=11, B=3, T=4, H=2, group=2, K=16, pool_dtype=F32, poison=False)
    o_i, _ = verify_intermediate(*case.kernel_args(), block_v=8, interpret=True)
    o_r, _ = verify_replay(*case.kernel_args(), block_v=8, interpret=True)
    assert_close("o replay vs intermediate", o_r, o_i)


@pytest.mark.parametrize("fn", [verify_intermediate, verify_replay])
def test_verify_rejects_bad_arguments(fn, make_case):
    case = make_case(seed=0, B=1, T=9, H=1, group=1, K=16, pool_dtype=F32, t_max=9)
    with pytest.raises(ValueError, match=r"T \(q.shape\[1\]\) expected 1..8"):
        fn(*case.kernel_args(), interpret=True)
    case = make_case(seed=0, B=1, T=2, H=1, group=1, K=16, pool_dtype=F32)
    args = list(case.kernel_args())
    args[9] = args[9][:, :, :, :8]  # cand_v with the wrong V
    with pytest.raises(ValueError, match="cand_v expected shape"):
        fn(*args, interpret=True)
