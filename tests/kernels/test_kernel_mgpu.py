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

from gdn_cases import BF16_EPS, OraclePool, Tokens, rel_err
from gdn_jax.kernels import (MosaicConfig, _mgpu, decode_mgpu, verify_intermediate,
                             verify_intermediate_mgpu, verify_replay_mgpu)

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

_NO_MOSAIC = _mgpu.unavailable()
needs_mosaic = pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))

# K, V multiples of 64 (the WGMMA layout); B real rows + 2 padding rows; grid = ceil(tiles / per).
MGPU_CASES = [
    pytest.param(dict(B=2, H=1, group=2, K=64, V=64, pool_dtype=BF16, in_dtype=BF16), (64, 4, 2),
                 id="B2-H1-g2-K64-V64-bf16pool-bf16in-bv64-t4-s2"),
    pytest.param(dict(B=2, H=1, group=2, K=64, V=128, pool_dtype=F32, in_dtype=F16), (64, 3, 3),
                 id="B2-H1-g2-K64-V128-f32pool-f16in-bv64-t3-s3"),  # last CTA overshoots
    pytest.param(dict(B=1, H=2, group=1, K=128, V=64, pool_dtype=BF16, in_dtype=F32), (64, 1, 2),
                 id="B1-H2-g1-K128-V64-bf16pool-f32in-bv64-t1-s2"),
    pytest.param(dict(B=1, H=1, group=2, K=64, V=128, pool_dtype=F32, in_dtype=BF16), (128, 2, 4),
                 id="B1-H1-g2-K64-V128-f32pool-bf16in-bv128-t2-s4"),
]


def oracle(case, mode="decode"):
    """(o [B, T, HV, V], pool [N, HV, V, K]) in float64 from tests/oracle.py; NaN where no real
    row writes. The pool takes the state after the tokens (decode) or the folded state before
    them (replay)."""
    mirror = OraclePool(case.state())
    tok = Tokens(*case.tokens)
    o = np.zeros(case.v.shape)
    pool = np.full(case.pool.shape, np.nan)
    for i, s in enumerate(np.asarray(case.slots)):
        if case.real[i]:
            o[i], S, _, S0 = mirror.run(int(s), tok, i)
            pool[s] = S if mode == "decode" else S0
    return o, pool


def check_against_oracle(case, o, pool, mode="decode"):
    pool_tol = 1e-5 if case.pool.dtype == F32 else 2 * BF16_EPS
    o_tol = pool_tol + (0.0 if o.dtype == F32 else float(jnp.finfo(o.dtype).eps))
    o_want, pool_want = oracle(case, mode)
    named = case.named_slots()
    assert rel_err(o[case.real], o_want[case.real]) <= o_tol
    assert rel_err(pool[named], pool_want[named]) <= pool_tol


@needs_mosaic
@pytest.mark.parametrize("dims, tuning", MGPU_CASES)
def test_decode_mgpu_interpret(dims, tuning, make_case, reference, assert_rows,
                               assert_named_slots, assert_untouched):
    block_v, per, stages = tuning
    case = make_case(seed=11 * dims["B"] + dims["K"] + per, T=1, t_max=3, **dims)
    o, pool = decode_mgpu(*case.kernel_args(), block_v=block_v, tiles_per_cta=per, stages=stages,
                          interpret=True)
    assert o.dtype == case.q.dtype and pool.dtype == case.pool.dtype
    o_ref, pool_ref = reference(case, "decode")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)
    check_against_oracle(case, o, pool)


REPLAY_CASES = [
    pytest.param(dict(B=2, H=1, group=2, K=64, V=64, pool_dtype=BF16, in_dtype=BF16), 3,
                 (64, 2, 2), id="B2-T3-H1-g2-K64-V64-bf16pool-bf16in-bv64-t2-s2"),
    pytest.param(dict(B=1, H=1, group=2, K=64, V=128, pool_dtype=F32, in_dtype=F32), 4,
                 (64, 3, 3), id="B1-T4-H1-g2-K64-V128-f32pool-f32in-bv64-t3-s3"),
]


@needs_mosaic
@pytest.mark.parametrize("dims, T, tuning", REPLAY_CASES)
def test_verify_replay_mgpu_interpret(dims, T, tuning, make_case, reference, assert_rows,
                                      assert_named_slots, assert_untouched):
    block_v, per, stages = tuning
    case = make_case(seed=7 * T + dims["B"], T=T, t_max=max(3, T), **dims)
    o, pool = verify_replay_mgpu(*case.kernel_args(), block_v=block_v, tiles_per_cta=per,
                                 stages=stages, interpret=True)
    o_ref, pool_ref = reference(case, "replay")
    assert_rows("o", case, o, o_ref)
    assert_named_slots("pool", case, pool, pool_ref)
    assert_untouched(case, pool)
    check_against_oracle(case, o, pool, "replay")
    # A named slot with nothing pending keeps its exact bits (not written).
    count = np.asarray(case.count)
    idle = np.array([s for s in case.named_slots() if count[s] == 0], np.int32)
    np.testing.assert_array_equal(np.asarray(pool.astype(F32))[idle],
                                  np.asarray(case.pool.astype(F32))[idle])


INTERMEDIATE_CASES = [
    # T = 3: a 3-tile ring that wraps across tiles; T = 5: a 4-tile ring that wraps inside a tile
    pytest.param(dict(B=2, H=1, group=2, K=64, V=64, pool_dtype=BF16, in_dtype=BF16), 3,
                 (64, 3, 2), id="B2-T3-H1-g2-K64-V64-bf16pool-bf16in-bv64-t3-s2"),
    pytest.param(dict(B=1, H=1, group=2, K=64, V=128, pool_dtype=F32, in_dtype=F16), 5,
                 (64, 2, 3), id="B1-T5-H1-g2-K64-V128-f32pool-f16in-bv64-t2-s3"),
    pytest.param(dict(B=1, H=2, group=1, K=128, V=64, pool_dtype=F32, in_dtype=BF16), 1,
                 (64, 1, 2), id="B1-T1-H2-g1-K128-V64-f32pool-bf16in-bv64-t1-s2"),
]


@needs_mosaic
@pytest.mark.parametrize("dims, T, tuning", INTERMEDIATE_CASES)
def test_verify_intermediate_mgpu_interpret(dims, T, tuning, make_case, reference, assert_rows):
    """o and every S_t against the reference and the oracle; padding rows zero (the outputs
    start as NaN under the interpreter, so an unwritten tile fails); the pool keeps its bits."""
    block_v, per, stages = tuning
    case = make_case(seed=5 * T + dims["K"], T=T, t_max=max(3, T), **dims)
    pool_bits = np.asarray(case.pool.astype(F32)).copy()
    o, inter = verify_intermediate_mgpu(*case.kernel_args(), block_v=block_v, tiles_per_cta=per,
                                        stages=stages, interpret=True)
    assert o.dtype == case.q.dtype and inter.dtype == case.pool.dtype
    o_ref, inter_ref = reference(case, "intermediate")
    assert_rows("o", case, o, o_ref)
    assert_rows("inter", case, inter, inter_ref)
    np.testing.assert_array_equal(np.asarray(case.pool.astype(F32)), pool_bits)
    # The last intermediate state is the state after all T tokens: the oracle's.
    o_want, pool_want = oracle(case, "decode")
    tol = 1e-5 if case.pool.dtype == F32 else 2 * BF16_EPS
    real, slots = case.real, np.asarray(case.slots)
    assert rel_err(inter[real, -1], pool_want[slots[real]]) <= tol
    assert rel_err(o[real], o_want[real]) <= tol + (
        0.0 if o.dtype == F32 else float(jnp.finfo(o.dtype).eps))


@needs_mosaic
def test_verify_intermediate_mgpu_matches_triton_kernel_interpret(make_case):
    """The Mosaic and Triton intermediate kernels agree on the same call (both interpreted)."""
    case = make_case(seed=3, B=2, T=4, H=1, group=2, K=64, V=64, t_max=4, pool_dtype=F32,
                     in_dtype=F32)
    o_m, inter_m = verify_intermediate_mgpu(*case.kernel_args(), interpret=True)
    o_t, inter_t = verify_intermediate(*case.kernel_args(), block_v=32, interpret=True)
    np.testing.assert_allclose(np.asarray(o_m), np.asarray(o_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(inter_m), np.asarray(inter_t), rtol=1e-5, atol=1e-5)


@needs_mosaic
def test_decode_mgpu_matches_triton_kernel_interpret(make_case):
    """The Mosaic and Triton kernels agree on the same call (both interpreted)."""
    from gdn_jax.kernels import decode

    case = make_case(seed=21, B=2, T=1, H=1, group=2, K=64, pool_dtype=F32, in_dtype=F32,
                     t_max=2, poison=False)
    o_m, pool_m = decode_mgpu(*case.kernel_args(), interpret=True)
    o_t, pool_t = decode(*case.kernel_args(), block_v=32, interpret=True)
    np.testing.assert_allclose(np.asarray(o_m), np.asarray(o_t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pool_m), np.asarray(pool_t), rtol=1e-5, atol=1e-6)


@needs_mosaic
def test_ops_decode_mosaic_path_interpret(make_case):
    """gdn_jax.ops' kernel path with the Mosaic decode (tuning from dispatch, count := 0)."""
    from gdn_jax.ops import _pallas, _xla

    case = make_case(seed=5, B=2, T=1, H=1, group=2, K=64, pool_dtype=BF16, in_dtype=BF16,
                     t_max=2, poison=False)
    o, st = _pallas.decode(*case.tokens, case.state(), case.slots, interpret=True, mosaic=True)
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
                                  interpret=True, mosaic=True)
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
        jax.eval_shape(lambda *a: decode_mgpu(*a, **kwargs), *case.kernel_args())


@needs_mosaic
def test_decode_mgpu_rejects_head_dims_it_cannot_take(make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=32, V=64, pool_dtype=F32)
    with pytest.raises(ValueError, match="K a multiple of 64 up to 256"):
        jax.eval_shape(decode_mgpu, *case.kernel_args())
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=256, V=128, pool_dtype=F32, unused=1)
    with pytest.raises(ValueError, match="bytes of SMEM per CTA"):  # 4 x 128 KiB fp32 tiles
        jax.eval_shape(lambda *a: decode_mgpu(*a, block_v=128, stages=4), *case.kernel_args())


def test_mosaic_config_is_hashable_and_validated():
    assert hash(MosaicConfig()) == hash(MosaicConfig(64, 4, 2))
    with pytest.raises(ValueError, match="block_v"):
        MosaicConfig(block_v=16)


@pytest.mark.skipif(_NO_MOSAIC is None, reason="Mosaic GPU imports with this jax")
def test_unavailable_mosaic_says_why(make_case):
    case = make_case(seed=0, B=1, T=1, H=1, group=1, K=64, pool_dtype=F32)
    with pytest.raises(NotImplementedError, match="decode_mgpu: "):
        decode_mgpu(*case.kernel_args(), interpret=True)
