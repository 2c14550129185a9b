"""gdn-jax: Gated DeltaNet (Qwen3-Next / Qwen3.5) inference in JAX."""

__version__ = "0.1.0"
