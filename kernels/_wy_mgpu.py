"""What the matrix (WY) form kernels share -- replay's (`_replay_wy_mgpu`) and ring mode's
(`_ring_wy_mgpu`), Pallas **Mosaic GPU** on Hopper's wgmma: X's row layout, the tokens' algebra
(`solve`), the tensor-core products and the fold, and the pipeline that walks a CTA's tiles.

X is [64, K] raw bf16 in SMEM, in 8-row groups (whole SMEM tiles of rows), where `Rows` says:
replay's rows 0..7 hold its candidate keys, 8..15 this call's keys, 16..23 its queries; ring mode
packs its keys and queries into one group while T <= 4 (two beyond), then the ring's keys.

The pipeline (`run_tiles`): a CTA walks `tiles_per_cta` consecutive tiles (b, hv, V block) over
`stages` SMEM stages, each tile's state tile and values loaded `stages - 1` tiles ahead. X, X'
(the fold's operand) and the Gram depend only on the key group (b, hv // (HV / H)), whose tiles
are consecutive: they are built at a group's first tile (X lands in a plain staging buffer, since
TMA cannot write a few rows of a tiled one, and is copied into the tiled operands through
registers) and serve its other tiles, the next group's X loads going out as soon as the staging
buffer is read.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mgpu as mg
from . import _recurrence as rec

_F32, _BF16 = jnp.float32, jnp.bfloat16
GROUP = 8           # X rows per group (candidates, keys, queries): whole SMEM tiles of rows
ROWS = 64           # X rows: a WGMMA operand's M
TOKEN_ROWS = 3 * GROUP  # X's rows up to the queries': where `solve` reads
MAX_T = GROUP       # the most tokens (and replay candidates) one call takes


class Rows(NamedTuple):
    """X's first rows of this call's keys, of its queries and of the pending keys (replay's
    candidates, the ring's committed entries)."""

    key: int
    query: int
    pending: int


REPLAY_ROWS = Rows(key=GROUP, query=2 * GROUP, pending=0)


# ------------------------------------------------------------------------------------------------
# The math, as pure functions of scalars and [BV] vectors (also run as plain JAX by the tests)


def solve(n, gates, cand_gates, gram, row, value, K: int, select=None,
          x_rows: Rows = REPLAY_ROWS):
    """The corrected values and outputs of the t_max candidates (the first n live) and T tokens.

    n: int32 scalar, the live candidates; gates: T pairs (g, beta) of fp32 scalars, the tokens';
    cand_gates: t_max such pairs of the candidates (g the log decay, gating applied);
    gram(r, c): the dot product of X rows r and c (fp32 scalar); row(r): PT row r, [BV] fp32;
    value(i): key i's value, [BV] fp32 (i < t_max: candidate i; then token i - t_max);
    select(pred, x): x where the scalar pred holds, else zeros (default jnp.where); x_rows:
    where X holds the keys and queries.
    Returns (o: T [BV] fp32 outputs, w: t_max [BV] fp32 fold weights e^{G_n - G_j} rk_j u_j (0
    for a dead candidate), e^{G_n}: the candidates' total decay, an fp32 scalar, u: the T
    tokens' [BV] fp32 corrected values).

    The decays e^{G_i - G_l} are running products of the keys' e^{g} (one exp per key, no
    overflow: every factor is <= 1); a dead candidate enters with g = beta = 0.
    """
    select = select or (lambda pred, x: jnp.where(pred, x, 0.0))
    t_max, T = len(cand_gates), len(gates)
    rows = [x_rows.pending + j for j in range(t_max)] + [x_rows.key + t for t in range(T)]
    live = [j < n for j in range(t_max)] + [True] * T
    # A dead candidate's data may be anything (NaN included): selects, never products, take
    # it out -- its g, beta and key scale are 0, its u exactly 0, its every coefficient 0.
    dead_out = lambda i, x: jnp.where(live[i], x, 0.0) if i < t_max else x
    g = [dead_out(j, cg) for j, (cg, _) in enumerate(cand_gates)] + [gt for gt, _ in gates]
    beta = [dead_out(j, cb) for j, (_, cb) in enumerate(cand_gates)] + [bt for _, bt in gates]
    rk = [dead_out(i, lax.rsqrt(gram(r, r) + rec.L2NORM_EPS)) for i, r in enumerate(rows)]
    coef = lambda l, c: dead_out(l, c)  # the coefficient of key l's u

    us, outs = [], []
    e0 = jnp.ones((), _F32)  # e^{G_i}: from S0
    pair = []                # pair[l] = e^{G_i - G_l}, l < i
    w, e_n = [], e0
    for i, r in enumerate(rows):
        d = jnp.exp(g[i])
        pair = [x * d for x in pair] + ([d] if i else [])
        e0 = e0 * d
        acc = value(i) - (e0 * rk[i]) * row(r)
        for l, u in enumerate(us):
            acc = acc - coef(l, pair[l] * rk[i] * rk[l] * gram(r, rows[l])) * u
        u = beta[i] * acc
        us.append(select(live[i], u) if i < t_max else u)
        if i == t_max - 1:  # the fold: the state after the candidates
            e_n = e0
            w = [coef(j, x * rk[j]) * us[j]
                 for j, x in enumerate(pair + [jnp.ones((), _F32)])]
        if i >= t_max:  # token t's output, from the state after its own update
            qr = x_rows.query + i - t_max
            rq = lax.rsqrt(gram(qr, qr) + rec.L2NORM_EPS) * K ** -0.5
            o = e0 * row(qr)
            for l, x in enumerate(pair + [jnp.ones((), _F32)]):
                o = o + coef(l, x * rk[l] * gram(qr, rows[l])) * us[l]
            outs.append(rq * o)
    return outs, w, e_n, us[t_max:]



# ------------------------------------------------------------------------------------------------
# Products and the fold (inside kernels; plain dots under the interpreter)


def times_t(xs, other, interpret: bool):
    """xs @ other^T [m, n] fp32 on the tensor cores. xs: an SMEM ref [m, K] (m a multiple of 64:
    the X operand, or a state tile); other: an SMEM ref [n, K], the state tile (PT), X's first
    rows (the Gram, or the state tile's products with them)."""
    if interpret:  # the interpreter's product: a plain dot of the SMEM contents
        return _dot_t(xs[...].astype(_F32), other[...].astype(_F32))
    plgpu = mg.plgpu

    def product(acc):
        plgpu.wgmma(acc, xs, other.transpose((1, 0)))
        return acc[...]

    return pl.run_scoped(product, plgpu.ACC((xs.shape[0], other.shape[0]), _F32))


def column_groups(PTT):
    """PT^T = S0 @ X[:n]^T [BV, n] fp32 (in registers) -> its 8-column groups, [BV, 8] each (X's
    row groups; slices without strides: Mosaic)."""
    return [lax.slice(PTT, (0, start), (PTT.shape[0], start + GROUP))
            for start in range(0, PTT.shape[1], GROUP)]


def token_rows(groups):
    """`column_groups` (in registers) -> row(r): X row r's product with the state, [BV] fp32,
    its column taken by a masked sum along the row of r's group (in the WGMMA layout's
    reduce(1), the [BV] vectors' layout): no trip through SMEM. H200, ring verify at B = 32: one
    third faster than X @ S0^T staged through an SMEM buffer and read back as rows
    (bench/results/sweep_ring_mgpu_smem_pt-h200-2026-12-03.log); over r's group rather than all
    n columns: 262.9 -> 242.5 us at B = 256 (bench/results/ring_mgpu_issue-h200-2026-12-03.json)."""
    col = lax.broadcasted_iota(jnp.int32, groups[0].shape, 1)

    def row(r):  # r: a static row index
        group = groups[r // GROUP]
        return jnp.sum(jnp.where(col == r % GROUP, group, jnp.zeros_like(group)), axis=1)

    return row


def accumulate(acc, lhs, xs, interpret: bool):
    """acc + sum of a @ X over the [BV, 64] bf16 arrays a in lhs (X: the SMEM ref xs [64, K])."""
    if interpret:
        x = xs[...].astype(_F32)
        for a in lhs:
            acc = acc + lax.dot(a.astype(_F32), x, precision=lax.Precision.HIGHEST)
        return acc
    plgpu = mg.plgpu

    def run(acc_ref):
        for a in lhs:
            plgpu.wgmma(acc_ref, a, xs)

    return pl.run_state(run)(plgpu.ACC.init(acc))


def _dot_t(a, b):
    """a @ b^T in fp32 at full precision."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=_F32)


def zeros_already(pred, x):
    """`solve`'s select in the kernel: a dead candidate's inputs are zeros there (its X row
    zeroed before the products, its value read from a zero row), so its u is exactly 0 as is."""
    del pred
    return x


def value_rows(rows: int, BV: int) -> int:
    """Rows of the candidates' value buffer: rows, rounded up to a multiple of 512 elements (its
    zero store, a splat, goes out as 128 threads' 4-element vectors)."""
    return -(-rows * BV // 512) * 512 // BV


def columns(vectors, shape, layout, interpret, first: int = 0):
    """[rows, cols] fp32 with column first + j = vectors[j] (a [rows] vector each), zeros
    elsewhere."""
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    out = mg.layout_cast(jnp.zeros(shape, _F32), layout, interpret=interpret)
    for j, x in enumerate(vectors):
        out = jnp.where(col == first + j, lax.broadcast_in_dim(x, shape, (0,)), out)
    return out


def fold_tile(w, e_n, st, xf, dst, *, first: int, layout, interpret: bool):
    """The fold of one tile: st := e_n * st + W^T @ X' rounded once to st's dtype, then stored
    by TMA to dst (the pool tile). st: the SMEM ref [BV, K] holding S0; w: [BV] fp32 vectors,
    the fold weights of X' rows first, first + 1, ...; xf: X' [64, K], only the folded keys'
    rows nonzero. W enters as bf16 high and low parts (about 16 bits, fp32 accumulation)."""
    WT = columns(w, (st.shape[0], ROWS), layout, interpret, first=first)
    hi = WT.astype(_BF16)
    lo = (WT - hi.astype(_F32)).astype(_BF16)
    S0 = mg.layout_cast(st[...], layout, interpret=interpret).astype(_F32)
    S = accumulate(e_n * S0, (hi, lo), xf, interpret)
    mg.plgpu.commit_smem()  # every thread has read st (a kernel without auto barriers)
    st[...] = S.astype(st.dtype)
    mg.plgpu.commit_smem()
    mg.plgpu.copy_smem_to_gmem(st, dst)


# ------------------------------------------------------------------------------------------------
# The pipeline


class Loads(NamedTuple):
    """What a CTA's tiles load, and where (refs). The pending tokens (replay's candidates, the
    ring's committed entries) are read only where a slot has some: their per-tile data (values,
    or the ring's u) into `pend_v` rows 0.., their keys into X's staging rows x_rows.pending..."""

    pool: object     # [N, HV, V, K] GMEM -> st [ST, BV, K]
    v: object        # [B, T, HV, V] -> vs [ST, T, BV]
    k: object        # [B, T, H, K] -> xin rows x_rows.key..
    q: object        # [B, T, H, K] -> xin rows x_rows.query..
    cand_k: object   # [N, W, H, K] -> xin rows x_rows.pending..
    cand_v: object   # [N, W, HV, V] -> pend_v [ST, > W, BV]
    st: object
    vs: object
    xin: object
    pend_v: object
    x_rows: Rows


def run_tiles(*, first, tiles: int, stages: int, block_v: int, group: int, group_tiles: int,
              tile, pending, loads: Loads, scalars, build_x, math, pad, bars, pbars, xbar,
              xpbar):
    """Walk the CTA's run of `tiles` tiles from tile `first` (see the module docstring).

    tile(w) -> `_common.Tile` of run position w; pending(slot, live) -> the slot's pending count
    n (0 for a padding row); group: value heads per key head; group_tiles: a key group's
    consecutive tiles. Each tile's state and values are loaded into stage i % stages (2
    arrivals on bars; the pending tokens' data 1 on pbars where n > 0), a key group's keys and
    queries into X's staging buffer (2 on xbar; the pending keys 1 on xpbar). The kernel's hooks:
      scalars(t):  the tile's scalars, read first (their GMEM latency overlaps the TMA wait);
      build_x(n):  at a live group's first tile, its loads landed: build X, X', the Gram;
      math(t, s, n, scalars): a live tile whose loads landed in stage s;
      pad(t):      a padding row's tile (in range, not live).
    Each tile starts by draining the stores of tile i - 1 (their SMEM is free to reuse) and
    issuing tile i + stages - 1's loads."""
    L, W, T = loads, loads.cand_k.shape[1], loads.v.shape[1]

    def issue(i):  # tile i's own loads: its state tile, values and pending per-tile data
        t = tile(first + i)
        s, cols = i % stages, pl.ds(t.iv * block_v, block_v)

        @pl.when(t.live)
        def _():
            mg.plgpu.copy_gmem_to_smem(L.pool.at[t.slot, t.hv, cols, :], L.st.at[s], bars.at[s])
            mg.plgpu.copy_gmem_to_smem(L.v.at[t.b, :, t.hv, cols], L.vs.at[s], bars.at[s])

        @pl.when(pending(t.slot, t.live) > 0)
        def _():
            mg.plgpu.copy_gmem_to_smem(L.cand_v.at[t.slot, :, t.hv, cols],
                                       L.pend_v.at[s, pl.ds(0, W)], pbars.at[s])

    def issue_x(i):  # the key group of tile i: its keys, queries and pending keys
        t = tile(first + i)
        hk = t.hv // group

        @pl.when(t.live)
        def _():
            mg.plgpu.copy_gmem_to_smem(L.k.at[t.b, :, hk, :], L.xin.at[pl.ds(L.x_rows.key, T)],
                                       xbar.at[0])
            mg.plgpu.copy_gmem_to_smem(L.q.at[t.b, :, hk, :],
                                       L.xin.at[pl.ds(L.x_rows.query, T)], xbar.at[0])

        @pl.when(pending(t.slot, t.live) > 0)
        def _():
            mg.plgpu.copy_gmem_to_smem(L.cand_k.at[t.slot, :, hk, :],
                                       L.xin.at[pl.ds(L.x_rows.pending, W)], xpbar.at[0])

    plgpu = mg.plgpu
    issue_x(0)
    for i in range(min(stages - 1, tiles)):
        issue(i)

    @pl.loop(0, tiles)
    def _(i):
        t = tile(first + i)
        s = i % stages
        # the first tile of the run or of a key group: X, X' and the Gram are built anew
        offset = (first + i) % group_tiles
        fresh = (i == 0) | (offset == 0)
        # tile i - 1's stores have read their SMEM and every thread is done with it: its stage
        # takes tile i + stages - 1's loads, and (at a group's first tile) X, X' and the Gram
        # the new group's
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.commit_smem()
        if tiles > stages - 1:
            @pl.when(i + stages - 1 < tiles)
            def _():
                issue(i + stages - 1)

        values = scalars(t)
        n = pending(t.slot, t.live)

        @pl.when(fresh)
        def _():
            @pl.when(t.live)
            def _():
                plgpu.barrier_wait(xbar.at[0])

                @pl.when(n > 0)
                def _():
                    plgpu.barrier_wait(xpbar.at[0])

                build_x(n)

            # the staging buffer is free: the next key group's loads go out now
            following = i + group_tiles - offset
            if tiles > 1:
                @pl.when(following < tiles)
                def _():
                    issue_x(following)

        @pl.when(t.live)
        def _():
            plgpu.barrier_wait(bars.at[s])

            @pl.when(n > 0)
            def _():
                plgpu.barrier_wait(pbars.at[s])

            math(t, s, n, values)

        @pl.when(t.in_range & jnp.logical_not(t.live))
        def _():
            pad(t)

    plgpu.wait_smem_to_gmem(0)
