"""Tokens per second of speculative (MTP, d drafts) vs plain greedy decoding with a trained model
(default: the embedded one), whole `gdn_jax.speculative.generate` programs, B = 1, 8, 32.

    python bench/bench_generate.py --out DIR                  # the embedded model
    python bench/bench_generate.py --out DIR --model PATH     # a HF Qwen3-Next / Qwen3.5 directory
    python bench/bench_generate.py --out DIR --smoke          # B = 1, 2, few tokens (the script)

Prompts: the model directory's prompts.json (held-out code for the embedded model), cycled to B
rows. For each B, plain (num_draft = 0) and speculative (num_draft = --draft) generate
--max-new-tokens tokens per row (greedy, no stop token, so both produce the same count), each
program compiled first and then timed --reps times (median): tokens/s = B * max_new / seconds
(the prefill included, as a user sees it). The mean accept length (tokens per round) comes from
the same run, and the greedy tokens of both are compared (equal up to bf16 near-ties).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="bench/results", help="directory for the JSON results")
    p.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated B values")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--draft", type=int, default=3, help="drafts per round (speculative)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights and activations (the GDN state is bf16)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per program")
    p.add_argument("--smoke", action="store_true", help="B = 1, 2; 16 tokens; 1 rep")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tokenizers import Tokenizer

    from gdn_jax.models import Qwen3NextForCausalLM
    from gdn_jax.models.embedded import embedded_path
    from gdn_jax.speculative import generate
    from gdn_jax.text import encode_prompts

    from bench_kernels import copy_bandwidth

    path = args.model or embedded_path()
    if args.smoke:
        args.batches, args.max_new_tokens, args.reps = "1,2", 16, 1
    copy = copy_bandwidth(1.0, args.smoke)
    dtype = jnp.dtype(args.dtype)
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=dtype)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "prompts.json")) as f:
        texts = [p["text"] for p in json.load(f)["prompts"]]
    dev = jax.devices()[0]
    print(f"{dev.device_kind}, jax {jax.__version__}, {path}, {args.dtype}, "
          f"{len(texts)} prompts, max_new {args.max_new_tokens}, d = {args.draft}", flush=True)

    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        prompts, lengths = encode_prompts(tok, [texts[i % len(texts)] for i in range(B)])
        row = {"B": B, "prompt_tokens_max": prompts.shape[1]}
        outs = {}
        for name, d in (("plain", 0), ("speculative", args.draft)):
            def run():
                out = generate(model, prompts, lengths, num_draft=d,
                               max_new_tokens=args.max_new_tokens, state_dtype=jnp.bfloat16)
                return jax.block_until_ready(out)
            t0 = time.perf_counter()
            out = run()
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            n = int(np.sum(np.asarray(out.lengths)))
            outs[name] = np.asarray(out.tokens)
            row[name] = {"seconds": t, "tokens": n, "tokens_per_s": n / t,
                         "compile_and_first_s": round(first, 2),
                         "rounds": int(out.rounds), "accept_length": float(out.accept_length)}
            print(f"  B={B:<3} {name:<12} {n / t:10.1f} tok/s  ({t * 1e3:.1f} ms, {n} tokens, "
                  f"accept length {float(out.accept_length):.2f})", flush=True)
        row["speedup"] = row["speculative"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        row["same_tokens_rows"] = int(np.sum(np.all(outs["plain"] == outs["speculative"], 1)))
        rows.append(row)

    print(f"\n{'B':>4} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'accept len':>11} "
          f"{'same rows':>10}")
    for r in rows:
        print(f"{r['B']:>4} {r['plain']['tokens_per_s']:>12.1f} "
              f"{r['speculative']['tokens_per_s']:>11.1f} {r['speedup']:>8.2f} "
              f"{r['speculative']['accept_length']:>11.2f} {r['same_tokens_rows']:>6}/{r['B']}")
    kind = dev.device_kind.replace(" ", "_") if dev.platform == "gpu" else dev.platform
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"bench_generate-{kind}{'-smoke' if args.smoke else ''}.json")
    record = {"bench": "bench_generate", "device": dev.device_kind, "jax": jax.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "copy_bandwidth": copy, "model": path if args.model else "embedded",
              "settings": vars(args),
              "argv": sys.argv[1:], "results": rows}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
