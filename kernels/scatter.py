"""Rows written into a table by index, in place: the slot bookkeeping of the caches (conv
windows, KV positions, replay candidates) at the copy bandwidth.

    table = scatter_rows(table, index, rows, config=ScatterConfig(...))
    # table [N, R], index [M] int32, rows [M, R] (table's dtype): table[index[i]] = rows[i]
    # for every i with 0 <= index[i] < N; the other rows of the table are untouched
    k_buf, v_buf = scatter_rows_group((k_buf, v_buf), index, (k_rows, v_rows), config=...)
    # several tables of one N written by one index in one launch, each in its own blocks
    *_, g_buf, beta_buf = scatter_rows_group((..., g_buf, beta_buf), index, (..., a, b),
                                             gating=(A_log, dt_bias), config=...)
    # the last two tables take the gates of raw a and b, computed in the launch
    conv_bufs = shift_rows_group(conv_bufs, slots, starts, width=w, config=...)
    # [N, L, R_t] each: rows starts[b]..+w-1 of slot slots[b] moved to rows 0..w-1, in place

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
from . import _recurrence as rec
from ._common import BlockConfig, column_blocks, pow2_block


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


def _kernel(index_ref, *refs, blocks, num_rows, gated):
    """Program (i, j) copies one column block of row i: of the table whose blocks hold j
    (blocks[t] = (first, last, block): table t's column blocks are programs first..last - 1).
    gated: the last two tables (g, beta) share the last blocks, which write the gates of their
    rows (a, b) in place of a copy."""
    n = len(blocks) + (1 if gated else 0)  # tables
    n_params = 2 if gated else 0
    rows_refs, params = refs[:n], refs[n:n + n_params]
    table_refs = refs[n + n_params + n:]  # after the aliased inputs: the outputs
    i, j = pl.program_id(0), pl.program_id(1)
    r = index_ref[i]

    def copy(rows_ref, table_ref, first, block):
        cols = pl.ds((j - first) * block, block)
        table_ref[r, cols] = rows_ref[i, cols]

    def gate(first, block):
        cols = pl.ds((j - first) * block, block)
        a, b = (ref[i, cols].astype(jnp.float32) for ref in rows_refs[-2:])
        A_log, dt_bias = (ref[cols].astype(jnp.float32) for ref in params)
        g, beta = rec.gates(a, b, A_log, dt_bias)
        table_refs[-2][r, cols], table_refs[-1][r, cols] = g, beta

    for t, (first, last, block) in enumerate(blocks):
        body = (functools.partial(gate, first, block) if gated and t == len(blocks) - 1 else
                functools.partial(copy, rows_refs[t], table_refs[t], first, block))
        pl.when((r >= 0) & (r < num_rows) & (j >= first) & (j < last))(body)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scatter_rows(table: jax.Array, index: jax.Array, rows: jax.Array, *,
                 config: ScatterConfig = ScatterConfig(), interpret: bool = False) -> jax.Array:
    """table: [N, R], index: [M] int32, rows: [M, R] in table's dtype -> table with
    table[index[i]] = rows[i] where 0 <= index[i] < N (module docstring)."""
    return scatter_rows_group((table,), index, (rows,), config=config, interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scatter_rows_group(tables: tuple, index: jax.Array, rows: tuple, *, gating=None,
                       config: ScatterConfig = ScatterConfig(),
                       interpret: bool = False) -> tuple:
    """tables: [N, R_t] each (any dtypes, one N), index: [M] int32, rows: [M, R_t] in each
    table's dtype -> the tables with tables[t][index[i]] = rows[t][i] where 0 <= index[i] < N,
    in one launch (the caches' writes of one call by one index: a replay verify's candidate
    k, v, g and beta).

    gating: (A_log, dt_bias), [R] each, or None. Given, the last two tables are fp32 g and beta
    of one R and their rows the raw a and b (any float dtype), written as their gates
    g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) (`_recurrence.gates`; a = b = -inf
    writes g = -0.0, beta = 0): the candidates' gating in the scatter's launch, not XLA's two."""
    tables, rows = tuple(tables), tuple(rows)
    params = None if gating is None else tuple(gating)
    _check(tables, index, rows, config, params)
    params = params or ()
    N = tables[0].shape[0]
    M = index.shape[0]
    if M == 0:  # nothing to write (a grid of size 0 may not launch on a GPU)
        return tables
    blocks = _blocks([t.shape[1] for t in (tables[:-1] if params else tables)],  # beta goes
                     config)                                                   # in g's blocks
    n, first_table = len(tables), 1 + len(tables) + len(params)
    return tuple(_pallas.pallas_call(
        functools.partial(_kernel, blocks=blocks, num_rows=N, gated=bool(params)),
        name="gdn_scatter_rows",
        config=config,
        interpret=interpret,
        grid=(M, blocks[-1][1]),
        out_shape=tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables),
        input_output_aliases={first_table + t: t for t in range(n)},
    )(index, *rows, *params, *tables))


def _blocks(widths, config: ScatterConfig) -> tuple:
    """The programs of tables whose rows hold these numbers of elements, each in blocks of
    `pow2_block`: ((first, last, block), ...), table t's blocks programs first..last - 1."""
    sizes = [pow2_block(R, config.block) for R in widths]
    return tuple(block[:3] for block in column_blocks(widths, sizes))


def _shift_kernel(slots_ref, starts_ref, *refs, blocks, width):
    """Program (b, j) moves one column block of the width rows from row b's start to rows
    0..width - 1 of its slot, in the table whose blocks hold j (`_kernel`'s blocks). The ranges
    may overlap: in place is safe because every row's block has one shape, so each element is
    loaded and stored by the same thread, in program order (loads first); and no other program
    touches it (real slots are distinct, column blocks and tables disjoint)."""
    table_refs = refs[len(blocks):]  # after the aliased inputs
    b, j = pl.program_id(0), pl.program_id(1)
    s, start = slots_ref[b], starts_ref[b]
    N, L = table_refs[0].shape[:2]
    moves = (s >= 0) & (s < N) & (start > 0) & (start <= L - width)

    def move(table_ref, first, block):
        cols = pl.ds((j - first) * block, block)
        rows = [table_ref[s, start + i, cols] for i in range(width)]
        for i, row in enumerate(rows):
            table_ref[s, i, cols] = row

    for table_ref, (first, last, block) in zip(table_refs, blocks):
        pl.when(moves & (j >= first) & (j < last))(
            functools.partial(move, table_ref, first, block))


@functools.partial(jax.jit, static_argnames=("width", "config", "interpret"))
def shift_rows_group(tables: tuple, slots: jax.Array, starts: jax.Array, *, width: int,
                     config: ScatterConfig = ScatterConfig(), interpret: bool = False) -> tuple:
    """tables: [N, L, R_t] each (any dtypes, one N and L), slots, starts: [B] int32 -> the tables
    with rows starts[b]..starts[b] + width - 1 of slot slots[b] moved to its rows 0..width - 1,
    in place, in one launch: a commit's conv windows (the accepted count's W - 1 rows), every
    GDN layer's at once. A row whose slot is outside [0, N), or whose start is 0 or past
    L - width, moves nothing; real slots are distinct. Reads and writes the moved rows alone
    (the tables donated: else XLA copies them first), where a gather of the windows and a
    `scatter_rows_group` took two launches."""
    tables = tuple(tables)
    op = "shift_rows"
    if not tables or any(t.ndim != 3 or t.shape[:2] != tables[0].shape[:2] for t in tables) \
            or not 1 <= width <= tables[0].shape[1]:
        raise ValueError(f"{op}: tables [N, L, R] of one N and L, L >= width = {width}, "
                         f"expected, got {[list(t.shape) for t in tables]}")
    for name, x in (("slots", slots), ("starts", starts)):
        if x.ndim != 1 or x.dtype != jnp.int32 or x.shape != slots.shape:
            raise ValueError(f"{op}: {name} expected int32 [B] = [{slots.shape[0]}], got "
                             f"{x.dtype}{list(x.shape)}")
    for t, table in enumerate(tables):
        why = config.misfit(table.shape[2])
        if why:
            raise ValueError(f"{op}: table[{t}]: {why}")
    if slots.shape[0] == 0:  # nothing to move (a grid of size 0 may not launch on a GPU)
        return tables
    blocks = _blocks([t.shape[2] for t in tables], config)
    return tuple(_pallas.pallas_call(
        functools.partial(_shift_kernel, blocks=blocks, width=width),
        name="gdn_shift_rows",
        config=config,
        interpret=interpret,
        grid=(slots.shape[0], blocks[-1][1]),
        out_shape=tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables),
        input_output_aliases={2 + t: t for t in range(len(tables))},
    )(slots, starts, *tables))


def _check(tables, index, rows, config, params):
    op = "scatter_rows"
    if not tables or len(rows) != len(tables):
        raise ValueError(f"{op}: one rows array per table expected, got {len(tables)} tables "
                         f"and {len(rows)} rows")
    gated = len(tables) if params is None else len(tables) - 2  # the first gated table
    for t, (table, r) in enumerate(zip(tables, rows)):
        name = "" if len(tables) == 1 else f"[{t}]"
        if table.ndim != 2 or r.ndim != 2 or r.shape[1] != table.shape[1]:
            raise ValueError(f"{op}: table{name} [N, R] and rows{name} [M, R] expected, got "
                             f"table{name}{list(table.shape)} and rows{name}{list(r.shape)}")
        if table.shape[0] != tables[0].shape[0]:
            raise ValueError(f"{op}: every table has N = {tables[0].shape[0]} rows (one index), "
                             f"got table{name}{list(table.shape)}")
        if t >= gated:
            if table.dtype != jnp.float32 or not jnp.issubdtype(r.dtype, jnp.floating):
                raise ValueError(f"{op}: with gating, table{name} (g, beta) expected float32 "
                                 f"and rows{name} (a, b) a float dtype, got {table.dtype} and "
                                 f"{r.dtype}")
        elif r.dtype != table.dtype:
            raise ValueError(f"{op}: rows{name} expected the table's dtype {table.dtype}, got "
                             f"{r.dtype}")
        why = config.misfit(table.shape[1])
        if why:
            raise ValueError(f"{op}: table{name}: {why}")
    if params is not None:
        R = tables[-1].shape[1]
        if len(tables) < 2 or tables[-2].shape[1] != R or len(params) != 2 or any(
                p.shape != (R,) for p in params):
            raise ValueError(f"{op}: gating expected (A_log, dt_bias) of shape [R] = [{R}] for "
                             f"two last tables (g, beta) of R columns each, got "
                             f"{[list(p.shape) for p in params]} for tables "
                             f"{[list(t.shape) for t in tables[-2:]]}")
    if index.ndim != 1 or index.dtype != jnp.int32 or index.shape[0] != rows[0].shape[0]:
        raise ValueError(f"{op}: index expected int32 [M] = [{rows[0].shape[0]}], got "
                         f"{index.dtype}{list(index.shape)}")
    for t, r in enumerate(rows):
        if r.shape[0] != index.shape[0]:
            raise ValueError(f"{op}: rows[{t}] expected [M] = [{index.shape[0]}] rows, got "
                             f"{list(r.shape)}")
