"""Norms, RoPE, the MoE block and gated attention against NumPy transcriptions of their formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.modules import (
    Attention,
    GatedRMSNorm,
    KVCache,
    RMSNorm,
    SparseMoE,
    apply_rope,
    rope_cos_sin,
)

RNG = np.random.default_rng(0)


def _np(x):
    return np.asarray(x, np.float64)


def _silu(x):
    return x / (1 + np.exp(-x))


def _rms(x, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _randomize(module, seed=0):
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype) for x in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))
    return module


def test_norms():
    x, z = RNG.standard_normal((3, 16)), RNG.standard_normal((3, 16))
    n = _randomize(RMSNorm(16))
    w = _np(n.weight.get_value())
    np.testing.assert_allclose(n(jnp.asarray(x, jnp.float32)), _rms(x) * (1 + w), rtol=1e-5)
    g = _randomize(GatedRMSNorm(16))
    w = _np(g.weight.get_value())
    got = g(jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, w * _rms(x) * _silu(z), rtol=1e-5, atol=1e-6)


def test_partial_neox_rope():
    x = RNG.standard_normal((1, 3, 2, 16))
    pos = jnp.array([[0, 5, 9]])
    cos, sin = rope_cos_sin(pos, 8, 100.0)
    got = apply_rope(jnp.asarray(x, jnp.float32), cos, sin)
    inv = 100.0 ** -(np.arange(0, 8, 2) / 8)
    ang = np.array([0, 5, 9])[:, None] * inv  # [T, 4]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :4], x[..., 4:8]
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 8:]], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E, batch, gathered", [(5, (2, 7), False), (64, (1, 3), True)],
                         ids=["grouped", "gathered"])
@pytest.mark.slow
def test_sparse_moe_matches_dense_transcription(E, batch, gathered):
    """Both ways of running the experts: grouped matmuls (many tokens) and gathered weights (few
    tokens per expert: decode)."""
    from gdn_jax.modules import mlp
    k, H, I, S = 2, 12, 8, 6
    assert mlp._gather_experts(int(np.prod(batch)), k, E) == gathered
    moe = _randomize(SparseMoE(H, E, k, I, S, rngs=nnx.Rngs(0)))
    x = RNG.standard_normal((*batch, H))
    got = moe(jnp.asarray(x, jnp.float32))
    p = {n: _np(v.get_value()) for n, v in [
        ("router", moe.gate.kernel), ("g", moe.experts_gate_proj), ("u", moe.experts_up_proj),
        ("d", moe.experts_down_proj), ("sg", moe.shared_expert.gate_proj.kernel),
        ("su", moe.shared_expert.up_proj.kernel), ("sd", moe.shared_expert.down_proj.kernel),
        ("sgate", moe.shared_expert_gate.kernel)]}
    xf = x.reshape(-1, H)
    logits = xf @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(xf)
    for t in range(xf.shape[0]):
        top = np.argsort(-probs[t])[:k]
        w = probs[t, top] / probs[t, top].sum()
        for e, we in zip(top, w):
            want[t] += we * ((_silu(xf[t] @ p["g"][e]) * (xf[t] @ p["u"][e])) @ p["d"][e])
    shared = (_silu(xf @ p["sg"]) * (xf @ p["su"])) @ p["sd"]
    want += 1 / (1 + np.exp(-(xf @ p["sgate"]))) * shared
    np.testing.assert_allclose(got.reshape(-1, H), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gated_attention_with_cache():
    H, nH, nKV, hd = 16, 4, 2, 16
    attn = _randomize(Attention(H, nH, nKV, hd, rotary_dim=8, rope_theta=100.0,
                                rngs=nnx.Rngs(0)))
    x = RNG.standard_normal((1, 6, H))
    cache = KVCache.create(2, 8, nKV, hd, dtype=jnp.float32)
    slots = jnp.array([1])
    y1, cache = attn(jnp.asarray(x[:, :4], jnp.float32), cache, slots)
    y2, cache = attn(jnp.asarray(x[:, 4:], jnp.float32), cache, slots)
    assert np.asarray(cache.lengths).tolist() == [0, 6]
    # transcription over the whole sequence
    w = lambda m: _np(m.kernel.get_value())
    qg = (x[0] @ w(attn.q_proj)).reshape(6, nH, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(6, nH * hd)
    q = _rms(q) * (1 + _np(attn.q_norm.weight.get_value()))
    k = _rms((x[0] @ w(attn.k_proj)).reshape(6, nKV, hd)) * (
        1 + _np(attn.k_norm.weight.get_value()))
    v = (x[0] @ w(attn.v_proj)).reshape(6, nKV, hd)
    cos, sin = (np.asarray(a[0], np.float64)[:, None] for a in rope_cos_sin(
        jnp.arange(6)[None], 8, 100.0))
    rot = lambda a: np.concatenate([a[..., :8] * cos + np.concatenate(
        [-a[..., 4:8], a[..., :4]], -1) * sin, a[..., 8:]], -1)
    q, k = rot(q), rot(k)
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    s = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", pr, vv).reshape(6, nH * hd) / (1 + np.exp(-gate))
    want = o @ w(attn.o_proj)
    np.testing.assert_allclose(np.concatenate([y1[0], y2[0]]), want, rtol=1e-4, atol=1e-5)
