"""`ops.residual_norm.add_rms_norm` (and `gated_norm`, GDN's output norm) and the model's fused
residual path: the ops' kernel paths (interpreted) against their XLA paths, their checks, and a
decoder stack whose norms take the kernels against the same stack through XLA (the layer-by-layer
form `DecoderLayer.__call__` keeps).

Tolerances: the kernel and XLA round the same fp32 values once to x's dtype; the split-K partials
may be summed in another order, which moves a bf16 rounding by at most an ulp (2**-8 relative)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.ops import projection
from gdn_jax.ops.residual_norm import (WeightedRows, add_partials, add_rms_norm, gated_norm,
                                      gated_rms_norm)


def _case(seed, S, lead, N, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, N)), dtype)
    delta = None if S == 0 else jnp.asarray(rng.standard_normal((S, *lead, N)), jnp.float32)
    return x, delta, jnp.asarray(rng.standard_normal(N) * 0.2, jnp.float32)


@pytest.mark.parametrize("S, lead", [(0, (2, 3)), (1, (1, 1)), (4, (2, 5))])
def test_kernel_path_matches_xla(S, lead):
    x, delta, w = _case(S, S, lead, 96)
    r, h = add_rms_norm(x, delta, w, 1e-6, backend="interpret")
    r_x, h_x = add_rms_norm(x, delta, w, 1e-6, backend="xla")
    assert r.shape == h.shape == x.shape and r.dtype == h.dtype == x.dtype
    tol = 0 if S <= 1 else 2.0 ** -7
    np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(r_x, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_x, np.float32),
                               rtol=2 * tol + 2.0 ** -7 * (S > 1), atol=tol)
    if S:
        np.testing.assert_array_equal(np.asarray(add_partials(x, delta[:1])),
                                      np.asarray(x + delta[0].astype(x.dtype)))


def test_xla_path_is_the_unfused_arithmetic():
    from gdn_jax.modules.norms import rms_norm
    x, delta, w = _case(7, 1, (3, 4), 64)
    r, h = add_rms_norm(x, delta, w, 1e-6, backend="xla")
    want = x + delta[0].astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(rms_norm(want, w, 1e-6)))


@pytest.mark.parametrize("bad, match", [
    (dict(delta=(2, 3, 64)), r"delta \[S, \*x.shape\]"),
    (dict(weight=(32,)), r"weight \[N\] = \[64\]"),
    (dict(backend="triton"), r"backend expected one of"),
])
def test_rejects_bad_input(bad, match):
    x = jnp.ones((3, 4, 64), jnp.bfloat16)
    delta = jnp.ones(bad.get("delta", (2, 3, 4, 64)), jnp.float32)
    w = jnp.ones(bad.get("weight", (64,)), jnp.float32)
    with pytest.raises(ValueError, match=match):
        add_rms_norm(x, delta, w, 1e-6, backend=bad.get("backend"))


def _gated_case(lead, H, V, S):
    """o [*lead, H, V], weight [V] (bf16) and z: [*lead, H, V] bf16, or (S > 0) partial sums
    [S, M, Nz] holding z at columns 8..8 + H * V (z_col 8)."""
    rng = np.random.default_rng(S + len(lead))
    o = jnp.asarray(rng.standard_normal((*lead, H, V)) * 2, jnp.bfloat16)
    w = jnp.asarray(1 + 0.5 * rng.standard_normal(V), jnp.bfloat16)
    M = math.prod(lead)
    z = jnp.asarray(rng.standard_normal((S, M, H * V + 24) if S else (*lead, H, V)),
                    jnp.float32 if S > 1 else jnp.bfloat16)
    return o, z, w


@pytest.mark.parametrize("S", [0, 1, 3])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_gated_norm_kernel_path_matches_xla(lead, S):
    """The kernel (interpreted) and XLA, z given whole or as in_proj's partial sums: the same
    roundings, so equal up to the partials' fp32 summation order (then one bf16 ulp of z,
    through silu, ~(1 + |z|) ulp: 2**-5 relative here; exactly equal with nothing to sum)."""
    o, z, w = _gated_case(lead, 4, 32, S)
    z_col = 8 if S else None
    y = gated_norm(o, z, w, 1e-6, z_col=z_col, backend="interpret")
    y_x = gated_norm(o, z, w, 1e-6, z_col=z_col, backend="xla")
    assert y.shape == y_x.shape == o.shape and y.dtype == y_x.dtype == o.dtype
    tol = 0 if S <= 1 else 2.0 ** -5
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_x, np.float32),
                               rtol=tol, atol=tol * 1e-3)
    z_whole = (z if not S else z[:, :, 8:8 + 128].astype(jnp.float32).sum(0)
               .astype(jnp.bfloat16).reshape(o.shape))
    np.testing.assert_array_equal(np.asarray(y_x), np.asarray(gated_rms_norm(o, z_whole, w,
                                                                             1e-6)))


@pytest.mark.parametrize("bad, match", [
    (dict(z=(3, 4, 32)), r"z \[2, 3, 4, 32\] expected, got z\[3, 4, 32\]"),
    (dict(z=(1, 6, 100), z_col=8), r"z \[S, 6, Nz >= z_col \+ 128\] expected"),
    (dict(z=(1, 5, 200), z_col=8), r"got z\[1, 5, 200\], z_col=8"),
    (dict(weight=(16,)), r"weight \[V\] = \[32\] expected"),
])
def test_gated_norm_rejects_bad_input(bad, match):
    o = jnp.ones((2, 3, 4, 32), jnp.bfloat16)
    z = jnp.ones(bad.get("z", (2, 3, 4, 32)), jnp.bfloat16)
    w = jnp.ones(bad.get("weight", (32,)), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        gated_norm(o, z, w, 1e-6, z_col=bad.get("z_col"), backend="interpret")


@pytest.mark.parametrize("wish, kernel", [(None, False), ("interpret", True), ("xla", False)])
def test_gated_norm_switch(monkeypatch, wish, kernel):
    """GDN_JAX_GATED_NORM picks the path at trace time; unset ("auto") it is XLA's fusion on this
    CPU (and on a GPU while GATED_AUTO_KERNEL is off: the kernel is unmeasured there)."""
    if wish:
        monkeypatch.setenv("GDN_JAX_GATED_NORM", wish)
    else:
        monkeypatch.delenv("GDN_JAX_GATED_NORM", raising=False)
    o, z, w = _gated_case((2,), 4, 32, 0)
    jaxpr = str(jax.make_jaxpr(lambda o, z, w: gated_norm(o, z, w, 1e-6))(o, z, w))
    assert ("pallas_call" in jaxpr) == kernel


def test_project_partials_sum_to_the_product():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 2048)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2048, 64)) * 0.02, jnp.bfloat16)
    y = projection.project(x, w, backend="interpret")
    for backend in ("interpret", "xla"):
        parts = projection.project(x, w, backend=backend, partials=True)
        assert parts.ndim == 4 and parts.shape[1:] == (2, 3, 64)
        assert (parts.shape[0] > 1) == (backend == "interpret")  # the kernel splits K here
        np.testing.assert_allclose(np.asarray(add_partials(jnp.zeros_like(y), parts), np.float32),
                                   np.asarray(y, np.float32), rtol=2.0 ** -7, atol=2.0 ** -7)


def test_model_with_fused_norms_matches_xla(monkeypatch):
    """A tiny bf16 model (GDN and attention layers, MTP head) with its norms in the Pallas
    interpreter against GDN_JAX_NORM=xla, the projections interpreted in both (the MLP's
    down_proj, K = 2048, is split: its partials flow into the norms): prefill, decode and an
    MTP step."""
    from tiny_models import random_model  # noqa: PLC0415 (tests/ helper)

    from gdn_jax.models import ModelConfig  # noqa: PLC0415
    config = ModelConfig(
        model_type="qwen3_5_text", vocab_size=64, hidden_size=64, num_hidden_layers=2,
        layer_types=("linear_attention", "full_attention"), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, intermediate_size=2048,
        mtp_num_hidden_layers=1)
    model = random_model(config, seed=1, scale=0.2, dtype=jnp.bfloat16)
    monkeypatch.setenv("GDN_JAX_PROJECTION", "interpret")
    _norms_on_and_off(model, monkeypatch, seed=0, T=5)


def _norms_on_and_off(model, monkeypatch, seed: int, T: int):
    """Prefill (2 rows of T tokens), a decode and an MTP step of a tiny bf16 model with its norms
    in the Pallas interpreter and with GDN_JAX_NORM=xla: logits and hidden within 2e-2."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, T)), jnp.int32)
    slots = jnp.arange(2, dtype=jnp.int32)
    outs = {}
    for norm in ("interpret", "xla"):
        monkeypatch.setenv("GDN_JAX_NORM", norm)
        cache = model.init_cache(2, 16)
        out = model(tokens, cache, slots, mode="prefill")
        step = model(tokens[:, -1:], out.cache, slots, mode="decode")
        mtp = model.mtp_forward(tokens[:, -1:], step.hidden, step.cache, slots)
        outs[norm] = (out.logits, step.logits, step.hidden, mtp.logits)
    for a, b in zip(outs["interpret"], outs["xla"]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-2)


def _rows_case(seed, lead, N, R, S, dtype=jnp.bfloat16):
    """x [*lead, N] and a WeightedRows of its shape: y [R, N] (unnamed rows NaN), rows / weights
    [M, S] (as a MoE plan's: each output row's expert rows and routing weights)."""
    rng = np.random.default_rng(seed)
    M = int(np.prod(lead))
    x = jnp.asarray(rng.standard_normal((*lead, N)), dtype)
    rows = rng.permutation(R - 1)[:M * S].reshape(M, S).astype(np.int32)
    y = rng.standard_normal((R, N)).astype(np.float32)
    y[np.setdiff1d(np.arange(R), rows)] = np.nan
    weights = jnp.asarray(rng.uniform(0.05, 1.0, (M, S)), dtype)
    delta = WeightedRows(jnp.asarray(y, dtype), jnp.asarray(rows), weights, tuple(lead),
                         jnp.dtype(dtype))
    return x, delta, jnp.asarray(rng.standard_normal(N) * 0.2, jnp.float32)


def test_weighted_rows_are_the_moe_combine():
    """value(): the combine of `kernels.moe.combine_rows` (every row named, weighted, summed in
    fp32, rounded once), shaped as the block's output; add_partials adds it; jit takes it."""
    x, delta, _ = _rows_case(1, (2, 3), 64, 40, 4)
    want = (np.asarray(delta.y, np.float64)[np.asarray(delta.rows)]
            * np.asarray(delta.weights, np.float64)[..., None]).sum(1)
    got = delta.value()
    assert got.shape == x.shape == delta.shape and got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(want.shape), want,
                               rtol=2.0 ** -8, atol=2.0 ** -8 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(add_partials(x, delta)), np.asarray(x + got))
    # a pytree of its arrays (lead and dtype static): through jit, as a block output under remat
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda d: d.value())(delta)),
                                  np.asarray(got))
    assert len(jax.tree.leaves(delta)) == 3


@pytest.mark.parametrize("lead, S", [((1, 1), 9), ((2, 2), 3), ((3,), 11)])
def test_weighted_rows_kernel_path_matches_xla(lead, S):
    """The kernel gathering the rows (interpreted) against XLA's combine + add + norm: r within
    an ulp of bf16 (the fp32 sum's order), h too; the NaN rows nobody names are never read."""
    x, delta, w = _rows_case(S, lead, 96, 64, S)
    calls = []
    real = kernels.add_rms_norm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "add_rms_norm",
                   lambda *a, **kw: calls.append("rows" in kw) or real(*a, **kw))
        r, h = add_rms_norm(x, delta, w, 1e-6, backend="interpret")
    assert calls == [True]
    r_x, h_x = add_rms_norm(x, delta, w, 1e-6, backend="xla")
    assert np.isfinite(np.asarray(r, np.float32)).all()
    for got, want in ((r, r_x), (h, h_x)):
        assert got.shape == x.shape and got.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2.0 ** -7, atol=2.0 ** -7)


def test_weighted_rows_the_kernel_cannot_take_go_to_xla():
    """Split-K expert rows ([S, R, N] partial sums) and rows of another dtype than x's take
    XLA's combine (the kernel is not called); a WeightedRows of another shape is an error."""
    x, delta, w = _rows_case(3, (2, 2), 64, 32, 3)
    calls = []
    real = kernels.add_rms_norm
    split = delta.replace(y=jnp.stack([delta.y.astype(jnp.float32)] * 2))
    other = delta.replace(dtype=jnp.dtype(jnp.float16))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "add_rms_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        for d in (split, other):
            r, _ = add_rms_norm(x, d, w, 1e-6, backend="interpret")
            np.testing.assert_array_equal(np.asarray(r), np.asarray(x + d.value().astype(x.dtype)))
    assert calls == []
    with pytest.raises(ValueError, match=r"delta's rows \[\*x.shape\] = \[2, 2, 64\] with rows "
                                         r"and weights \[M, S\] \(M = 4\) expected, got \[4, 64\]"):
        add_rms_norm(x, delta.replace(lead=(4,)), w, 1e-6)
    with pytest.raises(ValueError, match=r"\(M = 4\) expected, got \[2, 2, 64\], rows\[4, 3\], "
                                         r"weights\[4, 2\]"):
        add_rms_norm(x, delta.replace(weights=delta.weights[:, :2]), w, 1e-6)


def test_moe_model_norms_combine_the_expert_rows(monkeypatch):
    """A tiny bf16 MoE model, the shared expert folded into the (interpreted) expert kernels:
    each MoE block hands its expert rows to the next norm (a WeightedRows; the MTP head's and
    the final norm's too), whose kernel combines them; against GDN_JAX_NORM=xla (XLA's combine),
    prefill, decode and an MTP step."""
    from tiny_models import random_model  # noqa: PLC0415 (tests/ helper)

    from gdn_jax.models import ModelConfig  # noqa: PLC0415
    from gdn_jax.modules.mlp import set_expert_path  # noqa: PLC0415
    from gdn_jax.ops import moe  # noqa: PLC0415
    config = ModelConfig(
        model_type="qwen3_5_moe_text", vocab_size=64, hidden_size=64, num_hidden_layers=2,
        layer_types=("linear_attention", "full_attention"), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, mtp_num_hidden_layers=1)
    model = set_expert_path(random_model(config, seed=2, scale=0.2, dtype=jnp.bfloat16), "pallas")
    monkeypatch.setenv(moe.SHARED_VAR, "fold")
    calls = []
    real = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *a, **kw: calls.append(
        kw.get("rows") is not None) or real(*a, **kw))
    _norms_on_and_off(model, monkeypatch, seed=1, T=3)
    # the 2nd layer's input norm and the final norm take a MoE block's rows in prefill and
    # decode, the MTP head's final norm its layer's: 5 of the kernel's 13 calls (the others add
    # projection partials or nothing); no call under GDN_JAX_NORM=xla
    assert calls == [False, False, True, False, True] * 2 + [False, False, True], calls
