"""The residual add + RMSNorm kernel (`kernels.add_rms_norm`) against a float64 reference:
r = x + (sum of delta's partials, rounded to x's dtype), rounded; h = r * rsqrt(mean(r^2) + eps) *
(1 + w), rounded.

Tolerances: r is the sum of two numbers of x's dtype rounded once (the fp32 sum of the S partials
first rounded to that dtype, as the unfused projection returns it): the float64 reference rounds
the same way, so r matches to 2 ulp of x's dtype plus the fp32 summation's S + 2 ulp, at the
scale |x| + sum |partials|. h is computed in fp32 and rounded once: 2 ulp relative (2**-7 for
bf16, 2**-10 fp16) at the row's scale; fp32 2**-20 (the GPU's approximate rsqrt). Against XLA's
own unfused arithmetic (the op's fallback) r is bit-identical where nothing is summed (S <= 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.ops import residual_norm

TRITON_CALL = "__gpu$xla.gpu.triton"
ULP = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11, jnp.float32: 2.0 ** -23}
# h: rounded once from fp32 (2 ulp of its dtype at the row's scale); for an fp32 h the GPU's
# approximate rsqrt (a few fp32 ulp) and the mean's summation order dominate: 2**-20
H_TOL = {jnp.bfloat16: 2.0 ** -7, jnp.float16: 2.0 ** -10, jnp.float32: 2.0 ** -20}


def _case(seed, S, M, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, N)) * 2, dtype)
    delta = None if S == 0 else jnp.asarray(rng.standard_normal((S, M, N)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(N) * 0.2, jnp.float32)
    return x, delta, w


def _reference(x, delta, w, eps):
    """(r, h, |x| + |y|: the scale of r's rounding) in float64."""
    dtype = x.dtype
    r = np.asarray(x, np.float64)
    size = np.abs(r)
    if delta is not None:
        y = np.asarray(jnp.asarray(np.asarray(delta, np.float64).sum(0), jnp.float32)
                       .astype(dtype), np.float64)
        size = size + np.abs(np.asarray(delta, np.float64)).sum(0)
        r = np.asarray(jnp.asarray(r + y, jnp.float32).astype(dtype), np.float64)
    w = np.asarray(w, np.float64)
    h = r / np.sqrt((r * r).mean(-1, keepdims=True) + eps) * (1 + w)
    return r, h, size


def _check(r, h, x, delta, w, eps):
    dtype = x.dtype
    ref_r, ref_h, size = _reference(x, delta, w, eps)
    assert r.dtype == dtype and h.dtype == dtype and r.shape == h.shape == x.shape
    S = 0 if delta is None else delta.shape[0]
    bound = ((S + 2) * ULP[np.float32] + 2 * ULP[dtype.type]) * size
    assert np.all(np.abs(np.asarray(r, np.float64) - ref_r) <= bound)
    scale = np.abs(ref_h).max(-1, keepdims=True)
    err = np.abs(np.asarray(h, np.float64) - ref_h) / scale
    assert err.max() <= H_TOL[dtype.type], err.max()
    if delta is None or delta.shape[0] == 1:  # nothing summed: XLA's unfused add, bit for bit
        xla_r, _ = residual_norm.add_rms_norm(x, delta, w, eps, backend="xla")
        np.testing.assert_array_equal(np.asarray(r, np.float64), np.asarray(xla_r, np.float64))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("S, M, N", [(3, 5, 96), (1, 1, 64), (0, 4, 64), (8, 2, 128)])
def test_add_rms_norm_matches_reference_interpret(S, M, N, dtype):
    x, delta, w = _case(S + M + N, S, M, N, dtype)
    r, h = kernels.add_rms_norm(x, delta, w, eps=1e-6, interpret=True)
    _check(r, h, x, delta, w, 1e-6)
    if delta is None:
        assert r is x or np.array_equal(np.asarray(r), np.asarray(x))


@pytest.mark.parametrize("change, match", [
    (dict(x=(4, 64, 2)), r"x \[M, N\] expected"),
    (dict(delta=(2, 3, 64)), r"delta \[S, M, N\] with M, N = 4, 64"),
    (dict(delta=(65, 4, 64)), r"outside 1..64"),
    (dict(weight=(32,)), r"weight \[N\] = \[64\]"),
    (dict(dtype=jnp.int32), r"x dtype int32"),
])
def test_add_rms_norm_rejects_bad_input(change, match):
    x = jnp.ones(change.get("x", (4, 64)), change.get("dtype", jnp.bfloat16))
    delta = jnp.ones(change.get("delta", (2, 4, 64)), jnp.float32)
    w = jnp.ones(change.get("weight", (64,)), jnp.float32)
    with pytest.raises(ValueError, match=match):
        kernels.add_rms_norm(x, delta, w, eps=1e-6, interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("S", [0, 8])
def test_add_rms_norm_lowers_for_cuda(kind, S, cuda_lowering):
    x = jax.ShapeDtypeStruct((32, 2048), jnp.bfloat16)
    delta = None if S == 0 else jax.ShapeDtypeStruct((S, 32, 2048), jnp.float32)
    w = jax.ShapeDtypeStruct((2048,), jnp.float32)
    with cuda_lowering(kind):
        text = kernels.add_rms_norm.trace(x, delta, w, eps=1e-6).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("S, M", [(8, 1), (1, 32), (4, 128), (0, 1)])
def test_add_rms_norm_matches_reference_gpu(S, M, dtype, on_gpu):
    x, delta, w = _case(S + M, S, M, 2048, dtype)  # Qwen3.5's hidden size
    r, h = jax.jit(kernels.add_rms_norm, static_argnames=("eps",))(x, delta, w, eps=1e-6)
    _check(r, h, x, delta, w, 1e-6)


def _rows_case(seed, S, M, N, R, dtype):
    """Expert rows y [R, N] (rows nobody names are NaN: never read), rows / row_weights [M, S]
    (repeats allowed), and the same sum as fp32 partials [S, M, N] (the products of two 16-bit
    values are exact in fp32, so the reference's partials are the kernel's terms)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, N)) * 2, dtype)
    rows = rng.integers(0, R - 1, (M, S)).astype(np.int32)  # row R - 1 never named
    y = rng.standard_normal((R, N)).astype(np.float32)
    y[np.setdiff1d(np.arange(R), rows)] = np.nan
    y = jnp.asarray(y, jnp.bfloat16)
    rw = jnp.asarray(rng.uniform(0.05, 1.0, (M, S)), jnp.bfloat16)
    terms = np.asarray(y, np.float64)[rows] * np.asarray(rw, np.float64)[..., None]  # [M, S, N]
    w = jnp.asarray(rng.standard_normal(N) * 0.2, jnp.float32)
    return x, y, jnp.asarray(rows), rw, jnp.asarray(terms.transpose(1, 0, 2), jnp.float32), w


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("S, M, N, R", [(9, 1, 64, 144), (3, 4, 96, 20), (1, 2, 64, 3)])
def test_add_rms_norm_gathers_weighted_rows_interpret(S, M, N, R, dtype):
    """delta given as rows of y times their weights (a MoE combine): as the partials w * y[row]
    (NaN rows never named never read)."""
    x, y, rows, rw, parts, w = _rows_case(S + M + N, S, M, N, R, dtype)
    r, h = kernels.add_rms_norm(x, y, w, eps=1e-6, rows=rows, row_weights=rw, interpret=True)
    _check(r, h, x, parts, w, 1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(rows=None), r"rows and row_weights go together"),
    (dict(y=(2, 3, 64)), r"delta \[R, N\] with N = 64 expected with rows"),
    (dict(rows=(3, 2)), r"rows and row_weights \[M, S\] with M = 4"),
    (dict(rows_dtype=jnp.int16), r"rows int32 and float row_weights"),
    (dict(rows=(4, 65), row_weights=(4, 65)), r"S = 65 rows a row is outside 1..64"),
])
def test_add_rms_norm_rejects_bad_rows(change, match):
    x = jnp.ones((4, 64), jnp.bfloat16)
    y = jnp.ones(change.get("y", (8, 64)), jnp.bfloat16)
    shape = change.get("rows", (4, 2))
    rows = None if shape is None else jnp.zeros(shape, change.get("rows_dtype", jnp.int32))
    rw = jnp.ones(change.get("row_weights", (4, 2)), jnp.bfloat16)
    w = jnp.ones((64,), jnp.float32)
    with pytest.raises(ValueError, match=match):
        kernels.add_rms_norm(x, y, w, eps=1e-6, rows=rows, row_weights=rw, interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_add_rms_norm_rows_lower_for_cuda(kind, cuda_lowering):
    x = jax.ShapeDtypeStruct((4, 2048), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((36 * 16, 2048), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((4, 9), jnp.int32)
    rw = jax.ShapeDtypeStruct((4, 9), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2048,), jnp.float32)
    with cuda_lowering(kind):
        text = kernels.add_rms_norm.trace(x, y, w, eps=1e-6, rows=rows, row_weights=rw).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("S, M", [(9, 1), (9, 4), (11, 32)])
def test_add_rms_norm_gathers_weighted_rows_gpu(S, M, on_gpu):
    x, y, rows, rw, parts, w = _rows_case(S + M, S, M, 2048, 16 * M * S, jnp.bfloat16)
    r, h = jax.jit(kernels.add_rms_norm, static_argnames=("eps",))(
        x, y, w, eps=1e-6, rows=rows, row_weights=rw)
    _check(r, h, x, parts, w, 1e-6)


# --- the gated norm (`kernels.gated_rms_norm`) --------------------------------------------------
# y = round(round(round(o / rms(o)) * w) * silu(z)) per V-wide head: three roundings to the
# output's dtype, each within the dtype's unit roundoff (ULP's values) relative to the element (a
# product: nothing cancels), plus fp32's rsqrt, mean and sigmoid (a few fp32 ulp): elementwise,
# |y - ref| <= (3 ULP + 2**-20) |ref|, plus three of the dtype's subnormal steps (fp16's
# subnormals round absolutely).
# z, where given as partial sums, is their fp32 sum rounded to o's dtype in the reference too.


def _gated_case(seed, M, H, V, dtype, S=0, z_col=0, extra=0):
    """o [M, H * V], z ([M, H * V], or partial sums [S, M, z_col + H * V + extra] whose other
    columns are NaN: never read), weight [V] and the float64 reference."""
    rng = np.random.default_rng(seed)
    N = H * V
    o = jnp.asarray(rng.standard_normal((M, N)) * 3, dtype)
    w = jnp.asarray(1.0 + 0.5 * rng.standard_normal(V), dtype)
    if S:
        parts = np.full((S, M, z_col + N + extra), np.nan, np.float32)
        parts[:, :, z_col:z_col + N] = rng.standard_normal((S, M, N)) * 2
        z = jnp.asarray(parts, jnp.float32 if S > 1 else dtype)
        total = np.asarray(z, np.float32)[0, :, z_col:z_col + N]
        for s in range(1, S):  # fp32 adds in the kernel's order: the same z, exactly
            total = total + np.asarray(z, np.float32)[s, :, z_col:z_col + N]
        z_val = jnp.asarray(total).astype(dtype)
    else:
        z = z_val = jnp.asarray(rng.standard_normal((M, N)) * 2, dtype)
    o64 = np.asarray(o, np.float64).reshape(M, H, V)
    y = o64 / np.sqrt((o64 * o64).mean(-1, keepdims=True) + 1e-6) * np.asarray(w, np.float64)
    z64 = np.asarray(z_val, np.float64).reshape(M, H, V)
    return o, z, w, (y * z64 / (1 + np.exp(-z64))).reshape(M, N)


def _gated_check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = np.abs(np.asarray(y, np.float64) - ref)
    tiny = 3 * float(jnp.finfo(dtype).smallest_subnormal)  # fp16's subnormals: absolute steps
    assert np.all(err <= (3 * ULP[dtype] + 2.0 ** -20) * np.abs(ref) + tiny), err.max()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M, H, V, heads", [(1, 4, 32, 8), (5, 3, 16, 4), (3, 4, 64, 1),
                                            (2, 2, 32, 64)])
@pytest.mark.parametrize("S, z_col", [(0, 0), (1, 16), (3, 48)], ids=["z", "z1", "parts3"])
def test_gated_rms_norm_matches_reference_interpret(M, H, V, heads, S, z_col, dtype):
    """Every (token, head) row normalised on its own (a head routed to another's columns moves
    the result by O(1)); heads above the rows, or not dividing them, fall to a divisor. The
    interpreter fills the output with NaNs: an unwritten element fails."""
    o, z, w, ref = _gated_case(M + H + V + S, M, H, V, dtype, S, z_col, extra=24 if S else 0)
    y = kernels.gated_rms_norm(o, z, w, eps=1e-6, z_col=z_col,
                               config=kernels.GatedNormConfig(heads=heads), interpret=True)
    _gated_check(y, ref, dtype)


@pytest.mark.parametrize("change, match", [
    (dict(weight=(24,)), r"V a power of two in 16..1024 dividing o's 128 columns"),
    (dict(weight=(256,)), r"dividing o's 128 columns expected, got V = 256"),
    (dict(z=(3, 64)), r"z \[M, H \* V\] = \[3, 128\] bfloat16"),
    (dict(z_dtype=jnp.float32), r"z \[M, H \* V\] = \[3, 128\] bfloat16"),
    (dict(z=(1, 3, 160), z_col=40), r"holding columns z_col..z_col \+ 128 expected"),
    (dict(z=(1, 4, 160)), r"M = 3, Nz\]"),
    (dict(z=(1, 3, 160), z_dtype=jnp.float16), r"\(fp32 or bfloat16\)"),
    (dict(o_dtype=jnp.int32), r"o dtype int32"),
])
def test_gated_rms_norm_rejects_bad_input(change, match):
    o = jnp.ones((3, 128), change.get("o_dtype", jnp.bfloat16))
    z = jnp.ones(change.get("z", (3, 128)), change.get("z_dtype", jnp.bfloat16))
    w = jnp.ones(change.get("weight", (32,)), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        kernels.gated_rms_norm(o, z, w, eps=1e-6, z_col=change.get("z_col", 0), interpret=True)
    with pytest.raises(ValueError, match="heads must be a power of two"):
        kernels.GatedNormConfig(heads=3)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_gated_rms_norm_lowers_for_cuda(kind, cuda_lowering):
    o = jax.ShapeDtypeStruct((128, 4096), jnp.bfloat16)
    z = jax.ShapeDtypeStruct((1, 128, 12352), jnp.float32)  # in_proj's partial sums, z at 8192
    w = jax.ShapeDtypeStruct((128,), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.gated_rms_norm.trace(o, z, w, eps=1e-6, z_col=8192).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("S, z_col", [(0, 0), (1, 8192), (2, 8192)], ids=["z", "z1", "parts2"])
@pytest.mark.parametrize("M", [1, 32, 128])  # a B = 1 and B = 32 decode, a B = 32 verify
def test_gated_rms_norm_matches_reference_gpu(M, S, z_col, on_gpu):
    """Qwen3.5's GDN: 32 value heads of 128, z in in_proj's [S, M, 12352] partial sums."""
    o, z, w, ref = _gated_case(M + S, M, 32, 128, jnp.bfloat16, S, z_col, extra=64 if S else 0)
    y = jax.jit(kernels.gated_rms_norm, static_argnames=("eps", "z_col"))(
        o, z, w, eps=1e-6, z_col=z_col)
    _gated_check(y, ref, jnp.bfloat16)
