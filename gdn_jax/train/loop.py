"""Train the embedded model: a small Qwen3.5-style hybrid with its MTP head, on the stdlib corpus.

    python -m gdn_jax.train --out DIR                 # or: gdn-jax train --out DIR
    train(TrainConfig(steps=..., out=DIR))            # the same, from Python

Steps: read the corpus (`corpus`), train the BPE (`tokenizer`), tokenize, build the model from
`model_config(...)`, run `steps` AdamW steps under `jax.jit`, evaluate (`evaluate`), and write

    DIR/config.json, model*.safetensors   (bf16 weights, shards <= max_shard_bytes)
    DIR/tokenizer.json, prompts.json      (held-out code snippets), training_record.json

Loss per step, on windows of seq_len + 1 tokens drawn from the training stream (files joined by
EOS): next-token cross-entropy of the model, plus `mtp_weight` x the MTP head's cross-entropy on
the token after next (the head reads the model's hidden state at t and the token t + 1, as
`gdn_jax.speculative` drafts with it). Gradients flow from both losses into the trunk (the head is
trained jointly). The forward is the model's prefill path, which runs the XLA ops everywhere
(`gdn_jax.ops.prefill` has no kernel; the Pallas kernels have no VJP).

Deterministic for a seed on a given device: the parameters come from `nnx.Rngs(seed)`, the
windows of step s from `numpy.random.default_rng([seed, s])`, and on GPU XLA is asked for
deterministic reductions (`--xla_gpu_deterministic_ops`, set by `gdn-jax train` before jax
starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from gdn_jax.models import ModelConfig, Qwen3NextForCausalLM
from gdn_jax.models.embedded import EMBEDDED_DIR
from gdn_jax.progress import Progress, Steps
from gdn_jax.train.config import TrainConfig
from gdn_jax.train.corpus import Corpus
from gdn_jax.train.tokenizer import EOS, train_tokenizer

MAX_SHARD_BYTES = 14_000_000  # the GPU runner returns files of at most 16 MiB; the issue asks 15 MB


def model_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 4,
                 intermediate_size: int = 768, eos_token_id: int = 0) -> ModelConfig:
    """The embedded model's architecture: Qwen3.5 text (dense MLP, split GDN projections), every
    4th layer gated full attention (Qwen3-Next's 3:1; the last layer when there are fewer than
    4), one MTP layer, LM head tied to the embedding (half the bytes of an untied head).

    GDN: H = hidden / 128 key heads (>= 1), HV = 2H value heads, K = V = 64; attention:
    hidden / 64 heads of 64, half as many KV heads (>= 1).
    """
    types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(num_layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    heads = hidden_size // 64
    gdn_k = max(1, hidden_size // 128)
    return ModelConfig.from_dict({
        "model_type": "qwen3_5_text",
        "architectures": ["Qwen3_5ForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "layer_types": types,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 64,
        "linear_num_key_heads": gdn_k,
        "linear_num_value_heads": 2 * gdn_k,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4,
        "intermediate_size": intermediate_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "attn_output_gate": True,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.25},
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "mtp_num_hidden_layers": 1,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    })


# ------------------------------------------------------------------------------------------------
# Data


def token_stream(tokenizer, texts) -> np.ndarray:
    """All texts tokenized and joined, each followed by EOS: [N] int32."""
    eos = tokenizer.token_to_id(EOS)
    ids = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, np.int32)


def sample_windows(stream: np.ndarray, seed: int, step: int, batch: int, length: int):
    """The training windows of one step: [batch, length] int32, random starts, deterministic in
    (seed, step) whatever ran before (a resumed or shortened run sees the same data)."""
    if stream.size < length + 1:
        raise ValueError(f"the training stream has {stream.size} tokens, fewer than a window of "
                         f"{length} + 1")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - length + 1, size=batch)
    return np.stack([stream[s:s + length] for s in starts])


# ------------------------------------------------------------------------------------------------
# Loss and step


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy: logits [B, T, V] fp32, targets [B, T] int32 -> [] fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def losses(model: Qwen3NextForCausalLM, window):
    """(main, mtp) cross-entropies on window [B, T + 1] int32 (module docstring).

    The model runs its prefill path on a fresh cache of B slots (fp32 GDN state: nothing is read
    back from it; the cache is where the ops write their final state). MTP position t reads the
    model's hidden h_t and the token x_{t+1} and predicts x_{t+2}, for t in 0..T - 2.
    """
    B, T1 = window.shape
    T = T1 - 1
    inputs, targets = window[:, :-1], window[:, 1:]
    slots = jnp.arange(B, dtype=jnp.int32)
    cache = model.init_cache(B, T, t_max=1, state_dtype=jnp.float32)
    out = model(inputs, cache, slots, mode="prefill")
    main = cross_entropy(out.logits, targets)
    m = model.mtp_forward(inputs[:, 1:], out.hidden[:, :-1], out.cache, slots, mode="prefill")
    return main, cross_entropy(m.logits, targets[:, 1:])


def make_optimizer(cfg: TrainConfig):
    """AdamW (b2 0.95), linear warmup then cosine decay to lr / 10, global-norm clip 1;
    no weight decay on vectors (norm weights, A_log, dt_bias)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup, max(1, cfg.steps - 1)), max(cfg.steps, 2),
        end_value=cfg.lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                                   mask=decay_mask))


def make_step(graphdef, optimizer, mtp_weight: float):
    """jit(params, opt_state, window) -> (params, opt_state, main loss, mtp loss); donated."""

    def loss_fn(params, window):
        main, mtp = losses(nnx.merge(graphdef, params), window)
        return main + mtp_weight * mtp, (main, mtp)

    def step(params, opt_state, window):
        grads, (main, mtp) = jax.grad(loss_fn, has_aux=True)(params, window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, main, mtp

    return jax.jit(step, donate_argnums=(0, 1))


def build_model(config: ModelConfig, seed: int) -> Qwen3NextForCausalLM:
    """Fresh weights from nnx.Rngs(seed); dense products at the default precision (TF32 on a
    GPU: training noise dwarfs it; the GDN ops themselves stay fp32 HIGHEST)."""
    return Qwen3NextForCausalLM(config, dtype=jnp.float32, precision=lax.Precision.DEFAULT,
                                rngs=nnx.Rngs(seed))


def num_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ------------------------------------------------------------------------------------------------
# The corpus against the shipped model's


def corpus_difference(record: dict, reference_dir: str = EMBEDDED_DIR) -> dict:
    """How this run's corpus (`Corpus.record()`) differs from the one the model in
    `reference_dir` was trained on (its training_record.json): both Python versions and file
    counts, whether the file lists are the same (sha256), and the held-out files each lacks.
    The corpus is the running Python's stdlib, so another Python trains on other files."""
    path = os.path.join(reference_dir, "training_record.json")
    try:
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)["corpus"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"reference": path, "unavailable": f"{type(e).__name__}: {e}"}
    held, ref_held = set(record["held_out_files"]), set(ref.get("held_out_files", ()))
    return {
        "reference": path,
        "python_version": ref.get("python_version"),
        "num_files": ref.get("num_files"),
        "file_list_sha256": ref.get("file_list_sha256"),
        "same_file_list": ref.get("file_list_sha256") == record["file_list_sha256"],
        "held_out_only_here": sorted(held - ref_held),
        "held_out_only_there": sorted(ref_held - held),
    }


def corpus_note(record: dict) -> str:
    """One line for the user: this corpus, and whether it is the shipped model's."""
    here = f"Python {record['python_version']} stdlib, {record['num_files']} files"
    diff = record.get("vs_embedded_model", {})
    if "unavailable" in diff or not diff:
        return here
    if diff["same_file_list"]:
        return f"{here} (the same file list as the shipped model's)"
    return (f"{here}; the shipped model used Python {diff['python_version']}'s "
            f"({diff['num_files']} files): a different corpus, so different weights "
            "(training_record.json: corpus.vs_embedded_model)")


# ------------------------------------------------------------------------------------------------
# The whole run


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Run training end to end (module docstring); returns the training record (also written to
    cfg.out/training_record.json)."""
    from gdn_jax.train import evaluate  # evaluate imports this module's helpers

    t_start = time.perf_counter()
    phases = Progress(8, enabled=progress)
    with phases.phase("read the corpus"):
        corpus = Corpus.from_stdlib(cfg.corpus_root)
        train_texts = corpus.read(corpus.train)
        held_out = corpus.read(corpus.held_out) if corpus.held_out else []
        corpus_record = corpus.record()
        corpus_record["vs_embedded_model"] = corpus_difference(corpus_record)
    if progress:
        print(f"[gdn-jax] corpus: {corpus_note(corpus_record)}", file=sys.stderr)
    with phases.phase("train the tokenizer"):
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    with phases.phase("tokenize"):
        stream = token_stream(tokenizer, train_texts)
    eos = tokenizer.token_to_id(EOS)
    with phases.phase("build the model"):
        config = model_config(tokenizer.get_vocab_size(), cfg.hidden_size, cfg.num_layers,
                              cfg.intermediate_size, eos_token_id=eos)
        model = build_model(config, cfg.seed)
        graphdef, params = nnx.split(model)
        optimizer = make_optimizer(cfg)
        opt_state = optimizer.init(params)
    with phases.phase("compile the training step"):
        t_compile = time.perf_counter()
        window = jnp.asarray(sample_windows(stream, cfg.seed, 0, cfg.batch, cfg.seq_len + 1))
        step = make_step(graphdef, optimizer, cfg.mtp_weight).lower(
            params, opt_state, window).compile()
        compile_s = time.perf_counter() - t_compile
    phases.close()

    curve, pending, first_block_s = [], [], None
    t_train = time.perf_counter()
    bar = Steps(cfg.steps, "train", unit="step", enabled=progress)
    for s in range(cfg.steps):
        window = jnp.asarray(sample_windows(stream, cfg.seed, s, cfg.batch, cfg.seq_len + 1))
        params, opt_state, main, mtp = step(params, opt_state, window)
        pending.append((s, main, mtp))
        # Losses come back to the host every log_every steps only: a per-step fetch would
        # serialise the host with the device.
        if len(pending) == cfg.log_every or s == cfg.steps - 1:
            vals = [(i, float(a), float(b)) for i, a, b in pending]
            pending = []
            if first_block_s is None:
                first_block_s = time.perf_counter() - t_train
            main_mean = float(np.mean([v[1] for v in vals]))
            mtp_mean = float(np.mean([v[2] for v in vals]))
            curve.append({"step": vals[-1][0] + 1, "loss": main_mean, "mtp_loss": mtp_mean})
            bar.update(len(vals), loss=f"{main_mean:.3f}", mtp=f"{mtp_mean:.3f}")
    jax.block_until_ready(params)
    bar.close()
    train_s = time.perf_counter() - t_train

    model = nnx.merge(graphdef, params)
    with phases.phase("write the model, tokenizer and prompts"):
        os.makedirs(cfg.out, exist_ok=True)
        model.save_pretrained(cfg.out, max_shard_bytes=MAX_SHARD_BYTES, dtype=jnp.bfloat16,
                              tokenizer=tokenizer)
        prompts = evaluate.make_prompts(tokenizer, corpus, held_out, cfg.num_prompts, cfg.seed)
        with open(os.path.join(cfg.out, "prompts.json"), "w") as f:
            json.dump(prompts, f, indent=1)
    # Evaluate what ships: the bf16 weights just written, loaded back.
    with phases.phase("load the written weights back"):
        shipped = Qwen3NextForCausalLM.from_pretrained(cfg.out, dtype=jnp.float32)
    held_stream = token_stream(tokenizer, held_out) if held_out else stream[-cfg.eval_tokens:]
    quality = evaluate.perplexity(shipped, held_stream, seq_len=cfg.seq_len,
                                  max_tokens=cfg.eval_tokens, progress=progress)
    with phases.phase(f"evaluate: mean accept length ({len(prompts['prompts'])} prompts, "
                      "greedy, 3 drafts)"):
        quality.update(evaluate.accept_length(shipped, tokenizer, prompts))
    phases.close()
    device = jax.devices()[0]
    record = {
        "train_config": dataclasses.asdict(cfg),
        "corpus": corpus_record,
        "tokenizer": {"vocab_size": tokenizer.get_vocab_size(), "eos_id": eos,
                      "train_tokens": int(stream.size)},
        "model": {"config": config.to_dict(), "num_params": num_params(model),
                  "stored_dtype": "bfloat16"},
        "loss_curve": curve,
        "final_loss": curve[-1]["loss"],
        "final_mtp_loss": curve[-1]["mtp_loss"],
        "quality": quality,
        "wall_time_s": {"total": time.perf_counter() - t_start, "compile": compile_s,
                        "train": train_s, "first_log_block": first_block_s,
                        "per_step": train_s / cfg.steps},
        "device": f"{device.device_kind} ({device.platform})",
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with open(os.path.join(cfg.out, "training_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record
