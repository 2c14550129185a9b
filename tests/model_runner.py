"""Jitted calls of a gdn-jax model for the tests: one compile per (mode, shapes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


class Runner:
    """model(...), model.commit, model.mtp_forward under jax.jit (nnx.split once)."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.params = nnx.split(model)

    def _merge(self, params):
        return nnx.merge(self.graphdef, params)

    @functools.partial(jax.jit, static_argnames=("self", "mode"))
    def _call(self, params, tokens, cache, slots, lengths, mode):
        return self._merge(params)(tokens, cache, slots, mode=mode, lengths=lengths)

    @functools.partial(jax.jit, static_argnames=("self", "mode"))
    def _mtp(self, params, tokens, hidden, cache, slots, lengths, mode):
        return self._merge(params).mtp_forward(tokens, hidden, cache, slots, mode=mode,
                                               lengths=lengths)

    def __call__(self, tokens, cache, slots, *, mode="prefill", lengths=None):
        return self._call(self.params, jnp.asarray(tokens, jnp.int32), cache,
                          jnp.asarray(slots, jnp.int32),
                          None if lengths is None else jnp.asarray(lengths, jnp.int32), mode)

    def mtp(self, tokens, hidden, cache, slots, *, mode="prefill", lengths=None):
        return self._mtp(self.params, jnp.asarray(tokens, jnp.int32), hidden, cache,
                         jnp.asarray(slots, jnp.int32),
                         None if lengths is None else jnp.asarray(lengths, jnp.int32), mode)

    def commit(self, cache, slots, num_accepted):
        return self.model.commit(cache, jnp.asarray(slots, jnp.int32),
                                 jnp.asarray(num_accepted, jnp.int32))

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other
