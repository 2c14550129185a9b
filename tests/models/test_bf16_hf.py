"""bf16 models (bf16 weights, activations and GDN state) against the fp32 transformers run.

Tolerance: the same bf16 model in transformers (bf16 weights and activations, its fp32 GDN state)
is the yardstick: our bf16 logits must stay within BF16_FACTOR times transformers' own bf16 error
(max |logit - fp32 logit| / max |fp32 logit|), plus a floor, and agree on the argmax of most
positions. bf16 keeps 8 significand bits (unit roundoff 2**-9 = 2e-3 per rounding); a few
layers of roundings put both runs at the 1e-2 level, so a factor 2 leaves room for our extra
bf16 state rounding without hiding a real bug (a wrong weight or gate gives errors of order 1).
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_models as H  # noqa: E402
from model_runner import Runner  # noqa: E402

from gdn_jax.models import Qwen3NextForCausalLM  # noqa: E402

BF16_FACTOR, FLOOR, MIN_ARGMAX_AGREEMENT = 2.0, 1e-2, 0.9
SLOTS = (1, 0)


@torch.no_grad()
def _hf_run(hf, prompts, steps):
    """Prefill logits per prompt, then cached decode logits per step: a list per prompt."""
    out = []
    for p, s in zip(prompts, steps):
        o = hf(torch.tensor([p]), use_cache=True)
        logits = [o.logits[0].float()]
        for t in s:
            o = hf(torch.tensor([[int(t)]]), cache=o.cache, use_cache=True)
            logits.append(o.logits[0].float())
        out.append(torch.cat(logits).numpy())
    return out


@pytest.mark.parametrize("spec", [H.SPECS[0], H.SPECS[3]], ids=lambda s: s.id)
@pytest.mark.slow
def test_bf16_close_to_fp32_transformers(spec, tmp_path, record_property):
    hf = H.make_hf_model(spec, seed=6)
    hf.save_pretrained(tmp_path)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    rng = np.random.default_rng(7)
    V = hf.config.vocab_size
    prompts = [rng.integers(0, V, n).tolist() for n in (9, 5)]
    steps = rng.integers(0, V, (2, 4))
    want = _hf_run(hf, prompts, steps)
    base = _hf_run(hf_bf16, prompts, steps)

    runner = Runner(Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16))
    cache = runner.model.init_cache(2, 24, t_max=2, state_dtype=jnp.bfloat16)
    toks = np.zeros((2, 9), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    out = runner(toks, cache, SLOTS, mode="prefill", lengths=[9, 5])
    got = [[np.asarray(out.logits[i, :len(p)])] for i, p in enumerate(prompts)]
    cache = out.cache
    for t in range(steps.shape[1]):
        out = runner(steps[:, t:t + 1], cache, SLOTS, mode="decode")
        cache = out.cache
        for i in range(2):
            got[i].append(np.asarray(out.logits[i]))
    got = [np.concatenate(g) for g in got]

    ours = max(H.rel_err(g, w) for g, w in zip(got, want))
    theirs = max(H.rel_err(b, w) for b, w in zip(base, want))
    agree = np.mean(np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]))
    record_property("bf16", dict(ours=ours, transformers_bf16=theirs, argmax=agree))
    print(f"\nbf16 rel err: ours {ours:.3g}, transformers bf16 {theirs:.3g}; argmax {agree:.3f}")
    assert ours <= max(BF16_FACTOR * theirs, FLOOR)
    assert agree >= MIN_ARGMAX_AGREEMENT
