"""`ops.conv.conv_step`: XLA's path and the kernel's (in the interpreter) give the same outputs
for real rows and the same conv buffer, decode (keep="window") and verify (keep="all"); the dispatch picks the kernel on a Triton GPU only where
its block tiles the widths; GDN_JAX_CONV is checked.

Tolerance between the two paths: both sum the same W fp32 products and round once to the output
dtype, so they differ only by the fp32 summation order (XLA may contract into FMAs): one bf16
ulp, 2**-8 relative, at the outputs' scale."""

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.ops import conv as conv_ops
from gdn_jax.ops.dispatch import Device

WIDTHS = (64, 64, 128)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(conv_ops.ENV_VAR, raising=False)
    monkeypatch.delenv("GDN_JAX_BACKEND", raising=False)


def _case(seed=0, N=5, L=7, W=4, B=4, T=1):
    rng = np.random.default_rng(seed)
    C = sum(WIDTHS)
    conv = jnp.asarray(rng.standard_normal((N, L, C)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((B, T, C)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((W, C)) * 0.5, jnp.bfloat16)
    slots = jnp.asarray([3, -1, 0, 4][:B], jnp.int32)
    return x, conv, weight, slots


@pytest.mark.parametrize("T, keep", [(1, "window"), (3, "all"), (2, "window")])
def test_kernel_and_xla_agree(monkeypatch, T, keep):
    x, conv, weight, slots = _case(T=T)
    results = {}
    for mode in ("xla", "interpret"):
        monkeypatch.setenv(conv_ops.ENV_VAR, mode)
        results[mode] = conv_ops.conv_step(x, conv, weight, slots, widths=WIDTHS, keep=keep,
                                           dtype=jnp.bfloat16)
    (outs_x, conv_x), (outs_k, conv_k) = results["xla"], results["interpret"]
    real = np.asarray(slots) >= 0
    for ox, ok in zip(outs_x, outs_k):
        ox, ok = np.asarray(ox, np.float64)[real], np.asarray(ok, np.float64)[real]
        np.testing.assert_allclose(ok, ox, rtol=0, atol=2.0 ** -8 * max(1, np.abs(ox).max()))
    np.testing.assert_array_equal(np.asarray(conv_k), np.asarray(conv_x))
    changed = np.any(np.asarray(conv_x) != np.asarray(conv), axis=(1, 2))
    assert list(np.flatnonzero(changed)) == [0, 3, 4]  # the real rows' slots, no other


def test_kernel_runs_where_asked(monkeypatch):
    calls = []
    real = kernels.conv_step
    monkeypatch.setattr(kernels, "conv_step",
                        lambda *a, **k: calls.append(k["config"].block) or real(*a, **k))
    x, conv, weight, slots = _case()
    conv_ops.conv_step(x, conv, weight, slots, widths=WIDTHS)  # CPU: XLA
    assert not calls
    monkeypatch.setenv("GDN_JAX_BACKEND", "interpret")
    conv_ops.conv_step(x, conv, weight, slots, widths=WIDTHS)
    assert calls == [64]


def test_gpu_dispatch(monkeypatch):
    monkeypatch.setattr(Device, "of", classmethod(lambda cls, d=None: Device("gpu", (9, 0), "H200")))
    assert conv_ops._mode((2048, 2048, 4096)) == ("compiled", 512)
    assert conv_ops._mode((48, 80)) == ("compiled", 16)
    assert conv_ops._mode((20, 44)) == (None, 0)  # no power-of-two block >= 16 tiles them
    monkeypatch.setenv(conv_ops.ENV_VAR, "xla")
    assert conv_ops._mode((2048, 2048, 4096)) == (None, 0)
    monkeypatch.setenv(conv_ops.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="GDN_JAX_CONV: expected auto, xla, pallas or interpret"):
        conv_ops._mode((64,))


def _in_proj(seed=0, B=2, T=1, K=64, dtype=jnp.bfloat16):
    """GDN's in_proj of a small layer (2 key and 16 value heads of 16, W = 4) and its conv."""
    rng = np.random.default_rng(seed)
    widths = (32, 32, 256, 256, 16, 16)
    C = sum(widths[:3])
    x = jnp.asarray(rng.standard_normal((B, T, K)), dtype)
    ws = (jnp.asarray(rng.standard_normal((K, 576)) * K ** -0.5, dtype),
          jnp.asarray(rng.standard_normal((K, 32)) * K ** -0.5, dtype))
    conv = jnp.asarray(rng.standard_normal((4, 3, C)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((4, C)) * 0.5, jnp.bfloat16)
    return x, ws, conv, weight, jnp.asarray([3, -1][:B], jnp.int32), widths


def test_project_conv_step_runs_where_asked(monkeypatch):
    """None (the caller's two launches) unless GDN_JAX_CONV_EPILOGUE asks (auto: up to 32 rows;
    on), a kernel path (here the interpreter) for the projection and the conv, one token a row
    where the window shifts (decode), and one dtype; then the kernel's outputs, [B, T, width]
    each."""
    from gdn_jax.ops import projection
    monkeypatch.delenv(conv_ops.EPILOGUE_VAR, raising=False)
    x, ws, conv, weight, slots, widths = _in_proj()
    step = lambda x=x, ws=ws: conv_ops.project_conv_step(  # noqa: E731
        x, ws, conv, weight, slots, widths=widths)
    monkeypatch.setenv("GDN_JAX_BACKEND", "interpret")
    monkeypatch.setenv(conv_ops.EPILOGUE_VAR, "off")
    assert step() is None
    monkeypatch.delenv(conv_ops.EPILOGUE_VAR)  # "auto": up to 32 rows
    assert step() is not None
    big = jnp.concatenate([x] * 17)[:33]  # 33 rows
    assert conv_ops.project_conv_step(big, ws, conv, weight, jnp.full((33,), -1, jnp.int32),
                                      widths=widths) is None
    x4 = jnp.concatenate([x[:1]] * 4, axis=1)  # a verify of 8 x 4 rows fuses, of 9 x 4 not
    conv7 = jnp.pad(conv, ((0, 0), (0, 4), (0, 0)))
    for B, fused in ((8, True), (9, False)):
        rows = jnp.full((B,), -1, jnp.int32).at[0].set(slots[0])
        got = conv_ops.project_conv_step(jnp.concatenate([x4] * B), ws, conv7, weight, rows,
                                         widths=widths, keep="all")
        assert (got is not None) == fused, B
    monkeypatch.setenv(conv_ops.EPILOGUE_VAR, "on")
    outs, new_conv = step()
    config, interpret = projection.epilogue_config(2, 64, (576, 32), jnp.bfloat16)
    assert interpret and config.splits == 1
    ref_outs, ref_conv = kernels.project_conv(x[:, 0], ws, conv, weight, slots, widths=widths,
                                              config=config, interpret=True)
    for out, ref in zip(outs, ref_outs):
        assert out.shape == (2, 1, ref.shape[1])
        np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(new_conv), np.asarray(ref_conv))
    assert step(x=jnp.concatenate([x, x], axis=1)) is None  # two tokens a row: not decode's
    x2 = jnp.concatenate([x, x[::-1]], axis=1)
    conv5 = jnp.pad(conv, ((0, 0), (0, 2), (0, 0)))
    outs, new_conv = conv_ops.project_conv_step(x2, ws, conv5, weight, slots, widths=widths,
                                                keep="all")  # verify's
    ref_outs, ref_conv = kernels.project_conv(x2.reshape(4, 64), ws, conv5, weight, slots,
                                              widths=widths, tokens=2, keep="all",
                                              config=config, interpret=True)
    assert all(o.shape == (2, 2, r.shape[1]) for o, r in zip(outs, ref_outs))
    np.testing.assert_array_equal(np.asarray(outs[2]).reshape(4, -1), np.asarray(ref_outs[2]))
    np.testing.assert_array_equal(np.asarray(new_conv), np.asarray(ref_conv))
    assert step(ws=(ws[0].astype(jnp.float32), ws[1])) is None  # a weight of another dtype
    monkeypatch.setenv(conv_ops.ENV_VAR, "xla")
    assert step() is None  # the conv kept in XLA
    monkeypatch.delenv(conv_ops.ENV_VAR)
    monkeypatch.setenv("GDN_JAX_BACKEND", "xla")
    assert step() is None  # CPU, or the projections kept in XLA
    monkeypatch.setenv(conv_ops.EPILOGUE_VAR, "yes")
    with pytest.raises(ValueError, match=r"GDN_JAX_CONV_EPILOGUE: expected one of \['auto', "
                                         r"'on', 'off'\], got 'yes'"):
        step()


@pytest.mark.parametrize("M, block_n, swap_ab", [(1, 32, False), (8, 32, False),
                                                 (32, 64, True), (64, 64, False)])
def test_epilogue_config_is_the_split_launch_unsplit(monkeypatch, M, block_n, swap_ab):
    """On an H200 (faked): the in_proj group's config unsplit, its column blocks cut by the
    slices it took (as many programs), never below 64 columns where the weight goes first."""
    from gdn_jax.ops import projection
    monkeypatch.setattr(Device, "of", classmethod(lambda cls, d=None: Device("gpu", (9, 0),
                                                                             "H200")))
    widths = (12288, 64)
    split = projection.config_for(M, 2048, widths)
    config, interpret = projection.epilogue_config(M, 2048, widths, jnp.bfloat16)
    assert not interpret and config.splits == 1
    assert (config.block_n, config.swap_ab) == (block_n, swap_ab)
    assert config.block_n * split.splits >= split.block_n
    assert projection.epilogue_config(M, 2048, (12288,), jnp.bfloat16) is None  # no group
    monkeypatch.setenv(projection.GROUPS_VAR, "off")
    assert projection.epilogue_config(M, 2048, widths, jnp.bfloat16) is None
