"""The `gdn-jax` command line: generate, bench, info, train.

    gdn-jax generate [--prompt TEXT | --prompts-file FILE] [--model DIR] [--num-draft-tokens 3] ...
    gdn-jax bench    [--batches 1,8,32] [--state-dtype bfloat16]
    gdn-jax info
    gdn-jax train    --out DIR [--steps N --batch B --seq-len T --seed S]

`generate` defaults to the embedded model (`gdn_jax.models.embedded_path()`) and its first held-out
prompt (a model directory without prompts.json: `gdn_jax.text.DEFAULT_PROMPT`). Errors the user
can fix (a missing directory, a bad config, a prompt too long for the cache, a bad option value)
print one line, `gdn-jax: error: ...`, on stderr and exit with 2; anything else is a bug and
keeps its traceback.

`train` is training's own command line (`gdn_jax.train.command`, also `python -m
gdn_jax.train`), reached only when called: this module imports nothing of `gdn_jax.train` (nor
optax), so `generate` loads nothing of training. jax is imported inside the commands, so
`--help` does not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from gdn_jax.text import MIN_TOKENS, REPEATS

EXIT_USAGE = 2
DTYPES = ("bfloat16", "float32")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Helpers


def _load_prompts_file(path: str) -> list[str]:
    """A JSON file (a list of strings, or prompts.json's {"prompts": [{"text": ...}]}) or a text
    file with one prompt per line."""
    if not os.path.isfile(path):
        raise CLIError(f"--prompts-file: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"--prompts-file: {path} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = [p.get("text") if isinstance(p, dict) else p for p in data.get("prompts", [])]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise CLIError(f"--prompts-file: {path} must hold a list of strings or "
                           '{"prompts": [{"text": ...}]}')
        prompts = data
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts-file: {path} holds no prompts")
    return prompts


def _model_dir(arg: str | None) -> str:
    if arg is None:
        from gdn_jax.models.embedded import embedded_path
        try:
            return embedded_path()
        except ValueError as e:
            raise CLIError(str(e)) from None
    if not os.path.isdir(arg):
        raise CLIError(f"--model: no such directory {arg!r}")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(arg, name)):
            raise CLIError(f"--model: {arg!r} has no {name} (a Hugging Face Qwen3-Next / Qwen3.5 "
                           "directory with tokenizer.json)")
    return arg


def _load_tokenizer(model_dir: str):
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception
        raise CLIError(f"cannot read {path}: {e}") from None


# ------------------------------------------------------------------------------------------------
# generate


def _generate_stream(model, prompts, lengths, *, chunk: int, max_new: int, stop, key, write,
                     repeats: int, **kw):
    """--stream: `generate` in chunks of `chunk` tokens. Each chunk re-prefills the prompt plus
    the tokens so far (right-padded to one width, so one compiled program serves every chunk)
    and generates `chunk` more; `write(ids)` gets the new tokens after every chunk. Greedy output
    is plain greedy decoding's, as unstreamed, and stops at the same repetition loop
    (`gdn_jax.text.repetition_end` is a property of prefixes); sampling draws from the same
    distribution with a key folded per chunk (so not the unstreamed tokens).
    Returns (ids, generated, accepted, rounds, stopped at a repetition loop)."""
    import jax
    import numpy as np

    from gdn_jax import speculative
    from gdn_jax.text import repetition_end
    P0 = prompts.shape[1]
    width = P0 + max_new
    buf = np.zeros((1, width), np.int32)
    buf[0, :P0] = prompts[0]
    n = int(lengths[0])
    out, generated, accepted, rounds = [], 0, 0, 0
    for c in range(-(-max_new // chunk)):
        res = speculative.generate(model, buf, np.asarray([n], np.int32), max_new_tokens=chunk,
                                   key=jax.random.fold_in(key, c), stop_tokens=stop,
                                   max_len=width + chunk + kw["num_draft"], **kw)
        new = np.asarray(res.tokens[0, :int(res.lengths[0])]).tolist()[:max_new - len(out)]
        generated += len(new)
        accepted += int(res.accepted[0])
        rounds += int(res.row_rounds[0])
        end = repetition_end(out + new, repeats=repeats) if repeats else None
        if end is not None:
            new = new[:end - len(out)]
        write(new)
        out += new
        buf[0, n:n + len(new)] = new
        n += len(new)
        if end is not None or len(out) >= max_new or (new and new[-1] in stop):
            break
    return out, generated, accepted, rounds, end is not None


DIM, RESET = "\033[2m", "\033[0m"
SEPARATOR = "----- completion -----"


def _show_prompt(text: str, *, tty: bool) -> None:
    """The prompt before its completion: dimmed on a terminal (the completion continues it on
    the same line), else followed by the SEPARATOR line."""
    if tty:
        sys.stdout.write(DIM + text + RESET)
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n") + SEPARATOR + "\n")
    sys.stdout.flush()


def _default_num_draft(platform: str) -> int:
    """--num-draft-tokens when not given: 3 on a GPU, 0 (plain decoding) elsewhere, where a
    speculative round costs more than the tokens it saves (README "The command line")."""
    return 3 if platform == "gpu" else 0


def cmd_generate(args) -> int:
    from gdn_jax.ops import MAX_T  # imports jax

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_draft_tokens is not None and not 0 <= args.num_draft_tokens < MAX_T:
        raise CLIError(f"--num-draft-tokens must be in 0..{MAX_T - 1} (0: plain decoding; "
                       f"a verify call takes the drafts + 1 <= {MAX_T} tokens), got "
                       f"{args.num_draft_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.stream_chunk < 1:
        raise CLIError(f"--stream-chunk must be >= 1, got {args.stream_chunk}")
    if args.stop_repeats < 0 or args.stop_repeats == 1:
        raise CLIError(f"--stop-repeats must be 0 (off) or >= 2, got {args.stop_repeats}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gdn_jax import speculative
    from gdn_jax.models import ModelConfig, Qwen3NextForCausalLM
    from gdn_jax.ops import dispatch
    from gdn_jax.progress import Progress
    from gdn_jax.text import DEFAULT_PROMPT, cut_repetition, encode_prompts, stop_tokens

    # The model first: a broken config.json must not hide behind a missing prompt.
    model_dir = _model_dir(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    tokenizer = _load_tokenizer(model_dir)
    stop = stop_tokens(model_dir, tokenizer)
    if args.prompt is not None:
        texts = [args.prompt]
    elif args.prompts_file is not None:
        texts = _load_prompts_file(args.prompts_file)
    elif os.path.isfile(os.path.join(model_dir, "prompts.json")):
        texts = _load_prompts_file(os.path.join(model_dir, "prompts.json"))[:1]
    else:
        texts = [DEFAULT_PROMPT]
        print(f"[gdn-jax] {model_dir} has no prompts.json: a default prompt (--prompt TEXT to "
              "give one)", file=sys.stderr)
    if args.stream and len(texts) != 1:
        raise CLIError(f"--stream takes one prompt, got {len(texts)}")
    try:
        prompts, lengths = encode_prompts(tokenizer, texts)
    except ValueError as e:
        raise CLIError(f"--prompt: {e}") from None

    device = jax.devices()[0]
    d = (_default_num_draft(device.platform) if args.num_draft_tokens is None
         else args.num_draft_tokens)
    need = prompts.shape[1] + args.max_new_tokens + d
    limit = args.max_len or config.max_position_embeddings
    if need > limit:
        what = "--max-len" if args.max_len else "the model's max_position_embeddings"
        raise CLIError(f"the prompt ({prompts.shape[1]} tokens) + --max-new-tokens "
                       f"({args.max_new_tokens}) + --num-draft-tokens ({d}) = {need} tokens "
                       f"exceed the cache: {what} = {limit}")
    dtype = args.dtype or ("bfloat16" if device.platform == "gpu" else "float32")
    progress = Progress(1 if args.stream else 3)
    with progress.phase("load the model"):
        model = Qwen3NextForCausalLM.from_pretrained(model_dir, dtype=jnp.dtype(dtype),
                                                     with_mtp=True if d > 0 else None)
    key = jax.random.key(args.seed)
    kw = dict(num_draft=d, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              state_dtype=jnp.dtype(args.state_dtype))
    tty = sys.stdout.isatty()
    stopped = []  # rows cut at a repetition loop
    if args.stream:
        progress.close()
        print("[gdn-jax] generate, streamed (the first chunk compiles first)", file=sys.stderr)
        if not args.no_prompt:
            _show_prompt(texts[0], tty=tty)

        def write(new):
            sys.stdout.write(tokenizer.decode(new))
            sys.stdout.flush()

        t = time.perf_counter()
        ids, n_tokens, accepted, rounds, cut = _generate_stream(
            model, prompts, lengths, chunk=args.stream_chunk, max_new=args.max_new_tokens,
            stop=stop, key=key, write=write, repeats=args.stop_repeats, **kw)
        seconds = time.perf_counter() - t
        sys.stdout.write("\n")
        if cut:
            stopped.append(0)
        accept = (accepted + rounds) / rounds if rounds else 1.0
        timing = "including compilation"
    else:
        def run():
            return speculative.generate(model, prompts, lengths, max_new_tokens=args.max_new_tokens,
                                        key=key, stop_tokens=stop, max_len=args.max_len, **kw)

        with progress.phase("compile (a first run)"):
            jax.block_until_ready(run().tokens)  # the timed run below reuses the program
        with progress.phase("generate"):
            t = time.perf_counter()
            out = run()
            jax.block_until_ready(out.tokens)
            seconds = time.perf_counter() - t
        progress.close()
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        for i in range(len(texts)):
            if len(texts) > 1:
                print(f"--- [{i}]")
            ids = toks[i, :lens[i]].tolist()
            if args.stop_repeats:
                shown = cut_repetition(ids, repeats=args.stop_repeats)
                if len(shown) < len(ids):
                    stopped.append(i)
                ids = shown
            if not args.no_prompt:
                _show_prompt(texts[i], tty=tty)
            print(tokenizer.decode(ids))
        n_tokens = int(lens.sum())
        accept = float(out.accept_length)
        timing = "compiled program"
    if stopped:
        print(f"[gdn-jax] stopped at a repetition loop (a block of tokens {args.stop_repeats} "
              f"times in a row; --stop-repeats 0 shows everything): "
              f"{'row' if len(stopped) == 1 else 'rows'} {', '.join(map(str, stopped))}",
              file=sys.stderr)
    dims = dict(B=len(texts), K=model.config.linear_key_head_dim,
                V=model.config.linear_value_head_dim)
    backend = f"decode {dispatch.select('decode', **dims).backend}"
    if d:
        verify = dispatch.select("verify", T=d + 1, mode="replay", **dims).backend
        backend += f", verify {verify}"
    print(f"[gdn-jax] {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s, "
          f"{timing}); mean accept length {accept:.2f} (num_draft {d}); backends: {backend} on "
          f"{device.device_kind} ({device.platform}); model {model_dir}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# bench, info, train


def _ints(text: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{name} expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise CLIError(f"{name} expected integers >= 1, got {text!r}")
    return out


def cmd_bench(args) -> int:
    """Time decode and verify (`gdn_jax.benchmark.run`): per call, GB/s and, on a GPU, kernel
    time and % of copy bandwidth; a legend under the table says what each column is."""
    import jax
    import jax.numpy as jnp

    from gdn_jax import benchmark
    on_gpu = jax.devices()[0].platform == "gpu"
    shape = benchmark.QWEN3_NEXT if on_gpu else benchmark.SMALL
    batches = _ints(args.batches, "--batches") if args.batches else (
        [1, 8, 32, 256] if on_gpu else [1, 8])
    if args.verify_tokens < 2:
        raise CLIError(f"--verify-tokens must be >= 2, got {args.verify_tokens}")
    if args.calls < 1:
        raise CLIError(f"--calls must be >= 1, got {args.calls}")
    if args.reps < 1:
        raise CLIError(f"--reps must be >= 1, got {args.reps}")
    result = benchmark.run(batches, shape, jnp.dtype(args.state_dtype), T=args.verify_tokens,
                           calls=args.calls, reps=args.reps,
                           copy_bytes=(1 << 30) if on_gpu else (1 << 26),
                           report=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_info(args) -> int:
    import jax

    import gdn_jax
    from gdn_jax.ops import describe_dispatch
    from gdn_jax.ops.dispatch import Device
    dev = Device.of()
    cap = "none (not CUDA)" if dev.capability is None else ".".join(map(str, dev.capability))
    print(f"gdn-jax {gdn_jax.__version__}, jax {jax.__version__}")
    print(f"device: {dev.kind} (platform {dev.platform}), {len(jax.devices())} device(s)")
    print(f"compute capability: {cap}")
    print(describe_dispatch())
    from gdn_jax.models.embedded import EMBEDDED_DIR
    present = os.path.isfile(os.path.join(EMBEDDED_DIR, "config.json"))
    print(f"embedded model: {EMBEDDED_DIR}{'' if present else ' (missing)'}")
    return 0


# ------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gdn-jax", description="Gated DeltaNet inference in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (default: the embedded model)",
                       description="Generate with MTP speculative decoding (or plainly with "
                                   "--num-draft-tokens 0) as one jitted program.")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text (default: the model's first prompts.json "
                                      "prompt, else a short Python function header)")
    src.add_argument("--prompts-file", help="a batch of prompts: JSON list of strings, "
                                            "prompts.json, or one prompt per line")
    g.add_argument("--model", help="a Hugging Face Qwen3-Next / Qwen3.5 directory with "
                                   "tokenizer.json (default: the embedded model)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--num-draft-tokens", type=int, default=None,
                   help="MTP drafts per round (0: plain decoding; a verify call takes the "
                        "drafts + 1 <= gdn_jax.ops.MAX_T tokens; default 3 on a "
                        "GPU, 0 elsewhere, where speculation is slower than plain decoding)")
    g.add_argument("--state-dtype", choices=DTYPES, default="bfloat16",
                   help="GDN state storage (default bfloat16)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute and weight dtype (default: bfloat16 on GPU, float32 elsewhere)")
    g.add_argument("--max-len", type=int, default=None,
                   help="cache length per sequence (default: prompt + new tokens + drafts, "
                        "checked against max_position_embeddings)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    g.add_argument("--stream", action="store_true",
                   help="print tokens as chunks of rounds finish (one prompt; see --stream-chunk)")
    g.add_argument("--stream-chunk", type=int, default=16,
                   help="tokens per streamed chunk (each chunk re-prefills prompt + output)")
    g.add_argument("--stop-repeats", type=int, default=REPEATS,
                   help=f"stop a row once a block of tokens repeats this many times in a row "
                        f"(at least {MIN_TOKENS} tokens; 0: off; default {REPEATS})")
    g.add_argument("--no-prompt", action="store_true",
                   help="print the completion only (default: the prompt first, dimmed on a "
                        "terminal, else followed by a separator line)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="time this package's decode and verify ops on this device")
    b.add_argument("--batches", help="comma-separated B (default 1,8,32,256 on GPU; 1,8 on CPU)")
    b.add_argument("--state-dtype", choices=DTYPES, default="bfloat16")
    b.add_argument("--verify-tokens", type=int, default=4, help="T of the verify (default 4)")
    b.add_argument("--calls", type=int, default=20, help="calls per timed program (n)")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="device, capability and the dispatch table")
    i.set_defaults(func=cmd_info)

    # `train` is training's own command line (gdn_jax.train.command): main() hands it the
    # arguments before this parser runs, so nothing of gdn_jax.train is imported here.
    sub.add_parser("train", add_help=False,
                   help="train the embedded model on this Python's stdlib (about 2 min on one "
                        "H100; `gdn-jax train --help`)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from gdn_jax.train.command import main as train_main
        return train_main(argv[1:], prog="gdn-jax train")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        msg = str(e)
    except (ValueError, OSError) as e:  # bad config, unreadable checkpoint: the library's words
        msg = str(e)
    print(f"gdn-jax: error: {' '.join(msg.split())}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
