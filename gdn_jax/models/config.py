"""`ModelConfig`: the text-model configuration of Qwen3-Next and Qwen3.5, parsed from a HF config.json.

Families (by `model_type`):
  qwen3_next                          interleaved GDN projections (`in_proj_qkvz`, `in_proj_ba`),
                                      MoE by `num_experts` / `decoder_sparse_step` / `mlp_only_layers`
  qwen3_5_text  (qwen3_5 with a       split GDN projections (`in_proj_qkv/z/b/a`), dense MLP
                 nested text_config)
  qwen3_5_moe_text (qwen3_5_moe)      split GDN projections, MoE in every layer

Both config layouts are read: new files nest `rope_theta` / `partial_rotary_factor` in
`rope_parameters` and list `layer_types`; older ones keep them at the top level and give
`full_attention_interval`. A field this code does not know, or a known field with a value it does
not implement (another activation, attention bias, a rope scaling type, ...), raises a ValueError
that lists every such field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_WRAPPERS = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
LAYER_TYPES = ("linear_attention", "full_attention")

# Fields that do not change the inference math (training, tokenizer or bookkeeping fields).
_IGNORED = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_window_layers", "mamba_ssm_dtype",
    "_name_or_path", "auto_map", "model_type", "name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "use_return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "id2label", "label2id", "problem_type",
})
# Fields of the multimodal wrapper (Qwen3.5 releases) next to `text_config`.
_WRAPPER_FIELDS = frozenset({
    "text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "tie_word_embeddings",
}) | _IGNORED
# Fields read into ModelConfig (or checked for a supported value).
_USED = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "full_attention_interval",
    "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "intermediate_size", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps", "rope_parameters", "rope_scaling",
    "rope_theta", "partial_rotary_factor", "tie_word_embeddings", "max_position_embeddings",
    "hidden_act", "attention_bias", "attn_output_gate", "use_sliding_window", "sliding_window",
    "mtp_num_hidden_layers", "num_nextn_predict_layers", "mtp_use_dedicated_embeddings",
})
# Numeric fields: a string or a list there is reported by name, not as a bare int() error.
_NUMBERS = ("vocab_size", "hidden_size", "num_hidden_layers", "full_attention_interval",
            "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
            "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "intermediate_size", "num_experts", "num_experts_per_tok",
            "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
            "rms_norm_eps", "rope_theta", "partial_rotary_factor", "max_position_embeddings",
            "mtp_num_hidden_layers", "num_nextn_predict_layers")
_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section",
                        "mrope_interleaved"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of a Qwen3-Next / Qwen3.5 text model that the math depends on.

    `raw` keeps the config.json dict it was parsed from (written back by `save_pretrained`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    mtp_num_hidden_layers: int = 0
    raw: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"ModelConfig: model_type expected one of {FAMILIES}, got "
                             f"{self.model_type!r}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"ModelConfig: layer_types may hold only {LAYER_TYPES}, got {bad}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"ModelConfig: layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers = {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"ModelConfig: num_attention_heads ({self.num_attention_heads}) must "
                             f"be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"ModelConfig: linear_num_value_heads ({self.linear_num_value_heads}) "
                             f"must be a multiple of linear_num_key_heads "
                             f"({self.linear_num_key_heads})")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"ModelConfig: num_experts_per_tok ({self.num_experts_per_tok}) must "
                             f"be in 1..num_experts ({self.num_experts})")
        if self.rotary_dim % 2:
            raise ValueError(f"ModelConfig: the rotary dim int(head_dim * partial_rotary_factor) = "
                             f"{self.rotary_dim} must be even")

    # ---- derived sizes

    @property
    def interleaved_gdn_projections(self) -> bool:
        """True for Qwen3-Next's per-key-head `in_proj_qkvz` / `in_proj_ba` checkpoint layout."""
        return self.model_type == "qwen3_next"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN conv: [q | k | v]."""
        from gdn_jax.modules.cache import conv_dim  # config stays importable without Flax

        return conv_dim(self.linear_num_key_heads, self.linear_key_head_dim,
                        self.linear_num_value_heads, self.linear_value_head_dim)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse MoE block (else the dense MLP)."""
        if self.num_experts <= 0:
            return False
        if self.model_type == "qwen3_5_moe_text":
            return True
        return (layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def mtp_is_moe(self) -> bool:
        """The MTP decoder layer uses the MoE block whenever the model has experts."""
        return self.num_experts > 0

    # ---- parsing

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Parse a HF config dict (either family, old or new layout, plain or multimodal wrapper)."""
        d = dict(d)
        model_type = d.get("model_type")
        raw = dict(d)
        tie_default = None
        if model_type in _WRAPPERS:
            unknown = sorted(set(d) - _WRAPPER_FIELDS)
            if unknown:
                raise ValueError(f"ModelConfig: unsupported config fields {unknown} in a "
                                 f"{model_type!r} config")
            if "text_config" not in d:
                raise ValueError(f"ModelConfig: a {model_type!r} config needs a text_config")
            tie_default = d.get("tie_word_embeddings")
            d = dict(d["text_config"])
            d.setdefault("model_type", _WRAPPERS[model_type])
            if tie_default is not None:  # the wrapper's flag ties the LM head of its model
                d["tie_word_embeddings"] = tie_default
            model_type = d["model_type"]
        if model_type not in FAMILIES:
            raise ValueError(f"ModelConfig: model_type expected one of "
                             f"{FAMILIES + tuple(_WRAPPERS)}, got {model_type!r}")
        unknown = sorted(set(d) - _USED - _IGNORED)
        if unknown:
            raise ValueError(f"ModelConfig: unsupported config fields {unknown} (a field gdn-jax "
                             "does not implement; remove it only if it does not change the math)")

        unsupported = []

        def expect(name, ok, want):
            if name in d and d[name] is not None and not ok(d[name]):
                unsupported.append(f"{name}={d[name]!r} (supported: {want})")

        expect("hidden_act", lambda x: x == "silu", "'silu'")
        expect("attention_bias", lambda x: x is False, "false")
        expect("attn_output_gate", lambda x: x is True, "true")
        expect("use_sliding_window", lambda x: x is False, "false")
        expect("mtp_use_dedicated_embeddings", lambda x: x is False, "false")
        if d.get("sliding_window") is not None and d.get("use_sliding_window", False):
            unsupported.append(f"sliding_window={d['sliding_window']!r} (supported: null)")

        rope = {}
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(d.get(key), dict):
                rope.update(d[key])
            elif d.get(key) is not None:
                unsupported.append(f"{key}={d[key]!r} (supported: a dict or null)")
        bad_rope = sorted(set(rope) - _ROPE_KEYS)
        if bad_rope:
            unsupported.append(f"rope_parameters keys {bad_rope} (supported: {sorted(_ROPE_KEYS)})")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            unsupported.append(f"rope_type={rope_type!r} (supported: 'default'; text-only mrope)")
        if unsupported:
            raise ValueError("ModelConfig: unsupported config values: " + "; ".join(unsupported))
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))

        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads",
                               "linear_num_key_heads", "linear_num_value_heads",
                               "linear_key_head_dim", "linear_value_head_dim") if k not in d]
        if missing:
            raise ValueError(f"ModelConfig: config is missing required fields {missing}")
        bad = [f"{k}={d[k]!r}" for k in _NUMBERS
               if d.get(k) is not None and (isinstance(d[k], bool)
                                            or not isinstance(d[k], (int, float)))]
        if bad:
            raise ValueError(f"ModelConfig: fields expected numbers, got {', '.join(bad)}")
        n = int(d["num_hidden_layers"])
        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = int(d.get("full_attention_interval", 4))
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                           for i in range(n)]
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        num_experts = int(d.get("num_experts") or 0)
        if model_type == "qwen3_5_text":
            num_experts = 0
        mtp = d.get("mtp_num_hidden_layers", d.get("num_nextn_predict_layers", 0)) or 0
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=n,
            layer_types=tuple(layer_types),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d["num_key_value_heads"]),
            head_dim=int(head_dim),
            linear_num_key_heads=int(d["linear_num_key_heads"]),
            linear_num_value_heads=int(d["linear_num_value_heads"]),
            linear_key_head_dim=int(d["linear_key_head_dim"]),
            linear_value_head_dim=int(d["linear_value_head_dim"]),
            linear_conv_kernel_dim=int(d.get("linear_conv_kernel_dim", 4)),
            intermediate_size=int(d.get("intermediate_size") or 0),
            num_experts=num_experts,
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if num_experts else 0,
            moe_intermediate_size=int(d.get("moe_intermediate_size") or 0) if num_experts else 0,
            shared_expert_intermediate_size=(
                int(d.get("shared_expert_intermediate_size") or 0) if num_experts else 0),
            norm_topk_prob=(True if model_type == "qwen3_5_moe_text"
                            else bool(d.get("norm_topk_prob", True))),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            partial_rotary_factor=float(partial),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            mtp_num_hidden_layers=int(mtp),
            raw=raw,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` from a HF model directory; every error names the file (and the
        field, where one is at fault)."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ValueError(f"ModelConfig.from_pretrained: no config.json in {os.fspath(path)!r}")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"ModelConfig.from_pretrained: {file} is not valid JSON ({e})") \
                from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"ModelConfig.from_pretrained: cannot read {file} ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_pretrained: {file} must hold a JSON object, got "
                             f"{type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def to_dict(self) -> dict:
        """A HF config dict: the one parsed (`raw`) when there is one, else a new-layout dict."""
        if self.raw is not None:
            return dict(self.raw)
        d = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
        }
        if self.intermediate_size:
            d["intermediate_size"] = self.intermediate_size
        if self.num_experts:
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     shared_expert_intermediate_size=self.shared_expert_intermediate_size)
            if self.model_type == "qwen3_next":
                d.update(norm_topk_prob=self.norm_topk_prob,
                         decoder_sparse_step=self.decoder_sparse_step,
                         mlp_only_layers=list(self.mlp_only_layers))
        if self.mtp_num_hidden_layers:
            d["mtp_num_hidden_layers"] = self.mtp_num_hidden_layers
        return d
