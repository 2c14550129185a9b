"""GDN's in_proj and its conv in one launch (`kernels.project_conv`) against the two launches it
replaces, `kernels.project_group` (same config, one K slice) and then `kernels.conv_step` on its
output: the same tiles, the same products, the same rounding of the projection, the same fp32
terms of the conv in the same order (`conv_silu`), so on the GPU the projection's outputs and
the conv buffer agree bit for bit (in the interpreter within an ulp: `_assert_within_ulp`).
The two are tested against float64 in their own files; here the projection's plain
outputs are checked against float64 too (one rounding to bf16 after an fp32 sum over K:
|err| <= eps |ref| + K 2**-23 (|x| @ |w|), eps = 2**-8).

Every input is random (never zero); slots that no real row names, and the rows of the conv
buffer past the window, are NaN-poisoned and must keep their exact bits; padding rows (slot -1,
slot N + 3) read and write no window and get zero conv outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import ProjectionConfig

BF16 = jnp.bfloat16
TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, M, K, H, Kd, HV, V, W, N, L, conv_dtype=BF16, T=1):
    """x [M T, K] (M rows of T tokens), (w_qkvz, w_ba), conv [N, L, C] (NaN past the window and
    in unused slots), conv weight [W, C], slots [M] (padding rows at 1 and, from 3 rows, 2),
    widths."""
    rng = np.random.default_rng(seed)
    HK, HVV = H * Kd, HV * V
    C = 2 * HK + HVV
    x = jnp.asarray(rng.standard_normal((M * T, K)), BF16)
    w_qkvz = jnp.asarray(rng.standard_normal((K, C + HVV)) * K ** -0.5, BF16)
    w_ba = jnp.asarray(rng.standard_normal((K, 2 * HV)) * K ** -0.5, BF16)
    conv = rng.standard_normal((N, L, C)).astype(np.float32)
    conv[:, W - 1:] = np.nan
    slots = rng.permutation(N)[:M].astype(np.int32)
    if M > 1:
        slots[1] = -1
    if M > 2:
        slots[2] = N + 3
    conv[np.setdiff1d(np.arange(N), slots)] = np.nan
    weight = jnp.asarray(rng.standard_normal((W, C)) * W ** -0.5, jnp.float32)
    return (x, (w_qkvz, w_ba), jnp.asarray(conv, conv_dtype), weight, jnp.asarray(slots),
            (HK, HK, HVV, HVV, HV, HV))


def _two_launches(x, ws, conv, weight, slots, widths, config, T=1, keep="window"):
    qkvz, ba = kernels.project_group(x, ws, config=config, interpret=True)
    C, B = sum(widths[:3]), x.shape[0] // T
    (q, k, v), conv = kernels.conv_step(qkvz[:, :C].reshape(B, T, C), conv, weight, slots,
                                        widths=widths[:3], keep=keep,
                                        config=kernels.ConvConfig(block=16), interpret=True)
    HV = widths[4]
    outs = (*(o.reshape(B * T, -1) for o in (q, k, v)), qkvz[:, C:], ba[:, :HV], ba[:, HV:])
    return outs, conv


def _bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _assert_within_ulp(got, want, what):
    """got and want (same dtype) at most an ulp apart, NaNs (the poison) bit for bit: the
    interpreter compiles the fused kernel and the two launches as separate XLA:CPU programs, whose
    dots and conv sums may round an fp32 sum differently (the order within a tile, FMAs); a sum
    that cancels near zero then moves a bf16 rounding. Seen on CI, jax 0.12: z [0, 117] =
    -2.98e-5, one ulp apart. The GPU test below keeps the projection bit for bit."""
    a, b = _bits(got).astype(np.int64), _bits(want).astype(np.int64)
    nan = np.isnan(np.asarray(want, np.float32))
    np.testing.assert_array_equal(a[nan], b[nan], err_msg=f"{what}: the NaN poison")
    assert np.all(np.abs(a - b)[~nan] <= 1), f"{what}: more than an ulp apart"


def _assert_outputs_match(outs, ref_outs, widths, rows):
    for i, (out, ref, n) in enumerate(zip(outs, ref_outs, widths)):
        assert out.shape == (rows, n) and out.dtype == BF16
        _assert_within_ulp(out, ref, f"output {i}")


@pytest.mark.parametrize("M, W, config, conv_dtype", [
    (1, 4, ProjectionConfig(block_n=32, block_k=64), BF16),              # decode at B = 1
    (1, 4, ProjectionConfig(block_n=32, block_k=64, gemv=True), BF16),   # ... as a GEMV
    (5, 4, ProjectionConfig(block_n=64, block_k=32), BF16),               # padding rows
    (4, 4, ProjectionConfig(block_n=32, block_k=64, swap_ab=True), jnp.float32),
    (3, 2, ProjectionConfig(block_n=16, block_k=128), BF16),              # W = 2
    (2, 1, ProjectionConfig(block_n=32, block_k=64), BF16),               # W = 1: no window
])
def test_project_conv_matches_two_launches_interpret(M, W, config, conv_dtype):
    x, ws, conv, weight, slots, widths = _case(M + W, M, 128, 2, 16, 16, 8, W, M + 3, W + 1,
                                               conv_dtype)
    outs, conv_out = kernels.project_conv(x, ws, conv, weight, slots, widths=widths,
                                          config=config, interpret=True)
    ref_outs, ref_conv = _two_launches(x, ws, conv, weight, slots, widths, config)
    _assert_outputs_match(outs, ref_outs, widths, M)
    _assert_within_ulp(conv_out, ref_conv, "the conv buffer")  # NaN poison kept
    padding = (np.asarray(slots) < 0) | (np.asarray(slots) >= conv.shape[0])
    assert not np.any(np.asarray(jnp.concatenate(outs[:3], axis=1), np.float32)[padding])
    # the projection's own outputs against float64 (module docstring's bound)
    x64 = np.asarray(x, np.float64)
    w64 = np.concatenate([np.asarray(w, np.float64) for w in ws], axis=1)
    ref, mag = x64 @ w64, np.abs(x64) @ np.abs(w64)
    C = sum(widths[:3])
    got = np.concatenate([np.asarray(o, np.float64) for o in outs[3:]], axis=1)
    bound = 2.0 ** -8 * np.abs(ref[:, C:]) + 128 * 2.0 ** -23 * mag[:, C:]
    assert np.all(np.abs(got - ref[:, C:]) <= bound)


@pytest.mark.parametrize("M, T, L, W, config", [
    (3, 4, 7, 4, ProjectionConfig(block_n=32, block_k=64)),                # verify at T_max
    (3, 2, 7, 4, ProjectionConfig(block_n=64, block_k=64, swap_ab=True)),  # T < T_max: zeros
    (1, 3, 6, 4, ProjectionConfig(block_n=32, block_k=128)),               # one row
    (2, 5, 6, 2, ProjectionConfig(block_n=16, block_k=64)),                # W = 2, rows past
    (5, 1, 4, 4, ProjectionConfig(block_n=32, block_k=64)),                # one token, kept
])
def test_project_conv_keeps_all_as_two_launches_interpret(M, T, L, W, config):
    """keep="all" (verify): T tokens a row, the window kept and the tokens after it (zeros to
    the slot's last row), each token convolved over its row's window and earlier tokens: the
    outputs and the conv buffer bit for bit as the projection, then `conv_step(keep="all")`."""
    x, ws, conv, weight, slots, widths = _case(M + T + W, M, 128, 2, 16, 16, 8, W, M + 3, L,
                                               T=T)
    outs, conv_out = kernels.project_conv(x, ws, conv, weight, slots, widths=widths, tokens=T,
                                          keep="all", config=config, interpret=True)
    ref_outs, ref_conv = _two_launches(x, ws, conv, weight, slots, widths, config, T, "all")
    _assert_outputs_match(outs, ref_outs, widths, M * T)
    _assert_within_ulp(conv_out, ref_conv, "the conv buffer")
    real = (np.asarray(slots) >= 0) & (np.asarray(slots) < conv.shape[0])
    assert np.all(np.isfinite(np.asarray(conv_out, np.float32)[np.asarray(slots)[real]]))


def test_project_conv_shifts_the_window():
    """Two calls on the same slots: the second convolves the first's token as its newest window
    row (the window is read and written in place, oldest first)."""
    x, ws, conv, weight, slots, widths = _case(7, 2, 128, 2, 16, 16, 8, 4, 4, 3)
    config = ProjectionConfig(block_n=32, block_k=64)
    kw = dict(widths=widths, config=config, interpret=True)
    outs1, conv1 = kernels.project_conv(x, ws, conv, weight, slots, **kw)
    x2 = x[::-1]
    outs2, conv2 = kernels.project_conv(x2, ws, conv1, weight, slots, **kw)
    s = int(slots[0])
    C = sum(widths[:3])
    token1 = jnp.concatenate(outs1[:3], axis=1)  # post-conv: not what the window keeps
    assert not np.array_equal(np.asarray(conv1[s, 2]), np.asarray(token1[0]))
    qkvz1 = kernels.project_group(x, ws, config=config, interpret=True)[0][0, :C]
    qkvz2 = kernels.project_group(x2, ws, config=config, interpret=True)[0][0, :C]
    np.testing.assert_array_equal(np.asarray(conv1[s, 2]), np.asarray(qkvz1))
    np.testing.assert_array_equal(np.asarray(conv2[s, 1]), np.asarray(qkvz1))
    np.testing.assert_array_equal(np.asarray(conv2[s, 2]), np.asarray(qkvz2))
    np.testing.assert_array_equal(np.asarray(conv2[s, 0]), np.asarray(conv[s, 2]))


@pytest.mark.parametrize("change, match", [
    (dict(config=ProjectionConfig(block_n=32, block_k=64, splits=2)), r"splits=2: the conv"),
    (dict(widths=(32, 32, 128, 128, 16, 8)), r"do not cut the weights' 352 columns"),
    (dict(widths=(32, 32, 64, 192, 16, 16)), r"the conv's C = 192 channels are not the first"),
    (dict(widths=(32, 32, 128, 120, 24, 16)), r"an output spans two weights"),
    (dict(conv=(5, 3, 64)), r"conv expected \[N, L, C\] with C = 192 and L >= 3 \(W - 1\)"),
    (dict(conv=(5, 2, 192)), r"conv expected \[N, L, C\] with C = 192 and L >= 3 \(W - 1\)"),
    (dict(keep="all", tokens=2), r"L >= 5 \(W - 1 \+ tokens\)"),
    (dict(keep="some"), r"keep expected 'window' or 'all', got 'some'"),
    (dict(tokens=2), r"tokens expected an int >= 1 dividing x's 2 rows \(1 where"),
    (dict(keep="all", tokens=3, conv=(5, 7, 192)), r"tokens expected an int >= 1 dividing"),
    (dict(slots=(3,)), r"slots expected int32 \[B\] = \[2\]"),
    (dict(weight=(192,)), r"conv_weight expected \[W, C\] with W >= 1"),
])
def test_project_conv_rejects_bad_input(change, match):
    shapes = dict(conv=(5, 3, 192), slots=(2,), weight=(4, 192),
                  widths=(32, 32, 128, 128, 16, 16), keep="window", tokens=1,
                  config=ProjectionConfig(block_n=32, block_k=64))
    shapes.update(change)
    if shapes["tokens"] == 2 and shapes["keep"] == "all":
        shapes["slots"] = (1,)
    with pytest.raises(ValueError, match=match):
        kernels.project_conv(jnp.ones((2, 64), BF16),
                             (jnp.ones((64, 320), BF16), jnp.ones((64, 32), BF16)),
                             jnp.ones(shapes["conv"], BF16), jnp.ones(shapes["weight"]),
                             jnp.zeros(shapes["slots"], jnp.int32), widths=shapes["widths"],
                             tokens=shapes["tokens"], keep=shapes["keep"],
                             config=shapes["config"], interpret=True)


# Qwen3.5's GDN in_proj: hidden 2048, 16 key heads and 32 value heads of 128, W = 4
QWEN = dict(K=2048, widths=(2048, 2048, 4096, 4096, 32, 32), ws=(12288, 64), C=8192)


def _qwen_args(B, T):
    S = jax.ShapeDtypeStruct
    return (S((B * T, QWEN["K"]), BF16), tuple(S((QWEN["K"], n), BF16) for n in QWEN["ws"]),
            S((B + 8, 3 + T, QWEN["C"]), BF16), S((4, QWEN["C"]), BF16), S((B,), jnp.int32))


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("B, T, config", [
    (1, 1, ProjectionConfig(block_n=32, block_k=128)),
    (1, 1, ProjectionConfig(block_n=32, block_k=128, gemv=True)),
    (32, 1, ProjectionConfig(block_n=64, block_k=128, swap_ab=True)),
    (32, 4, ProjectionConfig(block_n=128, block_k=64, num_warps=8, num_stages=4)),
])
def test_project_conv_lowers_for_cuda(kind, B, T, config, cuda_lowering):
    with cuda_lowering(kind):
        text = kernels.project_conv.trace(
            *_qwen_args(B, T), widths=QWEN["widths"], tokens=T,
            keep="window" if T == 1 else "all", config=config).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, config", [
    (1, 1, ProjectionConfig(block_n=32, block_k=128)),
    (1, 1, ProjectionConfig(block_n=32, block_k=128, gemv=True)),
    (8, 1, ProjectionConfig(block_n=32, block_k=128)),
    (32, 1, ProjectionConfig(block_n=64, block_k=128, swap_ab=True)),
    (1, 4, ProjectionConfig(block_n=32, block_k=128)),                          # verify
    (8, 4, ProjectionConfig(block_n=64, block_k=128, swap_ab=True)),
    (32, 4, ProjectionConfig(block_n=128, block_k=64, num_warps=8, num_stages=4)),
])
def test_project_conv_matches_two_launches_gpu(B, T, config, on_gpu):
    """Compiled, at Qwen3.5's shapes, decode (T = 1, the window shifted) and verify (T = 4, the
    tokens kept after it, read back after the program's barrier): the conv outputs within one
    bf16 ulp of the two launches' (the compiler may contract the conv's products into FMAs
    differently in the two kernels), the projection's outputs and the conv rows bit for bit
    (the same tiles and rounding)."""
    rng = np.random.default_rng(B * T)
    K, C = QWEN["K"], QWEN["C"]
    keep, L = ("window", 3) if T == 1 else ("all", 7)
    x = jnp.asarray(rng.standard_normal((B * T, K)), BF16)
    ws = tuple(jnp.asarray(rng.standard_normal((K, n)) * K ** -0.5, BF16) for n in QWEN["ws"])
    conv = jnp.asarray(rng.standard_normal((B + 8, L, C)), BF16)
    weight = jnp.asarray(rng.standard_normal((4, C)) * 0.5, BF16)
    slots = jnp.asarray(rng.permutation(B + 8)[:B], jnp.int32)
    outs, conv_out = jax.jit(kernels.project_conv,
                             static_argnames=("widths", "tokens", "keep", "config"))(
        x, ws, conv, weight, slots, widths=QWEN["widths"], tokens=T, keep=keep, config=config)
    qkvz, ba = kernels.project_group(x, ws, config=config)
    (q, k, v), ref_conv = kernels.conv_step(qkvz[:, :C].reshape(B, T, C), conv, weight, slots,
                                            widths=QWEN["widths"][:3], keep=keep)
    for out, ref in zip(outs[:3], (q, k, v)):
        ref = np.asarray(ref, np.float64).reshape(B * T, -1)
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2.0 ** -7,
                                   atol=2.0 ** -7 * np.abs(ref).max())
    for out, ref in zip(outs[3:], (qkvz[:, C:], ba[:, :32], ba[:, 32:])):
        np.testing.assert_array_equal(_bits(out), _bits(ref))
    np.testing.assert_array_equal(_bits(conv_out), _bits(ref_conv))
