"""Gated full attention of Qwen3-Next / Qwen3.5 with a slot-indexed KV cache.

    q, gate = per-head split of q_proj(x) ([B, T, nH, 2 * hd]: first hd query, next hd gate)
    q = rope(q_norm(q)); k = rope(k_norm(k_proj(x))); v = v_proj(x)      (partial NeoX RoPE)
    o = softmax(q k^T * hd**-0.5 + causal) v     (GQA: head h reads kv head h // (nH / nKV))
    y = o_proj(o * sigmoid(gate))

Positions come from the cache: row i's token t sits at `lengths[slot_i] + t`.

`impl` (constructor argument, or `set_attention_impl(model, ...)`) picks how the scores are
computed: "xla" gathers each row's whole cache and masks past its length; "pallas" reads each
row's used length in place for decode and verify calls (`gdn_jax.ops.attention.decode_attention`:
bf16 / fp16 caches; the Pallas interpreter off the GPU; under tensor parallelism only where the
KV heads split over the devices); a prefill's many query rows stay with XLA. "auto" (the
default) is "pallas" where its kernel runs compiled (`gdn_jax.ops.attention.runs_compiled`) and
"xla" elsewhere: on an H200 at 32K of context and B = 32 the XLA path spends 61 ms of kernel
time per 48-layer decode step against 11 ms
(bench/results/profile_step-h200-ctx32k-attention_paths-2026-12-01.json).

Without a mesh the "pallas" path also runs the q / k norms, RoPE and the cache write as one
kernel before the attention kernel (`gdn_jax.ops.attention.prologue_attention`), reading the
q / k / v projection's partial sums in place, where XLA's steps take about ten launches a layer:
48-layer Qwen3.5-shaped step on an H200, kernel time, B = 1 decode 3058.9 -> 2947.7 us (718 ->
622 launches), B = 32 verify 6074.5 -> 5924.6
(bench/results/profile_step-h200-qwen3_5_text-b1_b32-attn_prologue-2026-12-04.json).
GDN_JAX_ATTENTION_PROLOGUE=off keeps XLA's steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gdn_jax.modules._linear import HIGHEST, dense, dense_group, dense_group_partials, linear
from gdn_jax.modules.cache import KVCache, kv_cache_specs, slot_index
from gdn_jax.modules.norms import RMSNorm, rms_norm
from gdn_jax.modules.sharding import TP, psum, shard_call, tp_size
from gdn_jax.modules.rope import apply_rope, inv_freq, rope_cos_sin
from gdn_jax.ops import attention as attention_ops
from gdn_jax.ops.scatter import write_positions_group

_F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas")


class Attention(nnx.Module):
    """Gated GQA attention (module docstring). Parameters as HF: q_proj [hidden, nH * 2 * hd]
    (per-head [query | gate]), k_proj / v_proj [hidden, nKV * hd], o_proj [nH * hd, hidden],
    q_norm / k_norm (1 + w) over hd."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rotary_dim: int, rope_theta: float, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=HIGHEST, impl: str = "auto",
                 rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary_dim, self.rope_theta = rotary_dim, rope_theta
        self.dtype, self.precision = dtype, precision
        self.impl = _check_impl(impl)
        # On a ("tp",) mesh: q heads (with their gates) by columns, o_proj by rows; k / v split
        # or replicated by the device count (tp_param_specs).
        self.q_proj = linear(hidden_size, num_heads * head_dim * 2, sharding=(None, TP), **kw)
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = linear(num_heads * head_dim, hidden_size, sharding=(TP, None), **kw)
        self.mesh = None  # a ("tp",) Mesh, set by gdn_jax.models.sharding.shard_model
        self.q_norm = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype)

    def init_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache.create(num_slots, max_len, self.num_kv_heads, self.head_dim,
                              dtype=self.dtype)

    def __call__(self, x, cache: KVCache, slots, *, lengths=None, advance: bool = True,
                 partials: bool = False):
        """x: [B, T, hidden]; slots: [B] int32; lengths: [B] int32 real tokens per row (None: T).

        Writes the rows' real k/v at positions lengths[slot] + t and attends causally over the
        slot's cache. advance=True (prefill, decode) commits them (lengths[slot] += lengths[i]);
        advance=False (verify) leaves lengths alone for `KVCache.commit`.
        Returns (y [B, T, hidden] in dtype, cache). Outputs at padded positions are unspecified.
        partials: y as [S, B, T, hidden] partial sums of o_proj (`GatedDeltaNet`'s).
        """
        B, T, _ = x.shape
        n = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        slots = jnp.asarray(slots, jnp.int32)
        params = dict(q=self.q_proj.kernel, k=self.k_proj.kernel, v=self.v_proj.kernel,
                      o=self.o_proj.kernel, q_norm=self.q_norm.weight, k_norm=self.k_norm.weight)
        tp = tp_size(self.mesh)
        kv_split = self.kv_heads_split(tp)
        body = functools.partial(
            _attention_body, num_heads=self.num_heads // tp,
            num_kv_heads=self.num_kv_heads // tp if kv_split else self.num_kv_heads,
            head_dim=self.head_dim, rotary_dim=self.rotary_dim, rope_theta=self.rope_theta,
            eps=self.q_norm.eps, dtype=self.dtype, precision=self.precision, advance=advance,
            tp=tp if self.mesh is not None else None, kv_split=kv_split,
            impl=_check_impl(self.impl), partials=partials)
        specs = self.tp_param_specs(tp)
        c_specs = kv_cache_specs(kv_split)
        return shard_call(self.mesh, body, params, (x, cache, slots, n),
                          (P(), c_specs, P(), P()), (P(), c_specs),
                          overrides={"k": specs[("k_proj", "kernel")],
                                     "v": specs[("v_proj", "kernel")]})

    def kv_heads_split(self, tp: int) -> bool:
        """Whether the KV heads (projections and cache) split over tp devices (else replicated:
        fewer KV heads than devices)."""
        return self.num_kv_heads % tp == 0

    def tp_param_specs(self, tp: int) -> dict:
        """The PartitionSpecs that depend on the device count tp (the others ride on the
        parameters' metadata): k / v heads split, or replicated when fewer than the devices."""
        kv = P(None, TP) if self.kv_heads_split(tp) else P()
        return {("k_proj", "kernel"): kv, ("v_proj", "kernel"): kv}


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"Attention: impl expected one of {IMPLS}, got {impl!r}")
    return impl


def set_attention_impl(model, impl: str):
    """Set `impl` of every Attention in `model` (any nnx graph; in place; returns it)."""
    impl = _check_impl(impl)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Attention):
            node.impl = impl
    return model


def _attention_body(p, x, cache: KVCache, slots, n, *, num_heads, num_kv_heads, head_dim,
                    rotary_dim, rope_theta, eps, dtype, precision, advance, tp, kv_split,
                    impl="auto", partials=False):
    """Attention on local heads (module docstring). tp None: one device, no reduction. Under
    shard_map (tp devices): p holds this shard's q heads and o_proj rows; with kv_split its KV
    heads, else all KV heads (replicated; this shard reads the one its q heads share)."""
    B, T, _ = x.shape
    nH, nKV, hd = num_heads, num_kv_heads, head_dim
    mm = functools.partial(dense, dtype=dtype, precision=precision)
    gather, valid, scatter = slot_index(slots, cache.num_slots)
    start = jnp.where(valid, cache.lengths[gather], 0)
    pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]

    if impl == "auto":
        fits = attention_ops.runs_compiled(cache.k) and (tp is None or kv_split)
        impl = "pallas" if fits else "xla"
    fused = (impl == "pallas" and tp is None and attention_ops.takes(T, nH, nKV)
             and attention_ops.prologue_misfit(cache.k, hd, rotary_dim, dtype) is None)
    views = dense_group_partials(x, (p["q"], p["k"], p["v"]), dtype=dtype) if fused else None
    strides = (2 * hd, hd, hd)  # a head's columns apart: q's interleaved with the gates
    if views is not None:  # the projection's partial sums, read in place by the prologue
        srcs = tuple(attention_ops.Source(w.parts, w.start, s) for w, s in zip(views, strides))
        qg, k, v = views
    else:
        qg, k, v = dense_group(x, (p["q"], p["k"], p["v"]), dtype=dtype, precision=precision)
        srcs = tuple(attention_ops.Source(y.reshape(1, B * T, -1), 0, s)
                     for y, s in zip((qg, k, v), strides)) if fused else ()
    if fused and attention_ops.prologue_misfit(cache.k, hd, rotary_dim, dtype, srcs) is None:
        # the norms, RoPE and the cache write in one launch, then the attention kernel (and,
        # where GDN_JAX_ATTENTION_COMBINE asks, one launch for its splits' combine and the gate)
        in_kernel = attention_ops.combines_in_kernel()
        gate_src = srcs[0]._replace(start=srcs[0].start + hd) if in_kernel else None
        o, ck, cv = attention_ops.prologue_attention(
            *srcs, p["q_norm"], p["k_norm"], inv_freq(rotary_dim, rope_theta), cache.lengths,
            cache.k, cache.v, slots, n, T=T, num_heads=nH, eps=eps, gate=gate_src)
        gate = None
        if not in_kernel:
            gate = qg.value() if views is not None else qg
            gate = gate.reshape(B, T, nH, 2 * hd)[..., hd:].reshape(B, T, nH * hd)
        return _gated_out(o, gate, p, cache, ck, cv, scatter, valid, n, B=B, T=T, nH=nH, hd=hd,
                          mm=mm, tp=tp, partials=partials, advance=advance)
    if views is not None:
        qg, k, v = (w.value() for w in views)
    qg = qg.reshape(B, T, nH, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(B, T, nH * hd)
    q = rms_norm(q, p["q_norm"], eps)
    k = rms_norm(k.reshape(B, T, nKV, hd), p["k_norm"], eps)
    v = v.reshape(B, T, nKV, hd)
    cos, sin = rope_cos_sin(pos, rotary_dim, rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    real = valid[:, None] & (jnp.arange(T)[None, :] < n[:, None])
    col = jnp.where(real, pos, cache.max_len)  # out of range: dropped
    ck, cv = write_positions_group((cache.k, cache.v), scatter, (k, v), col)

    if impl == "pallas" and attention_ops.takes(T, nH, nKV):
        if tp is not None and not kv_split:
            raise ValueError(f"Attention: impl 'pallas' needs the KV heads split over the "
                             f"devices; {nKV} KV heads do not split over {tp}")
        o = attention_ops.decode_attention(q, ck, cv, slots, pos)
    else:
        o = _xla_attention(q, ck, cv, gather, pos, nH=nH, nKV=nKV, hd=hd, precision=precision,
                           tp=tp, kv_split=kv_split, max_len=cache.max_len)
    return _gated_out(o, gate, p, cache, ck, cv, scatter, valid, n, B=B, T=T, nH=nH, hd=hd,
                      mm=mm, tp=tp, partials=partials, advance=advance)


def _gated_out(o, gate, p, cache, ck, cv, scatter, valid, n, *, B, T, nH, hd, mm, tp, partials,
               advance):
    """o_proj(o * sigmoid(gate)) (reduced over tp, or as partials; gate None: o is gated already)
    and the cache with its new k / v and, where advance, lengths."""
    o = o.reshape(B, T, nH * hd)
    if gate is not None:
        o = o * jax.nn.sigmoid(gate)
    if tp is not None:
        y = psum(mm(o, p["o"]))
        y = y[None] if partials else y
    else:
        y = mm(o, p["o"], partials=partials)

    new_len = cache.lengths
    if advance:
        new_len = new_len.at[scatter].add(jnp.where(valid, n, 0), mode="drop")
    return y, cache.replace(k=ck, v=cv, lengths=new_len)


def _xla_attention(q, ck, cv, gather, pos, *, nH, nKV, hd, precision, tp, kv_split, max_len):
    """Scores over each row's whole cache, masked past its positions -> o [B, T, nH, hd]."""
    B, T = pos.shape
    keys, values = ck[gather], cv[gather]  # [B, L, nKV, hd]
    if tp is not None and not kv_split:
        # Replicated KV heads (fewer than devices): this shard's nH q heads all read KV head
        # (d * nH) // (global group size), global group = tp * nH / nKV.
        kv_head = (jax.lax.axis_index(TP) * nH) // (tp * nH // nKV)
        keys = jax.lax.dynamic_slice_in_dim(keys, kv_head, 1, axis=2)
        values = jax.lax.dynamic_slice_in_dim(values, kv_head, 1, axis=2)
    n_read = keys.shape[2]
    qh = q.reshape(B, T, n_read, nH // n_read, hd)
    scores = jnp.einsum("btngd,bsnd->bngts", qh, keys.astype(q.dtype),
                        precision=precision, preferred_element_type=_F32)
    scores = scores * (hd ** -0.5)
    causal = jnp.arange(max_len)[None, None, :] <= pos[:, :, None]  # [B, T, L]
    scores = jnp.where(causal[:, None, None], scores, jnp.finfo(_F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    o = jnp.einsum("bngts,bsnd->btngd", probs, values.astype(q.dtype), precision=precision)
    return o.reshape(B, T, nH, hd)
