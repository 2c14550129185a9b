"""Every kernel on one table of cases, run both ways: compiled on the GPU (`-m gpu`) and, where
the case is small enough for the interpreter on CPU, in interpret mode (the Pallas interpreter
for the Triton kernels, the Mosaic GPU interpreter for the `*_mgpu` ones).

Each run checks the kernel's outputs elementwise against the XLA reference (conftest.py's rule):
real rows close, padding rows exactly zero, the pool at the named slots close and at every other
slot bit-identical (NaN poison included); the Mosaic GPU runs also normwise against the float64
oracle (tests/oracle.py). Case ids are built from the case's fields.

The GPU cases use the real head shapes (H = 16, HV = 32, K = V = 128) at batch sizes up to 256;
the interpreter takes B <= 3 and small heads (about 10 ms per Mosaic CTA).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_cases import BF16_EPS, OraclePool, Tokens, rel_err
from gdn_jax import kernels

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_KERNELS = {("triton", "decode"): kernels.decode, ("triton", "replay"): kernels.verify_replay,
            ("triton", "intermediate"): kernels.verify_intermediate,
            ("triton", "fold"): kernels.fold, ("mosaic", "decode"): kernels.decode_mgpu,
            ("mosaic", "replay"): kernels.verify_replay_mgpu,
            ("mosaic", "intermediate"): kernels.verify_intermediate_mgpu}


@dataclasses.dataclass(frozen=True)
class KCase:
    op: str  # decode | replay | intermediate | fold
    B: int
    T: int
    H: int
    group: int
    K: int
    pool: object
    inp: object
    config: kernels.TuningConfig | kernels.MosaicConfig
    V: int | None = None
    t_max: int = 8

    @property
    def family(self) -> str:
        return "mosaic" if isinstance(self.config, kernels.MosaicConfig) else "triton"

    @property
    def small(self) -> bool:
        """Affordable in the interpreter on CPU."""
        return self.B <= 3 and self.H * self.group * self.K * (self.V or self.K) <= 32768

    @property
    def id(self) -> str:
        c = self.config
        tune = (f"bv{c.block_v}-t{c.tiles_per_cta}-s{c.stages}{'-wy' if c.wy else ''}"
                if self.family == "mosaic" else f"bv{c.block_v}-w{c.num_warps}")
        v = f"-V{self.V}" if self.V else ""
        return (f"{self.family}-{self.op}-B{self.B}-T{self.T}-H{self.H}-g{self.group}-K{self.K}"
                f"{v}-{_SHORT[jnp.dtype(self.pool).name]}pool-{_SHORT[jnp.dtype(self.inp).name]}in"
                f"-tmax{self.t_max}-{tune}")


def _t(op, B, T, H, g, K, pool, inp, bv, warps=4, t_max=8):
    return KCase(op, B, T, H, g, K, pool, inp, kernels.TuningConfig(bv, warps), t_max=t_max)


def _m(op, B, T, H, g, K, pool, inp, bv, per, st, V=None, t_max=8, wy=False):
    return KCase(op, B, T, H, g, K, pool, inp, kernels.MosaicConfig(bv, per, st, wy=wy), V=V,
                 t_max=t_max)


CASES = [
    # Triton decode: small (interpret and GPU), then the real shapes
    _t("decode", 1, 1, 1, 1, 16, F32, F32, 8, t_max=4),
    _t("decode", 3, 1, 2, 2, 32, BF16, BF16, 16, t_max=4),
    _t("decode", 3, 1, 1, 2, 16, F32, BF16, 16, t_max=4),
    _t("decode", 1, 1, 2, 1, 32, BF16, F32, 32, t_max=4),
    _t("decode", 3, 1, 2, 1, 32, F32, F16, 8, t_max=4),
    _t("decode", 256, 1, 16, 2, 128, BF16, BF16, 32, t_max=4),
    _t("decode", 256, 1, 16, 2, 128, F32, BF16, 64, t_max=4),
    _t("decode", 8, 1, 16, 2, 128, F32, F32, 32, t_max=4),
    _t("decode", 1, 1, 16, 2, 128, BF16, BF16, 8, warps=1, t_max=4),
    # Triton fold
    _t("fold", 3, 1, 2, 2, 16, BF16, BF16, 8, t_max=4),
    _t("fold", 1, 1, 1, 1, 32, F32, F32, 32, t_max=4),
    _t("fold", 64, 1, 16, 2, 128, BF16, BF16, 32),
    _t("fold", 64, 1, 16, 2, 128, F32, BF16, 32),
    # Triton verify, intermediate
    _t("intermediate", 1, 1, 1, 2, 16, F32, F32, 16),
    _t("intermediate", 3, 4, 2, 1, 32, BF16, BF16, 8),
    _t("intermediate", 3, 8, 1, 2, 32, F32, F32, 32),
    _t("intermediate", 1, 3, 2, 2, 16, BF16, F32, 8),
    _t("intermediate", 3, 6, 2, 2, 16, F32, F16, 16),
    _t("intermediate", 64, 8, 16, 2, 128, BF16, BF16, 32),
    _t("intermediate", 256, 2, 16, 2, 128, F32, F32, 32),
    _t("intermediate", 3, 5, 16, 2, 128, F32, BF16, 16),
    _t("intermediate", 2, 16, 1, 2, 16, F32, F32, 8, t_max=16),   # T up to MAX_T = 16
    _t("intermediate", 32, 16, 16, 2, 128, BF16, BF16, 16, t_max=16),
    # Triton verify, replay
    _t("replay", 3, 2, 2, 2, 32, F32, F32, 16),
    _t("replay", 1, 8, 1, 1, 16, BF16, BF16, 16),
    _t("replay", 3, 5, 1, 1, 16, BF16, F32, 8),
    _t("replay", 1, 7, 2, 2, 32, F32, BF16, 32),
    _t("replay", 3, 1, 2, 1, 16, F32, F32, 8),
    _t("replay", 256, 4, 16, 2, 128, BF16, BF16, 32),
    _t("replay", 128, 8, 16, 2, 128, F32, F32, 32),
    _t("replay", 32, 1, 16, 2, 128, BF16, F32, 64),
    _t("replay", 2, 16, 1, 1, 16, BF16, BF16, 16, t_max=16),        # T up to MAX_T = 16
    _t("replay", 1, 12, 2, 1, 16, F32, F32, 8, t_max=16),
    _t("replay", 64, 16, 16, 2, 128, BF16, BF16, 32, t_max=16),
    # Mosaic GPU decode (K, V multiples of 64; the last CTA overshoots where tiles % per != 0)
    _m("decode", 2, 1, 1, 2, 64, BF16, BF16, 64, 4, 2, V=64, t_max=3),
    _m("decode", 2, 1, 1, 2, 64, F32, F16, 64, 3, 3, V=128, t_max=3),
    _m("decode", 1, 1, 2, 1, 128, BF16, F32, 64, 1, 2, V=64, t_max=3),
    _m("decode", 1, 1, 1, 2, 64, F32, BF16, 128, 2, 4, V=128, t_max=3),
    _m("decode", 3, 1, 1, 2, 64, BF16, BF16, 64, 2, 3, V=128, t_max=3),  # dispatch's B >= 128
    _m("decode", 256, 1, 16, 2, 128, BF16, BF16, 64, 4, 2, t_max=4),
    _m("decode", 256, 1, 16, 2, 128, F32, BF16, 64, 4, 2, t_max=4),
    _m("decode", 256, 1, 16, 2, 128, BF16, BF16, 64, 2, 3, t_max=4),  # dispatch's B >= 128
    _m("decode", 256, 1, 16, 2, 128, F32, BF16, 64, 2, 3, t_max=4),
    _m("decode", 256, 1, 16, 2, 128, BF16, BF16, 128, 8, 3, t_max=4),
    _m("decode", 32, 1, 16, 2, 128, BF16, BF16, 64, 1, 2, t_max=4),
    _m("decode", 32, 1, 16, 2, 128, F32, F32, 128, 2, 2, t_max=4),
    _m("decode", 1, 1, 16, 2, 128, BF16, BF16, 64, 1, 2, t_max=4),
    _m("decode", 1, 1, 16, 2, 128, F32, BF16, 64, 3, 4, t_max=4),
    # Mosaic GPU verify, replay
    _m("replay", 2, 3, 1, 2, 64, BF16, BF16, 64, 2, 2, V=64, t_max=3),
    _m("replay", 1, 4, 1, 2, 64, F32, F32, 64, 3, 3, V=128, t_max=4),
    _m("replay", 256, 4, 16, 2, 128, BF16, BF16, 64, 2, 2),
    _m("replay", 256, 4, 16, 2, 128, BF16, BF16, 128, 4, 2),  # dispatch's bf16 tuning, B >= 128
    _m("replay", 128, 8, 16, 2, 128, F32, F32, 64, 2, 2),
    _m("replay", 32, 1, 16, 2, 128, BF16, F32, 128, 1, 2),
    _m("replay", 3, 5, 16, 2, 128, F32, BF16, 64, 3, 3),
    # Mosaic GPU replay in matrix form (wy: bf16 throughout, Hopper): T and T_max at their limit
    # (8), a single token, the dispatch's configs (B = 8: t2, B = 32: t4), and [128, K] tiles
    _m("replay", 2, 4, 1, 2, 64, BF16, BF16, 64, 1, 2, V=64, t_max=4, wy=True),
    _m("replay", 2, 8, 2, 1, 64, BF16, BF16, 64, 3, 2, V=128, t_max=8, wy=True),
    _m("replay", 3, 1, 1, 2, 128, BF16, BF16, 64, 2, 2, V=64, t_max=5, wy=True),
    # two whole key groups a CTA (4 tiles, 2 a group): X, X' and the Gram rebuilt mid-run
    _m("replay", 3, 4, 1, 2, 64, BF16, BF16, 64, 4, 2, V=64, t_max=4, wy=True),
    # groups of 4 tiles, runs of 3: CTAs start mid-group (offsets 3, 2, 1)
    _m("replay", 3, 4, 1, 2, 64, BF16, BF16, 64, 3, 2, V=128, t_max=4, wy=True),
    _m("replay", 8, 4, 16, 2, 128, BF16, BF16, 64, 2, 2, t_max=4, wy=True),
    _m("replay", 32, 4, 16, 2, 128, BF16, BF16, 64, 4, 2, t_max=4, wy=True),
    _m("replay", 5, 8, 16, 2, 128, BF16, BF16, 128, 2, 2, t_max=8, wy=True),
    _m("replay", 128, 3, 16, 2, 128, BF16, BF16, 64, 4, 3, t_max=4, wy=True),
    # Mosaic GPU verify, intermediate (T = 3: a 3-tile ring wrapping across tiles; T = 5 and 8:
    # a 4-tile ring wrapping inside a tile)
    _m("intermediate", 2, 3, 1, 2, 64, BF16, BF16, 64, 3, 2, V=64, t_max=3),
    _m("intermediate", 1, 5, 1, 2, 64, F32, F16, 64, 2, 3, V=128, t_max=5),
    _m("intermediate", 1, 1, 2, 1, 128, F32, BF16, 64, 1, 2, V=64, t_max=3),
    _m("intermediate", 256, 4, 16, 2, 128, BF16, BF16, 64, 2, 2),
    _m("intermediate", 64, 8, 16, 2, 128, F32, BF16, 64, 2, 2),
    _m("intermediate", 32, 3, 16, 2, 128, BF16, F32, 128, 1, 2),
    _m("intermediate", 3, 5, 16, 2, 128, F32, F32, 64, 3, 3),
]

_NO_MOSAIC = kernels.mosaic_unavailable()


def _params():
    for c in CASES:
        mosaic_skip = ([pytest.mark.skipif(_NO_MOSAIC is not None, reason=str(_NO_MOSAIC))]
                       if c.family == "mosaic" else [])
        if c.small:
            yield pytest.param(c, True, id=f"interpret-{c.id}", marks=mosaic_skip)
        yield pytest.param(c, False, id=f"gpu-{c.id}", marks=[pytest.mark.gpu, *mosaic_skip])


def test_every_case_id_is_unique_and_some_run_both_ways():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    for family in ("triton", "mosaic"):
        for op in ("decode", "replay", "intermediate"):
            cases = [c for c in CASES if c.family == family and c.op == op]
            assert any(c.small for c in cases) and not all(c.small for c in cases), (family, op)


@pytest.fixture
def device_for(request):
    def check(case: KCase, interpret: bool):
        if interpret:
            return
        dev = request.getfixturevalue("on_gpu")
        if case.family == "mosaic":
            cap = kernels.capability(dev)
            if cap < (9, 0):
                pytest.skip(f"the Mosaic GPU kernels need compute capability >= 9.0, got {cap}")
            if case.config.wy and cap[0] != 9:
                pytest.skip(f"replay's matrix form runs Hopper's wgmma (9.x), got {cap}")
    return check


def _oracle(case, mode):
    """(o [B, T, HV, V], pool) in float64 from tests/oracle.py; NaN where no real row writes.
    The pool takes the state after the tokens (decode, intermediate) or the folded state before
    them (replay)."""
    mirror = OraclePool(case.state())
    tok = Tokens(*case.tokens)
    o = np.zeros(case.v.shape)
    pool = np.full(case.pool.shape, np.nan)
    for i, s in enumerate(np.asarray(case.slots)):
        if case.real[i]:
            o[i], S, _, S0 = mirror.run(int(s), tok, i)
            pool[s] = S0 if mode == "replay" else S
    return o, pool


def _check_oracle(case, o, pool, mode):
    pool_tol = 1e-5 if case.pool.dtype == F32 else 2 * BF16_EPS
    o_tol = pool_tol + (0.0 if o.dtype == F32 else float(jnp.finfo(o.dtype).eps))
    o_want, pool_want = _oracle(case, mode)
    real, slots = case.real, np.asarray(case.slots)
    assert rel_err(o[real], o_want[real]) <= o_tol
    if mode == "intermediate":  # pool: the last S_t of each real row
        assert rel_err(pool[real, -1], pool_want[slots[real]]) <= pool_tol
    else:
        assert rel_err(pool[case.named_slots()], pool_want[case.named_slots()]) <= pool_tol


@pytest.mark.parametrize("kc, interpret", list(_params()))
def test_kernel_matches_reference(kc: KCase, interpret, device_for, make_case, reference,
                                  assert_rows, assert_named_slots, assert_untouched):
    device_for(kc, interpret)
    case = make_case(seed=sum(map(ord, kc.id)), B=kc.B, T=kc.T, H=kc.H, group=kc.group, K=kc.K,
                     V=kc.V, t_max=kc.t_max, pool_dtype=kc.pool, in_dtype=kc.inp)
    fn = _KERNELS[(kc.family, kc.op)]
    pool_bits = np.asarray(case.pool.astype(F32)).copy()
    if kc.op == "fold":
        pool = fn(jnp.array(case.pool, copy=True), *case.pending, case.slots, config=kc.config,
                  interpret=interpret)
        assert pool.dtype == case.pool.dtype
        assert_named_slots("pool", case, pool, reference(case, "fold"))
        assert_untouched(case, pool)
    elif kc.op == "intermediate":
        o, inter = fn(*case.kernel_args(), config=kc.config, interpret=interpret)
        assert o.dtype == case.q.dtype and inter.dtype == case.pool.dtype
        o_ref, inter_ref = reference(case, "intermediate")
        assert_rows("o", case, o, o_ref)
        assert_rows("inter", case, inter, inter_ref)
        np.testing.assert_array_equal(np.asarray(case.pool.astype(F32)), pool_bits)
        if kc.family == "mosaic":
            _check_oracle(case, o, inter, "intermediate")
    else:
        o, pool = fn(*case.kernel_args(), config=kc.config, interpret=interpret)
        assert o.dtype == case.q.dtype and pool.dtype == case.pool.dtype
        o_ref, pool_ref = reference(case, kc.op)
        assert_rows("o", case, o, o_ref)
        assert_named_slots("pool", case, pool, pool_ref)
        assert_untouched(case, pool)
        if kc.family == "mosaic":
            _check_oracle(case, o, pool, kc.op)
    if kc.op in ("fold", "replay"):
        # A named slot with nothing pending keeps its exact bits (neither read nor written).
        count = np.asarray(case.count)
        idle = np.array([s for s in case.named_slots() if count[s] == 0], np.int32)
        np.testing.assert_array_equal(np.asarray(pool.astype(F32))[idle], pool_bits[idle])
