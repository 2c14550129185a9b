"""The MTP head against a transcription of its formula built from transformers modules.

transformers' causal-LM classes drop `mtp.*`, so the fixture keeps the MTP weights in their own
file (tests/fixtures/hf/<spec>/mtp.safetensors, written by the regeneration script) in the
layout of released checkpoints: mtp.fc, mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden,
mtp.layers.0.* (a full-attention decoder layer, MoE experts fused as transformers keeps them in
memory), mtp.norm. The test makes it the second shard of a sharded checkpoint next to the model
saved by `save_pretrained`. The reference logits (read from the fixture, no torch needed) come
from  h_out = norm(layer(fc(cat[norm_e(embed(next)), norm_h(hidden)])));  lm_head(h_out),
written with transformers' own layer, norm and head classes.
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import hf_fixtures as F
from model_runner import Runner

from gdn_jax.models import Qwen3NextForCausalLM

RTOL = 1e-4


@pytest.fixture(scope="module", params=F.MTP_SPECS, ids=lambda s: s.id)
def mtp_pair(request, tmp_path_factory):
    spec = request.param
    path = tmp_path_factory.mktemp("mtp-" + spec.id)
    for name in ("config.json", "model.safetensors", "mtp.safetensors"):
        shutil.copyfile(spec.dir / name, path / name)
    weight_map = {}
    for name in ("model.safetensors", "mtp.safetensors"):
        with safe_open(str(path / name), "np") as f:
            weight_map.update({k: name for k in f.keys()})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=jnp.float32)
    return F.reference(spec), Runner(model), path


@pytest.mark.slow
def test_mtp_head_matches_transcription(mtp_pair, record_property):
    ref, runner, _ = mtp_pair
    lengths = list(F.MTP["prompt_lengths"])
    prompts = [ref["mtp_prompts"][i, :n].tolist() for i, n in enumerate(lengths)]
    slots = [1, 0]
    model = runner.model
    assert model.mtp is not None and len(model.mtp.layers) == 1
    cache = model.init_cache(2, 16, t_max=2, state_dtype=jnp.float32)
    toks = np.zeros((2, max(lengths)), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    out = runner(toks, cache, slots, mode="prefill", lengths=lengths)
    # MTP prefill: position t pairs hidden_t with token t + 1 (the last one: a sampled token)
    sampled = ref["mtp_sampled"]
    nxt = np.zeros_like(toks)
    for i, p in enumerate(prompts):
        nxt[i, :len(p)] = p[1:] + [int(sampled[i])]
    mtp = runner.mtp(nxt, out.hidden, out.cache, slots, mode="prefill", lengths=lengths)
    errs = {"mtp_prefill": 0.0, "mtp_decode": 0.0}
    for i, p in enumerate(prompts):
        want = ref["mtp_prefill_logits"][i, :len(p)]
        errs["mtp_prefill"] = max(errs["mtp_prefill"], F.rel_err(mtp.logits[i, :len(p)], want))
    # one more step: the target decodes the sampled token, the MTP drafts from its hidden
    out = runner(sampled[:, None], mtp.cache, slots, mode="decode")
    mtp = runner.mtp(ref["mtp_draft_in"][:, None], out.hidden, out.cache, slots, mode="decode")
    for i in range(len(prompts)):
        errs["mtp_decode"] = max(errs["mtp_decode"], F.rel_err(mtp.logits[i, 0],
                                                               ref["mtp_decode_logits"][i]))
    record_property("max_rel_err", errs)
    print(f"\n{errs}")
    assert max(errs.values()) <= RTOL, errs


def test_mtp_weights_ignored_or_required(mtp_pair, tmp_path):
    _, _, path = mtp_pair
    model = Qwen3NextForCausalLM.from_pretrained(path, with_mtp=False)
    assert model.mtp is None
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    with pytest.raises(ValueError, match=r"missing keys .*mtp\.fc\.weight"):
        Qwen3NextForCausalLM.from_pretrained(plain, with_mtp=True)
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_forward(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 8)),
                          model.init_cache(1, 4), jnp.zeros((1,), jnp.int32))
