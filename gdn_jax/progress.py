"""Progress on stderr for the command line and training: every phase that may take more than a
second or two says so, on a terminal or not.

    progress = Progress(3)                        # three phases
    with progress.phase("load model"):            # tty: one rewritten status line
        ...                                       # else: "[gdn-jax] 1/3 load model ..." and
                                                  #       "[gdn-jax] 1/3 load model: 2.1 s"
    steps = Steps(2000, "train", unit="step")     # tty: a tqdm bar; else a plain line every
    steps.update(25, loss="3.21")                 # `every_s` seconds and at the end
    steps.close()

GDN_JAX_PROGRESS=0 in the environment (or enabled=False) silences both. Output goes to stderr,
so stdout stays the generated text.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

ENV_VAR = "GDN_JAX_PROGRESS"
PREFIX = "[gdn-jax]"


def _enabled(enabled: bool = True) -> bool:
    return enabled and os.environ.get(ENV_VAR, "1") != "0"


def _isatty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class Progress:
    """A fixed number of named phases, each timed (module docstring)."""

    def __init__(self, total: int, *, file=None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.file = sys.stderr if file is None else file
        self.enabled = _enabled(enabled)
        self.tty = _isatty(self.file)
        self.times: dict[str, float] = {}

    def _write(self, text: str) -> None:
        if self.enabled:
            self.file.write(text)
            self.file.flush()

    @contextlib.contextmanager
    def phase(self, label: str):
        """Time the block as phase `label`; its seconds land in `self.times[label]`."""
        i = min(self.done + 1, self.total)
        head = f"{PREFIX} {i}/{self.total} {label}"
        self._write(f"\r\033[K{head} ..." if self.tty else f"{head} ...\n")
        t = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t
            self.times[label] = seconds
            self.done += 1
            if not self.tty:
                self._write(f"{head}: {seconds:.1f} s\n")

    def close(self) -> None:
        """Clear the terminal's status line (plain lines stay)."""
        if self.tty:
            self._write("\r\033[K")


class Steps:
    """A counted loop (training steps, evaluation batches): a tqdm bar on a terminal, else a plain
    line `label: n/total, elapsed, ETA, postfix` every `every_s` seconds and at close()."""

    def __init__(self, total: int, label: str, *, unit: str = "it", every_s: float = 10.0,
                 file=None, leave: bool = True, enabled: bool = True):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.file = sys.stderr if file is None else file
        self.enabled = _enabled(enabled)
        self.n = self.shown = 0
        self.postfix: dict = {}
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.enabled and _isatty(self.file):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=label, unit=unit, file=self.file, leave=leave)
        elif self.enabled:
            self._line("start")

    def _line(self, note: str = "") -> None:
        elapsed = time.perf_counter() - self.t0
        eta = ""
        if 0 < self.n < self.total:
            eta = f", ETA {_clock(elapsed / self.n * (self.total - self.n))}"
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        note = f" ({note})" if note else ""
        self.file.write(f"{PREFIX} {self.label}: {self.n}/{self.total} {self.unit}s, "
                        f"{_clock(elapsed)} elapsed{eta}{post}{note}\n")
        self.file.flush()
        self.last = time.perf_counter()
        self.shown = self.n

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.shown != self.n:
            self._line()
        self.enabled = False
