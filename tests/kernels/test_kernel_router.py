"""The MoE router kernel (`kernels.route`): softmax, top k and renormalisation in one launch.

Against XLA's steps (jax.nn.softmax in fp32, lax.top_k, the division, one rounding): the ids
exactly, ties included (equal logits go to the lower index first), and the weights against the
float64 value: the fp32 sums (E terms, then k) add a few 2**-24 relative, then one rounding to
the dtype: eps of the dtype (2**-7 bf16, 2**-10 fp16) or 2**-20 for fp32, relative. Logits are
random normals (never zeros) with ties planted at the top of some rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gdn_jax import kernels

EPS = {jnp.bfloat16: 2.0 ** -7, jnp.float16: 2.0 ** -10, jnp.float32: 2.0 ** -20}
TRITON_CALL = "__gpu$xla.gpu.triton"


def _xla(logits, k, normalize):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, i = lax.top_k(probs, k)
    if normalize:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w.astype(logits.dtype), i.astype(jnp.int32)


def _logits(seed, T, E, dtype):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, E)) * 2
    if T > 1:
        top = np.argmax(logits[1])
        logits[1, (top + 3) % E] = logits[1, top]  # a tie at the very top
    if T > 2:
        logits[2, : E // 2] = logits[2, E // 2:]  # every value twice
    return jnp.asarray(logits, dtype)


def _float64(logits, ids, normalize):
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = np.take_along_axis(p, np.asarray(ids), 1)
    return w / w.sum(1, keepdims=True) if normalize else w


@pytest.mark.parametrize("E, k", [(8, 2), (64, 10), (256, 8), (512, 10), (16, 1)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_route_matches_xla_interpret(E, k, dtype, normalize):
    logits = _logits(E + k, 5, E, dtype)
    w, ids = kernels.route(logits, k=k, normalize=normalize, interpret=True)
    w_ref, ids_ref = _xla(logits, k, normalize)
    assert w.shape == ids.shape == (5, k) and w.dtype == dtype and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    exact = _float64(logits, ids_ref, normalize)
    got = np.asarray(w, np.float64)
    assert np.all(np.abs(got - exact) <= EPS[dtype] * exact), np.max(np.abs(got - exact) / exact)


@pytest.mark.parametrize("E, k, H", [(64, 8, 128), (16, 10, 64), (8, 7, 32)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_route_appends_a_shared_gate_interpret(E, k, H, dtype, normalize):
    """shared_gate=(x, w): the routed columns exactly as without it, then sigmoid(x_t . w)
    against float64: one rounding to the dtype (EPS relative) plus the fp32 sum of H products,
    H * 2**-24 of their magnitudes' sum, through the sigmoid's slope (<= 1/4). k = 7, 8, 10 put
    the column inside the output block, at its last place and past a power of two."""
    rng = np.random.default_rng(E + k + H)
    logits = _logits(k, 6, E, dtype)
    x = jnp.asarray(rng.standard_normal((6, H)), dtype)
    w = jnp.asarray(rng.standard_normal((H, 1)) * H ** -0.5, dtype)
    got_w, got_ids = kernels.route(logits, k=k, normalize=normalize, shared_gate=(x, w),
                                   interpret=True)
    plain_w, plain_ids = kernels.route(logits, k=k, normalize=normalize, interpret=True)
    assert got_w.shape == (6, k + 1) and got_ids.shape == (6, k) and got_w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(plain_ids))
    np.testing.assert_array_equal(np.asarray(got_w[:, :k]), np.asarray(plain_w))
    prod = np.asarray(x, np.float64) * np.asarray(w, np.float64)[:, 0]
    exact = 1 / (1 + np.exp(-prod.sum(1)))
    err = np.abs(np.asarray(got_w[:, k], np.float64) - exact)
    assert np.all(err <= EPS[dtype] * exact + H * 2.0 ** -24 * np.abs(prod).sum(1) / 4), err
    flat, _ = kernels.route(logits, k=k, normalize=normalize, shared_gate=(x, w[:, 0]),
                            interpret=True)  # w [H]
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(got_w))


@pytest.mark.parametrize("gate, match", [
    ((jnp.ones((4, 64)),), r"shared_gate expected \(x \[T, H\], w \[H\]\)"),
    ((jnp.ones((3, 64)), jnp.ones((64,))), r"x \[T, H\] with T = 4 and w \[H\] or \[H, 1\], "
                                           r"got x\[3, 64\] and w\[64\]"),
    ((jnp.ones((4, 64)), jnp.ones((64, 2))), r"got x\[4, 64\] and w\[64, 2\]"),
    ((jnp.ones((4, 64)), jnp.ones((64,), jnp.bfloat16)), r"one float dtype, got float32 and "
                                                         r"bfloat16"),
    ((jnp.ones((4, 48)), jnp.ones((48,))), r"the shared gate's H=48 is not a power of two"),
])
def test_route_rejects_a_bad_shared_gate(gate, match):
    with pytest.raises(ValueError, match=match):
        kernels.route(jnp.ones((4, 8), jnp.float32), k=2, shared_gate=gate, interpret=True)


@pytest.mark.parametrize("S, col, N", [(1, 0, 64), (3, 32, 128), (8, 0, 64)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gate"])
def test_route_adds_a_projections_partial_sums_interpret(S, col, N, gated):
    """logits as [S, T, N] fp32 partial sums (the experts columns col..col + 63): the kernel adds
    them in order and rounds to parts_dtype as the projection would, then routes as it routes
    the rounded logits: bit for bit the same weights and ids (the same fp32 adds, in order)."""
    rng = np.random.default_rng(S + col)
    parts = jnp.asarray(rng.standard_normal((S, 5, N)), jnp.float32)
    total = parts[0]
    for s in range(1, S):
        total = total + parts[s]
    logits = total[:, col:col + 64].astype(jnp.bfloat16)
    gate = (jnp.asarray(rng.standard_normal((5, 32)), jnp.bfloat16),
            jnp.asarray(rng.standard_normal(32), jnp.bfloat16)) if gated else None
    w, ids = kernels.route(parts, k=8, shared_gate=gate, parts_dtype=jnp.bfloat16, col=col,
                           num_experts=64, interpret=True)
    w_ref, ids_ref = kernels.route(logits, k=8, shared_gate=gate, interpret=True)
    assert w.dtype == jnp.bfloat16 and w.shape == (5, 8 + gated)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w_ref))


def test_route_rejects_bad_partial_sums():
    parts = jnp.ones((2, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"col=32 and num_experts=64 expected columns inside "
                                         r"the partial sums' N = 64, got 32..95"):
        kernels.route(parts, k=2, col=32, num_experts=64, interpret=True)
    with pytest.raises(ValueError, match="parts_dtype expected a float dtype, got int32"):
        kernels.route(parts, k=2, parts_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match=r"parts_dtype, col and num_experts go with \[S, T, N\]"
                                         r" partial sums, got logits\[4, 64\]"):
        kernels.route(parts[0], k=2, parts_dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match=r"E=48 experts is not a power of two"):
        kernels.route(parts, k=2, num_experts=48, interpret=True)


def test_route_ties_go_to_the_lower_index():
    logits = jnp.zeros((2, 16), jnp.float32).at[1, 9].set(1.0)
    w, ids = kernels.route(logits, k=4, normalize=False, interpret=True)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 1, 2, 3], [9, 0, 1, 2]])
    np.testing.assert_allclose(np.asarray(w[0]), 1 / 16, rtol=1e-6)
    w, _ = kernels.route(logits, k=4, normalize=True, interpret=True)
    np.testing.assert_allclose(np.asarray(w[0]), 1 / 4, rtol=1e-6)


def test_route_underflow_ties_and_non_finite_rows():
    """Probabilities that underflow to 0 tie and go to the lower index (as top_k's); -inf
    logits are never taken twice; a NaN row still names k distinct experts in range."""
    inf = float("inf")
    logits = jnp.asarray([[0.0, -200.0, -300.0, -150.0, 1.0, -400.0, -250.0, -120.0],
                          [-inf, -inf, -inf, 2.0, -inf, 1.0, -inf, -inf],
                          [0.0, float("nan"), 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    _, ids = kernels.route(logits, k=4, normalize=False, interpret=True)
    _, ids_ref = _xla(logits[:2], 4, False)
    np.testing.assert_array_equal(np.asarray(ids[:2]), np.asarray(ids_ref))
    nan_row = np.asarray(ids[2])
    assert len(set(nan_row)) == 4 and nan_row.min() >= 0 and nan_row.max() < 8


def test_route_no_rows():
    w, ids = kernels.route(jnp.zeros((0, 8), jnp.bfloat16), k=2, interpret=True)
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("shape, k, match", [
    ((4, 6), 2, r"E=6 experts is not a power of two"),
    ((4, 8), 0, r"k=0 is outside 1..E=8"),
    ((4, 8), 9, r"k=9 is outside 1..E=8"),
    ((2, 2, 4, 8), 2, r"logits expected \[T, E\]"),
])
def test_route_rejects_bad_input(shape, k, match):
    with pytest.raises(ValueError, match=match):
        kernels.route(jnp.ones(shape, jnp.bfloat16), k=k, interpret=True)


def test_route_rejects_a_launch_it_does_not_take():
    with pytest.raises(ValueError, match=r"num_warps expected one of \(1, 2, 4, 8\), got 3"):
        kernels.route(jnp.ones((4, 8), jnp.bfloat16), k=2, interpret=True, num_warps=3)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_route_lowers_for_cuda(kind, cuda_lowering):
    S = jax.ShapeDtypeStruct
    with cuda_lowering(kind):
        text = kernels.route.trace(S((32, 256), jnp.bfloat16), k=8).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text
    with cuda_lowering(kind):
        text = kernels.route.trace(S((4, 512), jnp.bfloat16), k=10, shared_gate=(
            S((4, 2048), jnp.bfloat16), S((2048, 1), jnp.bfloat16))).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text
    with cuda_lowering(kind):  # a projection's partial sums, the experts from column 7
        text = kernels.route.trace(S((8, 1, 1024), jnp.float32), k=8, parts_dtype=jnp.bfloat16,
                                   col=7, num_experts=256, shared_gate=(
            S((1, 2048), jnp.bfloat16), S((2048,), jnp.bfloat16))).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("T, E, k", [(1, 256, 8), (128, 256, 8), (32, 512, 10)])
@pytest.mark.parametrize("num_warps", [1, 4])
def test_route_matches_xla_gpu(T, E, k, num_warps, on_gpu):
    """The 35B's router (256 experts, top 8) and Qwen3-Next's (512, top 10), compiled, at the
    default launch and one warp (bench_moe times each)."""
    logits = _logits(T, T, E, jnp.bfloat16)
    w, ids = kernels.route(logits, k=k, num_warps=num_warps)
    w_ref, ids_ref = _xla(logits, k, True)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    exact = _float64(logits, ids_ref, True)
    assert np.all(np.abs(np.asarray(w, np.float64) - exact) <= EPS[jnp.bfloat16] * exact)
    rng = np.random.default_rng(T)  # and the shared expert's gate (hidden 2048) appended
    x = jnp.asarray(rng.standard_normal((T, 2048)), jnp.bfloat16)
    gw = jnp.asarray(rng.standard_normal(2048) * 2048 ** -0.5, jnp.bfloat16)
    wg, ids_g = kernels.route(logits, k=k, num_warps=num_warps, shared_gate=(x, gw))
    np.testing.assert_array_equal(np.asarray(ids_g), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(wg[:, :k]), np.asarray(w))
    # a projection's partial sums (3 random fp32 parts, the experts from column 7): bit for bit
    # the routing of their in-order sum rounded to bf16
    parts = jnp.asarray(rng.standard_normal((3, T, E + 9)), jnp.float32)
    rounded = ((parts[0] + parts[1]) + parts[2])[:, 7:7 + E].astype(jnp.bfloat16)
    wp, ids_p = kernels.route(parts, k=k, num_warps=num_warps, parts_dtype=jnp.bfloat16, col=7,
                              num_experts=E, shared_gate=(x, gw))
    wr, ids_r = kernels.route(rounded, k=k, num_warps=num_warps, shared_gate=(x, gw))
    np.testing.assert_array_equal(np.asarray(ids_p), np.asarray(ids_r))
    np.testing.assert_array_equal(np.asarray(wp), np.asarray(wr))
    prod = np.asarray(x, np.float64) * np.asarray(gw, np.float64)
    exact = 1 / (1 + np.exp(-prod.sum(1)))
    bound = EPS[jnp.bfloat16] * exact + 2048 * 2.0 ** -24 * np.abs(prod).sum(1) / 4
    assert np.all(np.abs(np.asarray(wg[:, k], np.float64) - exact) <= bound)
