"""Quality of a trained model: held-out perplexity and the speculative mean accept length.

    perplexity(model, stream, seq_len=512, max_tokens=65536)     -> {"perplexity", "mtp_perplexity", ...}
    accept_length(model, tokenizer, prompts, num_draft=3)         -> {"mean_accept_length", ...}
    make_prompts(tokenizer, corpus, texts, n, seed)               -> the prompts.json dict

The accept length is the issue's quality bar (>= 2.0 tokens per round with greedy decoding and 3
drafts): tokens emitted per round, 1..4, as `gdn_jax.speculative.GenerateOutput.accept_length`
counts them over the whole batch of held-out prompts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax import speculative
from gdn_jax.progress import Steps
from gdn_jax.text import encode_prompts, eos_id
from gdn_jax.train.loop import losses

PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS = 64, 128
EVAL_MAX_NEW_TOKENS = 64


def make_prompts(tokenizer, corpus, texts, n: int, seed: int) -> dict:
    """`n` code snippets from the held-out files `texts` (corpus.held_out order): each starts at
    a line start and takes whole lines until it has >= 64 tokens (cut at 128). Deterministic in
    seed. Returns {"prompts": [{"file", "line", "text", "num_tokens"}], ...}."""
    rng = np.random.default_rng([seed, 1])
    files = [(rel, t.splitlines(keepends=True)) for rel, t in zip(corpus.held_out, texts)]
    files = [(rel, lines) for rel, lines in files if len(lines) > 8]
    if not files:
        raise ValueError("make_prompts: no held-out file has more than 8 lines")
    out = []
    for _ in range(n):
        rel, lines = files[rng.integers(len(files))]
        start = int(rng.integers(len(lines) - 4))
        text, line = "", start
        while line < len(lines):
            text += lines[line]
            line += 1
            if len(tokenizer.encode(text).ids) >= PROMPT_MIN_TOKENS:
                break
        ids = tokenizer.encode(text).ids[:PROMPT_MAX_TOKENS]
        text = tokenizer.decode(ids)
        out.append({"file": rel, "line": start + 1, "text": text,
                    "num_tokens": len(tokenizer.encode(text).ids)})
    return {"description": "held-out stdlib code snippets (gdn_jax.train.evaluate.make_prompts)",
            "max_new_tokens": EVAL_MAX_NEW_TOKENS, "prompts": out}


def perplexity(model, stream: np.ndarray, *, seq_len: int = 512, max_tokens: int = 65536,
               batch: int = 8, progress: bool = False) -> dict:
    """Held-out perplexity of the model (next token) and of its MTP head (token after next), over
    non-overlapping windows of seq_len + 1 tokens covering the first max_tokens of `stream`
    ([N] int32). exp(mean cross-entropy per predicted token)."""
    n_win = max(1, min(max_tokens, stream.size - 1) // seq_len)
    if stream.size < seq_len + 1:
        seq_len = stream.size - 1
        n_win = 1
    if seq_len < 2:
        raise ValueError(f"perplexity: the stream has {stream.size} tokens; needs >= 3")
    windows = np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n_win)])
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, w: losses(nnx.merge(graphdef, p), w))
    main, mtp, count = 0.0, 0.0, 0
    steps = Steps(n_win, "evaluate: held-out perplexity", unit="window", enabled=progress,
                  leave=False)
    for i in range(0, n_win, batch):
        w = windows[i:i + batch]
        a, b = fn(params, jnp.asarray(w))
        main += float(a) * len(w)
        mtp += float(b) * len(w)
        count += len(w)
        steps.update(len(w))
    steps.close()
    return {"perplexity": math.exp(main / count), "mtp_perplexity": math.exp(mtp / count),
            "eval_tokens": int(count * seq_len), "seq_len": int(seq_len)}


def accept_length(model, tokenizer, prompts: dict, *, num_draft: int = 3,
                  max_new_tokens: int | None = None, state_dtype=jnp.bfloat16) -> dict:
    """Greedy speculative decoding over every prompt of prompts.json (one batch): the mean
    accept length (tokens per round, 1..num_draft + 1) and what it was measured with."""
    texts = [p["text"] for p in prompts["prompts"]]
    toks, lengths = encode_prompts(tokenizer, texts)
    n = int(max_new_tokens or prompts.get("max_new_tokens", EVAL_MAX_NEW_TOKENS))
    eos = eos_id(tokenizer)
    out = speculative.generate(model, toks, lengths, num_draft=num_draft, max_new_tokens=n,
                               temperature=0.0, stop_tokens=() if eos is None else (eos,),
                               state_dtype=state_dtype)
    return {"mean_accept_length": float(out.accept_length), "num_draft": num_draft,
            "num_prompts": len(texts), "max_new_tokens": n, "greedy": True,
            "state_dtype": jnp.dtype(state_dtype).name,
            "rounds": int(np.sum(np.asarray(out.row_rounds))),
            "generated_tokens": int(np.sum(np.asarray(out.lengths)))}


def evaluate(model, tokenizer, held_stream, prompts, *, eval_tokens: int = 65536,
             seq_len: int = 512, progress: bool = False) -> dict:
    """Both measures (the training record's "quality")."""
    out = perplexity(model, held_stream, seq_len=seq_len, max_tokens=eval_tokens,
                     progress=progress)
    out.update(accept_length(model, tokenizer, prompts))
    return out
