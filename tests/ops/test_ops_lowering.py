"""The XLA path of every op lowers for CUDA on a machine without a GPU (jax.export)."""

import jax
import jax.numpy as jnp
import pytest

from gdn_jax import ops
from gdn_jax.ops import GDNState

pytestmark = pytest.mark.lowering

B, H, HV, K, V, SLOTS, T_MAX = 4, 16, 32, 128, 128, 8, 4


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _tokens(T):
    return (_spec(B, T, H, K), _spec(B, T, H, K), _spec(B, T, HV, V), _spec(B, T, HV),
            _spec(B, T, HV), _spec(HV, dtype=jnp.float32), _spec(HV, dtype=jnp.float32))


def _state():
    st = jax.eval_shape(lambda: GDNState.create(SLOTS, H, HV, K, V, T_MAX))
    return st


SLOTS_SPEC = _spec(B, dtype=jnp.int32)

CASES = {
    "decode": (ops.decode, lambda: (*_tokens(1), _state(), SLOTS_SPEC)),
    "verify_replay": (lambda *a: ops.verify(*a, mode="replay"),
                      lambda: (*_tokens(T_MAX), _state(), SLOTS_SPEC)),
    "verify_intermediate": (lambda *a: ops.verify(*a, mode="intermediate"),
                            lambda: (*_tokens(T_MAX), _state(), SLOTS_SPEC)),
    "commit_replay": (ops.commit, lambda: (_state(), SLOTS_SPEC, SLOTS_SPEC)),
    "commit_intermediate": (ops.commit, lambda: (_state(), SLOTS_SPEC, SLOTS_SPEC,
                                                 _spec(B, T_MAX, HV, V, K))),
    "flush": (ops.flush, lambda: (_state(), SLOTS_SPEC)),
    "reset": (ops.reset, lambda: (_state(), SLOTS_SPEC)),
    "prefill": (ops.prefill, lambda: (*_tokens(100), _state(), SLOTS_SPEC, SLOTS_SPEC)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lowers_for_cuda(name):
    fn, args = CASES[name]
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args())
    assert exported.platforms == ("cuda",)
    assert "stablehlo" in exported.mlir_module()
