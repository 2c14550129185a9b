"""Which implementation runs each op on which device: one table, read from the device's capability.

Backends:
  "xla"        the reference path (`gdn_jax.ops.reference`): any platform, any shape.
  "triton"     Pallas kernels through the Triton lowering (`gdn_jax.kernels`): NVIDIA GPUs from
               SM80 up, T <= kernels.MAX_T (16; the Mosaic GPU kernels 8).
  "mosaic"     Pallas Mosaic GPU kernels (`gdn_jax.kernels.decode_mgpu`, `verify_mgpu`): decode
               and verify in both modes, Hopper and datacenter Blackwell (capability 9.x, 10.x,
               11.x), K and V multiples of 64. The Hopper default where the H100 benchmark
               measured it faster than Triton (`preferences`); elsewhere forced only. On Hopper
               a bf16 replay verify runs in matrix form (`MosaicConfig.wy`).
  "interpret"  the same Pallas kernels run by the Pallas interpreter: any platform, slow; for tests
               of the kernel path on machines without a GPU.

The table maps (platform, compute-capability major, op, verify mode, batch bucket) to the
backends to try, in order; the first that can take the call's shape runs. A user forces one with
the `backend=` argument of an op or the GDN_JAX_BACKEND environment variable (the argument wins);
a forced backend that cannot run raises a ValueError naming the device, its capability and the
backends that can. Ops without a kernel (commit, reset, prefill) always run XLA; the environment
variable leaves them alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp

from gdn_jax import kernels

ENV_VAR = "GDN_JAX_BACKEND"
BACKENDS = ("xla", "triton", "mosaic", "interpret")
MOSAIC_OPS = ("decode", "verify")  # ops with a Mosaic GPU kernel (verify: every mode)
KERNEL_OPS = ("decode", "verify", "flush")  # ops with a kernel; the rest are XLA scatters
_TRITON_CAPABILITY = (8, 0)
_log = logging.getLogger("gdn_jax.dispatch")
_logged: set = set()


@dataclasses.dataclass(frozen=True)
class Device:
    platform: str  # "gpu" for CUDA, else jax's platform name
    capability: tuple[int, int] | None  # (major, minor) on CUDA, else None
    kind: str

    @classmethod
    def of(cls, device=None) -> "Device":
        device = device or jax.devices()[0]
        return cls(device.platform, kernels.capability(device),
                   getattr(device, "device_kind", device.platform))

    def __str__(self):
        cap = "" if self.capability is None else f", capability {'.'.join(map(str, self.capability))}"
        return f"{self.kind} ({self.platform}{cap})"

    @property
    def runs_triton(self) -> bool:
        """Whether the Pallas-Triton kernels compile here: an NVIDIA GPU from SM80."""
        return self.platform == "gpu" and self.capability is not None \
            and self.capability >= _TRITON_CAPABILITY


def sm_count(device=None) -> int:
    """The SMs of `device` (default: the first device); 132 (an H100 / H200) where jax does not
    say, e.g. on CPU (the kernels' launch heuristics size their grids by it)."""
    device = device or jax.devices()[0]
    return getattr(device, "core_count", None) or 132


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend that runs a call, with the frozen launch config of its kernel: a
    `kernels.TuningConfig` (triton, interpret), a `kernels.MosaicConfig` (mosaic) or None (xla).
    Hashable (the reason aside): the ops pass it to their jitted kernel path as one static."""

    backend: str
    config: kernels.TuningConfig | kernels.MosaicConfig | None = None
    reason: str = dataclasses.field(default="", compare=False)


def kernel_mode(var: str) -> str | None:
    """Where a small kernel steered by its own environment variable var (GDN_JAX_SCATTER,
    GDN_JAX_CONV, GDN_JAX_MOE_ROUTER, ...) runs: "compiled" on a GPU with Triton, "interpret"
    (the Pallas interpreter, tests) where asked, None for XLA. var: auto (default) | pallas (the
    same) | xla | interpret; unset, GDN_JAX_BACKEND's xla and interpret steer it too. Read at
    trace time."""
    wish = os.environ.get(var)
    if not wish:
        backend = os.environ.get(ENV_VAR)
        wish = backend if backend in ("xla", "interpret") else "auto"
    if wish not in ("auto", "xla", "pallas", "interpret"):
        raise ValueError(f"{var}: expected auto, xla, pallas or interpret, got {wish!r}")
    if wish == "xla":
        return None
    if wish == "interpret":
        return "interpret"
    return "compiled" if Device.of().runs_triton else None  # no Triton here: XLA


def preferences(device: Device, op: str = "decode", B: int | None = None,
                mode: str | None = None) -> tuple[str, ...]:
    """The table: backends to try in order for `op` at batch B (None: unknown; verify: in `mode`)
    on this device (the first able to run wins)."""
    if device.platform != "gpu" or device.capability is None:
        return ("xla",)  # CPU, TPU, ROCm: the reference
    major = device.capability[0]
    if mode == "ring":
        # Decode and verify in ring mode. Hopper: the Mosaic GPU kernel in matrix form (bf16,
        # T <= 8; wgmma), measured faster than the Triton kernel at B = 32 and 256 (H200, JAX's
        # profiler, T = 4, W = 16, fold 20%: 35.4 vs 61.9 us, 213.3 vs 415.1; ring decode 27.1
        # vs 42.6, 165.2 vs 262.8: bench/results/ring_mgpu_issue-h200-2026-12-03.json);
        # elsewhere, and for what it cannot take, the Triton kernel (tensor-core dots, SM80+).
        return ("mosaic", "triton", "xla") if major == 9 else ("triton", "xla")
    if major in (8, 12):  # Ampere/Ada, consumer Blackwell (no wgmma, no tcgen05): portable kernels
        return ("triton", "xla")
    if major == 9:
        # Hopper: Mosaic GPU where the H100 benchmark measured it faster than Triton
        # (ncu kernel time, bench/results/ncu_kernels-h100-final-2026-11-26.json, B = 8, 32,
        # 256, bf16 and fp32 state). Decode: faster from B = 256 (bf16 191 vs 201 us, fp32
        # 376 vs 388), slower at B = 8 and 32 (bf16 10.8 vs 9.6 us, 26.7 vs 24.5): B >= 128
        # only. Verify, both modes: faster at every measured B and dtype (replay 3 + 4, bf16,
        # B = 256: 352 vs 510 us; intermediate T = 4: 483 vs 599).
        if (op == "decode" and B is not None and B >= _LARGE_BATCH) or (
                op == "verify" and mode in ("replay", "intermediate")):
            return ("mosaic", "triton", "xla")
        return ("triton", "xla")
    if major in (10, 11):  # datacenter Blackwell: the kernels that ran and passed on H100; no
        return ("triton", "xla")  # Blackwell benchmark yet to promote Mosaic there
    return ("xla",)  # pre-Ampere


def why_not(backend: str, device: Device, op: str, T: int, *, K: int | None = None,
            V: int | None = None, mode: str | None = None) -> str | None:
    """None when `backend` can run `op` with T tokens (head dims K, V where known; verify and
    decode in `mode`) on `device`, else the reason it cannot."""
    if backend == "xla":
        return None
    if op not in KERNEL_OPS:
        return f"{op} has no {backend} kernel"
    if mode == "ring":
        if T > kernels.RING_MAX_T:
            return f"the ring kernel takes T <= {kernels.RING_MAX_T}, got T = {T}"
        if backend == "mosaic":
            if T > kernels.MOSAIC_RING_MAX_T:
                return (f"the Mosaic GPU ring kernel takes T <= {kernels.MOSAIC_RING_MAX_T}, "
                        f"got T = {T}")
            if device.capability is not None and device.capability[0] != 9:
                return "the Mosaic GPU ring kernel runs on Hopper's wgmma (compute capability 9.x)"
    elif T > kernels.MAX_T:
        return f"the kernels take T <= {kernels.MAX_T}, got T = {T}"
    if backend == "interpret":
        return None
    if backend == "triton":
        if device.platform != "gpu" or device.capability is None:
            return "the Triton kernels need an NVIDIA GPU"
        if not device.runs_triton:
            return "the Triton kernels need compute capability >= 8.0"
        return None
    if backend == "mosaic":
        return _mosaic_why_not(device, op, K, V)
    return f"unknown backend {backend!r}"


def _mosaic_why_not(device: Device, op: str, K: int | None, V: int | None) -> str | None:
    if op not in MOSAIC_OPS:
        return (f"there is no Mosaic GPU kernel for {op} (Mosaic GPU runs "
                f"{' and '.join(MOSAIC_OPS)})")
    if device.platform != "gpu" or device.capability is None:
        return "the Mosaic GPU kernels need an NVIDIA GPU"
    if device.capability[0] not in (9, 10, 11):
        return ("the Mosaic GPU kernels need compute capability 9.x (Hopper) or 10.x/11.x "
                "(datacenter Blackwell): TMA, and a Mosaic GPU target")
    return kernels.mosaic_head_dims_misfit(K, V) or kernels.mosaic_unavailable()


def select(op: str, *, dims: kernels.Dims | None = None, dtypes: kernels.Dtypes | None = None,
           mode: str | None = None, backend: str | None = None, device=None, T: int = 1,
           K: int | None = None, V: int | None = None, B: int | None = None) -> Choice:
    """The backend that runs `op` on `device` (default: the first device), with its kernel's
    launch config (`Choice`).

    dims:   the call's sizes (`kernels.Dims`; the ops pass them). Without dims, T, K, V and B
            say what is known (None: unknown), for `describe_dispatch` and what-if questions.
    dtypes: the call's storage dtypes (`kernels.Dtypes`; default: bf16 throughout). With dims,
            a backend whose kernel cannot take the call's whole shape (the SMEM a Mosaic GPU
            tile needs, `kernels.mosaic_misfit`) is passed over, or refused if forced.
    mode:   verify's mode, "replay" | "intermediate" | "ring" (decode: "ring" on a ring-mode
            state, else None).
    """
    if dims is not None:
        T, K, V, B = dims.T, dims.K, dims.V, dims.B
    forced = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR) or None
    if forced is not None and forced not in BACKENDS + ("auto",):
        source = "backend" if backend not in (None, "auto") else ENV_VAR
        raise ValueError(f"{op}: {source} expected one of {('auto',) + BACKENDS}, got {forced!r}")
    dev = Device.of(device)
    if op not in KERNEL_OPS:
        # commit, reset and prefill are XLA on every backend: the environment variable does not
        # apply to them, and an explicit kernel backend is an error rather than a silent no-op.
        if backend not in (None, "auto", "xla"):
            raise ValueError(f"{op}: backend {backend!r} cannot run on {dev}: {op} has no "
                             f"{backend} kernel; backends that can: ['xla']")
        return _logged_choice(op, dev, Choice("xla", None, f"{op} has no kernel"))
    dtypes = dtypes or _DEFAULT_DTYPES

    def config(name):
        if name == "xla":
            return None
        return tuning(op, "mosaic" if name == "mosaic" else "triton", state_dtype=dtypes.pool,
                      B=B if B is not None else 1, V=V if V is not None else 128, mode=mode,
                      wy=_wy_fits(dev, dtypes))

    def reason(name):
        why = why_not(name, dev, op, T, K=K, V=V, mode=mode)
        if why or name != "mosaic" or dims is None:
            return why
        return kernels.mosaic_misfit(mode or "decode", dims, dtypes, config(name))

    if forced not in (None, "auto"):
        why = reason(forced)
        if why:
            able = [b for b in BACKENDS if not reason(b)]
            raise ValueError(f"{op}: backend {forced!r} cannot run on {dev}: {why}; "
                             f"backends that can: {able}")
        return _logged_choice(op, dev, Choice(forced, config(forced), "forced"))
    for name in preferences(dev, op, B, mode):
        if not reason(name):
            return _logged_choice(op, dev, Choice(name, config(name), "table"))
    raise AssertionError("the xla backend runs everything")  # pragma: no cover


def _logged_choice(op: str, dev: Device, choice: Choice) -> Choice:
    key = (op, dev, choice.backend, choice.config, choice.reason)
    if key not in _logged:
        _logged.add(key)
        _log.debug("gdn_jax %s on %s: %s (%s)", op, dev, choice.backend, choice.reason)
    return choice


# The commit mode "auto" picks (`commit_mode_for`): ring from this many rows, where ring mode's
# verify runs the Mosaic GPU kernel. 48-layer dense step, H200, forced accept length 3.39,
# speculative tokens/s, ring vs replay in one runner call each: B = 1 795 vs 812 (replay
# ahead by 2%, less than the 10% two processes differ there on the same plain decode), B = 32
# 15150 vs 14870, B = 128 26551 vs 25527 (bench/results/bench_speculative-h200-qwen3_5_text-
# {b1_b128,b32}-ring_vs_replay-2026-12-03.json); B = 8 not measured yet.
RING_FROM_BATCH = 32


def commit_mode_for(batch: int, num_draft: int, state_dtype, device=None) -> str:
    """The GDN commit mode for a speculative loop of `batch` rows verifying num_draft + 1 tokens
    a round with a `state_dtype` state, on `device` (default: the first device): "ring" where
    ring mode's verify runs the Mosaic GPU kernel (Hopper, bf16 state, T <= 8; GDN_JAX_BACKEND
    respected) and batch >= RING_FROM_BATCH, else "replay". Plain decoding (num_draft = 0) keeps
    "replay", whose decode is the plain kernel (ring mode's decode is the ring kernel's)."""
    if num_draft < 1 or batch < RING_FROM_BATCH or jnp.dtype(state_dtype) != jnp.bfloat16:
        return "replay"
    try:
        choice = select("verify", T=num_draft + 1, B=batch, mode="ring", device=device)
    except ValueError:  # a forced backend that cannot run ring mode here
        return "replay"
    return "ring" if choice.backend == "mosaic" else "replay"


def describe_dispatch(device=None) -> str:
    """What runs for each op on `device` (default: the first device), as printable lines."""
    dev = Device.of(device)
    lines = [f"gdn_jax dispatch on {dev}:"]
    rows = (("decode", 1, 1, None), ("decode", 1, _LARGE_BATCH, None), ("verify", 4, None, "replay"),
            ("verify", 4, None, "intermediate"), ("verify", 4, None, "ring"),
            ("decode", 1, None, "ring"), ("flush", 1, None, None), ("commit", 1, None, None),
            ("reset", 1, None, None), ("prefill", 512, None, None))
    for op, T, B, mode in rows:
        choice = select(op, T=T, B=B, mode=mode, device=device)
        where = (f" (B {'<' if B < _LARGE_BATCH else '>='} {_LARGE_BATCH})" if B is not None
                 else f" ({mode})" if mode else "")
        lines.append(f"  {op + where:21s} -> {choice.backend}")
    return "\n".join(lines)


# Kernel tuning, from the ncu sweep on an H100 (bench/results/ncu_sweep-h100-2026-11-25.json:
# block_v x num_warps for decode and replay 3+4 at B = 32 and 256, intermediate at B = 256).
# One warp per program with a small tile wins almost everywhere: many programs in flight hide the
# latency of the per-token reductions. Keyed by (op, state dtype, large batch: B >= 128).
_TUNING = {
    ("decode", "bfloat16", True): (32, 1),   # 201.6 us at B = 256 (89.5% of copy)
    ("decode", "bfloat16", False): (16, 1),  # 24.6 us at B = 32
    ("decode", "float32", True): (32, 2),    # 386.7 us at B = 256 (92.8%)
    ("decode", "float32", False): (16, 1),   # 46.7 us at B = 32
    ("verify", "bfloat16", True): (16, 1),   # replay 3+4: 510 us; intermediate T=4: 600 us
    ("verify", "bfloat16", False): (16, 1),  # replay 3+4: 64.3 us at B = 32
    ("verify", "float32", True): (8, 1),     # replay 3+4: 680 us at B = 256
    ("verify", "float32", False): (8, 1),    # replay 3+4: 83.8 us at B = 32
}
_LARGE_BATCH = 128
# The ring kernel (kernels/ring.py), decode and verify: block_v, num_warps. Keyed by (state
# dtype, large batch). From the H200 sweep of the raw-input ring kernel
# (bench/results/ncu_sweep_ring_v1-h200-2026-12-01.json, verify T = 4, W = 16, fold 20%, B = 256):
# one program per value head won, since each program repeated the token algebra whatever its V
# block. The u-form kernel (kernels/ring.py now) solves only the call's own tokens; it has not been
# swept yet (`bench/ncu_kernels.py --sweep-ring`; offline, bf16 bv64 w8 takes 180 registers).
_RING_TUNING = {
    ("bfloat16", True): (128, 4),   # 653.7 us (bv64 w4: 904.9; bv32 w2: 939.6)
    ("bfloat16", False): (128, 4),
    ("float32", True): (32, 4),     # 3281.8 us (bv64 w8: 3927.1): spills at 255 registers
    ("float32", False): (32, 4),
}
_DEFAULT_DTYPES = kernels.Dtypes(*(jnp.dtype(jnp.bfloat16),) * 3)

# Mosaic GPU kernels (kernels/decode_mgpu.py, verify_mgpu.py): block_v, tiles_per_cta, stages.
# Decode at large B from the H200 sweep (bench/results/sweep_mosaic_decode-h200-2026-12-02.json,
# JAX's profiler, B = 256: a third stage keeps two tiles' loads in flight, which the H200's
# bandwidth needs; on the H100 two stages were enough); the rest from the H100 ncu sweeps
# (bench/results/ncu_sweep_mosaic*-h100-2026-11-26*.json; replay 3 + 4 and intermediate T = 4)
# and runs at B = 8 (ncu_kernels-h100-{pending-tma,final}-2026-11-26*). A [128, K] tile halves
# replay's per-tile work (gates, l2norms, the fold's loads) against its rows where the bf16 state
# leaves room for two CTAs per SM; fp32 tiles of 128 rows fit one CTA per SM and lose. Three
# stages also drop to one CTA per SM: two win.
_MOSAIC_TUNING = {
    ("decode", "bfloat16", True): (64, 2, 3),    # H200: 145.9 us at B = 256 (t4 s2: 159.0)
    ("decode", "bfloat16", False): (64, 1, 2),   # forced only: Triton is the small-B default
    ("decode", "float32", True): (64, 2, 3),     # H200: 277.9 us (t4 s2: 288.6)
    ("decode", "float32", False): (64, 1, 2),
    ("verify", "bfloat16", True): (128, 4, 2),   # replay: 351.6 us at B = 256 (bv64: 455.9)
    ("verify", "bfloat16", False): (128, 1, 2),  # tiles per CTA by B: _replay_tiles_per_cta
    ("verify", "float32", True): (64, 4, 2),     # 539.6 us at B = 256 (bv128: 597.2)
    ("verify", "float32", False): (64, 2, 2),    # 23.1 us at B = 8, 82.0 at B = 32 (t4: 32.6, 72.2)
    ("verify_intermediate", "bfloat16", True): (64, 2, 2),   # 483.2 us at B = 256 (94.0%)
    ("verify_intermediate", "bfloat16", False): (64, 2, 2),  # 62.9 us at B = 32, 17.0 at B = 8
    ("verify_intermediate", "float32", True): (64, 2, 2),    # 945.2 us (95.2%)
    ("verify_intermediate", "float32", False): (64, 2, 2),   # 124.8 us at B = 32
}


def _wy_fits(device: Device, dtypes: kernels.Dtypes) -> bool:
    """Whether replay's matrix form (`MosaicConfig.wy`) can run: Hopper's wgmma, bf16 pool,
    tokens and candidates."""
    bf16 = jnp.dtype(jnp.bfloat16)
    return (device.capability is not None and device.capability[0] == 9
            and all(jnp.dtype(d) == bf16 for d in dtypes))


def _replay_tiles_per_cta(B: int) -> int:
    """Replay verify (bf16, [128, K] tiles, two CTAs per SM) below B = 128: as many tiles per CTA
    as keep the B * 32 value heads' tiles within one wave of CTAs on 132 SMs. H200, 3 pending +
    T = 4 (bench/results/sweep_mosaic_replay-h200-b8_b32-2026-12-02.json, JAX's profiler): B = 8
    12.8 us at 1 (2: 19.8), B = 32 44.0 at 4 (2: 45.3, 1: 46.4)."""
    return 1 if B <= 8 else 2 if B <= 16 else 4


def tuning(op: str, backend: str = "triton", *, state_dtype, B: int, V: int,
           mode: str | None = None, wy: bool = False
           ) -> kernels.TuningConfig | kernels.MosaicConfig:
    """The launch config of `op`'s kernel for this call (verify: in `mode`): a
    `kernels.TuningConfig` for the Triton kernels (and the interpreter), a `kernels.MosaicConfig`
    for the Mosaic GPU ones. wy: replay's matrix form can run (`_wy_fits`); it is taken where
    measured faster (every B measured: 1 to 256)."""
    large = B >= _LARGE_BATCH
    if mode == "ring" and backend == "mosaic":
        # H200, T = 4, W = 16, fold 20% (bench/results/sweep_ring_mgpu-h200-2026-12-03.json):
        # B = 32 38.7 us at bv64 t4 s2 (t2 40.4, t8 44.4, bv128 t2 52.8, s3 64.1); B = 256 265.3
        # (t2 294.6, t8 268.5, bv128 t2 369.2, s3 442.7). B < 32 unmeasured. The sweep ran
        # before the kernel's issue diet (38.7 -> 35.4, 265.3 -> 213.3 at this config).
        return kernels.MosaicConfig(min(64, V), 4, 2)
    if mode == "ring":
        block_v, num_warps = _RING_TUNING[(jnp.dtype(state_dtype).name, large)]
        return kernels.TuningConfig(min(block_v, V), num_warps, num_stages=1)
    if backend == "mosaic":
        key_op = "verify_intermediate" if op == "verify" and mode == "intermediate" else op
        if key_op == "verify" and mode == "replay" and wy:
            # H200, 3 pending + T = 4, per call of a jitted loop: B = 8 19.1 us at t2 (the
            # token-by-token form 20.0), B = 32 48.8 at t4 (52.8)
            # (bench/results/replay_wy-h200-2026-12-02.json); B = 1, 2, 4 at t2 16.8, 15.1,
            # 15.7 (17.2, 16.9, 17.3; t1: 18.2, 12.6, 14.3: replay_wy_small_b-h200-...). With
            # X and the Gram built once per key group (JAX's profiler, kernel time): B = 32
            # 45.9 us at t4, B = 128 173.8 (the token form's best 176.4), B = 256 334.8 (362.7;
            # the token form's default 351.6): sweep_mosaic_replay-h200-wy_groups-2026-12-02.
            # Three stages take more than half an SM's SMEM: 68 to 716 us, never faster. All
            # of it measured on the H200 only; the H100 (9.0) takes the same rule unmeasured.
            return kernels.MosaicConfig(min(64, V), 2 if B <= 8 else 4, 2, wy=True)
        block_v, per, stages = _MOSAIC_TUNING[(key_op, jnp.dtype(state_dtype).name, large)]
        if (key_op, jnp.dtype(state_dtype).name, large) == ("verify", "bfloat16", False):
            per = _replay_tiles_per_cta(B)
        return kernels.MosaicConfig(min(block_v, V), per, stages)
    key_op = "decode" if op == "decode" else "verify"  # flush folds like a verify
    block_v, num_warps = _TUNING[(key_op, jnp.dtype(state_dtype).name, large)]
    return kernels.TuningConfig(min(block_v, V), num_warps, num_stages=1)
