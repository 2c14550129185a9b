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
from gdn_jax.kernels.attention import query_rows

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


@pytest.mark.parametrize("T, gate_splits", [(1, 1), (4, 2)])
@pytest.mark.parametrize("config", [AttentionConfig(16, 1, 4, 1), AttentionConfig(16, 3, 4, 1)],
                         ids=["one-split", "three-splits"])
def test_rows_combined_and_gated_in_one_launch(T, gate_splits, config):
    """decode_attention_rows(..., gate=) against XLA's combine of the same kernel's splits, then
    o * sigmoid(gate) as the module writes it (the gate's partials added in fp32 and rounded, o
    and the sigmoid rounded, their product rounded): XLA may keep o and the sigmoid in fp32 inside
    its fusion (excess precision) where the kernel rounds each, so the two differ by up to those
    two roundings and the product's, 2**-8 relative each: |got - want| <= 2**-6 |want|. The
    padding row's output zeros."""
    _check_gated(T, gate_splits, config, B=4, nH=4, nKV=2, hd=32, L=75, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T, gate_splits, splits", [(1, 4, 8), (4, 1, 5)])
def test_rows_combined_and_gated_in_one_launch_gpu(T, gate_splits, splits, on_gpu):
    """As above, compiled, at Qwen3.5's heads (16 of 256, 2 KV heads), B = 8."""
    _check_gated(T, gate_splits, AttentionConfig(64, splits), B=8, nH=16, nKV=2, hd=256, L=680,
                 interpret=False)


def _check_gated(T, gate_splits, config, *, B, nH, nKV, hd, L, interpret):
    q, k, v, slots, pos = _case(7 + T, B=B, T=T, nH=nH, nKV=nKV, hd=hd, S=10, L=L)
    rng = np.random.default_rng(T)
    start, stride = hd, 2 * hd  # the gates interleaved with the queries, as Qwen3.5's q_proj
    parts = jnp.asarray(rng.standard_normal((gate_splits, B * T, nH * stride)), jnp.float32)
    qr, pr = query_rows(q, pos, nKV)
    got = kernels.decode_attention_rows(qr, pr, k, v, slots, parts, T=T, num_heads=nH,
                                        gate=(start, stride), config=config, interpret=interpret)
    o = kernels.decode_attention(q, k, v, slots, pos, config=config, interpret=interpret)
    gate = parts.sum(0).astype(BF16).reshape(B, T, nH, stride)[..., start:start + hd]
    want = np.asarray(o.reshape(B, T, nH * hd) * jax.nn.sigmoid(gate.reshape(B, T, nH * hd)),
                      np.float64)
    assert got.shape == (B, T, nH * hd) and got.dtype == BF16
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 2.0 ** -6 * np.abs(want)), f"max err {err.max():.3g}"
    assert np.all(np.asarray(got[1]) == 0) and np.abs(want).max() > 0.1  # padding row: zeros


def test_rows_refuse_a_gate_outside_its_columns():
    q, k, v, slots, pos = _case(1, B=4, T=1, nH=4, nKV=2, hd=32, S=6, L=75)
    qr, pr = query_rows(q, pos, 2)
    with pytest.raises(ValueError, match=r"gate_parts \[S, B \* T = 4, N\] holding 4 heads"):
        kernels.decode_attention_rows(qr, pr, k, v, slots, jnp.ones((1, 4, 200), jnp.float32),
                                      T=1, num_heads=4, gate=(32, 64), config=AttentionConfig(16),
                                      interpret=True)


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
    gated = (S((32, 2, 16, 256), BF16), S((32, 2, 16), jnp.int32), S((40, 680, 2, 256), BF16),
             S((40, 680, 2, 256), BF16), S((32,), jnp.int32), S((1, 32, 8192), jnp.float32))
    with cuda_lowering(kind):  # Qwen3.5's attention at B = 32 decode, the gated combine after
        text = kernels.decode_attention_rows.trace(
            *gated, T=1, num_heads=16, gate=(256, 512), config=AttentionConfig(64, 4)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 2 and "gdn_attention_combine_t1" in text


@pytest.mark.gpu
@pytest.mark.parametrize("T, L, splits", [(1, 680, 1), (4, 4096, 8), (1, 4096, 32)])
def test_attention_matches_float64_gpu(T, L, splits, on_gpu):
    q, k, v, slots, pos = _case(L + T, B=8, T=T, nH=16, nKV=2, hd=256, S=10, L=L)
    o = kernels.decode_attention(q, k, v, slots, pos, config=AttentionConfig(64, splits))
    _assert_close(o, *_reference(q, k, v, slots, pos))
