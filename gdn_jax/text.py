"""Text in and out of generation: prompt encoding, EOS and stop tokens, the repetition stop.

    prompts, lengths = encode_prompts(tokenizer, ["def f(x):\\n"])    # [B, P] int32, [B] int32
    stop = stop_tokens(model_dir, tokenizer)                           # (eos ids...)
    ids = cut_repetition(ids)                                          # a row stops at a loop

Shared by the command line (`gdn_jax.cli`) and training (`gdn_jax.train`), neither of which
imports the other. Imports numpy only (no jax, no tokenizers: callers pass a
`tokenizers.Tokenizer`).
"""

from __future__ import annotations

import json
import os

import numpy as np

EOS = "<|endoftext|>"  # the embedded tokenizer's one special token: ends a file, stops generation

# The prompt of `gdn-jax generate --model DIR` when DIR has no prompts.json: the start of a
# Python function, which a code model and a general chat model both continue sensibly.
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'

# The repetition stop (`cut_repetition`): a row stops once its last tokens are one block repeated
# REPEATS times, the repeats covering at least MIN_TOKENS tokens (so a run of closing brackets or
# blank lines is left alone) and the block at most MAX_PERIOD tokens.
REPEATS = 3
MIN_TOKENS = 16
MAX_PERIOD = 64


def eos_id(tokenizer) -> int | None:
    """The id of EOS in `tokenizer`, or None (a tokenizer.json of another model may lack it)."""
    return tokenizer.token_to_id(EOS)


def encode_prompts(tokenizer, texts, pad_id: int = 0):
    """Right-padded prompts [B, P] int32 and their lengths [B] int32."""
    ids = [tokenizer.encode(t).ids for t in texts]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a prompt encodes to no tokens (empty text)")
    P = max(len(x) for x in ids)
    prompts = np.full((len(ids), P), pad_id, np.int32)
    for i, x in enumerate(ids):
        prompts[i, :len(x)] = x
    return prompts, np.asarray([len(x) for x in ids], np.int32)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def stop_tokens(model_dir: str, tokenizer) -> tuple[int, ...]:
    """The ids that end a row: eos_token_id of config.json and generation_config.json (an int or
    a list), else the tokenizer's EOS; sorted, without duplicates. A malformed file or field
    raises a ValueError naming both."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        eos = _read_json(path).get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise ValueError(f"{path}: eos_token_id expected an int or a list of ints, got "
                             f"{eos!r}")
        ids += eos
    if not ids:
        eos = eos_id(tokenizer)
        ids = [] if eos is None else [eos]
    return tuple(sorted({int(i) for i in ids}))


def repetition_end(ids, *, repeats: int = REPEATS, min_tokens: int = MIN_TOKENS,
                   max_period: int = MAX_PERIOD) -> int | None:
    """The shortest prefix length n such that ids[:n] ends in one block of p <= max_period
    tokens repeated `repeats` times with p * repeats >= min_tokens; None when there is none.

    A property of prefixes: the same n whether `ids` is the whole output or a longer one, so a
    streamed output stops where the unstreamed one does.
    """
    if repeats < 2:
        raise ValueError(f"repetition_end: repeats must be >= 2, got {repeats}")
    ids = list(ids)
    for n in range(1, len(ids) + 1):
        for p in range(max(1, -(-min_tokens // repeats)), min(max_period, n // repeats) + 1):
            # p-periodic over the last p * repeats tokens: the tail equals itself shifted by p.
            if ids[n - p * (repeats - 1):n] == ids[n - p * repeats:n - p]:
                return n
    return None


def cut_repetition(ids, **kwargs) -> list[int]:
    """`ids` up to where a repetition loop is found (`repetition_end`), else all of them.

    Generation is deterministic given its inputs, so applying this to the tokens of plain and of
    speculative greedy decoding keeps them identical: the stop lives here, after generation, in
    one place for both.
    """
    ids = list(ids)
    n = repetition_end(ids, **kwargs)
    return ids if n is None else ids[:n]
