"""Checkpoint I/O: save/load round trips (both families, sharded, MTP, bf16, the multimodal prefix),
the errors for a renamed key, a missing shard, a bad config and a wrong shape, and saving a
transformers checkpoint back to transformers' own tensors (the committed fixtures)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gdn_jax.models import ModelConfig, load_pretrained, save_pretrained
import hf_fixtures as F
from tiny_models import random_model

_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
               layer_types=("linear_attention", "full_attention"), num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
               linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=32)
CONFIGS = {
    "next-moe": ModelConfig(model_type="qwen3_next", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, shared_expert_intermediate_size=24,
                            intermediate_size=48, mtp_num_hidden_layers=1, **_COMMON),
    "q35-dense-tied": ModelConfig(model_type="qwen3_5_text", intermediate_size=48,
                                  tie_word_embeddings=True, **_COMMON),
    "q35-moe": ModelConfig(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=16, shared_expert_intermediate_size=24,
                           mtp_num_hidden_layers=1, **_COMMON),
}


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value(), np.float32)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip(name, tmp_path):
    model = random_model(CONFIGS[name])
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = load_pretrained(tmp_path)
    assert (back.mtp is None) == (model.mtp is None)
    _assert_same_params(model, back)


def test_round_trip_bf16(tmp_path):
    model = random_model(CONFIGS["next-moe"], dtype=jnp.bfloat16)
    save_pretrained(model, tmp_path)
    back = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert back.layers[0].linear_attn.in_proj_qkvz.kernel.get_value().dtype == jnp.bfloat16
    _assert_same_params(model, back)
    # cast on load: fp32 parameters from a bf16 checkpoint
    up = load_pretrained(tmp_path, dtype=jnp.float32)
    assert up.norm.weight.get_value().dtype == jnp.float32


def test_multimodal_prefix_and_vision_keys(tmp_path):
    model = random_model(CONFIGS["q35-dense-tied"])
    save_pretrained(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    wrapper = {"model_type": "qwen3_5", "text_config": raw, "vision_config": {"depth": 1},
               "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    back = load_pretrained(tmp_path)
    _assert_same_params(model, back)
    out = tmp_path / "again"
    save_pretrained(back, out)  # the wrapper config keeps the multimodal prefix
    keys = load_file(out / "model.safetensors").keys()
    assert all(k.startswith("model.language_model.") for k in keys)


def test_renamed_key(tmp_path):
    save_pretrained(random_model(CONFIGS["q35-moe"]), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = "model.layers.0.linear_attn.in_proj_z.weight"
    tensors["model.layers.0.linear_attn.in_proj_zz.weight"] = tensors.pop(old)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert f"missing keys (1): {old}" in msg
    assert "unexpected keys (1): model.layers.0.linear_attn.in_proj_zz.weight" in msg


def test_missing_shard(tmp_path):
    config = ModelConfig(model_type="qwen3_next", num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         intermediate_size=48, mtp_num_hidden_layers=1,
                         **{**_COMMON, "linear_num_key_heads": 4, "linear_num_value_heads": 8})
    save_pretrained(random_model(config), tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ValueError, match=f"shard files .* are missing .*{shards[1].name}"):
        load_pretrained(tmp_path)


def test_unsupported_config_field(tmp_path):
    save_pretrained(random_model(CONFIGS["q35-dense-tied"]), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["use_qk_gelu"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported config fields \['use_qk_gelu'\]"):
        load_pretrained(tmp_path)


def test_wrong_shape(tmp_path):
    save_pretrained(random_model(CONFIGS["q35-dense-tied"]), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = tensors[key][:16]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} gives shape \(32, 16\) .* has shape \(32, 32\)"):
        load_pretrained(tmp_path)


def test_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)
    save_pretrained(random_model(CONFIGS["q35-dense-tied"]), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors.index.json"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("spec", F.SPECS, ids=lambda s: s.id)
def test_save_writes_what_transformers_saved(spec, tmp_path):
    """transformers checkpoint -> gdn-jax -> save gives transformers' own tensors, bit for bit,
    under the same names, and an equivalent config (the inverse layout maps are right, so
    transformers loads what we save as it loads its own; the live check is in
    test_hf_fixtures.py)."""
    save_pretrained(load_pretrained(spec.dir), tmp_path)
    want = load_file(spec.dir / "model.safetensors")
    got = load_file(tmp_path / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    config = [ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
              for d in (spec.dir, tmp_path)]
    assert config[0] == config[1]


# ---- loader errors name the file and the field; save_pretrained carries the tokenizer


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "qwen3_5_text",\n', "is not valid JSON"),
    ('["not", "an", "object"]', "must hold a JSON object"),
    (None, r"fields expected numbers, got hidden_size='wide'"),
], ids=["truncated", "not-an-object", "string-field"])
def test_config_errors_name_the_file(tmp_path, text, message):
    save_pretrained(random_model(CONFIGS["q35-dense-tied"]), tmp_path)
    config = tmp_path / "config.json"
    if text is None:
        cfg = json.loads(config.read_text())
        cfg["hidden_size"] = "wide"
        text = json.dumps(cfg)
    config.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_pretrained(tmp_path)
    assert str(config) in str(e.value)


def test_weight_file_errors_name_the_file(tmp_path):
    config = ModelConfig(model_type="qwen3_next", num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         intermediate_size=48, mtp_num_hidden_layers=1,
                         **{**_COMMON, "linear_num_key_heads": 4, "linear_num_value_heads": 8})
    save_pretrained(random_model(config), tmp_path, max_shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-10])
    with pytest.raises(ValueError, match=f"{index} is not valid JSON"):
        load_pretrained(tmp_path)
    index.unlink()
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read {shard} as safetensors"):
        load_pretrained(tmp_path)


def test_save_pretrained_carries_tokenizer_and_generation_config(tmp_path):
    src, out, given = tmp_path / "src", tmp_path / "out", tmp_path / "given"
    save_pretrained(random_model(CONFIGS["q35-dense-tied"]), src)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]
    (src / "tokenizer.json").write_text('{"tok": 1}')
    (src / "generation_config.json").write_text('{"eos_token_id": 3}')
    model = load_pretrained(src)
    assert model.pretrained_path == str(src)
    save_pretrained(model, out)
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    assert (out / "generation_config.json").read_text() == '{"eos_token_id": 3}'
    save_pretrained(model, out)  # saving over itself keeps the files
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    other = tmp_path / "other.json"
    other.write_text('{"tok": 2}')
    save_pretrained(model, given, tokenizer=str(other))
    assert (given / "tokenizer.json").read_text() == '{"tok": 2}'
    with pytest.raises(ValueError, match="tokenizer= .* is neither"):
        save_pretrained(model, given, tokenizer=str(tmp_path / "nope.json"))
    save_pretrained(model, tmp_path / "bare", tokenizer=False)
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_load_puts_each_device_its_shards_only(tp, tmp_path):
    """A sharded checkpoint loaded onto a ("tp",) mesh: each tensor goes from the file straight
    to its NamedSharding, so a device holds the replicated parameters plus 1 / tp of the
    head-parallel ones (the experts, the projections), never the whole model."""
    import jax
    from jax.sharding import NamedSharding

    config = ModelConfig(model_type="qwen3_next", num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         intermediate_size=48, mtp_num_hidden_layers=1,
                         **{**_COMMON, "linear_num_key_heads": 4, "linear_num_value_heads": 8})
    save_pretrained(random_model(config), tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
    model = load_pretrained(tmp_path, mesh=mesh)
    per_device = dict.fromkeys(mesh.devices.flat, 0)
    total = replicated = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var.get_value()
        assert isinstance(arr.sharding, NamedSharding), path
        assert set(arr.sharding.device_set) == set(mesh.devices.flat), path
        total += arr.nbytes
        split = "tp" in jax.tree.leaves(tuple(arr.sharding.spec))
        replicated += 0 if split else arr.nbytes
        for shard in arr.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert replicated < total / 2  # the test means something: most bytes split
    for device, nbytes in per_device.items():
        assert nbytes == replicated + (total - replicated) // tp, device
    assert max(per_device.values()) < total
