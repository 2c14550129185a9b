"""The committed Hugging Face reference fixtures of tests/models: tiny random transformers models
and their outputs, read without torch or transformers.

tests/fixtures/hf/<spec id>/ holds, per model spec:
- config.json + model.safetensors: the model as transformers' `save_pretrained` wrote it (fp32,
  every parameter randomised: HF's init zeroes the (1 + w) norms and sets the gated norm to ones,
  which would hide `1 + w` and gate-order mistakes);
- mtp.safetensors (MTP_SPECS only): an MTP head in the layout of released checkpoints;
- reference.npz: the token inputs of each test scenario and transformers' outputs for them.
tests/fixtures/hf/manifest.json records the transformers and torch versions, the seeds and a
sha256 per file. `python tests/fixtures/hf/regenerate.py` (the `hf` extra) rewrites them all;
the scenario constants below are shared by that script and the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib

import numpy as np

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "hf"
MANIFEST = FIXTURE_DIR / "manifest.json"


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str  # "qwen3_next" | "qwen3_5" | "qwen3_5_moe"
    moe: bool
    gva: int  # linear value heads per key head
    tie: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}-{'moe' if self.moe else 'dense'}-gva{self.gva}" + (
            "-tied" if self.tie else "")

    @property
    def dir(self) -> pathlib.Path:
        return FIXTURE_DIR / self.id


SPECS = (
    Spec("qwen3_next", moe=False, gva=2),
    Spec("qwen3_next", moe=True, gva=1),
    Spec("qwen3_5", moe=False, gva=1, tie=True),
    Spec("qwen3_5_moe", moe=True, gva=2),
)
BF16_SPECS = (SPECS[0], SPECS[3])
MTP_SPECS = (SPECS[1], SPECS[2])  # Qwen3-Next MoE, Qwen3.5 dense tied
MODEL_SEED, MTP_SEED = 1, 3  # torch seeds of the model's and the MTP head's parameters

# Scenarios (token inputs are drawn by the regeneration script with np.random.default_rng(seed)
# and stored; these constants fix the shapes, and the accepted counts fix transformers' sequences).
VOCAB = 160
DECODE = dict(seed=0, prompt_lengths=(7, 3, 5), rows=4, steps=4)
VERIFY = dict(seed=1, prompt_lengths=(7, 3, 5), rows=4, draft=3,
              accepted=((3, 1, 0, 2), (2, 3, 1, 0)))
BF16 = dict(seed=7, prompt_lengths=(9, 5), steps=4)
MTP = dict(seed=4, prompt_lengths=(6, 3))


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@functools.cache
def reference(spec: Spec) -> dict[str, np.ndarray]:
    """The arrays of <spec>/reference.npz (read once per process)."""
    with np.load(spec.dir / "reference.npz") as f:
        return {k: f[k] for k in f.files}


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())
