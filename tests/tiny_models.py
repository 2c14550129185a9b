"""Random-weight gdn-jax models for tests: built abstractly, every parameter drawn from NumPy.

Drawing from NumPy (not jax.random) costs no per-shape compiles; every parameter random (never
HF's ones/zeros init) so that `1 + w` norms and gate orders are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax.models import Qwen3NextForCausalLM


def randomize(model, seed: int, scale: float):
    """Fill every nnx.Param of model with N(0, scale^2) draws of a seeded generator, in place."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray((rng.standard_normal(x.shape) * scale).astype(x.dtype))
              for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def random_model(config, seed: int = 0, scale: float = 0.2, cls=Qwen3NextForCausalLM, **kw):
    """A `cls(config, **kw)` with random weights."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed), **kw))
    return randomize(model, seed, scale)
