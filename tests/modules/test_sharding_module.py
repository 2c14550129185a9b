"""gdn_jax.modules.sharding and the public hooks of the blocks: partition specs on the parameters
(Flax NNX metadata), the benchmark-only collectives switch, the MoE expert-path selector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gdn_jax.modules import MLP, Attention, GatedDeltaNet, SparseMoE
from gdn_jax.modules.mlp import set_expert_path
from gdn_jax.modules.sharding import TP, param_spec, psum, tp_map, without_collectives


def _specs(module):
    return {tuple(path): param_spec(var)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_partition_metadata_on_the_params():
    """The specs that do not depend on the device count ride on the params."""
    rngs = nnx.Rngs(0)
    mlp = _specs(MLP(8, 16, rngs=rngs))
    assert mlp == {("gate_proj", "kernel"): P(None, TP), ("up_proj", "kernel"): P(None, TP),
                   ("down_proj", "kernel"): P(TP, None)}
    moe = _specs(SparseMoE(8, 4, 2, 16, 16, rngs=rngs))
    assert moe[("experts_gate_proj",)] == P(None, None, TP)
    assert moe[("experts_down_proj",)] == P(None, TP, None)
    assert moe[("gate", "kernel")] == P() and moe[("shared_expert_gate", "kernel")] == P()
    assert moe[("shared_expert", "down_proj", "kernel")] == P(TP, None)
    gdn = _specs(GatedDeltaNet(8, 2, 4, 4, 4, rngs=rngs))
    assert gdn[("A_log",)] == P(TP) and gdn[("conv_weight",)] == P(None, TP)
    assert gdn[("out_proj", "kernel")] == P(TP, None) and gdn[("norm", "weight")] == P()
    attn = Attention(8, 4, 2, 4, rotary_dim=4, rope_theta=1e4, rngs=rngs)
    assert _specs(attn)[("q_proj", "kernel")] == P(None, TP)
    assert _specs(attn)[("k_proj", "kernel")] == P()  # by the device count:
    assert attn.tp_param_specs(2)[("k_proj", "kernel")] == P(None, TP)
    assert attn.tp_param_specs(4)[("v_proj", "kernel")] == P()  # 2 KV heads, 4 devices


def test_without_collectives_is_a_trace_time_switch():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py asks XLA for 8 CPU devices)")
    mesh = jax.make_mesh((2,), (TP,), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.arange(4.0)

    def summed():  # each device holds 2 of the 4 values; the psum adds the two halves
        return jax.jit(tp_map(mesh, psum, P(TP), P(TP)))(x)

    np.testing.assert_array_equal(summed(), [2.0, 4.0, 2.0, 4.0])
    with without_collectives():
        np.testing.assert_array_equal(summed(), x)  # a fresh trace: the identity
    np.testing.assert_array_equal(summed(), [2.0, 4.0, 2.0, 4.0])


def test_expert_paths_agree():
    moe = SparseMoE(16, 8, 2, 8, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16))
    outs = {}
    for path in ("auto", "gather", "grouped"):
        assert set_expert_path(moe, path) is moe and moe.expert_path == path
        outs[path] = np.asarray(moe(x))
    np.testing.assert_allclose(outs["gather"], outs["grouped"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["auto"], outs["grouped"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expert_path expected one of"):
        set_expert_path(moe, "ragged")
    with pytest.raises(ValueError, match="expert_path expected one of"):
        SparseMoE(16, 8, 2, 8, 8, expert_path="fast", rngs=nnx.Rngs(0))
