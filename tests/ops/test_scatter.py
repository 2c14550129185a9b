"""`gdn_jax.ops.scatter`: the cache writes through the row kernel (interpreted here:
GDN_JAX_SCATTER=interpret) equal XLA's `.at[...].set(mode="drop")` bit for bit, with padding
rows (scatter index num_slots), positions past the buffer and rows too short for the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import scatter as scatter_ops
from gdn_jax.ops import slot_index
from gdn_jax.ops.dispatch import Device


@pytest.fixture
def kernel_path(monkeypatch):
    def use(path):
        monkeypatch.setenv(scatter_ops.ENV_VAR, path)
        jax.clear_caches()
    return use


def _bufs(seed, shape, B, T, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    buf = jnp.asarray(rng.standard_normal(shape), dtype)
    x = jnp.asarray(rng.standard_normal((B, T) + shape[2:]) + 10, jnp.float32)
    return buf, x


@pytest.mark.parametrize("row", [(7, 64), (2, 4, 32), (3,)], ids=["conv", "kv", "short-xla"])
def test_write_positions_equals_xla(row, kernel_path):
    S, L, B, T = 6, 9, 4, 3
    buf, x = _bufs(0, (S, L) + row, B, T)
    _, _, scatter = slot_index(jnp.asarray([4, -1, 0, 2], jnp.int32), S)
    pos = jnp.asarray([[0, 1, 2], [5, 6, 7], [7, 8, 9], [3, L + 4, -1]], jnp.int32)  # >= L, < 0
    outs = {}
    for path in ("xla", "interpret"):
        kernel_path(path)
        outs[path] = (np.asarray(scatter_ops.write_positions(buf, scatter, x, pos)),
                      np.asarray(scatter_ops.write_positions(buf, scatter, x)))
    for a, b in zip(outs["xla"], outs["interpret"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outs["xla"][0], np.asarray(buf))  # something was written
    # nothing outside [0, L) and no padding row was written: rows 1, 3, 5 of the buffer and the
    # positions of row 3 other than 3 and 4 are as they were
    got, before = outs["xla"][0], np.asarray(buf)
    np.testing.assert_array_equal(got[[1, 3, 5]], before[[1, 3, 5]])
    np.testing.assert_array_equal(np.delete(got[2], [3, 4], axis=0), np.delete(before[2], [3, 4], axis=0))


def test_write_positions_group_equals_xla(kernel_path, monkeypatch):
    """A group (a verify's candidates: rows of 64, 32 and 3 elements, bf16 and fp32) writes what
    `write_positions` writes for each; the kernel takes the 64 and the 32 (riding along) in one
    launch, XLA the 3."""
    S, L, B, T = 6, 9, 4, 3
    rows = [((2, 32), jnp.bfloat16), ((32,), jnp.float32), ((3,), jnp.float32)]
    bufs, xs = zip(*(_bufs(5 + i, (S, L) + r, B, T, d) for i, (r, d) in enumerate(rows)))
    _, _, scatter = slot_index(jnp.asarray([4, -1, 0, 2], jnp.int32), S)
    pos = jnp.asarray([[0, 1, 2], [5, 6, 7], [7, 8, 9], [3, L + 4, -1]], jnp.int32)
    launches = []
    group = scatter_ops.kernels.scatter_rows_group
    monkeypatch.setattr(scatter_ops.kernels, "scatter_rows_group",
                        lambda tables, *a, **k: launches.append(len(tables)) or group(tables, *a,
                                                                                       **k))
    for p in (pos, None):
        kernel_path("xla")
        want = [scatter_ops.write_positions(b, scatter, x, p) for b, x in zip(bufs, xs)]
        kernel_path("interpret")
        got = scatter_ops.write_positions_group(bufs, scatter, xs, p)
        for w, g, b in zip(want, got, bufs):
            assert g.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
    assert launches == [2, 2]
    kernel_path("interpret")  # short rows alone: XLA, as each would go alone
    scatter_ops.write_positions_group(bufs[1:], scatter, xs[1:], pos)
    assert launches == [2, 2]
    with pytest.raises(ValueError, match=r"bufs \[S, L, \*row\] of one S, L"):
        scatter_ops.write_positions_group((bufs[0], bufs[1][:, :4]), scatter, xs[:2])


@pytest.mark.parametrize("R", [32, 8], ids=["kernel", "short-xla"])
def test_write_positions_group_gating(R, kernel_path, monkeypatch):
    """gating=: a verify's candidates (k rows, then g and beta from raw a, b with -inf padding)
    store `reference.gating`'s gates, whichever path writes them: the kernel's launch (R = 32
    rides along the k rows; relative 2e-6, a few fp32 ulp of exp and log1p apart from XLA's) or
    XLA's gating before plain writes (R = 8: no block of 16 tiles it; bit for bit). Padding
    tokens (a = b = -inf) store g = beta = 0."""
    S, L, B, T = 6, 9, 4, 3
    rng = np.random.default_rng(R)
    k_buf, k = _bufs(2, (S, L, 2, 32), B, T)
    g_buf, beta_buf = (jnp.asarray(rng.standard_normal((S, L, R)), jnp.float32) for _ in "gb")
    a, b = (jnp.asarray(rng.standard_normal((B, T, R)) * 3, jnp.bfloat16) for _ in "ab")
    a, b = a.at[:, -1].set(-jnp.inf), b.at[:, -1].set(-jnp.inf)
    A_log, dt_bias = (jnp.asarray(rng.standard_normal(R), jnp.float32) for _ in "AD")
    _, _, scatter = slot_index(jnp.asarray([4, -1, 0, 2], jnp.int32), S)
    pos = jnp.asarray([[0, 1, 2], [5, 6, 7], [7, 8, 9], [3, L + 4, -1]], jnp.int32)
    launches = []
    group = scatter_ops.kernels.scatter_rows_group
    monkeypatch.setattr(scatter_ops.kernels, "scatter_rows_group",
                        lambda tables, *x, **kw: launches.append(kw.get("gating") is not None)
                        or group(tables, *x, **kw))
    kernel_path("xla")
    g, beta = scatter_ops.reference.gating(a, b, A_log, dt_bias)
    want = [scatter_ops.write_positions(buf, scatter, x, pos)
            for buf, x in ((k_buf, k), (g_buf, g), (beta_buf, beta))]
    kernel_path("interpret")
    got = scatter_ops.write_positions_group((k_buf, g_buf, beta_buf), scatter, (k, a, b), pos,
                                            gating=(A_log, dt_bias))
    assert launches == [R == 32]
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    for w, x in zip(want[1:], got[1:]):
        assert x.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=2e-6 if R == 32 else 0)
    for x in got[1:]:  # row 0 (slot 4) wrote its padding token at position 2: an identity step
        assert not np.asarray(x[4, 2]).any()


def test_write_slots_equals_xla(kernel_path):
    S, B = 5, 3
    buf, x = _bufs(1, (S, 4, 16, 8), B, 4)
    scatter = jnp.asarray([3, 7, -2], jnp.int32)  # 7, -2: out of range, write nothing
    outs = {}
    for path in ("xla", "interpret"):
        kernel_path(path)
        outs[path] = np.asarray(scatter_ops.write_slots(buf, scatter, x))
    np.testing.assert_array_equal(outs["xla"], outs["interpret"])
    np.testing.assert_array_equal(outs["xla"][[0, 1, 2, 4]], np.asarray(buf)[[0, 1, 2, 4]])
    np.testing.assert_array_equal(outs["xla"][3], np.asarray(x[0], np.float32).astype(buf.dtype))


@pytest.mark.parametrize("row", [(7, 64), (3,)], ids=["conv", "short-xla"])
def test_shift_positions_group_equals_xla(row, kernel_path):
    """A commit's conv windows in two layers' buffers: every accepted count 0..L - width,
    padding rows (scatter index num_slots), through the kernel (interpreted; rows of 3 take
    XLA's gather and writes) and XLA alike, bit for bit."""
    S, L, width = 7, 7, 3
    bufs = tuple(_bufs(seed, (S, L) + row, 1, 1)[0] for seed in (1, 2))
    # the padding row last (a padding write to a clipped slot would stay) and slot S - 1 named
    # by no row (where a clipped index lands)
    _, _, scatter = slot_index(jnp.asarray([4, 0, 2, 5, 1, -1], jnp.int32), S)
    starts = jnp.asarray([0, 1, 4, 3, 2, 2], jnp.int32)
    outs = {}
    for path in ("xla", "interpret"):
        kernel_path(path)
        outs[path] = [np.asarray(b) for b in
                      scatter_ops.shift_positions_group(bufs, scatter, starts, width)]
    for got, want, buf in zip(outs["interpret"], outs["xla"], bufs):
        np.testing.assert_array_equal(got, want)
        before = np.asarray(buf)
        for slot, start in ((4, 0), (0, 1), (2, 4), (5, 3), (1, 2)):
            np.testing.assert_array_equal(want[slot, :width], before[slot, start:start + width])
            np.testing.assert_array_equal(want[slot, width:], before[slot, width:])
        for slot in (3, 6):  # named by no row
            np.testing.assert_array_equal(want[slot], before[slot])
    assert scatter_ops.shift_positions_group(bufs, scatter, starts, 0) == bufs  # W = 1


@pytest.mark.parametrize("gpu", [True, False], ids=["h200", "cpu"])
def test_default_is_the_kernel_where_it_compiles(gpu, monkeypatch):
    device = Device("gpu", (9, 0), "H200") if gpu else Device("cpu", None, "cpu")
    monkeypatch.setattr(Device, "of", classmethod(lambda cls, d=None: device))
    monkeypatch.delenv("GDN_JAX_BACKEND", raising=False)
    compiled = "compiled" if gpu else None  # no Triton: XLA's scatter
    for wish in (None, "auto", "pallas"):
        if wish is None:
            monkeypatch.delenv(scatter_ops.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(scatter_ops.ENV_VAR, wish)
        assert scatter_ops._mode(8192) == compiled and scatter_ops._mode(48) is None
    monkeypatch.setenv(scatter_ops.ENV_VAR, "xla")
    assert scatter_ops._mode(8192) is None
    monkeypatch.setenv(scatter_ops.ENV_VAR, "interpret")
    assert scatter_ops._mode(8192) == "interpret" and scatter_ops._mode(48) is None
    monkeypatch.delenv(scatter_ops.ENV_VAR)  # unset: GDN_JAX_BACKEND steers it as it steers the ops
    for backend, mode in (("xla", None), ("interpret", "interpret"), ("triton", compiled)):
        monkeypatch.setenv("GDN_JAX_BACKEND", backend)
        assert scatter_ops._mode(8192) == mode
    monkeypatch.setenv(scatter_ops.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="GDN_JAX_SCATTER: expected auto, xla, pallas or"):
        scatter_ops._mode(8192)


@pytest.mark.gpu
@pytest.mark.parametrize("row", [(7, 8192), (2, 256)], ids=["conv", "kv"])
def test_compiled_kernel_equals_xla_gpu(row, kernel_path):
    if not jax.devices()[0].platform == "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform!r}")
    S, L, B, T = 40, 11, 32, 4
    buf, x = _bufs(2, (S, L) + row, B, T)
    slots = jnp.asarray(np.random.default_rng(3).permutation(S)[:B], jnp.int32).at[5].set(-1)
    _, _, scatter = slot_index(slots, S)
    rng = np.random.default_rng(4)  # distinct positions per row, some past L
    pos = jnp.asarray(np.stack([rng.permutation(L + 3)[:T] for _ in range(B)]), jnp.int32)
    outs = {}
    for path in ("xla", "pallas"):
        kernel_path(path)
        outs[path] = np.asarray(jax.jit(scatter_ops.write_positions)(buf, scatter, x, pos))
    np.testing.assert_array_equal(outs["xla"], outs["pallas"])
