"""The training command line: `python -m gdn_jax.train ...`, also reached as `gdn-jax train ...`.

    main(["--out", "my_model", "--steps", "2000"])      # -> exit status

Training's own entry point: it imports nothing of `gdn_jax.cli` (and the inference command line
nothing of training). jax is imported only once the arguments are parsed, after XLA_FLAGS asks
for deterministic GPU reductions (which must be set before jax starts). User errors print one
line, `gdn-jax: error: ...`, and exit with 2, as the inference commands do.
"""

from __future__ import annotations

import argparse
import os
import sys

from gdn_jax.train.config import TrainConfig

EXIT_USAGE = 2
_FIELDS = (("steps", int), ("batch", int), ("seq_len", int), ("seed", int), ("lr", float),
           ("vocab_size", int), ("hidden_size", int), ("num_layers", int), ("eval_tokens", int),
           ("num_prompts", int))
# The shipped model's run (its training_record.json): 89.6 s of steps, 121 s in all, on one H100.
# The README's "Training" section says the same (tests/test_cli.py checks both).
H100_TIME = "about 2 minutes"
DESCRIPTION = (
    f"Train the embedded model on the running Python's standard library (gdn_jax.train). The "
    f"defaults take {H100_TIME} on one H100 (the shipped model: 90 s of steps, 121 s with "
    "evaluation); on a CPU, hours. The corpus is this Python's stdlib, so a Python other than "
    "the shipped model's 3.12.3 trains on different files and gives different weights; "
    "training_record.json records the Python version and how the corpus differs.")


def build_parser(prog: str = "python -m gdn_jax.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    d = TrainConfig()
    p.add_argument("--out", required=True, help="output directory")
    for name, typ in _FIELDS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ,
                       default=getattr(d, name), help=f"default {getattr(d, name)}")
    return p


def _run(args) -> int:
    # Deterministic reductions on GPU (scatter-add in the embedding gradient, among others):
    # must be in XLA_FLAGS before jax initialises its backend.
    flag = "--xla_gpu_deterministic_ops=true"
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    try:
        cfg = TrainConfig(out=args.out, **{f: getattr(args, f) for f, _ in _FIELDS})
    except ValueError as e:
        msg = str(e).replace("TrainConfig: ", "")
        name = msg.split(" ", 1)[0]
        raise _UserError("--" + name.replace("_", "-") + msg[len(name):]) from None
    from gdn_jax.train.loop import train
    record = train(cfg)
    q = record["quality"]
    print(f"[gdn-jax] trained {cfg.steps} steps in {record['wall_time_s']['train']:.1f} s on "
          f"{record['device']}; final loss {record['final_loss']:.3f}, held-out perplexity "
          f"{q['perplexity']:.2f}, mean accept length {q['mean_accept_length']:.2f}; wrote "
          f"{cfg.out}")
    return 0


class _UserError(Exception):
    pass


def main(argv=None, *, prog: str = "python -m gdn_jax.train") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return _run(args)
    except (_UserError, ValueError, OSError) as e:  # bad option, unreadable corpus or output dir
        msg = str(e)
    print(f"gdn-jax: error: {' '.join(msg.split())}", file=sys.stderr)
    return EXIT_USAGE
