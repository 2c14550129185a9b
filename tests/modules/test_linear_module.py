"""The modules' projections of one input as a group (`modules._linear.dense_group`): with
GDN_JAX_PROJECTION_GROUPS=on (the default) each layer's projections of x run in one launch of the few-row
kernel (here in the Pallas interpreter, one row: a decode at B = 1), and the layer's output is
the one it gives with a launch per weight.

The two differ only in the kernel's split of K (the group's config counts all its column blocks),
so in the fp32 order of summation before each projection rounds to bf16: outputs agree within
2**-6 of their scale (a few bf16 ulps through a layer). A column block routed to the wrong weight
moves them by O(1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiny_models import randomize

from gdn_jax import kernels
from gdn_jax.modules import MLP, Attention, GatedDeltaNet, SparseMoE
from gdn_jax.ops import conv as conv_ops
from gdn_jax.ops import projection

BF16 = jnp.bfloat16
HIDDEN = 64


def _mlp():
    return MLP(HIDDEN, 96, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0)), lambda m, x: m(x)


def _moe():
    moe = SparseMoE(HIDDEN, 16, 2, 32, 32, expert_path="gather", dtype=BF16, param_dtype=BF16,
                    rngs=nnx.Rngs(0))
    return moe, lambda m, x: m(x)


def _attention():
    attn = Attention(HIDDEN, 4, 2, 32, rotary_dim=16, rope_theta=1000.0, dtype=BF16,
                     param_dtype=BF16, impl="xla", rngs=nnx.Rngs(0))

    def run(m, x):
        cache = m.init_cache(2, 8)
        y, _ = m(x[:, None], cache, jnp.asarray([1], jnp.int32))
        return y

    return attn, run


def _gdn():
    gdn = GatedDeltaNet(HIDDEN, 2, 8, 16, 16, 4, dtype=BF16, param_dtype=BF16,  # ba: 16 wide
                        rngs=nnx.Rngs(0))

    def run(m, x):
        cache = m.init_cache(2, t_max=4, state_dtype=jnp.float32)
        y, _ = m(x[:, None], cache, jnp.asarray([0], jnp.int32), mode="decode")
        return y

    return gdn, run


# layer, and the launches grouping saves: (the kernel's weights of x) - 1 (the MoE's shared-expert
# gate, one column, is no kernel's)
LAYERS = {"mlp": (_mlp, 1), "moe": (_moe, 2), "attention": (_attention, 2), "gdn": (_gdn, 1)}


def _run_counting(monkeypatch, run, layer, x, env: dict, fns) -> tuple[int, np.ndarray]:
    """(the calls of the kernels named fns, the layer's output) under the environment env (the
    projections interpreted); the monkeypatches undone after."""
    count = []
    for key, value in {projection.ENV_VAR: "interpret", **env}.items():
        monkeypatch.setenv(key, value)
    for fn in fns:
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _real=real, **k:
                            count.append(1) or _real(*a, **k))
    y = np.asarray(run(layer, x), np.float64)
    monkeypatch.undo()
    return len(count), y


@pytest.mark.parametrize("name", list(LAYERS))
def test_groups_keep_the_layer_output(name, monkeypatch):
    build, saved = LAYERS[name]
    layer, run = build()
    randomize(layer, 0, 0.3)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, HIDDEN)), BF16)
    fns = ("project", "project_group", "project_swiglu", "project_gated_norm")
    (n_off, y_off), (n_on, y_on) = (
        _run_counting(monkeypatch, run, layer, x, {projection.GROUPS_VAR: groups,
                                                   projection.GLU_VAR: "off"}, fns)
        for groups in ("off", "on"))
    assert n_off - n_on == saved
    assert np.all(np.isfinite(y_on))
    np.testing.assert_allclose(y_on, y_off, rtol=0, atol=2 ** -6 * np.abs(y_off).max())


# layer, the kernel that takes its elementwise step into a projection's launch, and the switch
# that asks for it (the other switch off: GDN_JAX_PROJECTION_GLU's epilogue and the prologue
# are the MLP's two forms of one fusion)
FUSED = {"mlp": (_mlp, "project_swiglu", projection.PROLOGUE_VAR),
         "gdn": (_gdn, "project_gated_norm", projection.PROLOGUE_VAR),
         "mlp_glu": (_mlp, "project_glu", projection.GLU_VAR)}


@pytest.mark.parametrize("name", list(FUSED))
def test_prologue_keeps_the_layer_output(name, monkeypatch):
    """GDN_JAX_PROJECTION_PROLOGUE on (the MLP's silu * up, GDN's output norm, in the next
    projection's kernel), or GDN_JAX_PROJECTION_GLU on (the MLP's product in the gate / up
    launch's epilogue), against off (that step in XLA between the launches): the fused kernel
    runs once, and only when on; the outputs agree within 2**-5 of their scale (the step's
    arithmetic is the same, in fp32 in both; XLA may skip a rounding of an intermediate the
    kernel makes: tests/ops/test_projection.py says why that bound)."""
    build, fused, var = FUSED[name]
    layer, run = build()
    randomize(layer, 0, 0.3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, HIDDEN)), BF16)
    other = ({projection.PROLOGUE_VAR, projection.GLU_VAR} - {var}).pop()
    out = {wish: _run_counting(monkeypatch, run, layer, x, {
        var: wish, other: "off",
        conv_ops.ENV_VAR: "interpret"}, (fused,))  # GDN's conv reads in_proj's partial sums
        for wish in ("off", "on")}
    assert out["off"][0] == 0 and out["on"][0] == 1
    y_off, y_on = out["off"][1], out["on"][1]
    assert np.all(np.isfinite(y_on))
    np.testing.assert_allclose(y_on, y_off, rtol=0, atol=2 ** -5 * np.abs(y_off).max())


@pytest.mark.gpu
@pytest.mark.parametrize("B, T", [(1, 1), (4, 4), (32, 1)])
@pytest.mark.parametrize("name", ["mlp", "gdn"])
def test_prologue_keeps_the_layer_output_gpu(name, B, T, monkeypatch):
    """The same on the GPU, compiled, at Qwen3.5's shapes (hidden 2048, MLP 5120; GDN 16 key
    heads, 32 value heads of 128): decode (T = 1) and verify rows."""
    import jax
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {dev.platform!r} ({dev})")
    if name == "mlp":
        layer = MLP(2048, 5120, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))

        def run(m, x):
            return m(x)
    else:
        layer = GatedDeltaNet(2048, 16, 32, 128, 128, 4, dtype=BF16, param_dtype=BF16,
                              rngs=nnx.Rngs(0))

        def run(m, x):
            cache = m.init_cache(B, t_max=4)
            slots = jnp.arange(B, dtype=jnp.int32)
            mode = "decode" if T == 1 else "verify"
            return m(x, cache, slots, mode=mode)[0]
    randomize(layer, 0, 0.02)
    x = jnp.asarray(np.random.default_rng(B).standard_normal((B, T, 2048)), BF16)
    out = {}
    monkeypatch.setenv(projection.GLU_VAR, "off")  # the MLP's fused pair: the prologue's
    for wish in projection.PROLOGUES:
        monkeypatch.setenv(projection.PROLOGUE_VAR, wish)
        out[wish] = np.asarray(run(layer, x), np.float64)
    for wish in ("views", "row", "on"):
        assert np.all(np.isfinite(out[wish]))
        np.testing.assert_allclose(out[wish], out["off"], rtol=0,
                                   atol=2 ** -5 * np.abs(out["off"]).max())


@pytest.mark.gpu
@pytest.mark.parametrize("B, T", [(1, 1), (4, 4), (32, 1), (32, 4)])
def test_glu_epilogue_keeps_the_mlp_output_gpu(B, T, monkeypatch):
    """The same compiled on the GPU at Qwen3.5's MLP (hidden 2048, intermediate 5120)."""
    import jax
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        pytest.skip(f"needs an NVIDIA GPU; the default device is {dev.platform!r} ({dev})")
    layer = MLP(2048, 5120, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))
    randomize(layer, 0, 0.02)
    x = jnp.asarray(np.random.default_rng(B).standard_normal((B, T, 2048)), BF16)
    out = {}
    for wish in ("off", "on"):
        monkeypatch.setenv(projection.GLU_VAR, wish)
        out[wish] = np.asarray(layer(x), np.float64)
    assert np.all(np.isfinite(out["on"]))
    np.testing.assert_allclose(out["on"], out["off"], rtol=0,
                               atol=2 ** -5 * np.abs(out["off"]).max())
