"""`ModelCache` keeps the per-slot counters every decoder layer of a kind shares once (the GDN
layers' count, the attention layers' KV lengths): each layer computes the same values from its
whole cache (`ModelCache.layer`), and a compiled step updates each counter once, not once a layer.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.models import ModelConfig
from gdn_jax.models.qwen3_next import ModelCache
from gdn_jax.modules.cache import GDNCache, KVCache
from tiny_models import random_model

# 4 GDN and 2 attention layers, the last of each kind not the model's last layer
TYPES = ("linear_attention", "full_attention", "linear_attention", "linear_attention",
         "full_attention", "linear_attention")
CONFIG = ModelConfig(
    model_type="qwen3_5_text", vocab_size=64, hidden_size=32, num_hidden_layers=len(TYPES),
    layer_types=TYPES, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, intermediate_size=48, mtp_num_hidden_layers=1)
NUM_SLOTS, MAX_LEN, T_MAX = 5, 24, 3
SLOTS = jnp.asarray([3, 0, -1, 4], jnp.int32)  # row 2 is padding; slots 1 and 2 untouched


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=0)


def test_init_cache_holds_each_counter_once(model):
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX)
    for c in (cache.count, cache.lengths):
        assert c.shape == (NUM_SLOTS,) and c.dtype == jnp.int32
    for i, c in enumerate(cache.layers):
        assert (c.state.count if isinstance(c, GDNCache) else c.lengths) is None, i
        whole = cache.layer(i)
        assert (whole.state.count if isinstance(c, GDNCache) else whole.lengths) is (
            cache.count if isinstance(c, GDNCache) else cache.lengths)
    assert all(c.lengths.shape == (NUM_SLOTS,) for c in cache.mtp)  # the MTP head keeps its own
    leaves = [x for x in jax.tree.leaves(cache) if x.shape == (NUM_SLOTS,)]
    assert len(leaves) == 2 + len(cache.mtp)


def test_of_takes_the_last_layers_counters():
    gdn = [GDNCache.create(NUM_SLOTS, 2, 4, 16, 16, 4, t_max=T_MAX) for _ in range(2)]
    kv = [KVCache.create(NUM_SLOTS, MAX_LEN, 2, 16) for _ in range(2)]
    gdn[1] = gdn[1].replace(state=gdn[1].state.replace(count=jnp.full((NUM_SLOTS,), 2)))
    kv[1] = kv[1].replace(lengths=jnp.full((NUM_SLOTS,), 7))
    cache = ModelCache.of([gdn[0], kv[0], gdn[1], kv[1]])
    np.testing.assert_array_equal(cache.count, 2)
    np.testing.assert_array_equal(cache.lengths, 7)
    assert ModelCache.of([kv[0]]).count is None and ModelCache.of([gdn[0]]).lengths is None
    # built of whole caches without `of`: each layer keeps its own
    whole = ModelCache(layers=(gdn[1], kv[1]))
    assert whole.layer(0) is gdn[1] and whole.layer(1) is kv[1]
    ring = GDNCache.create(NUM_SLOTS, 2, 4, 16, 16, 4, t_max=T_MAX, commit_mode="ring")
    with pytest.raises(ValueError, match=r"ModelCache.of: the GDN layers' \(commit mode, t_max\) "
                                         r"differ: \[\('replay', 3\), \('ring', 3\)\]"):
        ModelCache.of([gdn[0], ring])


@pytest.mark.parametrize("commit_mode", ["replay", "ring", "intermediate"])
def test_every_layer_computes_the_shared_counters(model, commit_mode):
    """Each layer run on its whole cache (`layer(i)`) gives the counter the model keeps once,
    through prefill, verify, commit, decode and reset: the values one copy stands for."""
    rng = np.random.default_rng(1)
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX, state_dtype=jnp.float32,
                             commit_mode=commit_mode)
    B = SLOTS.shape[0]
    x = jnp.asarray(rng.standard_normal((B, T_MAX, CONFIG.hidden_size)), jnp.float32)
    steps = [("prefill", dict(lengths=jnp.asarray([3, 1, 2, 2], jnp.int32))),
             ("verify", {}), ("commit", jnp.asarray([2, 0, 3, 3], jnp.int32)),
             ("verify", {}), ("commit", jnp.asarray([1, 3, 1, 2], jnp.int32)),
             ("decode", {}), ("reset", jnp.asarray([0, -1, 9, 1], jnp.int32)), ("decode", {})]
    nonzero = {"count": False, "lengths": False}
    for mode, arg in steps:
        per_layer = {"count": [], "lengths": []}
        if mode in ("prefill", "verify", "decode"):
            xs = x[:, :1] if mode == "decode" else x
            new = []
            for i, layer in enumerate(model.layers):
                _, _, c = layer.forward(xs, None, cache.layer(i), SLOTS, mode=mode, **arg)
                new.append(c)
            out = model(jnp.zeros(xs.shape[:2], jnp.int32), cache, SLOTS, mode=mode, **arg)
            cache = out.cache
        elif mode == "commit":
            new = [layer.commit(cache.layer(i), SLOTS, arg) for i, layer in enumerate(model.layers)]
            cache = model.commit(cache, SLOTS, arg)
        else:
            new = [layer.reset(cache.layer(i), arg) for i, layer in enumerate(model.layers)]
            cache = model.reset(cache, arg)
        for c in new:
            if isinstance(c, GDNCache):
                per_layer["count"].append(np.asarray(c.state.count))
            else:
                per_layer["lengths"].append(np.asarray(c.lengths))
        for name, values in per_layer.items():
            for v in values:
                np.testing.assert_array_equal(v, getattr(cache, name), err_msg=f"{mode} {name}")
            nonzero[name] |= bool(np.any(getattr(cache, name)))
    # the walk moved both counters (a test of zeros against zeros cannot fail)
    assert nonzero["lengths"] and (nonzero["count"] or commit_mode == "intermediate"), nonzero


def test_commit_moves_the_conv_windows_in_one_launch(model, monkeypatch):
    """`model.commit` moves every GDN layer's conv window (rows n..n+W-2 to 0..W-2) in one
    kernel launch (interpreted here), where each layer's own `commit` takes one: the same
    buffers, bit for bit, and the window each row's count names."""
    monkeypatch.setenv("GDN_JAX_SCATTER", "interpret")
    jax.clear_caches()
    launches = []
    group = kernels.shift_rows_group
    monkeypatch.setattr(kernels, "shift_rows_group", lambda tables, *a, **kw: launches.append(
        len(tables)) or group(tables, *a, **kw))
    rng = np.random.default_rng(2)
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX)
    layers = [c.replace(conv=jnp.asarray(rng.standard_normal(c.conv.shape), c.conv.dtype))
              if isinstance(c, GDNCache) else c for c in (cache.layer(i) for i in range(6))]
    cache = cache.with_layers(layers)
    n = jnp.asarray([2, 0, 3, 3], jnp.int32)
    got = model.commit(cache, SLOTS, n)
    gdn = [i for i, t in enumerate(TYPES) if t == "linear_attention"]
    assert launches == [len(gdn)]
    W1 = cache.layer(gdn[0]).conv.shape[1] - T_MAX  # W - 1
    for i in gdn:
        want = model.layers[i].commit(cache.layer(i), SLOTS, n).conv
        np.testing.assert_array_equal(np.asarray(got.layer(i).conv), np.asarray(want))
        old, new = np.asarray(cache.layer(i).conv), np.asarray(want)
        for row, slot in enumerate(np.asarray(SLOTS)):
            if 0 <= slot < NUM_SLOTS:
                k = int(n[row])
                np.testing.assert_array_equal(new[slot, :W1], old[slot, k:k + W1])
                np.testing.assert_array_equal(new[slot, W1:], old[slot, W1:])
        np.testing.assert_array_equal(new[[1, 2]], old[[1, 2]])  # slots no row names
    assert launches == [len(gdn)] + [1] * len(gdn)


@pytest.mark.gpu
def test_commit_kernel_equals_xla_gpu(model, monkeypatch):
    """`model.commit` compiled on the GPU: the conv windows moved by the kernel (GDN_JAX_SCATTER
    auto) equal XLA's gather and writes (=xla), bit for bit; the states alike."""
    rng = np.random.default_rng(3)
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX)
    cache = cache.with_layers(
        [c.replace(conv=jnp.asarray(rng.standard_normal(c.conv.shape), c.conv.dtype))
         if isinstance(c, GDNCache) else c for c in (cache.layer(i) for i in range(6))])
    n = jnp.asarray([2, 0, 3, 3], jnp.int32)
    outs = {}
    for path in ("auto", "xla"):
        monkeypatch.setenv("GDN_JAX_SCATTER", path)
        jax.clear_caches()
        outs[path] = jax.jit(model.commit)(cache, SLOTS, n)
    for a, b in zip(jax.tree.leaves(outs["auto"]), jax.tree.leaves(outs["xla"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _scatters(hlo: str, n: int) -> int:
    """Scatter instructions whose result is an int32 [n] array (a counter's update)."""
    return len(re.findall(r"= s32\[%d\]\{0\} scatter\(" % n, hlo))


@pytest.mark.parametrize("mode", ["decode", "verify"])
def test_a_step_updates_each_counter_once(model, mode):
    """The compiled step (XLA's path on CPU, slots a runtime argument) writes the GDN count with
    one scatter and, in decode, the KV lengths with one: not one a layer (6 layers here)."""
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX)
    T = 1 if mode == "decode" else T_MAX

    def step(cache, slots):
        return model(jnp.zeros((SLOTS.shape[0], T), jnp.int32), cache, slots, mode=mode).cache

    hlo = jax.jit(step, donate_argnums=0).lower(cache, SLOTS).compile().as_text()
    assert _scatters(hlo, NUM_SLOTS) == (2 if mode == "decode" else 1), _scatters(hlo, NUM_SLOTS)
