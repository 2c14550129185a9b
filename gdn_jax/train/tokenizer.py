"""The embedded model's tokenizer: a byte-level BPE trained on the corpus with `tokenizers`.

Byte level: any text round-trips, no unknown token. One special token, `EOS`, separates files in
the token stream and stops generation. Training is deterministic for the same texts and vocab
size (the BPE trainer breaks count ties by the pair itself).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gdn_jax.text import EOS, eos_id

__all__ = ["EOS", "eos_id", "train_tokenizer"]


def train_tokenizer(texts, vocab_size: int = 4096) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (EOS is id 0) trained on `texts` (strings)."""
    if vocab_size < 256 + 1:
        raise ValueError(f"train_tokenizer: vocab_size must be >= 257 (256 bytes + EOS), got "
                         f"{vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok

