"""gdn_jax.text: prompt encoding, stop tokens (with errors naming the file and field), and the
repetition stop that the command line applies to plain and speculative output alike."""

import json

import numpy as np
import pytest

from gdn_jax.text import (EOS, MIN_TOKENS, REPEATS, cut_repetition, encode_prompts,
                          repetition_end, stop_tokens)


class _Tok:
    """A stand-in tokenizer: one token per character."""

    def __init__(self, eos=None):
        self.eos = eos

    def encode(self, text):
        return type("E", (), {"ids": [ord(c) for c in text]})

    def token_to_id(self, token):
        return self.eos if token == EOS else None


def test_encode_prompts_pads_right():
    prompts, lengths = encode_prompts(_Tok(), ["ab", "xyz"])
    np.testing.assert_array_equal(prompts, [[97, 98, 0], [120, 121, 122]])
    np.testing.assert_array_equal(lengths, [2, 3])
    assert prompts.dtype == lengths.dtype == np.int32
    with pytest.raises(ValueError, match="no tokens"):
        encode_prompts(_Tok(), ["a", ""])


def test_stop_tokens(tmp_path):
    assert stop_tokens(str(tmp_path), _Tok(eos=7)) == (7,)
    assert stop_tokens(str(tmp_path), _Tok()) == ()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_tokens(str(tmp_path), _Tok(eos=7)) == (2, 5)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        stop_tokens(str(tmp_path), _Tok())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id expected"):
        stop_tokens(str(tmp_path), _Tok())


def test_repetition_end_finds_the_first_loop():
    line = list(range(100, 112))  # a 12-token "line"
    head = list(range(20))
    ids = head + line * 8
    n = repetition_end(ids)
    assert n == len(head) + REPEATS * len(line)
    assert cut_repetition(ids) == head + line * REPEATS
    # A property of prefixes: a longer output stops at the same place (streaming agrees).
    assert repetition_end(ids[:n]) == n and repetition_end(ids[:n - 1]) is None


def test_repetition_end_leaves_short_runs_alone():
    assert repetition_end([1, 2] * (MIN_TOKENS // 2 - 1) + [3]) is None  # 14 tokens of "1 2"
    # A run of one token counts as its shortest allowed block (>= MIN_TOKENS / REPEATS tokens)
    # repeated REPEATS times.
    run = -(-MIN_TOKENS // REPEATS) * REPEATS
    assert repetition_end([9] * (run - 1)) is None
    assert repetition_end([9] * (run + 5)) == run
    assert repetition_end(list(range(200))) is None
    assert cut_repetition([1, 2, 3]) == [1, 2, 3]
    assert repetition_end(list(range(6)) * 2, repeats=2, min_tokens=12) == 12
    with pytest.raises(ValueError, match="repeats must be >= 2"):
        repetition_end([1], repeats=1)
