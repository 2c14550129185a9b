"""The embedded default model: a small Qwen3.5-style hybrid trained on the Python standard library
(`gdn_jax.train`), shipped as package data so that `pip install .` carries it.

    path = embedded_path()          # .../gdn_jax/assets/embedded: config.json, model*.safetensors,
                                    # tokenizer.json, prompts.json, training_record.json
    model = load_embedded()         # Qwen3NextForCausalLM with its MTP head
"""

from __future__ import annotations

import os

import jax.numpy as jnp

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "assets", "embedded")


def embedded_path() -> str:
    """The directory of the embedded model (Hugging Face layout plus tokenizer and prompts)."""
    if not os.path.isfile(os.path.join(EMBEDDED_DIR, "config.json")):
        raise ValueError(f"the embedded model is missing from {EMBEDDED_DIR} (an install without "
                         "package data?); reinstall gdn-jax or pass a model directory")
    return EMBEDDED_DIR


def load_embedded(*, dtype=jnp.float32, **kwargs):
    """The embedded model (bf16 weights on disk, cast to `dtype`); kwargs go to
    `Qwen3NextForCausalLM.from_pretrained`."""
    from gdn_jax.models.qwen3_next import Qwen3NextForCausalLM
    return Qwen3NextForCausalLM.from_pretrained(embedded_path(), dtype=dtype, **kwargs)
