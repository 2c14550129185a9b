"""Verify kernels (intermediate, replay) against each other and their argument checks, in
interpret mode on CPU (every kernel against the XLA reference: test_kernel_cases.py)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from gdn_jax.kernels import MAX_T, TuningConfig, verify_intermediate, verify_replay

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def test_verify_replay_then_intermediate_agree(make_case, assert_close):
    """Replay's outputs equal intermediate's; replay's pool is the fold of the pending tokens."""
    case = make_case(seed=11, B=3, T=4, H=2, group=2, K=16, pool_dtype=F32, poison=False)
    o_i, _ = verify_intermediate(*case.kernel_args(), config=TuningConfig(8), interpret=True)
    o_r, _ = verify_replay(*case.kernel_args(), config=TuningConfig(8), interpret=True)
    assert_close("o replay vs intermediate", o_r, o_i)


@pytest.mark.parametrize("fn", [verify_intermediate, verify_replay])
def test_verify_rejects_bad_arguments(fn, make_case):
    case = make_case(seed=0, B=1, T=MAX_T + 1, H=1, group=1, K=16, pool_dtype=F32,
                     t_max=MAX_T + 1)
    with pytest.raises(ValueError, match=rf"T \(q.shape\[1\]\) expected 1..{MAX_T}"):
        fn(*case.kernel_args(), interpret=True)
    case = make_case(seed=0, B=1, T=2, H=1, group=1, K=16, pool_dtype=F32)
    args = list(case.kernel_args())
    args[9] = args[9][:, :, :, :8]  # cand_v with the wrong V
    with pytest.raises(ValueError, match="cand_v expected shape"):
        fn(*args, interpret=True)
