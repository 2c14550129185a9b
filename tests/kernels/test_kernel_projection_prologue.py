"""The projection kernel's prologues (`kernels.project_swiglu`, `kernels.project_gated_norm`)
against float64, and `project_group(..., partials=True)`.

Random inputs (never zeros: an unwritten column block, or a K-step given the wrong head or the
wrong half of gate_up, moves the result by O(its scale)). The oracle computes the prologue's step
in float64 with no rounding; the kernel rounds the step's inputs and result to bf16 (gate and up
as the group would have returned them, the gated norm where `gated_rms_norm` rounds: its
normalised value, the weight's product, the result), at most four roundings of the tile's
element h: |h_kernel - h| <= 4 eps |h|. So with the product's own error (one rounding of the
output, fp32 accumulation over K):
    |y - ref| <= eps |ref| + 4 eps (|h| @ |w|) + K 2**-23 (|h| @ |w|).
"""

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


def _assert_close(y, h, w):
    """y against h @ w in float64 (module docstring's bound)."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    ref = h64 @ w64
    mag = np.abs(h64) @ np.abs(w64)
    bound = EPS * np.abs(ref) + (4 * EPS + h64.shape[1] * 2.0 ** -23) * mag
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert y.shape == ref.shape and y.dtype == jnp.dtype(BF16)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"


def _weight(seed, K, N):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((K, N)) * K ** -0.5, BF16)


def _gate_up(seed, S, M, K):
    """Partial sums [S, M, 2K] (fp32; S = 1: bf16) and their float64 silu(gate) * up."""
    rng = np.random.default_rng(seed)
    dtype = BF16 if S == 1 else jnp.float32
    parts = jnp.asarray(rng.standard_normal((S, M, 2 * K)) * S ** -0.5, dtype)
    total = np.asarray(parts, np.float64).sum(0)
    return parts, _silu(total[:, :K]) * total[:, K:]


def _gated_norm(seed, M, H, V, eps):
    """o, z [M, H * V] bf16, weight [V] bf16 and their float64 gated_rms_norm."""
    rng = np.random.default_rng(seed)
    o, z = (jnp.asarray(rng.standard_normal((M, H * V)), BF16) for _ in range(2))
    weight = jnp.asarray(1.0 + 0.5 * rng.standard_normal(V), BF16)
    o64 = np.asarray(o, np.float64).reshape(M, H, V)
    y = o64 / np.sqrt(np.mean(o64 ** 2, axis=-1, keepdims=True) + eps)
    y = y * np.asarray(weight, np.float64) * _silu(np.asarray(z, np.float64).reshape(M, H, V))
    return o, z, weight, y.reshape(M, H * V)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("config", [ProjectionConfig(32, 32, 1, 4, 1),
                                    ProjectionConfig(64, 16, 4, 2, 2),
                                    ProjectionConfig(64, 32, 2, 4, 2, swap_ab=True)],
                         ids=["one-slice", "split4", "swap-ab"])
def test_project_swiglu_matches_float64_interpret(M, S, config):
    K, N = 128, 64
    gate_up, h = _gate_up(M + S, S, M, K)
    w = _weight(M, K, N)
    _assert_close(kernels.project_swiglu(gate_up, w, config=config, interpret=True), h, w)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("V, config", [(32, ProjectionConfig(32, 32, 1, 4, 1)),
                                       (16, ProjectionConfig(64, 16, 4, 2, 2)),
                                       (32, ProjectionConfig(64, 32, 2, 4, 2, swap_ab=True))],
                         ids=["one-slice", "split4", "swap-ab"])
def test_project_gated_norm_matches_float64_interpret(M, V, config):
    K, N, eps = 128, 64, 1e-6
    o, z, weight, h = _gated_norm(M, M, K // V, V, eps)
    w = _weight(M + 1, K, N)
    y = kernels.project_gated_norm(o, z, weight, w, eps=eps, config=config, interpret=True)
    _assert_close(y, h, w)


GEMV = [ProjectionConfig(32, 32, 1, 4, 1, gemv=True), ProjectionConfig(64, 32, 2, 4, 2, gemv=True)]


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("config", GEMV, ids=["one-slice", "split2"])
def test_prologues_as_gemv_match_float64_interpret(S, config):
    """One row on the CUDA cores (`ProjectionConfig.gemv`): the prologue forms the row alone."""
    K, N = 128, 64
    gate_up, h = _gate_up(10 + S, S, 1, K)
    w = _weight(S, K, N)
    _assert_close(kernels.project_swiglu(gate_up, w, config=config, interpret=True), h, w)
    V = config.block_k
    o, z, weight, h = _gated_norm(20 + S, 1, K // V, V, 1e-6)
    y = kernels.project_gated_norm(o, z, weight, w, eps=1e-6, config=config, interpret=True)
    _assert_close(y, h, w)


@pytest.mark.parametrize("splits", [1, 2])
def test_project_group_partials_hold_the_products_interpret(splits):
    """partials=True: one [splits, M, sum N_i] array, the weights' columns one after another,
    whose sum over splits is each product (fp32 partials; unsplit, the product itself in x's
    dtype: a consumer rounds the one slice to it anyway, and fp32 would double its bytes)."""
    M, K = 3, 64
    x = jnp.asarray(np.random.default_rng(0).standard_normal((M, K)), BF16)
    ws = (_weight(1, K, 32), _weight(2, K, 64))
    config = ProjectionConfig(32, 16, splits, 4, 1)
    out = kernels.project_group(x, ws, config=config, interpret=True, partials=True)
    assert out.shape == (splits, M, 96)
    assert out.dtype == (jnp.float32 if splits > 1 else BF16)
    total = np.asarray(out, np.float64).sum(0)
    x64 = np.asarray(x, np.float64)
    for (lo, hi), w in zip(((0, 32), (32, 96)), ws):
        ref = x64 @ np.asarray(w, np.float64)
        bound = EPS * np.abs(ref) + K * 2.0 ** -23 * (np.abs(x64) @ np.abs(np.asarray(w, float)))
        assert np.all(np.abs(total[:, lo:hi] - ref) <= bound)


@pytest.mark.parametrize("shape, dtype, match", [
    ((1, 2, 96), jnp.float32, r"gate_up expected \[S, M, 2K\] with 2K = 128"),
    ((2, 128), BF16, r"gate_up expected \[S, M, 2K\] with 2K = 128"),
    ((2, 2, 128), jnp.float16, r"gate_up expected dtype float32 or bfloat16"),
])
def test_project_swiglu_rejects_bad_input(shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        kernels.project_swiglu(jnp.ones(shape, dtype), jnp.ones((64, 32), BF16),
                               config=ProjectionConfig(32, 32), interpret=True)


def test_prologue_counts_its_sources_in_shared_memory():
    """128 rows of 4-stage 64-deep steps: the w and bf16 x tiles fit (project runs them), gate
    and up as two fp32 partials each do not (the compiled kernel asked 256 KB on the H200)."""
    config = ProjectionConfig(128, 64, 2, 8, 4)
    assert kernels.projection_misfit(128, 5120, 2048, BF16, config) is None
    with pytest.raises(ValueError, match="shared memory"):
        kernels.project_swiglu(jax.ShapeDtypeStruct((2, 128, 10240), jnp.float32),
                               jax.ShapeDtypeStruct((5120, 2048), BF16), config=config)


def test_one_row_prologue_stages_one_row_of_sources():
    """One row's prologue forms that row alone (its sources staged for one row), where a plain
    one-row call stages x's whole 16-row tile: 3 stages of [128, 64] w tiles and two fp32
    partials of gate and up (16 bytes a column of a row)."""
    config = ProjectionConfig(64, 128, 8, 4, 3)
    assert [config.staged_rows(M, prologue) for M in (1, 2) for prologue in (False, True)] == [
        16, 1, 16, 16]
    assert config.smem_bytes(1, x_bytes=16) == 3 * (16 + 64 * 2) * 128
    assert config.smem_bytes(2, x_bytes=16) == 3 * (16 * 16 + 64 * 2) * 128
    assert config.smem_bytes(1) == 3 * (16 * 2 + 64 * 2) * 128


@pytest.mark.parametrize("o_shape, z_shape, z_dtype, w_norm, match", [
    ((2, 64), (3, 64), BF16, 32, r"z expected \[M, K\] with K = 64, M = 2"),
    ((2, 64), (2, 64), jnp.float32, 32, r"z expected dtype bfloat16"),
    ((2, 48), (2, 48), BF16, 32, r"o expected \[M, K\] with K = 64"),
    ((2, 64), (2, 64), BF16, 16, r"norm_weight expected \[V\] = \[32\]"),
])
def test_project_gated_norm_rejects_bad_input(o_shape, z_shape, z_dtype, w_norm, match):
    with pytest.raises(ValueError, match=match):
        kernels.project_gated_norm(jnp.ones(o_shape, BF16), jnp.ones(z_shape, z_dtype),
                                   jnp.ones((w_norm,), BF16), jnp.ones((64, 32), BF16), eps=1e-6,
                                   config=ProjectionConfig(32, 32), interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("M, S", [(1, 2), (32, 1)])
def test_prologues_lower_for_cuda(kind, M, S, cuda_lowering):
    """The model's shapes: MLP down (I = 5120) and GDN out_proj (32 heads of V = 128)."""
    gate_up = jax.ShapeDtypeStruct((S, M, 10240), jnp.float32 if S > 1 else BF16)
    w_down = jax.ShapeDtypeStruct((5120, 2048), BF16)
    o = jax.ShapeDtypeStruct((M, 4096), BF16)
    weight = jax.ShapeDtypeStruct((128,), BF16)
    w_out = jax.ShapeDtypeStruct((4096, 2048), BF16)
    config = ProjectionConfig(64, 128, 8, 4, 3)
    with cuda_lowering(kind):
        texts = [kernels.project_swiglu.trace(gate_up, w_down, config=config).lower(
                     lowering_platforms=("cuda",)).as_text(),
                 kernels.project_gated_norm.trace(o, o, weight, w_out, eps=1e-6,
                                                  config=config).lower(
                     lowering_platforms=("cuda",)).as_text()]
    assert all(text.count(TRITON_CALL) == 1 for text in texts)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_prologues_lower_for_cuda_as_gemv(kind, lowered_off_and_on):
    """gemv reaches the kernel: one row's prologues lower to another kernel than the tile's."""
    gate_up = jax.ShapeDtypeStruct((2, 1, 10240), jnp.float32)
    w_down = jax.ShapeDtypeStruct((5120, 2048), BF16)
    o = jax.ShapeDtypeStruct((1, 4096), BF16)
    weight = jax.ShapeDtypeStruct((128,), BF16)
    w_out = jax.ShapeDtypeStruct((4096, 2048), BF16)
    off, on = lowered_off_and_on(
        [(kernels.project_swiglu, (gate_up, w_down), {}),
         (kernels.project_gated_norm, (o, o, weight, w_out), dict(eps=1e-6))],
        ProjectionConfig(64, 128, 8, 4, 3), "gemv", kind)
    assert all(text.count(TRITON_CALL) == 1 for text in on)
    assert all(a != b for a, b in zip(off, on))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 32, 128])
def test_prologues_match_float64_gpu(M, on_gpu):
    """Compiled, at the model's shapes and the dispatch's configs: the MLP's gate / up group's
    partials into down (I = 5120), GDN's out_proj (32 heads of 128)."""
    from gdn_jax.ops.projection import _fit_stages, _one_head_steps, config_for
    cores = on_gpu.core_count
    K, I, N = 2048, 5120, 2048
    x = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), BF16)
    w_gate, w_up, w_down = _weight(1, K, I), _weight(2, K, I), _weight(3, I, N)
    gate_up = kernels.project_group(x, (w_gate, w_up), config=config_for(M, K, (I, I),
                                                                          sm_count=cores),
                                    partials=True)
    total = np.asarray(gate_up, np.float64).sum(0)
    h = _silu(total[:, :I]) * total[:, I:]
    # where a config's stages cannot fit the sources' tiles the op keeps the step in XLA: None,
    # and nothing to run
    config = _fit_stages(config_for(M, I, N, sm_count=cores), M, I, N, BF16,
                         kernels.projection_source_bytes(
                             "swiglu", gate_up.shape[0] * gate_up.dtype.itemsize))
    assert config is not None or M >= 32
    if config is not None:
        _assert_close(kernels.project_swiglu(gate_up, w_down, config=config), h, w_down)
    o, z, weight, h = _gated_norm(M, M, 32, 128, 1e-6)
    w_out = _weight(4, 4096, N)
    config = _one_head_steps(config_for(M, 4096, N, sm_count=cores), M, 4096, N, 128, BF16, 2)
    assert config is not None or M >= 32
    if config is not None:
        _assert_close(kernels.project_gated_norm(o, z, weight, w_out, eps=1e-6, config=config),
                      h, w_out)


@pytest.mark.parametrize("S", [1, 2])
def test_project_gated_norm_reads_z_partial_sums_interpret(S):
    """z as its producer's partial sums [S, M, Nz] from column z_col: bit for bit the kernel
    given their sum rounded to bf16 (S <= 2 fp32 terms add as XLA adds them); the columns
    outside z_col..z_col + K are never read (NaN)."""
    M, K, N, V, z_col = 3, 128, 64, 32, 64
    o, _, weight, _ = _gated_norm(S, M, K // V, V, 1e-6)
    rng = np.random.default_rng(S)
    parts = rng.standard_normal((S, M, z_col + K + 32)).astype(np.float32)
    parts[..., :z_col] = parts[..., z_col + K:] = np.nan
    parts = jnp.asarray(parts, jnp.float32 if S > 1 else BF16)
    z = parts[..., z_col:z_col + K].astype(jnp.float32).sum(0).astype(BF16)
    w = _weight(S, K, N)
    config = ProjectionConfig(32, 32, 2, 4, 1)
    y = kernels.project_gated_norm(o, parts, weight, w, eps=1e-6, z_col=z_col, config=config,
                                   interpret=True)
    ref = kernels.project_gated_norm(o, z, weight, w, eps=1e-6, config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(ValueError, match=r"z's partial sums \[S, M, Nz\]"):
        kernels.project_gated_norm(o, parts, weight, w, eps=1e-6, z_col=z_col + 64,
                                   config=config, interpret=True)
