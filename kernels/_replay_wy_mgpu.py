"""GDN replay verify in matrix (WY) form on the tensor cores: the Pallas **Mosaic GPU** kernel that
`verify_mgpu.verify_replay_mgpu` runs for a `MosaicConfig(wy=True)` (bf16 pool, tokens and
candidates; Hopper's wgmma). Same contract as the token-by-token form.

The token-by-token kernel runs count + T steps in series, each a reduction over K and a rank-1
update of the [BV, K] fp32 register tile (2.3x a decode at B = 32). Here the state is touched by
three products on the tensor cores and the rest is per-row algebra on [BV] vectors:

    X    = [candidate keys (rows 0..7); keys (8..15); queries (16..23); 0]  [64, K] raw bf16, SMEM
    PT   = X @ S0^T      [64, BV] fp32: each token's product with the state tile (bf16 x bf16 is
                         exact in the fp32 accumulator), staged through SMEM and read back as
                         [BV] rows. Ring mode takes PT^T in registers instead (`token_rows`);
                         here that measured slower (H200, 3 pending + T = 4: 51.3 / 380.0 us
                         at B = 32 / 256 against 45.3 / 333.7 staged,
                         bench/results/replay_wy_pt-h200-2026-12-03.json)
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

The algebra (`_wy_mgpu.solve`), the products and the pipeline over a CTA's tiles are shared with
ring mode's kernel (`_wy_mgpu`); a key group serves HV / H value heads x V / block_v blocks (4
tiles for Qwen3.5 at block_v = 64). X's rows that no token fills are zeroed once per CTA: TMA
writes only the rows of real tokens.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _wy_mgpu as wy
from ._mgpu import MosaicConfig

_F32, _BF16 = jnp.float32, jnp.bfloat16


def _body(refs, *, dims: cm.Dims, config: MosaicConfig, interpret: bool):
    (slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref, cand_k_ref,
     cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref, o_ref) = refs
    # pool_ref [N, HV, V, K] written in place; o_ref [B, T, HV, V] uninitialised in
    B, T, H, HV, K, V, N, t_max = dims
    BV, ST, PER = config.block_v, config.stages, config.tiles_per_cta
    NV = V // BV
    group = HV // H
    plgpu = mg.plgpu
    # S0 and the products in WGMMA layout; [BV] vectors (rows of PT, values, outputs) in its
    # reduce(1), broadcast along K
    WG = None if interpret else plgpu.Layout.WGMMA
    VVEC = None if interpret else WG.reduce(1)

    tile = functools.partial(cm.Tile.at, slots_ref=slots_ref, HV=HV, NV=NV, total=B * HV * NV,
                             num_slots=N)
    pending = functools.partial(cm.tile_pending, count_ref, t_max=t_max, num_slots=N)

    def body(st_smem, xin_smem, x_smem, xf_smem, v_smem, cv_smem, o_smem, pt_smem, gram_smem,
             bars, pbars, xbar, xpbar):
        # st_smem [ST, BV, K] pool tiles; xin_smem [64, K] X as loaded (plain); x_smem and
        # xf_smem [64, K] the wgmma operands X and X' (tiled), built once per key group;
        # v_smem [ST, T, BV]; cv_smem [ST, > t_max, BV] the candidates' values (row t_max stays
        # zero); o_smem [T, BV]; pt_smem [64, BV] and gram_smem [64, 24] fp32: PT, read back
        # as rows, and the Gram, read back as scalars
        first = lax.axis_index("cta") * PER
        xin_smem[...] = jnp.zeros((wy.ROWS, K), _BF16)  # rows no load fills: finite products
        for s in range(ST):
            cv_smem[s] = jnp.zeros(cv_smem.shape[1:], cv_smem.dtype)
        plgpu.commit_smem()

        def scalars(t):
            gates = cm.token_gates(a_ref, b_ref, A_log_ref, dt_bias_ref, t.b, t.hv, T)
            cslot = jnp.clip(t.slot, 0, N - 1)
            cand_gates = [(cand_g_ref[cslot, j, t.hv].astype(_F32),
                           cand_beta_ref[cslot, j, t.hv].astype(_F32)) for j in range(t_max)]
            return gates, cand_gates

        def build_x(n):
            # X: the dead candidates' rows zeroed (their data may be anything); X', the fold's:
            # only the live candidates' keys (this call's tokens and the dead candidates meet
            # zero columns of W^T, and 0 * NaN would be NaN)
            X = mg.layout_cast(xin_smem[...], WG, interpret=interpret)
            rows = lax.broadcasted_iota(jnp.int32, X.shape, 0)
            zero = jnp.zeros_like(X)
            x_smem[...] = jnp.where((rows < n) | (rows >= wy.GROUP), X, zero)
            xf_smem[...] = jnp.where(rows < n, X, zero)
            plgpu.commit_smem()
            mg.store_plain(wy.times_t(x_smem, x_smem.at[pl.ds(0, wy.TOKEN_ROWS)], interpret),
                           gram_smem, interpret=interpret)
            plgpu.commit_smem()  # every thread reads the Gram's scalars

        def math(t, s, n, values):
            gates, cand_gates = values
            cols = pl.ds(t.iv * BV, BV)
            # pt_smem is free: every thread passed run_tiles's barrier at this tile's start
            mg.store_plain(wy.times_t(x_smem, st_smem.at[s], interpret), pt_smem,
                           interpret=interpret)
            plgpu.commit_smem()
            row = lambda r: mg.load(pt_smem.at[r], VVEC, interpret=interpret)  # noqa: E731

            def value(i):
                # a dead candidate reads the value buffer's zero row (row t_max)
                ref = (cv_smem.at[s, jnp.where(i < n, i, t_max)] if i < t_max
                       else v_smem.at[s, i - t_max])
                return mg.load(ref, VVEC, interpret=interpret).astype(_F32)

            outs, w, e_n, _ = wy.solve(n, gates, cand_gates, lambda r, c: gram_smem[r, c], row,
                                       value, K, select=wy.zeros_already)
            for j, o in enumerate(outs):
                o_smem[j] = o.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[t.b, :, t.hv, cols])

            @pl.when(n > 0)
            def _():
                wy.fold_tile(w, e_n, st_smem.at[s], xf_smem,
                             pool_ref.at[t.slot, t.hv, cols, :], first=0, layout=WG,
                             interpret=interpret)

        def pad(t):  # a padding row: zero o (o starts uninitialised)
            zero = mg.layout_cast(jnp.zeros((BV,), _F32), VVEC, interpret=interpret)
            for j in range(T):
                o_smem[j] = zero.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[t.b, :, t.hv, pl.ds(t.iv * BV, BV)])

        loads = wy.Loads(pool_ref, v_ref, k_ref, q_ref, cand_k_ref, cand_v_ref, st_smem, v_smem,
                         xin_smem, cv_smem, wy.REPLAY_ROWS)
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
        plgpu.SMEM((ST, wy.value_rows(t_max + 1, BV), BV), cand_v_ref.dtype),
        plgpu.SMEM((T, BV), o_ref.dtype),
        plgpu.SMEM((wy.ROWS, BV), _F32),
        plgpu.SMEM((wy.ROWS, wy.TOKEN_ROWS), _F32),
        plgpu.Barrier(num_arrivals=2, num_barriers=ST),
        plgpu.Barrier(num_arrivals=1, num_barriers=ST),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
    )


def misfit(dims: cm.Dims, dtypes: cm.Dtypes, config: MosaicConfig) -> str | None:
    """None when the WY form takes a replay call of these dims and dtypes, else why not."""
    if not all(d == jnp.dtype(_BF16) for d in dtypes):
        return (f"the WY form of replay takes a bf16 pool, tokens and candidates (its products "
                f"run on bf16 tensor cores), got {dtypes.pool}, {dtypes.tokens}, "
                f"{dtypes.candidates}")
    if max(dims.T, dims.t_max) > wy.MAX_T:
        return (f"the WY form of replay takes T and T_max <= {wy.MAX_T}, got T = {dims.T}, "
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
    buffers = [ST * BV * K * 2, wy.ROWS * K * 2, wy.ROWS * K * 2, wy.ROWS * K * 2,
               ST * dims.T * BV * 2, ST * wy.value_rows(dims.t_max + 1, BV) * BV * 2,
               dims.T * BV * 2, wy.ROWS * BV * 4, wy.ROWS * wy.TOKEN_ROWS * 4,
               8 * ST, 8 * ST, 8, 8, mg.REDUCTION_SCRATCH_BYTES]
    return mg.aligned_bytes(buffers)


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
