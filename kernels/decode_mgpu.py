"""GDN decode as a Pallas **Mosaic GPU** kernel (Hopper and later): the state staged through SMEM
by TMA, pipelined across the tiles a CTA walks through. Same contract as `decode.decode`.

kernel body `_tokens_body` -> launcher `tokens_call` -> public `decode_mgpu` (jitted, pool
donated). `verify_mgpu` runs the same body with T tokens: mode "replay" (the folded state goes
back to the pool) and mode "intermediate" (the pool is only read; the state after every token
goes to a new buffer inter [B, T, HV, V, K] through a ring of SMEM tiles).

Work split: a tile is (b, hv, iv), the state rows pool[slot, hv, iv*BV:(iv+1)*BV, :] ([BV, K], K
contiguous). The B * HV * (V // BV) tiles, in that order, are dealt out in runs of
`tiles_per_cta` to a 1-D grid of CTAs (one warpgroup each). A CTA keeps `stages` SMEM buffers
and issues tile i + stages - 1's loads into the stage of tile i - 1: verify before tile i's math
(replay's folded-state store from that stage was drained at the end of tile i - 1), decode
after it (its state store leaves from the stage at the end of the tile, so with 2 stages the
overlap comes from the other CTAs on the SM). Per tile:

    TMA  pool tile, q, k (key head hv // group), v block -> SMEM stage s (one barrier, 4
         arrivals); where count[slot] > 0 also the slot's t_max candidate k, v rows (a second
         barrier, 2 arrivals), so the fold reads SMEM
    regs S = SMEM tile in fp32 (WGMMA layout: [BV, K], BV a multiple of 64); fold the slot's
         pending candidates; per token S = exp(g) S; S += (beta (v - S k)) k^T; o = S q
    SMEM S (rounded once to the pool's dtype), o -> TMA store to pool[slot] and o[b]

A padding row (slot < 0 or >= num_slots) issues no load; decode and replay store nothing for it
(their output buffer starts zeroed); intermediate, whose outputs start uninitialised (a zeroed
inter buffer would cost a memset as large as the states it holds), stores zero o and inter
tiles. Everything version-specific is in `_mgpu.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _recurrence as rec
from ._mgpu import MosaicConfig

_F32 = jnp.float32


def _layouts():
    L = mg.plgpu.Layout
    # S [BV, K] in WGMMA; a K-vector broadcasts along rows (reduce(0)), a V-vector along
    # columns (reduce(1)).
    return L.WGMMA, L.WGMMA.reduce(0), L.WGMMA.reduce(1)


def _tokens_body(refs, *, dims: cm.Dims, config: MosaicConfig, interpret: bool, mode: str):
    """The pipelined per-CTA body of decode (mode "decode", T = 1: the state after the token
    is stored), replay verify ("replay": the folded state is stored, before the T tokens, and
    only where something was folded) and intermediate verify ("intermediate": the pool is only
    read; every S_t goes to inter)."""
    (slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref, cand_k_ref,
     cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref, o_ref, *inter) = refs
    # GMEM refs. pool_ref: [N, HV, V, K] (written in place, except in intermediate mode);
    # o_ref: [B, T, HV, V] (zeros in, except in intermediate mode); inter: [B, T, HV, V, K]
    inter_ref = inter[0] if mode == "intermediate" else None
    B, T, H, HV, K, V, N, t_max = dims
    BV, ST, PER = config.block_v, config.stages, config.tiles_per_cta
    NB = store_ring(mode, config, dims, pool_ref.dtype, o_ref.dtype,
                    _cand_dtype(cand_k_ref, cand_v_ref))
    NV = V // BV
    total = B * HV * NV
    group = HV // H
    WG, KVEC, VVEC = _layouts() if not interpret else (None, None, None)
    plgpu = mg.plgpu

    def tile(w):
        """Tile w -> (b, hv, iv, slot, in_range, live): live = a real tile of a real row."""
        in_range = w < total
        w = jnp.where(in_range, w, 0)  # the last CTA's run may overshoot: read nothing there
        b, rest = w // (HV * NV), w % (HV * NV)
        hv, iv = rest // NV, rest % NV
        slot = slots_ref[b].astype(jnp.int32)
        live = in_range & (slot >= 0) & (slot < N)
        return b, hv, iv, slot, in_range, live

    def pending(slot, live):
        """How many of the slot's candidates are pending (0 for a padding row)."""
        return jnp.where(live, jnp.clip(count_ref[jnp.clip(slot, 0, N - 1)], 0, t_max), 0)

    def body(st_smem, q_smem, k_smem, v_smem, ck_smem, cv_smem, o_smem, bars, pbars, *ring):
        # st_smem [ST, BV, K] pool dtype; q_smem, k_smem [ST, T, K]; v_smem [ST, T, BV];
        # ck_smem [ST, t_max, K], cv_smem [ST, t_max, BV]: the slot's pending candidates;
        # o_smem [T, BV]; ring (intermediate): [NB, BV, K] pool dtype, staging the S_t stores
        first = lax.axis_index("cta") * PER

        def issue(i):
            """Start the TMA loads of this CTA's tile i into stage i % ST (if it is live)."""
            b, hv, iv, slot, _, live = tile(first + i)
            s, hk, cols = i % ST, hv // group, pl.ds(iv * BV, BV)

            @pl.when(live)
            def _():
                bar = bars.at[s]
                plgpu.copy_gmem_to_smem(pool_ref.at[slot, hv, cols, :], st_smem.at[s], bar)
                plgpu.copy_gmem_to_smem(q_ref.at[b, :, hk, :], q_smem.at[s], bar)
                plgpu.copy_gmem_to_smem(k_ref.at[b, :, hk, :], k_smem.at[s], bar)
                plgpu.copy_gmem_to_smem(v_ref.at[b, :, hv, cols], v_smem.at[s], bar)

            # The pending candidates too (all t_max rows: a TMA box has a static shape), so
            # the fold reads SMEM instead of waiting on GMEM at every step.
            @pl.when(pending(slot, live) > 0)
            def _():
                bar = pbars.at[s]
                plgpu.copy_gmem_to_smem(cand_k_ref.at[slot, :, hk, :], ck_smem.at[s], bar)
                plgpu.copy_gmem_to_smem(cand_v_ref.at[slot, :, hv, cols], cv_smem.at[s], bar)

        def store_state(i, t, S, b, hv, cols):
            """inter[b, t, hv, cols] := S through ring buffer (i T + t) % NB. Stores leave in
            ring order, so NB - 1 later stores (o's as well) mean this buffer's last one has
            read its SMEM: wait for that, not for all."""
            buf = (i * T + t) % NB
            plgpu.wait_smem_to_gmem(NB - 1, wait_read_only=True)
            ring[0][buf] = S.astype(ring[0].dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ring[0].at[buf], inter_ref.at[b, t, hv, cols, :])

        def store_outputs(outs, b, hv, cols, wait, state=None):
            """o[b, :, hv, cols] := outs (after `state` = (SMEM tile, pool tile), if given).
            The last o store must have read o_smem: `wait` stores were issued after it in this
            tile (None: the caller has waited)."""
            if wait is not None:
                plgpu.wait_smem_to_gmem(wait, wait_read_only=True)
            for t, o in enumerate(outs):
                o_smem[t] = o.astype(o_smem.dtype)
            plgpu.commit_smem()
            if state is not None:
                plgpu.copy_smem_to_gmem(*state)
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, :, hv, cols])

        for i in range(min(ST - 1, PER)):  # prologue: the first ST - 1 tiles in flight
            issue(i)

        def issue_ahead(i):
            if PER > ST - 1:
                @pl.when(i + ST - 1 < PER)
                def _():
                    issue(i + ST - 1)

        @pl.loop(0, PER)
        def _(i):
            b, hv, iv, slot, in_range, live = tile(first + i)
            s, hk, cols = i % ST, hv // group, pl.ds(iv * BV, BV)
            if mode != "decode":
                # Verify: the loads of tile i + ST - 1 go out before this tile's math, into the
                # stage of tile i - 1, which no store reads any more (replay's folded-state store
                # from it was drained before tile i - 1's o store).
                issue_ahead(i)

            # Scalars first: their GMEM latency overlaps the TMA wait below.
            gates = [rec.gates(a_ref[b, t, hv].astype(_F32), b_ref[b, t, hv].astype(_F32),
                               A_log_ref[hv].astype(_F32), dt_bias_ref[hv].astype(_F32),
                               log1p=rec.log1p_kahan) for t in range(T)]
            n = pending(slot, live)

            def gate(t):  # candidate t's gate and beta (fp32, already applied), clipped index
                t = jnp.minimum(t, t_max - 1)
                return (cand_g_ref[slot, t, hv].astype(_F32),
                        cand_beta_ref[slot, t, hv].astype(_F32))

            @pl.when(live)
            def _():
                plgpu.barrier_wait(bars.at[s])
                S = mg.layout_cast(st_smem[s], WG, interpret=interpret).astype(_F32)

                @pl.when(n > 0)
                def _():
                    plgpu.barrier_wait(pbars.at[s])

                def fold(t, carry):  # the slot's pending (accepted) candidates, no output
                    S, g, beta = carry
                    nxt = gate(t + 1)  # loaded a step ahead: off the update's critical path
                    ck = mg.load(ck_smem.at[s, t], KVEC, interpret=interpret)
                    cv = mg.load(cv_smem.at[s, t], VVEC, interpret=interpret)
                    S = rec.update(S, rec.l2norm(ck.astype(_F32)), cv.astype(_F32), g, beta)
                    return (S, *nxt)

                S, _, _ = lax.fori_loop(0, n, fold, (S, *gate(0)))
                if mode == "replay":
                    @pl.when(n > 0)  # nothing folded: the pool already holds S exactly
                    def _():
                        st_smem[s] = S.astype(st_smem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(st_smem.at[s], pool_ref.at[slot, hv, cols, :])

                outs = []
                for t in range(T):
                    q = rec.prepare_q(
                        mg.load(q_smem.at[s, t], KVEC, interpret=interpret).astype(_F32))
                    k = rec.l2norm(mg.load(k_smem.at[s, t], KVEC, interpret=interpret)
                                   .astype(_F32))
                    v = mg.load(v_smem.at[s, t], VVEC, interpret=interpret).astype(_F32)
                    S = rec.update(S, k, v, *gates[t])
                    outs.append(rec.readout(S, q))
                    if mode == "intermediate":
                        store_state(i, t, S, b, hv, cols)
                if mode == "decode":  # one wait (after the math) frees the stage and o_smem
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    st_smem[s] = S.astype(st_smem.dtype)
                    store_outputs(outs, b, hv, cols, wait=None,
                                  state=(st_smem.at[s], pool_ref.at[slot, hv, cols, :]))
                elif mode == "replay":  # all stores drained: tile i - 1's o store, and this
                    # tile's folded-state store (issued before the token math, so long done)
                    store_outputs(outs, b, hv, cols, wait=0)
                else:  # intermediate: T ring stores since tile i - 1's o store
                    store_outputs(outs, b, hv, cols, wait=T)

            if mode == "intermediate":
                @pl.when(in_range & jnp.logical_not(live))
                def _():  # a padding row: zero o and inter (the buffers start uninitialised)
                    zero = mg.layout_cast(jnp.zeros((BV, K), _F32), WG, interpret=interpret)
                    for t in range(T):
                        store_state(i, t, zero, b, hv, cols)
                    vzero = mg.layout_cast(jnp.zeros((BV,), _F32), VVEC, interpret=interpret)
                    store_outputs([vzero] * T, b, hv, cols, wait=T)
            if mode == "decode":
                # Decode stores the state from its stage after the math: the next loads go out
                # after it (other CTAs on the SM overlap them), into the stage of tile i - 1,
                # whose stores the wait before this tile's own stores has drained.
                @pl.when(jnp.logical_not(live))
                def _():  # keep that invariant on padding tiles too
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                issue_ahead(i)

        plgpu.wait_smem_to_gmem(0)

    pool_dtype, in_dtype = pool_ref.dtype, o_ref.dtype
    ring = ([mg.smem_tile((NB, BV, K), pool_dtype, interpret=interpret)]
            if mode == "intermediate" else [])
    pl.run_scoped(
        body,
        mg.smem_tile((ST, BV, K), pool_dtype, interpret=interpret),
        mg.plgpu.SMEM((ST, T, K), q_ref.dtype),
        mg.plgpu.SMEM((ST, T, K), k_ref.dtype),
        mg.plgpu.SMEM((ST, T, BV), v_ref.dtype),
        mg.plgpu.SMEM((ST, t_max, K), cand_k_ref.dtype),
        mg.plgpu.SMEM((ST, t_max, BV), cand_v_ref.dtype),
        mg.plgpu.SMEM((T, BV), in_dtype),
        mg.plgpu.Barrier(num_arrivals=4, num_barriers=ST),
        mg.plgpu.Barrier(num_arrivals=2, num_barriers=ST),
        *ring,
    )


def _cand_dtype(cand_k, cand_v):
    """The wider of the candidates' dtypes: what sizes their SMEM stages."""
    return max(jnp.dtype(cand_k.dtype), jnp.dtype(cand_v.dtype), key=lambda d: d.itemsize)


def store_ring(mode: str, config: MosaicConfig, dims: cm.Dims, pool_dtype, in_dtype,
               cand_dtype) -> int:
    """SMEM tiles staging intermediate mode's S_t stores (0 in the other modes): as many as fit
    beside the load stages, up to min(T, 4) (more stores in flight before one must drain)."""
    if mode != "intermediate":
        return 0
    fits = [n for n in range(1, min(dims.T, 4) + 1)
            if config.smem_bytes(dims.K, pool_dtype, in_dtype, dims.T, out_tiles=n,
                                 pending=dims.t_max, cand_dtype=cand_dtype) <= mg.SMEM_BYTES]
    return max(fits, default=1)  # 1 not fitting is caught by check_config


def check_config(op: str, mode: str, config: MosaicConfig, dims: cm.Dims, q, pool, cand_k,
                 cand_v) -> None:
    """The head dims `config` can tile and the SMEM one CTA needs for this call (trace time)."""
    cand = _cand_dtype(cand_k, cand_v)
    ring = store_ring(mode, config, dims, pool.dtype, q.dtype, cand)
    config.check_shapes(op, dims.K, dims.V, pool.dtype, q.dtype, T=dims.T, out_tiles=ring,
                        pending=dims.t_max, cand_dtype=cand)


def tokens_call(mode: str, dims: cm.Dims, config: MosaicConfig, interpret: bool, *args):
    """Launch `_tokens_body` on (slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v,
    cand_g, cand_beta, pool) -> (o [B, T, HV, V], pool), or (o, inter [B, T, HV, V, K]) in
    intermediate mode."""
    B, T, _, HV, K, V, _, _ = dims
    q, pool = args[2], args[-1]
    kind = "decode" if mode == "decode" else f"verify_{mode}_t{T}"
    name = f"gdn_{kind}_mgpu_bv{config.block_v}_t{config.tiles_per_cta}_s{config.stages}"
    grid = (pl.cdiv(B * HV * (V // config.block_v), config.tiles_per_cta),)
    body = functools.partial(_tokens_body, dims=dims, config=config, interpret=interpret,
                             mode=mode)
    o = jax.ShapeDtypeStruct((B, T, HV, V), q.dtype)
    if mode == "intermediate":  # the pool is only read: plain inputs, uninitialised outputs
        inter = jax.ShapeDtypeStruct((B, T, HV, V, K), pool.dtype)
        return mg.kernel(lambda *refs: body(refs), out_type=(o, inter), grid=grid, name=name,
                         interpret=interpret)(*args)

    def stateful(refs):  # the arrays as GMEM refs: the pool is written in place
        mg.core_map(lambda: body(refs), grid=grid, name=name, interpret=interpret)

    *_, pool, o = pl.run_state(stateful)((*args, jnp.zeros(o.shape, o.dtype)))
    return o, pool


@functools.partial(jax.jit, static_argnames=("block_v", "tiles_per_cta", "stages", "interpret"),
                   donate_argnames=("pool",))
def decode_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count,
                slots, *, block_v: int = 64, tiles_per_cta: int = 4, stages: int = 2,
                interpret: bool = False):
    """One GDN decode step per row, in place on the slot's state (Pallas, Mosaic GPU lowering).

    Arguments, semantics and results as `gdn_jax.kernels.decode` (the Triton kernel):
      q, k:      [B, 1, H, K] bf16 | fp16 | fp32, raw (l2norm and the K**-0.5 scale are fused).
      v:         [B, 1, HV, V]; HV a multiple of H (GVA: value head hv reads key head
                 hv // (HV // H)).
      a, b:      [B, 1, HV] raw gate inputs; A_log, dt_bias: [HV] (gating fused, in fp32).
      pool:      [num_slots, HV, V, K] bf16 | fp32 (K contiguous). Donated: updated in place.
      cand_k, cand_v, cand_g, cand_beta, count: the replay buffers; the count[slot] pending
                 candidates are folded first (only read here; the caller sets count := 0).
      slots:     [B] int32; a slot < 0 or >= num_slots makes the row padding: nothing read,
                 nothing written, zero output. Real slots must be distinct.
      block_v, tiles_per_cta, stages: tuning (see `MosaicConfig`): block_v in {64, 128}
                 dividing V; K a multiple of 64 up to 256; stages x the [block_v, K] tile
                 within one CTA's SMEM (227 KiB).
      interpret: run the Mosaic GPU interpreter (CPU tests).

    Returns:
      o:    [B, 1, HV, V] in q's dtype (zeros for padding rows).
      pool: the updated pool (same buffer when donated).
    """
    mg.require("decode_mgpu")
    config = MosaicConfig(block_v, tiles_per_cta, stages)
    dims = cm.check_tokens("decode_mgpu", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v,
                           cand_g, cand_beta, count, slots, t_lo=1, t_hi=1)
    check_config("decode_mgpu", "decode", config, dims, q, pool, cand_k, cand_v)
    return tokens_call("decode", dims, config, interpret, slots, count, q, k, v, a, b, A_log,
                       dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
