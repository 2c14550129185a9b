"""Load and save Hugging Face checkpoints (config.json + *.safetensors) of Qwen3-Next / Qwen3.5.

    model = load_pretrained("hf_dir", dtype=jnp.bfloat16)      # or Qwen3NextForCausalLM.from_pretrained
    save_pretrained(model, "out_dir", max_shard_bytes=5 << 30)

Reading streams one tensor at a time through `safetensors.safe_open` (numpy), casts it to the
parameter dtype and places it, so peak host memory is about one copy of the weights. Accepted:
- a single `model.safetensors`, a sharded `model.safetensors.index.json`, or bare `*.safetensors`;
- text weights under `model.` (transformers' `save_pretrained`) or `model.language_model.`
  (released Qwen3.5 multimodal checkpoints; `model.visual.*` is skipped);
- MoE experts per expert (`experts.{e}.{gate,up,down}_proj.weight`) or fused
  (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`);
- `mtp.*` weights (built when present, or required with with_mtp=True, ignored with False).
Missing keys, unexpected keys, missing shards and shape mismatches raise a ValueError listing them.

Layout changes at the boundary: HF linear weights [out, in] -> kernels [in, out]; conv1d
[C, 1, W] -> [W, C]; Qwen3-Next's per-key-head interleaved `in_proj_qkvz` / `in_proj_ba` rows are
permuted into the flat [q | k | v | z] / [b | a] order (Qwen3.5's split projections are
concatenated into it). Saving applies the inverse maps and writes per-expert MoE keys.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from gdn_jax.models.config import ModelConfig
from gdn_jax.models.qwen3_next import Qwen3NextForCausalLM
from gdn_jax.models.sharding import (attach_mesh, canonical, check_config, param_specs,
                                     permutations)
from gdn_jax.modules.sharding import auto_mesh, tp_size
from gdn_jax.modules._linear import HIGHEST

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MULTIMODAL_PREFIX = "model.language_model."
_SKIPPED = ("model.visual.", "visual.", "model.vision_tower.")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """HF keys <-> model parameters (paths from the model root), with the two layout maps."""

    keys: tuple[str, ...]
    paths: tuple[tuple, ...]
    load: Callable  # list of HF arrays -> list of parameter arrays
    save: Callable  # list of parameter arrays -> list of HF arrays


def _one(key, path, load=lambda x: x, save=lambda x: x):
    return _Entry((key,), (path,), lambda xs: [load(xs[0])], lambda xs: [save(xs[0])])


def _vector(key, path):
    return _one(key, path)


def _linear(key, path):
    return _one(key, path + ("kernel",), lambda w: w.T, lambda k: k.T)


def _qkvz_permutation(H, HV, K, V):
    """Rows of Qwen3-Next's interleaved in_proj_qkvz in the flat [q | k | v | z] order."""
    r = HV // H
    G = 2 * K + 2 * r * V  # rows per key-head group: [q_g | k_g | v_g (r heads) | z_g (r heads)]
    g = np.arange(H)[:, None]
    q = (g * G + np.arange(K)).reshape(-1)
    k = (g * G + K + np.arange(K)).reshape(-1)
    v = (g * G + 2 * K + np.arange(r * V)).reshape(-1)
    z = (g * G + 2 * K + r * V + np.arange(r * V)).reshape(-1)
    return np.concatenate([q, k, v, z])


def _ba_permutation(H, HV):
    """Rows of Qwen3-Next's interleaved in_proj_ba ([b_g (r) | a_g (r)] per group) as [b | a]."""
    r = HV // H
    g = np.arange(H)[:, None]
    b = (g * 2 * r + np.arange(r)).reshape(-1)
    a = (g * 2 * r + r + np.arange(r)).reshape(-1)
    return np.concatenate([b, a])


def _permuted(key, path, perm):
    inv = np.argsort(perm)
    return _one(key, path + ("kernel",), lambda w: w[perm].T, lambda k: k.T[inv])


def _concat_rows(keys, path, sizes):
    """Several HF linears [out_i, in] -> one kernel [in, sum out_i] (and back)."""
    splits = np.cumsum(sizes)[:-1]
    return _Entry(tuple(keys), (path + ("kernel",),),
                  lambda ws: [np.concatenate(ws, axis=0).T],
                  lambda ks: [w for w in np.split(ks[0].T, splits, axis=0)])


def _gdn_entries(c: ModelConfig, hf: str, path: tuple) -> list[_Entry]:
    H, HV, K, V = (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                   c.linear_value_head_dim)
    out = []
    if c.interleaved_gdn_projections:
        out.append(_permuted(hf + "in_proj_qkvz.weight", path + ("in_proj_qkvz",),
                             _qkvz_permutation(H, HV, K, V)))
        out.append(_permuted(hf + "in_proj_ba.weight", path + ("in_proj_ba",),
                             _ba_permutation(H, HV)))
    else:
        out.append(_concat_rows([hf + "in_proj_qkv.weight", hf + "in_proj_z.weight"],
                                path + ("in_proj_qkvz",), [2 * H * K + HV * V, HV * V]))
        out.append(_concat_rows([hf + "in_proj_b.weight", hf + "in_proj_a.weight"],
                                path + ("in_proj_ba",), [HV, HV]))
    out.append(_one(hf + "conv1d.weight", path + ("conv_weight",),
                    lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :]))
    out.append(_vector(hf + "dt_bias", path + ("dt_bias",)))
    out.append(_vector(hf + "A_log", path + ("A_log",)))
    out.append(_vector(hf + "norm.weight", path + ("norm", "weight")))
    out.append(_linear(hf + "out_proj.weight", path + ("out_proj",)))
    return out


def _attention_entries(hf: str, path: tuple) -> list[_Entry]:
    out = [_linear(hf + f"{n}.weight", path + (n,)) for n in ("q_proj", "k_proj", "v_proj",
                                                             "o_proj")]
    out += [_vector(hf + f"{n}.weight", path + (n, "weight")) for n in ("q_norm", "k_norm")]
    return out


def _mlp_entries(hf: str, path: tuple) -> list[_Entry]:
    return [_linear(hf + f"{n}.weight", path + (n,)) for n in ("gate_proj", "up_proj",
                                                               "down_proj")]


def _moe_entries(c: ModelConfig, hf: str, path: tuple, fused: bool) -> list[_Entry]:
    E, I = c.num_experts, c.moe_intermediate_size
    out = [_linear(hf + "gate.weight", path + ("gate",)),
           _linear(hf + "shared_expert_gate.weight", path + ("shared_expert_gate",))]
    out += _mlp_entries(hf + "shared_expert.", path + ("shared_expert",))
    gate, up, down = (path + ("experts_gate_proj",), path + ("experts_up_proj",),
                      path + ("experts_down_proj",))
    if fused:  # gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
        out.append(_Entry(
            (hf + "experts.gate_up_proj",), (gate, up),
            lambda ws: [ws[0][:, :I].transpose(0, 2, 1), ws[0][:, I:].transpose(0, 2, 1)],
            lambda ks: [np.concatenate([ks[0], ks[1]], axis=2).transpose(0, 2, 1)]))
        out.append(_one(hf + "experts.down_proj", down, lambda w: w.transpose(0, 2, 1),
                        lambda k: k.transpose(0, 2, 1)))
    else:  # experts.{e}.{gate,up,down}_proj.weight, HF [out, in] each
        for name, p in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            keys = tuple(hf + f"experts.{e}.{name}.weight" for e in range(E))
            out.append(_Entry(keys, (p,),
                              lambda ws: [np.stack([w.T for w in ws])],
                              lambda ks: [w.T for w in ks[0]]))
    return out


def _layer_entries(c, layer_type, moe, fused, hf, path):
    out = [_vector(hf + "input_layernorm.weight", path + ("input_layernorm", "weight")),
           _vector(hf + "post_attention_layernorm.weight",
                   path + ("post_attention_layernorm", "weight"))]
    if layer_type == "linear_attention":
        out += _gdn_entries(c, hf + "linear_attn.", path + ("linear_attn",))
    else:
        out += _attention_entries(hf + "self_attn.", path + ("self_attn",))
    if moe:
        out += _moe_entries(c, hf + "mlp.", path + ("mlp",), fused(hf + "mlp."))
    else:
        out += _mlp_entries(hf + "mlp.", path + ("mlp",))
    return out


def _entries(c: ModelConfig, with_mtp: bool, fused=lambda prefix: False) -> list[_Entry]:
    """Every parameter of the model, keyed by its canonical HF names (prefix `model.`)."""
    out = [_vector("model.embed_tokens.weight", ("embed_tokens", "embedding")),
           _vector("model.norm.weight", ("norm", "weight"))]
    if not c.tie_word_embeddings:
        out.append(_linear("lm_head.weight", ("lm_head",)))
    for i, t in enumerate(c.layer_types):
        out += _layer_entries(c, t, c.is_moe_layer(i), fused, f"model.layers.{i}.",
                              ("layers", i))
    if with_mtp:
        out.append(_linear("mtp.fc.weight", ("mtp", "fc")))
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            out.append(_vector(f"mtp.{n}.weight", ("mtp", n, "weight")))
        for i in range(c.mtp_num_hidden_layers):
            out += _layer_entries(c, "full_attention", c.mtp_is_moe, fused, f"mtp.layers.{i}.",
                                  ("mtp", "layers", i))
    return out


# ------------------------------------------------------------------------------------------------
# Files


def _listing(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _key_files(path: str) -> dict[str, str]:
    """HF key -> safetensors file (absolute) for a checkpoint directory."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"load_pretrained: {index} is not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"load_pretrained: {index} has no weight_map (a JSON object of "
                             "key -> shard file name)")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"load_pretrained: shard files named in {INDEX_FILE} are missing "
                             f"from {path}: {_listing(missing)}")
        return {k: os.path.join(path, f) for k, f in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    files = [single] if os.path.isfile(single) else sorted(
        glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"load_pretrained: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors in "
                         f"{path}")
    out = {}
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                out[k] = file
    return out


def _open(file: str):
    """safe_open(file), with an error naming the file (a truncated or non-safetensors file
    otherwise raises the Rust reader's bare message)."""
    try:
        return safe_open(file, framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise ValueError(f"load_pretrained: cannot read {file} as safetensors ({e})") from None


def _canonical(key: str) -> str | None:
    """Checkpoint key -> canonical key (`model.` prefix), or None for weights we skip."""
    if key.startswith(_SKIPPED):
        return None
    if key.startswith(_MULTIMODAL_PREFIX):
        return "model." + key[len(_MULTIMODAL_PREFIX):]
    return key


class _Reader:
    """Open safetensors files lazily (one handle per shard) and read single tensors."""

    def __init__(self):
        self._open = {}

    def get(self, file: str, key: str) -> np.ndarray:
        if file not in self._open:
            self._open[file] = _open(file).__enter__()
        try:
            return self._open[file].get_tensor(key)
        except Exception as e:  # a key the index names but the shard lacks, a truncated file
            raise ValueError(f"load_pretrained: cannot read tensor {key} from {file} ({e})") \
                from None

    def close(self):
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def _variable(model, path):
    obj = model
    for p in path[:-1]:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return getattr(obj, path[-1])


def load_pretrained(path, *, dtype=jnp.float32, param_dtype=None, precision=HIGHEST,
                    with_mtp: bool | None = None, mesh=None) -> Qwen3NextForCausalLM:
    """Build a Qwen3NextForCausalLM from a HF directory (module docstring).

    dtype: compute dtype; param_dtype: weight dtype (default: dtype), every tensor is cast to it.
    with_mtp: None builds the MTP head iff the checkpoint has `mtp.*` weights; True requires
    them; False ignores them.
    mesh: a jax Mesh with a "tp" axis (tensor parallelism over heads, `gdn_jax.models.sharding`):
    head counts are checked first, and each tensor goes straight to its NamedSharding.
    """
    path = os.fspath(path)
    config = ModelConfig.from_pretrained(path)
    mesh = auto_mesh(mesh)
    tp = tp_size(mesh)
    if mesh is not None:
        check_config(config, tp)
    param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
    key_files = {}
    for key, file in _key_files(path).items():
        canon = _canonical(key)
        if canon is not None:
            key_files[canon] = (key, file)
    has_mtp = any(k.startswith("mtp.") for k in key_files)
    if with_mtp is None:
        with_mtp = has_mtp
    if with_mtp and config.mtp_num_hidden_layers < 1:
        layers = {int(m.group(1)) for k in key_files
                  if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
        config = dataclasses.replace(config, mtp_num_hidden_layers=max(1, len(layers)),
                                     raw=config.raw)
    entries = _entries(config, with_mtp,
                       fused=lambda prefix: prefix + "experts.gate_up_proj" in key_files)
    expected = {k for e in entries for k in e.keys}
    ignorable = set()
    if not with_mtp:
        ignorable |= {k for k in key_files if k.startswith("mtp.")}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    missing = expected - set(key_files)
    unexpected = set(key_files) - expected - ignorable
    if missing or unexpected:
        msg = [f"load_pretrained: checkpoint {path} does not match the "
               f"{config.model_type} config"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise ValueError("; ".join(msg))

    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(
        config, with_mtp=with_mtp, dtype=dtype, param_dtype=param_dtype, precision=precision,
        rngs=nnx.Rngs(0)))
    if mesh is None:
        place = lambda path, value: jnp.asarray(value)
    else:
        specs, perms = param_specs(model, mesh), permutations(model, tp)

        def place(path, value):
            if path in perms:
                value = value[..., perms[path]]
            return jax.device_put(value, NamedSharding(mesh, specs[path]))
    reader = _Reader()
    try:
        for entry in entries:
            hf = [reader.get(*key_files[k][::-1]) for k in entry.keys]
            values = entry.load(hf)
            del hf
            for p, value in zip(entry.paths, values):
                var = _variable(model, p)
                want = tuple(var.get_value().shape)
                if tuple(value.shape) != want:
                    raise ValueError(f"load_pretrained: {entry.keys[0]}{' ...' * (len(entry.keys) > 1)}"
                                     f" gives shape {tuple(value.shape)} for parameter "
                                     f"{'.'.join(map(str, p))}, which has shape {want}")
                var.set_value(place(tuple(p), np.asarray(value).astype(param_dtype)))
    finally:
        reader.close()
    leftovers = [p for p, v in nnx.to_flat_state(nnx.state(model))
                 if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftovers:  # a mapping bug, not a user error
        raise RuntimeError(f"load_pretrained: parameters not loaded: {leftovers}")
    if mesh is not None:
        attach_mesh(model, mesh)
    # Where it came from, so that save_pretrained can carry the tokenizer and generation
    # settings along (a plain attribute: static, not a parameter).
    model.pretrained_path = os.path.abspath(path)
    return model


# Files of a HF directory that are not weights or config.json: the tokenizer and the generation
# settings. save_pretrained copies those present from the directory the model was loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
GENERATION_FILES = ("generation_config.json",)


def _copy_files(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)


def _write_tokenizer(model, path: str, tokenizer) -> None:
    """save_pretrained's tokenizer= (see there)."""
    source = getattr(model, "pretrained_path", None)
    if tokenizer is False:
        names = ()
    elif tokenizer is None:
        names = TOKENIZER_FILES
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = os.fspath(tokenizer)
        if os.path.isdir(tokenizer):
            _copy_files(tokenizer, path, TOKENIZER_FILES)
        elif os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.json"))
        else:
            raise ValueError(f"save_pretrained: tokenizer= {tokenizer!r} is neither a "
                             "tokenizer.json file nor a directory")
        names = ()
    elif hasattr(tokenizer, "save") and hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        tokenizer.save(os.path.join(path, "tokenizer.json"))
        names = ()
    else:
        raise ValueError(f"save_pretrained: tokenizer= expected None, False, a path or a "
                         f"tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if source is not None and os.path.isdir(source):
        _copy_files(source, path, tuple(names) + GENERATION_FILES)


def save_pretrained(model: Qwen3NextForCausalLM, path, *, max_shard_bytes: int = 5 << 30,
                    dtype=None, tokenizer=None) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes), and the
    tokenizer and generation settings, so that the directory loads and generates as it stands.

    Keys use the prefix the config implies (`model.language_model.` for a multimodal Qwen3.5
    config, else `model.`), per-expert MoE names, and `mtp.*` when the model has an MTP head.
    dtype: cast every tensor to it (default: keep the parameter dtypes).
    tokenizer: None copies the tokenizer files (`TOKENIZER_FILES`) of the directory the model
    was loaded from, if any; a `tokenizers.Tokenizer` is saved as tokenizer.json; a path copies
    a tokenizer.json file or a directory's tokenizer files; False writes none.
    generation_config.json is copied from the directory the model was loaded from, if present.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config
    raw = config.to_dict()
    prefix = "model."
    if raw.get("model_type") in ("qwen3_5", "qwen3_5_moe"):
        prefix = _MULTIMODAL_PREFIX
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    _write_tokenizer(model, path, tokenizer)
    shards, current, size = [], {}, 0
    for entry in _entries(config, model.mtp is not None):
        params = [canonical(model, p, np.asarray(_variable(model, p).get_value()))
                  for p in entry.paths]
        for key, array in zip(entry.keys, entry.save(params)):
            array = np.ascontiguousarray(array if dtype is None else
                                         array.astype(jnp.dtype(dtype)))
            if key.startswith("model."):
                key = prefix + key[len("model."):]
            if current and size + array.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = array
            size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(a.nbytes for a in shard.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)
