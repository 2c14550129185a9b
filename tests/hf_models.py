"""Tiny random Hugging Face Qwen3-Next / Qwen3.5 models, the oracle of tests/models.

Every parameter is randomised (HF's init zeroes the (1 + w) norms and sets the gated norm to ones,
which hides `1 + w` and gate-order mistakes). Import only after `pytest.importorskip("transformers")`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import transformers as tr

# name -> (config class, model class, config fields). Sizes: hidden 32-48, head dims 16-32.
_BASE = dict(vocab_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             linear_key_head_dim=16, linear_value_head_dim=32, linear_conv_kernel_dim=4,
             rms_norm_eps=1e-6, max_position_embeddings=256,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.5})


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    moe: bool
    gva: int
    tie: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}-{'moe' if self.moe else 'dense'}-gva{self.gva}" + (
            "-tied" if self.tie else "")


SPECS = (
    Spec("qwen3_next", moe=False, gva=2),
    Spec("qwen3_next", moe=True, gva=1),
    Spec("qwen3_5", moe=False, gva=1, tie=True),
    Spec("qwen3_5_moe", moe=True, gva=2),
)


def hf_config(spec: Spec):
    fields = dict(_BASE, hidden_size=48 if spec.moe else 32, num_hidden_layers=3,
                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                  linear_num_key_heads=2, linear_num_value_heads=2 * spec.gva,
                  tie_word_embeddings=spec.tie)
    moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
               shared_expert_intermediate_size=40)
    if spec.family == "qwen3_next":
        fields.update(intermediate_size=64)
        fields.update(moe if spec.moe else dict(num_experts=0))
        return tr.Qwen3NextConfig(**fields), tr.Qwen3NextForCausalLM
    if spec.family == "qwen3_5":
        return tr.Qwen3_5TextConfig(intermediate_size=64, **fields), tr.Qwen3_5ForCausalLM
    return tr.Qwen3_5MoeTextConfig(**fields, **moe), tr.Qwen3_5MoeForCausalLM


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Draw every parameter: weights ~ N(0, 1/fan_in), norms ~ N(0, 0.3) (N(1, 0.3) for the
    gated norm), A_log = log U(0.1, 2), dt_bias ~ N(0, 0.5), embeddings ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = lambda: torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 1.9 + 0.1))
            elif name.endswith("dt_bias"):
                p.copy_(r() * 0.5)
            elif "embed_tokens" in name:
                p.copy_(r())
            elif p.ndim == 1:
                p.copy_(r() * 0.3 + (1.0 if "linear_attn.norm" in name else 0.0))
            else:
                p.copy_(r() / math.sqrt(p.shape[-1]))


def make_hf_model(spec: Spec, seed: int = 0):
    """A randomised fp32 HF causal LM in eval mode (eager attention)."""
    config, cls = hf_config(spec)
    torch.manual_seed(seed)
    model = cls(config).eval().float()
    randomize_(model, seed)
    model.set_attn_implementation("eager")
    return model


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    """Logits [T, vocab] of one unpadded sequence (a list of ints), no cache."""
    out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


@torch.no_grad()
def hf_hidden(model, ids) -> np.ndarray:
    """Final-norm hidden states [T, hidden] of one sequence."""
    return model.model(torch.tensor([ids]), use_cache=False).last_hidden_state[0].numpy()


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
