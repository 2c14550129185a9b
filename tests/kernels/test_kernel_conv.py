"""The decode and verify steps' causal conv (`kernels.conv_step`) against a float64 reference:
each output channel range is silu(window . weight) over its slot's window and the tokens; a
slot's conv rows take the last W - 1 inputs (keep="window") or the window and the tokens,
zero-padded (keep="all"); padding rows read and write nothing (zero outputs), and every other
entry of the conv buffer (other slots, rows past the window) is untouched bit for bit.

Tolerances: the kernel sums W fp32 products of inputs already in the conv buffer's dtype (exact
in fp32 for bf16 inputs and weights) and rounds once to the output dtype: |err| <= 2 ulp of the
output's dtype at the output's scale, 2**-7 relative for bf16 (plus an fp32 summation-order
term, far below it) and 2**-20 for fp32. The window's shift is a copy: exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import ConvConfig

TRITON_CALL = "__gpu$xla.gpu.triton"
TOL = {jnp.bfloat16: 2.0 ** -7, jnp.float32: 2.0 ** -20}


def _case(seed, N, L, W, widths, B, dtype, T=1):
    rng = np.random.default_rng(seed)
    C = sum(widths)
    conv = jnp.asarray(rng.standard_normal((N, L, C)), dtype)
    x = jnp.asarray(rng.standard_normal((B, T, C)), dtype)
    weight = jnp.asarray(rng.standard_normal((W, C)) * W ** -0.5, dtype)
    slots = rng.permutation(N)[:B].astype(np.int32)
    slots[1::3] = -1  # padding rows
    if B > 2:
        slots[2] = N + 3  # out of range: padding too
    return x, conv, weight, jnp.asarray(slots)


def _reference(x, conv, weight, slots, widths, keep="window"):
    x, conv, w = (np.asarray(a, np.float64) for a in (x, conv, weight))
    W, (B, T, C), L = w.shape[0], x.shape, conv.shape[1]
    out_conv = conv.copy()
    y = np.zeros(x.shape)
    for i, s in enumerate(np.asarray(slots)):
        if 0 <= s < conv.shape[0]:
            xp = np.concatenate([conv[s, :W - 1], x[i]], axis=0)  # [W - 1 + T, C]
            for t in range(T):
                pre = (xp[t:t + W] * w).sum(0)
                y[i, t] = pre / (1 + np.exp(-pre))
            if keep == "window":
                out_conv[s, :W - 1] = xp[T:]
            else:
                out_conv[s] = np.concatenate([xp, np.zeros((L - len(xp), C))], axis=0)
    bounds = np.cumsum((0,) + tuple(widths))
    return [y[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])], out_conv


def _check(outs, conv_out, ref_outs, ref_conv, dtype):
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == dtype and out.shape == ref.shape
        out = np.asarray(out, np.float64)
        scale = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(out, ref, rtol=0, atol=TOL[dtype] * scale)
    np.testing.assert_array_equal(np.asarray(conv_out, np.float64), ref_conv)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N, L, W, widths, B, T, keep, block", [
    (6, 7, 4, (64, 64, 128), 5, 1, "window", 64),  # Qwen3.5's layout, small: decode
    (6, 7, 4, (64, 64, 128), 5, 4, "all", 64),     # verify at T = T_max
    (6, 7, 4, (64, 64, 128), 4, 2, "all", 64),     # verify at T < T_max: zeros after
    (4, 3, 4, (32, 32, 64), 4, 1, "window", 32),   # the window alone
    (4, 5, 4, (32, 32, 64), 3, 3, "window", 32),   # shift by 3
    (3, 2, 2, (16, 48), 3, 1, "window", 16),       # W = 2, two outputs
    (2, 5, 1, (64,), 2, 1, "window", 64),          # W = 1: no window
    (2, 5, 1, (64,), 2, 3, "all", 64),
])
def test_conv_step_matches_reference_interpret(N, L, W, widths, B, T, keep, block, dtype):
    x, conv, weight, slots = _case(N + B + W + T, N, L, W, widths, B, dtype, T)
    ref_outs, ref_conv = _reference(x, conv, weight, slots, widths, keep)
    outs, conv_out = kernels.conv_step(x, conv, weight, slots, widths=widths, keep=keep,
                                       config=ConvConfig(block=block), interpret=True)
    _check(outs, conv_out, ref_outs, ref_conv, dtype)
    assert not np.any(np.asarray(outs[0])[1::3])  # padding rows: zero outputs


def test_conv_step_output_dtype():
    x, conv, weight, slots = _case(0, 4, 3, 4, (32, 32), 2, jnp.bfloat16)
    outs, _ = kernels.conv_step(x, conv, weight, slots, widths=(32, 32), dtype=jnp.float32,
                                config=ConvConfig(block=32), interpret=True)
    assert all(o.dtype == jnp.float32 for o in outs)


@pytest.mark.parametrize("change, match", [
    (dict(x=(2, 64)), r"x expected \[B, T, C\]"),
    (dict(conv=(4, 3, 32)), r"conv expected \[N, L, C\] with C = 64"),
    (dict(weight=(4, 32)), r"weight expected \[W, C\] with W >= 1 and C = 64"),
    (dict(conv=(4, 2, 64)), r"conv expected at least 3 rows per slot \(W - 1\)"),
    (dict(keep="all"), r"conv expected at least 5 rows per slot \(W - 1 \+ T\)"),
    (dict(keep="some"), r"keep expected 'window' or 'all', got 'some'"),
    (dict(slots=(3,)), r"slots expected int32 \[B\] = \[2\]"),
    (dict(widths=(32, 16)), r"widths expected positive widths summing to C = 64"),
    (dict(widths=(48, 16)), r"block=32 does not divide the output widths \[48, 16\]"),
])
def test_conv_step_rejects_bad_input(change, match):
    shapes = dict(x=(2, 2, 64), conv=(4, 3, 64), weight=(4, 64), slots=(2,), widths=(32, 32),
                  keep="window")
    shapes.update(change)
    with pytest.raises(ValueError, match=match):
        kernels.conv_step(jnp.ones(shapes["x"], jnp.bfloat16),
                          jnp.ones(shapes["conv"], jnp.bfloat16),
                          jnp.ones(shapes["weight"], jnp.bfloat16),
                          jnp.zeros(shapes["slots"], jnp.int32), widths=shapes["widths"],
                          keep=shapes["keep"], config=ConvConfig(block=32), interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("T, keep", [(1, "window"), (4, "all")])
def test_conv_step_lowers_for_cuda(kind, T, keep, cuda_lowering):
    x = jax.ShapeDtypeStruct((32, T, 8192), jnp.bfloat16)
    conv = jax.ShapeDtypeStruct((32, 7, 8192), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((4, 8192), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((32,), jnp.int32)
    with cuda_lowering(kind):
        text = kernels.conv_step.trace(x, conv, weight, slots, widths=(2048, 2048, 4096),
                                       keep=keep).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T, keep", [(1, "window"), (4, "all"), (2, "all")])
@pytest.mark.parametrize("N, B", [(1, 1), (40, 32), (300, 256)])
def test_conv_step_matches_reference_gpu(N, B, T, keep, dtype, on_gpu):
    widths = (2048, 2048, 4096)  # Qwen3.5's q | k | v channels, W = 4, T_max = 4
    x, conv, weight, slots = _case(N + B, N, 7, 4, widths, B, dtype, T)
    if B == 1:
        slots = jnp.zeros((1,), jnp.int32)
    ref_outs, ref_conv = _reference(x, conv, weight, slots, widths, keep)
    step = jax.jit(kernels.conv_step, static_argnames=("widths", "keep", "config"))
    outs, conv_out = step(x, conv, weight, slots, widths=widths, keep=keep, config=ConvConfig())
    _check(outs, conv_out, ref_outs, ref_conv, dtype)


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("T, keep", [(1, "window"), (3, "all")])
def test_conv_step_reads_partial_sums_interpret(S, T, keep):
    """x as a projection's split-K partial sums [S, B, T, N] with its channels from x_col: the
    same outputs and conv rows, bit for bit, as the kernel given their sum rounded to bf16 (the
    kernel adds S <= 2 fp32 terms as XLA does); the columns outside x_col..x_col + C are never
    read (they hold NaN)."""
    widths, B, dtype = (32, 32, 64), 4, jnp.bfloat16
    x, conv, weight, slots = _case(S + T, 6, 2 + T, 3, widths, B, dtype, T=T)
    C, x_col = sum(widths), 32
    rng = np.random.default_rng(T)
    parts = rng.standard_normal((S, B, T, x_col + C + 32)).astype(np.float32)
    parts[..., :x_col] = parts[..., x_col + C:] = np.nan
    parts = jnp.asarray(parts, jnp.float32 if S > 1 else dtype)
    summed = parts[..., x_col:x_col + C].astype(jnp.float32).sum(0).astype(dtype)
    kw = dict(widths=widths, keep=keep, config=ConvConfig(block=32), interpret=True)
    outs, conv_out = kernels.conv_step(parts, conv, weight, slots, x_col=x_col, parts_dtype=dtype,
                                       **kw)
    ref_outs, ref_conv = kernels.conv_step(summed, conv, weight, slots, **kw)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    np.testing.assert_array_equal(np.asarray(conv_out, np.float32),
                                  np.asarray(ref_conv, np.float32))
    with pytest.raises(ValueError, match="expected columns x_col..x_col"):
        kernels.conv_step(parts, conv, weight, slots, x_col=x_col + 16, **kw)
    with pytest.raises(ValueError, match=r"expected a float dtype, got int32"):
        kernels.conv_step(parts.astype(jnp.int32), conv, weight, slots, x_col=x_col, **kw)
    with pytest.raises(ValueError, match=r"x_col is for partial sums"):
        kernels.conv_step(summed, conv, weight, slots, x_col=32, **kw)
    with pytest.raises(ValueError, match=r"sides expected \(column, width\) ranges"):
        kernels.conv_step(parts, conv, weight, slots, x_col=x_col, sides=((0, 24),), **kw)
    with pytest.raises(ValueError, match=r"sides expected \(column, width\) ranges"):
        kernels.conv_step(summed, conv, weight, slots, sides=((0, 16),), **kw)
