"""The `gdn-jax` command line: generate, bench, info, train.

    gdn-jax generate [--prompt TEXT | --prompts-file FILE] [--model DIR] [--num-draft-tokens 3] ...
    gdn-jax bench    [--batches 1,8,32] [--state-dtype bfloat16]
    gdn-jax info
    gdn-jax train    --out DIR [--steps N --batch B --seq-len T --seed S]

`generate` defaults to the embedded model (`gdn_jax.models.embedded_path()`) and its first held-out
prompt. Errors the user can fix (a missing directory, a bad config, a prompt too long for the
cache, a bad option value) print one line, `gdn-jax: error: ...`, on stderr and exit with 2;
anything else is a bug and keeps its traceback.

jax is imported inside the commands: `train` must set XLA_FLAGS (deterministic GPU reductions)
before jax starts, and `--help` should not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_USAGE = 2
DTYPES = ("bfloat16", "float32")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Helpers


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("GDN_JAX_PROGRESS") != "1",
                bar_format="{desc}: {n_fmt}/{total_fmt} {postfix}")


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


def _stop_tokens(model_dir: str, tokenizer) -> tuple[int, ...]:
    """eos_token_id of config.json (an int or a list; generation_config.json's too), else the
    embedded tokenizer's EOS."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not ids:
        from gdn_jax.train.tokenizer import eos_id
        eos = eos_id(tokenizer)
        ids = [] if eos is None else [eos]
    return tuple(sorted({int(i) for i in ids}))


# ------------------------------------------------------------------------------------------------
# generate


def _generate_stream(model, prompts, lengths, *, chunk: int, max_new: int, stop, key, write,
                     **kw):
    """--stream: `generate` in chunks of `chunk` tokens. Each chunk re-prefills the prompt plus
    the tokens so far (right-padded to one width, so one compiled program serves every chunk)
    and generates `chunk` more; `write(text)` gets the new text after every chunk. Greedy output
    is plain greedy decoding's, as unstreamed; sampling draws from the same distribution with a
    key folded per chunk (so not the unstreamed tokens). Returns (ids, accepted, rounds)."""
    import jax
    import numpy as np

    from gdn_jax import speculative
    P0 = prompts.shape[1]
    width = P0 + max_new
    buf = np.zeros((1, width), np.int32)
    buf[0, :P0] = prompts[0]
    n = int(lengths[0])
    out, accepted, rounds = [], 0, 0
    for c in range(-(-max_new // chunk)):
        res = speculative.generate(model, buf, np.asarray([n], np.int32), max_new_tokens=chunk,
                                   key=jax.random.fold_in(key, c), stop_tokens=stop,
                                   max_len=width + chunk + kw["num_draft"], **kw)
        new = np.asarray(res.tokens[0, :int(res.lengths[0])]).tolist()[:max_new - len(out)]
        accepted += int(res.accepted[0])
        rounds += int(res.row_rounds[0])
        write(new)
        out += new
        buf[0, n:n + len(new)] = new
        n += len(new)
        if len(out) >= max_new or (new and new[-1] in stop):
            break
    return out, accepted, rounds


def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gdn_jax import speculative
    from gdn_jax.ops import dispatch
    from gdn_jax.train.evaluate import encode_prompts

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_draft_tokens < 0:
        raise CLIError(f"--num-draft-tokens must be >= 0 (0: plain decoding), got "
                       f"{args.num_draft_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.stream_chunk < 1:
        raise CLIError(f"--stream-chunk must be >= 1, got {args.stream_chunk}")
    model_dir = _model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    if args.prompt is not None:
        texts = [args.prompt]
    elif args.prompts_file is not None:
        texts = _load_prompts_file(args.prompts_file)
    else:
        default = os.path.join(model_dir, "prompts.json")
        if not os.path.isfile(default):
            raise CLIError(f"give --prompt or --prompts-file ({model_dir} has no prompts.json)")
        texts = _load_prompts_file(default)[:1]
    if args.stream and len(texts) != 1:
        raise CLIError(f"--stream takes one prompt, got {len(texts)}")
    try:
        prompts, lengths = encode_prompts(tokenizer, texts)
    except ValueError as e:
        raise CLIError(f"--prompt: {e}") from None

    from gdn_jax.models import ModelConfig, Qwen3NextForCausalLM
    config = ModelConfig.from_pretrained(model_dir)
    d = args.num_draft_tokens
    need = prompts.shape[1] + args.max_new_tokens + d
    limit = args.max_len or config.max_position_embeddings
    if need > limit:
        what = "--max-len" if args.max_len else "the model's max_position_embeddings"
        raise CLIError(f"the prompt ({prompts.shape[1]} tokens) + --max-new-tokens "
                       f"({args.max_new_tokens}) + --num-draft-tokens ({d}) = {need} tokens "
                       f"exceed the cache: {what} = {limit}")
    device = jax.devices()[0]
    dtype = args.dtype or ("bfloat16" if device.platform == "gpu" else "float32")
    bar = _progress(3, "load")
    model = Qwen3NextForCausalLM.from_pretrained(model_dir, dtype=jnp.dtype(dtype),
                                                 with_mtp=True if d > 0 else None)
    bar.update(1)
    stop = _stop_tokens(model_dir, tokenizer)
    key = jax.random.key(args.seed)
    kw = dict(num_draft=d, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              state_dtype=jnp.dtype(args.state_dtype))
    if args.stream:
        bar.close()
        printed = []

        def write(new):
            printed.extend(new)
            sys.stdout.write(tokenizer.decode(new))
            sys.stdout.flush()

        t = time.perf_counter()
        ids, accepted, rounds = _generate_stream(
            model, prompts, lengths, chunk=args.stream_chunk, max_new=args.max_new_tokens,
            stop=stop, key=key, write=write, **kw)
        seconds = time.perf_counter() - t
        sys.stdout.write("\n")
        n_tokens = len(ids)
        accept = (accepted + rounds) / rounds if rounds else 1.0
        timing = "including compilation"
    else:
        def run():
            return speculative.generate(model, prompts, lengths, max_new_tokens=args.max_new_tokens,
                                        key=key, stop_tokens=stop, max_len=args.max_len, **kw)

        bar.set_description("compile")
        jax.block_until_ready(run().tokens)  # compiles; the timed run below reuses the program
        bar.update(1)
        bar.set_description("generate")
        t = time.perf_counter()
        out = run()
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - t
        bar.update(1)
        bar.close()
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        for i in range(len(texts)):
            if len(texts) > 1:
                print(f"--- [{i}]")
            print(tokenizer.decode(toks[i, :lens[i]].tolist()))
        n_tokens = int(lens.sum())
        accept = float(out.accept_length)
        timing = "compiled program"
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


def cmd_train(args) -> int:
    # Deterministic reductions on GPU (scatter-add in the embedding gradient, among others):
    # must be in XLA_FLAGS before jax initialises its backend.
    flag = "--xla_gpu_deterministic_ops=true"
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    from gdn_jax.train import TrainConfig, train
    fields = ("out", "seed", "steps", "batch", "seq_len", "lr", "vocab_size", "hidden_size",
              "num_layers", "eval_tokens", "num_prompts")
    try:
        cfg = TrainConfig(**{f: getattr(args, f) for f in fields})
    except ValueError as e:
        raise CLIError(str(e).replace("TrainConfig: ", "--").replace("_", "-", 1)) from None
    record = train(cfg)
    q = record["quality"]
    print(f"[gdn-jax] trained {cfg.steps} steps in {record['wall_time_s']['train']:.1f} s on "
          f"{record['device']}; final loss {record['final_loss']:.3f}, held-out perplexity "
          f"{q['perplexity']:.2f}, mean accept length {q['mean_accept_length']:.2f}; wrote "
          f"{cfg.out}")
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
                                      "prompt)")
    src.add_argument("--prompts-file", help="a batch of prompts: JSON list of strings, "
                                            "prompts.json, or one prompt per line")
    g.add_argument("--model", help="a Hugging Face Qwen3-Next / Qwen3.5 directory with "
                                   "tokenizer.json (default: the embedded model)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--num-draft-tokens", type=int, default=3,
                   help="MTP drafts per round (0: plain decoding)")
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

    t = sub.add_parser("train", help="train the embedded model on the Python stdlib",
                       description="Train the embedded model (gdn_jax.train); defaults take "
                                   "about 3-5 minutes on one H100.")
    from gdn_jax.train.config import TrainConfig  # no jax import
    d = TrainConfig()
    t.add_argument("--out", required=True, help="output directory")
    for name, typ in (("steps", int), ("batch", int), ("seq_len", int), ("seed", int),
                      ("lr", float), ("vocab_size", int), ("hidden_size", int),
                      ("num_layers", int), ("eval_tokens", int), ("num_prompts", int)):
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ,
                       default=getattr(d, name), help=f"default {getattr(d, name)}")
    t.set_defaults(func=cmd_train)
    return p


def main(argv=None) -> int:
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
