"""The Mosaic GPU kernels (`decode_mgpu`, `verify_replay_mgpu`, `verify_intermediate_mgpu`) under
the Mosaic GPU interpreter on CPU.

The interpreter simulates GMEM, SMEM, TMA copies and barriers, fills uninitialised memory with
NaN and raises on out-of-bounds reads, but knows no register layouts or SMEM swizzles (those are
checked by the lowering tests and, for real, by `-m gpu`). About 10 ms per CTA: small shapes only.
Runs on jax 0.10.2, 0.11.2 and 0.12 (0.10.x needs absl-py to import Mosaic GPU at all).

Each case is checked twice: elementwise against the XLA reference (the kernel tests' rule,
conftest.py) and normwise against the float64 oracle (tests/oracle.py; the ops tests' rule:
1e-5 for an fp32 pool, 2 bf16 eps for a bf16 pool, one more bf16 eps for a bf16 output).
Outputs of padding rows must be exactly zero; slots no real row names keep their bits (NaN
poison included: a read of them would also show up as NaN in the named slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, rel_err
from gdn_jax.kernels import (Dims, Dtypes, MosaicConfig, TuningConfig, decode, decode_mgpu,
                             mosaic_unavailable, verify_intermediate, verify_intermediate_mgpu)

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

_NO_MOSAIC = mosaic_unavailable()
needs_mosaic = pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))


@needs_mosaic
def test_verify_intermediate_mgpu_matches_triton_kernel_interpret(make_case):
    """The Mosaic and Triton intermediate kernels agree on the same call (both interpreted)."""
    case = make_case(seed=3, B=2, T=4, H=1, group=2, K=64, V=64, t_max=4, pool_dtype=F32,
                     in_dtype=F32)
    o_m, inter_m = verify_intermediate_mgpu(*case.kernel_args(), interpret=True)
    o_t, inter_t = verify_intermediate(*case.kernel_args(), config=TuningConfig(32),
                                        interpret=True)
    np.testing.assert_allclose(np.asarray(o_m), np.asarray(o_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(inter_m), np.asarray(inter_t), rtol=1e-5, atol=1e-5)


@needs_mosaic
def test_decode_mgpu_matches_triton_kernel_interpret(make_case):
    """The Mosaic and Triton kernels agree on the same call (both interpreted)."""
    case = make_case(seed=21, B=2, T=1, H=1, group=2, K=64, pool_dtype=F32, in_dtype=F32,
                     t_max=2, poison=False)
    o_m, pool_m = decode_mgpu(*case.kernel_args(), interpret=True)
    o_t, pool_t = decode(*case.kernel_args(), config=TuningConfig(32), interpret=True)
    np.testing.assert_allclose(np.asarray(o_m), np.asarray(o_t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pool_m), np.asarray(pool_t), rtol=1e-5, atol=1e-6)


def _mosaic_choice(op, case, mode=None):
    """What dispatch picks when it picks Mosaic GPU for this call (forced on a fake H100)."""
    import dataclasses

    from gdn_jax import kernels
    from gdn_jax.ops import dispatch

    @dataclasses.dataclass
    class H100:
        platform: str = "gpu"
        compute_capability: str = "9.0"
        device_kind: str = "NVIDIA H100 80GB HBM3"

    B, T, H, K = case.q.shape
    dims = Dims(B, T, H, case.v.shape[2], K, case.v.shape[3], case.pool.shape[0],
                case.cand_k.shape[1])
    choice = dispatch.select(op, dims=dims, dtypes=Dtypes.of(case.q, case.pool, case.cand_k,
                                                             case.cand_v),
                             mode=mode, backend="mosaic", device=H100())
    assert isinstance(choice.config, kernels.MosaicConfig)
    return choice


@needs_mosaic
def test_ops_decode_mosaic_path_interpret(make_case):
    """gdn_jax.ops' kernel path with the Mosaic decode (tuning from dispatch, count := 0)."""
    from gdn_jax.ops import _pallas, _xla

    case = make_case(seed=5, B=2, T=1, H=1, group=2, K=64, pool_dtype=BF16, in_dtype=BF16,
                     t_max=2, poison=False)
    o, st = _pallas.decode(*case.tokens, case.state(), case.slots, interpret=True,
                           choice=_mosaic_choice("decode", case))
    o_ref, st_ref = _xla.decode(*case.tokens, case.state(), case.slots)
    np.testing.assert_array_equal(np.asarray(st.count), np.asarray(st_ref.count))
    named = case.named_slots()
    assert rel_err(o[case.real], np.asarray(o_ref[case.real], np.float64)) <= 2 * BF16_EPS
    assert rel_err(st.pool[named], np.asarray(st_ref.pool[named].astype(F32))) <= 2 * BF16_EPS


@needs_mosaic
def test_ops_verify_intermediate_mosaic_path_interpret(make_case):
    """gdn_jax.ops' kernel path with the Mosaic intermediate verify: o and inter as XLA's, the
    state untouched."""
    from gdn_jax.ops import _pallas, _xla

    case = make_case(seed=6, B=2, T=2, H=1, group=2, K=64, pool_dtype=F32, in_dtype=F32,
                     t_max=2, poison=False)
    o, st, inter = _pallas.verify(*case.tokens, case.state(), case.slots, mode="intermediate",
                                  interpret=True, choice=_mosaic_choice("verify", case,
                                                                        "intermediate"))
    o_ref, _, inter_ref = _xla.verify(*case.tokens, case.state(), case.slots,
                                      mode="intermediate")
    real = case.real
    assert rel_err(o[real], np.asarray(o_ref[real], np.float64)) <= 1e-5
    assert rel_err(inter[real], np.asarray(inter_ref[real], np.float64)) <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_v=32), "block_v must be 64 or 128"),
    (dict(block_v=128), "block_v must divide V"),
    (dict(tiles_per_cta=0), "tiles_per_cta"),
    (dict(stages=1), "stages must be an int in 2..4"),
])
@needs_mosaic
def test_decode_mgpu_rejects_bad_tuning(kwargs, match, make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=64, pool_dtype=F32)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: decode_mgpu(*a, config=MosaicConfig(**kwargs)),
                       *case.kernel_args())


@needs_mosaic
def test_decode_mgpu_rejects_head_dims_it_cannot_take(make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=32, V=64, pool_dtype=F32)
    with pytest.raises(ValueError, match="K a multiple of 64"):
        jax.eval_shape(decode_mgpu, *case.kernel_args())
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=256, V=128, pool_dtype=F32, unused=1)
    with pytest.raises(ValueError, match="bytes of SMEM per CTA"):  # 4 x 128 KiB fp32 tiles
        jax.eval_shape(lambda *a: decode_mgpu(*a, config=MosaicConfig(128, stages=4)),
                       *case.kernel_args())


def test_mosaic_config_is_hashable_and_validated():
    assert hash(MosaicConfig()) == hash(MosaicConfig(64, 4, 2))
    with pytest.raises(ValueError, match="block_v"):
        MosaicConfig(block_v=16)


@pytest.mark.skipif(_NO_MOSAIC is None, reason="Mosaic GPU imports with this jax")
def test_unavailable_mosaic_says_why(make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=64, pool_dtype=F32)
    with pytest.raises(NotImplementedError, match="decode_mgpu: "):
        decode_mgpu(*case.kernel_args(), interpret=True)


@needs_mosaic
@pytest.mark.parametrize("wy", [False, True], ids=["tokens", "wy"])
def test_verify_replay_mgpu_keeps_non_finite_data_where_it_belongs(wy, make_case, reference):
    """NaN in a live slot's dead candidates (past its count) reaches nothing; NaN in one row's
    query and key reaches that row's outputs only: the pool takes the folded candidates, which
    never meet this call's tokens (both forms, interpreted)."""
    import dataclasses

    from gdn_jax.kernels import verify_replay_mgpu

    clean = make_case(seed=41, B=2, T=4, H=1, group=2, K=64, V=64, t_max=4,
                      pool_dtype=BF16, in_dtype=BF16)
    slots = np.asarray(clean.slots)
    real_rows = np.flatnonzero(clean.real)
    count = np.asarray(clean.count).copy()
    count[slots[real_rows]] = 2
    clean = dataclasses.replace(clean, count=jnp.asarray(count))
    dead = lambda x: x.at[slots[real_rows], 2:].set(jnp.nan)
    poisoned_row = real_rows[0]
    bad = lambda x: x.at[poisoned_row, 1].set(jnp.nan)
    case = dataclasses.replace(clean, cand_k=dead(clean.cand_k), cand_v=dead(clean.cand_v),
                               cand_g=dead(clean.cand_g), cand_beta=dead(clean.cand_beta),
                               q=bad(clean.q), k=bad(clean.k))
    o, pool = verify_replay_mgpu(*case.kernel_args(), interpret=True,
                                 config=MosaicConfig(64, 1, 2, wy=wy))
    o_want, pool_want = reference(clean, "replay")
    named = clean.named_slots()
    # bf16 pool and outputs: about two ulps (2**-7 each) of values up to 2
    np.testing.assert_allclose(np.asarray(pool[named], np.float32),
                               np.asarray(pool_want[named], np.float32), rtol=2e-2, atol=2e-2)
    other = real_rows[1]
    np.testing.assert_allclose(np.asarray(o[other], np.float32),
                               np.asarray(o_want[other], np.float32), rtol=2e-2, atol=2e-2)
    assert np.isnan(np.asarray(o[poisoned_row], np.float32)).any()
