"""`ops.residual_norm.add_rms_norm` and the model's fused residual path: the op's kernel path
(interpreted) against its XLA path, its checks, and a decoder stack whose norms take the kernel
against the same stack through XLA (the layer-by-layer form `DecoderLayer.__call__` keeps).

Tolerances: the kernel and XLA round the same fp32 values once to x's dtype; the split-K partials
may be summed in another order, which moves a bf16 rounding by at most an ulp (2**-8 relative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import projection
from gdn_jax.ops.residual_norm import add_partials, add_rms_norm


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
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)
    slots = jnp.arange(2, dtype=jnp.int32)
    outs = {}
    monkeypatch.setenv("GDN_JAX_PROJECTION", "interpret")
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
