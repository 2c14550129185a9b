"""The Gated DeltaNet layer (Qwen3-Next / Qwen3.5 `linear_attn`), on `gdn_jax.ops`.

    [q | k | v | z] = in_proj_qkvz(x)      [b | a] = in_proj_ba(x)        (flat, head-major)
    [q | k | v] = silu(causal depthwise conv, width W, over the pre-conv [q | k | v] channels)
    o = gated delta rule (gdn_jax.ops: prefill / decode / verify), gating fused in the op
    y = out_proj(GatedRMSNorm(o, z))        (per value head, over V)

Internal projection order is flat: `in_proj_qkvz` kernel [hidden, 2*H*K + 2*HV*V] with columns
[q (H heads) | k (H heads) | v (HV heads) | z (HV heads)], `in_proj_ba` [hidden, 2*HV] with
[b | a]. Qwen3.5's split `in_proj_qkv/z/b/a` concatenate into it; Qwen3-Next's per-key-head
interleaved `in_proj_qkvz`/`in_proj_ba` are permuted into it once, at load
(`gdn_jax.models.checkpoint`). One code path after that.

Modes (each row of the batch names its slot; see `gdn_jax.modules.cache`):
  "prefill": ragged prompts (`lengths`), continuing from the slot's state and conv window.
  "decode":  one token.
  "verify":  T tokens (1..T_max) from the slot's state, not committed: `commit` keeps the first
             num_accepted of them (GDN state per the cache's commit mode, conv window by count).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from gdn_jax import ops
from gdn_jax.modules._linear import (HIGHEST, dense_gated_norm, dense_group,
                                     dense_group_partials, linear)
from gdn_jax.modules.cache import GDNCache, conv_dim, gdn_cache_specs, slot_index
from gdn_jax.modules.norms import GatedRMSNorm
from gdn_jax.modules.sharding import (TP, blocked_permutation, psum, shard_call, tp_metadata,
                                      tp_size)
from gdn_jax.ops.conv import causal_conv, conv_step, project_conv_step
from gdn_jax.ops.projection import Partials
from gdn_jax.ops.scatter import shift_positions_group, write_positions

_F32 = jnp.float32
MODES = ("prefill", "decode", "verify")


def _windows(xp, starts, width: int):
    """Per-row slice xp[i, starts[i] : starts[i] + width] -> [B, width, C]."""
    return jax.vmap(lambda r, s: lax.dynamic_slice_in_dim(r, s, width, axis=0))(xp, starts)


def _gdn_body(p, x, cache: GDNCache, slots, n, *, mode, dims, dtype, precision, eps, reduce,
              partials=False):
    """The layer on local heads (all of them on one device, a shard's under `shard_map`):
    params p (bare arrays, flat [q | k | v | z] layout of the local heads), x [B, T, hidden],
    n [B] tokens per row (prefill lengths; ones otherwise). reduce: psum the out_proj partial
    sums over "tp". Returns (y, cache); partials: y as [S, B, T, hidden] partial sums (S = 1
    when reduced)."""
    H, HV, K, V, W = dims
    B, T, _ = x.shape
    key_dim, value_dim = H * K, HV * V
    channels = conv_dim(H, K, HV, V)
    gather, _, scatter = slot_index(slots, cache.num_slots)

    fused = mode != "prefill" and dtype is not None and project_conv_step(
        x.astype(dtype), (p["qkvz"].astype(dtype), p["ba"].astype(dtype)), cache.conv,
        p["conv"], slots, widths=(key_dim, key_dim, value_dim, value_dim, HV, HV),
        keep="window" if mode == "decode" else "all")
    views = None if mode == "prefill" or fused else dense_group_partials(
        x, (p["qkvz"], p["ba"]), dtype=dtype)
    if fused:  # in_proj and the conv in one launch: q, k, v after the conv
        (q, k, v, z, b, a), conv = fused
    elif views is None:
        qkvz, ba = dense_group(x, (p["qkvz"], p["ba"]), dtype=dtype, precision=precision)
        mixed, z = qkvz[..., :channels], qkvz[..., channels:]
        b, a = ba[..., :HV], ba[..., HV:]
    else:  # one launch's partial sums: the conv and the output norm add them as they read them
        mixed, z = views[0].columns(0, channels), views[0].columns(channels, value_dim)
        if mode == "decode":  # b and a from the conv's launch: no launch of their own
            b, a = views[1].columns(0, HV), views[1].columns(HV, HV)
        else:
            # verify: XLA's sum and slices (the gating of the stored candidates reads them
            # anyway: no launch saved, and the conv's first program reads T tokens' more).
            # 48-layer step, H200, kernel time, XLA's b / a -> the conv's: decode B = 1
            # 2983.4 -> 2919.7 us, B = 32 4169.9 -> 4106.4; verify B = 1 3322.9 -> 3366.4,
            # B = 32 5910.1 -> 6008.8 (bench/results/profile_step-h200-qwen3_5_text-b1_b32-
            # conv_sides-2026-12-04.json)
            ba = views[1].value()
            b, a = ba[..., :HV], ba[..., HV:]

    A_log, dt_bias = p["A_log"], p["dt_bias"]
    if mode == "prefill":  # ragged lengths: XLA
        window = cache.conv[gather, :W - 1]  # [B, W - 1, C], committed inputs
        xp = jnp.concatenate([window, mixed.astype(cache.conv.dtype)], axis=1)
        q, k, v = jnp.split(causal_conv(xp, p["conv"]).astype(dtype),
                            (key_dim, 2 * key_dim), axis=-1)
    elif not fused:  # one launch for the conv and the slot's conv rows where a GPU runs it
        (q, k, v), conv, *ba = conv_step(mixed, cache.conv, p["conv"], slots,
                                         widths=(key_dim, key_dim, value_dim), dtype=dtype,
                                         keep="window" if mode == "decode" else "all",
                                         sides=(b, a) if isinstance(b, Partials) else ())
        b, a = ba[0] if ba else (b, a)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
    if mode == "decode":
        o, state = ops.decode(q, k, v, a, b, A_log, dt_bias, cache.state, slots)
        cache = cache.replace(state=state, conv=conv)
    elif mode == "verify":
        o, state, inter = ops.verify(q, k, v, a, b, A_log, dt_bias, cache.state, slots,
                                     mode=cache.commit_mode)
        new_inter = cache.inter
        if inter is not None:
            new_inter = write_positions(cache.inter, scatter, inter)
        cache = cache.replace(state=state, conv=conv, inter=new_inter)
    else:
        o, state = ops.prefill(q, k, v, a, b, A_log, dt_bias, cache.state, slots, n)
        conv = write_positions(cache.conv, scatter, _windows(xp, n, W - 1))
        cache = cache.replace(state=state, conv=conv)

    # the output norm and out_proj: one launch where the few-row kernel takes them
    z = z if views is not None else z.reshape(B, T, HV, V)
    out = functools.partial(dense_gated_norm, o.astype(dtype), z, p["norm"], p["out"], eps,
                            dtype=dtype, precision=precision)
    if reduce:
        y = psum(out())
        return (y[None] if partials else y), cache
    return out(partials=partials), cache


class GatedDeltaNet(nnx.Module):
    """One GDN layer (module docstring).

    Parameters: in_proj_qkvz [hidden, 2*H*K + 2*HV*V]; in_proj_ba [hidden, 2*HV];
    conv_weight [W, 2*H*K + HV*V]; A_log, dt_bias [HV]; norm.weight [V]; out_proj [HV*V, hidden].
    """

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel: int = 4, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=HIGHEST, rngs: nnx.Rngs):
        if num_v_heads % num_k_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads ({num_v_heads}) must be a multiple of "
                             f"num_k_heads ({num_k_heads})")
        if conv_kernel < 1:
            raise ValueError(f"GatedDeltaNet: conv_kernel must be >= 1, got {conv_kernel}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.H, self.HV, self.K, self.V, self.W = (num_k_heads, num_v_heads, head_k_dim,
                                                   head_v_dim, conv_kernel)
        self.dtype = dtype
        # mesh: a Mesh with a "tp" axis (set by gdn_jax.models.sharding.shard_model, which also
        # puts the projections in the tp-blocked layout), or None for one device.
        self.mesh = None
        key_dim, value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = conv_dim(num_k_heads, head_k_dim, num_v_heads, head_v_dim)
        # On a ("tp",) mesh: the projections and the conv by key-head group (columns tp-blocked,
        # `gdn_jax.modules.sharding`), out_proj by rows (value heads), the per-head vectors by
        # head; the norm weight (per V) replicated.
        col = dict(sharding=(None, TP))
        self.in_proj_qkvz = linear(hidden_size, 2 * key_dim + 2 * value_dim, **col, **kw)
        self.in_proj_ba = linear(hidden_size, 2 * num_v_heads, **col, **kw)
        bound = conv_kernel ** -0.5
        self.conv_weight = nnx.Param(jax.random.uniform(
            rngs.params(), (conv_kernel, self.conv_dim), param_dtype, -bound, bound),
            **tp_metadata(None, TP))
        self.dt_bias = nnx.Param(jnp.ones((num_v_heads,), param_dtype), **tp_metadata(TP))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(
            rngs.params(), (num_v_heads,), _F32, 1.0, 16.0)).astype(param_dtype),
            **tp_metadata(TP))
        self.norm = GatedRMSNorm(head_v_dim, eps=eps, param_dtype=param_dtype)
        self.out_proj = linear(value_dim, hidden_size, sharding=(TP, None), **kw)

    def init_cache(self, num_slots: int, *, t_max: int, state_dtype=jnp.bfloat16,
                   commit_mode: str = "replay") -> GDNCache:
        return GDNCache.create(num_slots, self.H, self.HV, self.K, self.V, self.W, t_max=t_max,
                               state_dtype=state_dtype, dtype=self.dtype, commit_mode=commit_mode)

    def __call__(self, x, cache: GDNCache, slots, *, mode: str = "prefill", lengths=None,
                 partials: bool = False):
        """x: [B, T, hidden]; slots: [B] int32; lengths: [B] int32 (prefill only; None: T).

        Returns (y [B, T, hidden] in dtype, cache). Outputs at padded positions are unspecified.
        partials: y as [S, B, T, hidden] partial sums of out_proj, for
        `gdn_jax.ops.residual_norm.add_rms_norm` to add (one launch with the residual and norm).
        """
        if mode not in MODES:
            raise ValueError(f"GatedDeltaNet: mode expected one of {MODES}, got {mode!r}")
        B, T, _ = x.shape
        if mode == "decode" and T != 1:
            raise ValueError(f"GatedDeltaNet: decode takes one token per row, got T = {T}")
        if mode == "verify" and not 1 <= T <= cache.t_max:
            raise ValueError(f"GatedDeltaNet: verify takes 1..T_max = {cache.t_max} tokens, got "
                             f"T = {T}")
        if mode != "prefill" and lengths is not None:
            raise ValueError(f"GatedDeltaNet: lengths is for prefill only (mode {mode!r})")
        if mode == "prefill":
            n = (jnp.full((B,), T, jnp.int32) if lengths is None
                 else jnp.asarray(lengths, jnp.int32))
        else:
            n = jnp.ones((B,), jnp.int32)
        slots = jnp.asarray(slots, jnp.int32)
        params = dict(qkvz=self.in_proj_qkvz.kernel, ba=self.in_proj_ba.kernel,
                      conv=self.conv_weight, A_log=self.A_log, dt_bias=self.dt_bias,
                      norm=self.norm.weight, out=self.out_proj.kernel)
        tp = tp_size(self.mesh)
        dims = (self.H // tp, self.HV // tp, self.K, self.V, self.W)
        body = functools.partial(_gdn_body, mode=mode, dims=dims, dtype=self.dtype,
                                 precision=self.out_proj.precision, eps=self.norm.eps,
                                 reduce=self.mesh is not None, partials=partials)
        c_specs = gdn_cache_specs(cache)
        return shard_call(self.mesh, body, params, (x, cache, slots, n),
                          (P(), c_specs, P(), P()), (P(), c_specs))

    def tp_permutations(self, tp: int) -> dict:
        """Column permutations (flat -> tp-blocked layout) of the parameters that have one."""
        HK, HVV = self.H * self.K, self.HV * self.V
        return {("in_proj_qkvz", "kernel"): blocked_permutation([HK, HK, HVV, HVV], tp),
                ("in_proj_ba", "kernel"): blocked_permutation([self.HV, self.HV], tp),
                ("conv_weight",): blocked_permutation([HK, HK, HVV], tp)}

    @staticmethod
    def commit(cache: GDNCache, slots, num_accepted, *, mesh=None) -> GDNCache:
        """Keep the first num_accepted[i] (0..T) tokens of row i's last verify call.

        The GDN state commits per the cache's mode (`gdn_jax.ops.commit`); the conv window
        becomes rows n..n+W-2 of the verify's [window | T inputs]. mesh: the layer's (`self.mesh`)
        when the cache is split over it: each device then commits its own heads.
        """
        return GatedDeltaNet.commit_layers((cache,), slots, num_accepted, mesh=mesh)[0]

    @staticmethod
    def commit_layers(caches, slots, num_accepted, *, mesh=None) -> tuple:
        """`commit` of several layers' caches by one (slots, num_accepted): a model's GDN layers
        after a verify. Their conv windows move in one launch (`gdn_jax.ops.scatter.
        shift_positions_group`: in place, the moved rows alone) where each layer took a gather
        and a row-copy launch (one launch per conv buffer shape [S, L] and width among the
        caches). mesh: as `commit`, one for all (a model's layers share theirs). Returns the
        caches, in order."""
        caches = tuple(caches)
        n = jnp.asarray(num_accepted).astype(jnp.int32)
        if mesh is not None:  # inside the map the ops' checks see tracers: check the values here
            kinds = {(c.num_slots, c.t_max): c for c in caches}  # one check per pool size
            for cache in kinds.values():
                ops.check_slot_args("commit", cache.state, slots, num_accepted)
        specs = tuple(gdn_cache_specs(cache) for cache in caches)
        return shard_call(mesh, _commit, {}, (caches, slots, n), (specs, P(), P()), specs)

    @staticmethod
    def reset(cache: GDNCache, slots, *, mesh=None) -> GDNCache:
        """Zero the slots' state and conv window for new sequences (mesh: as `commit`)."""
        if mesh is not None:
            ops.check_slot_args("reset", cache.state, slots)
        specs = gdn_cache_specs(cache)
        return shard_call(mesh, _reset, {}, (cache, slots), (specs, P()), specs)


def _window_rows(cache: GDNCache) -> int:
    """W - 1: the committed rows of the cache's conv buffer [S, W - 1 + T_max, C]."""
    return cache.conv.shape[1] - cache.t_max


def _commit(_params, caches: tuple, slots, n) -> tuple:
    """`GatedDeltaNet.commit_layers` on one device's heads (no parameters: `shard_call`'s first
    arg): each layer's state by `ops.commit`; the conv windows (rows n..n+W-2 of the verify's
    [window | T inputs] to rows 0..W-2) of the layers of one buffer shape and width in one
    move."""
    out = []
    for cache in caches:
        gather = slot_index(slots, cache.num_slots)[0]
        inter = None if cache.inter is None else cache.inter[gather]
        out.append(cache.replace(state=ops.commit(cache.state, slots, n, inter)))
    groups = {}  # one launch per conv buffer shape [S, L] and window
    for i, c in enumerate(caches):
        groups.setdefault((c.conv.shape[:2], _window_rows(c)), []).append(i)
    for group in groups.values():
        scatter = slot_index(slots, caches[group[0]].num_slots)[2]
        convs = shift_positions_group(tuple(caches[i].conv for i in group), scatter, n,
                                      _window_rows(caches[group[0]]))
        for i, conv in zip(group, convs):
            out[i] = out[i].replace(conv=conv)
    return tuple(out)


def _reset(_params, cache: GDNCache, slots) -> GDNCache:
    """`GatedDeltaNet.reset` on one device's heads."""
    _, _, scatter = slot_index(slots, cache.num_slots)
    conv = cache.conv.at[scatter].set(0, mode="drop")
    return cache.replace(state=ops.reset(cache.state, slots), conv=conv)

