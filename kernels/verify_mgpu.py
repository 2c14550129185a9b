"""GDN MTP verify in the three commit modes as Pallas **Mosaic GPU** kernels. Replay and
intermediate: the shared pipeline of `_tokens_mgpu` with T tokens (replay also in matrix form,
`_replay_wy_mgpu`); ring: `_ring_wy_mgpu` (matrix form only). Same contracts as
`verify.verify_replay`, `verify.verify_intermediate` and `ring.verify_ring`.

Per tile: TMA the pool tile and the row's T q/k/v into SMEM; fold the slot's pending candidates;
then the mode's finish: the T tokens in fp32 registers, their outputs staged through SMEM and
stored by TMA. Both issue the next tile's loads before the tile's math, into the stage of tile
i - 1, which no store reads any more (each finish drains its stores before its o store).
- replay (`_finish_replay`): where anything was folded, the folded state (the state BEFORE this
  call's tokens) is stored to the pool once, before the token math. The caller stores this
  call's tokens as the slot's new candidates and sets count := 0 (in XLA).
- intermediate (`_finish_intermediate`): the pool is only read; each S_t is rounded once to the
  pool's dtype and stored by TMA to inter[b, t] from a ring of SMEM tiles, so the stores of
  tokens t and t + 1 overlap the math of the next. Its outputs start uninitialised (a zeroed
  inter buffer would cost a memset as large as the states it holds), so a padding row stores
  zero o and inter tiles (`_pad_intermediate`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _replay_wy_mgpu
from . import _ring_wy_mgpu
from . import _tokens_mgpu as tk
from ._mgpu import MosaicConfig
from .ring import RING_MIN

_F32 = jnp.float32
_VERIFY_CONFIG = MosaicConfig(tiles_per_cta=2)


def _finish_replay(p: tk.Pipe, tile: tk.Tile, S, gates):
    plgpu = mg.plgpu

    @pl.when(tile.n > 0)  # nothing folded: the pool already holds S exactly
    def _():
        p.st_smem[tile.s] = S.astype(p.st_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(p.st_smem.at[tile.s],
                                p.pool.at[tile.slot, tile.hv, tile.cols, :])

    _, outs = tk.run_tokens(p, tile, S, gates)
    # All stores drained: tile i - 1's o store, and this tile's folded-state store (issued
    # before the token math, so long done).
    tk.store_outputs(p, tile, outs, wait=0)


def _finish_intermediate(p: tk.Pipe, tile: tk.Tile, S, gates):
    _, outs = tk.run_tokens(p, tile, S, gates,
                            after_token=lambda t, S: tk.store_state(p, tile, t, S))
    tk.store_outputs(p, tile, outs, wait=p.T)  # T ring stores since tile i - 1's o store


def _pad_intermediate(p: tk.Pipe, tile: tk.Tile):
    WG, _, VVEC = p.layouts

    @pl.when(tile.in_range & jnp.logical_not(tile.live))
    def _():  # a padding row: zero o and inter (the buffers start uninitialised)
        zero = mg.layout_cast(jnp.zeros((p.BV, p.K), _F32), WG, interpret=p.interpret)
        for t in range(p.T):
            tk.store_state(p, tile, t, zero)
        vzero = mg.layout_cast(jnp.zeros((p.BV,), _F32), VVEC, interpret=p.interpret)
        tk.store_outputs(p, tile, [vzero] * p.T, wait=p.T)


def _pad_replay(p: tk.Pipe, tile: tk.Tile):
    tk.pad_outputs(p, tile, wait=0)  # zero o (tile i - 1's stores drained first, as a live
                                     # tile's finish does)


REPLAY = tk.Mode("replay", finish=_finish_replay, pad=_pad_replay, loads_first=True,
                 writes_pool=True)
INTERMEDIATE = tk.Mode("intermediate", finish=_finish_intermediate, pad=_pad_intermediate,
                       loads_first=True, writes_pool=False)


@functools.partial(jax.jit, static_argnames=("config", "interpret"), donate_argnames=("pool",))
def verify_replay_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                       count, slots, *, config: MosaicConfig = _VERIFY_CONFIG,
                       interpret: bool = False):
    """T verify tokens per row (T in 1..MAX_T); the pool takes the slot's folded state (replay).

    Arguments as `gdn_jax.kernels.verify_replay` (q, k [B, T, H, K]; v [B, T, HV, V]; a, b
    [B, T, HV]; ...), config as `decode_mgpu` (`MosaicConfig`).

    The pool is donated and updated in place: pool[slot] := the folded state, written once and
    only where count[slot] > 0. Returns o [B, T, HV, V] in q's dtype (zeros for padding rows)
    and the pool. `config.wy` runs the matrix form (`_replay_wy_mgpu`: bf16 throughout, Hopper).
    """
    mg.require("verify_replay_mgpu")
    dims = cm.check_tokens("verify_replay_mgpu", q, k, v, a, b, A_log, dt_bias, pool, cand_k,
                           cand_v, cand_g, cand_beta, count, slots, t_lo=1, t_hi=cm.MAX_T)
    tk.check_fit("verify_replay_mgpu", "replay", dims, cm.Dtypes.of(q, pool, cand_k, cand_v),
                 config)
    args = (slots, count, q, k, v, a, b, A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
    if config.wy:
        if not k.dtype == v.dtype == q.dtype:
            raise ValueError(f"verify_replay_mgpu: the WY form takes q, k and v of one dtype "
                             f"(bf16), got {q.dtype}, {k.dtype}, {v.dtype}")
        return _replay_wy_mgpu.replay_call(dims, config, interpret, *args)
    return tk.tokens_call(REPLAY, dims, config, interpret, *args)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def verify_intermediate_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g,
                             cand_beta, count, slots, *, config: MosaicConfig = _VERIFY_CONFIG,
                             interpret: bool = False):
    """T verify tokens per row (T in 1..MAX_T), keeping the state after each; the pool is only
    read.

    Arguments as `gdn_jax.kernels.verify_intermediate`, config as `decode_mgpu`
    (`MosaicConfig`; the SMEM also holds up to min(T, 4) [block_v, K] tiles staging the state
    stores).

    Returns o [B, T, HV, V] in q's dtype and inter [B, T, HV, V, K] in the pool's dtype
    (inter[i, t] = S_t rounded once); padding rows get zero o and zero inter.
    """
    mg.require("verify_intermediate_mgpu")
    dims = cm.check_tokens("verify_intermediate_mgpu", q, k, v, a, b, A_log, dt_bias, pool,
                           cand_k, cand_v, cand_g, cand_beta, count, slots, t_lo=1,
                           t_hi=cm.MAX_T)
    tk.check_fit("verify_intermediate_mgpu", "intermediate", dims,
                 cm.Dtypes.of(q, pool, cand_k, cand_v), config)
    return tk.tokens_call(INTERMEDIATE, dims, config, interpret, slots, count, q, k, v, a, b,
                          A_log, dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)


@functools.partial(jax.jit, static_argnames=("reserve", "config", "interpret"),
                   donate_argnames=("pool", "cand_v"))
def verify_ring_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                     count, slots, *, reserve: int,
                     config: MosaicConfig = MosaicConfig(tiles_per_cta=4),
                     interpret: bool = False):
    """T tokens per row after the slot's ring of committed tokens (ring mode; decode is T = 1),
    in matrix form on the tensor cores (`_ring_wy_mgpu`: bf16 pool and tokens, Hopper).

    Arguments and results as `gdn_jax.kernels.verify_ring` (q, k [B, T, H, K] bf16; the ring
    cand_k [num_slots, W, H, K] bf16, cand_v its u fp32; ...), T in 1..8, W a power of two in
    16..32; config as `decode_mgpu` (`MosaicConfig`; its `wy` is replay's and not read).

    Returns o [B, T, HV, V] bf16 (zeros for padding rows), cand_v with each real row's T new u
    in its slot's ring (then zeros up to reserve: `verify_ring` says where), and the pool,
    written only where count[slot] > 0 and count[slot] + reserve > W (the ring folded into it).
    """
    mg.require("verify_ring_mgpu")
    dims = cm.check_ring("verify_ring_mgpu", q, k, v, a, b, A_log, dt_bias, pool, cand_k,
                         cand_v, cand_g, cand_beta, count, slots, reserve=reserve,
                         t_hi=_ring_wy_mgpu.MAX_T, ring_min=RING_MIN)
    why = _ring_wy_mgpu.misfit(dims, cm.Dtypes.of(q, pool, cand_k, cand_v), config, reserve)
    if why is None and not k.dtype == v.dtype == q.dtype:
        why = f"q, k and v of one dtype (bf16), got {q.dtype}, {k.dtype}, {v.dtype}"
    if why:
        raise ValueError(f"verify_ring_mgpu: {why}")
    return _ring_wy_mgpu.ring_call(dims, config, reserve, interpret, slots, count, q, k, v, a, b,
                                   A_log, dt_bias, cand_k, cand_v, cand_g, pool)
