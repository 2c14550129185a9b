"""What the decode / verify / fold kernels share: argument checks, and thin facades over refs.

Kernels take every array as a whole-array ref (no BlockSpec) and index it with the row's slot in
the body: a GPU BlockSpec cannot read a slot table (no scalar prefetch on GPU). Grid:
(B, HV, V // block_v); program (b, hv, iv) owns the tile pool[slot, hv, iv*BV:(iv+1)*BV, :].
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _recurrence as rec

_F32 = jnp.float32
POOL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))  # the state pool's storage
MAX_T = 16  # the most tokens one decode / verify call takes (verify unrolls them in Python;
            # the Mosaic GPU kernels take 8: _tokens_mgpu.MAX_T)


# ------------------------------------------------------------------------------------------------
# Argument checks (trace time; ValueError naming the op and the argument)


class Dtypes(NamedTuple):
    """The storage dtypes of one call: the pool's, the tokens' (q, k, v, and o), and the replay
    candidates' (the wider of cand_k and cand_v: what sizes their SMEM stages)."""

    pool: jnp.dtype
    tokens: jnp.dtype
    candidates: jnp.dtype

    @classmethod
    def of(cls, q, pool, cand_k, cand_v) -> "Dtypes":
        cand = max(jnp.dtype(cand_k.dtype), jnp.dtype(cand_v.dtype), key=lambda d: d.itemsize)
        return cls(jnp.dtype(pool.dtype), jnp.dtype(q.dtype), cand)


class Dims(NamedTuple):
    """The sizes of one decode / verify call: B rows of T tokens, H key heads and HV value heads
    of head dims K and V, on a pool of num_slots slots whose replay buffers hold t_max tokens."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    num_slots: int
    t_max: int


def _fail(op, arg, expected, got):
    raise ValueError(f"{op}: {arg} expected {expected}, got {got}")


def _shape_is(op, arg, x, expected, names):
    if tuple(x.shape) != tuple(expected):
        _fail(op, arg, f"shape {names} = {tuple(expected)}", f"shape {tuple(x.shape)}")


def is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


def pow2_block(n: int, most: int) -> int | None:
    """The largest power of two <= most dividing n, or None below 16: the block an axis of n
    elements is cut in (a group's weight in `project_group`, a table's rows in
    `scatter_rows_group`)."""
    block = most
    while n % block and block > 16:
        block //= 2
    return block if n % block == 0 else None


def column_blocks(widths, sizes) -> tuple:
    """The programs of weights of these widths cut in column blocks of sizes[i]: ((first, last,
    block_n, col), ...), weight i's blocks programs first..last - 1, its columns of the output
    from col on (a group's one launch: `project_group`; `scatter_rows_group`'s tables)."""
    offsets = tuple(itertools.accumulate([0, *widths]))
    firsts = tuple(itertools.accumulate([0, *(n // bn for n, bn in zip(widths, sizes))]))
    return tuple(zip(firsts, firsts[1:], sizes, offsets))


def check_weights(op: str, x, ws: tuple) -> tuple[int, int, tuple[int, ...]]:
    """x [M, K] against weights ws [K, N_i] of x's dtype (a projection's operands): a ValueError
    naming the first that is not, else (M, K, the widths N_i)."""
    for i, w in enumerate(ws):
        name = "w" if len(ws) == 1 else f"ws[{i}]"
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
            raise ValueError(f"{op}: x [M, K] and {name} [K, N] expected, got "
                             f"x{list(x.shape)} and {name}{list(w.shape)}")
        if x.dtype != w.dtype:
            raise ValueError(f"{op}: x and {name} must share a dtype, got {x.dtype} and "
                             f"{w.dtype}")
    return (*x.shape, tuple(w.shape[1] for w in ws))


def check_group(op: str, x, ws, misfit, config) -> tuple[tuple, int, int, tuple[int, ...]]:
    """A group launch's operands: ws a non-empty tuple (or list) of weights [K, N_i] of x's
    dtype (`check_weights`) that config takes (misfit(M, K, widths, dtype, config) -> why or
    None) -> (ws as a tuple, M, K, widths); else a ValueError naming op, the shapes and why."""
    if not isinstance(ws, (tuple, list)) or not ws:
        raise ValueError(f"{op}: ws must be a non-empty tuple of [K, N] weights, got "
                         f"{type(ws).__name__}")
    ws = tuple(ws)
    M, K, widths = check_weights(op, x, ws)
    why = misfit(M, K, widths, x.dtype, config)
    if why:
        raise ValueError(f"{op}: x{list(x.shape)} @ {' '.join(f'w{list(w.shape)}' for w in ws)}"
                         f" {x.dtype}: {why}")
    return ws, M, K, widths


MIN_DOT_ROWS = 16  # the smallest M of a tensor-core tile (tl.dot)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (n >= 1): a Triton block of n elements."""
    return 1 << (n - 1).bit_length()


def dot_rows(n: int) -> int:
    """n rows padded to the tile a tensor-core dot multiplies: a power of two >= MIN_DOT_ROWS."""
    return max(MIN_DOT_ROWS, pow2_at_least(n))


def column_index(start, width: int):
    """[1, width] int32: columns start..start + width as an index array, for a load indexed by
    arrays on every axis (the interpreter takes no mix of arrays and slices)."""
    return start + lax.broadcasted_iota(jnp.int32, (1, width), 1)


def summed_parts(ref, rows, cols, dtype, **masked):
    """A tile of a [S, M, N] ref of split-K partial sums at index arrays (rows, cols), its S
    loads added in fp32 in order and rounded to dtype: what the producer's output would have
    held. masked: plgpu.load's mask and other (a Pallas-Triton kernel's)."""
    parts = [plgpu.load(ref.at[jnp.int32(s), rows, cols], **masked).astype(jnp.float32)
             for s in range(ref.shape[0])]
    return functools.reduce(operator.add, parts).astype(dtype)


def gated_norm(o, z, weight, eps: float, dtype):
    """GDN's output norm on a tile of heads: o, z [rows, V] fp32 (each row one head of one token),
    weight [V] -> [rows, V] in dtype: o RMS-normalised over V, rounded to dtype, times weight
    (rounded to the pair's promoted dtype, as XLA's product), times silu(z) in fp32
    (`gdn_jax.ops.residual_norm.gated_rms_norm`, the formula this follows)."""
    y = o * lax.rsqrt(jnp.mean(o * o, axis=1, keepdims=True) + eps)
    y = weight.astype(jnp.float32)[None, :] * y.astype(dtype).astype(jnp.float32)
    y = y.astype(jnp.promote_types(weight.dtype, dtype)).astype(jnp.float32)
    return (y * (z * jax.nn.sigmoid(z))).astype(dtype)


def in_row_zero(row, block_m: int):
    """row [1, K] -> [block_m, K]: the row in row 0 of a tile, zeros below (a tile whose other
    rows are padding, formed from its one real row alone)."""
    shape = (block_m, row.shape[1])
    first = lax.broadcasted_iota(jnp.int32, shape, 0) == 0
    return jnp.where(first, jnp.broadcast_to(row, shape), jnp.zeros((), row.dtype))


def check_launch_fields(config, tiles=(), counts=()) -> None:
    """A launch config's checks: each field in `tiles` a power of two >= 16 (a Triton block),
    each in `counts` an int >= 1; a ValueError naming the config class and the field."""
    name = type(config).__name__
    for field in tiles:
        value = getattr(config, field)
        if not is_pow2(value) or value < 16:
            raise ValueError(f"{name}: {field} must be a power of two >= 16, got {field}={value}")
    for field in counts:
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {field} must be an int >= 1, got {field}={value}")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Launch parameters of a kernel whose programs each take one block of a row (hashable: a
    static argument). Subclasses say what the block must tile (`misfit`).

    block: elements one program takes (a power of two >= 16).
    num_warps, num_stages: Triton's (nothing loops: one stage).
    """

    block: int = 2048
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        check_launch_fields(self, tiles=("block",))


def check_pool(op, pool, cand_k, cand_v, cand_g, cand_beta, count, *, H=None, HV=None, K=None,
               V=None):
    """pool [N, HV, V, K] bf16|fp32 and the replay buffers that go with it."""
    if pool.ndim != 4:
        _fail(op, "pool", "rank 4 [num_slots, HV, V, K]", f"shape {pool.shape}")
    N, hv, v, k = pool.shape
    if jnp.dtype(pool.dtype) not in POOL_DTYPES:
        _fail(op, "pool", "dtype bfloat16 or float32", f"dtype {pool.dtype}")
    for name, want, got in (("HV", HV, hv), ("V", V, v), ("K", K, k)):
        if want is not None and want != got:
            _fail(op, "pool", f"{name} = {want} from the inputs ([num_slots, HV, V, K])",
                  f"shape {pool.shape}")
    if cand_k.ndim != 4:
        _fail(op, "cand_k", "rank 4 [num_slots, T_max, H, K]", f"shape {cand_k.shape}")
    t_max, h = cand_k.shape[1], cand_k.shape[2]
    if t_max < 1:
        _fail(op, "cand_k", "T_max >= 1 ([num_slots, T_max, H, K])", f"shape {cand_k.shape}")
    if H is not None and h != H:
        _fail(op, "cand_k", f"H = {H} from the inputs", f"shape {cand_k.shape}")
    if hv % h:
        _fail(op, "cand_k", f"H (cand_k.shape[2]) dividing HV = {hv}", f"H = {h}")
    _shape_is(op, "cand_k", cand_k, (N, t_max, h, k), "[num_slots, T_max, H, K]")
    _shape_is(op, "cand_v", cand_v, (N, t_max, hv, v), "[num_slots, T_max, HV, V]")
    _shape_is(op, "cand_g", cand_g, (N, t_max, hv), "[num_slots, T_max, HV]")
    _shape_is(op, "cand_beta", cand_beta, (N, t_max, hv), "[num_slots, T_max, HV]")
    _shape_is(op, "count", count, (N,), "[num_slots]")
    for name, x in (("cand_k", cand_k), ("cand_v", cand_v), ("cand_g", cand_g),
                    ("cand_beta", cand_beta)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            _fail(op, name, "a floating dtype", f"dtype {x.dtype}")
    if not jnp.issubdtype(count.dtype, jnp.integer):
        _fail(op, "count", "an integer dtype (int32)", f"dtype {count.dtype}")
    for name, d in (("K", k), ("V", v)):
        if not is_pow2(d):
            _fail(op, f"{name} (pool.shape)", "a power of two (Triton blocks)", d)
    return N, h, hv, v, k, t_max


def check_slots(op, slots, B):
    _shape_is(op, "slots", slots, (B,), "[B]")
    if not jnp.issubdtype(slots.dtype, jnp.integer):
        _fail(op, "slots", "an integer dtype (int32)", f"dtype {slots.dtype}")


def check_tokens(op, q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                 count, slots, *, t_lo, t_hi) -> Dims:
    """Shapes and dtypes of a decode / verify call (T in t_lo..t_hi)."""
    if q.ndim != 4:
        _fail(op, "q", "rank 4 [B, T, H, K]", f"shape {q.shape}")
    B, T, H, K = q.shape
    _shape_is(op, "k", k, (B, T, H, K), "[B, T, H, K]")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        _fail(op, "v", f"shape [B, T, HV, V] with B, T = {(B, T)}", f"shape {v.shape}")
    HV, V = v.shape[2:]
    if HV % H:
        _fail(op, "v", f"HV (v.shape[2]) a multiple of H = {H}", f"HV = {HV}")
    _shape_is(op, "a", a, (B, T, HV), "[B, T, HV]")
    _shape_is(op, "b", b, (B, T, HV), "[B, T, HV]")
    _shape_is(op, "A_log", A_log, (HV,), "[HV]")
    _shape_is(op, "dt_bias", dt_bias, (HV,), "[HV]")
    for name, x in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("A_log", A_log),
                    ("dt_bias", dt_bias)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            _fail(op, name, "a floating dtype", f"dtype {x.dtype}")
    if not t_lo <= T <= t_hi:
        _fail(op, "T (q.shape[1])", f"{t_lo}..{t_hi}", T)
    N, *_, t_max = check_pool(op, pool, cand_k, cand_v, cand_g, cand_beta, count, H=H, HV=HV,
                              K=K, V=V)
    check_slots(op, slots, B)
    return Dims(B, T, H, HV, K, V, N, t_max)


def check_ring(op, q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
               count, slots, *, reserve: int, t_hi: int, ring_min: int) -> Dims:
    """A ring-mode call (T in 1..t_hi): the ring (cand_*) of W entries, W a power of two >=
    ring_min, its keys in k's dtype and its u fp32; reserve in T..W (the ring rows the call
    writes: its T tokens' and identity steps after them). Dims with t_max = W."""
    dims = check_tokens(op, q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g,
                        cand_beta, count, slots, t_lo=1, t_hi=t_hi)
    ring = dims.t_max
    if ring < ring_min or ring & (ring - 1):
        _fail(op, "cand_k", f"a ring of W entries, W a power of two >= {ring_min} "
              "([num_slots, W, H, K])", f"W = {ring}")
    if not dims.T <= reserve <= ring:
        _fail(op, "reserve", f"T..W = {dims.T}..{ring}", reserve)
    if cand_k.dtype != k.dtype or cand_v.dtype != _F32:
        _fail(op, "cand_k, cand_v", "k's dtype and float32 (the ring's keys, its u)",
              f"{cand_k.dtype}, {cand_v.dtype}")
    return dims


# ------------------------------------------------------------------------------------------------
# Ref facades (inside kernels)


class TokenRefs(NamedTuple):
    """This call's tokens: whole-array refs."""

    q: object        # [B, T, H, K]
    k: object        # [B, T, H, K]
    v: object        # [B, T, HV, V]
    a: object        # [B, T, HV]
    b: object        # [B, T, HV]
    A_log: object    # [HV]
    dt_bias: object  # [HV]


class PendingRefs(NamedTuple):
    """The replay buffers of the pool: whole-array refs."""

    count: object      # [num_slots] int32
    cand_k: object     # [num_slots, T_max, H, K] raw k
    cand_v: object     # [num_slots, T_max, HV, V]
    cand_g: object     # [num_slots, T_max, HV] fp32
    cand_beta: object  # [num_slots, T_max, HV] fp32


class Row(NamedTuple):
    """Where this program works: batch row b, value head hv (key head hk), V block cols."""

    b: jax.Array
    hv: jax.Array
    hk: jax.Array
    cols: pl.Slice
    slot: jax.Array   # int32 scalar, only meaningful where valid
    valid: jax.Array  # bool scalar: 0 <= slot < num_slots


def this_row(slots_ref, *, num_slots: int, group: int, block_v: int) -> Row:
    """Program ids -> Row. group = HV // H (GVA: value head hv reads key head hv // group)."""
    b, hv, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slots_ref[b].astype(jnp.int32)
    valid = (slot >= 0) & (slot < num_slots)
    return Row(b, hv, hv // group, pl.ds(iv * block_v, block_v), slot, valid)


def load_token(tok: TokenRefs, r: Row, t: int):
    """Token t of row r, prepared in fp32: q [K] (normalised, scaled), k [K] (normalised),
    v [BV], g, beta scalars."""
    q = rec.prepare_q(tok.q[r.b, t, r.hk, :].astype(_F32))
    k = rec.l2norm(tok.k[r.b, t, r.hk, :].astype(_F32))
    v = tok.v[r.b, t, r.hv, r.cols].astype(_F32)
    g, beta = rec.gates(tok.a[r.b, t, r.hv].astype(_F32), tok.b[r.b, t, r.hv].astype(_F32),
                        tok.A_log[r.hv].astype(_F32), tok.dt_bias[r.hv].astype(_F32))
    return q, k, v, g, beta


def token_gates(a_ref, b_ref, A_log_ref, dt_bias_ref, b, hv, T: int):
    """Tokens 0..T - 1 of row b at value head hv: their (g, beta), fp32 scalars, log1p in
    Kahan's form (the Mosaic GPU kernels', which have no log1p)."""
    A_log, dt_bias = A_log_ref[hv].astype(_F32), dt_bias_ref[hv].astype(_F32)
    return [rec.gates(a_ref[b, t, hv].astype(_F32), b_ref[b, t, hv].astype(_F32), A_log,
                      dt_bias, log1p=rec.log1p_kahan) for t in range(T)]


def load_state(pool_ref, r: Row):
    """The tile pool[slot, hv, cols, :] in fp32: [BV, K]."""
    return pool_ref[r.slot, r.hv, r.cols, :].astype(_F32)


def store_state(pool_ref, r: Row, S):
    """Round the tile once into the pool's dtype and store it at pool[slot, hv, cols, :]."""
    pool_ref[r.slot, r.hv, r.cols, :] = S.astype(pool_ref.dtype)


def pending_count(pend: PendingRefs, r: Row, t_max: int, num_slots: int):
    """count[slot] clipped to 0..T_max; 0 for a padding row.

    The slot is clamped for this one scalar read, so it is safe outside `pl.when(r.valid)`.
    """
    return tile_pending(pend.count, r.slot, r.valid, t_max=t_max, num_slots=num_slots)


class Tile(NamedTuple):
    """A CTA's tile of a run over the B * HV * (V // BV) state tiles (the Mosaic GPU kernels)."""

    b: object
    hv: object
    iv: object        # the V block
    slot: object
    in_range: object  # a real tile (the last CTA's run may overshoot)
    live: object      # a real tile of a real row

    @classmethod
    def at(cls, w, *, slots_ref, HV: int, NV: int, total: int, num_slots: int) -> "Tile":
        """Tile w of the run, in (b, hv, iv) order; an overshooting w reads tile 0's indices."""
        in_range = w < total
        w = jnp.where(in_range, w, 0)
        b, rest = w // (HV * NV), w % (HV * NV)
        slot = slots_ref[b].astype(jnp.int32)
        live = in_range & (slot >= 0) & (slot < num_slots)
        return cls(b, rest // NV, rest % NV, slot, in_range, live)


def tile_pending(count_ref, slot, live, *, t_max: int, num_slots: int):
    """A slot's pending candidates: count[slot] (as int32) clipped to 0..t_max; 0 where the row
    is not live (the slot is clamped for the read, safe outside `pl.when(live)`)."""
    n = count_ref[jnp.clip(slot, 0, num_slots - 1)].astype(jnp.int32)
    return jnp.where(live, jnp.clip(n, 0, t_max), 0)


def fold_pending(S, pend: PendingRefs, r: Row, n):
    """Apply the slot's first n candidates (the accepted, pending ones) to S [BV, K] fp32.

    A loop with a data-dependent trip count, so a slot with nothing pending costs no math.
    """

    def step(t, S):
        k = rec.l2norm(pend.cand_k[r.slot, t, r.hk, :].astype(_F32))
        v = pend.cand_v[r.slot, t, r.hv, r.cols].astype(_F32)
        g = pend.cand_g[r.slot, t, r.hv].astype(_F32)
        beta = pend.cand_beta[r.slot, t, r.hv].astype(_F32)
        return rec.update(S, k, v, g, beta)

    return lax.fori_loop(0, n, step, S)
