"""Training of the embedded model (issue 7): corpus, tokenizer, training loop, evaluation.

    from gdn_jax.train import TrainConfig, train
    record = train(TrainConfig(out="my_model", steps=2000))

Modules: `config` (TrainConfig), `corpus` (the stdlib files), `tokenizer` (byte-level BPE),
`loop` (model config, loss, optimizer, the run), `evaluate` (perplexity, accept length, prompts),
`command` (the command line: `python -m gdn_jax.train`, also reached as `gdn-jax train`).
This package imports jax lazily: the command sets XLA_FLAGS before jax starts. Prompt encoding
and EOS live in `gdn_jax.text`, shared with inference, which imports nothing of this package.
"""

from gdn_jax.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name == "train":
        from gdn_jax.train.loop import train
        return train
    raise AttributeError(f"module 'gdn_jax.train' has no attribute {name!r}")
