"""GDN verify (and decode) in ring mode, in matrix (WY) form on the tensor cores: the Pallas
**Mosaic GPU** kernel behind `verify_mgpu.verify_ring_mgpu` (bf16 pool, tokens and ring keys;
Hopper's wgmma). Same contract as the Triton ring kernel (`ring.verify_ring`).

The ring holds up to W committed tokens not yet folded into the pool, each as its raw key, its
log decay g and its corrected value u (fp32). With S0 the pool's tile, the state after the n
committed ring tokens is, exactly,

    S_R = e^{G_n} S0 + sum_{l<n} w_l kraw_l^T,    w_l = e^{G_n - G_l} rk_l u_l    [BV] fp32

so a new token's product with it needs no state but S0: for a row x of X (a raw key or query),
S_R x = e^{G_n} (S0 x) + sum_l (kraw_l . x) w_l -- the first term a column of PT^T = S0 @ X^T,
the second the Gram of X's rows with the ring's keys against the w. The T new tokens are then
solved from S_R by `_wy_mgpu.solve` (no candidates), which also gives their u for the ring.

    X    = [keys (0..); queries (P/2..); ring keys (P..P + W)]   [64, K]
                             (P = 8 while T <= 4, else 16: `x_rows`)
    PT^T = S0 @ X[:P]^T      [BV, P] fp32 (bf16 x bf16: exact in the fp32 accumulator), held in
                             registers: token row r's [BV] vector is its column r, taken by a
                             masked sum along the row (no SMEM round trip, no SMEM buffer: one
                             third faster than X @ S0^T staged through SMEM, and the CTA's SMEM
                             fits two per SM), the ring's part added first (`after_ring`)
    Gram = X @ X[:P + W]^T   [64, P + W] fp32: the tokens' products, and the ring keys' norms

The pool is read, not written, except where the call folds (n > 0 and n + reserve > W: this
call's tokens would not fit after the committed ones): there S_R, the third product W^T @ X'
(X' holding only the live ring keys, W split into bf16 high and low parts) accumulated onto
e^{G_n} S0, is rounded once into the pool. Each tile writes its T new u straight into the ring
(cand_v, at 0 after a fold, else at n: no other tile reads that slot's rows of its head and
columns); the caller appends the raw keys and gates and sets count, as for the Triton kernel.

The pipeline over a CTA's tiles is replay's (`_wy_mgpu.run_tiles`): X, X' and the Gram belong to
the key group (b, hv // (HV / H)) and are built at its first tile; each tile loads its state tile,
values and the ring's u.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _recurrence as rec
from . import _wy_mgpu as wy
from ._mgpu import MosaicConfig

_F32, _BF16 = jnp.float32, jnp.bfloat16
RINGS = (16, 32)                 # the ring sizes W (powers of two >= 16) X has rows for: 64 - 16
MAX_T = wy.MAX_T                 # the most tokens one call takes
# The ring's part of each token row is unrolled over the W entries (2T rows x W terms): at
# T = 8, W = 32 Mosaic's layout inference recurses past Python's limit while lowering (jax 0.10.2)
MAX_T_TIMES_W = 128


def x_rows(T: int) -> wy.Rows:
    """X's rows in ring mode: the keys, then the queries, in one 8-row group while T <= 4 (two
    beyond), then the ring's keys -- the fewest columns of PT^T to carry through the ring's part
    and the token rows (replay's layout, with its empty candidates' group, took 24)."""
    half = wy.GROUP // 2 if T <= wy.GROUP // 2 else wy.GROUP
    return wy.Rows(key=0, query=half, pending=2 * half)


# ------------------------------------------------------------------------------------------------
# The math, as pure functions of scalars and [BV] vectors (also run as plain JAX by the tests)


def ring_scales(n, ring_g, norm2):
    """The fold coefficients of the ring's W entries, the first n committed.

    ring_g: W fp32 scalars, the entries' log decays (gating applied; a dead entry's may be
    anything); norm2(l): |kraw_l|^2 of entry l's raw key, an fp32 scalar.
    Returns (c: W fp32 scalars c_l = e^{G_n - G_l} rk_l, 0 for a dead entry, and e^{G_n}).
    Suffix products of e^{g}: every factor <= 1, no overflow.
    """
    c, tail = [None] * len(ring_g), jnp.ones((), _F32)
    for l in reversed(range(len(ring_g))):
        live = l < n
        c[l] = jnp.where(live, tail * lax.rsqrt(norm2(l) + rec.L2NORM_EPS), 0.0)
        tail = tail * jnp.where(live, jnp.exp(ring_g[l]), 1.0)
    return c, tail


def after_ring(block, e_n, w, gram_cols):
    """An 8-column group of PT^T (S0's products with 8 rows x_r of X, [BV, 8] fp32) -> the same
    group of S_R's products: e^{G_n} S0 x_r + sum_l (kraw_l . x_r) w_l.

    w: the ring's W fold weights w_l = c_l u_l ([BV] fp32; zeros for a dead entry);
    gram_cols(l): the 8 rows' products with ring key l, [8] fp32. Each term is an outer product
    in the group's own layout (a thread holds 2 rows x 2 columns), where a [BV] vector per X row
    and term would repeat every product on the 4 threads that hold a row."""
    acc = e_n * block
    for l, wl in enumerate(w):
        acc = acc + (lax.broadcast_in_dim(wl, block.shape, (0,))
                     * lax.broadcast_in_dim(gram_cols(l), block.shape, (1,)))
    return acc


def token_rows_after_ring(PTT, e_n, w, gram_cols):
    """PT^T = S0 @ X[:P]^T [BV, P] fp32 (in registers) -> row(r): X row r's product with S_R,
    [BV] fp32 (`_wy_mgpu.token_rows` of each 8-column group `after_ring`). gram_cols(first, l):
    X rows first..first + 7 against ring key l, [8] fp32."""
    return wy.token_rows([after_ring(block, e_n, w, functools.partial(gram_cols, g * wy.GROUP))
                          for g, block in enumerate(wy.column_groups(PTT))])


# ------------------------------------------------------------------------------------------------
# The kernel


def _body(refs, *, dims: cm.Dims, config: MosaicConfig, reserve: int, interpret: bool):
    (slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref, cand_k_ref,
     cand_v_ref, cand_g_ref, pool_ref, o_ref) = refs
    # pool_ref [N, HV, V, K] written in place where a row folds; cand_v_ref [N, W, HV, V] fp32,
    # the ring's u, read and then written (this call's u at the row's ring start); o_ref
    # [B, T, HV, V] uninitialised in
    B, T, H, HV, K, V, N, W = dims
    BV, ST, PER = config.block_v, config.stages, config.tiles_per_cta
    NV = V // BV
    R = max(T, reserve)      # ring rows a call writes: its T u, then zeros (an identity step)
    group = HV // H
    ROWS = x_rows(T)
    RING_ROW = ROWS.pending  # X's first ring row
    USED = RING_ROW + W      # X rows that can hold data: the Gram's columns
    plgpu = mg.plgpu
    WG = None if interpret else plgpu.Layout.WGMMA
    VVEC = None if interpret else WG.reduce(1)
    VCOL = None if interpret else WG.reduce(0)

    tile = functools.partial(cm.Tile.at, slots_ref=slots_ref, HV=HV, NV=NV, total=B * HV * NV,
                             num_slots=N)
    pending = functools.partial(cm.tile_pending, count_ref, t_max=W, num_slots=N)

    def body(st_smem, xin_smem, x_smem, xf_smem, v_smem, ru_smem, o_smem, u_smem, gram_smem,
             bars, pbars, xbar, xpbar):
        # st_smem [ST, BV, K] pool tiles; xin_smem [64, K] X as loaded (plain); x_smem and
        # xf_smem [64, K] the wgmma operands X and X' (tiled), built once per key group;
        # v_smem [ST, T, BV]; ru_smem [ST, > W, BV] fp32 the ring's u (row W stays zero: a
        # dead entry reads it); o_smem [T, BV], u_smem [R, BV] fp32 (rows T..: zeros);
        # gram_smem [64, USED] fp32: the Gram, read back as scalars
        first = lax.axis_index("cta") * PER
        xin_smem[...] = jnp.zeros((wy.ROWS, K), _BF16)  # rows no load fills: finite products
        for s in range(ST):
            ru_smem[s] = jnp.zeros(ru_smem.shape[1:], _F32)
        for j in range(T, R):
            u_smem[j] = mg.layout_cast(jnp.zeros((BV,), _F32), VVEC, interpret=interpret)
        plgpu.commit_smem()

        def scalars(t):
            gates = cm.token_gates(a_ref, b_ref, A_log_ref, dt_bias_ref, t.b, t.hv, T)
            cslot = jnp.clip(t.slot, 0, N - 1)
            return gates, [cand_g_ref[cslot, l, t.hv].astype(_F32) for l in range(W)]

        def build_x(n):
            # X: the tokens and the committed ring keys (the rest of the ring may hold anything);
            # X', the fold's: only the committed ring keys (this call's tokens meet zero columns
            # of W^T there, and 0 * NaN would be NaN). X' is a whole [64, K] buffer, not X's
            # ring rows: a wgmma with A in registers takes K (here X' rows) in multiples of 64
            X = mg.layout_cast(xin_smem[...], WG, interpret=interpret)
            rows = lax.broadcasted_iota(jnp.int32, X.shape, 0)
            zero = jnp.zeros_like(X)
            x_smem[...] = jnp.where(rows < RING_ROW + n, X, zero)
            xf_smem[...] = jnp.where((rows >= RING_ROW) & (rows < RING_ROW + n), X, zero)
            plgpu.commit_smem()
            mg.store_plain(wy.times_t(x_smem, x_smem.at[pl.ds(0, USED)], interpret), gram_smem,
                           interpret=interpret)
            plgpu.commit_smem()  # every thread reads the Gram's scalars

        def math(t, s, n, values):
            gates, ring_g = values
            cols = pl.ds(t.iv * BV, BV)

            def ring_u(l):  # a dead entry reads the zero row W
                return mg.load(ru_smem.at[s, jnp.where(l < n, l, W)], VVEC, interpret=interpret)

            def gram_cols(first, l):  # X rows first..first + 7 against ring key l, [8] fp32
                return mg.load(gram_smem.at[RING_ROW + l, pl.ds(first, wy.GROUP)], VCOL,
                               interpret=interpret)

            # c and e^{G_n} depend on (slot, hv) only, yet each of its tiles computes them:
            # kept in SMEM for a value head's second tile (offline SASS: that tile 2592 -> ~2320
            # instructions) the kernel ran 5-7% slower (H100, B = 256 verify 198.7 -> 212 us):
            # waits on the SMEM reads (ncu: short-scoreboard stalls 0.22 -> 0.39 an issue, issue
            # slots busy 57 -> 52%) cost more than the skipped ALU work, which ptxas interleaves
            # (bench/results/ncu_kernels-h100-ring_scales_{smem,stalls}_*)
            c, e_n = ring_scales(n, ring_g, lambda l: gram_smem[RING_ROW + l, RING_ROW + l])
            w = [cl * ring_u(l) for l, cl in enumerate(c)]  # the fold weights, [BV] each
            # the state after the ring: its products with X's key and query rows, in registers
            ring_part = token_rows_after_ring(
                wy.times_t(st_smem.at[s], x_smem.at[pl.ds(0, RING_ROW)], interpret), e_n, w,
                gram_cols)
            outs, _, _, us = wy.solve(
                jnp.zeros((), jnp.int32), gates, [], lambda r, cc: gram_smem[r, cc], ring_part,
                lambda j: mg.load(v_smem.at[s, j], VVEC, interpret=interpret).astype(_F32), K,
                x_rows=ROWS)
            for j in range(T):
                o_smem[j] = outs[j].astype(o_smem.dtype)
                u_smem[j] = us[j]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[t.b, :, t.hv, cols])
            # the ring's u are in ru_smem since the tile's loads landed: the fold reads those
            start = jnp.where(n + reserve > W, 0, n)
            plgpu.copy_smem_to_gmem(u_smem, cand_v_ref.at[t.slot, pl.ds(start, R), t.hv, cols])

            @pl.when((n > 0) & (n + reserve > W))
            def _():  # the fold: S_R into the pool, rounded once
                wy.fold_tile(w, e_n, st_smem.at[s], xf_smem,
                             pool_ref.at[t.slot, t.hv, cols, :], first=RING_ROW, layout=WG,
                             interpret=interpret)

        def pad(t):  # a padding row: zero o (it starts uninitialised); no ring to write
            zero = mg.layout_cast(jnp.zeros((BV,), o_smem.dtype), VVEC, interpret=interpret)
            for j in range(T):
                o_smem[j] = zero
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[t.b, :, t.hv, pl.ds(t.iv * BV, BV)])

        loads = wy.Loads(pool_ref, v_ref, k_ref, q_ref, cand_k_ref, cand_v_ref, st_smem, v_smem,
                         xin_smem, ru_smem, ROWS)
        wy.run_tiles(first=first, tiles=PER, stages=ST, block_v=BV, group=group,
                     group_tiles=group * NV, tile=tile, pending=pending, loads=loads,
                     scalars=scalars, build_x=build_x, math=math, pad=pad, bars=bars,
                     pbars=pbars, xbar=xbar, xpbar=xpbar)

    pl.run_scoped(
        body,
        mg.smem_tile((ST, BV, K), pool_ref.dtype, interpret=interpret),
        plgpu.SMEM((wy.ROWS, K), _BF16),
        mg.smem_tile((wy.ROWS, K), _BF16, interpret=interpret),
        mg.smem_tile((wy.ROWS, K), _BF16, interpret=interpret),
        plgpu.SMEM((ST, T, BV), v_ref.dtype),
        plgpu.SMEM((ST, wy.value_rows(W + 1, BV), BV), _F32),
        plgpu.SMEM((T, BV), o_ref.dtype),
        plgpu.SMEM((R, BV), _F32),
        plgpu.SMEM((wy.ROWS, USED), _F32),
        plgpu.Barrier(num_arrivals=2, num_barriers=ST),
        plgpu.Barrier(num_arrivals=1, num_barriers=ST),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
    )


def misfit(dims: cm.Dims, dtypes: cm.Dtypes, config: MosaicConfig,
           reserve: int = 0) -> str | None:
    """None when the kernel takes a ring call of these dims and dtypes, else why not (reserve:
    the ring rows a call writes where more than T, for its SMEM)."""
    bf16 = jnp.dtype(_BF16)
    if dtypes.pool != bf16 or dtypes.tokens != bf16:
        return (f"the Mosaic GPU ring kernel takes a bf16 pool and bf16 tokens (its products run "
                f"on bf16 tensor cores), got {dtypes.pool}, {dtypes.tokens}")
    if dims.T > MAX_T:
        return f"the Mosaic GPU ring kernel takes T <= {MAX_T}, got T = {dims.T}"
    if dims.t_max not in RINGS:
        return (f"the Mosaic GPU ring kernel takes a ring of W in {RINGS} entries (X's rows), "
                f"got W = {dims.t_max}")
    if dims.T * dims.t_max > MAX_T_TIMES_W:
        return (f"the Mosaic GPU ring kernel takes T x W <= {MAX_T_TIMES_W} (an unrolled "
                f"product Mosaic's layout inference can lower), got T = {dims.T}, W = "
                f"{dims.t_max}")
    if dims.V % config.block_v:
        return f"block_v must divide V, got {config.block_v=}, V={dims.V}"
    why = mg.head_dims_misfit(dims.K, dims.V)
    need = smem_bytes(dims, config, reserve)
    if why is None and need > mg.SMEM_BYTES:
        why = (f"{config} needs {need} bytes of SMEM per CTA, more than {mg.SMEM_BYTES}; lower "
               f"stages or block_v")
    return why


def smem_bytes(dims: cm.Dims, config: MosaicConfig, reserve: int = 0) -> int:
    """What one CTA allocates (bf16 pool and tokens; each buffer 1 KiB aligned)."""
    BV, ST, K, T, W = config.block_v, config.stages, dims.K, dims.T, dims.t_max
    rows = wy.ROWS
    buffers = [ST * BV * K * 2, rows * K * 2, rows * K * 2, rows * K * 2, ST * T * BV * 2,
               ST * wy.value_rows(W + 1, BV) * BV * 4, T * BV * 2, max(T, reserve) * BV * 4,
               rows * (x_rows(T).pending + W) * 4, 8 * ST, 8 * ST, 8, 8,
               mg.REDUCTION_SCRATCH_BYTES]
    return mg.aligned_bytes(buffers)


def ring_call(dims: cm.Dims, config: MosaicConfig, reserve: int, interpret: bool, *args):
    """Launch the kernel on (slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v, cand_g,
    pool) -> (o [B, T, HV, V], cand_v, pool), `misfit` checked by the caller."""
    B, T, _, HV, _, V, _, W = dims
    name = (f"gdn_verify_ring{W}_wy_t{T}_mgpu_bv{config.block_v}_t{config.tiles_per_cta}"
            f"_s{config.stages}")
    grid = (pl.cdiv(B * HV * (V // config.block_v), config.tiles_per_cta),)
    body = functools.partial(_body, dims=dims, config=config, reserve=reserve,
                             interpret=interpret)

    def stateful(refs):
        # Issue-bound (ncu, B = 256: 59% of issue slots busy, two one-warpgroup CTAs an SM):
        # the SFU's exp and log, and barriers only where `_body` places them. Both together
        # with `wy.token_rows`'s 8-column groups: 262.9 -> 213.3 us at B = 256, 38.5 -> 35.4
        # at B = 32 (bench/results/ring_mgpu_issue-h200-2026-12-03.json)
        mg.core_map(lambda: body(refs), grid=grid, name=name, interpret=interpret,
                    approx_math=True, auto_barriers=False)

    o = mg.fresh_outputs((B, T, HV, V), args[2].dtype, interpret=interpret)
    *_, cand_v, _, pool, o = pl.run_state(stateful)((*args, o))
    return o, cand_v, pool
