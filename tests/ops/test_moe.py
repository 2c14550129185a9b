"""`gdn_jax.ops.moe.routed` (the grouped Pallas kernel, in the interpreter on CPU) against the
per-expert float64 sum, and SparseMoE's "pallas" expert path against its XLA paths.

Routing is random with ties across tokens (two tokens on the same experts) and experts that get
no token. Tolerance (bf16): the kernel rounds h = silu(x W_gate) * (x W_up) to bf16 once (the
reference does the same in float64, so only h elements on a rounding boundary can differ, by one
ulp: 2**-7 relative), rounds each expert's output once, and rounds the weighted sum once:
|out - ref| <= 2**-7 * sum_j |w_j| (|h_j| @ |W_down|) + 2**-8 |ref|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from gdn_jax import kernels
from gdn_jax.models.sharding import attach_mesh, param_specs
from gdn_jax.modules.mlp import SparseMoE, set_expert_path
from gdn_jax.ops import moe
from gdn_jax.ops.residual_norm import WeightedRows
from gdn_jax.ops.dispatch import Device

BF16 = jnp.bfloat16


def _case(seed, T, k, E, H, I):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    if T > 1:
        ids[1] = ids[0]
    w = rng.random((T, k))
    w /= w.sum(1, keepdims=True)
    arr = lambda shape, s: jnp.asarray(rng.standard_normal(shape) * s, BF16)  # noqa: E731
    return (arr((T, H), 1.0), jnp.asarray(w, BF16), jnp.asarray(ids, jnp.int32),
            arr((E, H, I), H ** -0.5), arr((E, H, I), H ** -0.5), arr((E, I, H), I ** -0.5))


def _reference(x, w, ids, wg, wu, wd):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    T, H = x.shape
    ref, scale = np.zeros((T, H)), np.zeros((T, H))
    for t in range(T):
        for j, e in enumerate(np.asarray(ids[t])):
            g, u = f(x[t]) @ f(wg[e]), f(x[t]) @ f(wu[e])
            h = f(jnp.asarray(g / (1 + np.exp(-g)) * u, BF16))  # the kernel's one rounding of h
            ref[t] += f(w[t, j]) * (h @ f(wd[e]))
            scale[t] += abs(f(w[t, j])) * (np.abs(h) @ np.abs(f(wd[e])))
    return ref, scale


def _assert_close(out, ref, scale):
    err = np.abs(np.asarray(out, np.float64) - ref)
    bound = 2.0 ** -7 * scale + 2.0 ** -8 * np.abs(ref)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"


@pytest.mark.parametrize("T, k, E", [(1, 10, 64), (4, 2, 64), (12, 4, 8), (40, 2, 16)],
                         ids=["decode-top10", "ties-one-block-per-pair", "ties", "many-per-expert"])
@pytest.mark.parametrize("sort", [False, True], ids=["compare", "sort"])
def test_routed_matches_per_expert_sum(T, k, E, sort, monkeypatch):
    """The first two cases run a block per pair (`one_block_per_pair`), the others blocks of one
    expert each, planned by comparisons (decode, verify) or by a sort (prefill-sized P)."""
    if sort:
        monkeypatch.setattr(kernels.moe, "_COMPARE_MAX_PAIRS", 0)
    assert moe.one_block_per_pair(T * k, E) == (E == 64)
    args = _case(T * E, T, k, E, 128, 64)
    out = moe.routed(*args)
    assert out.shape == (T, 128) and out.dtype == BF16
    _assert_close(out, *_reference(*args))


@pytest.mark.parametrize("splits", [(2, 1), (1, 2), (4, 2)], ids=["up2", "down2", "up4-down2"])
@pytest.mark.parametrize("T, k, E", [(1, 10, 64), (12, 4, 8)], ids=["pairs", "plan"])
def test_routed_split_k_matches_per_expert_sum(T, k, E, splits):
    """K cut into slices: the gate / up's fp32 partial sums finish in the down kernel's load
    (silu(gate) * up, rounded once as unsplit), the down's in the combine; the same bound."""
    args = _case(7 * T, T, k, E, 128, 64)
    configs = (kernels.MoEConfig(16, 32, 32, splits=splits[0]),
               kernels.MoEConfig(16, 32, 16, splits=splits[1]))
    out = moe.routed(*args, configs=configs)
    assert out.shape == (T, 128) and out.dtype == BF16
    _assert_close(out, *_reference(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 32])
def test_routed_matches_per_expert_sum_gpu(T):
    """The 35B's experts at decode token counts, with the dispatch's configs and with gate / up
    split in two (the down forming h from the partial sums, only the token rows loaded); with
    the shared expert as the k + 1-th."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {jax.devices()[0].platform!r}")
    args = _case(T, T, 8, 256, 2048, 512)
    ref = _reference(*args)
    _assert_close(moe.routed(*args), *ref)
    split = (kernels.MoEConfig(16, 64, 128, splits=2), kernels.MoEConfig(16, 64, 128))
    _assert_close(moe.routed(*args, configs=split), *ref)
    sg, su, sd, sw = _shared_case(T, T, 2048, 512)  # the shared expert as the k + 1-th
    s_ref, s_scale = _reference(args[0], sw[:, None], jnp.zeros((T, 1), jnp.int32), sg[None],
                                su[None], sd[None])
    x, w, *rest = args
    for configs in (None, split):  # the shared blocks past the routed ones, split or not
        _assert_close(moe.routed(x, _with(w, sw), *rest, shared=(sg, su, sd), configs=configs),
                      ref[0] + s_ref, ref[1] + s_scale)


def _shared_case(seed, T, H, I):
    """(gate, up, down, weight [T]) of a shared expert."""
    rng = np.random.default_rng(seed)
    arr = lambda shape, s: jnp.asarray(rng.standard_normal(shape) * s, BF16)  # noqa: E731
    return (arr((H, I), H ** -0.5), arr((H, I), H ** -0.5), arr((I, H), I ** -0.5),
            jnp.asarray(rng.random(T) + 0.1, BF16))


def _with(weights, shared_weight):
    """The routed weights [T, k] and the shared expert's [T] as `routed(shared=)` takes them."""
    return jnp.concatenate([weights, shared_weight[:, None]], axis=1)


@pytest.mark.parametrize("T, k, E", [(1, 10, 64), (3, 4, 64), (12, 4, 8)],
                         ids=["pairs", "pairs-3-tokens", "plan"])
@pytest.mark.parametrize("splits", [(1, 1), (2, 1), (1, 2)], ids=["whole", "up2", "down2"])
def test_routed_runs_a_shared_expert_as_one_more(T, k, E, splits):
    """shared: every token's k + 1-th expert, its own weights, its own weight per token: the
    routed reference plus weight * the shared SwiGLU (h rounded once, as the kernel's), the
    same bound."""
    x, w, ids, wg, wu, wd = _case(11 * T, T, k, E, 128, 64)
    sg, su, sd, sw = _shared_case(T, T, 128, 64)
    configs = (kernels.MoEConfig(16, 32, 32, splits=splits[0]),
               kernels.MoEConfig(16, 32, 16, splits=splits[1]))
    out = moe.routed(x, _with(w, sw), ids, wg, wu, wd, shared=(sg, su, sd), configs=configs)
    ref, scale = _reference(x, w, ids, wg, wu, wd)
    s_ref, s_scale = _reference(x, sw[:, None], jnp.zeros((T, 1), jnp.int32), sg[None],
                                su[None], sd[None])
    assert np.abs(s_ref).max() > 0.1 * np.abs(ref).max()  # the shared part counts
    _assert_close(out, ref + s_ref, scale + s_scale)


@pytest.mark.parametrize("T, k, E", [(1, 8, 64), (3, 4, 64), (12, 4, 8)],
                         ids=["one-token", "pairs-3-tokens", "plan"])
def test_routed_default_configs_with_a_shared_expert(T, k, E, monkeypatch):
    """routed's own configs (a block per pair, or the grouped plan at 12 tokens) with a shared
    expert: two unsplit launches, the same bound as the per-expert reference."""
    x, w, ids, wg, wu, wd = _case(13 * T, T, k, E, 256, 64)
    sg, su, sd, sw = _shared_case(T, T, 256, 64)
    calls, kernel = [], kernels.grouped_matmul

    def recorded(*args, **kwargs):  # what routed asks of the kernel
        calls.append(kwargs["config"].splits)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernels, "grouped_matmul", recorded)
    out = moe.routed(x, _with(w, sw), ids, wg, wu, wd, shared=(sg, su, sd))
    assert calls == [1, 1]
    ref, scale = _reference(x, w, ids, wg, wu, wd)
    s_ref, s_scale = _reference(x, sw[:, None], jnp.zeros((T, 1), jnp.int32), sg[None],
                                su[None], sd[None])
    _assert_close(out, ref + s_ref, scale + s_scale)


def test_routed_rejects_a_bad_shared_expert():
    x, w, ids, wg, wu, wd = _case(0, 4, 2, 8, 64, 32)
    sg, su, sd, sw = _shared_case(0, 4, 64, 16)
    w1 = _with(w, sw)
    with pytest.raises(ValueError, match=r"shared expected gate \[H, I\], up \[H, I\], down "
                                         r"\[I, H\] with H = 64, I = 32"):
        moe.routed(x, w1, ids, wg, wu, wd, shared=(sg, su, sd))
    sg, su, sd, sw = _shared_case(0, 4, 64, 32)
    with pytest.raises(ValueError, match=r"shared expected \(gate, up, down\)"):
        moe.routed(x, w1, ids, wg, wu, wd, shared=(sg, su, sd, sw))
    with pytest.raises(ValueError, match=r"shared expected x's dtype bfloat16, got \['float16'"):
        moe.routed(x, w1, ids, wg, wu, wd, shared=(sg.astype(jnp.float16), su, sd))
    with pytest.raises(ValueError, match=r"weights \[T, k \+ 1\] with T = 4, got ids\[4, 2\] "
                                         r"and weights\[4, 2\]"):
        moe.routed(x, w, ids, wg, wu, wd, shared=(sg, su, sd))  # the shared weight missing


def test_routed_rejects_configs_of_two_block_m():
    with pytest.raises(ValueError, match="configs expected one block_m, got 16 and 32"):
        moe.routed(*_case(0, 2, 2, 8, 64, 32),
                   configs=(kernels.MoEConfig(16, 32, 32), kernels.MoEConfig(32, 32, 32)))


@pytest.mark.parametrize("with_shared", [False, True], ids=["routed", "shared"])
def test_routed_shards_sum_to_the_whole(with_shared):
    """Tensor parallel: each shard holds half of every expert's intermediate dim (the shared
    expert's too, as SparseMoE shards it) and returns its partial sum; the halves add up to the
    whole."""
    x, w, ids, wg, wu, wd = _case(3, 6, 3, 8, 128, 64)
    sg, su, sd, sw = _shared_case(3, 6, 128, 64)
    halves = [moe.routed(x, _with(w, sw) if with_shared else w, ids, wg[..., s], wu[..., s],
                         wd[:, s], shared=(sg[:, s], su[:, s], sd[s]) if with_shared else None)
              for s in (slice(0, 32), slice(32, 64))]
    total = np.asarray(halves[0], np.float64) + np.asarray(halves[1], np.float64)
    ref, scale = _reference(x, w, ids, wg, wu, wd)
    if with_shared:
        s_ref, s_scale = _reference(x, sw[:, None], jnp.zeros((6, 1), jnp.int32), sg[None],
                                    su[None], sd[None])
        ref, scale = ref + s_ref, scale + s_scale
    _assert_close(total, ref, 2 * scale)


def test_config_narrows_columns_for_few_blocks():
    """A decode step at B = 1 (8 blocks, 512-wide experts) gets 32 columns, so 128 programs;
    32 blocks of them (a verify step at B = 1: 256 programs), 8 blocks of a 2048-wide expert
    (256) or many blocks keep 64; a dim that 32 does not divide keeps what divides it; K stays
    whole (split-K measured slower end to end)."""
    assert moe.config_for(8, 256, 2048, 512).block_n == 32
    assert moe.config_for(32, 256, 2048, 512).block_n == 64
    assert moe.config_for(8, 256, 512, 2048).block_n == 64
    assert moe.config_for(16, 256, 512, 2048).block_n == 64
    assert moe.config_for(1024, 256, 2048, 512).block_n == 64
    assert moe.config_for(8, 256, 2048, 48).block_n == 16
    assert moe.config_for(8, 256, 2048, 512).splits == 1
    # routed's pair: a shared expert is one more expert and one more pair a token
    assert moe.default_configs(8, 1, 256, 2048, 512, shared=True, sm_count=132) == (
        moe.config_for(9, 257, 2048, 512), moe.config_for(9, 257, 512, 2048))
    on_gpu = jax.devices()[0].platform == "gpu"
    assert moe.runs_compiled(BF16, 2048, 512) == on_gpu  # CPU: SparseMoE's "auto" stays in XLA
    assert not moe.runs_compiled(jnp.float32, 2048, 512)


def test_routed_rejects_bad_shapes():
    x, w, ids, wg, wu, wd = _case(0, 4, 2, 8, 64, 32)
    with pytest.raises(ValueError, match=r"ids expected \[T, k\] and weights \[T, k\] with "
                                         r"T = 4"):
        moe.routed(x, w[:3], ids[:3], wg, wu, wd)
    with pytest.raises(ValueError, match=r"expert weights expected \[E, H, I\]"):
        moe.routed(x, w, ids, wg, wu, wd[:, :16])


def test_sparse_moe_pallas_path_matches_grouped():
    moe_block = SparseMoE(64, 8, 2, 32, 32, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 64)), BF16)
    outs = {}
    for path in ("grouped", "pallas"):
        set_expert_path(moe_block, path)
        outs[path] = np.asarray(moe_block(x), np.float64)
    assert outs["pallas"].shape == (3, 5, 64)
    np.testing.assert_allclose(outs["pallas"], outs["grouped"], rtol=2 ** -6,
                               atol=2 ** -6 * np.abs(outs["grouped"]).max())


def test_sparse_moe_pallas_path_needs_16_bit():
    moe_block = SparseMoE(64, 8, 2, 32, 32, expert_path="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expert_path 'pallas' needs bf16 or fp16"):
        moe_block(jnp.ones((2, 64)))


def test_route_takes_the_kernel_where_it_runs(monkeypatch):
    """GDN_JAX_MOE_ROUTER unset ("auto"): the compiled kernel for 16-bit logits where Triton runs
    (the device faked here), XLA for fp32 logits or where Triton does not run; unset, the
    backend's xla and interpret steer it; "xla": XLA; "interpret": the kernel interpreted; a
    value it does not know: an error naming the variable."""
    calls = []
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(kw) or (None, None))
    call = lambda normalize=True, interpret=False, warps=4: dict(  # noqa: E731
        k=8, normalize=normalize, shared_gate=None, interpret=interpret, num_warps=warps)
    logits = jnp.ones((3, 64), BF16)
    monkeypatch.delenv(moe.ROUTER_VAR, raising=False)
    monkeypatch.delenv("GDN_JAX_BACKEND", raising=False)
    monkeypatch.setattr(Device, "runs_triton", property(lambda self: False))
    moe.route(logits, 8)
    assert calls == []
    monkeypatch.setattr(Device, "runs_triton", property(lambda self: True))
    moe.route(logits, 8)
    assert calls == [call()]
    moe.route(logits.astype(jnp.float32), 8)  # fp32 (training): XLA's, which has a gradient
    assert len(calls) == 1
    for backend, want in (("xla", []), ("interpret", [call(False, True)])):
        calls.clear()
        monkeypatch.setenv("GDN_JAX_BACKEND", backend)
        moe.route(logits, 8, normalize=False)
        assert calls == want, backend
    monkeypatch.delenv("GDN_JAX_BACKEND")
    for value, want in (("xla", []), ("pallas", [call()]), ("interpret", [call(True, True)])):
        calls.clear()
        monkeypatch.setenv(moe.ROUTER_VAR, value)
        moe.route(logits, 8)
        assert calls == want, value
    calls.clear()
    moe.route(logits[:1], 8)  # one row (B = 1 decode), interpreted: one warp
    assert calls == [call(True, True, 1)] and moe._ROUTE_WARPS_ONE_ROW == 1
    calls.clear()
    moe.route(jnp.ones((3, 48), BF16), 8)  # 48 experts: no kernel block, XLA
    assert calls == []
    monkeypatch.setenv(moe.ROUTER_VAR, "fast")
    with pytest.raises(ValueError, match="GDN_JAX_MOE_ROUTER: expected auto, xla"):
        moe.route(logits, 8)


def test_route_kernel_matches_xla():
    """The kernel (interpreted) and XLA's steps: the same ids, weights within one rounding."""
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), BF16)
    w_xla, ids_xla = moe.route(logits, 8)  # CPU: XLA's
    w, ids = kernels.route(logits, k=8, normalize=True, interpret=True)
    assert w_xla.dtype == w.dtype == BF16 and ids_xla.dtype == ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_xla))
    np.testing.assert_allclose(np.asarray(w, np.float32), np.asarray(w_xla, np.float32),
                               rtol=2 ** -7)


def test_route_appends_the_shared_gate_on_both_paths(monkeypatch):
    """shared_gate: weights [T, k + 1], the last sigmoid(x . w) in fp32 rounded once, from the
    kernel (interpreted) and from XLA's steps alike (within one bf16 rounding of each other);
    the routed columns and ids as without it."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((3, 64)), BF16)
    x = jnp.asarray(rng.standard_normal((3, 128)), BF16)
    gw = jnp.asarray(rng.standard_normal((128, 1)) * 128 ** -0.5, BF16)
    monkeypatch.setenv(moe.ROUTER_VAR, "xla")
    w_xla, ids_xla = moe.route(logits, 8, shared_gate=(x, gw))
    plain, _ = moe.route(logits, 8)
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    w, ids = moe.route(logits, 8, shared_gate=(x, gw))
    assert w.shape == w_xla.shape == (3, 9) and w.dtype == w_xla.dtype == BF16
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_xla))
    np.testing.assert_array_equal(np.asarray(w_xla[:, :8]), np.asarray(plain))
    exact = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(gw, np.float64))[:, 0]))
    for got in (w, w_xla):
        np.testing.assert_allclose(np.asarray(got[:, 8], np.float64), exact, rtol=2 ** -8)
    for path in ("xla", "interpret"):  # the same checks before either runs
        monkeypatch.setenv(moe.ROUTER_VAR, path)
        with pytest.raises(ValueError, match=r"shared_gate expected x \[T, H\] with T = 3"):
            moe.route(logits, 8, shared_gate=(x[:2], gw))
        with pytest.raises(ValueError, match=r"shared_gate expected \(x \[T, H\], w \[H\]\)"):
            moe.route(logits, 8, shared_gate=(x,))
        with pytest.raises(ValueError, match="one float dtype, got float32 and bfloat16"):
            moe.route(logits, 8, shared_gate=(x.astype(jnp.float32), gw))


def test_route_reads_a_projections_partial_sums(monkeypatch):
    """logits as a `Partials` view (the router projection's unadded split-K sums): the kernel
    adds them on load (its call given the view's columns and dtype), XLA's path takes the
    view's value; the same ids, weights within one rounding; a view of more than one lead axis
    is refused."""
    from gdn_jax.ops.projection import Partials
    rng = np.random.default_rng(7)
    parts = jnp.asarray(rng.standard_normal((2, 3, 96)), jnp.float32)
    view = Partials(parts, 32, 64, (3,), jnp.dtype(BF16))
    calls = []
    real = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(
        (a[0].shape, kw.get("col"), kw.get("num_experts"))) or real(*a, **kw))
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    w, ids = moe.route(view, 8)
    assert calls == [((2, 3, 96), 32, 64)] and w.dtype == BF16
    monkeypatch.setenv(moe.ROUTER_VAR, "xla")
    w_xla, ids_xla = moe.route(view, 8)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_xla))
    np.testing.assert_allclose(np.asarray(w, np.float32), np.asarray(w_xla, np.float32),
                               rtol=2 ** -7)
    gate = (jnp.asarray(rng.standard_normal((3, 48)), BF16),  # H = 48: joins after the kernel
            jnp.asarray(rng.standard_normal(48) * 48 ** -0.5, BF16))
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    w_g, ids_g = moe.route(view, 8, shared_gate=gate)
    monkeypatch.setenv(moe.ROUTER_VAR, "xla")
    w_gx, _ = moe.route(view, 8, shared_gate=gate)
    np.testing.assert_array_equal(np.asarray(ids_g), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(w_g[:, :8]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(w_g[:, 8]), np.asarray(w_gx[:, 8]))
    with pytest.raises(ValueError, match=r"a Partials view of logits expected lead \(T,\)"):
        moe.route(Partials(parts, 32, 64, (1, 3), jnp.dtype(BF16)), 8)


def test_route_appends_a_gate_the_kernel_cannot_block(monkeypatch):
    """A shared gate of H = 48 inputs (no power of two): the router kernel still routes, the
    gate joins after it in XLA; the same weights as XLA's path."""
    calls = []
    real = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(
        kw["shared_gate"]) or real(*a, **kw))
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((3, 64)), BF16)
    gate = (jnp.asarray(rng.standard_normal((3, 48)), BF16),
            jnp.asarray(rng.standard_normal((48, 1)) * 48 ** -0.5, BF16))
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    w, ids = moe.route(logits, 8, shared_gate=gate)
    assert calls == [None] and w.shape == (3, 9) and w.dtype == BF16
    monkeypatch.setenv(moe.ROUTER_VAR, "xla")
    w_xla, ids_xla = moe.route(logits, 8, shared_gate=gate)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_xla))
    np.testing.assert_array_equal(np.asarray(w[:, 8]), np.asarray(w_xla[:, 8]))
    np.testing.assert_allclose(np.asarray(w, np.float32), np.asarray(w_xla, np.float32),
                               rtol=2 ** -7)


def test_sparse_moe_router_kernel_matches_xla(monkeypatch):
    calls = []
    real = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    moe_block = SparseMoE(64, 8, 2, 32, 32, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 64)), BF16)
    monkeypatch.setenv(moe.ROUTER_VAR, "xla")
    want = np.asarray(moe_block(x), np.float64)
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    got = np.asarray(moe_block(x), np.float64)
    assert len(calls) == 1  # the second call routed through the kernel
    np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2 ** -7 * np.abs(want).max())


def test_sparse_moe_folds_its_shared_expert_when_asked(monkeypatch):
    """GDN_JAX_MOE_SHARED=fold on the Pallas path: the shared expert (its size the experts')
    goes into routed's launches; the block's output as apart's up to rounding (fold sums the
    shared part in fp32 with the routed ones); unset ("auto"): folded while the routed pairs
    get a block each (4 x pairs <= E), apart beyond; a value it does not know: an error."""
    seen = []
    real = moe.routed
    monkeypatch.setattr(moe, "routed", lambda *a, **kw: seen.append(
        kw.get("shared") is not None) or real(*a, **kw))
    moe_block = SparseMoE(64, 8, 2, 32, 32, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(3))
    set_expert_path(moe_block, "pallas")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 64)), BF16)
    monkeypatch.setenv(moe.SHARED_VAR, "apart")
    apart = np.asarray(moe_block(x), np.float64)
    monkeypatch.setenv(moe.SHARED_VAR, "fold")
    fold = np.asarray(moe_block(x), np.float64)
    assert seen == [False, True]
    np.testing.assert_allclose(fold, apart, rtol=2 ** -6, atol=2 ** -7 * np.abs(apart).max())
    monkeypatch.delenv(moe.SHARED_VAR)
    moe_block(x)  # 15 tokens x 2 = 30 pairs of 8 experts: apart
    moe_block(x[:1, :2])  # 2 tokens, 4 pairs (the pairs count, not the tokens): apart
    moe_block(x[:1, :1])  # 2 pairs: folded
    assert seen == [False, True, False, False, True]
    monkeypatch.setenv(moe.SHARED_VAR, "fold")
    set_expert_path(moe_block, "grouped")  # off the Pallas path: apart whatever the variable
    moe_block(x)
    assert seen == [False, True, False, False, True]
    other = SparseMoE(64, 8, 2, 32, 16, expert_path="pallas", dtype=BF16, param_dtype=BF16,
                      rngs=nnx.Rngs(3))
    other(x)  # a shared expert of another size than the experts': apart
    assert seen == [False, True, False, False, True, False]
    calls = []  # folded, the router kernel takes the shared gate in its launch
    real_route = kernels.route
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(
        kw["shared_gate"] is not None) or real_route(*a, **kw))
    monkeypatch.setenv(moe.ROUTER_VAR, "interpret")
    set_expert_path(moe_block, "pallas")
    kernel_gate = np.asarray(moe_block(x), np.float64)
    assert calls == [True] and seen[-1]
    np.testing.assert_allclose(kernel_gate, fold, rtol=2 ** -6,
                               atol=2 ** -7 * np.abs(fold).max())
    # and the router projection's partial sums, added in the router kernel
    wide = SparseMoE(64, 16, 2, 32, 32, expert_path="pallas", dtype=BF16, param_dtype=BF16,
                     rngs=nnx.Rngs(7))  # 16 experts: a width the projection kernel tiles
    want = np.asarray(wide(x), np.float64)
    calls.clear()
    monkeypatch.setenv("GDN_JAX_PROJECTION", "interpret")
    monkeypatch.setattr(kernels, "route", lambda *a, **kw: calls.append(
        kw.get("parts_dtype")) or real_route(*a, **kw))
    from_parts = np.asarray(wide(x), np.float64)
    assert calls == [BF16]
    np.testing.assert_allclose(from_parts, want, rtol=2 ** -6,
                               atol=2 ** -7 * np.abs(want).max())
    monkeypatch.delenv("GDN_JAX_PROJECTION")
    set_expert_path(moe_block, "grouped")
    monkeypatch.setenv(moe.SHARED_VAR, "merge")
    with pytest.raises(ValueError, match="GDN_JAX_MOE_SHARED: expected auto, apart or fold"):
        moe_block(x)  # checked on every path (this one is "grouped")


@pytest.mark.parametrize("shared, router", [("apart", "xla"), ("fold", "xla"),
                                            ("fold", "interpret")])
def test_sparse_moe_on_a_mesh_matches_one_device(shared, router, monkeypatch):
    """The Pallas path (interpreted) inside the TP = 2 shard_map, the shared expert apart or
    folded (its gate from XLA or the router kernel, replicated): each shard's launches see half
    of every expert's intermediate dim (the shared expert's too) and the partial sums add up to
    the one-device block's output, up to the rounding of each shard's down output (bf16)."""
    monkeypatch.setenv(moe.SHARED_VAR, shared)
    monkeypatch.setenv(moe.ROUTER_VAR, router)
    seen = []
    real = moe.routed
    monkeypatch.setattr(moe, "routed", lambda *a, **kw: seen.append(
        (a[3].shape, kw.get("shared") is not None)) or real(*a, **kw))
    make = lambda: SparseMoE(64, 8, 2, 32, 32, expert_path="pallas", dtype=BF16,  # noqa: E731
                             param_dtype=BF16, rngs=nnx.Rngs(5))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 3, 64)), BF16)
    want = np.asarray(make()(x), np.float64)
    block = make()
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    specs = param_specs(block, mesh)
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, specs[tuple(path)])))
    attach_mesh(block, mesh)
    got = np.asarray(block(x), np.float64)
    fold = shared == "fold"
    assert seen == [((8, 64, 32), fold), ((8, 64, 16), fold)]  # one device, then a shard
    np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2 ** -6 * np.abs(want).max())


def test_routed_gathered_is_the_combine_left_to_the_norm(monkeypatch):
    """routed(gathered=True): the down kernel's rows, each token's rows and weights, whose
    value() is routed's result bit for bit (one combine); SparseMoE(partials=True) hands it on
    where it folds the shared expert on one device (lead: x's), an array [1, ...] apart."""
    x, w, ids, wg, wu, wd = _case(5, 3, 4, 64, 128, 64)
    sg, su, sd, sw = _shared_case(5, 3, 128, 64)
    args = (x, _with(w, sw), ids, wg, wu, wd)
    rows = moe.routed(*args, shared=(sg, su, sd), gathered=True)
    assert isinstance(rows, WeightedRows) and rows.lead == (3,) and rows.rows.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(rows.value()),
                                  np.asarray(moe.routed(*args, shared=(sg, su, sd))))
    block = SparseMoE(64, 8, 2, 32, 32, expert_path="pallas", dtype=BF16, param_dtype=BF16,
                      rngs=nnx.Rngs(3))
    h = jnp.asarray(np.random.default_rng(4).standard_normal((1, 1, 64)), BF16)
    monkeypatch.setenv(moe.SHARED_VAR, "fold")
    held = block(h, partials=True)
    assert isinstance(held, WeightedRows) and held.shape == h.shape
    np.testing.assert_array_equal(np.asarray(held.value()), np.asarray(block(h)))
    monkeypatch.setenv(moe.SHARED_VAR, "apart")
    apart = block(h, partials=True)
    assert not isinstance(apart, WeightedRows) and apart.shape == (1, *h.shape)
