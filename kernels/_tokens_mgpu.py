"""The pipeline the Mosaic GPU decode and verify kernels share; each mode finishes a tile its way.

kernel body `tokens_body` (this pipeline, with a `Mode`) -> launcher `tokens_call` -> the public
functions of decode_mgpu.py (mode decode) and verify_mgpu.py (modes replay, intermediate).

Work split: a tile is (b, hv, iv), the state rows pool[slot, hv, iv*BV:(iv+1)*BV, :] ([BV, K], K
contiguous). The B * HV * (V // BV) tiles, in that order, are dealt out in runs of
`tiles_per_cta` to a 1-D grid of CTAs (one warpgroup each). A CTA keeps `stages` SMEM buffers
and issues tile i + stages - 1's loads into the stage of tile i - 1: before tile i's math where
`Mode.loads_first` (verify: replay's folded-state store from that stage was drained at the end of
tile i - 1), after it otherwise (decode: its state store leaves from the stage at the end of the
tile, so with 2 stages the overlap comes from the other CTAs on the SM). Per tile:

    TMA  pool tile, q, k (key head hv // group), v block -> SMEM stage s (one barrier, 4
         arrivals); where count[slot] > 0 also the slot's t_max candidate k, v rows (a second
         barrier, 2 arrivals), so the fold reads SMEM
    regs S = SMEM tile in fp32 (WGMMA layout: [BV, K], BV a multiple of 64); fold the slot's
         pending candidates
    then `Mode.finish`: per token S = exp(g) S; S += (beta (v - S k)) k^T; o = S q (`run_tokens`),
         and the mode's stores (`store_outputs`, `store_state`)
    then `Mode.pad`, where a padding tile needs anything (after the live tile's body)

A padding row (slot < 0 or >= num_slots) issues no load. Everything version-specific is in
`_mgpu.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _recurrence as rec
from . import _replay_wy_mgpu, _ring_wy_mgpu
from ._mgpu import MosaicConfig

_F32 = jnp.float32
MODES = ("decode", "replay", "intermediate")
MAX_T = 8  # the most tokens (and pending candidates) the Mosaic kernels have run with
_MAX_RING = 4  # intermediate: at most this many S_t stores in flight


class Mode(NamedTuple):
    """How one kernel finishes a tile.

    name:        "decode" | "replay" | "intermediate" (the kernel's name and its SMEM ring).
    finish:      finish(p: Pipe, tile: Tile, S, gates) inside `pl.when(tile.live)`, after the
                 fold: the tokens and every store of a live tile.
    pad:         pad(p, tile) after that, or None: what a tile that is not live must do (it
                 emits its own `pl.when`).
    loads_first: issue the next tile's loads before this tile's math (else after it).
    writes_pool: the pool is written in place (else it is only read, and inter
                 [B, T, HV, V, K] is a fresh output); o starts uninitialised either way, so
                 `pad` zeroes the o of padding rows.
    """

    name: str
    finish: Callable
    pad: Callable | None
    loads_first: bool
    writes_pool: bool


class Pipe(NamedTuple):
    """One CTA's GMEM refs, SMEM buffers and statics (what a mode's finish reads)."""

    pool: object    # [N, HV, V, K] GMEM
    o: object       # [B, T, HV, V] GMEM
    inter: object   # [B, T, HV, V, K] GMEM (intermediate) or None
    st_smem: object  # [ST, BV, K] pool dtype
    q_smem: object  # [ST, T, K]
    k_smem: object  # [ST, T, K]
    v_smem: object  # [ST, T, BV]
    o_smem: object  # [T, BV]
    ring: object    # [NB, BV, K] pool dtype (intermediate) or None
    NB: int
    T: int
    BV: int
    K: int
    layouts: tuple  # (WGMMA, K-vector, V-vector), Nones under the interpreter
    interpret: bool


class Tile(NamedTuple):
    """This CTA's tile i: stage s, row b, value head hv, V block cols, the row's slot."""

    i: object
    s: object
    b: object
    hv: object
    cols: object
    slot: object
    n: object         # pending candidates folded (0 for padding)
    in_range: object  # a real tile (the last CTA's run may overshoot)
    live: object      # a real tile of a real row


def run_tokens(p: Pipe, tile: Tile, S, gates, after_token=None):
    """The T tokens of the tile from SMEM stage s on S [BV, K] fp32 -> (S, outs: T x [BV]).
    after_token(t, S) runs after token t's readout."""
    _, KVEC, VVEC = p.layouts
    s = tile.s
    outs = []
    for t in range(p.T):
        q = rec.prepare_q(mg.load(p.q_smem.at[s, t], KVEC, interpret=p.interpret).astype(_F32))
        k = rec.l2norm(mg.load(p.k_smem.at[s, t], KVEC, interpret=p.interpret).astype(_F32))
        v = mg.load(p.v_smem.at[s, t], VVEC, interpret=p.interpret).astype(_F32)
        S = rec.update(S, k, v, *gates[t])
        outs.append(rec.readout(S, q))
        if after_token is not None:
            after_token(t, S)
    return S, outs


def store_state(p: Pipe, tile: Tile, t: int, S):
    """inter[b, t, hv, cols] := S through ring buffer (i T + t) % NB. Stores leave in ring order,
    so NB - 1 later stores (o's as well) mean this buffer's last one has read its SMEM: wait for
    that, not for all."""
    plgpu = mg.plgpu
    buf = (tile.i * p.T + t) % p.NB
    plgpu.wait_smem_to_gmem(p.NB - 1, wait_read_only=True)
    p.ring[buf] = S.astype(p.ring.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p.ring.at[buf], p.inter.at[tile.b, t, tile.hv, tile.cols, :])


def store_outputs(p: Pipe, tile: Tile, outs, wait, state=None):
    """o[b, :, hv, cols] := outs (after `state` = (SMEM tile, pool tile), if given). The last o
    store must have read o_smem: `wait` stores were issued after it in this tile (None: the
    caller has waited)."""
    plgpu = mg.plgpu
    if wait is not None:
        plgpu.wait_smem_to_gmem(wait, wait_read_only=True)
    for t, o in enumerate(outs):
        p.o_smem[t] = o.astype(p.o_smem.dtype)
    plgpu.commit_smem()
    if state is not None:
        plgpu.copy_smem_to_gmem(*state)
    plgpu.copy_smem_to_gmem(p.o_smem, p.o.at[tile.b, :, tile.hv, tile.cols])


def pad_outputs(p: Pipe, tile: Tile, wait):
    """o[b, :, hv, cols] := 0 where the tile is real but its row is padding (the modes that write
    the pool start o uninitialised, `_mgpu.fresh_outputs`); `wait` as `store_outputs`."""
    _, _, VVEC = p.layouts

    @pl.when(tile.in_range & jnp.logical_not(tile.live))
    def _():
        zero = mg.layout_cast(jnp.zeros((p.BV,), _F32), VVEC, interpret=p.interpret)
        store_outputs(p, tile, [zero] * p.T, wait=wait)


def _layouts():
    L = mg.plgpu.Layout
    # S [BV, K] in WGMMA; a K-vector broadcasts along rows (reduce(0)), a V-vector along
    # columns (reduce(1)).
    return L.WGMMA, L.WGMMA.reduce(0), L.WGMMA.reduce(1)


def tokens_body(refs, *, mode: Mode, dims: cm.Dims, config: MosaicConfig, interpret: bool):
    """The pipelined per-CTA body: loads, gates and the pending fold for every tile; `mode`
    finishes each tile (module docstring)."""
    (slots_ref, count_ref, q_ref, k_ref, v_ref, a_ref, b_ref, A_log_ref, dt_bias_ref, cand_k_ref,
     cand_v_ref, cand_g_ref, cand_beta_ref, pool_ref, o_ref, *inter) = refs
    # GMEM refs. pool_ref: [N, HV, V, K] (written in place where mode.writes_pool); o_ref:
    # [B, T, HV, V] (uninitialised in); inter: [B, T, HV, V, K] (the modes that keep the pool)
    inter_ref = inter[0] if inter else None
    B, T, H, HV, K, V, N, t_max = dims
    BV, ST, PER = config.block_v, config.stages, config.tiles_per_cta
    NB = store_ring(mode.name, config, dims, cm.Dtypes(
        jnp.dtype(pool_ref.dtype), jnp.dtype(o_ref.dtype), _cand_dtype(cand_k_ref, cand_v_ref)))
    NV = V // BV
    total = B * HV * NV
    group = HV // H
    layouts = _layouts() if not interpret else (None, None, None)
    WG, KVEC, VVEC = layouts
    plgpu = mg.plgpu

    tile = functools.partial(cm.Tile.at, slots_ref=slots_ref, HV=HV, NV=NV, total=total,
                             num_slots=N)
    pending = functools.partial(cm.tile_pending, count_ref, t_max=t_max, num_slots=N)

    def body(st_smem, q_smem, k_smem, v_smem, ck_smem, cv_smem, o_smem, bars, pbars, *ring):
        # st_smem [ST, BV, K] pool dtype; q_smem, k_smem [ST, T, K]; v_smem [ST, T, BV];
        # ck_smem [ST, t_max, K], cv_smem [ST, t_max, BV]: the slot's pending candidates;
        # o_smem [T, BV]; ring (intermediate): [NB, BV, K] pool dtype, staging the S_t stores
        first = lax.axis_index("cta") * PER
        p = Pipe(pool_ref, o_ref, inter_ref, st_smem, q_smem, k_smem, v_smem, o_smem,
                 ring[0] if ring else None, NB, T, BV, K, layouts, interpret)

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
            s, _, cols = i % ST, hv // group, pl.ds(iv * BV, BV)
            if mode.loads_first:
                # The loads of tile i + ST - 1 go out before this tile's math, into the stage of
                # tile i - 1, which no store reads any more (the mode drained them).
                issue_ahead(i)

            # Scalars first: their GMEM latency overlaps the TMA wait below.
            gates = cm.token_gates(a_ref, b_ref, A_log_ref, dt_bias_ref, b, hv, T)
            n = pending(slot, live)
            here = Tile(i, s, b, hv, cols, slot, n, in_range, live)

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
                mode.finish(p, here, S, gates)

            if mode.pad is not None:
                mode.pad(p, here)
            if not mode.loads_first:
                issue_ahead(i)

        plgpu.wait_smem_to_gmem(0)

    pool_dtype, in_dtype = pool_ref.dtype, o_ref.dtype
    ring = [mg.smem_tile((NB, BV, K), pool_dtype, interpret=interpret)] if NB else []
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


def store_ring(mode: str, config: MosaicConfig, dims: cm.Dims, dtypes: cm.Dtypes) -> int:
    """SMEM tiles staging intermediate mode's S_t stores (0 in the other modes): as many as fit
    beside the load stages, up to min(T, 4) (more stores in flight before one must drain)."""
    if mode != "intermediate":
        return 0
    fits = [n for n in range(1, min(dims.T, _MAX_RING) + 1)
            if config.smem_bytes(dims.K, dtypes.pool, dtypes.tokens, dims.T, out_tiles=n,
                                 pending=dims.t_max, cand_dtype=dtypes.candidates)
            <= mg.SMEM_BYTES]
    return max(fits, default=1)  # 1 not fitting is caught by `misfit`


def misfit(mode: str, dims: cm.Dims, dtypes: cm.Dtypes, config: MosaicConfig) -> str | None:
    """None when the Mosaic GPU kernel of `mode` ("decode" | "replay" | "intermediate" |
    "ring") takes a call of these dims and dtypes with `config`, else why not: the head dims it
    can tile, and the SMEM one CTA needs (load stages, the candidates of t_max tokens,
    intermediate's ring). A pure function of its arguments: dispatch asks it before choosing
    Mosaic GPU. Ring mode (decode and verify on a ring-mode state) has its matrix-form kernel
    only (`_ring_wy_mgpu`; dims.t_max is the ring's W)."""
    if mode == "ring":  # any reserve up to the ring's W (a call's own is checked at its launch)
        return _ring_wy_mgpu.misfit(dims, dtypes, config, reserve=dims.t_max)
    if mode not in MODES:
        raise ValueError(f"mosaic misfit: mode expected one of {MODES}, got {mode!r}")
    if config.wy:
        if mode != "replay":
            return f"the WY form (MosaicConfig.wy) is replay's only, not {mode}'s"
        return _replay_wy_mgpu.misfit(dims, dtypes, config)
    if max(dims.T, dims.t_max) > MAX_T:
        return (f"the Mosaic GPU kernels take T and T_max <= {MAX_T} (run on a GPU so far), "
                f"got T = {dims.T}, T_max = {dims.t_max}")
    ring = store_ring(mode, config, dims, dtypes)
    return config.misfit(dims.K, dims.V, dtypes.pool, dtypes.tokens, T=dims.T, out_tiles=ring,
                         pending=dims.t_max, cand_dtype=dtypes.candidates)


def check_fit(op: str, mode: str, dims: cm.Dims, dtypes: cm.Dtypes,
              config: MosaicConfig) -> None:
    """`misfit` as a ValueError naming the op (trace time)."""
    why = misfit(mode, dims, dtypes, config)
    if why:
        raise ValueError(f"{op}: {why}")


def tokens_call(mode: Mode, dims: cm.Dims, config: MosaicConfig, interpret: bool, *args):
    """Launch `tokens_body` on (slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v,
    cand_g, cand_beta, pool) -> (o [B, T, HV, V], pool), or (o, inter [B, T, HV, V, K]) where
    the mode does not write the pool."""
    B, T, _, HV, K, V, _, _ = dims
    q, pool = args[2], args[-1]
    kind = "decode" if mode.name == "decode" else f"verify_{mode.name}_t{T}"
    name = f"gdn_{kind}_mgpu_bv{config.block_v}_t{config.tiles_per_cta}_s{config.stages}"
    grid = (pl.cdiv(B * HV * (V // config.block_v), config.tiles_per_cta),)
    body = functools.partial(tokens_body, mode=mode, dims=dims, config=config,
                             interpret=interpret)
    o = jax.ShapeDtypeStruct((B, T, HV, V), q.dtype)
    if not mode.writes_pool:  # the pool is only read: plain inputs, uninitialised outputs
        inter = jax.ShapeDtypeStruct((B, T, HV, V, K), pool.dtype)
        return mg.kernel(lambda *refs: body(refs), out_type=(o, inter), grid=grid, name=name,
                         interpret=interpret)(*args)

    def stateful(refs):  # the arrays as GMEM refs: the pool is written in place
        mg.core_map(lambda: body(refs), grid=grid, name=name, interpret=interpret)

    o = mg.fresh_outputs(o.shape, o.dtype, interpret=interpret)
    *_, pool, o = pl.run_state(stateful)((*args, o))
    return o, pool
