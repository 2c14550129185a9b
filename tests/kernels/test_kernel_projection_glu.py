"""The MLP's silu(x @ w_gate) * (x @ w_up) in one launch (`kernels.project_glu`: every program
streams the same column block of both weights and forms the product in its epilogue).

Against float64: the kernel rounds gate and up to bf16 after fp32 sums over K (each off by
eps |.| + K 2**-23 (|x| @ |w|), eps = 2**-8), then forms silu(gate) * up in fp32 and rounds
once (eps |h|). silu's slope is below 1.1, so
    |h - ref| <= eps |ref| + 1.1 dg |up| + |silu(gate)| du   (dg, du: the two sums' errors),
doubled for the second-order terms. And bit for bit against the two steps it replaces:
`project_group` with the same config (the same tiles and sums), then the product in fp32.
Random inputs, never zeros: a column block of the wrong weight moves the result by O(1); the
output is a fresh buffer, so an element no program writes fails both checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import ProjectionConfig

BF16 = jnp.bfloat16
EPS = 2.0 ** -8
TRITON_CALL = "__gpu$xla.gpu.triton"


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _case(seed, M, K, I):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), BF16)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((K, I)) * K ** -0.5, BF16) for _ in "gu")
    return x, w_gate, w_up


def _assert_float64(h, x, w_gate, w_up):
    x64, g64, u64 = (np.asarray(a, np.float64) for a in (x, w_gate, w_up))
    gate, up = x64 @ g64, x64 @ u64
    K = x64.shape[1]
    dg = EPS * np.abs(gate) + K * 2.0 ** -23 * (np.abs(x64) @ np.abs(g64))
    du = EPS * np.abs(up) + K * 2.0 ** -23 * (np.abs(x64) @ np.abs(u64))
    ref = _silu(gate) * up
    bound = EPS * np.abs(ref) + 2 * (1.1 * dg * np.abs(up) + np.abs(_silu(gate)) * du)
    err = np.abs(np.asarray(h, np.float64) - ref)
    assert h.shape == ref.shape and h.dtype == jnp.dtype(BF16)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"


def _two_steps(x, w_gate, w_up, config, interpret=True):
    gate, up = (y.astype(jnp.float32) for y in kernels.project_group(
        x, (w_gate, w_up), config=config, interpret=interpret))
    return (gate * jax.nn.sigmoid(gate) * up).astype(x.dtype)


CONFIGS = [ProjectionConfig(32, 32, 1, 4, 1), ProjectionConfig(64, 16, 1, 2, 2),
           ProjectionConfig(32, 64, 1, 4, 2, swap_ab=True)]


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("config", CONFIGS, ids=["tile", "narrow-k", "swap-ab"])
def test_project_glu_matches_float64_and_two_steps_interpret(M, config):
    x, w_gate, w_up = _case(M, M, 128, 192)
    h = kernels.project_glu(x, w_gate, w_up, config=config, interpret=True)
    _assert_float64(h, x, w_gate, w_up)
    np.testing.assert_array_equal(np.asarray(h, np.float32),
                                  np.asarray(_two_steps(x, w_gate, w_up, config), np.float32))


def test_project_glu_as_gemv_interpret():
    x, w_gate, w_up = _case(7, 1, 128, 96)
    config = ProjectionConfig(32, 32, 1, 4, 2, gemv=True)
    _assert_float64(kernels.project_glu(x, w_gate, w_up, config=config, interpret=True),
                    x, w_gate, w_up)


@pytest.mark.parametrize("up_shape, config, match", [
    ((64, 96), ProjectionConfig(32, 32, 2, 4, 1), r"splits=2: the product needs"),
    ((64, 64), ProjectionConfig(32, 32), r"w_gate and w_up expected one shape \[K, I\]"),
    ((64, 96), ProjectionConfig(64, 32), r"block_n=64 does not divide N=96"),
])
def test_project_glu_rejects_bad_input(up_shape, config, match):
    with pytest.raises(ValueError, match=match):
        kernels.project_glu(jnp.ones((2, 64), BF16), jnp.ones((64, 96), BF16),
                            jnp.ones(up_shape, BF16), config=config, interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("M, config", [(1, ProjectionConfig(32, 128, 1, 4, 3)),
                                       (1, ProjectionConfig(32, 128, 1, 4, 3, gemv=True)),
                                       (32, ProjectionConfig(64, 128, 1, 4, 3, swap_ab=True))])
def test_project_glu_lowers_for_cuda(kind, M, config, cuda_lowering):
    S = jax.ShapeDtypeStruct
    w = S((2048, 5120), BF16)  # Qwen3.5's MLP
    with cuda_lowering(kind):
        text = kernels.project_glu.trace(S((M, 2048), BF16), w, w, config=config).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("M, config", [(1, ProjectionConfig(32, 128, 1, 4, 3)),
                                       (1, ProjectionConfig(32, 128, 1, 4, 3, gemv=True)),
                                       (8, ProjectionConfig(32, 128, 1, 4, 3)),
                                       (32, ProjectionConfig(64, 128, 1, 4, 3, swap_ab=True))])
def test_project_glu_matches_float64_gpu(M, config, on_gpu):
    """Compiled, at Qwen3.5's MLP shape (hidden 2048, intermediate 5120)."""
    x, w_gate, w_up = _case(M, M, 2048, 5120)
    h = jax.jit(kernels.project_glu, static_argnames="config")(x, w_gate, w_up, config=config)
    _assert_float64(h, x, w_gate, w_up)


def test_project_glu_counts_both_weights_in_shared_memory():
    """Every stage holds a tile of each weight: a config whose one-weight tiles fit but whose
    pair does not (4 stages of [128 + 2 x 128, 64] bf16 tiles: 196 KB) is refused."""
    config = ProjectionConfig(128, 64, 1, 8, 4)
    assert kernels.projection_misfit(128, 1024, 256, BF16, config) is None
    why = kernels.projection_misfit(128, 1024, 256, BF16, config, weights=2)
    assert why and "2 x 128" in why
    x, w = jnp.ones((128, 1024), BF16), jnp.ones((1024, 256), BF16)
    with pytest.raises(ValueError, match=r"project_glu: .*2 x 128"):
        kernels.project_glu(x, w, w, config=config, interpret=True)
