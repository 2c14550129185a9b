"""The gated delta rule in plain JAX (XLA): the reference every kernel is held against.

Pure functions on whole arrays, no state pool and no slots (`gdn_jax.ops.api` adds those). Every
path computes in fp32 whatever the input dtype, and every matrix product runs at
`Precision.HIGHEST` (a GPU's default TF32 would break the fp32 tolerances).

Shapes (README, "The ops"): `q, k: [B, T, H, K]`, `v: [B, T, HV, V]`, `g, beta: [B, T, HV]` (fp32),
`state: [B, HV, V, K]` fp32 (K contiguous, the pool layout; Hugging Face keeps `[B, HV, K, V]`).
Value head `hv` reads key head `hv // (HV // H)` (repeat-interleave).

Per token:
    S = exp(g) * S
    S = S + outer(beta * (v - S k), k)
    o = S q                      (q, k l2-normalised, q scaled by K**-0.5)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
CHUNK_SIZE = 64


def gating(a, b, A_log, dt_bias):
    """The GDN gates, in fp32.

    a, b: [..., HV] any float dtype; A_log, dt_bias: [HV].
    Returns g (log decay, <= 0) and beta, both [..., HV] fp32.
    """
    g = -jnp.exp(A_log.astype(_F32)) * jax.nn.softplus(a.astype(_F32) + dt_bias.astype(_F32))
    beta = jax.nn.sigmoid(b.astype(_F32))
    return g, beta


def l2norm(x, eps: float = 1e-6):
    """x * rsqrt(sum(x * x) + eps) over the last axis, in fp32 (eps inside the root, as HF and fla)."""
    x = x.astype(_F32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare_k(k, num_v_heads: int):
    """l2-normalise and GVA-expand (repeat-interleave): [B, T, H, K] -> [B, T, HV, K] fp32."""
    return jnp.repeat(l2norm(k), num_v_heads // k.shape[2], axis=2)


def prepare_qk(q, k, num_v_heads: int):
    """`prepare_k` for both, q also scaled by K**-0.5: two [B, T, HV, K] fp32 arrays."""
    return prepare_k(q, num_v_heads) * (q.shape[-1] ** -0.5), prepare_k(k, num_v_heads)


def recurrence(q, k, v, g, beta, state, *, return_states: bool = False,
               return_deltas: bool = False):
    """Token-by-token recurrence on prepared inputs (the oracle form).

    q: [B, T, HV, K] fp32 prepared, or None (state only); k: [B, T, HV, K] fp32 prepared;
    v: [B, T, HV, V]; g, beta: [B, T, HV] fp32; state: [B, HV, V, K] fp32.
    Returns (o [B, T, HV, V] fp32 or None, final state [B, HV, V, K] fp32, and third:
    the states [B, T, HV, V, K] fp32 after each token if return_states, else each token's
    corrected value u = beta (v - exp(g) S k) [B, T, HV, V] fp32 if return_deltas, else None).
    """
    v = v.astype(_F32)

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t = x
        S = S * jnp.exp(g_t)[..., None, None]
        kv = jnp.einsum("bhvk,bhk->bhv", S, k_t, precision=_HI)
        delta = (v_t - kv) * b_t[..., None]
        S = S + delta[..., :, None] * k_t[..., None, :]
        o_t = None if q_t is None else jnp.einsum("bhvk,bhk->bhv", S, q_t, precision=_HI)
        return S, (o_t, S if return_states else delta if return_deltas else None)

    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q, k, v, g, beta)))
    if q is None:
        xs = (None,) + xs[1:]
    S, (o, states) = lax.scan(step, state.astype(_F32), xs)
    return (time_major(o), S, time_major(states))


def unit_lower_inverse(A):
    """(I + A)^-1 for A [..., C, C] strictly lower triangular, C a power of two, fp32.

    Blocked recursive inversion, with matrix products only: level by level the inverse's diagonal
    blocks double, [[X11, 0], [L21, X22]]^-1 = [[X11^-1, 0], [-X22^-1 L21 X11^-1, X22^-1]].
    As stable as substitution, differentiable, and free of the LAPACK triangular solve (whose XLA
    CPU call deadlocked intermittently under concurrent solves in training's backward pass).
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"unit_lower_inverse: C must be a power of two, got {C}")
    batch = A.shape[:-2]
    inv = jnp.ones(batch + (C, 1, 1), _F32)  # the 1x1 diagonal blocks of the inverse
    b = 1
    while b < C:
        n = C // (2 * b)
        blocks = A.reshape(batch + (n, 2, b, n, 2, b))
        pairs = jnp.diagonal(blocks, axis1=-6, axis2=-3)  # [..., 2, b, 2, b, n]
        lower = jnp.moveaxis(pairs[..., 1, :, 0, :, :], -1, -3)  # [..., n, b, b]: L21 of each pair
        x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x21 = -jnp.einsum("...ij,...jk,...kl->...il", x22, lower, x11, precision=_HI)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
        b *= 2
    return inv.reshape(batch + (C, C))


def _chunk_scan(q, k, v, g, beta, state, chunk_size: int):
    """Chunked (WY) form on prepared inputs whose T is a multiple of chunk_size.

    Same contract as `recurrence` without return_states; padded steps must carry g = beta = 0.
    """
    B, T, HV, K = k.shape
    V = v.shape[-1]
    C, N = chunk_size, T // chunk_size

    def to_chunks(x):  # [B, T, HV, ...] -> [B, HV, N, C, ...]
        x = x.reshape((B, N, C, HV) + x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = map(to_chunks, (q, k, v.astype(_F32), g, beta))
    gc = jnp.cumsum(g, axis=-1)  # [B, HV, N, C] inclusive cumulative log decay
    causal = jnp.tril(jnp.ones((C, C), dtype=bool))
    # Mask before exp: the upper triangle holds positive exponents that could overflow.
    decay = jnp.exp(jnp.where(causal, gc[..., :, None] - gc[..., None, :], -jnp.inf))
    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    A = jnp.where(strict, jnp.einsum("...ik,...jk->...ij", k_beta, k, precision=_HI) * decay, 0.0)
    L_inv = unit_lower_inverse(A)
    u = jnp.einsum("...ij,...jv->...iv", L_inv, v_beta, precision=_HI)  # [B, HV, N, C, V]
    w = jnp.einsum("...ij,...jk->...ik", L_inv, k_beta * jnp.exp(gc)[..., None], precision=_HI)
    intra = jnp.einsum("...ik,...jk->...ij", q, k, precision=_HI) * decay  # diagonal included
    q_dec = q * jnp.exp(gc)[..., None]
    gl = gc[..., -1:]  # [B, HV, N, 1]
    k_dec = k * jnp.exp(gl - gc)[..., None]
    chunk_decay = jnp.exp(gl)[..., None]  # [B, HV, N, 1, 1]

    def step(S, x):  # S: [B, HV, V, K]
        q_c, k_c, u_c, w_c, intra_c, cd = x
        v_new = u_c - jnp.einsum("bhck,bhvk->bhcv", w_c, S, precision=_HI)
        o_c = jnp.einsum("bhck,bhvk->bhcv", q_c, S, precision=_HI) + jnp.einsum(
            "bhij,bhjv->bhiv", intra_c, v_new, precision=_HI
        )
        S = S * cd + jnp.einsum("bhcv,bhck->bhvk", v_new, k_c, precision=_HI)
        return S, o_c

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(map(chunk_major, (q_dec, k_dec, u, w, intra, chunk_decay)))
    S, o = lax.scan(step, state.astype(_F32), xs)  # o: [N, B, HV, C, V]
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(B, T, HV, V)
    return o, S


def _valid_mask(lengths, B: int, T: int):
    """[B, T] bool: position t of row i is real iff t < lengths[i] (all real when lengths is None)."""
    if lengths is None:
        return jnp.ones((B, T), dtype=bool)
    return jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]


def _mask_tokens(mask, q, k, v, g, beta):
    """Zero padded positions; g = beta = 0 makes a step the identity on the state, exactly."""
    m = mask[..., None]
    zero = lambda x: None if x is None else jnp.where(m[..., None], x, 0)
    return zero(q), zero(k), zero(v), jnp.where(m, g, 0.0), jnp.where(m, beta, 0.0)


def _prologue(q, k, v, g, beta, initial_state, lengths):
    """Shared by both forms: default state, padded positions zeroed, q and k prepared."""
    B, T, HV, V = v.shape
    if initial_state is None:
        initial_state = jnp.zeros((B, HV, V, k.shape[-1]), _F32)
    mask = _valid_mask(lengths, B, T)
    q, k, v, g, beta = _mask_tokens(mask, q, k, v, g.astype(_F32), beta.astype(_F32))
    qp, kp = prepare_qk(q, k, HV)
    return mask, qp, kp, v, g, beta, initial_state


@functools.partial(jax.jit, static_argnames="return_states")
def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, lengths=None,
                               return_states: bool = False):
    """Gated delta rule, token by token (`lax.scan`).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] (use `gating`);
    initial_state: [B, HV, V, K] (zeros when None); lengths: [B] int, row i uses its first
    lengths[i] tokens (padded positions leave the state alone and output zeros).
    Returns (o [B, T, HV, V] fp32, final state [B, HV, V, K] fp32, and with return_states the
    state after every token [B, T, HV, V, K] fp32, else None).
    """
    mask, qp, kp, v, g, beta, initial_state = _prologue(q, k, v, g, beta, initial_state, lengths)
    o, S, states = recurrence(qp, kp, v, g, beta, initial_state, return_states=return_states)
    return jnp.where(mask[..., None, None], o, 0.0), S, states


@functools.partial(jax.jit, static_argnames="chunk_size")
def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, lengths=None,
                           chunk_size: int = CHUNK_SIZE):
    """Gated delta rule in the chunked (WY) form: the prefill path.

    Same arguments and results as `recurrent_gated_delta_rule` (no per-token states).
    T is padded to a multiple of chunk_size inside.
    """
    T = v.shape[1]
    mask, qp, kp, v, g, beta, initial_state = _prologue(q, k, v, g, beta, initial_state, lengths)
    pad = -T % chunk_size
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        qp, kp, v, g, beta = (jnp.pad(x, widths(x)) for x in (qp, kp, v, g, beta))
    o, S = _chunk_scan(qp, kp, v, g, beta, initial_state, chunk_size)
    o = o[:, :T]
    return jnp.where(mask[..., None, None], o, 0.0), S
