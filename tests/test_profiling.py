"""gdn_jax.profiling: GPU kernel time from JAX's profiler (empty on CPU, the kernels on a GPU)."""

import jax
import jax.numpy as jnp
import pytest

from gdn_jax.profiling import (CATEGORIES, KernelTrace, by_category, kernel_category,
                               kernel_seconds, kernel_trace, union_ns)


def _work():
    x = jnp.ones((512, 512), jnp.float32)
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    jax.block_until_ready(f(x))  # compile outside the trace
    return f, x


def test_no_gpu_planes_on_cpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("checks the CPU behaviour")
    f, x = _work()
    with kernel_trace() as trace:
        jax.block_until_ready(f(x))
    assert trace.totals == {} and trace.busy_ns() is None and trace.active_ns() is None


def test_kernel_seconds_is_none_on_cpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("checks the CPU behaviour")
    f, x = _work()
    assert kernel_seconds(f, (x,), reps=2, names=("dot",)) == (None, {})
    assert kernel_seconds(f, (x,), reps=2, active=True) == (None, {})


def test_a_names_share_takes_its_copies_and_variants_per_gpu():
    """`share_ns(name)`: kernels named name or name_... (XLA's __2 copies, a launch's variants),
    summed over the GPUs and divided by their count; a longer name that only starts alike is
    not the name's."""
    trace = KernelTrace(totals={"gdn_moe_down": 4.0, "gdn_moe_down__2": 2.0,
                                "gdn_moe_downcast": 100.0, "gdn_moe_route_w1": 8.0}, gpus=2)
    assert trace.share_ns("gdn_moe_down") == 3.0
    assert trace.share_ns("gdn_moe_route") == 4.0 and trace.share_ns("gdn_moe_route_w2") == 0
    assert KernelTrace(totals={"a": 1.0}).share_ns("a") == 0.0  # no GPU traced


@pytest.mark.parametrize("spans, union", [
    ([], 0.0), ([(0, 10)], 10.0), ([(0, 10), (20, 25)], 15.0),
    ([(0, 10), (5, 12)], 12.0),                  # a launch that starts before the last ends (PDL)
    ([(5, 12), (0, 10), (30, 31)], 13.0),        # any order
    ([(0, 20), (2, 5), (6, 8)], 20.0),           # inside another
    ([(0, 10), (10, 15)], 15.0)])                # back to back
def test_union_counts_overlapping_kernels_once(spans, union):
    assert union_ns(spans) == union


def test_active_time_is_per_gpu():
    assert KernelTrace(active=30.0, gpus=2).active_ns() == 15.0
    assert KernelTrace(active=30.0).active_ns() is None  # no GPU traced


@pytest.mark.gpu
def test_kernel_seconds_of_a_program():
    f, x = _work()
    busy, mine = kernel_seconds(f, (x,), reps=3, names=("no_such_kernel",))
    assert busy > 0 and mine == {"no_such_kernel": 0.0}
    active, _ = kernel_seconds(f, (x,), reps=3, active=True)
    assert 0 < active <= busy * 1.5  # another run of the same program: its union, not its sum


@pytest.mark.gpu
def test_kernels_of_a_program():
    f, x = _work()
    with kernel_trace() as trace:
        for _ in range(3):
            jax.block_until_ready(f(x))
    assert trace.gpus >= 1
    assert trace.busy_ns() > 0
    assert 0 < trace.active_ns() <= trace.busy_ns() * (1 + 1e-9)
    assert len(trace.totals) >= 1, trace.totals


@pytest.mark.parametrize("name, category", [
    ("gemm_fusion_dot_364", "matmul"), ("nvjet_sm90_tst_192x64_64x6_1x2_h_bz_NNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int>", "matmul"), ("gdn_projection", "matmul"),
    ("gdn_decode_bv16_w1", "gdn"),
    ("gdn_verify_replay_t4_mgpu_bv128_t1_s2_mosaic_gpu_kernel", "gdn"),
    ("gdn_decode_attention", "attention"), ("gdn_moe_gate_up", "moe"),
    ("gdn_conv_step", "conv"), ("gdn_scatter_rows", "scatter"), ("input_scatter_fusion_72", "scatter"),
    ("input_concatenate_fusion_35", "copy"), ("loop_slice_fusion_3", "copy"),
    ("memcpy32_post", "copy"), ("loop_add_fusion_94", "other"), ("fusion_2771", "other"),
])
def test_kernel_category(name, category):
    """Kernel names from an H200 profile of the model step (bench/results/profile_step-h200-b32-
    scatter-2026-12-01.json) and our kernels' names, sorted into the kinds of work."""
    assert kernel_category(name) == category


def test_by_category_sums_every_kernel():
    totals = {"gemm_fusion_dot_1": 3.0, "nvjet_x": 2.0, "gdn_decode_bv16_w1": 4.0, "fusion_7": 1.5}
    kinds = by_category(totals)
    assert set(kinds) == set(CATEGORIES)
    assert kinds["matmul"] == 5.0 and kinds["gdn"] == 4.0 and kinds["other"] == 1.5
    assert sum(kinds.values()) == sum(totals.values())
