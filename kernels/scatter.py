"""Rows written into a table by index, in place: the slot bookkeeping of the caches (conv
windows, KV positions, replay candidates) at the copy bandwidth.

    table = scatter_rows(table, index, rows, config=ScatterConfig(...))
    # table [N, R], index [M] int32, rows [M, R] (table's dtype): table[index[i]] = rows[i]
    # for every i with 0 <= index[i] < N; the other rows of the table are untouched

XLA's GPU scatter spends a thread and its index arithmetic on every element, about 1e11 elements
a second on an H200: writing 32 rows of a Qwen3.5 conv window ([7, 8192] bf16, 3.7 MB) takes 16
us where the copy takes 2 (bench/results/profile_step-h200-b32-auto_paths-2026-12-01.json,
`input_scatter_fusion`s). Here program (i, j) copies column block j of row i as one vector.

Rows must have distinct in-range indices (the caches' slots and positions do); out-of-range and
negative ones (padding) write nothing. The table is aliased to the result: inside a jit that
donates it (a decode loop's cache), nothing else is copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _pallas
from ._common import BlockConfig


@dataclasses.dataclass(frozen=True)
class ScatterConfig(BlockConfig):
    """Launch parameters of `scatter_rows`: block, the row elements one program copies, a power
    of two >= 16 dividing R; num_warps, num_stages (`BlockConfig`)."""

    def misfit(self, R: int) -> str | None:
        """Why this config cannot take rows of R elements, or None."""
        if R % self.block:
            return f"block={self.block} does not divide the row length R={R}"
        return None


def _kernel(index_ref, rows_ref, _table_in, table_ref, *, block, num_rows):
    i, j = pl.program_id(0), pl.program_id(1)
    r = index_ref[i]
    cols = pl.ds(j * block, block)

    @pl.when((r >= 0) & (r < num_rows))
    def _():
        table_ref[r, cols] = rows_ref[i, cols]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scatter_rows(table: jax.Array, index: jax.Array, rows: jax.Array, *,
                 config: ScatterConfig = ScatterConfig(), interpret: bool = False) -> jax.Array:
    """table: [N, R], index: [M] int32, rows: [M, R] in table's dtype -> table with
    table[index[i]] = rows[i] where 0 <= index[i] < N (module docstring)."""
    _check(table, index, rows, config)
    N, R = table.shape
    M = index.shape[0]
    if M == 0:  # nothing to write (a grid of size 0 may not launch on a GPU)
        return table
    return _pallas.pallas_call(
        functools.partial(_kernel, block=config.block, num_rows=N),
        name="gdn_scatter_rows",
        config=config,
        interpret=interpret,
        grid=(M, R // config.block),
        out_shape=jax.ShapeDtypeStruct(table.shape, table.dtype),
        input_output_aliases={2: 0},
    )(index, rows, table)


def _check(table, index, rows, config):
    op = "scatter_rows"
    if table.ndim != 2 or rows.ndim != 2 or rows.shape[1] != table.shape[1]:
        raise ValueError(f"{op}: table [N, R] and rows [M, R] expected, got table"
                         f"{list(table.shape)} and rows{list(rows.shape)}")
    if index.ndim != 1 or index.dtype != jnp.int32 or index.shape[0] != rows.shape[0]:
        raise ValueError(f"{op}: index expected int32 [M] = [{rows.shape[0]}], got "
                         f"{index.dtype}{list(index.shape)}")
    if rows.dtype != table.dtype:
        raise ValueError(f"{op}: rows expected the table's dtype {table.dtype}, got {rows.dtype}")
    why = config.misfit(table.shape[1])
    if why:
        raise ValueError(f"{op}: {why}")
