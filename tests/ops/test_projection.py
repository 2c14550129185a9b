"""`gdn_jax.ops.projection.project`: which path runs (the few-row kernel or XLA's dot), and that
every path computes x @ w.

The kernel's own accuracy is tests/kernels/test_kernel_projection.py's; here the op's dispatch
is checked on CPU (XLA by default, the kernel in the interpreter when asked), with a GPU device
faked where the question is what a GPU would run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gdn_jax import kernels
from gdn_jax.ops import projection
from gdn_jax.ops.dispatch import Device
from gdn_jax.ops.residual_norm import gated_rms_norm

BF16_EPS = 2.0 ** -8


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(projection.ENV_VAR, raising=False)
    monkeypatch.delenv(projection.GROUPS_VAR, raising=False)
    monkeypatch.delenv(projection.PROLOGUE_VAR, raising=False)
    monkeypatch.delenv(projection.GLU_VAR, raising=False)
    monkeypatch.delenv("GDN_JAX_BACKEND", raising=False)


def _xw(lead, K, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((*lead, K)), dtype),
            jnp.asarray(rng.standard_normal((K, N)) * K ** -0.5, dtype))


def test_cpu_default_is_xlas_dot():
    x, w = _xw((2, 3), 64, 32, jnp.float32)
    y = projection.project(x, w, precision=lax.Precision.HIGHEST)
    np.testing.assert_array_equal(
        y, lax.dot_general(x, w, (((2,), (0,)), ((), ())), precision=lax.Precision.HIGHEST))


@pytest.mark.parametrize("lead", [(1,), (2, 3), (1, 1)])
def test_interpret_kernel_keeps_leading_axes(lead):
    x, w = _xw(lead, 128, 64, jnp.bfloat16, seed=len(lead))
    y = projection.project(x, w, backend="interpret")
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert y.shape == (*lead, 64) and y.dtype == jnp.bfloat16
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= BF16_EPS * np.abs(ref) + 1e-3), err.max()


@pytest.mark.parametrize("env, dtype, kernel", [("xla", jnp.bfloat16, False),
                                                ("interpret", jnp.bfloat16, True),
                                                ("interpret", jnp.float32, False)])
def test_environment_steers_the_path(monkeypatch, env, dtype, kernel):
    monkeypatch.setenv(projection.ENV_VAR, env)
    calls = []
    real = kernels.project
    monkeypatch.setattr(kernels, "project", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, w = _xw((4,), 64, 32, dtype)
    projection.project(x, w)
    assert bool(calls) == kernel
    if kernel:
        assert calls[0]["interpret"] is True


def test_xla_gemm_pads_one_row_and_matches_the_dot():
    x, w = _xw((1, 1), 64, 32, jnp.float32)
    y = projection.project(x, w, precision=lax.Precision.HIGHEST, backend="xla-gemm")
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert y.shape == (1, 1, 32)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_backend_argument_is_strict():
    x, w = _xw((4,), 64, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="backend 'triton' cannot take .* not a CUDA GPU"):
        projection.project(x, w, backend="triton")
    with pytest.raises(ValueError, match="backend expected one of"):
        projection.project(x, w, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend 'interpret' cannot take .* dtype float32"):
        projection.project(x.astype(jnp.float32), w.astype(jnp.float32), backend="interpret")
    with pytest.raises(ValueError, match=r"w \[K, N\] with K = 64"):
        projection.project(x, w.T)


@pytest.fixture
def fake_h200(monkeypatch):
    monkeypatch.setattr(Device, "of", classmethod(lambda cls, d=None: Device("gpu", (9, 0), "H200")))


@pytest.mark.parametrize("M, N, dtype, runs_kernel", [
    (1, 5120, jnp.bfloat16, True),                     # one row: XLA makes it a reduce fusion
    (projection.AUTO_MAX_M, 151936, jnp.bfloat16, True),  # an LM head of few rows too
    (projection.AUTO_MAX_M + 1, 151936, jnp.bfloat16, False),  # cuBLAS wins from here
    (projection.AUTO_MAX_M + 1, projection.LONE_MAX_N, jnp.bfloat16, True),  # XLA's fusions don't
    (kernels.PROJECTION_MAX_M, 2048, jnp.bfloat16, True),
    (kernels.PROJECTION_MAX_M + 1, 2048, jnp.bfloat16, False),  # past what the kernel takes
    (1, 5120, jnp.float32, False),                     # fp32 keeps XLA's precision
])
def test_gpu_dispatch_by_rows_and_dtype(fake_h200, M, N, dtype, runs_kernel):
    choice = projection._select(M, 2048, N, jnp.dtype(dtype), jnp.dtype(dtype), None)
    assert (choice is not None) == runs_kernel
    if runs_kernel:
        config, interpret = choice
        assert not interpret and not kernels.projection_misfit(M, 2048, N, dtype, config)


def test_gpu_backend_triton_takes_up_to_max_rows(fake_h200):
    M = kernels.PROJECTION_MAX_M
    assert projection._select(M, 2048, 5120, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16),
                              "triton") is not None
    with pytest.raises(ValueError, match=f"M={M + 1} rows is outside"):
        projection._select(M + 1, 2048, 5120, jnp.dtype(jnp.bfloat16),
                           jnp.dtype(jnp.bfloat16), "triton")


@pytest.mark.parametrize("M, K, N", [(1, 4096, 2048), (1, 2048, 248320), (1, 2048, 64),
                                     (16, 5120, 2048), (64, 2048, 12288), (128, 2048, 512),
                                     (3, 1024, 96), (4, 64, 32)])
def test_config_for_fits_the_model_shapes(M, K, N):
    config = projection.config_for(M, K, N)
    assert kernels.projection_misfit(M, K, N, jnp.bfloat16, config) is None
    # the fp32 partial sums stay small beside the weight (from 65 rows: K slices >= 1024 rows)
    bm = kernels.projection_block_m(M)
    assert config.splits <= max(1, K // (16 * bm) if bm < 128 else K // 1024)


@pytest.mark.parametrize("M, K, N, splits", [(1, 4096, 2048, 8), (1, 2048, 12288, 2),
                                             (1, 2048, 5120, 4), (1, 5120, 2048, 8),
                                             (64, 4096, 2048, 4), (64, 2048, 12288, 1)])
def test_config_for_picks_the_sweeps_splits(M, K, N, splits):
    """The H200 sweep's best slice counts at block_n 64 (bench/results/bench_projection-h200-
    sweep-2026-12-01.json) for the model's out_proj, in_proj_qkvz, gate_proj, down_proj."""
    config = projection.config_for(M, K, N, sm_count=132)
    assert (config.block_n, config.splits) == (64, splits)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    return calls


def _group_case(lead=(1,), widths=(96, 32, 1, 64), K=128):
    """One x and weights of several widths; the width 1 (a shared-expert gate) no kernel takes."""
    rng = np.random.default_rng(sum(widths))
    x = jnp.asarray(rng.standard_normal((*lead, K)), jnp.bfloat16)
    return x, tuple(jnp.asarray(rng.standard_normal((K, n)) * K ** -0.5, jnp.bfloat16)
                    for n in widths)


@pytest.mark.parametrize("groups", [None, "off", "on"])
def test_group_launches_once_when_on(monkeypatch, groups):
    """GDN_JAX_PROJECTION_GROUPS on (the default): the weights the kernel takes in one launch,
    the others as `project` runs them; off: one `project` each, the same numbers as before."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    if groups:
        monkeypatch.setenv(projection.GROUPS_VAR, groups)
    group_calls, single_calls = _spy(monkeypatch, "project_group"), _spy(monkeypatch, "project")
    x, ws = _group_case()
    ys = projection.project_group(x, ws)
    if groups != "off":
        assert len(group_calls) == 1 and len(group_calls[0][0][1]) == 3
        assert not single_calls  # the width-1 weight misfits the kernel: XLA's dot
    else:
        assert not group_calls and len(single_calls) == 3
        for y, w in zip(ys, ws):
            np.testing.assert_array_equal(y, projection.project(x, w))
    for y, w in zip(ys, ws):
        ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        assert y.shape == (1, w.shape[1]) and y.dtype == jnp.bfloat16
        err = np.abs(np.asarray(y, np.float64) - ref)
        assert np.all(err <= BF16_EPS * np.abs(ref) + 1e-3), err.max()


def test_group_on_gpu_dispatch(fake_h200, monkeypatch):
    """On a GPU (faked): up to AUTO_MAX_M rows the group's fitting weights run in one launch;
    above, up to PROJECTION_MAX_M rows, a group still (XLA's fused GEMMs are slow there), a lone
    weight as `project` sends it; past that, XLA."""
    monkeypatch.setenv(projection.GROUPS_VAR, "on")
    calls = []
    monkeypatch.setattr(kernels, "project_group",
                        lambda x, ws, **k: calls.append((x.shape, [w.shape for w in ws], k))
                        or tuple(jnp.zeros((x.shape[0], w.shape[1]), x.dtype) for w in ws))
    monkeypatch.setattr(kernels, "project", lambda x, w, **k: pytest.fail("a single launch"))
    x, ws = _group_case(widths=(96, 32, 64))
    projection.project_group(x, ws)
    assert len(calls) == 1 and calls[0][1] == [(128, 96), (128, 32), (128, 64)]
    config = calls[0][2]["config"]
    assert not calls[0][2]["interpret"]
    assert not kernels.projection_misfit(1, 128, (96, 32, 64), jnp.bfloat16, config)
    for M in (projection.AUTO_MAX_M + 1, kernels.PROJECTION_MAX_M):
        calls.clear()
        projection.project_group(_group_case(lead=(M,))[0], ws)
        assert len(calls) == 1 and calls[0][0] == (M, 128), M
    calls.clear()
    projection.project_group(_group_case(lead=(kernels.PROJECTION_MAX_M + 1,))[0], ws)
    assert not calls
    wide = (projection.LONE_MAX_N + 64, 64)  # judged as a group, not weight by weight
    projection.project_group(_group_case(lead=(projection.AUTO_MAX_M + 1,), widths=wide)[0],
                             _group_case(widths=wide)[1])
    assert len(calls) == 1 and calls[0][1] == [(128, wide[0]), (128, 64)]
    calls.clear()
    lone = []
    monkeypatch.setattr(kernels, "project", lambda x, w, **k: lone.append(w.shape)
                        or jnp.zeros((x.shape[0], w.shape[1]), x.dtype))
    x3, ws3 = _group_case(lead=(projection.AUTO_MAX_M + 1,), widths=(96, 1))
    projection.project_group(x3, ws3)  # one weight fits: a lone weight, `project`'s kernel
    assert not calls and lone == [(128, 96)]
    monkeypatch.setenv(projection.ENV_VAR, "xla-gemm")  # as `project`: XLA, never the kernel
    projection.project_group(x, ws)
    assert not calls


def test_group_arguments_are_checked(monkeypatch):
    x, ws = _group_case(widths=(32, 64))
    with pytest.raises(ValueError, match=r"ws\[1\] \[K, N\] with K = 128"):
        projection.project_group(x, (ws[0], ws[1].T))
    with pytest.raises(ValueError, match="at least one"):
        projection.project_group(x, ())
    monkeypatch.setenv(projection.GROUPS_VAR, "yes")
    with pytest.raises(ValueError, match="GDN_JAX_PROJECTION_GROUPS: expected on or off"):
        projection.project_group(x, ws)


def test_config_for_a_group_tiles_every_width():
    config = projection.config_for(1, 2048, (12288, 64))
    assert config.block_n == 64
    assert kernels.projection_misfit(1, 2048, (12288, 64), jnp.bfloat16, config) is None
    # the splits count the group's column blocks: fewer than either weight alone would want
    assert config.splits <= projection.config_for(1, 2048, 12288).splits


@pytest.mark.parametrize("M, swap", [(1, False), (16, False), (17, True), (32, True), (64, False),
                                     (65, False), (128, False)])
def test_config_for_swaps_at_17_to_32_rows(M, swap):
    """The weight-first product where the H200 sweep measured it faster (17-32 rows), and the
    wide blocks from 65 rows (bench/results/bench_projection-h200-rows{32_swap,128_wide}-...)."""
    config = projection.config_for(M, 2048, 5120, sm_count=132)
    assert config.swap_ab == swap
    assert (config.block_n, config.num_warps) == ((128, 8) if M > 64 else (64, 4))


@pytest.mark.parametrize("K, N, splits", [(2048, 5120, 2), (4096, 2048, 4), (2048, 12288, 1)])
def test_config_for_128_rows_picks_the_sweeps_splits(K, N, splits):
    """The H200 128-row sweep's best slice counts (bench/results/bench_projection-h200-
    rows128_wide-2026-12-02.json) for gate_proj, out_proj and in_proj_qkvz."""
    config = projection.config_for(128, K, N, sm_count=132)
    assert (config.block_n, config.block_k, config.splits) == (128, 64, splits)


def test_mosaic_on_request_on_hopper(fake_h200, monkeypatch):
    """GDN_JAX_PROJECTION=mosaic sends a group and a lone weight whose rows and widths the Hopper
    kernel tiles to it (one launch, its fp32 result cast to x's dtype); the rest as before."""
    monkeypatch.setenv(projection.ENV_VAR, "mosaic")
    calls = []

    def fake(x, ws, **k):
        calls.append((x.shape, [w.shape for w in ws], k["config"]))
        return tuple(jnp.ones((x.shape[0], w.shape[1]), jnp.float32) for w in ws)

    monkeypatch.setattr(kernels, "project_group_mgpu", fake)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 256)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((256, n)), jnp.bfloat16) for n in (256, 64))
    ys = projection.project_group(x, ws)
    assert [y.shape for y in ys] == [(4, 8, 256), (4, 8, 64)]
    assert all(y.dtype == jnp.bfloat16 for y in ys)
    assert len(calls) == 1 and calls[0][:2] == ((32, 256), [(256, 256), (256, 64)])
    assert calls[0][2].block_n == 64  # 128 does not tile the 64-wide weight
    assert not kernels.projection_mgpu_misfit(32, 256, (256, 64), jnp.bfloat16, calls[0][2])
    calls.clear()
    y = projection.project(x, ws[0])
    assert y.shape == (4, 8, 256) and y.dtype == jnp.bfloat16
    assert len(calls) == 1 and calls[0][2].block_n == 128
    calls.clear()
    monkeypatch.setattr(kernels, "project_group", lambda x, ws, **k: tuple(
        jnp.zeros((x.shape[0], w.shape[1]), x.dtype) for w in ws))
    monkeypatch.setattr(kernels, "project", lambda x, w, **k: jnp.zeros((x.shape[0], w.shape[1]),
                                                                        x.dtype))
    projection.project_group(x[:1, :5], ws)  # 5 rows: not a multiple of 8
    projection.project(x.astype(jnp.float32), ws[0].astype(jnp.float32))  # fp32
    assert not calls


# --- the fused pairs: swiglu_project (MLP), gated_norm_project (GDN's output norm + out_proj) ---


def _mlp_case(lead=(1,), K=64, I=96, N=64, dtype=jnp.bfloat16):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((*lead, K)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal(shape) * shape[0] ** -0.5, dtype)
               for shape in ((K, I), (K, I), (I, N)))
    return x, ws


def _norm_case(lead=(1,), H=4, V=32, N=64, dtype=jnp.bfloat16):
    rng = np.random.default_rng(4)
    o, z = (jnp.asarray(rng.standard_normal((*lead, H, V)), dtype) for _ in range(2))
    weight = jnp.asarray(1.0 + 0.5 * rng.standard_normal(V), dtype)
    w = jnp.asarray(rng.standard_normal((H * V, N)) * (H * V) ** -0.5, dtype)
    return o, z, weight, w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_pairs_on_xla_are_the_unfused_steps(dtype):
    """On CPU (XLA) the ops are exactly the steps apart, bit for bit: the modules' numbers there
    (HF parity) are unchanged."""
    x, (wg, wu, wd) = _mlp_case((2, 3), dtype=dtype)
    hi = lax.Precision.HIGHEST
    gate, up = projection.project(x, wg, precision=hi), projection.project(x, wu, precision=hi)
    np.testing.assert_array_equal(
        projection.swiglu_project(x, wg, wu, wd, precision=hi),
        projection.project(jax.nn.silu(gate) * up, wd, precision=hi))
    o, z, weight, w = _norm_case((2, 3), dtype=dtype)
    ref = projection.project(gated_rms_norm(o, z, weight, 1e-6).reshape(2, 3, -1), w,
                             precision=hi)
    np.testing.assert_array_equal(
        projection.gated_norm_project(o, z, weight, w, 1e-6, precision=hi), ref)


@pytest.mark.parametrize("partials", [False, True])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_fused_pairs_run_the_prologue_kernels_when_on(monkeypatch, lead, partials):
    """GDN_JAX_PROJECTION=interpret: each pair is two launches (the group, then the swiglu
    kernel) or one (the gated norm kernel), agreeing with the steps apart (GDN_JAX_PROJECTION_
    PROLOGUE=off) within 2**-5 of the result's scale: the same fp32 arithmetic, but XLA may keep
    the step's intermediates unrounded where the kernel rounds them as the ops' dtypes say, so
    each of the K tile elements may differ by an ulp or two (about sqrt(K) bf16 ulps of the
    result); a misrouted head or half of gate_up moves it by O(1). partials: [S, *lead, N] that
    sum to it."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    monkeypatch.setenv(projection.GLU_VAR, "off")  # the MLP's other fused form
    swiglu, gated = _spy(monkeypatch, "project_swiglu"), _spy(monkeypatch, "project_gated_norm")
    x, ws = _mlp_case(lead)
    o, z, weight, w = _norm_case(lead)
    runs, fused = {}, 0
    for wish in ("off", "row", "on"):  # "row": fused at one row only
        monkeypatch.setenv(projection.PROLOGUE_VAR, wish)
        runs[wish] = (projection.swiglu_project(x, *ws, partials=partials),
                      projection.gated_norm_project(o, z, weight, w, 1e-6, partials=partials))
        fused += wish == "on" or (wish == "row" and lead == (1,))
        assert (len(swiglu), len(gated)) == (fused, fused)
    for y_off, y_on in zip(runs["off"] * 2, runs["row"] + runs["on"]):
        if partials:
            assert y_on.ndim == len(lead) + 2 and y_on.shape[1:] == y_off.shape[1:]
            y_off, y_on = (np.asarray(y, np.float64).sum(0) for y in (y_off, y_on))
        assert y_on.shape == (*lead, 64)
        y_off, y_on = np.asarray(y_off, np.float64), np.asarray(y_on, np.float64)
        np.testing.assert_allclose(y_on, y_off, rtol=0, atol=2 ** -5 * np.abs(y_off).max())


@pytest.mark.parametrize("wish, plain, fused", [("off", False, False),
                                               ("prologues", False, True), ("on", True, True)])
def test_gemv_switch_reaches_one_row_launches(monkeypatch, wish, plain, fused):
    """GDN_JAX_PROJECTION_GEMV: one-row launches (a lone projection, the fused pairs' second
    launch) take gemv where it says, more rows never; the results agree with the tile's within
    2**-5 of their scale (fp32 sums in another order; the fused pairs' bound above)."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    monkeypatch.setenv(projection.PROLOGUE_VAR, "on")
    monkeypatch.setenv(projection.GLU_VAR, "off")
    monkeypatch.setenv(projection.GEMV_VAR, wish)
    assert projection.config_for(1, 2048, 2048).gemv == plain
    assert not projection.config_for(2, 2048, 2048).gemv
    lone, swiglu, gated = (_spy(monkeypatch, n)
                           for n in ("project", "project_swiglu", "project_gated_norm"))
    x, ws = _mlp_case()
    o, z, weight, w = _norm_case()
    ys = (projection.project(x, ws[0]), projection.swiglu_project(x, *ws),
          projection.gated_norm_project(o, z, weight, w, 1e-6))
    assert [c[1]["config"].gemv for c in lone + swiglu + gated] == [plain, fused, fused]
    monkeypatch.setenv(projection.GEMV_VAR, "off")
    refs = (projection.project(x, ws[0]), projection.swiglu_project(x, *ws),
            projection.gated_norm_project(o, z, weight, w, 1e-6))
    for y, ref in zip(ys, refs):
        ref = np.asarray(ref, np.float64)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0,
                                   atol=2 ** -5 * np.abs(ref).max())
    monkeypatch.setenv(projection.GEMV_VAR, "yes")
    with pytest.raises(ValueError, match="GDN_JAX_PROJECTION_GEMV: expected one of"):
        projection.config_for(1, 2048, 2048)


def test_fused_pairs_keep_xla_where_a_kernel_misfits(monkeypatch):
    """A width the kernel cannot tile, an fp32 pair, or the prologue switch off: the steps
    apart (no fused kernel); a bad switch value is an error."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    swiglu, gated = _spy(monkeypatch, "project_swiglu"), _spy(monkeypatch, "project_gated_norm")
    x, ws = _mlp_case(I=40)  # no power-of-two block of >= 16 divides 40
    projection.swiglu_project(x, *ws)
    projection.swiglu_project(*(a.astype(jnp.float32) for a in (x, *_mlp_case()[1])))
    o, z, weight, w = _norm_case(V=8)  # a K-step of one 8-wide head: under the kernel's 16
    projection.gated_norm_project(o, z, weight, w, 1e-6)
    assert not swiglu and not gated
    monkeypatch.setenv(projection.PROLOGUE_VAR, "yes")
    with pytest.raises(ValueError, match="GDN_JAX_PROJECTION_PROLOGUE: expected one of"):
        projection.swiglu_project(*_mlp_case()[:1], *_mlp_case()[1])


def test_gated_norm_project_checks_its_arguments():
    o, z, weight, w = _norm_case()
    with pytest.raises(ValueError, match=r"z \[\.\.\., H, V\] = \[1, 4, 32\]"):
        projection.gated_norm_project(o, z[..., :16], weight, w, 1e-6)
    with pytest.raises(ValueError, match=r"norm_weight \[V\] = \[32\]"):
        projection.gated_norm_project(o, z, weight[:16], w, 1e-6)


@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_partials_views_hold_the_group_outputs(monkeypatch, lead):
    """project_group_partials: one launch, whose views' values are project_group's outputs bit
    for bit; a conv and a gated norm reading a view in their kernels equal them given its value
    (the interpreter; S <= 2 partial terms add in the same order). None where the group is not
    one kernel launch (XLA, the prologue switch off)."""
    from gdn_jax.ops import conv as conv_ops
    x, ws = _group_case(lead, widths=(96, 32, 64), K=128)
    assert projection.project_group_partials(x, ws) is None  # CPU: XLA
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    views = projection.project_group_partials(x, ws)
    assert views is not None and len(views) == 3
    for view, y in zip(views, projection.project_group(x, ws)):
        np.testing.assert_array_equal(np.asarray(view.value(), np.float32),
                                      np.asarray(y, np.float32))
    monkeypatch.setenv(conv_ops.ENV_VAR, "interpret")
    B, T = (lead[0], 1) if len(lead) == 1 else lead
    x2, ws2 = _group_case((B, T), widths=(96, 32, 64), K=128)
    views = projection.project_group_partials(x2, ws2)
    rng = np.random.default_rng(0)
    conv = jnp.asarray(rng.standard_normal((4, 3 + T, 96)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((4, 96)) * 0.5, jnp.bfloat16)
    slots = jnp.arange(B, dtype=jnp.int32)
    kw = dict(widths=(32, 32, 32), keep="all")
    got = conv_ops.conv_step(views[0], conv, weight, slots, **kw)
    want = conv_ops.conv_step(views[0].value(), conv, weight, slots, **kw)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # side columns of the same launch (GDN's b and a) come back from the conv's launch, their
    # values bit for bit; a view of another launch (x's own columns here) by its value
    sides = (views[1].columns(0, 16), views[1].columns(16, 16), views[2].columns(32, 32),
             views[0]._replace(parts=views[0].parts + 0).columns(0, 32))
    spy = _spy(monkeypatch, "conv_step")
    outs, conv2, side_vals = conv_ops.conv_step(views[0], conv, weight, slots, sides=sides, **kw)
    assert spy[-1][1]["sides"] == tuple((v.start, v.width) for v in sides[:3])
    for a, b in zip(jax.tree.leaves((outs, conv2)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for got_side, view in zip(side_vals, sides):
        assert got_side.shape == (B, T, view.width) and got_side.dtype == view.dtype
        np.testing.assert_array_equal(np.asarray(got_side, np.float32),
                                      np.asarray(view.value(), np.float32))
    o = jnp.asarray(rng.standard_normal((B, T, 2, 32)), jnp.bfloat16)
    z = views[2].columns(0, 64)
    monkeypatch.setenv(projection.PROLOGUE_VAR, "on")  # the norm's kernel reads z in place
    gated = _spy(monkeypatch, "project_gated_norm")
    nw = jnp.asarray(1 + rng.standard_normal(32) * 0.3, jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(projection.gated_norm_project(o, z, nw, w, 1e-6), np.float32),
        np.asarray(projection.gated_norm_project(o, z.value().reshape(o.shape), nw, w, 1e-6),
                   np.float32))
    assert len(gated) == 2 and gated[0][0][1].ndim == 3 and gated[0][1]["z_col"] == views[2].start
    monkeypatch.setenv("GDN_JAX_BACKEND", "mosaic")  # a Mosaic request: no Triton views
    monkeypatch.delenv(projection.ENV_VAR)
    assert projection.project_group_partials(x, ws) is None
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    monkeypatch.setenv(projection.PROLOGUE_VAR, "off")
    assert projection.project_group_partials(x, ws) is None
    with pytest.raises(ValueError, match="outside the view's 64 columns"):
        views[2].columns(32, 64)


@pytest.mark.parametrize("partials", [False, True])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_glu_epilogue_runs_when_on(monkeypatch, lead, partials):
    """GDN_JAX_PROJECTION_GLU=on (GDN_JAX_PROJECTION=interpret): the MLP is `kernels.project_glu`
    (unsplit: `epilogue_config`) and a plain down_proj at any row count, whatever the prologue
    level, agreeing with the steps apart (GLU and prologues off) within 2**-5 of the
    result's scale (the fused pairs' bound above). A width the pair's blocks cannot tile, or an
    fp32 MLP: the other paths. A bad switch value is an error."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    monkeypatch.setenv(projection.PROLOGUE_VAR, "off")
    glu, swiglu = _spy(monkeypatch, "project_glu"), _spy(monkeypatch, "project_swiglu")
    x, ws = _mlp_case(lead)
    monkeypatch.setenv(projection.GLU_VAR, "off")
    y_off = projection.swiglu_project(x, *ws, partials=partials)
    monkeypatch.setenv(projection.GLU_VAR, "on")
    for level in ("off", "on"):
        monkeypatch.setenv(projection.PROLOGUE_VAR, level)
        y_on = projection.swiglu_project(x, *ws, partials=partials)
        assert not swiglu and glu[-1][1]["config"].splits == 1
        a, b = (np.asarray(y, np.float64) for y in (y_on, y_off))
        if partials:
            assert a.shape[1:] == b.shape[1:]
            a, b = a.sum(0), b.sum(0)
        assert a.shape == (*lead, 64)
        np.testing.assert_allclose(a, b, rtol=0, atol=2 ** -5 * np.abs(b).max())
    assert len(glu) == 2
    projection.swiglu_project(*_mlp_case(I=40)[:1], *_mlp_case(I=40)[1])
    projection.swiglu_project(*(a.astype(jnp.float32) for a in (x, *ws)))
    assert len(glu) == 2
    monkeypatch.setenv(projection.GLU_VAR, "yes")
    with pytest.raises(ValueError, match="GDN_JAX_PROJECTION_GLU: expected one of"):
        projection.swiglu_project(x, *ws)


def test_glu_epilogue_by_default_up_to_32_rows(monkeypatch):
    """GDN_JAX_PROJECTION_GLU unset ("auto"): the epilogue form up to AUTO_MAX_M rows (measured
    faster there), the other paths above (measured slower at 128 rows)."""
    monkeypatch.setenv(projection.ENV_VAR, "interpret")
    monkeypatch.delenv(projection.GLU_VAR, raising=False)
    glu = _spy(monkeypatch, "project_glu")
    x, ws = _mlp_case((projection.AUTO_MAX_M,))
    projection.swiglu_project(x, *ws)
    assert len(glu) == 1
    x, ws = _mlp_case((projection.AUTO_MAX_M + 1,))
    projection.swiglu_project(x, *ws)
    assert len(glu) == 1


@pytest.mark.parametrize("M", [1, 32, 128])
def test_glu_config_has_the_group_launch_programs(monkeypatch, M):
    """On an H200 (faked): the GLU's config streams a column block of each weight, so its blocks
    are cut by two more than the group's (as many programs as the gate / up group's launch)
    where the 32-column floor (64 weight first) does not bind: 64 columns of 5120 at 128 rows."""
    monkeypatch.setattr(Device, "of", classmethod(lambda cls, d=None: Device("gpu", (9, 0),
                                                                             "H200")))
    monkeypatch.setenv(projection.GLU_VAR, "on")
    arrays = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((M, 2048), (2048, 5120),
                                                                  (2048, 5120))]
    group = projection.config_for(M, 2048, (5120, 5120))
    config, _ = projection._glu(M, 2048, 5120, arrays, None)
    assert config.splits == 1
    floor = 64 if config.swap_ab else 32
    assert config.block_n == max(floor, group.block_n // (2 * group.splits))
    if M == 128:
        assert 5120 // config.block_n == 2 * 5120 // (group.block_n * group.splits)
