"""The grouped MoE kernel (`kernels.grouped_matmul`) and its block plan (`kernels.moe.plan`).

The plan is checked exactly: every (token, expert) pair lands in one row of a block of its own
expert, padding rows point nowhere, blocks past the used ones are -1. The kernel is checked per
block against the float64 product of the block's rows and its expert's weight; rows are random
(never zeros), and unused blocks must come back as zeros, so a block or column block the kernel
skips fails. Tolerance: the products of bf16 / fp16 inputs are exact in the fp32 accumulator, so
the result is the float64 value rounded once (eps of the dtype, relative) up to the fp32 sums
(K * 2**-23 * sum |x w|); the gated form rounds silu(x w_gate) * (x w_up) once as well, from fp32
values: 2 eps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import MoEConfig
from gdn_jax.kernels import moe

EPS = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11}
TRITON_CALL = "__gpu$xla.gpu.triton"


def _ids(rng, T, k, E):
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    if T > 1:
        ids[1] = ids[0]  # two tokens on the same experts
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("T, k, E, block_m", [(1, 10, 64, 16), (7, 3, 8, 16), (40, 4, 8, 16),
                                               (33, 2, 4, 64)])
def test_plan_places_every_pair_once(T, k, E, block_m):
    ids = _ids(np.random.default_rng(T), T, k, E)
    b = moe.plan(ids, E, block_m)
    G = moe.num_blocks(T * k, E, block_m)
    assert b.block_expert.shape == (G,) and b.row_token.shape == b.row_pair.shape == (G * block_m,)
    pair, token, expert = (np.asarray(a) for a in (b.row_pair, b.row_token, b.block_expert))
    real = pair < T * k
    assert np.all(pair[~real] == T * k)                          # padding: out of range
    assert sorted(pair[real]) == list(range(T * k))              # each pair exactly once
    assert np.all(token[real] == pair[real] // k) and np.all(token[~real] == T)
    row_expert = np.repeat(expert, block_m)
    assert np.all(row_expert[real] == np.asarray(ids).reshape(-1)[pair[real]])
    used = int((expert >= 0).sum())
    assert np.all(expert[:used] >= 0) and np.all(expert[used:] == -1)
    assert used == sum(-(-int(n) // block_m) for n in np.bincount(np.asarray(ids).ravel(),
                                                                   minlength=E))


@pytest.mark.parametrize("T, k, block_m", [(1, 8, 16), (5, 3, 16), (2, 2, 32)])
def test_plan_pairs_gives_each_pair_a_block(T, k, block_m):
    ids = _ids(np.random.default_rng(T), T, k, 64)
    b = moe.plan_pairs(ids, block_m)
    assert isinstance(b, moe.PairBlocks)
    P = T * k
    pair, token, expert = (np.asarray(a) for a in (b.row_pair, b.row_token, b.block_expert))
    assert expert.shape == (P,) and pair.shape == token.shape == (P * block_m,)
    lead = np.arange(P * block_m) % block_m == 0
    assert np.all(pair[lead] == np.arange(P)) and np.all(pair[~lead] == P)
    assert np.all(token[lead] == np.arange(P) // k) and np.all(token[~lead] == T)
    assert np.all(expert == np.asarray(ids).reshape(-1))


@pytest.mark.parametrize("T, k, block_m", [(1, 8, 16), (5, 3, 16), (2, 2, 32)])
def test_pair_blocks_combine_equals_scatter(T, k, block_m):
    """`PairBlocks.combine`'s scatter-free sum gives `Blocks.combine`'s result; the padding rows,
    poisoned with NaN, are never read."""
    rng = np.random.default_rng(10 + T)
    b = moe.plan_pairs(_ids(rng, T, k, 64), block_m)
    N = 48
    y = rng.standard_normal((T * k * block_m, N)).astype(np.float32)
    y[np.arange(T * k * block_m) % block_m != 0] = np.nan
    weights = jnp.asarray(rng.random((T, k)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        yd = jnp.asarray(y, dtype)
        want = np.asarray(moe.Blocks.combine(b, yd, weights, T), np.float32)
        got = np.asarray(b.combine(yd, weights, T), np.float32)
        assert got.dtype == want.dtype and not np.isnan(want).any()
        # fp32 sums of k products in another order: a few ulps; bf16: one rounding of the same sum
        tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _blocks_case(seed, G, block_m, E, K, N, dtype, used):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((G * block_m, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, dtype)
    w2 = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, dtype)
    expert = np.where(np.arange(G) < used, rng.integers(0, E, G), -1)
    return x, w, w2, jnp.asarray(expert, jnp.int32)


def _reference(x, w, w2, expert, block_m):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    out, scale = [], []
    for g, e in enumerate(np.asarray(expert)):
        rows = f(x[g * block_m:(g + 1) * block_m])
        if e < 0:
            out.append(np.zeros((block_m, w.shape[2])))
            scale.append(np.zeros((block_m, w.shape[2])))
            continue
        a = rows @ f(w[e])
        if w2 is None:
            out.append(a)
            scale.append(np.abs(rows) @ np.abs(f(w[e])))
        else:
            b = rows @ f(w2[e])
            out.append(a / (1 + np.exp(-a)) * b)
            scale.append((np.abs(rows) @ np.abs(f(w[e]))) * (np.abs(rows) @ np.abs(f(w2[e]))))
    return np.concatenate(out), np.concatenate(scale)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [MoEConfig(16, 16, 16, 4, 1), MoEConfig(32, 32, 64, 2, 2)],
                         ids=["bm16", "bm32"])
def test_grouped_matmul_matches_float64_interpret(gated, dtype, config):
    G, E, K, N = 5, 4, 128, 64
    x, w, w2, expert = _blocks_case(G + config.block_m, G, config.block_m, E, K, N, dtype, used=4)
    y = kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, config=config,
                               interpret=True)
    ref, scale = _reference(x, w, w2 if gated else None, expert, config.block_m)
    err = np.abs(np.asarray(y, np.float64) - ref)
    bound = (2 if gated else 1) * EPS[dtype] * np.abs(ref) + K * 2.0 ** -23 * scale * (
        3 if gated else 1)
    assert y.shape == ref.shape and y.dtype == jnp.dtype(dtype)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    assert np.all(np.asarray(y[4 * config.block_m:]) == 0)  # the unused block: zeros


def test_no_pairs_launch_nothing():
    b = moe.plan(jnp.zeros((0, 2), jnp.int32), 8, 16)
    assert b.block_expert.shape == (0,)
    y = kernels.grouped_matmul(jnp.zeros((0, 64), jnp.bfloat16), jnp.ones((8, 64, 32), jnp.bfloat16),
                               b.block_expert, config=MoEConfig(16, 32, 32), interpret=True)
    assert y.shape == (0, 32)
    assert b.combine(y, jnp.zeros((0, 2)), 0).shape == (0, 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=(32, 64), w=(4, 32, 64)), r"x \[rows, K\] and w \[E, K, N\]"),
    (dict(x=(32, 64), w=(4, 64, 64), w_up=(4, 64, 32)), r"w_up expected w's shape"),
    (dict(x=(32, 64), w=(4, 64, 64), dtype=jnp.float32), r"x expected one of"),
    (dict(x=(48, 64), w=(4, 64, 64)), r"block_expert expected int32 \[rows / block_m\] = \[3\]"),
    (dict(x=(32, 64), w=(4, 64, 48)), r"block_n=16 does not divide N=48|block_n=32"),
])
def test_grouped_matmul_rejects_bad_input(kwargs, match):
    dtype = kwargs.get("dtype", jnp.bfloat16)
    x, w = jnp.ones(kwargs["x"], dtype), jnp.ones(kwargs["w"], dtype)
    w_up = jnp.ones(kwargs["w_up"], dtype) if "w_up" in kwargs else None
    with pytest.raises(ValueError, match=match):
        kernels.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32), w_up=w_up,
                               config=MoEConfig(16, 32, 32), interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("gated", [False, True], ids=["down", "gate_up"])
def test_grouped_matmul_lowers_for_cuda(kind, gated, cuda_lowering):
    S = jax.ShapeDtypeStruct
    x, w = S((20 * 16, 2048), jnp.bfloat16), S((64, 2048, 512), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.grouped_matmul.trace(
            x, w, S((20,), jnp.int32), w_up=w if gated else None,
            config=MoEConfig(16, 64, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["down", "gate_up"])
@pytest.mark.parametrize("G, used", [(10, 10), (60, 37)])
def test_grouped_matmul_matches_float64_gpu(gated, G, used, on_gpu):
    E, K, N = 64, (2048 if gated else 512), (512 if gated else 2048)
    config = MoEConfig(16, 64, 128)
    x, w, w2, expert = _blocks_case(G, G, 16, E, K, N, jnp.bfloat16, used)
    y = kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, config=config)
    ref, scale = _reference(x, w, w2 if gated else None, expert, 16)
    err = np.abs(np.asarray(y, np.float64) - ref)
    bound = (2 if gated else 1) * EPS[jnp.bfloat16] * np.abs(ref) + K * 2.0 ** -23 * scale * 3
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
