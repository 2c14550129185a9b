"""The Hopper projection kernel (`kernels.project_group_mgpu`: TMA, wgmma, stream-K, fp32 partial
sums reduce-added) against the float64 product.

Random bf16 x and w (never zeros). The output starts as zeros and every column block's sum is
added into it, so a unit no CTA computes, a partial sum lost or added twice shows as an error of
the order of the product itself, far outside the bound. bf16 x bf16 products are exact in fp32;
the sums over K (per CTA, then the reduce-adds, in any order) round in fp32, and the result stays
fp32: |y - ref| <= 2**-24 |ref| + K 2**-23 sum|x w|. Small shapes (several CTAs sharing a column
block, a CTA crossing weights, rows below the tile's) run in the Mosaic GPU interpreter on CPU,
the model's shapes compiled on the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import MosaicProjectionConfig

needs_mosaic = pytest.mark.skipif(kernels.mosaic_unavailable() is not None,
                                  reason=f"{kernels.mosaic_unavailable()}")


def _group(seed, M, K, widths):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((K, n)) * K ** -0.5, jnp.bfloat16) for n in widths)
    return x, ws


def _assert_close(ys, x, ws):
    x64 = np.asarray(x, np.float64)
    assert len(ys) == len(ws)
    for y, w in zip(ys, ws):
        w64 = np.asarray(w, np.float64)
        ref = x64 @ w64
        bound = 2.0 ** -24 * np.abs(ref) + x64.shape[1] * 2.0 ** -23 * (np.abs(x64) @ np.abs(w64))
        err = np.abs(np.asarray(y, np.float64) - ref)
        assert y.shape == ref.shape and y.dtype == jnp.float32
        assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"


# (M, K, widths, config): units = column blocks x K steps shared by `ctas` CTAs
INTERPRET_CASES = [
    (8, 128, (64,), MosaicProjectionConfig(64, 64, 2, 3)),         # 2 units, 2 CTAs, 1 each
    (24, 256, (64, 128), MosaicProjectionConfig(64, 64, 3, 5)),    # 12 units over 5 CTAs: blocks
                                                                   # shared, CTAs across weights
    (72, 192, (128, 64), MosaicProjectionConfig(64, 64, 2, 4)),    # 128-row tile, 72 rows
    (16, 320, (128,), MosaicProjectionConfig(128, 64, 4, 3)),      # a CTA's run > stages
]


@needs_mosaic
@pytest.mark.parametrize("M, K, widths, config", INTERPRET_CASES)
def test_project_group_mgpu_matches_float64_interpret(M, K, widths, config):
    x, ws = _group(M + K, M, K, widths)
    _assert_close(kernels.project_group_mgpu(x, ws, config=config, interpret=True), x, ws)


@needs_mosaic
@pytest.mark.parametrize("M, K, widths, dtype, match", [
    (4, 128, (64,), jnp.bfloat16, "M=4 rows"),
    (136, 128, (64,), jnp.bfloat16, "M=136 rows"),
    (8, 96, (64,), jnp.bfloat16, "block_k=64 does not divide K=96"),
    (8, 128, (64, 96), jnp.bfloat16, "block_n=64 does not divide N=96"),
    (8, 128, (64,), jnp.float16, "is not bfloat16"),
])
def test_project_group_mgpu_rejects_bad_input(M, K, widths, dtype, match):
    x = jnp.ones((M, K), dtype)
    ws = tuple(jnp.ones((K, n), dtype) for n in widths)
    with pytest.raises(ValueError, match=match):
        kernels.project_group_mgpu(x, ws, config=MosaicProjectionConfig(64, 64, 2, 4),
                                   interpret=True)


def test_config_rejects_bad_values():
    for field, value in [("block_n", 96), ("block_k", 128), ("stages", 1), ("ctas", 0)]:
        with pytest.raises(ValueError, match=field):
            MosaicProjectionConfig(**{field: value})


@needs_mosaic
@pytest.mark.lowering
@pytest.mark.parametrize("M, widths, config", [
    (32, (5120, 5120), MosaicProjectionConfig(128, 64, 4, 132)),
    (128, (12288, 64), MosaicProjectionConfig(64, 64, 6, 132)),
    (64, (2048,), MosaicProjectionConfig(256, 64, 3, 132)),
])
def test_project_group_mgpu_lowers_for_h100(M, widths, config, cuda_lowering):
    from gdn_jax.kernels import _mgpu
    x = jax.ShapeDtypeStruct((M, 2048), jnp.bfloat16)
    ws = tuple(jax.ShapeDtypeStruct((2048, n), jnp.bfloat16) for n in widths)
    kind = "NVIDIA H100 80GB HBM3"
    with _mgpu.target_arch((9, 0)), cuda_lowering(kind):
        text = kernels.project_group_mgpu.trace(x, ws, config=config).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "gdn_projection_mgpu" in text


GPU_GROUPS = [(2048, (12288, 64)), (2048, (8192, 512, 512)), (2048, (5120, 5120)),
              (4096, (2048,)), (5120, (2048,))]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 32, 64, 72, 128])
@pytest.mark.parametrize("K, widths", GPU_GROUPS,
                         ids=["gdn_in", "attn_qkv", "mlp", "out_proj", "down_proj"])
@pytest.mark.parametrize("block_n, stages", [(64, 6), (128, 4)])
def test_project_group_mgpu_matches_float64_gpu(M, K, widths, block_n, stages, on_gpu):
    if not str(getattr(on_gpu, "compute_capability", "9")).startswith("9"):
        pytest.skip(f"wgmma is Hopper's; this GPU is {on_gpu.device_kind}")
    config = MosaicProjectionConfig(block_n, 64, stages, on_gpu.core_count)
    why = kernels.projection_mgpu_misfit(M, K, widths, jnp.bfloat16, config)
    if why:
        pytest.skip(why)
    x, ws = _group(M + K + sum(widths), M, K, widths)
    _assert_close(kernels.project_group_mgpu(x, ws, config=config), x, ws)
