"""Qwen3-Next / Qwen3.5 models loaded from transformers checkpoints match transformers (fp32).

Tiny random models of both families (dense and MoE, GVA 1 and 2, both layer types), saved by
transformers' `save_pretrained` and loaded by gdn-jax, against transformers' logits: both read
from the committed fixtures (tests/hf_fixtures.py; no torch needed). fp32 state, matmuls at
Precision.HIGHEST. Our batched ragged prefill is compared per prompt with transformers (whose
right-padded batches corrupt its linear-attention state), decode and verify with transformers'
cached path, and the state after a commit (rollback to the accepted count) with a transformers
recompute of the kept sequence.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from model_runner import Runner

from gdn_jax.models import Qwen3NextForCausalLM

RTOL = 1e-4  # max |ours - HF| / max |HF| over the logits compared
SLOTS = (3, 0, 2, -1)  # the last row is padding
NUM_SLOTS, MAX_LEN, T_MAX = 4, 40, 4
assert len(SLOTS) == F.DECODE["rows"] == F.VERIFY["rows"]


@pytest.fixture(scope="module", params=F.SPECS, ids=lambda s: s.id)
def pair(request):
    spec = request.param
    model = Qwen3NextForCausalLM.from_pretrained(spec.dir, dtype=jnp.float32)
    return F.reference(spec), Runner(model)


def _prompts(padded, lengths):
    return [padded[i, :n].tolist() for i, n in enumerate(lengths)]


def _padded(seqs, T=None):
    T = T or max(len(s) for s in seqs)
    out = np.zeros((len(SLOTS), T), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def _prefill(runner, prompts, commit_mode="replay"):
    cache = runner.model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX, state_dtype=jnp.float32,
                                    commit_mode=commit_mode)
    lengths = [len(p) for p in prompts] + [2]
    return runner(_padded(prompts), cache, SLOTS, mode="prefill", lengths=lengths)


@pytest.mark.slow
def test_prefill_and_decode_match_transformers(pair, record_property):
    ref, runner = pair
    prompts = _prompts(ref["decode_prompts"], F.DECODE["prompt_lengths"])
    out = _prefill(runner, prompts)
    errs = {"prefill": 0.0, "decode": 0.0}
    for i, p in enumerate(prompts):
        want = ref["decode_prefill_logits"][i, :len(p)]
        errs["prefill"] = max(errs["prefill"], F.rel_err(out.logits[i, :len(p)], want))
    cache = out.cache
    for t, nxt in enumerate(ref["decode_tokens"]):
        out = runner(nxt[:, None], cache, SLOTS, mode="decode")
        cache = out.cache
        for i in range(len(prompts)):
            want = ref["decode_logits"][t, i]
            errs["decode"] = max(errs["decode"], F.rel_err(out.logits[i], want[None]))
    record_property("max_rel_err", errs)
    print(f"\n{errs}")
    assert errs["prefill"] <= RTOL and errs["decode"] <= RTOL, errs


@pytest.mark.parametrize("commit_mode", ["replay", "intermediate"])
@pytest.mark.slow
def test_verify_and_rollback_match_transformers(pair, commit_mode, record_property):
    ref, runner = pair
    seqs = _prompts(ref["verify_prompts"], F.VERIFY["prompt_lengths"])
    out = _prefill(runner, seqs, commit_mode)
    cache = out.cache
    # one decode step, so verify starts from a cache that has seen both paths
    nxt = ref["verify_next"]
    cache = runner(nxt[:, None], cache, SLOTS, mode="decode").cache
    seqs = [s + [int(nxt[i])] for i, s in enumerate(seqs)]
    errs = {"verify_cached": 0.0, "verify_after_commit": 0.0, "decode_after_commit": 0.0}
    for round_, accepted in enumerate(F.VERIFY["accepted"]):
        draft = ref["verify_drafts"][round_]
        out = runner(draft, cache, SLOTS, mode="verify")
        # round 0: transformers' cached multi-token path from the prompt's state;
        # round 1 (after a rollback): transformers recomputed the kept sequence
        key = "verify_cached" if round_ == 0 else "verify_after_commit"
        for i in range(len(seqs)):
            errs[key] = max(errs[key], F.rel_err(out.logits[i], ref["verify_logits"][round_, i]))
        cache = runner.commit(out.cache, SLOTS, accepted)
        seqs = [s + draft[i, :accepted[i]].tolist() for i, s in enumerate(seqs)]
    out = runner(ref["verify_final"][:, None], cache, SLOTS, mode="decode")
    for i in range(len(seqs)):
        errs["decode_after_commit"] = max(errs["decode_after_commit"], F.rel_err(
            out.logits[i, 0], ref["verify_decode_logits"][i]))
    # KV lengths (one array for every attention layer) follow the kept tokens; the padding row's
    # slot -1 touched nothing
    want_len = np.zeros(NUM_SLOTS, np.int32)
    for slot, s in zip(SLOTS, seqs):
        want_len[slot] = len(s) + 1
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), want_len)
    record_property("max_rel_err", errs)
    print(f"\n{commit_mode} {errs}")
    assert max(errs.values()) <= RTOL, errs
