"""The decode / verify attention kernel (`kernels.decode_attention`) against float64 softmax
attention over each row's keys 0..pos.

The cache is random everywhere, past every row's positions too (stale keys and values a kernel
must not read), rows name slots in any order, one row is padding (its output must be zeros), and
max_len is not a multiple of the key block (the last block is read from max_len - block_l).
Tolerance (bf16 cache, q rounded to it): scores and the softmax in fp32 from exact products; the
probabilities are rounded to bf16 for the product with v (relative 2**-8 each), the output once:
|o - ref| <= 2**-7 * sum_s p_s |v_s| + 2**-8 |ref|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import AttentionConfig

BF16 = jnp.bfloat16
TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, B, T, nH, nKV, hd, S, L):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, nH, hd)), BF16)
    k = jnp.asarray(rng.standard_normal((S, L, nKV, hd)), BF16)
    v = jnp.asarray(rng.standard_normal((S, L, nKV, hd)), BF16)
    slots = rng.permutation(S)[:B]
    slots[1] = -1  # padding
    last = rng.integers(T - 1, L, B)  # each row's last position: ragged
    pos = last[:, None] - (T - 1) + np.arange(T)[None, :]
    return q, k, v, jnp.asarray(slots, jnp.int32), jnp.asarray(pos, jnp.int32)


def _reference(q, k, v, slots, pos):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    B, T, nH, hd = q.shape
    G = nH // k.shape[2]
    ref, scale = np.zeros(q.shape), np.zeros(q.shape)
    for b in range(B):
        s = int(slots[b])
        if s < 0:
            continue
        for t in range(T):
            n = int(pos[b, t]) + 1
            for h in range(nH):
                kk, vv = f(k[s, :n, h // G]), f(v[s, :n, h // G])
                sc = kk @ f(q[b, t, h]) * hd ** -0.5
                p = np.exp(sc - sc.max())
                p /= p.sum()
                ref[b, t, h], scale[b, t, h] = p @ vv, p @ np.abs(vv)
    return ref, scale


def _assert_close(o, ref, scale):
    err = np.abs(np.asarray(o, np.float64) - ref)
    bound = 2.0 ** -7 * scale + 2.0 ** -8 * np.abs(ref)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("config", [AttentionConfig(16, 1, 4, 1), AttentionConfig(32, 3, 2, 2)],
                         ids=["one-split", "three-splits"])
def test_attention_matches_float64_interpret(T, config):
    q, k, v, slots, pos = _case(T, B=4, T=T, nH=4, nKV=2, hd=32, S=6, L=75)
    o = kernels.decode_attention(q, k, v, slots, pos, config=config, interpret=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert np.all(np.asarray(o[1]) == 0)  # the padding row
    _assert_close(o, *_reference(q, k, v, slots, pos))


@pytest.mark.parametrize("change, match", [
    (dict(k=(6, 75, 2, 16)), r"q \[B, T, nH, hd\] and k_cache"),
    (dict(v=(6, 74, 2, 32)), r"v_cache expected k_cache's"),
    (dict(q=(4, 1, 3, 32)), r"q's 3 heads must be a multiple of the cache's 2 KV heads"),
    (dict(pos=(4, 2)), r"slots \[B\] = \[4\] and pos \[B, T\] = \[4, 1\]"),
    (dict(dtype=jnp.float32), r"k_cache expected one of"),
])
def test_attention_rejects_bad_input(change, match):
    dtype = change.get("dtype", BF16)
    q = jnp.ones(change.get("q", (4, 1, 4, 32)), dtype)
    k = jnp.ones(change.get("k", (6, 75, 2, 32)), dtype)
    v = jnp.ones(change.get("v", k.shape), dtype)
    with pytest.raises(ValueError, match=match):
        kernels.decode_attention(q, k, v, jnp.zeros((4,), jnp.int32),
                                 jnp.zeros(change.get("pos", (4, 1)), jnp.int32),
                                 config=AttentionConfig(16), interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_attention_lowers_for_cuda(kind, cuda_lowering):
    S = jax.ShapeDtypeStruct
    args = (S((32, 4, 16, 256), BF16), S((40, 680, 2, 256), BF16), S((40, 680, 2, 256), BF16),
            S((32,), jnp.int32), S((32, 4), jnp.int32))
    with cuda_lowering(kind):
        text = kernels.decode_attention.trace(*args, config=AttentionConfig(64, 4)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.gpu
@pytest.mark.parametrize("T, L, splits", [(1, 680, 1), (4, 4096, 8), (1, 4096, 32)])
def test_attention_matches_float64_gpu(T, L, splits, on_gpu):
    q, k, v, slots, pos = _case(L + T, B=8, T=T, nH=16, nKV=2, hd=256, S=10, L=L)
    o = kernels.decode_attention(q, k, v, slots, pos, config=AttentionConfig(64, splits))
    _assert_close(o, *_reference(q, k, v, slots, pos))
