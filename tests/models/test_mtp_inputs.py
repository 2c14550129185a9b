"""`mtp_forward` checks its pairs (token t + 1, hidden at t) before anything runs: a hidden whose
[B, T] is not the tokens' (the README's old example passed a verify's 4-token hidden with one
token) raises a ValueError naming the argument and both shapes, not a concatenate TypeError."""

from __future__ import annotations

import jax.numpy as jnp
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


def re_shape(shape):
    return r"\(" + r", ".join(map(str, shape)) + (r",\)" if len(shape) == 1 else r"\)")
