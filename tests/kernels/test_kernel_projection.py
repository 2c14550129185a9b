"""The few-row projection kernel (`kernels.project`) against the float64 product.

Random bf16 / fp16 x and w (never zeros: an unwritten column block or K slice would leave zeros
or garbage where the reference is O(sqrt(K)), far outside the tolerance). The kernel's products
of 16-bit inputs are exact in its fp32 accumulator, so the result is the float64 product rounded
once into the dtype, up to the fp32 sums: |y - ref| <= eps_dtype * |ref| + K * 2**-23 * sum|x w|
(one rounding of the output, half an ulp each way, and fp32 accumulation over K terms in any
order). Small shapes run in the Pallas interpreter on CPU, the model's shapes on the GPU, and
every config form lowers for CUDA (tests/kernels/test_kernel_lowering.py style).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import ProjectionConfig

EPS = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11}
TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, M, K, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) * K ** -0.5, dtype)
    return x, w


def _assert_close(y, x, w, dtype):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = x64 @ w64
    bound = EPS[dtype] * np.abs(ref) + x64.shape[1] * 2.0 ** -23 * (np.abs(x64) @ np.abs(w64))
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert y.shape == ref.shape and y.dtype == jnp.dtype(dtype)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"


@pytest.mark.parametrize("M", [1, 5, 16, 33, 128])
@pytest.mark.parametrize("config", [ProjectionConfig(32, 32, 1, 4, 1), ProjectionConfig(64, 16, 4, 2, 2),
                                    ProjectionConfig(16, 32, 3, 1, 3),
                                    ProjectionConfig(64, 32, 2, 4, 2, swap_ab=True)],
                         ids=["one-slice", "split4", "split3", "swap-ab"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_project_matches_float64_interpret(M, config, dtype):
    K, N = 192 if config.splits == 3 else 128, 128
    x, w = _case(M, M, K, N, dtype)
    _assert_close(kernels.project(x, w, config=config, interpret=True), x, w, dtype)


@pytest.mark.parametrize("config", [ProjectionConfig(32, 32, 1, 4, 1, gemv=True),
                                    ProjectionConfig(64, 16, 4, 2, 2, gemv=True)],
                         ids=["one-slice", "split4"])
def test_project_as_gemv_matches_float64_interpret(config):
    """One row on the CUDA cores (`ProjectionConfig.gemv`), a lone weight and a group."""
    K, N = 128, 128
    x, w = _case(3, 1, K, N, jnp.bfloat16)
    _assert_close(kernels.project(x, w, config=config, interpret=True), x, w, jnp.bfloat16)
    ws = tuple(_case(4 + i, 1, K, n, jnp.bfloat16)[1] for i, n in enumerate((64, 96)))
    for y, w in zip(kernels.project_group(x, ws, config=config, interpret=True), ws):
        _assert_close(y, x, w, jnp.bfloat16)


@pytest.mark.parametrize("entry", ["project", "group", "swiglu", "gated_norm"])
def test_gemv_takes_one_row(entry):
    """Every entry refuses gemv at two rows before any kernel runs."""
    x, w = _case(5, 2, 128, 64, jnp.bfloat16)
    config = ProjectionConfig(32, 32, gemv=True)
    call = {"project": lambda: kernels.project(x, w, config=config, interpret=True),
            "group": lambda: kernels.project_group(x, (w, w), config=config, interpret=True),
            "swiglu": lambda: kernels.project_swiglu(jnp.concatenate([x, x], 1)[None], w,
                                                     config=config, interpret=True),
            "gated_norm": lambda: kernels.project_gated_norm(
                x, x, jnp.ones((32,), jnp.bfloat16), w, eps=1e-6, config=config,
                interpret=True)}[entry]
    with pytest.raises(ValueError, match="gemv takes one row, got M=2"):
        call()


def test_gemv_is_not_swap_ab():
    with pytest.raises(ValueError, match="gemv and swap_ab are two forms of the product"):
        ProjectionConfig(32, 32, gemv=True, swap_ab=True)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("config", [ProjectionConfig(32, 32, 1, 4, 1), ProjectionConfig(16, 16, 4, 2, 2),
                                    ProjectionConfig(64, 32, 2, 4, 1),
                                    ProjectionConfig(64, 32, 1, 4, 1, swap_ab=True)],
                         ids=["one-slice", "split4", "mixed-blocks", "swap-ab"])
def test_project_group_matches_float64_interpret(M, config):
    """Weights of three widths in one launch: each output against its own float64 product (a
    column block given to the wrong weight, or not written, is far outside the bound). With
    block_n 64 the 96-wide weight runs in blocks of 32, the others in their own."""
    K, dtype = 128, jnp.bfloat16
    x, _ = _case(M, M, K, 16, dtype)
    ws = tuple(_case(M + n, 1, K, n, dtype)[1] for n in (96, 32, 64))
    ys = kernels.project_group(x, ws, config=config, interpret=True)
    assert len(ys) == len(ws)
    for y, w in zip(ys, ws):
        _assert_close(y, x, w, dtype)


@pytest.mark.parametrize("ws_shapes, dtypes, match", [
    (((64, 32), (32, 32)), (jnp.bfloat16, jnp.bfloat16), r"x \[M, K\] and ws\[1\] \[K, N\]"),
    (((64, 32), (64, 32)), (jnp.bfloat16, jnp.float16), r"x and ws\[1\] must share a dtype"),
    (((64, 32), (64, 40)), (jnp.bfloat16, jnp.bfloat16), r"N=40 has no power-of-two block"),
])
def test_project_group_rejects_bad_input(ws_shapes, dtypes, match):
    x = jnp.ones((2, 64), jnp.bfloat16)
    ws = tuple(jnp.ones(shape, dt) for shape, dt in zip(ws_shapes, dtypes))
    with pytest.raises(ValueError, match=match):
        kernels.project_group(x, ws, config=ProjectionConfig(32, 32), interpret=True)
    with pytest.raises(ValueError, match="non-empty tuple"):
        kernels.project_group(x, (), config=ProjectionConfig(32, 32), interpret=True)


@pytest.mark.parametrize("x_shape, w_shape, dtype, config, match", [
    ((4, 64), (32, 64), jnp.bfloat16, ProjectionConfig(32, 32), r"x \[M, K\] and w \[K, N\]"),
    ((4, 64), (64, 64), jnp.float32, ProjectionConfig(32, 32), r"dtype float32"),
    ((129, 64), (64, 64), jnp.bfloat16, ProjectionConfig(32, 32), r"M=129 rows is outside 1..128"),
    ((4, 64), (64, 48), jnp.bfloat16, ProjectionConfig(32, 32), r"block_n=32 does not divide N=48"),
    ((4, 64), (64, 64), jnp.bfloat16, ProjectionConfig(32, 32, 4), r"K=64 is not a multiple"),
])
def test_project_rejects_bad_input(x_shape, w_shape, dtype, config, match):
    x, w = jnp.ones(x_shape, dtype), jnp.ones(w_shape, dtype)
    with pytest.raises(ValueError, match=match):
        kernels.project(x, w, config=config, interpret=True)


def test_project_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="x and w must share a dtype"):
        kernels.project(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.float16),
                        config=ProjectionConfig(32, 32), interpret=True)


@pytest.mark.parametrize("field, value", [("block_n", 24), ("block_k", 8), ("splits", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"ProjectionConfig: {field}"):
        ProjectionConfig(**{field: value})


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("M, config", [(1, ProjectionConfig(128, 128, 8, 4, 3)),
                                       (32, ProjectionConfig(64, 64, 2, 4, 4)),
                                       (128, ProjectionConfig(128, 64, 1, 8, 3)),
                                       (32, ProjectionConfig(128, 64, 2, 4, 3, swap_ab=True))])
def test_project_lowers_for_cuda(kind, M, config, cuda_lowering):
    x = jax.ShapeDtypeStruct((M, 2048), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.project.trace(x, w, config=config).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_project_group_lowers_for_cuda(kind, cuda_lowering):
    x = jax.ShapeDtypeStruct((1, 2048), jnp.bfloat16)
    ws = tuple(jax.ShapeDtypeStruct((2048, n), jnp.bfloat16) for n in (8192, 512, 512))
    with cuda_lowering(kind):
        text = kernels.project_group.trace(x, ws, config=ProjectionConfig(64, 128, 2, 4, 3)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1  # one launch for the three weights


# The model's shapes (bench/bench_projection.py), at the dispatch's configs, on the GPU.
GPU_SHAPES = [(2048, 12288), (2048, 64), (4096, 2048), (2048, 512), (5120, 2048), (2048, 151936)]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 32, 100, 128])
@pytest.mark.parametrize("K, N", GPU_SHAPES, ids=[f"{k}x{n}" for k, n in GPU_SHAPES])
def test_project_matches_float64_gpu(M, K, N, on_gpu):
    from gdn_jax.ops.projection import config_for
    config = config_for(M, K, N, sm_count=on_gpu.core_count)
    x, w = _case(K + N + M, M, K, N, jnp.bfloat16)
    _assert_close(kernels.project(x, w, config=config), x, w, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", GPU_SHAPES[:5], ids=[f"{k}x{n}" for k, n in GPU_SHAPES[:5]])
def test_project_as_gemv_matches_float64_gpu(K, N, on_gpu):
    """One row on the CUDA cores (`ProjectionConfig.gemv`), compiled at the dispatch's config."""
    from gdn_jax.ops.projection import config_for
    config = dataclasses.replace(config_for(1, K, N, sm_count=on_gpu.core_count), gemv=True)
    x, w = _case(K + N, 1, K, N, jnp.bfloat16)
    _assert_close(kernels.project(x, w, config=config), x, w, jnp.bfloat16)


# The model's groups of one input: GDN in_proj_qkvz + in_proj_ba, attention q / k / v, MLP gate /
# up, the 35B MoE's router with its shared expert's gate / up.
GPU_GROUPS = [(2048, (12288, 64)), (2048, (8192, 512, 512)), (2048, (5120, 5120)),
              (2048, (256, 512, 512))]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 32, 128])
@pytest.mark.parametrize("K, widths", GPU_GROUPS, ids=["gdn_in", "attn_qkv", "mlp", "moe"])
def test_project_group_matches_float64_gpu(M, K, widths, on_gpu):
    from gdn_jax.ops.projection import config_for
    _assert_group_close(M, K, widths, config_for(M, K, widths, sm_count=on_gpu.core_count))


def _assert_group_close(M, K, widths, config):
    """project_group of M random bf16 rows through weights of these widths, compiled, each
    output against its float64 product."""
    x, _ = _case(K + M, M, K, 16, jnp.bfloat16)
    ws = tuple(_case(K + n + i, 1, K, n, jnp.bfloat16)[1] for i, n in enumerate(widths))
    for y, w in zip(kernels.project_group(x, ws, config=config), ws):
        _assert_close(y, x, w, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 17, 32, 64, 128])
@pytest.mark.parametrize("config", [ProjectionConfig(64, 128, 2, 4, 3, swap_ab=True),
                                    ProjectionConfig(128, 64, 1, 4, 4, swap_ab=True),
                                    ProjectionConfig(256, 64, 4, 8, 3, swap_ab=True)],
                         ids=["bn64", "bn128", "bn256-split4"])
def test_project_swap_ab_matches_float64_gpu(M, config, on_gpu):
    """The swapped product compiled (on Hopper the weight-first wgmma) at the model's MLP shape."""
    _assert_group_close(M, 2048, (5120, 5120), config)


@pytest.mark.parametrize("flag, M, config", [("gemv", 1, ProjectionConfig(64, 128, 4, 4, 3)),
                                              ("swap_ab", 32, ProjectionConfig(128, 64, 2, 4, 3))])
def test_config_flag_changes_the_lowered_kernel(flag, M, config, lowered_off_and_on):
    """gemv and swap_ab reach the kernel of a lone weight and of a group (the interpret results
    of the two forms agree within the bound either way)."""
    x = jax.ShapeDtypeStruct((M, 2048), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16)
    off, on = lowered_off_and_on([(kernels.project, (x, w), {}),
                                  (kernels.project_group, (x, (w, w)), {})], config, flag)
    assert all(a != b for a, b in zip(off, on))
