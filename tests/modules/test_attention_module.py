"""Attention's two score paths agree: impl="pallas" (each row's used length read in place,
`gdn_jax.ops.attention`, in the Pallas interpreter here) and impl="xla" (the whole cache
gathered and masked), on a bf16 cache over prefill, decode and verify calls with ragged lengths,
slots in any order and a padding row. Both round the probabilities to bf16 before the product
with v, in different orders of summation: agreement within 2**-6 relative to the output's scale
(a few bf16 ulps); a wrong key range or a stale key read moves outputs by O(1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax import kernels
from gdn_jax.modules import Attention, KVCache
from gdn_jax.modules.attention import set_attention_impl
from gdn_jax.ops import attention as attention_ops

BF16 = jnp.bfloat16


def _attention(impl):
    return Attention(64, 4, 2, 32, rotary_dim=16, rope_theta=1000.0, dtype=BF16,
                     param_dtype=BF16, impl=impl, rngs=nnx.Rngs(0))


def test_pallas_matches_xla_over_calls():
    rng = np.random.default_rng(0)
    steps = [(6, [6, 3, 5], True), (1, None, True), (4, None, False), (1, None, True)]
    caches = {}
    outs = {"xla": [], "pallas": [], "auto": []}
    slots = jnp.asarray([2, -1, 0], jnp.int32)
    xs = [jnp.asarray(rng.standard_normal((3, T, 64)), BF16) for T, _, _ in steps]
    # stale data everywhere: neither path may read past a row's positions
    stale = [jnp.asarray(rng.standard_normal((4, 37, 2, 32)) * 5, BF16) for _ in range(2)]
    for impl in outs:
        attn = _attention(impl)
        cache = KVCache.create(4, 37, 2, 32, dtype=BF16).replace(k=stale[0], v=stale[1])
        for x, (T, lengths, advance) in zip(xs, steps):
            y, cache = attn(x, cache, slots, lengths=lengths, advance=advance)
            outs[impl].append(np.asarray(y, np.float64))
        caches[impl] = cache
    for a, b, (T, lengths, _) in zip(outs["xla"], outs["pallas"], steps):
        for row in (0, 2):  # row 1 is padding: unspecified
            n = T if lengths is None else lengths[row]
            np.testing.assert_allclose(b[row, :n], a[row, :n], rtol=0,
                                       atol=2 ** -6 * np.abs(a[row, :n]).max())
    np.testing.assert_array_equal(caches["xla"].lengths, caches["pallas"].lengths)
    # "auto" (the default) is the kernel only where it runs compiled: on CPU, XLA, bit for bit
    want = "pallas" if attention_ops.runs_compiled(caches["xla"].k) else "xla"
    for a, b in zip(outs["auto"], outs[want]):
        np.testing.assert_array_equal(a, b)


def test_impl_is_checked_and_settable():
    with pytest.raises(ValueError, match=r"impl expected one of \('auto', 'xla', 'pallas'\)"):
        _attention("cudnn")
    attn = _attention("xla")
    assert set_attention_impl(attn, "pallas") is attn and attn.impl == "pallas"
    with pytest.raises(ValueError, match="impl expected one of"):
        set_attention_impl(attn, "fast")


def test_pallas_needs_a_16_bit_cache():
    attn = _attention("pallas")
    cache = KVCache.create(2, 32, 2, 32, dtype=jnp.float32)
    with pytest.raises(ValueError, match="the kernel cannot take this cache: cache dtype float32"):
        attn(jnp.ones((1, 1, 64), BF16), cache, jnp.asarray([0], jnp.int32))


def test_prefill_rows_stay_with_xla():
    """A prefill's T x nH / nKV query rows (here 40 x 2 > ATTENTION_MAX_ROWS) do not fit one
    program: impl "pallas" runs XLA's path for them, bit for bit."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 40, 64)), BF16)
    ys = [_attention(impl)(x, KVCache.create(2, 48, 2, 32, dtype=BF16),
                           jnp.asarray([1], jnp.int32))[0] for impl in ("xla", "pallas")]
    np.testing.assert_array_equal(ys[0], ys[1])


WHERE = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
STEPS = [(5, [5, 2, 3], True), (1, None, True), (4, None, False)]  # (T, lengths, advance)


def _run_steps(where, monkeypatch, var, levels):
    """impl "pallas" over STEPS (after a prefill: decode and verify, ragged lengths, slots
    [2, -1, 0] with a padding row) once per level of the environment variable var: ({level:
    (outputs, cache)}, the stale cache [k, v] each run started from, a call of the last run's
    layer). CPU: small heads in the interpreter; GPU: Qwen3.5's (16 query heads, 2 KV heads of
    256, RoPE over 64)."""
    if where == "gpu" and jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform}")
    hidden, nH, nKV, hd, rot = (64, 4, 2, 32, 16) if where == "cpu" else (2048, 16, 2, 256, 64)
    rng = np.random.default_rng(3)
    slots = jnp.asarray([2, -1, 0], jnp.int32)
    xs = [jnp.asarray(rng.standard_normal((3, T, hidden)), BF16) for T, _, _ in STEPS]
    stale = [jnp.asarray(rng.standard_normal((4, 37, nKV, hd)), BF16) for _ in range(2)]
    norm_w = [jnp.asarray(0.3 * rng.standard_normal(hd), BF16) for _ in range(2)]
    runs = {}
    for level in levels:
        monkeypatch.setenv(var, level)
        attn = Attention(hidden, nH, nKV, hd, rotary_dim=rot, rope_theta=1000.0, dtype=BF16,
                         param_dtype=BF16, impl="pallas", rngs=nnx.Rngs(0))
        ys = []
        for norm, w in ((attn.q_norm, norm_w[0]), (attn.k_norm, norm_w[1])):
            norm.weight[...] = w  # distinct norms: a kernel that swaps them fails
        cache = KVCache.create(4, 37, nKV, hd, dtype=BF16).replace(k=stale[0], v=stale[1])
        for x, (T, lengths, advance) in zip(xs, STEPS):
            y, cache = attn(x, cache, slots, lengths=lengths, advance=advance)
            ys.append(np.asarray(y, np.float64))
        runs[level] = ys, cache
    return runs, stale, lambda: attn(xs[1], cache, slots)


def _assert_outputs_agree(ref, got):
    """The real rows' outputs within 2**-6 of their scale (as the score paths agree above)."""
    for a, b, (T, lengths, _) in zip(ref, got, STEPS):
        for row in (0, 2):
            n = T if lengths is None else lengths[row]
            np.testing.assert_allclose(b[row, :n], a[row, :n], rtol=0,
                                       atol=2 ** -6 * np.abs(a[row, :n]).max())


@pytest.mark.parametrize("where", WHERE)
def test_prologue_kernel_matches_the_xla_steps(where, monkeypatch):
    """impl "pallas" with the prologue kernel (the q / k norms, RoPE and the cache write in one
    launch: the default where it fits) against the same calls with those steps in XLA
    (GDN_JAX_ATTENTION_PROLOGUE=off): the cache's values bit for bit, its keys within 2 bf16 ulps
    (cos, sin and rsqrt may differ in their last fp32 bits: the module docstring of
    kernels/attention_prologue.py), the outputs as the score paths agree above."""
    calls = []
    real = kernels.attention_prologue
    monkeypatch.setattr(kernels, "attention_prologue",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    runs, stale, call = _run_steps(where, monkeypatch, attention_ops.PROLOGUE_VAR, ("off", "auto"))
    assert len(calls) == len(STEPS)  # the kernel ran at "auto" on every call, never at "off"
    (ref, ref_cache), (got, cache) = runs["off"], runs["auto"]
    np.testing.assert_array_equal(cache.v, ref_cache.v)
    np.testing.assert_array_equal(cache.lengths, ref_cache.lengths)
    k, ref_k = np.asarray(cache.k, np.float32), np.asarray(ref_cache.k, np.float32)
    assert (np.abs(k - ref_k) <= 2 * 2 ** -7 * np.maximum(np.abs(ref_k), 1)).all()
    assert (k != np.asarray(stale[0], np.float32)).any()  # the calls wrote keys
    _assert_outputs_agree(ref, got)
    monkeypatch.setenv(attention_ops.PROLOGUE_VAR, "fast")
    with pytest.raises(ValueError, match="GDN_JAX_ATTENTION_PROLOGUE expected one of"):
        call()


@pytest.mark.parametrize("where", WHERE)
def test_combine_kernel_matches_the_xla_combine(where, monkeypatch):
    """GDN_JAX_ATTENTION_COMBINE=kernel (the splits' combine and the sigmoid gate in one launch)
    against XLA's (the default): the caches bit for bit (the same prologue wrote them), the
    outputs as the score paths agree above (the kernel rounds o and the gate where XLA may keep
    them in fp32: tests/kernels/test_kernel_attention.py)."""
    calls = []
    real = kernels.decode_attention_rows
    monkeypatch.setattr(kernels, "decode_attention_rows",
                        lambda *a, **k: calls.append("gate" in k) or real(*a, **k))
    runs, _, call = _run_steps(where, monkeypatch, attention_ops.COMBINE_VAR, ("xla", "kernel"))
    assert calls == [False] * len(STEPS) + [True] * len(STEPS)
    (ref, ref_cache), (got, cache) = runs["xla"], runs["kernel"]
    np.testing.assert_array_equal(cache.k, ref_cache.k)
    np.testing.assert_array_equal(cache.v, ref_cache.v)
    _assert_outputs_agree(ref, got)
    monkeypatch.setenv(attention_ops.COMBINE_VAR, "fast")
    with pytest.raises(ValueError, match="GDN_JAX_ATTENTION_COMBINE expected one of"):
        call()
