"""ModelConfig: both families, old and new config layouts, and the errors that list fields."""

from __future__ import annotations

import pytest

from gdn_jax.models import ModelConfig

NEW_NEXT = {
    "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "vocab_size": 151936,
    "hidden_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "intermediate_size": 5120, "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
    + ["full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "5.24.0",
}


def _old_layout(d):
    d = {k: v for k, v in d.items() if k not in ("layer_types", "rope_parameters")}
    d.update(rope_theta=1e7, partial_rotary_factor=0.25, full_attention_interval=4,
             rope_scaling=None, torch_dtype="bfloat16", max_window_layers=28,
             use_sliding_window=False, sliding_window=None)
    return d


def test_new_and_old_layouts_agree():
    new = ModelConfig.from_dict(NEW_NEXT)
    old = ModelConfig.from_dict(_old_layout(NEW_NEXT))
    assert new == old
    assert new.layer_types[3] == "full_attention" and new.layer_types[2] == "linear_attention"
    assert new.rotary_dim == 64 and new.conv_dim == 2 * 16 * 128 + 32 * 128
    assert new.interleaved_gdn_projections and new.is_moe_layer(0)


def test_qwen3_5_multimodal_wrapper():
    text = {k: v for k, v in NEW_NEXT.items() if k not in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
        "mlp_only_layers", "architectures")}
    text["model_type"] = "qwen3_5_text"
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[11, 11, 10],
                                   mrope_interleaved=True)
    text.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
                attn_output_gate=True, mamba_ssm_dtype="float32")
    wrapper = {"model_type": "qwen3_5", "text_config": text, "vision_config": {"depth": 2},
               "image_token_id": 1, "tie_word_embeddings": True}
    c = ModelConfig.from_dict(wrapper)
    assert c.model_type == "qwen3_5_text" and not c.interleaved_gdn_projections
    assert c.tie_word_embeddings and c.mtp_num_hidden_layers == 1 and not c.is_moe_layer(0)


def test_unknown_fields_are_listed():
    with pytest.raises(ValueError, match=r"unsupported config fields \['foo', 'zeta'\]"):
        ModelConfig.from_dict(dict(NEW_NEXT, foo=1, zeta=2))


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     r"rope_parameters keys \['factor'\].*rope_type='yarn'"),
    ({"layer_types": ["sliding_attention"] * 8}, "layer_types may hold only"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_unsupported_values(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(dict(NEW_NEXT, **change))


def test_unknown_family_and_missing_fields():
    with pytest.raises(ValueError, match="model_type expected one of"):
        ModelConfig.from_dict(dict(NEW_NEXT, model_type="llama"))
    d = dict(NEW_NEXT)
    del d["hidden_size"], d["vocab_size"]
    with pytest.raises(ValueError, match=r"missing required fields \['vocab_size', 'hidden_size'\]"):
        ModelConfig.from_dict(d)
