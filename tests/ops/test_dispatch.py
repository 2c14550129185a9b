"""The dispatch table with fake devices, the overrides, and the error for an impossible override."""

import dataclasses

import jax.numpy as jnp
import pytest

from gdn_jax import kernels
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
    assert dispatch.select("verify", T=kernels.MAX_T + 1,
                           device=FakeDevice("gpu", "9.0")).backend == "xla"
    # the Mosaic kernels take T <= 8: from 9 to MAX_T verify on Hopper is Triton's
    dims = kernels.Dims(8, 12, 16, 32, 128, 128, 8, 12)
    assert dispatch.select("verify", dims=dims, mode="replay",
                           device=FakeDevice("gpu", "9.0")).backend == "triton"


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
                    assert isinstance(cfg, kernels.TuningConfig)
                    assert V % cfg.block_v == 0 and cfg.num_warps >= 1


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU backend: opt-in (never in the table yet), decode only, capability 9.x-11.x.


@pytest.fixture
def mosaic_imports(monkeypatch):
    """Mosaic GPU available whatever this jax is (the version check is tested on its own)."""
    monkeypatch.setattr(kernels, "mosaic_unavailable", lambda: None)
    return kernels


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
    monkeypatch.setattr(mosaic_imports, "mosaic_unavailable", lambda: "no Mosaic GPU on this jax")
    assert dispatch.select("decode", B=256, K=128, V=128, device=h100).backend == "triton"


def test_bf16_replay_runs_in_matrix_form_on_hopper(mosaic_imports):
    """bf16 pool, tokens and candidates on Hopper: replay's matrix form (wy) at the H200's
    measured configs; the token-by-token form for other dtypes, on a forced Blackwell (no wgmma)
    and for the other ops."""
    h100, b200 = FakeDevice("gpu", "9.0", "H100"), FakeDevice("gpu", "10.0", "B200")
    bf16, f32, f16 = (jnp.dtype(d) for d in ("bfloat16", "float32", "float16"))

    def cfg(B, dtypes=kernels.Dtypes(bf16, bf16, bf16), device=h100, mode="replay", **kw):
        choice = dispatch.select("verify", dims=_dims(B=B, T=4, t_max=4), dtypes=dtypes,
                                 mode=mode, device=device, **kw)
        return choice.backend, choice.config

    assert cfg(8) == ("mosaic", kernels.MosaicConfig(64, 2, 2, wy=True))
    assert cfg(32) == ("mosaic", kernels.MosaicConfig(64, 4, 2, wy=True))
    assert cfg(256) == ("mosaic", kernels.MosaicConfig(64, 4, 2, wy=True))
    assert cfg(32, backend="mosaic")[1].wy  # forced: the same tuning
    assert not cfg(32, kernels.Dtypes(bf16, bf16, f32))[1].wy
    assert not cfg(32, kernels.Dtypes(f32, bf16, bf16))[1].wy
    assert not cfg(32, kernels.Dtypes(bf16, f16, f16))[1].wy
    assert not cfg(32, mode="intermediate")[1].wy
    assert not cfg(32, device=b200, backend="mosaic")[1].wy
    why = kernels.mosaic_misfit("intermediate", _dims(), kernels.Dtypes(bf16, bf16, bf16),
                                kernels.MosaicConfig(64, 2, 2, wy=True))
    assert "replay's only" in why
    why = kernels.mosaic_misfit("replay", _dims(), kernels.Dtypes(bf16, f32, bf16),
                                kernels.MosaicConfig(64, 2, 2, wy=True))
    assert "bf16 pool, tokens and candidates" in why


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
    with pytest.raises(ValueError, match=r"K a multiple of 64 \(WGMMA layout\), got K=96"):
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
    monkeypatch.setattr(mosaic_imports, "mosaic_unavailable",
                        lambda: "the Mosaic GPU kernels need jax >= 0.10.2, got 0.9.0")
    with pytest.raises(ValueError, match=r"need jax >= 0.10.2, got 0.9.0"):
        dispatch.select("decode", backend="mosaic", device=FakeDevice("gpu", "9.0", "H100"))


def test_mosaic_tuning_fits_the_head_dim():
    """Every Mosaic tuning entry fits one CTA's SMEM (as Pallas lays it out) at the real head
    dims with the largest T and T_max they take and fp32 inputs and candidates."""
    T = T_MAX = kernels.MOSAIC_MAX_T
    f32 = jnp.dtype("float32")
    for dtype in ("bfloat16", "float32"):
        for B in (1, 256):
            for V in (64, 128):
                for op, mode in (("decode", None), ("verify", "replay"),
                                 ("verify", "intermediate")):
                    t = 1 if op == "decode" else T
                    cfg = dispatch.tuning(op, "mosaic", state_dtype=dtype, B=B, V=V, mode=mode)
                    assert isinstance(cfg, kernels.MosaicConfig)
                    why = kernels.mosaic_misfit(mode or "decode",
                                                kernels.Dims(B, t, 16, 32, 128, V, B, T_MAX),
                                                kernels.Dtypes(jnp.dtype(dtype), f32, f32), cfg)
                    assert why is None, (op, mode, dtype, B, V, why)


@pytest.mark.parametrize("B, per", [(1, 1), (8, 1), (16, 2), (32, 4), (127, 4), (128, 4)])
def test_replay_tiles_per_cta_keep_one_wave(B, per):
    """bf16 replay below B = 128 takes as many tiles per CTA as keep its CTAs in one wave (the
    H200 sweep: 1 at B = 8, 4 at B = 32); B >= 128 keeps the table's 4."""
    cfg = dispatch.tuning("verify", "mosaic", state_dtype="bfloat16", B=B, V=128, mode="replay")
    assert (cfg.block_v, cfg.tiles_per_cta, cfg.stages) == (128, per, 2)


def _dims(B=256, T=8, K=128, V=128, t_max=8):
    return kernels.Dims(B, T, 16, 32, K, V, B, t_max)


def test_a_shape_mosaic_cannot_fit_falls_back(mosaic_imports):
    """With the call's dims and dtypes, the table passes Mosaic over where its SMEM does not fit
    (here: fp32 pool, fp32 inputs and candidates, T = T_max = 8, K = 256); forcing it raises
    with the reason. The choice carries the tuning config of the backend it names."""
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    f32 = jnp.dtype("float32")
    fits = dict(dims=_dims(), dtypes=kernels.Dtypes(f32, f32, f32), mode="intermediate",
                device=h100)
    choice = dispatch.select("verify", **fits)
    assert choice.backend == "mosaic"
    assert choice.config == dispatch.tuning("verify", "mosaic", state_dtype=f32, B=256, V=128,
                                            mode="intermediate")
    big = dict(fits, dims=_dims(K=256))
    why = kernels.mosaic_misfit("intermediate", big["dims"], big["dtypes"], choice.config)
    assert why and "bytes of SMEM" in why
    choice = dispatch.select("verify", **big)
    assert choice.backend == "triton" and isinstance(choice.config, kernels.TuningConfig)
    with pytest.raises(ValueError, match=r"backend 'mosaic' cannot run on .*bytes of SMEM per "
                                         r"CTA.*; backends that can: \['xla', 'triton', "
                                         r"'interpret'\]"):
        dispatch.select("verify", backend="mosaic", **big)
    with pytest.raises(ValueError, match=r"K up to 256 \(one TMA box row\), got K=512"):
        dispatch.select("decode", backend="mosaic", K=512, V=128, device=h100)


def test_the_choice_is_one_hashable_static():
    """The choice (backend + frozen config) is what the kernel path jits on: equal choices
    hash alike whatever their reason."""
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    a = dispatch.select("decode", dims=_dims(B=8, T=1), device=h100)
    b = dispatch.select("decode", dims=_dims(B=8, T=1), backend="triton", device=h100)
    assert a.reason == "table" and b.reason == "forced"
    assert a == b and hash(a) == hash(b)
    assert dispatch.select("decode", backend="xla", device=h100).config is None


def test_ring_mode_runs_on_mosaic_on_hopper(mosaic_imports):
    """Ring mode's Mosaic GPU kernel (matrix form: Hopper, bf16 pool and tokens, T <= 8,
    T x W <= 128) is Hopper's default; what it cannot take goes to the Triton kernel, and forcing
    it there says why."""
    h100, b200 = FakeDevice("gpu", "9.0", "H100"), FakeDevice("gpu", "10.0", "B200")
    bf16, f32 = jnp.dtype("bfloat16"), jnp.dtype("float32")
    ring_dtypes = kernels.Dtypes(bf16, bf16, f32)  # the ring's u are fp32

    def pick(T=4, W=16, device=h100, dtypes=ring_dtypes, backend="mosaic"):
        return dispatch.select("verify", dims=_dims(B=32, T=T, t_max=W), dtypes=dtypes,
                               mode="ring", device=device, backend=backend)

    assert pick(backend=None).backend == "mosaic"
    assert pick(backend=None, dtypes=kernels.Dtypes(f32, f32, f32)).backend == "triton"
    assert pick(backend=None, T=16, W=32).backend == "triton"
    assert pick(backend=None, device=b200).backend == "triton"
    choice = pick()
    assert choice.backend == "mosaic" and choice.config == kernels.MosaicConfig(64, 4, 2)
    assert pick(T=8, W=16).backend == pick(T=4, W=32).backend == "mosaic"
    with pytest.raises(ValueError, match=r"T x W <= 128 .*got T = 8, W = 32"):
        pick(T=8, W=32)
    with pytest.raises(ValueError, match=r"takes T <= 8, got T = 9"):
        pick(T=9, W=32)
    with pytest.raises(ValueError, match="bf16 pool and bf16 tokens"):
        pick(dtypes=kernels.Dtypes(f32, bf16, f32))
    with pytest.raises(ValueError, match=r"Hopper's wgmma \(compute capability 9.x\)"):
        pick(device=b200)


def test_commit_mode_for_picks_ring_where_it_measured_faster(monkeypatch):
    """"auto" (the speculative loop's default): ring mode where its verify runs the Mosaic GPU
    kernel (Hopper, bf16 state, T <= 8) from RING_FROM_BATCH rows; replay elsewhere, for plain
    decoding, and under a forced backend that is not Mosaic GPU."""
    h100 = FakeDevice("gpu", "9.0", "NVIDIA H100 80GB HBM3")
    big, bf16 = dispatch.RING_FROM_BATCH, jnp.bfloat16
    assert dispatch.commit_mode_for(big, 3, bf16, device=h100) == "ring"
    assert dispatch.commit_mode_for(4 * big, 7, bf16, device=h100) == "ring"
    assert dispatch.commit_mode_for(big - 1, 3, bf16, device=h100) == "replay"
    assert dispatch.commit_mode_for(big, 0, bf16, device=h100) == "replay"  # plain decoding
    assert dispatch.commit_mode_for(big, 3, jnp.float32, device=h100) == "replay"
    assert dispatch.commit_mode_for(big, 8, bf16, device=h100) == "replay"  # T = 9: Triton's
    for dev in (FakeDevice("cpu"), FakeDevice("gpu", "8.0"), FakeDevice("gpu", "10.0")):
        assert dispatch.commit_mode_for(big, 3, bf16, device=dev) == "replay"
    for forced in ("xla", "triton", "interpret"):
        monkeypatch.setenv(dispatch.ENV_VAR, forced)
        assert dispatch.commit_mode_for(big, 3, bf16, device=h100) == "replay"
    monkeypatch.setenv(dispatch.ENV_VAR, "mosaic")
    assert dispatch.commit_mode_for(big, 3, bf16, device=h100) == "ring"
    assert dispatch.commit_mode_for(big, 3, bf16, device=FakeDevice("gpu", "8.0")) == "replay"
