"""Qwen3-Next / Qwen3.5 models loaded from transformers checkpoints match transformers (fp32).

Tiny random models of both families (dense and MoE, GVA 1 and 2, both layer types), saved with
`save_pretrained` and loaded by gdn-jax. fp32 state, matmuls at Precision.HIGHEST. Our batched
ragged prefill is compared per prompt with transformers (whose right-padded batches corrupt its
linear-attention state), decode and verify with transformers' cached path, and the state after a
commit (rollback to the accepted count) with a transformers recompute of the kept sequence.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_models as H  # noqa: E402
from model_runner import Runner  # noqa: E402

from gdn_jax.models import Qwen3NextForCausalLM  # noqa: E402

RTOL = 1e-4  # max |ours - HF| / max |HF| over the logits compared
PROMPT_LENGTHS = (7, 3, 5)
SLOTS = (3, 0, 2, -1)  # the last row is padding
NUM_SLOTS, MAX_LEN, T_MAX = 4, 40, 4


@pytest.fixture(scope="module", params=H.SPECS, ids=lambda s: s.id)
def pair(request, tmp_path_factory):
    spec = request.param
    hf = H.make_hf_model(spec, seed=1)
    path = tmp_path_factory.mktemp(spec.id)
    hf.save_pretrained(path)
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=jnp.float32)
    return hf, Runner(model)


def _prompts(rng, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


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


@torch.no_grad()
def _hf_cached(hf, ids, cache=None):
    out = hf(torch.tensor([ids]), cache=cache, use_cache=True)
    return out.logits[0].numpy(), out.cache


@pytest.mark.slow
def test_prefill_and_decode_match_transformers(pair, record_property):
    hf, runner = pair
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, hf.config.vocab_size)
    out = _prefill(runner, prompts)
    errs = {"prefill": 0.0, "decode": 0.0}
    hf_caches = []
    for i, p in enumerate(prompts):
        want, c = _hf_cached(hf, p)
        hf_caches.append(c)
        errs["prefill"] = max(errs["prefill"], H.rel_err(out.logits[i, :len(p)], want))
    cache = out.cache
    for _ in range(4):
        nxt = rng.integers(0, hf.config.vocab_size, len(SLOTS))
        out = runner(nxt[:, None], cache, SLOTS, mode="decode")
        cache = out.cache
        for i in range(len(prompts)):
            want, hf_caches[i] = _hf_cached(hf, [int(nxt[i])], hf_caches[i])
            errs["decode"] = max(errs["decode"], H.rel_err(out.logits[i], want))
    record_property("max_rel_err", errs)
    print(f"\n{pair[0].__class__.__name__} {errs}")
    assert errs["prefill"] <= RTOL and errs["decode"] <= RTOL, errs


@pytest.mark.parametrize("commit_mode", ["replay", "intermediate"])
@pytest.mark.slow
def test_verify_and_rollback_match_transformers(pair, commit_mode, record_property):
    hf, runner = pair
    V = hf.config.vocab_size
    rng = np.random.default_rng(1)
    seqs = _prompts(rng, V)
    out = _prefill(runner, seqs, commit_mode)
    cache = out.cache
    # one decode step, so verify starts from a cache that has seen both paths
    nxt = rng.integers(0, V, len(SLOTS))
    cache = runner(nxt[:, None], cache, SLOTS, mode="decode").cache
    seqs = [s + [int(nxt[i])] for i, s in enumerate(seqs)]
    errs = {"verify_cached": 0.0, "verify_after_commit": 0.0, "decode_after_commit": 0.0}
    for round_, accepted in enumerate(([3, 1, 0, 2], [2, 3, 1, 0])):
        draft = rng.integers(0, V, (len(SLOTS), 3))
        out = runner(draft, cache, SLOTS, mode="verify")
        for i, s in enumerate(seqs):
            if round_ == 0:  # transformers' cached multi-token path from the prompt's state
                _, c = _hf_cached(hf, s)
                want, _ = _hf_cached(hf, draft[i].tolist(), c)
                key = "verify_cached"
            else:  # after a rollback: transformers recomputes the kept sequence
                want = H.hf_logits(hf, s + draft[i].tolist())[-3:]
                key = "verify_after_commit"
            errs[key] = max(errs[key], H.rel_err(out.logits[i], want))
        cache = runner.commit(out.cache, SLOTS, accepted)
        seqs = [s + draft[i, :accepted[i]].tolist() for i, s in enumerate(seqs)]
    nxt = rng.integers(0, V, len(SLOTS))
    out = runner(nxt[:, None], cache, SLOTS, mode="decode")
    for i, s in enumerate(seqs):
        want = H.hf_logits(hf, s + [int(nxt[i])])[-1]
        errs["decode_after_commit"] = max(errs["decode_after_commit"],
                                          H.rel_err(out.logits[i, 0], want))
    # KV lengths follow the kept tokens; the padding row's slot -1 touched nothing
    attn = [c for c in out.cache.layers if hasattr(c, "lengths")][0]
    want_len = np.zeros(NUM_SLOTS, np.int32)
    for slot, s in zip(SLOTS, seqs):
        want_len[slot] = len(s) + 1
    np.testing.assert_array_equal(np.asarray(attn.lengths), want_len)
    record_property("max_rel_err", errs)
    print(f"\n{commit_mode} {errs}")
    assert max(errs.values()) <= RTOL, errs
