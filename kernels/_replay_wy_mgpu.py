"""GDN replay verify in matrix (WY) form on the tensor cores: the Pallas **Mosaic GPU** kernel that
`verify_mgpu.verify_replay_mgpu` runs for a `MosaicConfig(wy=True)` (bf16 pool, tokens and
candidates; Hopper's wgmma). Same contract as the token-by-token form.

The token-by-token kernel runs count + T steps in series, each a reduction over K and a rank-1
update of the [BV, K] fp32 register tile (2.3x a decode at B = 32). Here the state is touched by
three products on the tensor cores and the rest is per-row algebra on [BV] vectors:

    X    = [candidate keys (rows 0..7); keys (8..15); queries (16..23); 0]  [64, K] raw bf16, SMEM
    PT   = X @ S0^T      each token's product with the state tile, taken as PT^T = S0 @ X[:24]^T
                         [BV, 24] fp32 in registers (bf16 x bf16 is exact in the fp32
                         accumulator; `token_rows` reads its columns as [BV] vectors)
    Gram = X @ X[:24]^T  [64, 24] fp32: the tokens' dot products (l2 norms on the diagonal)

With k_i = rk_i kraw_i, q_t = rq_t qraw_t and G the cumulative log decay from S0 (over the n live
candidates, then the T tokens), forward substitution gives each key's corrected value and each
token's output (`solve`), per state row:

    u_i = beta_i (v_i - e^{G_i} rk_i PT_i - sum_{l<i} e^{G_i - G_l} rk_i rk_l (kraw_i . kraw_l) u_l)
    o_t = rq_t (e^{G_t} PT_{q_t} + sum_{l<=t} e^{G_t - G_l} rk_l (qraw_t . kraw_l) u_l)

and where n > 0 the folded state, the third product (W^T [BV, 64] @ X' accumulated onto
e^{G_n} S0, X' = X with all but the n live candidates' rows zeroed, W split into bf16 high and
low parts: about 16 bits of W, fp32 accumulation):

    S_f = e^{G_n} S0 + sum_{j<n} (e^{G_n - G_j} rk_j u_j) kraw_j^T

The pool takes S_f (rounded once); the caller stores this call's tokens as the new candidates and
sets count := 0, as for `verify_replay_mgpu`.

Per CTA: tiles (b, hv, V block) in runs of `tiles_per_cta` over `stages` SMEM stages, the next
tile's state and values loaded before this tile's math (as `_tokens_mgpu`). X, X' and the Gram
depend only on the key group (b, hv // (HV / H)), whose tiles are consecutive: they are built at
a group's first tile (X lands in a plain staging buffer, since TMA cannot write a few rows of a
tiled one, and is copied into the two tiled operands through registers) and serve its other
tiles (HV / H value heads x V / block_v blocks: 4 for Qwen3.5 at block_v = 64), the next group's
X loads going out as soon as the staging buffer is read. X's rows that no token fills are zeroed
once per CTA: TMA writes only the rows of real tokens.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _recurrence as rec
from ._mgpu import MosaicConfig

_F32, _BF16 = jnp.float32, jnp.bfloat16
GROUP = 8           # X rows per group (candidates, keys, queries): whole SMEM tiles of rows
_ROWS = 64          # X rows: a WGMMA operand's M
_USED = 3 * GROUP   # rows that can hold data: the Gram's columns
MAX_T = GROUP       # the most tokens (and candidates) one call takes


# ------------------------------------------------------------------------------------------------
# The math, as pure functions of scalars and [BV] vectors (also run as plain JAX by the tests)


def solve(n, gates, cand_gates, gram, row, value, K: int, select=None):
    """The corrected values and outputs of the t_max candidates (the first n live) and T tokens.

    n: int32 scalar, the live candidates; gates: T pairs (g, beta) of fp32 scalars, the tokens';
    cand_gates: t_max such pairs of the candidates (g the log decay, gating applied);
    gram(r, c): the dot product of X rows r and c (fp32 scalar); row(r): PT row r, [BV] fp32;
    value(i): key i's value, [BV] fp32 (i < t_max: candidate i; then token i - t_max);
    select(pred, x): x where the scalar pred holds, else zeros (default jnp.where).
    Returns (o: T [BV] fp32 outputs, w: t_max [BV] fp32 fold weights e^{G_n - G_j} rk_j u_j (0
    for a dead candidate), e^{G_n}: the candidates' total decay, an fp32 scalar, u: the T
    tokens' [BV] fp32 corrected values).

    The decays e^{G_i - G_l} are running products of the keys' e^{g} (one exp per key, no
    overflow: every factor is <= 1); a dead candidate enters with g = beta = 0.
    """
    select = select or (lambda pred, x: jnp.where(pred, x, 0.0))
    t_max, T = len(cand_gates), len(gates)
    rows = [j for j in range(t_max)] + [GROUP + t for t in range(T)]
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
            qr = 2 * GROUP + i - t_max
            rq = lax.rsqrt(gram(qr, qr) + rec.L2NORM_EPS) * K ** -0.5
            o = e0 * row(qr)
            for l, x in enumerate(pair + [jnp.ones((), _F32)]):
                o = o + coef(l, x * rk[l] * gram(qr, rows[l])) * us[l]
            outs.append(rq * o)
    return outs, w, e_n, us[t_max:]


# ------------------------------------------------------------------------------------------------
# The kernel


def _body(refs, *, dims: cm.Dims, config: MosaicConfig, interpret: bool):
    (slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref, cand_k_ref,
     cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref, o_ref) = refs
    # pool_ref [N, HV, V, K] written in place; o_ref [B, T, HV, V] uninitialised in
    B, T, H, HV, K, V, N, t_max = dims
    BV, ST, PER = config.block_v, config.stages, config.tiles_per_cta
    NV = V // BV
    total = B * HV * NV
    group = HV // H
    KG = group * NV  # consecutive tiles of one key group (b, hk): one X, X' and Gram
    plgpu = mg.plgpu
    # S0 and the products in WGMMA layout; [BV] vectors (rows of PT, values, outputs) in its
    # reduce(1), broadcast along K
    WG = None if interpret else plgpu.Layout.WGMMA
    VVEC = None if interpret else WG.reduce(1)

    tile = functools.partial(cm.Tile.at, slots_ref=slots_ref, HV=HV, NV=NV, total=total,
                             num_slots=N)
    pending = functools.partial(cm.tile_pending, count_ref, t_max=t_max, num_slots=N)

    def body(st_smem, xin_smem, x_smem, xf_smem, v_smem, cv_smem, o_smem, gram_smem, bars,
             pbars, xbar, xpbar):
        # st_smem [ST, BV, K] pool tiles; xin_smem [64, K] X as loaded (plain); x_smem and
        # xf_smem [64, K] the wgmma operands X and X' (tiled), built once per key group;
        # v_smem [ST, T, BV]; cv_smem [ST, > t_max, BV] the candidates' values (row t_max stays
        # zero); o_smem [T, BV]; gram_smem [64, 24] fp32: the Gram, read back as scalars
        first = lax.axis_index("cta") * PER
        xin_smem[...] = jnp.zeros((_ROWS, K), _BF16)  # rows no load fills: finite products
        for s in range(ST):
            cv_smem[s] = jnp.zeros(cv_smem.shape[1:], cv_smem.dtype)
        plgpu.commit_smem()

        def issue(i):  # tile i's own loads: its state tile and values
            b, hv, iv, slot, _, live = tile(first + i)
            s, cols = i % ST, pl.ds(iv * BV, BV)

            @pl.when(live)
            def _():
                plgpu.copy_gmem_to_smem(pool_ref.at[slot, hv, cols, :], st_smem.at[s], bars.at[s])
                plgpu.copy_gmem_to_smem(v_ref.at[b, :, hv, cols], v_smem.at[s], bars.at[s])

            @pl.when(pending(slot, live) > 0)
            def _():
                plgpu.copy_gmem_to_smem(cand_v_ref.at[slot, :, hv, cols],
                                        cv_smem.at[s, pl.ds(0, t_max)], pbars.at[s])

        def issue_x(i):  # the key group of tile i: its X rows (keys, queries, candidate keys)
            b, hv, _, slot, _, live = tile(first + i)
            hk = hv // group

            @pl.when(live)
            def _():
                plgpu.copy_gmem_to_smem(k_ref.at[b, :, hk, :], xin_smem.at[pl.ds(GROUP, T)],
                                        xbar.at[0])
                plgpu.copy_gmem_to_smem(q_ref.at[b, :, hk, :], xin_smem.at[pl.ds(2 * GROUP, T)],
                                        xbar.at[0])

            @pl.when(pending(slot, live) > 0)
            def _():
                plgpu.copy_gmem_to_smem(cand_k_ref.at[slot, :, hk, :],
                                        xin_smem.at[pl.ds(0, t_max)], xpbar.at[0])

        issue_x(0)
        for i in range(min(ST - 1, PER)):
            issue(i)

        @pl.loop(0, PER)
        def _(i):
            b, hv, iv, slot, in_range, live = tile(first + i)
            s, cols = i % ST, pl.ds(iv * BV, BV)
            # the first tile of the run or of a key group: X, X' and the Gram are built anew
            offset = (first + i) % KG
            fresh = (i == 0) | (offset == 0)
            # tile i - 1's stores have read their SMEM and every thread is done with it: its
            # stage takes tile i + ST - 1's loads, o_smem this tile's, and (at a
            # group's first tile) x_smem, xf_smem and gram_smem the new group's
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()
            if PER > ST - 1:
                @pl.when(i + ST - 1 < PER)
                def _():
                    issue(i + ST - 1)

            # scalars first: their GMEM latency overlaps the TMA wait
            gates = [rec.gates(a_ref[b, t, hv].astype(_F32), b_ref[b, t, hv].astype(_F32),
                               A_log_ref[hv].astype(_F32), dt_bias_ref[hv].astype(_F32),
                               log1p=rec.log1p_kahan) for t in range(T)]
            n = pending(slot, live)
            cslot = jnp.clip(slot, 0, N - 1)
            cand_gates = [(cand_g_ref[cslot, j, hv].astype(_F32),
                           cand_beta_ref[cslot, j, hv].astype(_F32)) for j in range(t_max)]

            @pl.when(fresh)
            def _():
                @pl.when(live)
                def _():
                    plgpu.barrier_wait(xbar.at[0])

                    @pl.when(n > 0)
                    def _():
                        plgpu.barrier_wait(xpbar.at[0])

                    # X: the dead candidates' rows zeroed (their data may be anything); X',
                    # the fold's: only the live candidates' keys (this call's tokens and the
                    # dead candidates meet zero columns of W^T, and 0 * NaN would be NaN)
                    X = mg.layout_cast(xin_smem[...], WG, interpret=interpret)
                    rows = lax.broadcasted_iota(jnp.int32, X.shape, 0)
                    zero = jnp.zeros_like(X)
                    x_smem[...] = jnp.where((rows < n) | (rows >= GROUP), X, zero)
                    xf_smem[...] = jnp.where(rows < n, X, zero)
                    plgpu.commit_smem()
                    mg.store_plain(times_t(x_smem, x_smem.at[pl.ds(0, _USED)], interpret),
                                   gram_smem, interpret=interpret)

                # xin is free: the next key group's loads go out now
                following = i + KG - offset
                if PER > 1:
                    @pl.when(following < PER)
                    def _():
                        issue_x(following)

            @pl.when(live)
            def _():
                plgpu.barrier_wait(bars.at[s])

                @pl.when(n > 0)
                def _():
                    plgpu.barrier_wait(pbars.at[s])

                row = token_rows(times_t(st_smem.at[s], x_smem.at[pl.ds(0, _USED)], interpret))

                def value(i):
                    # a dead candidate reads the value buffer's zero row (row t_max)
                    ref = (cv_smem.at[s, jnp.where(i < n, i, t_max)] if i < t_max
                           else v_smem.at[s, i - t_max])
                    return mg.load(ref, VVEC, interpret=interpret).astype(_F32)

                outs, w, e_n, _ = solve(n, gates, cand_gates, lambda r, c: gram_smem[r, c], row,
                                     value, K, select=zeros_already)
                for t, o in enumerate(outs):
                    o_smem[t] = o.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, :, hv, cols])

                @pl.when(n > 0)
                def _():
                    WT = columns(w, (BV, _ROWS), WG, interpret)
                    hi = WT.astype(_BF16)
                    lo = (WT - hi.astype(_F32)).astype(_BF16)
                    S0 = mg.layout_cast(st_smem[s], WG, interpret=interpret).astype(_F32)
                    S = accumulate(e_n * S0, (hi, lo), xf_smem, interpret)
                    st_smem[s] = S.astype(st_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(st_smem.at[s], pool_ref.at[slot, hv, cols, :])

            @pl.when(in_range & jnp.logical_not(live))
            def _():  # a padding row: zero o (o starts uninitialised)
                zero = mg.layout_cast(jnp.zeros((BV,), _F32), VVEC, interpret=interpret)
                for t in range(T):
                    o_smem[t] = zero.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, :, hv, cols])

        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        mg.smem_tile((ST, BV, K), pool_ref.dtype, interpret=interpret),
        plgpu.SMEM((_ROWS, K), _BF16),
        mg.smem_tile((_ROWS, K), _BF16, interpret=interpret),
        mg.smem_tile((_ROWS, K), _BF16, interpret=interpret),
        plgpu.SMEM((ST, T, BV), v_ref.dtype),
        plgpu.SMEM((ST, value_rows(t_max + 1, BV), BV), cand_v_ref.dtype),
        plgpu.SMEM((T, BV), o_ref.dtype),
        plgpu.SMEM((_ROWS, _USED), _F32),
        plgpu.Barrier(num_arrivals=2, num_barriers=ST),
        plgpu.Barrier(num_arrivals=1, num_barriers=ST),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
    )


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


def token_rows(PTT):
    """PT^T = S0 @ X[:n]^T [BV, n] fp32 (in registers) -> row(r): X row r's product with the
    state, [BV] fp32, its column r taken by a masked sum along the row (in the WGMMA layout's
    reduce(1), the [BV] vectors' layout): no trip through SMEM. H200, ring verify at B = 32:
    one third faster than X @ S0^T staged through an SMEM buffer and read back as rows
    (bench/results/sweep_ring_mgpu_smem_pt-h200-2026-12-03.log)."""
    col = lax.broadcasted_iota(jnp.int32, PTT.shape, 1)
    return lambda r: jnp.sum(jnp.where(col == r, PTT, jnp.zeros_like(PTT)), axis=1)


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


def misfit(dims: cm.Dims, dtypes: cm.Dtypes, config: MosaicConfig) -> str | None:
    """None when the WY form takes a replay call of these dims and dtypes, else why not."""
    if not all(d == jnp.dtype(_BF16) for d in dtypes):
        return (f"the WY form of replay takes a bf16 pool, tokens and candidates (its products "
                f"run on bf16 tensor cores), got {dtypes.pool}, {dtypes.tokens}, "
                f"{dtypes.candidates}")
    if max(dims.T, dims.t_max) > MAX_T:
        return (f"the WY form of replay takes T and T_max <= {MAX_T}, got T = {dims.T}, "
                f"T_max = {dims.t_max}")
    if dims.V % config.block_v:
        return f"block_v must divide V, got {config.block_v=}, V={dims.V}"
    why = mg.head_dims_misfit(dims.K, dims.V)
    if why is None and smem_bytes(dims, config) > mg.SMEM_BYTES:
        why = (f"{config} needs {smem_bytes(dims, config)} bytes of SMEM per CTA, more than "
               f"{mg.SMEM_BYTES}; lower stages or block_v")
    return why


def smem_bytes(dims: cm.Dims, config: MosaicConfig) -> int:
    """What one CTA allocates (2-byte pool, tokens and candidates; each buffer 1 KiB aligned)."""
    BV, ST, K = config.block_v, config.stages, dims.K
    buffers = [ST * BV * K * 2, _ROWS * K * 2, _ROWS * K * 2, _ROWS * K * 2,
               ST * dims.T * BV * 2, ST * value_rows(dims.t_max + 1, BV) * BV * 2,
               dims.T * BV * 2, _ROWS * _USED * 4,
               8 * ST, 8 * ST, 8, 8, mg.REDUCTION_SCRATCH_BYTES]
    return sum(-(-n // mg.SMEM_ALIGNMENT) * mg.SMEM_ALIGNMENT for n in buffers)


def replay_call(dims: cm.Dims, config: MosaicConfig, interpret: bool, *args):
    """Launch the kernel on (slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v, cand_g,
    cand_beta, pool) -> (o [B, T, HV, V], pool), `misfit` checked by the caller."""
    B, T, _, HV, _, V, _, _ = dims
    name = (f"gdn_verify_replay_wy_t{T}_mgpu_bv{config.block_v}_t{config.tiles_per_cta}"
            f"_s{config.stages}")
    grid = (pl.cdiv(B * HV * (V // config.block_v), config.tiles_per_cta),)
    body = functools.partial(_body, dims=dims, config=config, interpret=interpret)

    def stateful(refs):
        mg.core_map(lambda: body(refs), grid=grid, name=name, interpret=interpret)

    o = mg.fresh_outputs((B, T, HV, V), args[2].dtype, interpret=interpret)
    *_, pool, o = pl.run_state(stateful)((*args, o))
    return o, pool
