"""gdn_jax.profiling: GPU kernel time from JAX's profiler (empty on CPU, the kernels on a GPU)."""

import jax
import jax.numpy as jnp
import pytest

from gdn_jax.profiling import kernel_trace


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
    assert trace.totals == {} and trace.busy_ns() is None


@pytest.mark.gpu
def test_kernels_of_a_program():
    f, x = _work()
    with kernel_trace() as trace:
        for _ in range(3):
            jax.block_until_ready(f(x))
    assert trace.gpus >= 1
    assert trace.busy_ns() > 0
    assert len(trace.totals) >= 1, trace.totals
