"""Every kernel lowers for CUDA (H100 and B200 as abstract devices) on a CPU-only machine.

This runs the whole Pallas -> Triton IR lowering (pallas-gpu.md section 3.3) at the real shapes
(HV = 32, K = V = 128, B = 8, T = 4). It does not run ptxas: no spills, no timings.

The Mosaic GPU decode lowers through Mosaic's layout inference and its dialect lowering (TMA
descriptors, SMEM swizzles, register layouts), which run in Python at lowering time; what is left
(LLVM, ptxas) runs when XLA compiles. Mosaic takes its target from the device's capability, which
an abstract device lacks, so `_mgpu.target_arch` sets it: sm_90 for the H100, sm_100 for the B200.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

from gdn_jax.kernels import (MosaicConfig, ProjectionConfig, TuningConfig, _mgpu, _pallas, decode,
                             decode_mgpu, fold, mosaic_unavailable, project, verify_intermediate,
                             verify_intermediate_mgpu, verify_replay, verify_replay_mgpu,
                             verify_ring, verify_ring_mgpu)

pytestmark = pytest.mark.lowering

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "mosaic_gpu"  # the custom call target: mosaic_gpu (0.10) / mosaic_gpu_v2
B, H, HV, K, V, T, NUM_SLOTS, T_MAX = 8, 16, 32, 128, 128, 4, 12, 4
DEVICES = [pytest.param("NVIDIA H100 80GB HBM3", id="H100"), pytest.param("NVIDIA B200", id="B200")]


def _token_args(T, dtype):
    S = jax.ShapeDtypeStruct
    return (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, HV, V), dtype),
            S((B, T, HV), dtype), S((B, T, HV), dtype), S((HV,), jnp.float32),
            S((HV,), jnp.float32))


def _pool_args(pool_dtype, in_dtype):
    S = jax.ShapeDtypeStruct
    return (S((NUM_SLOTS, HV, V, K), pool_dtype),
            S((NUM_SLOTS, T_MAX, H, K), in_dtype), S((NUM_SLOTS, T_MAX, HV, V), in_dtype),
            S((NUM_SLOTS, T_MAX, HV), jnp.float32), S((NUM_SLOTS, T_MAX, HV), jnp.float32),
            S((NUM_SLOTS,), jnp.int32), S((B,), jnp.int32))


def _lower(fn, args, kind, cuda_lowering, **kwargs):
    with cuda_lowering(kind):
        return fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("pool_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16pool", "f32pool"])
@pytest.mark.parametrize("op", ["decode", "verify_intermediate", "verify_replay"])
def test_token_kernels_lower_for_cuda(op, pool_dtype, kind, cuda_lowering):
    fn = {"decode": decode, "verify_intermediate": verify_intermediate,
          "verify_replay": verify_replay}[op]
    args = _token_args(1 if op == "decode" else T, jnp.bfloat16) + _pool_args(pool_dtype,
                                                                               jnp.bfloat16)
    text = _lower(fn, args, kind, cuda_lowering, config=TuningConfig(32, 4))
    assert TRITON_CALL in text
    if op != "verify_intermediate":  # the pool is donated and aliased to the kernel's output
        assert "tf.aliasing_output" in text


@pytest.mark.parametrize("kind", DEVICES)
def test_fold_lowers_for_cuda(kind, cuda_lowering):
    text = _lower(fold, _pool_args(jnp.bfloat16, jnp.bfloat16), kind, cuda_lowering,
                  config=TuningConfig(64, 2))
    assert TRITON_CALL in text and "tf.aliasing_output" in text


@pytest.mark.parametrize("block_v, num_warps, num_stages", [(8, 1, 1), (16, 2, 2), (128, 8, 3)])
def test_decode_lowers_across_tuning(block_v, num_warps, num_stages, cuda_lowering):
    args = _token_args(1, jnp.float32) + _pool_args(jnp.float32, jnp.float32)
    text = _lower(decode, args, "NVIDIA H100 80GB HBM3", cuda_lowering,
                  config=TuningConfig(block_v, num_warps, num_stages))
    assert TRITON_CALL in text
    # the Triton compiler params reach the custom call (Triton, never Mosaic GPU)
    assert f"num_warps = {num_warps} : i32" in text
    assert f"num_stages = {num_stages} : i32" in text


_NO_MOSAIC = mosaic_unavailable()
needs_mosaic = pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))
ARCHS = {"NVIDIA H100 80GB HBM3": (9, 0), "NVIDIA B200": (10, 0)}


@pytest.mark.parametrize("stages", [None, 2, 4])
def test_pipelined_loop_says_its_stages(stages, cuda_lowering):
    """`_pallas.pipelined_fori_loop`'s Triton loop carries tt.num_stages (Triton pipelines the
    loads of a loop without tt.dot only then), a plain fori_loop's does not; the interpreter
    runs it as the plain loop."""
    def kernel(x_ref, o_ref):
        body = lambda i, acc: acc + x_ref[pl.ds(i * 128, 128)].astype(jnp.float32)  # noqa: E731
        zeros = jnp.zeros((128,), jnp.float32)
        o_ref[...] = (lax.fori_loop(0, 8, body, zeros) if stages is None else
                      _pallas.pipelined_fori_loop(0, 8, body, zeros, stages=stages))

    def call(x, interpret=False):
        return _pallas.pallas_call(kernel, name="loop", config=TuningConfig(), interpret=interpret,
                                   out_shape=jax.ShapeDtypeStruct((128,), jnp.float32))(x)

    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        lowered = jax.jit(call).trace(jax.ShapeDtypeStruct((1024,), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",))
    assert _pallas.PIPELINES_LOOPS and TRITON_CALL in lowered.as_text()
    [ir] = _pallas.triton_ir(lowered)
    assert re.findall(r"tt\.num_stages = (\d+)", ir) == ([] if stages is None else [str(stages)])
    x = jnp.asarray(np.random.default_rng(0).standard_normal(1024), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(call, static_argnames="interpret")(x, interpret=True)),
        np.asarray(x, np.float32).reshape(8, 128).sum(0, dtype=np.float32))


def _after_a_loop(x_ref, o_ref, body, zeros):  # a traced bound, an earlier loop's result
    n = lax.fori_loop(0, x_ref[0].astype(jnp.int32), lambda i, c: c + 1, jnp.int32(0))
    o_ref[...] = _pallas.pipelined_fori_loop(0, jnp.minimum(n, 8), body, zeros, stages=5)


def _nested(x_ref, o_ref, body, zeros):  # the bound is the outer loop's index
    o_ref[...] = lax.fori_loop(
        0, 8, lambda j, acc: _pallas.pipelined_fori_loop(0, j, body, acc, stages=5), zeros)


def _no_carry(x_ref, o_ref, body, zeros):
    o_ref[...] = zeros

    def step(i, carry):
        o_ref[...] = body(i, o_ref[...])
        return carry

    _pallas.pipelined_fori_loop(0, 8, step, (), stages=5)


@pytest.mark.parametrize("shape", [_after_a_loop, _nested, _no_carry],
                         ids=["after-a-loop", "nested", "no-carry"])
def test_pipelined_loop_marks_its_own_loop(shape, cuda_lowering):
    """The stages go to the marked loop alone, whatever its bounds (an earlier loop's result, an
    outer loop's index), and with no carry."""
    STAGES = "tt.num_stages = 5"  # noqa: N806
    def kernel(x_ref, o_ref):
        shape(x_ref, o_ref, lambda i, acc: acc + x_ref[pl.ds(i * 128, 128)].astype(jnp.float32),
              jnp.zeros((128,), jnp.float32))

    call = _pallas.pallas_call(kernel, name="loop", config=TuningConfig(), interpret=False,
                               out_shape=jax.ShapeDtypeStruct((128,), jnp.float32))
    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        lowered = jax.jit(call).trace(jax.ShapeDtypeStruct((1024,), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",))
    [ir] = _pallas.triton_ir(lowered)
    # a region's attributes print after it: the stages follow the marked loop's yield
    loops = re.findall(r"scf\.for|scf\.while|scf\.yield|tt\.num_stages = \d+", ir)
    assert loops == {_after_a_loop: ["scf.for", "scf.yield", "scf.for", "scf.yield", STAGES],
                     _nested: ["scf.for", "scf.for", "scf.yield", STAGES, "scf.yield"],
                     _no_carry: ["scf.for", STAGES]}[shape]  # (an empty yield is not printed)


@pytest.mark.parametrize("trigger", [None, "auto", "off", "early"])
def test_pdl_trigger_leads_each_program(trigger, monkeypatch, cuda_lowering):
    """GDN_JAX_PDL_TRIGGER=early puts one `griddepcontrol.launch_dependents` first in the kernel
    (impure inline asm: Triton keeps it although its result is unused); "off", none; "auto" (the
    default: unset) too on this CPU machine, whose first device is no SM90+ GPU (ptxas would
    refuse the instruction for an older one); the interpreter runs the kernel as it is."""
    if trigger is None:
        monkeypatch.delenv(_pallas.TRIGGER_VAR, raising=False)
    else:
        monkeypatch.setenv(_pallas.TRIGGER_VAR, trigger)

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...].astype(jnp.float32) * 2

    def call(x, interpret=False):
        return _pallas.pallas_call(kernel, name="twice", config=TuningConfig(),
                                   interpret=interpret,
                                   out_shape=jax.ShapeDtypeStruct((128,), jnp.float32))(x)

    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        lowered = jax.jit(call).trace(jax.ShapeDtypeStruct((128,), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",))
    [ir] = _pallas.triton_ir(lowered)
    asm = re.findall(r"tt\.elementwise_inline_asm \"griddepcontrol\.launch_dependents;.*"
                     r"pure = false", ir)
    assert _pallas.TRIGGERS_LAUNCH and len(asm) == (trigger == "early")
    if asm:  # before the kernel's first load
        assert ir.index("griddepcontrol") < ir.index("tt.load")
    x = jnp.asarray(np.random.default_rng(1).standard_normal(128), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(call, static_argnames="interpret")(x, interpret=True)),
        np.asarray(x, np.float32) * 2)


@pytest.mark.parametrize("platform, capability, triggers", [
    ("gpu", "9.0", True), ("gpu", "10.0", True), ("gpu", "12.1", True), ("gpu", "8.9", False),
    ("gpu", None, False), ("cpu", None, False)])
def test_pdl_trigger_auto_needs_sm90(platform, capability, triggers, monkeypatch):
    """"auto" triggers on the GPUs whose ptxas takes `griddepcontrol` (sm_90 on), never before."""
    class FakeDevice:
        pass
    device = FakeDevice()
    device.platform = platform
    if capability is not None:
        device.compute_capability = capability
    monkeypatch.setattr(_pallas.jax, "devices", lambda *a: [device])
    assert _pallas._launches_dependents() is triggers


def test_pdl_trigger_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(_pallas.TRIGGER_VAR, "late")
    with pytest.raises(ValueError, match="GDN_JAX_PDL_TRIGGER: expected one of"):
        _pallas.pallas_call(lambda x_ref, o_ref: None, name="k", config=TuningConfig(),
                            interpret=False, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32))


@pytest.mark.parametrize("kind", DEVICES)
def test_projection_gemv_loop_says_its_stages(kind, lowered_off_and_on):
    """The one-row GEMV's loop (no tt.dot) says its stages; the tile form's loop does not need
    to (its loads feed the dot)."""
    S = jax.ShapeDtypeStruct
    args = (S((1, 4096), jnp.bfloat16), S((4096, 2048), jnp.bfloat16))
    (tile,), (gemv,) = lowered_off_and_on([(project, args, {})],
                                          ProjectionConfig(64, 128, 8, 4, 3), "gemv", kind)
    assert (tile.count("tt.num_stages"), gemv.count("tt.num_stages")) == (0, 1)


@needs_mosaic
@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("pool_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16pool", "f32pool"])
def test_decode_mgpu_lowers_for_cuda(pool_dtype, kind, cuda_lowering):
    args = _token_args(1, jnp.bfloat16) + _pool_args(pool_dtype, jnp.bfloat16)
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(decode_mgpu, args, kind, cuda_lowering)
    assert MOSAIC_CALL in text and TRITON_CALL not in text
    assert "tf.aliasing_output" in text  # the pool is donated and written in place
    assert "gdn_decode_mgpu_bv64_t4_s2" in text  # the kernel's name (ncu filters on gdn_)


@needs_mosaic
@pytest.mark.parametrize("block_v, tiles_per_cta, stages, in_dtype", [
    (64, 1, 2, jnp.float32), (128, 3, 3, jnp.bfloat16), (64, 8, 4, jnp.float16),
    (128, 16, 2, jnp.bfloat16), (64, 2, 3, jnp.bfloat16),  # the last: dispatch's B >= 128
])
def test_decode_mgpu_lowers_across_tuning(block_v, tiles_per_cta, stages, in_dtype,
                                          cuda_lowering):
    args = _token_args(1, in_dtype) + _pool_args(jnp.float32, in_dtype)
    kind = "NVIDIA H100 80GB HBM3"
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(decode_mgpu, args, kind, cuda_lowering,
                      config=MosaicConfig(block_v, tiles_per_cta, stages))
    assert MOSAIC_CALL in text
    assert f"gdn_decode_mgpu_bv{block_v}_t{tiles_per_cta}_s{stages}" in text


@needs_mosaic
@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("pool_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16pool", "f32pool"])
def test_verify_replay_mgpu_lowers_for_cuda(pool_dtype, kind, cuda_lowering):
    args = _token_args(T, jnp.bfloat16) + _pool_args(pool_dtype, jnp.bfloat16)
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(verify_replay_mgpu, args, kind, cuda_lowering)
    assert MOSAIC_CALL in text and "tf.aliasing_output" in text
    assert f"gdn_verify_replay_t{T}_mgpu_bv64_t2_s2" in text


@needs_mosaic
@pytest.mark.parametrize("block_v, T, t_max", [(64, T, T_MAX), (64, 1, 5), (128, 8, 8)])
def test_verify_replay_mgpu_wy_lowers_for_h100(block_v, T, t_max, cuda_lowering):
    """Replay's matrix form (wgmma: Hopper only) through Mosaic's layout inference."""
    S = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    pool = (S((NUM_SLOTS, HV, V, K), bf16), S((NUM_SLOTS, t_max, H, K), bf16),
            S((NUM_SLOTS, t_max, HV, V), bf16), S((NUM_SLOTS, t_max, HV), jnp.float32),
            S((NUM_SLOTS, t_max, HV), jnp.float32), S((NUM_SLOTS,), jnp.int32), S((B,), jnp.int32))
    kind = "NVIDIA H100 80GB HBM3"
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(verify_replay_mgpu, _token_args(T, bf16) + pool, kind, cuda_lowering,
                      config=MosaicConfig(block_v, 2, 2, wy=True))
    assert MOSAIC_CALL in text and "tf.aliasing_output" in text
    assert f"gdn_verify_replay_wy_t{T}_mgpu_bv{block_v}_t2_s2" in text


@needs_mosaic
@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("pool_dtype, T", [(jnp.bfloat16, T), (jnp.float32, 8)],
                         ids=["bf16pool-T4", "f32pool-T8"])
def test_verify_intermediate_mgpu_lowers_for_cuda(pool_dtype, T, kind, cuda_lowering):
    """fp32 at T = 8: the largest SMEM ring (4 fp32 tiles beside 2 load stages) still fits."""
    args = _token_args(T, jnp.bfloat16) + _pool_args(pool_dtype, jnp.bfloat16)
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(verify_intermediate_mgpu, args, kind, cuda_lowering)
    assert MOSAIC_CALL in text and "tf.aliasing_output" not in text  # the pool is only read
    assert f"gdn_verify_intermediate_t{T}_mgpu_bv64_t2_s2" in text


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("pool_dtype,in_dtype", [(jnp.bfloat16, jnp.bfloat16),
                                                 (jnp.float32, jnp.bfloat16),
                                                 (jnp.float32, jnp.float32)],
                         ids=["bf16pool-bf16in", "f32pool-bf16in", "f32pool-f32in"])
@pytest.mark.parametrize("T,ring", [(1, 16), (3, 16), (4, 16), (16, 32)])
def test_ring_kernel_lowers_for_cuda(T, ring, pool_dtype, in_dtype, kind, cuda_lowering):
    S = jax.ShapeDtypeStruct
    pool = (S((NUM_SLOTS, HV, V, K), pool_dtype),
            S((NUM_SLOTS, ring, H, K), in_dtype), S((NUM_SLOTS, ring, HV, V), jnp.float32),
            S((NUM_SLOTS, ring, HV), jnp.float32), S((NUM_SLOTS, ring, HV), jnp.float32),
            S((NUM_SLOTS,), jnp.int32), S((B,), jnp.int32))
    text = _lower(verify_ring, _token_args(T, in_dtype) + pool, kind, cuda_lowering,
                  reserve=T, config=TuningConfig(64, 4))
    assert TRITON_CALL in text
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text


@needs_mosaic
@pytest.mark.parametrize("block_v, T, ring", [(64, 4, 16), (64, 1, 16), (64, 8, 16), (64, 4, 32),
                                               (128, 4, 16)])
def test_verify_ring_mgpu_lowers_for_h100(block_v, T, ring, cuda_lowering):
    """Ring mode's matrix form (wgmma: Hopper only) through Mosaic's layout inference."""
    S = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    pool = (S((NUM_SLOTS, HV, V, K), bf16), S((NUM_SLOTS, ring, H, K), bf16),
            S((NUM_SLOTS, ring, HV, V), jnp.float32), S((NUM_SLOTS, ring, HV), jnp.float32),
            S((NUM_SLOTS, ring, HV), jnp.float32), S((NUM_SLOTS,), jnp.int32), S((B,), jnp.int32))
    kind = "NVIDIA H100 80GB HBM3"
    with _mgpu.target_arch(ARCHS[kind]):
        text = _lower(verify_ring_mgpu, _token_args(T, bf16) + pool, kind, cuda_lowering,
                      reserve=T, config=MosaicConfig(block_v, 2, 2))
    assert MOSAIC_CALL in text and "tf.aliasing_output" in text
    assert f"gdn_verify_ring{ring}_wy_t{T}_mgpu_bv{block_v}_t2_s2" in text
