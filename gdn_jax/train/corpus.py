"""The training corpus of the embedded model: the running Python's standard library sources.

Every machine that runs gdn-jax has it offline. Files are the `*.py` under
`sysconfig.get_paths()["stdlib"]`, sorted by their path relative to it, without the test suites
and third-party packages (directories named in `EXCLUDED_DIRS`). A fixed ~3% of the files (by a
hash of the relative path, so the split does not move when a Python release adds files) is held
out for perplexity and the evaluation prompts.

    corpus = Corpus.from_stdlib()
    corpus.record()           # python version, file counts, sha256 of the file list, bytes
    corpus.read(corpus.train) # [text of each training file]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
HELD_OUT_MODULUS = 32  # a file is held out when int(sha256(relative path)[:8], 16) % 32 == 0


def _held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELD_OUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Sorted relative paths of the corpus under `root`, split into train and held-out."""

    root: str
    files: tuple[str, ...]

    @classmethod
    def from_stdlib(cls, root: str | None = None) -> "Corpus":
        """The `*.py` files of the standard library (or of `root`, for tests)."""
        root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
        if not os.path.isdir(root):
            raise ValueError(f"Corpus: the source directory {root!r} does not exist")
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            # Pruning in place: os.walk does not descend into the excluded directories.
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
            for name in filenames:
                if name.endswith(".py"):
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
        if not found:
            raise ValueError(f"Corpus: no *.py files under {root!r}")
        return cls(root, tuple(sorted(p.replace(os.sep, "/") for p in found)))

    @property
    def train(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if not _held_out(f))

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if _held_out(f))

    def read(self, files) -> list[str]:
        """The text of each file (UTF-8; undecodable bytes replaced, as a few stdlib files are
        Latin-1)."""
        out = []
        for rel in files:
            with open(os.path.join(self.root, rel), "rb") as f:
                out.append(f.read().decode("utf-8", errors="replace"))
        return out

    def record(self) -> dict:
        """What identifies the corpus (written into training_record.json)."""
        listing = "\n".join(self.files).encode()
        return {
            "source": "python stdlib *.py (sysconfig stdlib path), sorted relative paths",
            "python_version": platform.python_version(),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "num_files": len(self.files),
            "num_train_files": len(self.train),
            "num_held_out_files": len(self.held_out),
            "file_list_sha256": hashlib.sha256(listing).hexdigest(),
            "total_bytes": sum(os.path.getsize(os.path.join(self.root, f)) for f in self.files),
            "held_out_files": list(self.held_out),
        }
