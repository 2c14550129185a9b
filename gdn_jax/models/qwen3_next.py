"""Qwen3-Next / Qwen3.5 causal LM (text) with its MTP head, in Flax NNX.

    h = embed(tokens)
    for each layer: h = h + mixer(input_layernorm(h))       # GatedDeltaNet or gated Attention
                    h = h + mlp(post_attention_layernorm(h)) # dense MLP or SparseMoE
    hidden = norm(h);  logits = lm_head(hidden)              # lm_head tied to embed or not

MTP head (one draft step):
    x = fc(cat[pre_fc_norm_embedding(embed(next_token)), pre_fc_norm_hidden(hidden)])
    x = full-attention decoder layer (own KV cache);  h_out = norm(x);  logits = lm_head(h_out)

Usage:

    model = Qwen3NextForCausalLM.from_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)
    cache = model.init_cache(num_slots=8, max_len=4096, t_max=4, state_dtype=jnp.bfloat16)
    cache = model.reset(cache, slots)                          # fresh sequences
    out = model(tokens, cache, slots, mode="prefill", lengths=lengths)   # ragged prompts
    out = model(next_tok[:, None], out.cache, slots, mode="decode")
    out = model(draft_tokens, out.cache, slots, mode="verify")  # T tokens, not committed
    cache = model.commit(out.cache, slots, num_accepted)        # keep the first n (a count)

Every call takes `slots` [B] int32 (a slot < 0 or >= num_slots is a padding row) and returns
`ModelOutput(logits [B, T, vocab] fp32, hidden [B, T, hidden] (post final norm), cache)`.
Positions come from the cache (tokens committed so far), so prefill can continue a sequence.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gdn_jax.models.config import ModelConfig
from gdn_jax.modules._linear import HIGHEST, linear
from gdn_jax.modules.attention import Attention
from gdn_jax.modules.cache import COMMIT_MODES, GDNCache, KVCache, commit_mode_for  # noqa: F401
from gdn_jax.modules.gated_deltanet import MODES, GatedDeltaNet
from gdn_jax.modules.mlp import MLP, SparseMoE
from gdn_jax.modules.norms import RMSNorm, residual_add
from gdn_jax.modules.sharding import TP, psum, shard_call, tp_metadata

_F32 = jnp.float32


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] fp32
    hidden: jax.Array  # [B, T, hidden] in dtype, after the final norm (the MTP head's input)
    cache: "ModelCache"


def _without_counter(c):
    """A decoder layer's cache without the per-slot counter that `ModelCache` holds once."""
    if isinstance(c, GDNCache):
        return c.replace(state=c.state.replace(count=None))
    return c.replace(lengths=None)


@dataclasses.dataclass(frozen=True)
class ModelCache:
    """The whole model's cache (a pytree): one entry per decoder layer (GDNCache for
    linear_attention, KVCache for full_attention), one KVCache per MTP layer, and the per-slot
    counters that every decoder layer of a kind keeps equal, held once:

    count:   [num_slots] int32, the GDN layers' `GDNState.count` (None without GDN layers)
    lengths: [num_slots] int32, the full-attention layers' `KVCache.lengths`, the tokens each
             slot holds (None without them; the MTP layers' KV caches keep their own)

    `layers[i]` holds None in place of its counter and `layer(i)` is layer i's whole cache; build
    a ModelCache from whole per-layer caches with `ModelCache.of`. One counter of each kind is
    one update a step where each layer wrote its own: in a decode step a count scatter per GDN
    layer and the copies that kept it from racing the kernels that read it (2 launches a GDN
    layer), and a lengths add per attention layer. H200, 48-layer dense decode, kernel time
    side by side: B = 1 2915 -> 2835 us (586 -> 505 launches), B = 32 4100 -> 4054
    (bench/results/profile_step-h200-qwen3_5_text-b1_b32-*-2026-12-05.json)."""

    layers: tuple
    mtp: tuple = ()
    count: jax.Array | None = None
    lengths: jax.Array | None = None

    @classmethod
    def of(cls, layers, mtp=()) -> "ModelCache":
        """The ModelCache of whole per-layer caches (their counters in place). The model keeps a
        kind's counters equal; the last layer's are the ones kept: in a step that layer's update
        runs after every earlier layer has read the counter, so it can be written in place."""
        layers = tuple(layers)
        gdn = [c for c in layers if isinstance(c, GDNCache)]
        kv = [c for c in layers if isinstance(c, KVCache)]
        kinds = {(c.state.commit_mode, c.state.t_max) for c in gdn}
        if len(kinds) > 1:  # one count stands for layers that update it alike
            raise ValueError(f"ModelCache.of: the GDN layers' (commit mode, t_max) differ: "
                             f"{sorted(kinds)}")
        return cls(layers=tuple(_without_counter(c) for c in layers), mtp=tuple(mtp),
                   count=gdn[-1].state.count if gdn else None,
                   lengths=kv[-1].lengths if kv else None)

    def layer(self, i: int):
        """Decoder layer i's whole cache (GDNCache or KVCache), the shared counter in place (a
        ModelCache built of whole caches without `of` keeps each layer's own)."""
        c = self.layers[i]
        if isinstance(c, GDNCache):
            return c if self.count is None else c.replace(state=c.state.replace(count=self.count))
        return c if self.lengths is None else c.replace(lengths=self.lengths)

    def with_layers(self, layers) -> "ModelCache":
        """This cache with whole per-layer caches `layers` in place of its own (`of`)."""
        return ModelCache.of(layers, self.mtp)

    def replace(self, **changes) -> "ModelCache":
        return dataclasses.replace(self, **changes)

    # What a decoding loop needs to know of the cache (gdn_jax.speculative asks these rather than
    # looking at the per-layer cache types).

    def _gdn(self) -> list:
        return [c for c in self.layers if isinstance(c, GDNCache)]

    @property
    def t_max(self) -> int | None:
        """The most tokens one verify call takes (the GDN layers' T_max); None without GDN
        layers (attention alone has no verify limit)."""
        gdn = self._gdn()
        return min(c.t_max for c in gdn) if gdn else None

    @property
    def max_len(self) -> int | None:
        """Tokens per slot of the KV caches (MTP ones included); None without any."""
        kv = [c for c in self.layers if isinstance(c, KVCache)] + list(self.mtp)
        return min(c.max_len for c in kv) if kv else None

    @property
    def commit_mode(self) -> str | None:
        """The GDN layers' commit mode (one of `COMMIT_MODES`); None without GDN layers.
        Raises ValueError when the layers disagree."""
        modes = {c.commit_mode for c in self._gdn()}
        if len(modes) > 1:
            raise ValueError(f"cache: GDN layers in mixed commit modes {sorted(modes)}")
        return modes.pop() if modes else None

    @property
    def state_dtype(self) -> str | None:
        """The GDN state pools' dtype name ("bfloat16" | "float32"); None without GDN layers."""
        gdn = self._gdn()
        return gdn[0].state.pool.dtype.name if gdn else None

    @property
    def has_mtp(self) -> bool:
        """Whether the cache holds the MTP head's KV caches."""
        return bool(self.mtp)


jax.tree_util.register_dataclass(ModelCache, data_fields=["layers", "mtp", "count", "lengths"],
                                 meta_fields=[])


def _check_mode(mode: str, T: int, lengths):
    if mode not in MODES:
        raise ValueError(f"mode expected one of {MODES}, got {mode!r}")
    if mode == "decode" and T != 1:
        raise ValueError(f"decode takes one token per row ([B, 1]), got T = {T}")
    if mode != "prefill" and lengths is not None:
        raise ValueError(f"lengths is for prefill only (mode {mode!r})")


def _check_mtp_inputs(next_tokens, hidden, hidden_size: int, logits_at=None):
    """Pairs (token t + 1, hidden at t): one hidden per token, before anything is traced."""
    tok, hid = tuple(jnp.shape(next_tokens)), tuple(jnp.shape(hidden))
    if logits_at is not None and (tuple(jnp.shape(logits_at)) != tok[:1]
                                  or not jnp.issubdtype(jnp.result_type(logits_at), jnp.integer)):
        raise ValueError(f"mtp_forward: logits_at expected an integer array of shape [B] = "
                         f"{tok[:1]}, got shape {tuple(jnp.shape(logits_at))} dtype "
                         f"{jnp.result_type(logits_at)}")
    if len(tok) != 2:
        raise ValueError(f"mtp_forward: next_tokens expected shape [B, T], got shape {tok}")
    if hid != tok + (hidden_size,):
        raise ValueError(
            f"mtp_forward: hidden expected shape [B, T, hidden] = {tok + (hidden_size,)} (one "
            f"hidden per token of next_tokens, shape {tok}), got shape {hid}; after a verify "
            "call pass the hidden at each row's last kept position, "
            "out.hidden[rows, num_accepted - 1][:, None]")


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: a token mixer (GDN or attention) and a feed-forward block."""

    def __init__(self, config: ModelConfig, layer_type: str, moe: bool, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=HIGHEST, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                c.hidden_size, c.linear_num_key_heads, c.linear_num_value_heads,
                c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim,
                eps=c.rms_norm_eps, **kw)
        elif layer_type == "full_attention":
            self.self_attn = Attention(
                c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                rotary_dim=c.rotary_dim, rope_theta=c.rope_theta, eps=c.rms_norm_eps, **kw)
        else:
            raise ValueError(f"DecoderLayer: unknown layer_type {layer_type!r}")
        if moe:
            self.mlp = SparseMoE(c.hidden_size, c.num_experts, c.num_experts_per_tok,
                                 c.moe_intermediate_size, c.shared_expert_intermediate_size,
                                 norm_topk_prob=c.norm_topk_prob, **kw)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                                param_dtype=param_dtype)

    def init_cache(self, num_slots: int, max_len: int, *, t_max: int, state_dtype,
                   commit_mode: str):
        if self.layer_type == "linear_attention":
            return self.linear_attn.init_cache(num_slots, t_max=t_max, state_dtype=state_dtype,
                                               commit_mode=commit_mode)
        return self.self_attn.init_cache(num_slots, max_len)

    def __call__(self, x, cache, slots, *, mode: str, lengths=None):
        """x: [B, T, hidden] -> (x, cache)."""
        x, delta, cache = self.forward(x, None, cache, slots, mode=mode, lengths=lengths)
        return residual_add(x, delta), cache

    def forward(self, x, delta, cache, slots, *, mode: str, lengths=None):
        """The layer with each residual add left to the norm after it (one launch for both on a
        GPU: `RMSNorm.add`). The residual stream is x + delta on entry and on return; delta:
        [S, B, T, hidden] partial sums of the previous block's output, a `WeightedRows` (a MoE
        block's expert rows: `SparseMoE`), or None.
        Returns (x, delta, cache): the model adds the last delta in its final norm."""
        fused = self.fused_norms
        x, h = self.input_layernorm.add(x, delta, fused=fused)
        if self.layer_type == "linear_attention":
            h, cache = self.linear_attn(h, cache, slots, mode=mode, lengths=lengths,
                                        partials=True)
        else:
            h, cache = self.self_attn(h, cache, slots, lengths=lengths,
                                      advance=mode != "verify", partials=True)
        x, h = self.post_attention_layernorm.add(x, h, fused=fused)
        return x, self.mlp(h, partials=True), cache

    @property
    def fused_norms(self) -> bool:
        """Whether `forward`'s norms may take the kernel: off a tensor-parallel mesh (on one,
        the blocks' all-reduced outputs go through XLA's add and norm, as before)."""
        return self.mlp.mesh is None

    def commit(self, cache, slots, num_accepted):
        if self.layer_type == "linear_attention":
            return GatedDeltaNet.commit(cache, slots, num_accepted, mesh=self.linear_attn.mesh)
        return cache.commit(slots, num_accepted)

    def reset(self, cache, slots):
        if self.layer_type == "linear_attention":
            return GatedDeltaNet.reset(cache, slots, mesh=self.linear_attn.mesh)
        return cache.reset(slots)


class MTPHead(nnx.Module):
    """Multi-token-prediction head (`mtp.*`): fc, two input norms, full-attention decoder
    layers with their own KV caches, a final norm. Shares embed_tokens and lm_head."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=HIGHEST, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.fc = linear(2 * c.hidden_size, c.hidden_size, **kw)
        self.pre_fc_norm_embedding = RMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                             param_dtype=param_dtype)
        self.pre_fc_norm_hidden = RMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                          param_dtype=param_dtype)
        self.layers = nnx.List([DecoderLayer(c, "full_attention", c.mtp_is_moe, **kw)
                                for _ in range(c.mtp_num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, embedded, hidden, cache: KVCache, slots, *, layer: int, mode: str,
                 lengths=None):
        """embedded: embed(next tokens) [B, T, hidden]; hidden: target hidden [B, T, hidden].
        Returns (h_out [B, T, hidden] after mtp.norm, cache)."""
        x = jnp.concatenate([self.pre_fc_norm_embedding(embedded),
                             self.pre_fc_norm_hidden(hidden.astype(embedded.dtype))], axis=-1)
        mtp_layer = self.layers[layer]
        x, delta, cache = mtp_layer.forward(self.fc(x), None, cache, slots, mode=mode,
                                            lengths=lengths)
        return self.norm.add(x, delta, fused=mtp_layer.fused_norms)[1], cache


class Qwen3NextForCausalLM(nnx.Module):
    """Qwen3-Next / Qwen3.5 text causal LM (module docstring). `dtype` is the compute dtype
    (activations, KV cache, conv window), `param_dtype` the weights' storage dtype."""

    def __init__(self, config: ModelConfig, *, with_mtp: bool | None = None, dtype=jnp.float32,
                 param_dtype=None, precision=HIGHEST, mesh=None, rngs: nnx.Rngs):
        c = config
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        if with_mtp is None:
            with_mtp = c.mtp_num_hidden_layers > 0
        if with_mtp and c.mtp_num_hidden_layers < 1:
            c = dataclasses.replace(c, mtp_num_hidden_layers=1, raw=c.raw)
        self.config = c
        self.dtype, self.precision = dtype, precision
        # On a ("tp",) mesh the embedding and the LM head split by vocab.
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
                                      embedding_metadata=tp_metadata(TP, None))
        self.layers = nnx.List([DecoderLayer(c, t, c.is_moe_layer(i), **kw)
                                for i, t in enumerate(c.layer_types)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else linear(c.hidden_size, c.vocab_size,
                                                                 sharding=(None, TP), **kw)
        self.mtp = MTPHead(c, **kw) if with_mtp else None
        # mesh: tensor parallelism over heads (a jax Mesh with a "tp" axis; README "Multi-GPU").
        # Built on one device, then sharded (`gdn_jax.models.sharding.shard_model`).
        self.mesh = None
        if mesh is not None:
            from gdn_jax.models.sharding import shard_model
            shard_model(self, mesh)

    # ---- construction

    @classmethod
    def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, precision=HIGHEST,
                        with_mtp: bool | None = None, mesh=None) -> "Qwen3NextForCausalLM":
        """Load a HF checkpoint directory (see `gdn_jax.models.checkpoint.load_pretrained`).
        mesh: a jax Mesh with a "tp" axis: every tensor is placed straight onto its shards."""
        from gdn_jax.models.checkpoint import load_pretrained
        return load_pretrained(path, dtype=dtype, param_dtype=param_dtype, precision=precision,
                               with_mtp=with_mtp, mesh=mesh)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write config.json and safetensors (see `gdn_jax.models.checkpoint.save_pretrained`)."""
        from gdn_jax.models.checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)

    def init_cache(self, num_slots: int, max_len: int, *, t_max: int = 4,
                   state_dtype=jnp.bfloat16, commit_mode: str = "replay") -> ModelCache:
        """A zeroed cache for `num_slots` sequences of up to `max_len` tokens, verify calls of up
        to `t_max` tokens, GDN state pools in `state_dtype` (bf16 or fp32), and the commit mode
        (`COMMIT_MODES`: "replay", "intermediate" or "ring", README "Design") of every GDN layer."""
        if commit_mode not in COMMIT_MODES:
            raise ValueError(f"init_cache: commit_mode expected one of {COMMIT_MODES}, got "
                             f"{commit_mode!r}")

        def make():
            layers = tuple(layer.init_cache(num_slots, max_len, t_max=t_max,
                                            state_dtype=state_dtype, commit_mode=commit_mode)
                           for layer in self.layers)
            mtp = () if self.mtp is None else tuple(
                layer.init_cache(num_slots, max_len, t_max=t_max, state_dtype=state_dtype,
                                 commit_mode=commit_mode) for layer in self.mtp.layers)
            return ModelCache.of(layers, mtp)

        if self.mesh is None:
            return make()
        # On a mesh: each device allocates only its shard (never the whole pool on one device).
        from gdn_jax.models.sharding import cache_shardings
        return jax.jit(make, out_shardings=cache_shardings(self, jax.eval_shape(make)))()

    # ---- forward

    def embed(self, tokens):
        """tokens: [B, T] int -> [B, T, hidden] in dtype."""
        if self.mesh is None:
            return self.embed_tokens(tokens)
        # Vocab-split table: each shard looks up the tokens in its rows, zeros elsewhere; one psum.
        emb = self.embed_tokens

        def local(p, tokens):
            table = p["table"]
            rows = table.shape[0]
            idx = tokens - jax.lax.axis_index(TP) * rows
            inside = (idx >= 0) & (idx < rows)
            x = jnp.take(table, jnp.clip(idx, 0, rows - 1), axis=0)
            return psum(jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)))

        out = shard_call(self.mesh, local, dict(table=emb.embedding), (jnp.asarray(tokens),),
                         (P(),), P())
        return out.astype(emb.dtype)

    def logits(self, hidden):
        """hidden: [B, T, hidden] -> [B, T, vocab] fp32 (tied: embed_tokens.embedding^T)."""
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...].astype(self.dtype)
            out = jnp.einsum("bth,vh->btv", hidden, w, precision=self.precision)
        else:
            out = self.lm_head(hidden)
        return out.astype(_F32)

    def __call__(self, tokens, cache: ModelCache, slots, *, mode: str = "prefill",
                 lengths=None) -> ModelOutput:
        """tokens: [B, T] int32; slots: [B] int32; mode "prefill" (lengths [B]: real tokens per
        row, right padding), "decode" (T = 1) or "verify" (T in 1..t_max, not committed: call
        `commit`). Returns ModelOutput(logits, hidden, cache)."""
        _check_mode(mode, tokens.shape[1], lengths)
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model "
                             f"{len(self.layers)}: make it with model.init_cache")
        x, delta = self.embed(tokens), None
        new = []
        for i, layer in enumerate(self.layers):
            x, delta, c = layer.forward(x, delta, cache.layer(i), slots, mode=mode,
                                        lengths=lengths)
            new.append(c)
        hidden = self.norm.add(x, delta, fused=self.layers[-1].fused_norms)[1]
        return ModelOutput(self.logits(hidden), hidden, cache.with_layers(new))

    def commit(self, cache: ModelCache, slots, num_accepted) -> ModelCache:
        """Keep the first num_accepted[i] (a count, 0..T) tokens of row i's last verify call, in
        every decoder layer (GDN state and conv window, KV lengths)."""
        layers = [cache.layer(i) for i in range(len(self.layers))]
        gdn = [i for i, layer in enumerate(self.layers) if layer.layer_type == "linear_attention"]
        if gdn:  # one launch for their conv windows, not one a layer
            mesh = self.layers[gdn[0]].linear_attn.mesh
            kept = GatedDeltaNet.commit_layers([layers[i] for i in gdn], slots, num_accepted,
                                               mesh=mesh)
            for i, c in zip(gdn, kept):
                layers[i] = c
        return cache.with_layers(c if i in gdn else layer.commit(c, slots, num_accepted)
                                 for i, (layer, c) in enumerate(zip(self.layers, layers)))

    def reset(self, cache: ModelCache, slots) -> ModelCache:
        """Empty the slots (state, conv window, KV lengths, MTP KV lengths) for new sequences."""
        layers = [layer.reset(cache.layer(i), slots) for i, layer in enumerate(self.layers)]
        return ModelCache.of(layers, tuple(c.reset(slots) for c in cache.mtp))

    # ---- MTP head

    def mtp_forward(self, next_tokens, hidden, cache: ModelCache, slots, *, mode: str = "decode",
                    lengths=None, layer: int = 0, logits_at=None) -> ModelOutput:
        """One MTP draft step with MTP layer `layer` (chained drafting: step % num layers).

        next_tokens: [B, T] int32, the token after each position of `hidden`; hidden: [B, T,
        hidden] target hidden after the final norm (or the previous step's MTP hidden). Modes as
        `__call__` on the MTP layer's own KV cache (positions = its committed length).
        logits_at: None, or [B] int32 in 0..T - 1, the one position of each row whose logits
        are wanted (the speculative loop's extend drafts from each row's last kept pair): the
        LM head then reads B rows, not B x T, and the logits are [B, 1, vocab].
        Returns ModelOutput(logits, h_out (after mtp.norm) [B, T, hidden], cache).
        """
        if self.mtp is None:
            raise ValueError("mtp_forward: this model has no MTP head (load with with_mtp=True "
                             "from a checkpoint that has mtp.* weights)")
        _check_mtp_inputs(next_tokens, hidden, self.config.hidden_size, logits_at)
        _check_mode(mode, next_tokens.shape[1], lengths)
        if not 0 <= layer < len(self.mtp.layers):
            raise ValueError(f"mtp_forward: layer expected 0..{len(self.mtp.layers) - 1}, got "
                             f"{layer}")
        h, c = self.mtp(self.embed(next_tokens), hidden, cache.mtp[layer], slots, layer=layer,
                        mode=mode, lengths=lengths)
        mtp = cache.mtp[:layer] + (c,) + cache.mtp[layer + 1:]
        at = h if logits_at is None else jnp.take_along_axis(
            h, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
        return ModelOutput(self.logits(at), h, cache.replace(mtp=mtp))

    def commit_mtp(self, cache: ModelCache, slots, num_accepted, *, layer: int = 0) -> ModelCache:
        """Keep the first num_accepted[i] tokens of row i's last MTP verify call."""
        mtp = list(cache.mtp)
        mtp[layer] = mtp[layer].commit(slots, num_accepted)
        return cache.replace(mtp=tuple(mtp))
