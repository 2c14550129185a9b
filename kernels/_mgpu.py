"""The one place that binds kernels to Pallas **Mosaic GPU** and hides its version differences.

(`_pallas.py` is the Triton-bound counterpart.) The kernels use the form that lowers unchanged on
jax 0.10.2, 0.11.2 and 0.12 (pallas-gpu.md section 1.3): `pl.run_state` turns the arrays into
mutable GMEM refs (the pool is written in place) and `pl.core_map(plgpu.Mesh(...))` runs the
body on a grid of CTAs, one warpgroup each, with Warpgroup lowering semantics set explicitly
(0.10.x defaults to Lane). What differs between versions lives here:

- importing `jax.experimental.pallas.mosaic_gpu` needs absl-py on 0.10.x (`unavailable()` says so);
- `plgpu.load(ref, idx, ...)` on 0.10.x, `plgpu.load(ref, ...)` from 0.11 (`idx` removed in 0.12);
- the GPU interpreter's `InterpretGPUParams` is public from 0.11.2 (private before);
- `plgpu.load(..., layout=)` fails inside the interpreter on 0.10.x, and the interpreter knows no
  layouts or swizzles anyway: under interpret the shims read refs plainly and use unswizzled SMEM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - 0.10.x without absl-py raises ModuleNotFoundError
    plgpu = None
    _IMPORT_ERROR = e

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())
MIN_JAX = (0, 10, 2)
SMEM_BYTES = 227 * 1024  # the most dynamic shared memory one CTA may have on H100 / B200
SMEM_ALIGNMENT = 1024  # Pallas Mosaic GPU starts every scoped SMEM buffer at a 1 KiB boundary
MAX_K = 256  # one TMA box row
HEAD_DIM_MULTIPLE = 64  # the WGMMA register layout's rows and columns
REDUCTION_SCRATCH_BYTES = 2048  # CompilerParams.reduction_scratch_bytes' default, reserved too


def aligned_bytes(buffers) -> int:
    """The SMEM a CTA allocates for scoped buffers of these byte sizes: each rounded up to
    `SMEM_ALIGNMENT`, as Pallas lays them out."""
    return sum(-(-n // SMEM_ALIGNMENT) * SMEM_ALIGNMENT for n in buffers)


def unavailable() -> str | None:
    """None when Mosaic GPU kernels can be built with this jax, else why not."""
    if JAX_VERSION < MIN_JAX:
        return f"the Mosaic GPU kernels need jax >= {'.'.join(map(str, MIN_JAX))}, got {jax.__version__}"
    if plgpu is None:
        hint = " (jax 0.10.x needs absl-py for it: pip install absl-py)" if "absl" in str(
            _IMPORT_ERROR) else ""
        return f"jax.experimental.pallas.mosaic_gpu does not import: {_IMPORT_ERROR}{hint}"
    return None


def require(op: str) -> None:
    reason = unavailable()
    if reason is not None:
        raise NotImplementedError(f"{op}: {reason}")


def interpret_params():
    """The GPU interpreter's parameters: NaN for uninitialised memory, bounds checked."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:  # before 0.11.2: not yet public
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def head_dims_misfit(K: int | None = None, V: int | None = None) -> str | None:
    """None when the Mosaic GPU kernels can tile head dims K and V (None: not known yet), else
    why not. The one statement of their shape limits."""
    for name, d in (("K", K), ("V", V)):
        if d is not None and d % HEAD_DIM_MULTIPLE:
            return (f"the Mosaic GPU kernels take {name} a multiple of {HEAD_DIM_MULTIPLE} "
                    f"(WGMMA layout), got {name}={d}")
    if K is not None and K > MAX_K:
        return f"the Mosaic GPU kernels take K up to {MAX_K} (one TMA box row), got K={K}"
    return None


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Launch parameters of a Mosaic GPU kernel call (hashable: a static argument of `jax.jit`).

    block_v:       rows of the [V, K] state one step owns (a [block_v, K] fp32 register tile in
                   the WGMMA layout, so a multiple of 64: 64 or 128).
    tiles_per_cta: tiles (b, hv, v-block) one CTA walks through in order; the grid is
                   ceil(B * HV * V / block_v / tiles_per_cta) CTAs.
    stages:        SMEM buffers per CTA (>= 2): the loads of the next stages - 1 tiles are in
                   flight while a tile is computed and stored.
    wy:            replay only: the matrix (WY) form, its state products on the tensor cores
                   (`_replay_wy_mgpu`; bf16 pool, tokens and candidates; Hopper's wgmma), instead
                   of the token-by-token recurrence.
    """

    block_v: int = 64
    tiles_per_cta: int = 4
    stages: int = 2
    wy: bool = False

    def __post_init__(self):
        if self.block_v not in (64, 128):
            raise ValueError(f"MosaicConfig: block_v must be 64 or 128 (WGMMA layout rows), "
                             f"got {self.block_v=}")
        if not isinstance(self.tiles_per_cta, int) or self.tiles_per_cta < 1:
            raise ValueError(f"MosaicConfig: tiles_per_cta must be an int >= 1, "
                             f"got {self.tiles_per_cta=}")
        if not isinstance(self.stages, int) or not 2 <= self.stages <= 4:
            raise ValueError(f"MosaicConfig: stages must be an int in 2..4, got {self.stages=}")
        if not isinstance(self.wy, bool):
            raise ValueError(f"MosaicConfig: wy must be a bool, got {self.wy=}")

    def misfit(self, K: int, V: int, pool_dtype, in_dtype, T: int = 1, out_tiles: int = 0,
               pending: int = 0, cand_dtype=None) -> str | None:
        """None when this config can tile head dims K, V and its SMEM (see `smem_bytes`) fits
        one CTA, else why not."""
        if V % self.block_v:
            return f"block_v must divide V, got {self.block_v=}, {V=}"
        why = head_dims_misfit(K)
        if why:
            return why
        need = self.smem_bytes(K, pool_dtype, in_dtype, T, out_tiles, pending, cand_dtype)
        if need > SMEM_BYTES:
            return (f"{self} needs {need} bytes of SMEM per CTA, more than the {SMEM_BYTES} an "
                    f"SM90/SM100 CTA can have; lower stages or block_v")
        return None

    def smem_bytes(self, K: int, pool_dtype, in_dtype, T: int = 1, out_tiles: int = 0,
                   pending: int = 0, cand_dtype=None) -> int:
        """What one CTA allocates, laid out as Pallas does (every scoped buffer rounded up to
        `SMEM_ALIGNMENT`, plus the reduction scratch): per stage the state tile, T tokens'
        q/k/v and `pending` candidates' k/v (in `cand_dtype`, default in_dtype); the o buffer;
        `out_tiles` [block_v, K] tiles staging state stores; two barrier arrays."""
        ps, xs = jax.numpy.dtype(pool_dtype).itemsize, jax.numpy.dtype(in_dtype).itemsize
        cs = jax.numpy.dtype(cand_dtype or in_dtype).itemsize
        BV, ST = self.block_v, self.stages
        buffers = [ST * BV * K * ps, ST * T * K * xs, ST * T * K * xs, ST * T * BV * xs,
                   ST * pending * K * cs, ST * pending * BV * cs, T * BV * xs,
                   out_tiles * BV * K * ps, 8 * ST, 8 * ST, REDUCTION_SCRATCH_BYTES]
        return aligned_bytes(buffers)


# ------------------------------------------------------------------------------------------------
# Version shims (inside kernels)


def compiler_params(*, approx_math: bool = False, auto_barriers: bool = True):
    """Warpgroup semantics. approx_math: exp, log and rsqrt as the SFU's approximations (about
    22 bits); auto_barriers=False: no warpgroup barrier around each SMEM store and before each
    TMA load (the kernel places its own: `plgpu.CompilerParams.unsafe_no_auto_barriers`)."""
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                approx_math=approx_math,
                                unsafe_no_auto_barriers=not auto_barriers)


def load(ref, layout, *, interpret: bool):
    """ref (SMEM or GMEM) -> array in `layout` (unoptimized path: small vectors, any width)."""
    if interpret:  # the interpreter has no layouts
        return ref[...]
    if JAX_VERSION >= (0, 11, 0):
        return plgpu.load(ref, layout=layout, optimized=False)
    return plgpu.load(ref, (), layout=layout, optimized=False)


def fresh_outputs(shape, dtype, *, interpret: bool):
    """The initial value of an output a kernel writes whole through `pl.run_state`: uninitialised
    on the GPU (`lax.empty`: no memset before each call), NaN under the interpreter (an element
    no program writes shows)."""
    if interpret:
        return jax.numpy.full(shape, jax.numpy.nan, dtype)
    return jax.lax.empty(shape, dtype)


def store_plain(x, ref, *, interpret: bool):
    """ref[...] := x (a WGMMA-layout array) in a plain (untiled, unswizzled) SMEM ref, so that
    the ref can be read back in another shape (rows as vectors, scalars): a Pallas store would
    have layout inference tile the ref for the WGMMA layout, which such reads cannot take."""
    if interpret:
        ref[...] = x
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(ctx, x, ref):
        del ctx
        x.store_untiled(ref, optimized=False)

    store(x, ref)


def layout_cast(x, layout, *, interpret: bool):
    return x if interpret else plgpu.layout_cast(x, layout)


def smem_tile(shape, dtype, *, interpret: bool):
    """An SMEM buffer [..., rows, cols] for a TMA'd tile: 128-byte swizzled so that the WGMMA
    register layout reads and writes it without bank conflicts (plain under the interpreter)."""
    if interpret:
        return plgpu.SMEM(shape, dtype)
    itemsize = jax.numpy.dtype(dtype).itemsize
    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def core_map(body, *, grid, name: str, interpret: bool, **params):
    """Run `body` on a 1-D grid of CTAs named "cta" (call inside `pl.run_state`); params: those
    of `compiler_params`."""
    mesh = plgpu.Mesh(grid=grid, grid_names=("cta",))
    kwargs = dict(compiler_params=compiler_params(**params), name=name)
    if interpret:
        kwargs["interpret"] = interpret_params()
    with warnings.catch_warnings():  # 0.11+: "core_map is deprecated, use pl.kernel"; it is the
        warnings.filterwarnings(    # form that works on 0.10.2 too (module docstring)
            "ignore", message=".*core_map is deprecated", category=DeprecationWarning)
        return pl.core_map(mesh, **kwargs)(body)


def kernel(body, *, out_type, grid, name: str, interpret: bool):
    """A kernel with fresh, uninitialised outputs: `body(*input_refs, *output_refs)` on a 1-D grid
    of CTAs named "cta" (`plgpu.kernel`: the same keywords on 0.10.2, 0.11.2 and 0.12)."""
    kwargs = dict(out_type=out_type, grid=grid, grid_names=("cta",), kernel_name=name,
                  compiler_params=compiler_params())
    if interpret:
        kwargs["interpret"] = interpret_params()
    return plgpu.kernel(body, **kwargs)


@contextlib.contextmanager
def target_arch(arch: tuple[int, int]):
    """Lower Mosaic GPU kernels for compute capability `arch` on a machine without that GPU.

    Mosaic GPU reads the target from the abstract device's `compute_capability`, which a
    `jax.sharding.AbstractDevice` does not carry: it then falls back to sm_90. This swaps its
    private arch inference (`core._infer_arch` on 0.10.x, `utils._infer_arch` from 0.11) for the
    duration, so CPU lowering tests can target a B200 (10, 0). Tests only.
    """
    from jax.experimental.mosaic.gpu import core as mgpu_core
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    owner = mgpu_utils if hasattr(mgpu_utils, "_infer_arch") else mgpu_core
    saved = owner._infer_arch
    owner._infer_arch = lambda: tuple(arch)
    try:
        yield
    finally:
        owner._infer_arch = saved
