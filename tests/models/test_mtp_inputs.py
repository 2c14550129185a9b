"""`mtp_forward` checks its pairs (token t + 1, hidden at t) before anything runs: a hidden whose
[B, T] is not the tokens' (the README's old example passed a verify's 4-token hidden with one
token) raises a ValueError naming the argument and both shapes, not a concatenate TypeError. Its
`logits_at` (one position a row, the speculative loop's extend) gives the full call's logits at
those positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.models import ModelConfig
from tiny_models import random_model

CONFIG = ModelConfig(
    model_type="qwen3_5_text", vocab_size=64, hidden_size=32, num_hidden_layers=2,
    layer_types=("linear_attention", "full_attention"), num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, intermediate_size=48,
    mtp_num_hidden_layers=1)


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=0)


@pytest.mark.parametrize("hidden_shape", [(2, 4, 32), (2, 32), (3, 1, 32), (2, 1, 16)])
def test_hidden_not_one_per_token(model, hidden_shape):
    cache = model.init_cache(num_slots=2, max_len=8)
    slots = jnp.arange(2, dtype=jnp.int32)
    with pytest.raises(ValueError, match=(
            r"mtp_forward: hidden expected shape \[B, T, hidden\] = \(2, 1, 32\) \(one hidden per "
            r"token of next_tokens, shape \(2, 1\)\), got shape " + re_shape(hidden_shape))):
        model.mtp_forward(jnp.zeros((2, 1), jnp.int32), jnp.zeros(hidden_shape), cache, slots)


def test_tokens_not_2d(model):
    cache = model.init_cache(num_slots=2, max_len=8)
    with pytest.raises(ValueError, match=r"mtp_forward: next_tokens expected shape \[B, T\], got "
                                         r"shape \(2,\)"):
        model.mtp_forward(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 1, 32)), cache,
                          jnp.arange(2, dtype=jnp.int32))


def test_logits_at_picks_the_full_calls_rows(model):
    B, T = 3, 4
    k_tok, k_hid = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(k_tok, (B, T), 0, CONFIG.vocab_size, jnp.int32)
    hidden = jax.random.normal(k_hid, (B, T, 32), jnp.float32)
    slots = jnp.arange(B, dtype=jnp.int32)
    at = jnp.array([3, 0, 2], jnp.int32)
    cache = model.init_cache(num_slots=B, max_len=8, t_max=T)
    full = model.mtp_forward(tokens, hidden, cache, slots, mode="verify")
    picked = model.mtp_forward(tokens, hidden, cache, slots, mode="verify", logits_at=at)
    assert picked.logits.shape == (B, 1, CONFIG.vocab_size)
    want = np.asarray(full.logits)[np.arange(B), np.asarray(at)]
    np.testing.assert_allclose(np.asarray(picked.logits[:, 0]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(picked.hidden), np.asarray(full.hidden))
    assert np.ptp(want, axis=0).max() > 0  # the rows differ: a wrong pick would show


@pytest.mark.parametrize("at", [jnp.zeros((2,), jnp.int32), jnp.zeros((3, 1), jnp.int32),
                                jnp.zeros((3,), jnp.float32)])
def test_logits_at_not_one_index_a_row(model, at):
    cache = model.init_cache(num_slots=3, max_len=8)
    with pytest.raises(ValueError, match=r"mtp_forward: logits_at expected an integer array of "
                                         r"shape \[B\] = \(3,\)"):
        model.mtp_forward(jnp.zeros((3, 1), jnp.int32), jnp.zeros((3, 1, 32)), cache,
                          jnp.arange(3, dtype=jnp.int32), logits_at=at)


def re_shape(shape):
    return r"\(" + r", ".join(map(str, shape)) + (r",\)" if len(shape) == 1 else r"\)")
