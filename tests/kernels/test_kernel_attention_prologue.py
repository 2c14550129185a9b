"""The attention prologue kernel (`kernels.attention_prologue`) against the XLA path it replaces
(`modules.attention`'s norms, RoPE and cache write; `kernels.decode_attention`'s query layout),
in the Pallas interpreter at small heads on CPU and at Qwen3.5's heads on the GPU.

Tolerances: the kernel rounds where XLA's path does (the partials' sum, the norm, cos / sin,
each RoPE product and sum, all to the cache's dtype), so the two differ only where rsqrt, cos
or sin differ in their last fp32 bits and a rounding lands the other way: one ulp of the dtype
in a few elements, so 2 ulp (2 * BF16_EPS relative per element, 2^-7 for bf16) bounds them;
the values (no arithmetic) bit for bit; everything the kernel must not write bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.modules.rope import apply_rope, inv_freq, rope_cos_sin
from gdn_jax.ops.residual_norm import rms_norm

SMALL = dict(nH=4, nKV=2, hd=16, rotary=8, S=2, num_slots=5, L=32)
REAL = dict(nH=16, nKV=2, hd=256, rotary=64, S=2, num_slots=40, L=512)
THETA, EPS = 10_000_000.0, 1e-6


def _case(seed, dims, B, T, dtype):
    rng = np.random.default_rng(seed)
    nH, nKV, hd, S, N_s, L = (dims[k] for k in ("nH", "nKV", "hd", "S", "num_slots", "L"))
    N = nH * 2 * hd + 2 * nKV * hd   # [q | gate] per head, then k, then v: one group's columns
    parts = jnp.asarray(rng.standard_normal((S, B * T, N)), jnp.float32)
    qw = jnp.asarray(0.3 * rng.standard_normal(hd), jnp.float32)
    kw = jnp.asarray(0.3 * rng.standard_normal(hd), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((N_s, L, nKV, hd)), dtype)
    vc = jnp.asarray(rng.standard_normal((N_s, L, nKV, hd)), dtype)
    lengths = jnp.asarray(rng.integers(0, L - T, N_s), jnp.int32)
    real = rng.permutation(N_s)[:B - 2]
    lengths = lengths.at[real[0]].set(L - 1)  # its tokens past 0 fall past max_len: not written
    slots = rng.permutation(np.concatenate([real, [-1, N_s + 1]]))  # two padding rows
    n = rng.integers(1, T + 1, B)  # rows with fewer real tokens
    n[np.flatnonzero(slots == real[0])] = T
    return parts, qw, kw, kc, vc, lengths, jnp.asarray(slots, jnp.int32), jnp.asarray(n, jnp.int32)


def _reference(parts, qw, kw, kc, vc, lengths, slots, n, *, T, nH, nKV, hd, rotary, dtype):
    """modules.attention's XLA path, step by step, and decode_attention's query layout."""
    S, M, N = parts.shape
    B = M // T
    y = parts.sum(0).astype(dtype).reshape(B, T, N)
    q = y[..., :nH * 2 * hd].reshape(B, T, nH, 2 * hd)[..., :hd]
    k = y[..., nH * 2 * hd:nH * 2 * hd + nKV * hd].reshape(B, T, nKV, hd)
    v = y[..., nH * 2 * hd + nKV * hd:].reshape(B, T, nKV, hd)
    valid = (slots >= 0) & (slots < kc.shape[0])
    start = jnp.where(valid, lengths[jnp.clip(slots, 0, kc.shape[0] - 1)], 0)
    pos = start[:, None] + jnp.arange(T)[None, :]
    cos, sin = rope_cos_sin(pos, rotary, THETA)
    q = apply_rope(rms_norm(q, qw, EPS), cos, sin)
    k = apply_rope(rms_norm(k, kw, EPS), cos, sin)
    real = valid[:, None] & (jnp.arange(T)[None, :] < n[:, None]) & (pos < kc.shape[1])
    si = jnp.where(real, slots[:, None], kc.shape[0])
    kc = kc.at[si, pos].set(k.astype(kc.dtype), mode="drop")
    vc = vc.at[si, pos].set(v.astype(vc.dtype), mode="drop")
    G = nH // nKV
    R = max(16, 1 << (T * G - 1).bit_length())
    qr = q.reshape(B, T, nKV, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, nKV, T * G, hd)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - T * G), (0, 0))).astype(kc.dtype)
    pr = jnp.broadcast_to(pos[:, None, :, None], (B, nKV, T, G)).reshape(B, nKV, T * G)
    pr = jnp.pad(pr, ((0, 0), (0, 0), (0, R - T * G)), constant_values=-1)
    return qr, pr, kc, vc, real


def _ulps(a, b, dtype):
    """Elementwise distance in units of the dtype's epsilon, relative to max(|b|, 1)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b) / np.maximum(np.abs(b), 1.0) / float(jnp.finfo(dtype).eps)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("where", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_prologue_matches_xla_path(where, dtype, T):
    if where == "gpu" and jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform}")
    dims = SMALL if where == "interpret" else REAL
    nH, nKV, hd, rotary = dims["nH"], dims["nKV"], dims["hd"], dims["rotary"]
    B = 4 if where == "interpret" else 8
    parts, qw, kw, kc, vc, lengths, slots, n = _case(T, dims, B, T, dtype)
    ref = _reference(parts, qw, kw, kc, vc, lengths, slots, n, T=T, nH=nH, nKV=nKV, hd=hd,
                     rotary=rotary, dtype=dtype)
    src = lambda start, stride: kernels.Source(parts, start, stride)  # noqa: E731
    qr, pr, kc2, vc2 = kernels.attention_prologue(
        src(0, 2 * hd), src(nH * 2 * hd, hd), src(nH * 2 * hd + nKV * hd, hd), qw, kw,
        inv_freq(rotary, THETA), lengths, jnp.copy(kc), jnp.copy(vc), slots, n, T=T, num_heads=nH,
        eps=EPS, interpret=where == "interpret")
    ref_qr, ref_pr, ref_kc, ref_vc, real = ref
    G = nH // nKV
    np.testing.assert_array_equal(np.asarray(pr), np.asarray(ref_pr))
    assert qr.shape == ref_qr.shape and qr.dtype == ref_qr.dtype
    np.testing.assert_array_equal(np.asarray(qr[:, :, T * G:], np.float32), 0)
    assert _ulps(qr[:, :, :T * G], ref_qr[:, :, :T * G], dtype).max() <= 2
    np.testing.assert_array_equal(np.asarray(vc2), np.asarray(ref_vc))
    assert _ulps(kc2, ref_kc, dtype).max() <= 2
    # the entries no real token writes are the cache's own, bit for bit
    written = np.zeros(kc.shape[:2], bool)
    for b, t in zip(*np.nonzero(np.asarray(real))):
        written[int(slots[b]), int(lengths[slots[b]]) + t] = True
    np.testing.assert_array_equal(np.asarray(kc2)[~written], np.asarray(kc)[~written])
    assert written.sum() >= 2 and not bool(real.all())  # both kinds occur


def test_prologue_refuses_what_it_cannot_take():
    dims = SMALL
    parts, qw, kw, kc, vc, lengths, slots, n = _case(0, dims, 3, 2, jnp.bfloat16)
    src = lambda start, stride: kernels.Source(parts, start, stride)  # noqa: E731
    args = (qw, kw, inv_freq(8, THETA), lengths, kc, vc, slots, n)
    with pytest.raises(ValueError, match="multiples of rotary_dim / 2"):
        kernels.attention_prologue(src(2, 32), src(128, 16), src(160, 16), *args, T=2,
                                   num_heads=4, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        kernels.attention_prologue(src(0, 32), src(128, 16), src(160, 16), qw, kw,
                                   inv_freq(6, THETA), *args[3:], T=2, num_heads=4, eps=EPS,
                                   interpret=True)
    with pytest.raises(ValueError, match="B \\* T"):
        kernels.attention_prologue(src(0, 32), src(128, 16), src(160, 16), *args, T=4,
                                   num_heads=4, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="v's 2 heads of 16 columns from 168"):
        kernels.attention_prologue(src(0, 32), src(128, 16), src(168, 16), *args, T=2,
                                   num_heads=4, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"slots and n \[B\] = \[3\]"):
        kernels.attention_prologue(src(0, 32), src(128, 16), src(160, 16), *args[:6],
                                   slots[:2], n, T=2, num_heads=4, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="v_cache as k_cache"):
        kernels.attention_prologue(src(0, 32), src(128, 16), src(160, 16), *args[:5],
                                   vc.astype(jnp.float32), slots, n, T=2, num_heads=4, eps=EPS,
                                   interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_prologue_lowers_for_cuda(kind, cuda_lowering):
    """Qwen3.5's heads at B = 32, T = 4 from a group's two partial sums, and the attention kernel
    on the rows it lays out."""
    S = jax.ShapeDtypeStruct
    B, T, nH, nKV, hd = 32, 4, 16, 2, 256
    parts = S((2, B * T, nH * 2 * hd + 2 * nKV * hd), jnp.float32)
    cache = S((40, 680, nKV, hd), jnp.bfloat16)
    i32 = lambda *s: S(s, jnp.int32)  # noqa: E731
    args = (parts, parts, parts, S((hd,), jnp.float32), S((hd,), jnp.float32),
            S((32,), jnp.float32), i32(40), cache, cache, i32(B), i32(B))

    def run(qp, kp, vp, *rest):
        srcs = (kernels.Source(qp, 0, 2 * hd), kernels.Source(kp, nH * 2 * hd, hd),
                kernels.Source(vp, nH * 2 * hd + nKV * hd, hd))
        qr, pr, kc, vc = kernels.attention_prologue(*srcs, *rest, T=T, num_heads=nH, eps=EPS)
        return kernels.decode_attention_rows(qr, pr, kc, vc, rest[-2], T=T, num_heads=nH,
                                             config=kernels.AttentionConfig(64, 4))

    with cuda_lowering(kind):
        text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_rows_refuse_a_layout_they_cannot_read():
    """decode_attention_rows names the layout it expects: rows padded to dot_rows(T * G)."""
    parts, qw, kw, kc, vc, lengths, slots, n = _case(0, SMALL, 3, 2, jnp.bfloat16)
    qr, pr = jnp.zeros((3, 2, 8, 16), jnp.bfloat16), jnp.zeros((3, 2, 8), jnp.int32)
    with pytest.raises(ValueError, match="dot_rows\\(T \\* G\\) = 16"):
        kernels.decode_attention_rows(qr, pr, kc, vc, slots, T=2, num_heads=4, interpret=True)

