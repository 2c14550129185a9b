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


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU backend: opt-in (never in the table yet), decode only, capability 9.x-11.x.


@pytest.fixture
def mosaic_imports(monkeypatch):
    """Mosaic GPU available whatever this jax is (the version check is tested on its own)."""
    from gdn_jax.kernels import _mgpu

    monkeypatch.setattr(_mgpu, "unavailable", lambda: None)
    return _mgpu


@pytest.mark.parametrize("cap", ["9.0", "10.0", "10.3"])
def test_mosaic_forced_for_decode(cap, mosaic_imports, monkeypatch):
    dev = FakeDevice("gpu", cap, "NVIDIA H100 80GB HBM3")
    assert dispatch.select("decode", B=8, device=dev).backend == "triton"
    assert dispatch.select("decode", backend="mosaic", K=128, V=128, device=dev).backend == "mosaic"
    monkeypatch.setenv(dispatch.ENV_VAR, "mosaic")
    assert dispatch.select("decode", K=128, V=128, device=dev).backend == "mosaic"


def test_mosaic_is_the_hopper_default_where_measured_faster(mosaic_imports, monkeypatch):
    """Decode at B >= 128 and verify in both modes, where the H100 benchmark measured Mosaic
    faster; Triton elsewhere, and on Blackwell (no Blackwell benchmark yet); Triton again when
    Mosaic cannot take the shape or the jax."""
    h100, b200 = FakeDevice("gpu", "9.0", "H100"), FakeDevice("gpu", "10.0", "B200")
    assert dispatch.select("decode", B=256, K=128, V=128, device=h100).backend == "mosaic"
    assert dispatch.select("decode", B=127, K=128, V=128, device=h100).backend == "triton"
    assert dispatch.select("decode", K=128, V=128, device=h100).backend == "triton"  # B unknown
    assert dispatch.select("verify", T=4, B=256, device=h100).backend == "triton"  # mode unknown
    for B in (1, 256):
        for mode in ("replay", "intermediate"):
            assert dispatch.select("verify", T=4, B=B, mode=mode, device=h100).backend == "mosaic"
    assert dispatch.select("verify", T=4, mode="replay", device=b200).backend == "triton"
    assert dispatch.select("decode", B=256, K=128, V=128, device=b200).backend == "triton"
    assert dispatch.select("decode", B=256, K=96, V=128, device=h100).backend == "triton"
    monkeypatch.setattr(mosaic_imports, "unavailable", lambda: "no Mosaic GPU on this jax")
    assert dispatch.select("decode", B=256, K=128, V=128, device=h100).backend == "triton"


def test_mosaic_refusals_say_why(mosaic_imports):
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    for mode in ("replay", "intermediate"):  # both verify modes have a Mosaic kernel
        assert dispatch.select("verify", backend="mosaic", T=4, mode=mode,
                               device=h100).backend == "mosaic"
    with pytest.raises(ValueError, match=r"flush: backend 'mosaic' cannot run on NVIDIA H100 "
                                         r".*no Mosaic GPU kernel for flush \(Mosaic GPU runs "
                                         r"decode and verify\).*backends that can: "
                                         r"\['xla', 'triton', 'interpret'\]"):
        dispatch.select("flush", backend="mosaic", device=h100)
    with pytest.raises(ValueError, match=r"K a multiple of 64 \(WGMMA layout\), got 96"):
        dispatch.select("decode", backend="mosaic", K=96, V=128, device=h100)
    a100 = FakeDevice("gpu", "8.0", "NVIDIA A100")
    with pytest.raises(ValueError, match=r"NVIDIA A100 \(gpu, capability 8.0\): the Mosaic GPU "
                                         r"kernels need compute capability 9.x"):
        dispatch.select("decode", backend="mosaic", device=a100)
    with pytest.raises(ValueError, match="the Mosaic GPU kernels need an NVIDIA GPU"):
        dispatch.select("decode", backend="mosaic", device=FakeDevice("cpu", None, "cpu"))
    with pytest.raises(ValueError, match="capability 9.x"):
        dispatch.select("decode", backend="mosaic", device=FakeDevice("gpu", "12.0", "RTX 5090"))


def test_mosaic_needs_a_jax_it_imports_on(mosaic_imports, monkeypatch):
    monkeypatch.setattr(mosaic_imports, "unavailable",
                        lambda: "the Mosaic GPU kernels need jax >= 0.10.2, got 0.9.0")
    with pytest.raises(ValueError, match=r"need jax >= 0.10.2, got 0.9.0"):
        dispatch.select("decode", backend="mosaic", device=FakeDevice("gpu", "9.0", "H100"))


def test_mosaic_tuning_fits_the_head_dim():
    """Every Mosaic tuning entry fits one CTA's SMEM (as Pallas lays it out) at the real head
    dims with the largest T and T_max and fp32 inputs and candidates."""
    import jax

    from gdn_jax.kernels import MosaicConfig, check_mosaic_config
    from gdn_jax.kernels._common import Dims

    S = jax.ShapeDtypeStruct
    T = T_MAX = 8
    for dtype in ("bfloat16", "float32"):
        for B in (1, 256):
            for V in (64, 128):
                for op, mode in (("decode", None), ("verify", "replay"),
                                 ("verify", "intermediate")):
                    t = 1 if op == "decode" else T
                    cfg = dispatch.tuning(op, state_dtype=dtype, B=B, V=V, backend="mosaic",
                                          mode=mode)
                    check_mosaic_config(op, mode or "decode", MosaicConfig(**cfg),
                                        Dims(B, t, 16, 32, 128, V, B, T_MAX),
                                        S((B, t, 16, 128), "float32"), S((B, 32, V, 128), dtype),
                                        S((B, T_MAX, 16, 128), "float32"),
                                        S((B, T_MAX, 32, V), "float32"))


def test_a_shape_mosaic_cannot_fit_falls_back(mosaic_imports):
    """fits= (the call's full shape against the kernel's SMEM): the table passes Mosaic over;
    forcing it raises with the reason."""
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    misfit = lambda name: "needs 240000 bytes of SMEM" if name == "mosaic" else None
    kw = dict(T=8, B=256, K=128, V=128, mode="intermediate", device=h100)
    assert dispatch.select("verify", **kw).backend == "mosaic"
    assert dispatch.select("verify", fits=misfit, **kw).backend == "triton"
    with pytest.raises(ValueError, match=r"backend 'mosaic' cannot run on .*needs 240000 bytes "
                                         r"of SMEM; backends that can: \['xla', 'triton', "
                                         r"'interpret'\]"):
        dispatch.select("verify", backend="mosaic", fits=misfit, **kw)
    with pytest.raises(ValueError, match=r"K up to 256 \(one TMA box row\), got 512"):
        dispatch.select("decode", backend="mosaic", K=512, V=128, device=h100)