"""Time a plain decode step, the MTP verify forward and a whole speculative round (gdn_jax.speculative),
on one GPU or tensor-parallel over several.

    python bench/bench_speculative.py --out DIR              # full depth (48), B = 1, 8, 32
    python bench/bench_speculative.py --out DIR --quick      # B = 1, 8, fewer repetitions
    python bench/bench_speculative.py --out DIR --layers 8   # fewer layers (3 GDN : 1 attention)
    python bench/bench_speculative.py --out DIR --accept-length 3.39 --commit-mode ring
    python bench/bench_speculative.py --out DIR --tp 1,2,4 --family qwen3_next --batches 1,32 --no-comm
    python bench/bench_speculative.py --out DIR --smoke      # tiny model on CPU (checks the script)

Model: random weights at full width. `--family qwen3_5_text` (default): dense Qwen3.5-shaped, MLP
5120, 48 layers. `--family qwen3_next`: Qwen3-Next-80B-A3B-shaped, a sparse MoE block in every
layer (`--experts`, default 512, top 10, expert width 512, shared expert 512), 48 layers.
`--family qwen3_5_moe_text`: Qwen3.5-35B-A3B-shaped, MoE in every layer (256 experts, top 8, expert
and shared expert 512), 40 layers. All: hidden 2048, GDN H = 16, HV = 32, K = V = 128, conv 4;
gated attention 16 heads, 2 KV heads, head dim 256; untied LM head; one MTP layer; vocab: Qwen3.5's
248320 (qwen3_5_*), Qwen3-Next's 151936 (qwen3_next). `--layers` decoder layers (default: the
family's), every 4th a full-attention layer (at least one of each kind). bf16 weights, activations and GDN state; `--commit-mode` (replay by default); the ops' default backend
(Pallas kernels on a GPU). Every row starts with `--context` tokens in its KV caches (random GDN
state: zeros; the numbers do not depend on it).

`--tp 1,2,4`: each value runs the model on a ("tp",) mesh of the first tp devices, its
parameters drawn straight into their shards (the layout gdn_jax.models.shard_model gives; TP = 1:
the first device alone). `--no-comm` also times decode and
round at each TP > 1 with the blocks' all-reduces removed (traced under the benchmark-only
`gdn_jax.modules.sharding.without_collectives`: every `psum` of the head-parallel blocks and the
embedding is the identity; wrong numbers, the same local work): the difference is the time the
collectives take (and what they keep from overlapping). `--moe gather|grouped|pallas` sets every MoE block's
expert path (`gdn_jax.modules.mlp.set_expert_path`).

What is timed, per (TP, B) (d = --draft, default 3):
- decode: one decode step of the target in --commit-mode: one token, all layers, LM head,
          argmax. In ring mode that is the ring's output-only decode; `plain_decode` is then
          also timed, on a replay-mode cache (the plain decode kernel), and every ratio to
          decode (verify and round / decode, speculative / plain, decode / floor) takes it.
- verify: the target over d + 1 tokens from the cache (GDN verify path), LM head, greedy
          acceptance and the commit; drafts are not computed (fixed shifts of the last token).
- round:  one whole speculative round as `generate` runs it: the MTP extend (d + 1 pairs) and
          d - 1 chained MTP steps (d draft steps), the verify, acceptance, commit, bookkeeping.
A jitted `lax.fori_loop` runs n such calls, each taking the token (and cache) the last produced
(MoE families: shifted by a random offset each step, so routing does not collapse onto a few
experts; the round's tokens are the loop's own),
the cache carried and donated (the round: `gdn_jax.speculative.round_step` from
`speculative.loop_state`). The trip count is a runtime argument, so one executable runs n and 2n
calls; per call = (t(2n) - t(n)) / n, the median over --reps (dispatch and sync cancel;
`gdn_jax.benchmark.time_chain`). The naive t(n) / n is recorded too. Tokens/s: plain decoding
B / decode; speculative B * L / round, with L the mean accept length the rounds kept: forced to
`--accept-length` (default 3.39; SpecConfig.forced_accept_length: Binomial(d, (L - 1) / d) drafts
kept per row and round, so commits, folds and KV growth are a real run's; random weights accept
nothing on their own). The byte floor of each step (`byte_floor`: weights without the embedding
table, routed experts as touched under uniform routing, the GDN state and conv window per commit
mode, the KV of the context; the round adds the MTP head and LM head per draft) over the copy
bandwidth measured in the same run gives decode / floor and round / floor. Target
(issue #6): verify <= 1.3 x decode, B <= 32. The JSON (written after every row) has the devices,
jax, the copy bandwidth of device 0 and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from bench_moe import best_pair  # noqa: E402
from gdn_jax import speculative as S  # noqa: E402
from gdn_jax.benchmark import time_chain  # noqa: E402
from gdn_jax.models import ModelConfig, Qwen3NextForCausalLM  # noqa: E402
from gdn_jax.models.sharding import attach_mesh, check_config, param_specs  # noqa: E402
from gdn_jax.modules.attention import set_attention_impl  # noqa: E402
from gdn_jax.modules.mlp import set_expert_path  # noqa: E402
from gdn_jax.modules.sharding import auto_mesh, tp_size, without_collectives  # noqa: E402
from gdn_jax.ops.state import default_ring_size  # noqa: E402

BATCHES, QUICK_BATCHES = (1, 8, 32), (1, 8)
FAMILIES = ("qwen3_5_text", "qwen3_next", "qwen3_5_moe_text")
FULL_DEPTH = {"qwen3_5_text": 48, "qwen3_next": 48, "qwen3_5_moe_text": 40}
EXPERTS = {"qwen3_next": 512, "qwen3_5_moe_text": 256}  # the MoE families' routed experts
TOP_K = {"qwen3_next": 10, "qwen3_5_moe_text": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="bench/results", help="directory for the JSON results")
    p.add_argument("--quick", action="store_true", help=f"B in {QUICK_BATCHES}, 3 reps")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model (hidden 64, HV 4, K = V = 16, vocab 256) on any device; "
                        "the numbers mean nothing")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (every 4th full attention; default: the family's full "
                        "depth, 48 = 36 GDN + 12 attention, or 40 for qwen3_5_moe_text)")
    p.add_argument("--batches", default=None, help="comma-separated B values (overrides)")
    p.add_argument("--draft", type=int, default=3, help="d, drafts per round (default 3)")
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV caches")
    p.add_argument("--chain", type=int, default=20, help="calls per timed program (n; >= 20)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--family", default="qwen3_5_text", choices=FAMILIES,
                   help="dense Qwen3.5-shaped (default), Qwen3-Next-80B-shaped (MoE) or "
                        "Qwen3.5-35B-A3B-shaped (MoE)")
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts (MoE families; default 512 qwen3_next, 256 qwen3_5_moe_text)")
    p.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes (devices)")
    p.add_argument("--no-comm", action="store_true",
                   help="also time decode and round without the blocks' all-reduces (TP > 1)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth copy")
    p.add_argument("--accept-length", type=float, default=3.39,
                   help="forced acceptance: rounds keep Binomial(d, (L - 1) / d) drafts per row "
                        "so the mean accept length is L (SpecConfig.forced_accept_length; "
                        "0: the model's own acceptance, none with random weights)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"),
                   help="attention scores (gdn_jax.modules.attention.set_attention_impl): the "
                        "model's choice (auto: pallas where its kernel runs compiled), over the "
                        "whole cache (xla) or each row's used length (pallas)")
    p.add_argument("--commit-mode", default="replay", choices=("replay", "ring", "intermediate"),
                   help="the GDN layers' commit mode (the speculative loop's default, 'auto', "
                        "takes ring from RING_FROM_BATCH rows on Hopper with a bf16 state, "
                        "else replay: gdn_jax.ops.dispatch.commit_mode_for)")
    p.add_argument("--moe", default="auto", choices=("auto", "gather", "grouped", "pallas"),
                   help="MoE experts (gdn_jax.modules.mlp.set_expert_path): the model's choice "
                        "(auto), always gathered, always the grouped matmuls (lax.ragged_dot), "
                        "or the grouped Pallas kernel (gdn_jax.ops.moe)")
    p.add_argument("--moe-configs", default=None, metavar="BENCH_MOE_JSON",
                   help="the routed experts' kernel configs: at each token count a bench_moe "
                        "--sweep JSON has a case for, its best (gate / up, down) pair in place "
                        "of gdn_jax.ops.moe.default_configs' (an A/B of a sweep's winner by "
                        "step time before it goes into config_for)")
    args = p.parse_args(argv)
    args.layers = args.layers or FULL_DEPTH[args.family]
    if args.layers < 2:
        p.error("--layers must be >= 2 (one layer of each kind)")
    if args.draft < 1:
        p.error("--draft must be >= 1")
    if args.chain < 20 and not args.smoke:
        p.error("--chain must be >= 20")
    return args


def model_config(layers: int, smoke: bool, family: str = "qwen3_5_text",
                 experts: int | None = None) -> ModelConfig:
    types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    if smoke:
        dims = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, intermediate_size=128)
        moe = dict(num_experts=min(experts or 8, 8), num_experts_per_tok=2,
                   moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:
        # vocabularies: Qwen3.5's 248320, Qwen3-Next's 151936
        dims = dict(vocab_size=151936 if family == "qwen3_next" else 248320,
                    hidden_size=2048, num_attention_heads=16,
                    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                    intermediate_size=5120)
        E = experts or EXPERTS.get(family, 512)
        moe = dict(num_experts=E, num_experts_per_tok=min(TOP_K.get(family, 10), E),
                   moe_intermediate_size=512, shared_expert_intermediate_size=512)
    if family in EXPERTS:
        dims.update(moe)
    return ModelConfig(model_type=family, num_hidden_layers=layers, layer_types=types,
                       mtp_num_hidden_layers=1, tie_word_embeddings=False, **dims)


def random_model(config: ModelConfig, dtype, mesh=None) -> Qwen3NextForCausalLM:
    """Built abstractly, every parameter drawn where it lives (std 0.02) by one small jitted draw
    per distinct shape (one jit of all 48 layers' draws took 2 minutes to compile on the H200):
    on the default device, or, with a ("tp",) `mesh`, each straight into its shards (a model too
    big for one device, Qwen3-Next-80B at TP = 2, is never whole on one). Random values need no
    tp-blocked column permutation: the drawn layout is the sharded one."""
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    if mesh is not None:
        check_config(config, tp_size(mesh))
        specs = param_specs(model, mesh)
    draws = {}

    def draw(path, shape, dtype):
        where = None if mesh is None else NamedSharding(mesh, specs[tuple(path)])
        fn = draws.get((shape, dtype, where))
        if fn is None:
            fn = draws[(shape, dtype, where)] = jax.jit(
                lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                out_shardings=where)
        return fn

    key = jax.random.key(0)
    for i, (path, var) in enumerate(flat):
        var.set_value(draw(path, var.shape, var.dtype)(jax.random.fold_in(key, i)))
    if mesh is not None:
        attach_mesh(model, mesh)
    return model


def set_context(cache, context: int):
    """Every slot holds `context` committed tokens in every KV cache; nothing pending."""
    full = lambda a: None if a is None else jnp.full_like(a, context)  # noqa: E731
    return cache.replace(lengths=full(cache.lengths),
                         count=None if cache.count is None else jnp.zeros_like(cache.count),
                         mtp=tuple(c.replace(lengths=full(c.lengths)) for c in cache.mtp))


_reset = jax.jit(set_context, static_argnums=(1,), donate_argnums=(0,))


def _param_bytes(model) -> dict:
    """Parameter bytes by what a step reads: the target's layers, final norm and LM head (not the
    embedding table: a step gathers B rows of it), the MTP head, and the routed experts apart
    (per layer: bytes of one expert, number of experts)."""
    out = {"target": 0, "mtp": 0, "experts": []}
    state = nnx.state(model, nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        if name.startswith("embed_tokens"):
            continue
        part = "mtp" if name.startswith("mtp/") else "target"
        if "/experts_" in name:  # [E, ...]: a step reads the experts its tokens route to
            out["experts"].append((part, leaf.shape[0], nbytes // leaf.shape[0]))
        else:
            out[part] += nbytes
    return out


def _touched(E: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts of E that `tokens` tokens touch under uniform random routing."""
    return E * (1.0 - (1.0 - top_k / E) ** tokens) if E else 0.0


def byte_floor(model, config, B: int, context: int, d: int, commit_mode: str,
               accept_length: float | None = None, state_bytes: int = 2) -> dict:
    """Bytes a plain decode step, a verify forward and a speculative round must move (the step's
    byte floor):
    weights (`_param_bytes`; routed experts: those touched, in expectation under uniform random
    routing: 1 token per row for decode, d + 1 for the verify, 1 per MTP forward), the GDN state
    and conv window read and written in `commit_mode`, and the KV of the used length (context).
    The round reads the MTP head and the LM head once per draft (d forwards: the extend and
    d - 1 chained steps)."""
    c = config
    pb = _param_bytes(model)
    gdn_layers = sum(t == "linear_attention" for t in c.layer_types)
    attn_layers = len(c.layer_types) - gdn_layers
    lm_head = c.hidden_size * c.vocab_size * 2
    pool = (B * c.linear_num_value_heads * c.linear_value_head_dim * c.linear_key_head_dim
            * state_bytes)
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + (
        c.linear_num_value_heads * c.linear_value_head_dim)
    conv = B * conv_dim * (c.linear_conv_kernel_dim - 1) * 2
    kv = 2 * B * context * c.num_key_value_heads * c.head_dim * 2  # one attention layer's K, V

    def experts(part, tokens):
        return sum(_touched(E, c.num_experts_per_tok, tokens) * per
                   for p, E, per in pb["experts"] if p == part)

    T = d + 1
    L = accept_length or T
    W = default_ring_size(T)
    # GDN state per round, by commit mode (decode: one read and one write): replay reads and
    # writes it once; intermediate reads it, writes T states and copies one back; ring reads it
    # and writes it at a fold, once every (W - T) / L rounds
    per_round = {"replay": 2.0, "intermediate": 1.0 + T + 2.0,
                 "ring": 1.0 + min(1.0, L / (W - T))}[commit_mode]
    decode = (pb["target"] + experts("target", B) + gdn_layers * (2 * pool + 2 * conv)
              + attn_layers * kv)
    # the verify forward alone: the state read (and, intermediate, T states written), no commit
    verify = (pb["target"] + experts("target", B * T)
              + gdn_layers * ({"intermediate": 1.0 + T}.get(commit_mode, 1.0) * pool + conv)
              + attn_layers * kv)
    round_ = (pb["target"] + experts("target", B * T) + gdn_layers * (per_round * pool + 2 * conv)
              + attn_layers * kv
              + d * (pb["mtp"] + lm_head + experts("mtp", B) + kv))
    return {"decode_bytes": decode, "verify_bytes": verify, "round_bytes": round_,
            "weights_target": pb["target"],
            "weights_mtp": pb["mtp"], "lm_head": lm_head, "gdn_pool": pool, "kv_layer": kv,
            "gdn_layers": gdn_layers, "attn_layers": attn_layers, "gdn_state_per_round": per_round}


def chains(graphdef, d: int, vocab: int, buf_tokens: int, accept_length: float | None = None,
           commit_mode: str = "replay", random_tokens: bool = False):
    """The three timed programs: f(params, n, cache, tok) -> (cache, tok).

    random_tokens: decode and verify feed each step the argmax shifted by a random offset (a
    random model's argmax chain can collapse onto a few tokens, and so route every step to the
    same experts, which then come from L2); the argmax is still computed and used."""

    def next_token(i, best):
        if not random_tokens:
            return best
        shift = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), best.shape, 0, vocab)
        return ((best + shift) % vocab).astype(jnp.int32)

    def decode(params, n, cache, tok):
        model = nnx.merge(graphdef, params)
        slots = jnp.arange(tok.shape[0], dtype=jnp.int32)

        def body(i, carry):
            cache, tok = carry
            out = model(tok[:, None], cache, slots, mode="decode")
            return out.cache, next_token(i, jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32))
        return lax.fori_loop(0, n, body, (cache, tok))

    def verify(params, n, cache, tok):
        model = nnx.merge(graphdef, params)
        slots = jnp.arange(tok.shape[0], dtype=jnp.int32)

        def body(i, carry):
            cache, tok = carry
            drafts = (tok[:, None] + jnp.arange(1, d + 1)[None, :]) % vocab
            out = model(jnp.concatenate([tok[:, None], drafts], 1), cache, slots, mode="verify")
            best = jnp.argmax(out.logits, -1).astype(jnp.int32)  # [B, d + 1]
            ok = jnp.cumprod((drafts == best[:, :d]).astype(jnp.int32), axis=1)
            n_acc = jnp.sum(ok, axis=1)
            cache = model.commit(out.cache, slots, n_acc + 1)
            return cache, next_token(i, jnp.take_along_axis(best, n_acc[:, None], 1)[:, 0])
        return lax.fori_loop(0, n, body, (cache, tok))

    cfg = S.SpecConfig(num_draft=d, max_new_tokens=buf_tokens, commit_mode=commit_mode,
                       forced_accept_length=accept_length)

    def round_(params, n, cache, tok):
        model = nnx.merge(graphdef, params)
        B = tok.shape[0]
        slots = jnp.arange(B, dtype=jnp.int32)
        hidden = jnp.zeros((B, model.config.hidden_size), model.dtype)
        state = S.loop_state(cache, tok, hidden, cfg)
        max_new = jnp.full((B,), buf_tokens, jnp.int32)
        key = jax.random.key(0)
        state = lax.fori_loop(
            0, n, lambda _, c: S.round_step(model, c, slots, max_new, key, cfg), state)
        return state.cache, state.pending, (state.accepted, state.row_rounds)

    return {"decode": decode, "verify": verify, "round": round_}


def _memory(dev) -> dict:
    """The device's bytes in use and their peak so far (GiB), where its allocator says: what a
    run that runs out of memory needs to be read against."""
    stats = dev.memory_stats() or {}
    return {f"{key}_gib": round(stats[key] / 2 ** 30, 2)
            for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if key in stats}


def time_program(fn, params, cache, tok, n: int, reps: int, context: int):
    """Per-call seconds of program fn (`gdn_jax.benchmark.time_chain`, by difference; every run
    from `context` tokens): (timing, cache, what else the last run returned)."""
    run = jax.jit(lambda *a: fn(*a), donate_argnums=(2,))  # a fresh trace per call

    def chain(state, calls):
        return run(params, jnp.int32(calls), state[0], tok)

    def rewind(state):
        return (_reset(state[0], context),) + tuple(state[1:])

    timing, state = time_chain(chain, (cache, tok), calls=n, reps=reps, setup=rewind)
    return timing, state[0], state[2:]


def build(config, dtype, tp: int):
    """The random model on the first tp devices (drawn into its head shards when tp > 1)."""
    devices = jax.devices()
    if tp > len(devices):
        raise SystemExit(f"--tp {tp}: only {len(devices)} devices")
    if tp > 1:
        mesh = auto_mesh(jax.make_mesh((tp,), ("tp",), devices=devices[:tp]))
        return random_model(config, dtype, mesh)
    with jax.default_device(devices[0]):
        return random_model(config, dtype)


def swept_moe_configs(path: str) -> dict:
    """{tokens: (gate / up, down) `MoEConfig`s}: the best pair of each swept case of a
    bench_moe JSON (`bench_moe.best_pair`)."""
    cases = json.load(open(path))["cases"]
    best = {c["tokens"]: best_pair(c["sweep"]) for c in cases
            if c.get("sweep", {}).get("gate_up") and c["sweep"].get("down")}
    if not best:
        raise SystemExit(f"--moe-configs: {path} has no swept case (bench_moe --sweep)")
    return best


def use_moe_configs(best: dict) -> None:
    """`gdn_jax.ops.moe.default_configs` returns best[tokens] where it has that token count
    (this process only: traced from here on)."""
    from gdn_jax.ops import moe
    default = moe.default_configs

    def configs(pairs, tokens, *args, **kwargs):
        return best.get(tokens) or default(pairs, tokens, *args, **kwargs)
    moe.default_configs = configs


def main(argv=None):
    args = parse_args(argv)
    moe_configs = swept_moe_configs(args.moe_configs) if args.moe_configs else {}
    if moe_configs:
        use_moe_configs(moe_configs)
    t_start = time.perf_counter()
    from bench_kernels import copy_bandwidth
    copy = copy_bandwidth(args.copy_gib, args.smoke)
    dev = jax.devices()[0]
    batches = (tuple(int(b) for b in args.batches.split(",")) if args.batches
               else QUICK_BATCHES if args.quick else BATCHES)
    tps = tuple(int(t) for t in args.tp.split(","))
    reps = 3 if args.quick else args.reps
    chain = 4 if args.smoke and args.chain >= 20 else args.chain
    d = args.draft
    accept = args.accept_length or None
    if accept is not None and not 1.0 <= accept <= d + 1:
        raise SystemExit(f"--accept-length must be in 1..d + 1 = {d + 1} (or 0), got {accept}")
    dtype = jnp.bfloat16
    config = model_config(args.layers, args.smoke, args.family, args.experts)
    buf_tokens = 2 * chain * (d + 1) + 1
    max_len = args.context + 2 * chain * (d + 1) + 2 * (d + 1)
    kind = dev.device_kind.replace(" ", "_") if dev.platform == "gpu" else dev.platform
    print(f"{len(jax.devices())} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"copy {copy['GBps']:.0f} GB/s, {args.family}, layers {config.layer_types}, d = {d}, "
          f"context {args.context}, chain {chain}, reps {reps}, TP {tps}", flush=True)

    tag = (f"-{args.family}" + (f"-tp{'_'.join(map(str, tps))}" if tps != (1,) else "")
           + (f"-{args.moe}" if args.moe != "auto" else "")
           + (f"-{args.attention}_attention" if args.attention != "auto" else ""))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out,
                        f"bench_speculative-{kind}{tag}{'-smoke' if args.smoke else ''}.json")
    report = {
        "bench": "bench_speculative",
        "device": {"kind": dev.device_kind, "platform": dev.platform, "count": len(jax.devices()),
                   "names": [str(x) for x in jax.devices()],
                   "compute_capability": getattr(dev, "compute_capability", None)},
        "jax": jax.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "copy_bandwidth": copy,
        "settings": {"family": args.family, "moe": args.moe, "attention": args.attention,
                     "layers": list(config.layer_types),
                     "hidden": config.hidden_size, "vocab": config.vocab_size,
                     "HV": config.linear_num_value_heads, "K": config.linear_key_head_dim,
                     "V": config.linear_value_head_dim, "experts": config.num_experts,
                     "top_k": config.num_experts_per_tok, "dtype": "bfloat16",
                     "state_dtype": "bfloat16", "commit_mode": args.commit_mode, "draft": d,
                     "accept_length_forced": accept,
                     "context": args.context, "max_len": max_len, "chain": chain, "reps": reps,
                     "tp": list(tps), "smoke": args.smoke, "argv": sys.argv[1:],
                     "moe_configs": {str(t): [dataclasses.asdict(c) for c in pair]
                                     for t, pair in moe_configs.items()}},
        "method": "per call = median over reps of (t(2n) - t(n)) / n, fori_loop chain, cache "
                  "donated; naive = median t(n) / n; no_comm: the blocks' psums traced as the "
                  "identity",
        "results": [],
    }

    rows = report["results"]
    for tp in tps:
        model = build(config, dtype, tp)
        if args.moe != "auto":
            set_expert_path(model, args.moe)
        set_attention_impl(model, args.attention)
        graphdef, params = nnx.split(model)
        progs = chains(graphdef, d, config.vocab_size, buf_tokens=buf_tokens,
                       accept_length=accept, commit_mode=args.commit_mode,
                       random_tokens=config.num_experts > 0)
        for B in batches:
            cache = model.init_cache(B, max_len, t_max=d + 1, state_dtype=dtype,
                                     commit_mode=args.commit_mode)
            tok = jnp.asarray(np.random.default_rng(B).integers(0, config.vocab_size, B),
                              jnp.int32)
            row = {"tp": tp, "B": B}
            names = ["decode", "verify", "round"]
            if args.no_comm and tp > 1:
                names += ["decode_no_comm", "round_no_comm"]
            # Ring mode's decode step is the ring's (output-only) kernel; plain decoding, what
            # speculation is compared with, runs on a replay-mode cache (the plain kernel)
            if args.commit_mode == "ring":
                names.append("plain_decode")
            for name in names:
                base = name.split("_no_comm")[0]
                ctx = without_collectives() if name != base else contextlib.nullcontext()
                if name == "plain_decode":
                    del cache
                    cache = model.init_cache(B, max_len, t_max=d + 1, state_dtype=dtype,
                                             commit_mode="replay")
                    base = "decode"
                with ctx:
                    timing, cache, extra = time_program(progs[base], params, cache, tok, chain,
                                                        reps, args.context)
                if base == "round" and extra:
                    accepted, row_rounds = (np.asarray(x) for x in extra[0])
                    row.setdefault("accept_length", float(
                        (accepted.sum() + row_rounds.sum()) / max(1, row_rounds.sum())))
                per, naive, comp = timing.per_call_s, timing.whole_s, timing.first_s
                row[name] = {"per_call_ms": per * 1e3, "naive_ms": naive * 1e3,
                             "compile_s": round(comp, 2), "method": timing.method,
                             "note": timing.note, **_memory(dev)}
                note = f" [{timing.note}]" if timing.note else ""
                print(f"  TP={tp} B={B:<3} {name:<15} {per * 1e3:9.3f} ms/call  (naive "
                      f"{naive * 1e3:.3f}, compile+first {comp:.1f} s){note}", flush=True)
            dec = row.get("plain_decode", row["decode"])["per_call_ms"]
            rnd = row["round"]["per_call_ms"]
            row["verify_over_decode"] = row["verify"]["per_call_ms"] / dec
            row["round_over_decode"] = rnd / dec
            floor = byte_floor(model, config, B, args.context, d, args.commit_mode, accept)
            gbps = copy["GBps"]
            row["floor"] = {**floor, **{f"{k}_ms": floor[f"{k}_bytes"] / gbps / 1e6
                                        for k in ("decode", "verify", "round")}}
            row["decode_over_floor"] = dec / row["floor"]["decode_ms"]
            row["verify_over_floor"] = row["verify"]["per_call_ms"] / row["floor"]["verify_ms"]
            row["round_over_floor"] = rnd / row["floor"]["round_ms"]
            L = row.get("accept_length")
            if accept and L:
                row["spec_tokens_per_s"] = B * L / rnd * 1e3
                row["spec_over_plain"] = row["spec_tokens_per_s"] / (B / dec * 1e3)
            row["tokens_per_s"] = {"plain": B / dec * 1e3,
                                   **{f"spec_L{L}": B * L / rnd * 1e3 for L in (1, 2, 3, 4)}}
            for name in ("decode", "round"):
                if f"{name}_no_comm" in row:
                    t, t0 = row[name]["per_call_ms"], row[f"{name}_no_comm"]["per_call_ms"]
                    row[f"{name}_comm_share"] = (t - t0) / t
            rows.append(row)
            report["total_s"] = round(time.perf_counter() - t_start, 1)
            with open(path, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump(report, f, indent=1)
            del cache
        del model, params, progs

    print(f"\n{'TP':>3} {'B':>4} {'decode ms':>10} {'floor ms':>9} {'dec/floor':>9} "
          f"{'verify ms':>10} {'round ms':>10} {'round/dec':>10} {'L':>5} {'plain tok/s':>12} "
          f"{'spec tok/s':>11} {'spec/plain':>10} {'comm share':>11}   (d = {d})")
    for r in rows:
        share = r.get("decode_comm_share")
        rnd_share = r.get("round_comm_share")
        comm = ("" if share is None else f"{100 * share:.0f}%/{100 * rnd_share:.0f}%")
        spec = r.get("spec_tokens_per_s")
        dec = r.get("plain_decode", r["decode"])["per_call_ms"]  # ring mode: the plain one
        print(f"{r['tp']:>3} {r['B']:>4} {dec:>10.3f} "
              f"{r['floor']['decode_ms']:>9.3f} {r['decode_over_floor']:>9.2f} "
              f"{r['verify']['per_call_ms']:>10.3f} {r['round']['per_call_ms']:>10.3f} "
              f"{r['round_over_decode']:>10.2f} {r.get('accept_length', float('nan')):>5.2f} "
              f"{r['tokens_per_s']['plain']:>12.0f} "
              f"{spec if spec is not None else float('nan'):>11.0f} "
              f"{r.get('spec_over_plain', float('nan')):>10.2f} {comm:>11}")
    print("comm share: decode/round time the blocks' all-reduces add (--no-comm)")
    ok = all(r["verify_over_decode"] <= 1.3 for r in rows if r["B"] <= 32)
    print(f"target verify <= 1.3 x decode for B <= 32: {'met' if ok else 'NOT met'}")
    report["verify_target_met"] = ok
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path} (total {report['total_s']} s)")


if __name__ == "__main__":
    main()
