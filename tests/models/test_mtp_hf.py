"""The MTP head against a transcription of its formula built from transformers modules.

transformers' causal-LM classes drop `mtp.*`, so the test writes the MTP weights itself (a second
shard of a sharded checkpoint, next to the model saved by `save_pretrained`), in the layout of
released checkpoints: mtp.fc, mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, mtp.layers.0.*
(a full-attention decoder layer, MoE experts fused as transformers keeps them in memory), mtp.norm.
Reference:  h_out = norm(layer(fc(cat[norm_e(embed(next)), norm_h(hidden)])));  lm_head(h_out).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_models as H  # noqa: E402
from model_runner import Runner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from gdn_jax.models import Qwen3NextForCausalLM  # noqa: E402

RTOL = 1e-4
MTP_SPECS = (H.SPECS[1], H.SPECS[2])  # Qwen3-Next MoE, Qwen3.5 dense tied


class _HFMtp(torch.nn.Module):
    """The MTP step written with transformers' own layer, norm and head classes."""

    def __init__(self, hf):
        super().__init__()
        c = hf.config
        full = c.layer_types.index("full_attention")
        self.hf = [hf]  # not a submodule
        norm_cls = type(hf.model.norm)
        self.fc = torch.nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.pre_fc_norm_embedding = norm_cls(c.hidden_size, eps=c.rms_norm_eps)
        self.pre_fc_norm_hidden = norm_cls(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = torch.nn.ModuleList([type(hf.model.layers[full])(c, full)])
        self.norm = norm_cls(c.hidden_size, eps=c.rms_norm_eps)

    @torch.no_grad()
    def forward(self, next_ids, hidden):
        hf = self.hf[0]
        T = len(next_ids)
        e = hf.model.embed_tokens(torch.tensor([next_ids]))
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(e),
                               self.pre_fc_norm_hidden(torch.as_tensor(hidden)[None])], -1))
        pos = torch.arange(T)[None]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        x = self.layers[0](x, position_embeddings=hf.model.rotary_emb(x, pos),
                           attention_mask=mask, position_ids=pos)
        return hf.lm_head(self.norm(x))[0].numpy()


@pytest.fixture(scope="module", params=MTP_SPECS, ids=lambda s: s.id)
def mtp_pair(request, tmp_path_factory):
    spec = request.param
    hf = H.make_hf_model(spec, seed=2)
    path = tmp_path_factory.mktemp("mtp-" + spec.id)
    hf.save_pretrained(path)
    ref = _HFMtp(hf).eval()
    H.randomize_(ref, seed=3)
    tensors = {f"mtp.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    save_file(tensors, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    with safe_open(str(path / "model.safetensors"), "np") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map.update({k: "mtp.safetensors" for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=jnp.float32)
    return hf, ref, Runner(model), path


@pytest.mark.slow
def test_mtp_head_matches_transcription(mtp_pair, record_property):
    hf, ref, runner, _ = mtp_pair
    V = hf.config.vocab_size
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, V, n).tolist() for n in (6, 3)]
    slots, lengths = [1, 0], [6, 3]
    model = runner.model
    assert model.mtp is not None and len(model.mtp.layers) == 1
    cache = model.init_cache(2, 16, t_max=2, state_dtype=jnp.float32)
    toks = np.zeros((2, 6), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    out = runner(toks, cache, slots, mode="prefill", lengths=lengths)
    # MTP prefill: position t pairs hidden_t with token t + 1 (the last one: a sampled token)
    sampled = rng.integers(0, V, 2)
    nxt = np.zeros_like(toks)
    for i, p in enumerate(prompts):
        nxt[i, :len(p)] = p[1:] + [int(sampled[i])]
    mtp = runner.mtp(nxt, out.hidden, out.cache, slots, mode="prefill", lengths=lengths)
    errs = {"mtp_prefill": 0.0, "mtp_decode": 0.0}
    for i, p in enumerate(prompts):
        want = ref(nxt[i, :len(p)].tolist(), H.hf_hidden(hf, p))
        errs["mtp_prefill"] = max(errs["mtp_prefill"], H.rel_err(mtp.logits[i, :len(p)], want))
    # one more step: the target decodes the sampled token, the MTP drafts from its hidden
    out = runner(sampled[:, None], mtp.cache, slots, mode="decode")
    draft_in = rng.integers(0, V, 2)
    mtp = runner.mtp(draft_in[:, None], out.hidden, out.cache, slots, mode="decode")
    for i, p in enumerate(prompts):
        seq = p + [int(sampled[i])]
        want = ref(seq[1:] + [int(draft_in[i])], H.hf_hidden(hf, seq))[-1]
        errs["mtp_decode"] = max(errs["mtp_decode"], H.rel_err(mtp.logits[i, 0], want))
    record_property("max_rel_err", errs)
    print(f"\n{errs}")
    assert max(errs.values()) <= RTOL, errs


def test_mtp_weights_ignored_or_required(mtp_pair, tmp_path):
    _, _, _, path = mtp_pair
    model = Qwen3NextForCausalLM.from_pretrained(path, with_mtp=False)
    assert model.mtp is None
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    with pytest.raises(ValueError, match=r"missing keys .*mtp\.fc\.weight"):
        Qwen3NextForCausalLM.from_pretrained(plain, with_mtp=True)
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_forward(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 8)),
                          model.init_cache(1, 4), jnp.zeros((1,), jnp.int32))
