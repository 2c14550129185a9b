"""`TrainConfig`: the settings of one training run of the embedded model (no jax import, so the
command line can read its defaults before jax starts)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in training_record.json).

    The defaults are sized for about 3-5 minutes on one H100 (README "Training").
    """

    out: str = "embedded_model"
    seed: int = 0
    steps: int = 2000
    batch: int = 32
    seq_len: int = 512
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    mtp_weight: float = 0.5
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 768
    eval_tokens: int = 65536
    num_prompts: int = 32
    log_every: int = 25
    corpus_root: str | None = None  # None: the running Python's stdlib

    def __post_init__(self):
        for name in ("steps", "batch", "seq_len", "vocab_size", "hidden_size", "num_layers",
                     "intermediate_size", "num_prompts", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig: seq_len must be >= 2 (the MTP target is t + 2), got "
                             f"{self.seq_len}")
        if self.hidden_size % 64:
            raise ValueError(f"TrainConfig: hidden_size must be a multiple of 64 (head dims), got "
                             f"{self.hidden_size}")
