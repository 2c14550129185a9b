"""The row scatter (`kernels.scatter_rows`, `scatter_rows_group`): rows land exactly where their
index says, bit for bit (a copy: no tolerance), padding and out-of-range indices write nothing,
and every row no index names is untouched. The table is random (never zeros), so a block the
kernel skips or writes twice into the wrong row shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import ScatterConfig

TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, N, M, R, dtype):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.standard_normal((N, R)), dtype)
    rows = jnp.asarray(rng.standard_normal((M, R)) + 10, dtype)  # unlike any table row
    index = rng.permutation(N)[:M].astype(np.int32)
    index[::3] = [-1, N, 10 * N][:len(index[::3])] + [-1] * max(0, len(index[::3]) - 3)
    return table, jnp.asarray(index), rows


def _reference(table, index, rows):
    out = np.asarray(table).copy()
    for i, r in enumerate(np.asarray(index)):
        if 0 <= r < out.shape[0]:
            out[r] = np.asarray(rows[i])
    return out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N, M, R, block", [(9, 5, 256, 64), (40, 7, 128, 128), (3, 3, 64, 16)])
def test_scatter_rows_matches_reference_interpret(N, M, R, block, dtype):
    table, index, rows = _case(N + M, N, M, R, dtype)
    out = kernels.scatter_rows(table, index, rows, config=ScatterConfig(block=block),
                               interpret=True)
    assert out.dtype == table.dtype and out.shape == table.shape
    np.testing.assert_array_equal(np.asarray(out), _reference(table, index, rows))


def _group_case(seed, N, M, widths_dtypes):
    """Tables of several row lengths and dtypes, with rows for them written by one index (the
    first table's)."""
    cases = [_case(seed + t, N, M, R, dtype) for t, (R, dtype) in enumerate(widths_dtypes)]
    tables, _, rows = zip(*cases)
    return tuple(tables), cases[0][1], tuple(rows)


@pytest.mark.parametrize("block", [64, 16])
def test_scatter_rows_group_matches_reference_interpret(block):
    """Tables of several widths and dtypes by one index in one launch: each as `scatter_rows`
    writes it alone (a table whose rows the block does not divide takes a smaller block)."""
    tables, index, rows = _group_case(3, 11, 6, [(256, jnp.bfloat16), (32, jnp.float32),
                                                 (96, jnp.bfloat16), (16, jnp.int32)])
    outs = kernels.scatter_rows_group(tables, index, rows, config=ScatterConfig(block=block),
                                      interpret=True)
    assert len(outs) == len(tables)
    for out, table, r in zip(outs, tables, rows):
        assert out.dtype == table.dtype and out.shape == table.shape
        np.testing.assert_array_equal(np.asarray(out), _reference(table, index, r))


def _gated_case(seed, N, M, R, in_dtype):
    """A candidates-like group: k rows copied, and the raw a, b rows whose gates land in fp32 g
    and beta tables; a few a, b entries are -inf (padding tokens) and some large (softplus's
    two branches)."""
    tables, _, rows = _group_case(seed, N, M, [(64, jnp.bfloat16), (R, jnp.float32),
                                               (R, jnp.float32)])
    rng = np.random.default_rng(seed + 100)
    index = rng.permutation(N)[:M].astype(np.int32)  # rows 0 and M - 1 written, 1 and 2 not
    index[1:3] = [-1, N]
    index = jnp.asarray(index)
    a, b = (rng.standard_normal((M, R)) * 4 for _ in range(2))
    a[0, :3], b[0, :3] = [-np.inf, 30.0, -30.0], [-np.inf, 30.0, -30.0]
    a[-1], b[-1] = -np.inf, -np.inf
    params = (jnp.asarray(rng.standard_normal(R)), jnp.asarray(rng.standard_normal(R)))
    params = tuple(p.astype(jnp.float32) for p in params)
    rows = (rows[0], jnp.asarray(a, in_dtype), jnp.asarray(b, in_dtype))
    return tables, index, rows, params


def _gates64(a, b, A_log, dt_bias):
    """The float64 gates of the rows a, b [M, R] (the oracle of `_recurrence.gates`)."""
    a, b = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, b))
    A_log, dt_bias = (np.asarray(x, np.float64) for x in (A_log, dt_bias))
    return -np.exp(A_log) * np.logaddexp(0.0, a + dt_bias), 1.0 / (1.0 + np.exp(-b))


@pytest.mark.parametrize("in_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("R, block", [(32, 64), (64, 16)])
def test_scatter_rows_group_gating_interpret(R, block, in_dtype):
    """gating=: the last two tables take g and beta of the raw a, b rows (fp32 math: relative
    2e-6 against float64, a few ulp of exp and log1p); a = b = -inf writes g = beta = 0 exactly;
    the copied table and every unindexed row as without gating."""
    tables, index, rows, params = _gated_case(R, 13, 7, R, in_dtype)
    outs = kernels.scatter_rows_group(tables, index, rows, gating=params,
                                      config=ScatterConfig(block=block), interpret=True)
    np.testing.assert_array_equal(np.asarray(outs[0]), _reference(tables[0], index, rows[0]))
    for out, table, want in zip(outs[1:], tables[1:], _gates64(*rows[1:], *params)):
        assert out.dtype == jnp.float32
        ref = _reference(table, index, want.astype(np.float32))
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-6, atol=1e-30)
    last = int(index[-1])  # the all -inf row: an identity step
    assert not np.asarray(outs[1][last]).any() and not np.asarray(outs[2][last]).any()


def test_scatter_rows_group_gating_rejects_bad_input():
    tables, index, rows, params = _gated_case(0, 5, 3, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"with gating, table\[1\] \(g, beta\) expected float32"):
        kernels.scatter_rows_group((tables[0], tables[1].astype(jnp.bfloat16), tables[2]), index,
                                   rows, gating=params, interpret=True)
    with pytest.raises(ValueError, match=r"gating expected \(A_log, dt_bias\) of shape \[R\] = "
                                         r"\[32\]"):
        kernels.scatter_rows_group(tables, index, rows, gating=(params[0][:16], params[1]),
                                   interpret=True)


def test_scatter_rows_group_rejects_bad_input():
    t64, t32 = jnp.ones((4, 64), jnp.bfloat16), jnp.ones((5, 32), jnp.float32)
    i = jnp.zeros((2,), jnp.int32)
    r64, r32 = jnp.ones((2, 64), jnp.bfloat16), jnp.ones((2, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"every table has N = 4 rows \(one index\)"):
        kernels.scatter_rows_group((t64, t32), i, (r64, r32), interpret=True)
    with pytest.raises(ValueError, match=r"one rows array per table expected, got 2 tables"):
        kernels.scatter_rows_group((t64, t64), i, (r64,), interpret=True)
    with pytest.raises(ValueError, match=r"rows\[1\] expected \[M\] = \[2\] rows"):
        kernels.scatter_rows_group((t64, t64), i, (r64, jnp.ones((3, 64), jnp.bfloat16)),
                                   interpret=True)


def test_no_rows_is_the_table():
    table = jnp.ones((4, 64), jnp.bfloat16)
    out = kernels.scatter_rows(table, jnp.zeros((0,), jnp.int32), jnp.zeros((0, 64), jnp.bfloat16),
                               config=ScatterConfig(block=64), interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table))


@pytest.mark.parametrize("shapes, match", [
    (((4, 64), (2,), (2, 32)), r"table \[N, R\] and rows \[M, R\] expected"),
    (((4, 64), (3,), (2, 64)), r"index expected int32 \[M\] = \[2\]"),
    (((4, 40), (2,), (2, 40)), r"no power-of-two block of 16..32 elements divides the row length "
                               r"R=40"),
])
def test_scatter_rows_rejects_bad_input(shapes, match):
    t, i, r = shapes
    with pytest.raises(ValueError, match=match):
        kernels.scatter_rows(jnp.ones(t, jnp.bfloat16), jnp.zeros(i, jnp.int32),
                             jnp.ones(r, jnp.bfloat16), config=ScatterConfig(block=32),
                             interpret=True)
    with pytest.raises(ValueError, match="rows expected the table's dtype"):
        kernels.scatter_rows(jnp.ones((4, 64), jnp.bfloat16), jnp.zeros((2,), jnp.int32),
                             jnp.ones((2, 64), jnp.float32), config=ScatterConfig(block=32),
                             interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_scatter_rows_lowers_for_cuda(kind, cuda_lowering):
    table = jax.ShapeDtypeStruct((32 * 7, 8192), jnp.bfloat16)
    index = jax.ShapeDtypeStruct((32,), jnp.int32)
    rows = jax.ShapeDtypeStruct((32, 8192), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.scatter_rows.trace(table, index, rows, config=ScatterConfig()).lower(
            lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


def test_scatter_rows_group_lowers_for_cuda(cuda_lowering):
    tables = (jax.ShapeDtypeStruct((224, 8192), jnp.bfloat16),
              jax.ShapeDtypeStruct((224, 32), jnp.float32))
    rows = (jax.ShapeDtypeStruct((32, 8192), jnp.bfloat16),
            jax.ShapeDtypeStruct((32, 32), jnp.float32))
    index = jax.ShapeDtypeStruct((32,), jnp.int32)
    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        text = kernels.scatter_rows_group.trace(tables, index, rows).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1


def test_scatter_rows_group_gating_lowers_for_cuda(cuda_lowering):
    """A B = 32 verify's candidates with the gating in the launch (H100): one Triton call."""
    tables = (jax.ShapeDtypeStruct((64 * 4, 2048), jnp.bfloat16),
              jax.ShapeDtypeStruct((64 * 4, 32), jnp.float32),
              jax.ShapeDtypeStruct((64 * 4, 32), jnp.float32))
    rows = (jax.ShapeDtypeStruct((128, 2048), jnp.bfloat16),
            jax.ShapeDtypeStruct((128, 32), jnp.bfloat16),
            jax.ShapeDtypeStruct((128, 32), jnp.bfloat16))
    params = (jax.ShapeDtypeStruct((32,), jnp.float32),) * 2
    index = jax.ShapeDtypeStruct((128,), jnp.int32)
    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        text = kernels.scatter_rows_group.trace(tables, index, rows, gating=params).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_scatter_rows_group_gating_gpu(in_dtype, on_gpu):
    """As the interpret test, compiled (the kernel's exp / log1p are the GPU's)."""
    tables, index, rows, params = _gated_case(7, 4 * 64, 4 * 32, 32, in_dtype)
    outs = jax.jit(kernels.scatter_rows_group)(tables, index, rows, gating=params)
    np.testing.assert_array_equal(np.asarray(outs[0]), _reference(tables[0], index, rows[0]))
    for out, table, want in zip(outs[1:], tables[1:], _gates64(*rows[1:], *params)):
        ref = _reference(table, index, want.astype(np.float32))
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-6, atol=1e-30)


@pytest.mark.gpu
def test_scatter_rows_group_matches_reference_gpu(on_gpu):
    """A replay verify's candidates at B = 32: k, v bf16 and g, beta fp32 rows, one launch."""
    tables, index, rows = _group_case(5, 4 * 64, 4 * 32, [(2048, jnp.bfloat16),
                                                         (4096, jnp.bfloat16),
                                                         (32, jnp.float32), (32, jnp.float32)])
    outs = jax.jit(kernels.scatter_rows_group)(tables, index, rows)
    for out, table, r in zip(outs, tables, rows):
        np.testing.assert_array_equal(np.asarray(out), _reference(table, index, r))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N, M, R", [(224, 32, 8192), (4096, 128, 512), (33, 33, 2048)])
def test_scatter_rows_matches_reference_gpu(N, M, R, dtype, on_gpu):
    table, index, rows = _case(N + M, N, M, R, dtype)
    out = jax.jit(kernels.scatter_rows, static_argnames=("config",))(
        table, index, rows, config=ScatterConfig(block=min(R, 2048)))
    np.testing.assert_array_equal(np.asarray(out), _reference(table, index, rows))


def _shift_reference(table, slots, starts, width):
    out = np.asarray(table).copy()
    for s, start in zip(np.asarray(slots), np.asarray(starts)):
        if 0 <= s < out.shape[0] and 0 <= start <= out.shape[1] - width:
            out[s, :width] = np.asarray(table)[s, start:start + width]
    return out


@pytest.mark.parametrize("L, width, block", [(7, 3, 64), (5, 1, 64), (4, 4, 16)])
def test_shift_rows_group_matches_reference_interpret(L, width, block):
    """Tables of several row lengths and dtypes (one N, L) by one (slots, starts) in one launch:
    every start from 0 to L - width (overlapping moves among them), a padding slot (-1), one
    past the pool (N) and a start past L - width: those move nothing, nor do rows no slot
    names."""
    N = 9
    rng = np.random.default_rng(L + width)
    tables = tuple(jnp.asarray(rng.standard_normal((N, L, R)), dtype)
                   for R, dtype in ((256, jnp.bfloat16), (32, jnp.float32), (96, jnp.bfloat16)))
    n = L - width + 1
    starts = np.concatenate([np.arange(n), [1, 0, L - width + 1]])  # the last past L - width
    slots = rng.permutation(N)[:n + 3]
    slots[n:n + 2] = [-1, N]
    slots, starts = jnp.asarray(slots, jnp.int32), jnp.asarray(starts, jnp.int32)
    outs = kernels.shift_rows_group(tables, slots, starts, width=width,
                                    config=ScatterConfig(block=block), interpret=True)
    assert len(outs) == len(tables)
    for out, table in zip(outs, tables):
        assert out.dtype == table.dtype and out.shape == table.shape
        want = _shift_reference(table, slots, starts, width)
        np.testing.assert_array_equal(np.asarray(out), want)
        if n > 1:
            assert not np.array_equal(want, np.asarray(table))  # something moved


@pytest.mark.parametrize("shapes, slots, starts, width, match", [
    (((4, 7, 64),), (2,), (2,), 8, r"tables \[N, L, R\] of one N and L, L >= width = 8"),
    (((4, 64),), (2,), (2,), 1, r"tables \[N, L, R\] of one N and L"),
    (((4, 7, 64), (4, 6, 64)), (2,), (2,), 1, r"tables \[N, L, R\] of one N and L"),
    (((4, 7, 64),), (2,), (3,), 3, r"starts expected int32 \[B\] = \[2\], got int32\[3\]"),
    (((4, 7, 64), (4, 7, 40)), (2,), (2,), 3,
     r"table\[1\]: no power-of-two block of 16..32 elements divides"),
])
def test_shift_rows_group_rejects_bad_input(shapes, slots, starts, width, match):
    with pytest.raises(ValueError, match=match):
        kernels.shift_rows_group(tuple(jnp.ones(s, jnp.bfloat16) for s in shapes),
                                 jnp.zeros(slots, jnp.int32), jnp.zeros(starts, jnp.int32),
                                 width=width, config=ScatterConfig(block=32), interpret=True)


def test_shift_rows_group_lowers_for_cuda(cuda_lowering):
    """A 48-layer Qwen3.5 commit: 36 conv buffers of [7, 8192], one Triton call."""
    tables = (jax.ShapeDtypeStruct((40, 7, 8192), jnp.bfloat16),) * 36
    index = jax.ShapeDtypeStruct((32,), jnp.int32)
    with cuda_lowering("NVIDIA H100 80GB HBM3"):
        text = kernels.shift_rows_group.trace(tables, index, index, width=3).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1


@pytest.mark.gpu
def test_shift_rows_group_matches_reference_gpu(on_gpu):
    """A B = 32 commit of Qwen3.5's conv windows (W - 1 = 3 of 7 rows of 8192 channels) in four
    layers' buffers (bf16 and fp32), accepted counts 0..4, two padding rows."""
    N, B = 40, 32
    rng = np.random.default_rng(7)
    tables = tuple(jnp.asarray(rng.standard_normal((N, 7, 8192)), dtype)
                   for dtype in (jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.bfloat16))
    slots = rng.permutation(N)[:B].astype(np.int32)
    slots[[3, 17]] = [-1, N]
    starts = jnp.asarray(rng.integers(0, 5, B), jnp.int32)
    outs = jax.jit(kernels.shift_rows_group, static_argnames=("width",))(
        tables, jnp.asarray(slots), starts, width=3)
    for out, table in zip(outs, tables):
        np.testing.assert_array_equal(np.asarray(out),
                                      _shift_reference(table, slots, starts, 3))
