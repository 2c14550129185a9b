"""GatedDeltaNet layer: its modes agree with each other (no transformers needed).

- a ragged batched prefill equals each prompt alone;
- prefill in two pieces equals one prefill (the conv window and state carry over);
- verify + commit(n) leaves the same state and conv window as n decode steps, in both commit
  modes, for every n in 0..T (the conv rollback by count);
- padding rows (slot -1) write nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.modules import GatedDeltaNet, causal_conv

HIDDEN, T_MAX = 24, 4


@pytest.fixture(scope="module")
def layer():
    m = GatedDeltaNet(HIDDEN, 2, 4, 16, 16, 4, rngs=nnx.Rngs(0))
    # the default init has ones for the gated norm: randomise it too
    m.norm.weight.set_value(jax.random.normal(jax.random.key(1), (16,)) * 0.3 + 1.0)
    return m


def _x(seed, B, T):
    return jax.random.normal(jax.random.key(seed), (B, T, HIDDEN), jnp.float32)


def _cache(layer, mode="replay"):
    return layer.init_cache(3, t_max=T_MAX, state_dtype=jnp.float32, commit_mode=mode)


def _slot(cache, s):
    return (np.asarray(cache.state.pool[s]), np.asarray(cache.conv[s, :3]))


def test_causal_conv_matches_numpy():
    rng = np.random.default_rng(0)
    xp, w = rng.standard_normal((2, 3 + 5, 6)), rng.standard_normal((4, 6))
    want = np.stack([sum(xp[:, t + j] * w[j] for j in range(4)) for t in range(5)], 1)
    want = want / (1 + np.exp(-want))
    np.testing.assert_allclose(causal_conv(jnp.asarray(xp, jnp.float32),
                                           jnp.asarray(w, jnp.float32)), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_ragged_prefill_equals_single_prompts(layer):
    x = _x(0, 2, 7)
    y, cache = layer(x, _cache(layer), jnp.array([2, 0]), lengths=jnp.array([7, 4]))
    for i, (slot, n) in enumerate(((2, 7), (0, 4))):
        y1, c1 = layer(x[i:i + 1, :n], _cache(layer), jnp.array([slot]))
        np.testing.assert_allclose(y[i, :n], y1[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(_slot(cache, slot), _slot(c1, slot)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(cache.state.pool[1])) and not np.any(np.asarray(cache.conv[1]))


@pytest.mark.slow
def test_prefill_in_two_pieces(layer):
    x = _x(1, 1, 9)
    y, c = layer(x, _cache(layer), jnp.array([1]))
    y1, c1 = layer(x[:, :2], _cache(layer), jnp.array([1]))  # shorter than the conv window
    y2, c1 = layer(x[:, 2:], c1, jnp.array([1]))
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(_slot(c, 1), _slot(c1, 1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["replay", "intermediate"])
@pytest.mark.slow
def test_verify_commit_equals_decode_steps(layer, mode):
    x, draft = _x(2, 2, 5), _x(3, 2, 3)
    slots = jnp.array([0, 2])
    _, base = layer(x, _cache(layer, mode), slots)
    y_ver, ver = layer(draft, base, slots, mode="verify")
    for n in range(4):
        counts = jnp.array([n, 3 - n])
        committed = GatedDeltaNet.commit(ver, slots, counts)
        # flush pending replay candidates by a zero-length prefill, then compare the pools
        _, committed = layer(draft[:, :1], committed, slots, lengths=jnp.array([0, 0]))
        for i, s in enumerate((0, 2)):
            k = int(counts[i])
            c = base
            for t in range(k):
                y_dec, c = layer(draft[:, t:t + 1], c, slots, mode="decode")
                np.testing.assert_allclose(y_dec[i, 0], y_ver[i, t], rtol=1e-5, atol=1e-6)
            for a, b in zip(_slot(committed, s), _slot(c, s)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padding_rows_write_nothing(layer):
    _, cache = layer(_x(4, 2, 3), _cache(layer), jnp.array([0, 1]))
    before = jax.tree.map(np.asarray, cache)
    _, after = layer(_x(5, 2, 1), cache, jnp.array([-1, 3]), mode="decode")
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_mode_errors(layer):
    with pytest.raises(ValueError, match="decode takes one token"):
        layer(_x(0, 1, 2), _cache(layer), jnp.array([0]), mode="decode")
    with pytest.raises(ValueError, match="verify takes 1..T_max = 4"):
        layer(_x(0, 1, 5), _cache(layer), jnp.array([0]), mode="verify")
    with pytest.raises(ValueError, match="mode expected one of"):
        layer(_x(0, 1, 1), _cache(layer), jnp.array([0]), mode="generate")


def _each_path(monkeypatch, var, run):
    """run() with the environment variable var = "xla", then = "interpret" (programs retraced):
    {path: run()'s result as numpy}."""
    out = {}
    for path in ("xla", "interpret"):
        monkeypatch.setenv(var, path)
        jax.clear_caches()
        out[path] = jax.tree.map(np.asarray, run())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replay", "intermediate", "ring"])
def test_row_kernel_writes_what_xla_writes(layer, mode, monkeypatch):
    """The caches' writes through the row kernel (`gdn_jax.ops.scatter`, interpreted) leave every
    buffer bit-identical to XLA's scatter over prefill, verify, commit and decode with padding."""
    from gdn_jax.ops import scatter as scatter_ops

    def run():
        slots = jnp.array([2, -1, 0])
        _, c = layer(_x(6, 3, 5), _cache(layer, mode), slots, lengths=jnp.array([5, 2, 3]))
        _, c = layer(_x(7, 3, 3), c, slots, mode="verify")
        c = GatedDeltaNet.commit(c, slots, jnp.array([2, 3, 1]))
        return layer(_x(8, 3, 1), c, slots, mode="decode")[1]

    caches = _each_path(monkeypatch, scatter_ops.ENV_VAR, run)
    for a, b in zip(jax.tree.leaves(caches["xla"]), jax.tree.leaves(caches["interpret"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["replay", "intermediate", "ring"])
def test_conv_kernel_steps_as_xla(layer, mode, monkeypatch):
    """Decode and verify steps' conv through `kernels.conv_step` (`gdn_jax.ops.conv`,
    interpreted), with a commit between: the same conv rows bit for bit, the same layer outputs
    and state to the fp32 summation order of the conv (2**-16 of their scale: a few fp32 ulps
    carried through the layer), padding row included."""
    from gdn_jax import kernels
    from gdn_jax.ops import conv as conv_ops

    calls, real = [], kernels.conv_step
    monkeypatch.setattr(kernels, "conv_step", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        slots = jnp.array([2, -1, 0])
        _, c = layer(_x(6, 3, 5), _cache(layer, mode), slots, lengths=jnp.array([5, 2, 3]))
        y, c = layer(_x(8, 3, 1), c, slots, mode="decode")
        y2, c = layer(_x(9, 3, 3), c, slots, mode="verify")
        c = GatedDeltaNet.commit(c, slots, jnp.array([2, 3, 1]))
        y3, c = layer(_x(10, 3, 1), c, slots, mode="decode")
        return (y, y2, y3), c

    out = _each_path(monkeypatch, conv_ops.ENV_VAR, run)
    (ys_x, c_x), (ys_k, c_k) = out["xla"], out["interpret"]
    assert len(calls) == 3  # the interpreted path's decode, verify, decode; and only those
    np.testing.assert_array_equal(c_k.conv, c_x.conv)
    for a, b in zip((*ys_k, *jax.tree.leaves(c_k.state)), (*ys_x, *jax.tree.leaves(c_x.state))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=0, atol=2.0 ** -16 * max(1.0, np.abs(b).max()))


def test_conv_epilogue_steps_as_two_launches(monkeypatch):
    """GDN_JAX_CONV_EPILOGUE=on: each decode and verify step's in_proj and conv in one launch
    (`kernels.project_conv`, interpreted). Over prefill, decode,
    verify, commit and decode with a padding row, a bf16 layer (the kernel's dtypes; 16 value
    heads: b and a are column blocks of their own) leaves the same caches and outputs bit for
    bit as with it off: at this size both launches take K in one slice, so the projections
    round the same sums, and the conv adds the same fp32 terms in the same order."""
    from gdn_jax import kernels
    from gdn_jax.ops import conv as conv_ops

    bf16 = GatedDeltaNet(64, 2, 16, 16, 16, 4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(3))
    calls, real = [], kernels.project_conv
    monkeypatch.setattr(kernels, "project_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("GDN_JAX_BACKEND", "interpret")

    def x(seed, B, T):
        return jax.random.normal(jax.random.key(seed), (B, T, 64), jnp.bfloat16)

    def run():
        slots = jnp.array([2, -1, 0])
        c = bf16.init_cache(3, t_max=T_MAX)
        _, c = bf16(x(6, 3, 5), c, slots, lengths=jnp.array([5, 2, 3]))
        y, c = bf16(x(8, 3, 1), c, slots, mode="decode")
        y2, c = bf16(x(9, 3, 3), c, slots, mode="verify")
        c = GatedDeltaNet.commit(c, slots, jnp.array([2, 3, 1]))
        y3, c = bf16(x(10, 3, 1), c, slots, mode="decode")
        return (y, y2, y3), c

    out = {}
    for wish in ("off", "on"):
        monkeypatch.setenv(conv_ops.EPILOGUE_VAR, wish)
        jax.clear_caches()
        out[wish] = jax.tree.map(np.asarray, run())
        assert len(calls) == (0 if wish == "off" else 3)  # decode, verify, decode; when on
    for a, b in zip(jax.tree.leaves(out["on"]), jax.tree.leaves(out["off"])):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    monkeypatch.setenv(conv_ops.EPILOGUE_VAR, "sometimes")
    with pytest.raises(ValueError, match="GDN_JAX_CONV_EPILOGUE: expected one of"):
        bf16(x(8, 1, 1), bf16.init_cache(1, t_max=T_MAX), jnp.array([0]), mode="decode")


@pytest.mark.gpu
@pytest.mark.parametrize("B, T", [(1, 1), (32, 1), (1, 4), (32, 4)])
def test_conv_epilogue_keeps_the_layer_output_gpu(B, T, monkeypatch):
    """The same on the GPU, compiled, at Qwen3.5's shapes (hidden 2048, 16 key heads and 32 value
    heads of 128, W = 4), decode (T = 1) and verify (T = 4), after a prefill: the outputs, the
    conv rows and the state within 2**-5 of their scale (the unfused in_proj sums K in slices,
    the fused one in one: its bf16 outputs may differ by an ulp, carried through the layer)."""
    from gdn_jax.ops import conv as conv_ops

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {dev.platform!r} ({dev})")
    layer = GatedDeltaNet(2048, 16, 32, 128, 128, 4, dtype=jnp.bfloat16,
                          param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(B + T)
    x0 = jnp.asarray(rng.standard_normal((B, 6, 2048)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((B, T, 2048)), jnp.bfloat16)
    slots = jnp.asarray(rng.permutation(B + 2)[:B], jnp.int32)
    out = {}
    for wish in ("off", "on"):
        monkeypatch.setenv(conv_ops.EPILOGUE_VAR, wish)
        cache = layer.init_cache(B + 2, t_max=4)
        _, cache = layer(x0, cache, slots)
        y, cache = layer(x, cache, slots, mode="decode" if T == 1 else "verify")
        out[wish] = jax.tree.map(lambda a: np.asarray(a, np.float64), (y, cache.conv,
                                                                     cache.state.pool))
    for on, off in zip(out["on"], out["off"]):
        assert np.all(np.isfinite(on))
        np.testing.assert_allclose(on, off, rtol=0, atol=2 ** -5 * max(1.0, np.abs(off).max()))


@pytest.mark.parametrize("scatter", ["xla", "interpret"])
def test_commit_layers_commits_each_cache(scatter, monkeypatch):
    """`commit_layers` over caches of two conv widths (W = 4, 4, 2) and channel counts, in
    intermediate mode (each layer's pool takes its own inter[n - 1]): every cache as its own
    conv move and state commit would leave it, against numpy; through XLA and the move kernel
    (interpreted)."""
    monkeypatch.setenv("GDN_JAX_SCATTER", scatter)
    jax.clear_caches()
    rng = np.random.default_rng(4)
    dims = [(2, 4, 16, 16, 4), (2, 4, 16, 32, 4), (2, 2, 16, 16, 2)]  # H, HV, K, V, W
    caches = []
    for H, HV, K, V, W in dims:
        c = GatedDeltaNet(HIDDEN, H, HV, K, V, W, rngs=nnx.Rngs(0)).init_cache(
            5, t_max=T_MAX, state_dtype=jnp.float32, commit_mode="intermediate")
        caches.append(c.replace(conv=jnp.asarray(rng.standard_normal(c.conv.shape), jnp.float32),
                                inter=jnp.asarray(rng.standard_normal(c.inter.shape),
                                                  jnp.float32)))
    slots, n = jnp.asarray([3, 0, -1, 4], jnp.int32), jnp.asarray([2, 0, 4, 4], jnp.int32)
    out = GatedDeltaNet.commit_layers(caches, slots, n)
    assert len(out) == len(caches)
    for c, new, (*_, W) in zip(caches, out, dims):
        conv, pool = np.asarray(c.conv).copy(), np.asarray(c.state.pool).copy()
        for slot, k in zip(np.asarray(slots), np.asarray(n)):
            if slot >= 0:
                conv[slot, :W - 1] = np.asarray(c.conv)[slot, k:k + W - 1]
                if k:
                    pool[slot] = np.asarray(c.inter)[slot, k - 1]
        np.testing.assert_array_equal(np.asarray(new.conv), conv)
        np.testing.assert_array_equal(np.asarray(new.state.pool), pool)
