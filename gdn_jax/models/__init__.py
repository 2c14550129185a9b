"""Qwen3-Next / Qwen3.5 models: config, the causal LM with its MTP head, HF checkpoint I/O."""

from gdn_jax.models.checkpoint import load_pretrained, save_pretrained
from gdn_jax.models.config import ModelConfig
from gdn_jax.models.embedded import embedded_path, load_embedded
from gdn_jax.models.qwen3_next import (
    DecoderLayer,
    ModelCache,
    ModelOutput,
    MTPHead,
    Qwen3NextForCausalLM,
)
from gdn_jax.models.sharding import shard_model

__all__ = ["DecoderLayer", "MTPHead", "ModelCache", "ModelConfig", "ModelOutput",
           "Qwen3NextForCausalLM", "embedded_path", "load_embedded", "load_pretrained",
           "save_pretrained", "shard_model"]
