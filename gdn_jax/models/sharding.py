"""Tensor parallelism over heads for a whole Qwen3-Next / Qwen3.5 model (README, "Multi-GPU").

    mesh = jax.make_mesh((4,), ("tp",))
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
    cache = model.init_cache(num_slots=8, max_len=4096)      # sharded like the model
    # then exactly as on one device (jit it; the shardings ride on the params and cache)

Parameters get NamedShardings over the mesh's "tp" axis:
- GDN: in_proj_qkvz / in_proj_ba / conv weight split by key-head group (columns tp-blocked,
  `gdn_jax.modules.sharding`), A_log / dt_bias by value head, out_proj by rows;
- attention: q heads (with their gates) split, o_proj by rows, k / v heads split when their count
  divides the devices and replicated when fewer;
- MLP and every MoE expert: gate / up by columns, down by rows (the intermediate dim); the router
  and the shared-expert gate replicated;
- embedding and LM head split by vocab (the logits come out vocab-sharded: argmax or sample them
  under jit and GSPMD reduces across devices, or gather them once);
- norms, MTP fc: replicated.
Caches: GDN state pool [slots, HV, V, K] on HV, candidates on their head axis, conv window on its
tp-blocked channels; KV caches as their k / v projections. Slots (and per-slot counts / lengths)
are replicated: every device serves every sequence, its own heads only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gdn_jax.models.config import ModelConfig
from gdn_jax.modules.cache import GDNCache, KVCache, gdn_cache_specs, kv_cache_specs
from gdn_jax.modules.gated_deltanet import GatedDeltaNet
from gdn_jax.modules.sharding import auto_mesh, check_divides, param_spec, tp_size


def check_config(config: ModelConfig, tp: int) -> None:
    """Raise a ValueError naming both numbers when a head count (or a split dim) of `config`
    cannot be split over tp devices."""
    c = config
    if tp == 1:
        return
    types = set(c.layer_types)
    if "linear_attention" in types:
        check_divides("linear_num_key_heads", c.linear_num_key_heads, tp)
        check_divides("linear_num_value_heads", c.linear_num_value_heads, tp)
    if "full_attention" in types or c.mtp_num_hidden_layers:
        check_divides("num_attention_heads", c.num_attention_heads, tp)
        nkv = c.num_key_value_heads
        if nkv % tp and tp % nkv:
            raise ValueError(f"tensor parallel over {tp} devices: num_key_value_heads = {nkv} "
                             f"neither divides by nor divides the {tp} devices (KV heads are "
                             f"split when a multiple of the devices, replicated when a divisor)")
    moe = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] + [c.mtp_is_moe]
    if any(moe):
        check_divides("moe_intermediate_size", c.moe_intermediate_size, tp)
        check_divides("shared_expert_intermediate_size", c.shared_expert_intermediate_size, tp)
    if not all(moe):
        check_divides("intermediate_size", c.intermediate_size, tp)
    check_divides("vocab_size", c.vocab_size, tp)


def _modules(model):
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)]


def attach_mesh(model, mesh: Mesh | None) -> None:
    """Set `mesh` on every head-parallel module (and the model)."""
    for _, node in _modules(model):
        if hasattr(node, "mesh"):
            node.mesh = mesh


def param_specs(model, mesh: Mesh) -> dict:
    """Path (tuple from the model root, as nnx.to_flat_state) -> PartitionSpec, every Param: its
    partition metadata (`gdn_jax.modules.sharding.param_spec`), or, for the specs that depend on
    the device count, its module's `tp_param_specs(tp)`."""
    tp = tp_size(mesh)
    specs = {}
    for path, node in _modules(model):
        if hasattr(node, "tp_param_specs"):
            for rel, spec in node.tp_param_specs(tp).items():
                specs[path + rel] = spec
    return {tuple(path): specs.get(tuple(path), param_spec(var))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def permutations(model, tp: int) -> dict:
    """Path -> column permutation (flat -> tp-blocked) for the GDN parameters that have one."""
    out = {}
    for path, node in _modules(model):
        if isinstance(node, GatedDeltaNet):
            for rel, perm in node.tp_permutations(tp).items():
                out[path + rel] = perm
    return out


def model_tp(model) -> int:
    """The tp layout the model's parameters are in (1: one device / flat)."""
    return tp_size(getattr(model, "mesh", None))


def canonical(model, path, value):
    """A parameter value in the flat (single-device) layout, whatever the model's mesh."""
    tp = model_tp(model)
    if tp == 1:
        return value
    perm = permutations(model, tp).get(tuple(path))
    return value if perm is None else np.asarray(value)[..., np.argsort(perm)]


def shard_model(model, mesh: Mesh):
    """Put a single-device model on `mesh` (in place; returns it): checks the head counts, moves
    the GDN projections to the tp-blocked layout and every parameter to its NamedSharding."""
    if getattr(model, "mesh", None) is not None:
        raise ValueError("shard_model: the model is already on a mesh")
    mesh = auto_mesh(mesh)
    tp = tp_size(mesh)
    check_config(model.config, tp)
    specs, perms = param_specs(model, mesh), permutations(model, tp)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        value = var.get_value()
        if path in perms:
            value = jnp.asarray(value)[..., perms[path]]
        var.set_value(jax.device_put(value, NamedSharding(mesh, specs[path])))
    attach_mesh(model, mesh)
    return model


def cache_specs(model, cache):
    """PartitionSpecs of a ModelCache (a pytree like it) for the model's mesh."""
    tp = model_tp(model)

    def layer_specs(c):
        if isinstance(c, GDNCache):
            return gdn_cache_specs(c)
        assert isinstance(c, KVCache)
        return kv_cache_specs(c.k.shape[2] % tp == 0)

    return type(cache).of((layer_specs(cache.layer(i)) for i in range(len(cache.layers))),
                          tuple(layer_specs(c) for c in cache.mtp))


def cache_shardings(model, cache):
    mesh = model.mesh
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(model, cache),
                        is_leaf=lambda x: isinstance(x, P))
