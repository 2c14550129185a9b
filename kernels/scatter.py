"""Rows written into a table by index, in place: the slot bookkeeping of the caches (conv
windows, KV positions, replay candidates) at the copy bandwidth.

    table = scatter_rows(table, index, rows, config=ScatterConfig(...))
    # table [N, R], index [M] int32, rows [M, R] (table's dtype): table[index[i]] = rows[i]
    # for every i with 0 <= index[i] < N; the other rows of the table are untouched
    k_buf, v_buf = scatter_rows_group((k_buf, v_buf), index, (k_rows, v_rows), config=...)
    # several tables of one N written by one index in one launch, each in its own blocks

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
import itertools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _pallas
from ._common import BlockConfig, pow2_block


@dataclasses.dataclass(frozen=True)
class ScatterConfig(BlockConfig):
    """Launch parameters of `scatter_rows`: block, the most row elements one program copies (a
    power of two >= 16; a table's rows go in blocks of `pow2_block`: the largest power of two
    <= block dividing R, so block need not divide R); num_warps, num_stages (`BlockConfig`)."""

    def misfit(self, R: int) -> str | None:
        """Why this config cannot take rows of R elements, or None."""
        if pow2_block(R, self.block) is None:
            return (f"no power-of-two block of 16..{self.block} elements divides the row length "
                    f"R={R}")
        return None


def _kernel(index_ref, *refs, blocks, num_rows):
    """Program (i, j) copies one column block of row i: of the table whose blocks hold j
    (blocks[t] = (first, last, block): table t's column blocks are programs first..last - 1)."""
    n = len(blocks)
    rows_refs, table_refs = refs[:n], refs[2 * n:]  # refs[n:2n]: the aliased inputs
    i, j = pl.program_id(0), pl.program_id(1)
    r = index_ref[i]

    def copy(rows_ref, table_ref, first, block):
        cols = pl.ds((j - first) * block, block)
        table_ref[r, cols] = rows_ref[i, cols]

    for rows_ref, table_ref, (first, last, block) in zip(rows_refs, table_refs, blocks):
        pl.when((r >= 0) & (r < num_rows) & (j >= first) & (j < last))(
            functools.partial(copy, rows_ref, table_ref, first, block))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scatter_rows(table: jax.Array, index: jax.Array, rows: jax.Array, *,
                 config: ScatterConfig = ScatterConfig(), interpret: bool = False) -> jax.Array:
    """table: [N, R], index: [M] int32, rows: [M, R] in table's dtype -> table with
    table[index[i]] = rows[i] where 0 <= index[i] < N (module docstring)."""
    return scatter_rows_group((table,), index, (rows,), config=config, interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scatter_rows_group(tables: tuple, index: jax.Array, rows: tuple, *,
                       config: ScatterConfig = ScatterConfig(),
                       interpret: bool = False) -> tuple:
    """tables: [N, R_t] each (any dtypes, one N), index: [M] int32, rows: [M, R_t] in each
    table's dtype -> the tables with tables[t][index[i]] = rows[t][i] where 0 <= index[i] < N,
    in one launch (the caches' writes of one call by one index: a replay verify's candidate
    k, v, g and beta)."""
    tables, rows = tuple(tables), tuple(rows)
    _check(tables, index, rows, config)
    N = tables[0].shape[0]
    M = index.shape[0]
    if M == 0:  # nothing to write (a grid of size 0 may not launch on a GPU)
        return tables
    sizes = [pow2_block(t.shape[1], config.block) for t in tables]
    firsts = list(itertools.accumulate([0, *(t.shape[1] // b for t, b in zip(tables, sizes))]))
    blocks = tuple(zip(firsts, firsts[1:], sizes))
    n = len(tables)
    return tuple(_pallas.pallas_call(
        functools.partial(_kernel, blocks=blocks, num_rows=N),
        name="gdn_scatter_rows",
        config=config,
        interpret=interpret,
        grid=(M, firsts[-1]),
        out_shape=tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables),
        input_output_aliases={1 + n + t: t for t in range(n)},
    )(index, *rows, *tables))


def _check(tables, index, rows, config):
    op = "scatter_rows"
    if not tables or len(rows) != len(tables):
        raise ValueError(f"{op}: one rows array per table expected, got {len(tables)} tables "
                         f"and {len(rows)} rows")
    for t, (table, r) in enumerate(zip(tables, rows)):
        name = "" if len(tables) == 1 else f"[{t}]"
        if table.ndim != 2 or r.ndim != 2 or r.shape[1] != table.shape[1]:
            raise ValueError(f"{op}: table{name} [N, R] and rows{name} [M, R] expected, got "
                             f"table{name}{list(table.shape)} and rows{name}{list(r.shape)}")
        if table.shape[0] != tables[0].shape[0]:
            raise ValueError(f"{op}: every table has N = {tables[0].shape[0]} rows (one index), "
                             f"got table{name}{list(table.shape)}")
        if r.dtype != table.dtype:
            raise ValueError(f"{op}: rows{name} expected the table's dtype {table.dtype}, got "
                             f"{r.dtype}")
        why = config.misfit(table.shape[1])
        if why:
            raise ValueError(f"{op}: table{name}: {why}")
    if index.ndim != 1 or index.dtype != jnp.int32 or index.shape[0] != rows[0].shape[0]:
        raise ValueError(f"{op}: index expected int32 [M] = [{rows[0].shape[0]}], got "
                         f"{index.dtype}{list(index.shape)}")
    for t, r in enumerate(rows):
        if r.shape[0] != index.shape[0]:
            raise ValueError(f"{op}: rows[{t}] expected [M] = [{index.shape[0]}] rows, got "
                             f"{list(r.shape)}")
