"""The dispatch table with fake devices, the overrides, and the error for an impossible override."""

import dataclasses

import pytest

from gdn_jax.ops import dispatch


@dataclasses.dataclass
class FakeDevice:
    platform: str
    compute_capability: str | None = None
    device_kind: str = "fake"


TABLE = [
    ("cpu", None, "xla"),
    ("gpu", "7.5", "xla"),      # pre-Ampere: no kernels
    ("gpu", "8.0", "triton"),
    ("gpu", "8.6", "triton"),
    ("gpu", "8.9", "triton"),
    ("gpu", "9.0", "triton"),
    ("gpu", "10.0", "triton"),
    ("gpu", "10.3", "triton"),
    ("gpu", "12.0", "triton"),
]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.mark.parametrize("platform, cap, backend", TABLE, ids=[c or p for p, c, _ in TABLE])
def test_table(platform, cap, backend):
    dev = FakeDevice(platform, cap)
    for op in ("decode", "verify", "flush"):
        assert dispatch.select(op, T=4, device=dev).backend == backend
    for op in ("commit", "reset", "prefill"):
        assert dispatch.select(op, T=4, device=dev).backend == "xla"


def test_shapes_a_kernel_cannot_take_fall_back():
    assert dispatch.select("verify", T=9, device=FakeDevice("gpu", "9.0")).backend == "xla"


def test_argument_and_environment_overrides(monkeypatch):
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    assert dispatch.select("decode", backend="xla", device=h100).backend == "xla"
    monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
    assert dispatch.select("decode", device=h100).backend == "interpret"
    assert dispatch.select("decode", backend="xla", device=h100).backend == "xla"  # argument wins
    assert dispatch.select("commit", device=h100).backend == "xla"  # env leaves kernel-less ops alone


def test_impossible_override_names_device_and_alternatives(monkeypatch):
    cpu = FakeDevice("cpu", None, "cpu")
    with pytest.raises(ValueError, match=r"decode: backend 'triton' cannot run on cpu \(cpu\): "
                                         r"the Triton kernels need an NVIDIA GPU; backends that "
                                         r"can: \['xla', 'interpret'\]"):
        dispatch.select("decode", backend="triton", device=cpu)
    v100 = FakeDevice("gpu", "7.0", "Tesla V100")
    with pytest.raises(ValueError, match=r"Tesla V100 \(gpu, capability 7.0\): the Triton kernels "
                                         r"need compute capability >= 8.0"):
        dispatch.select("verify", backend="triton", T=2, device=v100)
    with pytest.raises(ValueError, match=r"prefill: backend 'triton' .* prefill has no triton kernel"):
        dispatch.select("prefill", backend="triton", device=cpu)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=r"GDN_JAX_BACKEND expected one of"):
        dispatch.select("decode", device=cpu)


def test_describe_dispatch_lists_every_op():
    text = dispatch.describe_dispatch(FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3"))
    assert "NVIDIA H100 80GB HBM3 (gpu, capability 9.0)" in text
    for op in ("decode", "verify", "flush", "commit", "reset", "prefill"):
        assert op in text


def test_tuning_fits_the_head_dim():
    for op in ("decode", "verify", "flush"):
        for dtype in ("bfloat16", "float32"):
            for B in (1, 256):
                for V in (16, 128):
                    cfg = dispatch.tuning(op, state_dtype=dtype, B=B, V=V)
                    assert V % cfg["block_v"] == 0 and cfg["num_warps"] >= 1
