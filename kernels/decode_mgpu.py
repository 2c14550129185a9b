"""GDN decode as a Pallas **Mosaic GPU** kernel (Hopper and later): the state staged through SMEM
by TMA, pipelined across the tiles a CTA walks through. Same contract as `decode.decode`.

The shared pipeline (`_tokens_mgpu.tokens_body`: loads, gates, the pending fold) with decode's
way of finishing a tile, `_finish`: the token, then one wait that frees the stage and o_smem,
then the state (rounded once to the pool's dtype) and o leave by TMA from SMEM. Decode issues the
next tile's loads after the tile (its state store leaves from the stage), so with 2 stages the
overlap comes from the other CTAs on the SM. A padding row issues no load and stores zero o (o
starts uninitialised). Everything version-specific is in `_mgpu.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as cm
from . import _mgpu as mg
from . import _tokens_mgpu as tk
from ._mgpu import MosaicConfig


def _finish(p: tk.Pipe, tile: tk.Tile, S, gates):
    """The token, then state and o out after one wait (after the math) frees the stage and
    o_smem."""
    plgpu = mg.plgpu
    S, outs = tk.run_tokens(p, tile, S, gates)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    p.st_smem[tile.s] = S.astype(p.st_smem.dtype)
    tk.store_outputs(p, tile, outs, wait=None,
                     state=(p.st_smem.at[tile.s], p.pool.at[tile.slot, tile.hv, tile.cols, :]))


def _pad(p: tk.Pipe, tile: tk.Tile):
    # The next loads go out after the tile, into the stage of tile i - 1, whose stores the wait
    # before a live tile's own stores has drained: keep that invariant on padding tiles too
    # (the zero o store of a padding row waits for them first).
    tk.pad_outputs(p, tile, wait=0)

    @pl.when(jnp.logical_not(tile.in_range))
    def _():
        mg.plgpu.wait_smem_to_gmem(0, wait_read_only=True)


DECODE = tk.Mode("decode", finish=_finish, pad=_pad, loads_first=False, writes_pool=True)


@functools.partial(jax.jit, static_argnames=("config", "interpret"), donate_argnames=("pool",))
def decode_mgpu(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta, count,
                slots, *, config: MosaicConfig = MosaicConfig(), interpret: bool = False):
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
      config:    `MosaicConfig` (block_v in {64, 128} dividing V; K a multiple of 64 up to 256;
                 stages x the [block_v, K] tile within one CTA's SMEM, 227 KiB: `mosaic_misfit`).
      interpret: run the Mosaic GPU interpreter (CPU tests).

    Returns:
      o:    [B, 1, HV, V] in q's dtype (zeros for padding rows).
      pool: the updated pool (same buffer when donated).
    """
    mg.require("decode_mgpu")
    dims = cm.check_tokens("decode_mgpu", q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v,
                           cand_g, cand_beta, count, slots, t_lo=1, t_hi=1)
    tk.check_fit("decode_mgpu", "decode", dims, cm.Dtypes.of(q, pool, cand_k, cand_v), config)
    return tk.tokens_call(DECODE, dims, config, interpret, slots, count, q, k, v, a, b, A_log,
                          dt_bias, cand_k, cand_v, cand_g, cand_beta, pool)
