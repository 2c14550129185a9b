"""Partial NeoX-style rotary embedding (rotate_half within the first `rotary_dim` dims).

Qwen3.5's interleaved mRoPE reduces to this exactly for text-only input (all three position
streams equal), so both families use it.
"""

from __future__ import annotations

import jax.numpy as jnp

_F32 = jnp.float32


def inv_freq(rotary_dim: int, theta: float):
    """[rotary_dim / 2] fp32: the rotation's inverse frequencies."""
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=_F32) / rotary_dim))


def rope_cos_sin(positions, rotary_dim: int, theta: float):
    """positions: [B, T] int -> (cos, sin), each [B, T, rotary_dim] fp32 (freqs repeated twice)."""
    freqs = positions.astype(_F32)[..., None] * inv_freq(rotary_dim, theta)  # [B, T, R / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, T, N, D]; cos, sin: [B, T, R] with R <= D even. Rotates x[..., :R], keeps the rest.

    The product runs in x's dtype, with cos/sin cast to it (as transformers).
    """
    R = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x_rot, x_pass = x[..., :R], x[..., R:]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
