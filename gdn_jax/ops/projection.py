"""`project(x, w)`: the bias-free projection `x @ w` every module makes, routed to the kernel that
reads the weight at bandwidth when few rows go through it (`gdn_jax.kernels.project`), else XLA.

    y = project(x, w, precision=lax.Precision.HIGHEST)   # x: [..., K], w: [K, N] -> [..., N]
    q, k, v = project_group(x, (w_q, w_k, w_v))          # the projections of one x

A decode or verify step is a chain of such projections over 1 to 128 rows (B x T tokens), where
XLA's GEMM reads the weight at about a fifth of the copy bandwidth (bench/bench_projection.py).
The kernel runs where all of these hold: a CUDA GPU of compute capability >= 8.0, bf16 or fp16
x and w, at most `AUTO_MAX_M` rows (where it was measured faster in a model step; a group of
weights, or a weight at most `LONE_MAX_N` wide -- all but the LM head --, up to
`kernels.PROJECTION_MAX_M`, the most the kernel takes), and a [K, N] weight its blocks tile
(`kernels.projection_misfit`). Elsewhere -- CPU, fp32 (the kernel has no precision to honour),
prefill-sized M -- it is `lax.dot_general` with the given precision, as before. The environment
variable GDN_JAX_PROJECTION (else GDN_JAX_BACKEND, which steers the GDN ops too) set to "xla"
keeps every projection in XLA; "triton" runs the kernel wherever it fits (up to PROJECTION_MAX_M
rows: benchmarks), "interpret" the same in the Pallas interpreter (tests).

`project_group` is the modules' call for the projections that share an input (GDN in_proj_qkvz and
in_proj_ba, attention q / k / v, MLP gate / up, the MoE router with the shared expert's). Each
weight goes where `project` would send it, and the weights the kernel takes go through it in one
launch (`kernels.project_group`). In a whole one-row decode step on the H200 that is 7% faster than
a launch per weight (48-layer dense 3.64 vs 3.92 ms, 40-layer MoE 3.96 vs 4.29 ms; B = 32, where
XLA ran the projections then, unchanged:
bench/results/bench_speculative-h200-*-groups_*-2026-12-02.json).
GDN_JAX_PROJECTION_GROUPS=off keeps one launch per weight; XLA's paths, and so CPU results, are
the same either way.

`project_group_partials` returns a group's one launch as `Partials` views of its unadded split-K
partial sums, which the GDN conv kernel and `gated_norm_project` read in place (added and rounded
on load): the GDN layer's in_proj output then costs no sum-and-slice launch for the conv's input
(one a layer; the output norm's z is summed in XLA's norm fusion unless the pair is fused).
`swiglu_project(x, w_gate, w_up, w_down)` (the dense MLP) and `gated_norm_project(o, z, norm_w,
w_out, eps)` (GDN's output norm and out_proj) can also fold the elementwise step between two
projections into the second's launch (`kernels.project_swiglu`, `kernels.project_gated_norm`).
By default up to AUTO_MAX_M rows the MLP's silu * up is formed in the first launch's epilogue
instead (`kernels.project_glu`; GDN_JAX_PROJECTION_GLU: `EPILOGUES`), and down_proj runs plain.
GDN_JAX_PROJECTION_PROLOGUE picks (`PROLOGUES`): "off" (the steps in XLA between launches, no
views), "views" (the default: the views, the steps in XLA), "row" (the views, and the fused
steps where their launch has one row) or "on" (the views and the fused steps). XLA's paths,
and so CPU results, are the same at every level. GDN_JAX_PROJECTION_GEMV
(`GEMVS`, default "off") runs one-row launches as a GEMV on the CUDA cores: "prologues" the fused
steps' launches, "on" every one (unmeasured on a GPU yet: `GEMV_VAR`).

GDN_JAX_PROJECTION=mosaic (or backend="mosaic") sends a group, or a lone weight, to the Hopper
kernel `kernels.project_group_mgpu` where it fits (bf16, 8..128 rows in multiples of 8, widths its
column blocks tile; `mosaic_config_for`): its fp32 result is cast to x's dtype. Measured slower
than the Triton kernel so far, the dispatch takes it for no rows by itself (`MOSAIC_ROWS`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gdn_jax import kernels
from gdn_jax.ops.dispatch import ENV_VAR as _BACKEND_VAR
from gdn_jax.ops.dispatch import Device, sm_count
from gdn_jax.ops.residual_norm import gated_norm, partials_value

ENV_VAR = "GDN_JAX_PROJECTION"
GROUPS_VAR = "GDN_JAX_PROJECTION_GROUPS"
PROLOGUE_VAR = "GDN_JAX_PROJECTION_PROLOGUE"
# The prologue switch's levels: "off" (the steps between the projections in XLA), "views" (the
# GDN conv and output norm read in_proj's partial sums in place: `Partials`), "row" (and, at one
# row, the MLP's silu * up and GDN's output norm in the next projection's kernel, which forms
# that row alone: at 32 rows every column block re-reads the rows' fp32 sources), "on" (the
# fused pairs at any row count: measured slower, below).
PROLOGUES = ("off", "views", "row", "on")
GLU_VAR = "GDN_JAX_PROJECTION_GLU"
# GDN_JAX_PROJECTION_GLU forms the dense MLP's silu(gate) * up in the epilogue of the gate / up
# launch (`kernels.project_glu`: every program streams the same column block of both weights,
# unsplit), then runs down_proj plain: "auto" (the default) where the launch has at most
# AUTO_MAX_M rows, "on" at any row count, "off" never. Measured on an H100 (48-layer dense step,
# kernel time, side by side: bench/results/profile_step-h100-qwen3_5_text-b1_b32-epilogues-
# 2026-12-05.json): the gate / up launch with the product against the two launches, B = 1
# decode 17.8 against 17.3 + 1.5 us a layer (step 3556.5 -> 3515.8 us), B = 32 decode 22.0
# against 21.2 + 2.1 (5052.5 -> 4985.5); but a B = 32 verify's 128 rows 30.4 against 23.5 +
# 2.1 (6583.5 -> 6814.4: 40 programs of 128 columns). In 80 programs of 64 columns
# (`epilogue_config`'s weights), on an H200, still 22.4 against 19.9 + 2.0 (5801.4 -> 5841.9:
# bench/results/profile_step-h200-qwen3_5_text-b1_b32-verify_glu128_shift-2026-12-05.json).
# The epilogue switches' values (GDN_JAX_PROJECTION_GLU; gdn_jax.ops.conv's
# GDN_JAX_CONV_EPILOGUE): `epilogue_asked`.
EPILOGUES = ("auto", "on", "off")
GEMV_VAR = "GDN_JAX_PROJECTION_GEMV"
# Which one-row projections run as a GEMV (`kernels.ProjectionConfig.gemv`: the products on the
# CUDA cores): "off" (the default: none), "prologues" (the fused launches of `swiglu_project` and
# `gated_norm_project`, which run only where GDN_JAX_PROJECTION_PROLOGUE fuses them) or "on" (every
# one-row launch). Unmeasured on a GPU (no runner was lent on 2026-12-05); its loop, which has no
# tt.dot, says its stages so that Triton pipelines its loads (without, none were: offline,
# bench/ptxas_stats.py --gemv counts the async copies). The tile form's prologues now form one
# row's x from that row alone: the 16-row tile's padding made "on" above slower (the ncu of
# 2026-12-03: the prologue kernels' SM throughput at 56% against 12%; offline, 158 registers and
# 96 KB of staged sources a program, now 62 and 40 KB). Compare `bench/profile_step.py --variant
# views --variant on:prologue=on --variant on_gemv:prologue=on;gemv=prologues --variant
# all:gemv=on`.
GEMVS = ("off", "prologues", "on")

# The most rows the kernel takes by default. XLA lowers one-row projections as reduce fusions
# (B = 1 decode, 48 layers: 6.14 ms of kernels against 3.84 through the kernel,
# bench/results/profile_step-h200-projection-2026-12-01.json); from 2 rows on it emits Triton GEMM
# fusions, which the kernel, tuned since, beats up to 32 rows but not at 128 (48-layer dense model,
# H200, kernel time per call, XLA -> kernel: B = 1 verify, 4 rows, 4118 -> 3881 us; B = 8 decode
# 3628 -> 3495; B = 8 verify, 32 rows, 4772 -> 4541; B = 32 decode 4748 -> 4502; B = 32 verify,
# 128 rows, 7741 -> 8167 with every projection in the kernel, 8054 with only the narrow ones:
# bench/results/profile_step-h200-qwen3_5_text-projection_rows-2026-12-02.json and
# ...-b32-projection_triton-2026-12-02.json). Re-measured with the 128-row config of `config_for`
# (column blocks of 128): B = 32 verify 7559 (XLA) vs 7694 us (kernel where it fills half the GPU
# unsplit), bench/results/profile_step-h200-qwen3_5_text-b32-wide_rows{,_base}-2026-12-02.json.
AUTO_MAX_M = 32
# Above it, up to PROJECTION_MAX_M rows, the kernel still takes a layer's group of projections of
# one input (`project_group`) and a lone weight at most LONE_MAX_N wide: every projection but the
# LM head, which XLA runs by cuBLAS in 260 us against the kernel's 292 (B = 32 verify). There XLA
# fuses the MLP gate / up and attention q / k / v dots with their consumers into Triton GEMM
# fusions that read the weights at 1.6 TB/s, runs in_proj_ba as a split-K GEMM, a sum and a slice
# (5 us for 256 KB), and out_proj / down_proj with 8 K slices whose sum reads 8 MB. B = 32 verify,
# 128 rows, kernel time per call: gate / up 26.0 -> 20.1 us a layer, q / k / v 23.8 -> 17.5, the
# 48-layer step 7623 -> 7147 us with those two groups, 7273 -> 7212 with in_proj's too, 6894 ->
# 6730 with the lone weights too (bench/results/profile_step-h200-qwen3_5_text-b32-verify_
# {wide_groups,all_groups,lone}_*-2026-12-02.json); the 40-layer MoE step 22338 -> 22395 ->
# 22247 with the groups (...-qwen3_5_moe_text-b32-verify_{wide,all}_groups*).
LONE_MAX_N = 8192
# The rows the Hopper kernel (`kernels.project_group_mgpu`) takes by default: none. Alone on the
# H200 (its zeros and fp32 -> bf16 cast counted) it trails the Triton kernel at 32 and 128 rows for
# every group of the model: MLP gate / up 17.1 vs 15.5 and 25.0 vs 18.8 us, in_proj_qkvz 19.0 vs
# 17.5 and 28.4 vs 17.6 (bench/results/bench_projection-h200-mosaic_groups-2026-12-03.json).
# Rebuilt without ptxas's wgmma serialization (688a155), on an H100 2026-12-07: gate / up at 128
# rows still 23.3 us, and the 48-layer B = 32 decode with it wherever it fits 5.596 ms against
# 4.742 (bench/results/bench_speculative-h100-qwen3_5_text-b32-projection_*-2026-12-07.json).
MOSAIC_ROWS = frozenset()
_BLOCK_N = 64
_WAVES = 2  # programs per SM the split-K aims for: one wave leaves the tail's SMs idle


def project(x: jax.Array, w: jax.Array, *, precision=None, backend: str | None = None,
            partials: bool = False):
    """x: [..., K], w: [K, N] -> [..., N] in x's dtype (x and w share a dtype).

    partials: return [S, ..., N] partial sums, to be added (in fp32) and rounded to x's dtype by
    the consumer (`gdn_jax.ops.residual_norm.add_rms_norm`, which adds them in its own launch):
    the kernel's S split-K slices in fp32, or S = 1 (the product itself) wherever it is unsplit.

    precision: XLA's, where XLA runs it (the kernel's bf16 / fp16 products are exact in fp32).
    backend:   None | "auto" (dispatch), "xla", "triton" (the kernel; an error where it cannot
               run), "interpret" (the kernel in the Pallas interpreter), "xla-gemm" (XLA, with a
               one-row x padded to two rows: XLA then emits a GEMM where it would emit a
               reduction; an experiment for benchmarks, GDN_JAX_PROJECTION=xla-gemm).
    """
    *lead, K = x.shape
    if w.ndim != 2 or w.shape[0] != K:
        raise ValueError(f"project: w [K, N] with K = {K} (x's last axis) expected, "
                         f"got w{list(w.shape)}")
    N = w.shape[1]
    M = math.prod(lead)
    wish = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR)
    whole = (lambda y: y[None]) if partials else (lambda y: y)  # noqa: E731
    if wish == "xla-gemm":
        if M != 1:
            return whole(lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                                         precision=precision))
        x2 = jnp.pad(x.reshape(1, K), ((0, 1), (0, 0)))
        y = lax.dot_general(x2, w, (((1,), (0,)), ((), ())), precision=precision)
        return whole(y[:1].reshape(*lead, N))
    mosaic = _select_mosaic(M, K, (N,), x.dtype, w.dtype, backend)
    if mosaic is not None:
        y, = kernels.project_group_mgpu(x.reshape(M, K), (w,), config=mosaic)
        return y[None].reshape(1, *lead, N) if partials else y.astype(x.dtype).reshape(*lead, N)
    choice = _select(M, K, N, x.dtype, w.dtype, backend)
    if choice is None:
        return whole(lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                                     precision=precision))
    config, interpret = choice
    y = kernels.project(x.reshape(M, K), w, config=config, interpret=interpret,
                        partials=partials)
    return y.reshape(-1, *lead, N) if partials else y.reshape(*lead, N)


def project_group(x: jax.Array, ws, *, precision=None, backend: str | None = None) -> tuple:
    """x: [..., K], ws: weights [K, N_i] -> (x @ w_i [..., N_i] for each), as `project` computes
    each (same arguments). The weights the few-row kernel takes run in one launch of it, the
    others (a width it cannot tile, say) as `project` runs them; with
    GDN_JAX_PROJECTION_GROUPS=off every weight is a `project` of its own."""
    ws = tuple(ws)
    if not ws:
        raise ValueError("project_group: ws must hold at least one [K, N] weight")
    *lead, K = x.shape
    for i, w in enumerate(ws):
        if w.ndim != 2 or w.shape[0] != K:
            raise ValueError(f"project_group: ws[{i}] [K, N] with K = {K} (x's last axis) "
                             f"expected, got ws[{i}]{list(w.shape)}")
    out = [None] * len(ws)
    M = math.prod(lead)
    wish = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR)
    mosaic = len(ws) > 1 and _grouping() and _select_mosaic(
        M, K, tuple(w.shape[1] for w in ws), x.dtype, ws[0].dtype, backend)
    if mosaic and all(w.dtype == x.dtype for w in ws):
        ys = kernels.project_group_mgpu(x.reshape(M, K), ws, config=mosaic)
        return tuple(y.astype(x.dtype).reshape(*lead, y.shape[1]) for y in ys)
    grouped = [i for i, w in enumerate(ws) if _grouping() and wish != "xla-gemm"
               and _select(M, K, w.shape[1], x.dtype, w.dtype, backend, strict=False,
                           rows_rule=False)]
    choice = len(grouped) > 1 and _select(M, K, tuple(ws[i].shape[1] for i in grouped),
                                          x.dtype, x.dtype, backend, strict=False)
    if choice:
        config, interpret = choice
        ys = kernels.project_group(x.reshape(M, K), tuple(ws[i] for i in grouped),
                                   config=config, interpret=interpret)
        for i, y in zip(grouped, ys):
            out[i] = y.reshape(*lead, y.shape[1])
    for i, w in enumerate(ws):
        if out[i] is None:
            out[i] = project(x, w, precision=precision, backend=backend)
    return tuple(out)


class Partials(NamedTuple):
    """Columns start..start + width of a projection's output held as its split-K partial sums:
    parts [S, M, N] (`kernels.project_group(..., partials=True)`: fp32, or S = 1 in the
    projection's dtype where unsplit),
    unadded, for a kernel that adds them as it loads them (`ops.conv.conv_step`,
    `gated_norm_project`: no launch for the sum and the slice). lead: the axes M stands for;
    dtype: the output's. `value()` is the output itself, as `project_group` returns it (XLA)."""

    parts: jax.Array
    start: int
    width: int
    lead: tuple
    dtype: jnp.dtype

    def value(self) -> jax.Array:
        """[*lead, width] in dtype: the partials added in fp32 and rounded."""
        y = partials_value(self.parts[:, :, self.start:self.start + self.width], self.dtype)
        return y.reshape(*self.lead, self.width)

    def columns(self, start: int, width: int) -> "Partials":
        """The view of columns start..start + width of this one."""
        if not 0 <= start <= start + width <= self.width:
            raise ValueError(f"Partials.columns: {start}..{start + width} is outside the view's "
                             f"{self.width} columns")
        return self._replace(start=self.start + start, width=width)


def project_group_partials(x, ws, *, backend: str | None = None) -> tuple | None:
    """`project_group(x, ws)` as `Partials` views of one launch's unadded output (one per weight),
    where the few-row kernel takes every weight in one launch and GDN_JAX_PROJECTION_PROLOGUE is
    not off; else None (call `project_group`). x: [..., K], ws: weights [K, N_i] of x's dtype."""
    ws = tuple(ws)
    *lead, K = x.shape
    M = math.prod(lead)
    if (not _grouping() or not _fusing(M, K, None, None, (x, *ws), backend, level="views")
            or any(w.ndim != 2 or w.shape[0] != K or w.dtype != x.dtype for w in ws)):
        return None
    choice = _select(M, K, tuple(w.shape[1] for w in ws), x.dtype, x.dtype, backend,
                     strict=False)
    if not choice:
        return None
    parts = kernels.project_group(x.reshape(M, K), ws, config=choice[0], interpret=choice[1],
                                  partials=True)
    starts = [0]
    for w in ws:
        starts.append(starts[-1] + w.shape[1])
    return tuple(Partials(parts, lo, w.shape[1], tuple(lead), jnp.dtype(x.dtype))
                 for lo, w in zip(starts, ws))


def swiglu_project(x, w_gate, w_up, w_down, *, precision=None, partials: bool = False,
                   backend: str | None = None):
    """The SwiGLU MLP: (silu(x @ w_gate) * (x @ w_up)) @ w_down, each product as `project`
    computes it (same arguments; partials: the last product's). x: [..., K], w_gate / w_up:
    [K, I], w_down: [I, N] -> [..., N] in x's dtype. Where GDN_JAX_PROJECTION_GLU asks (by
    default up to AUTO_MAX_M rows) and the kernel takes the pair unsplit: two launches,
    `kernels.project_glu` then down_proj plain (that form first, whatever the prologue level).
    Else where the kernel takes the gate / up group and the down projection (and
    GDN_JAX_PROJECTION_PROLOGUE fuses the pair: "on", or "row" at one row): two launches, the
    group's partial sums handed to `kernels.project_swiglu`; elsewhere the three steps apart."""
    *lead, K = x.shape
    M = math.prod(lead)
    I = w_gate.shape[-1]
    _prologue_level()  # a bad level is an error whichever form runs
    glu = _glu(M, K, I, (x, w_gate, w_up, w_down), backend)
    if glu:  # silu * up in the gate / up launch's epilogue, then down_proj plain
        h = kernels.project_glu(x.reshape(M, K), w_gate, w_up, config=glu[0],
                                interpret=glu[1])
        return project(h.reshape(*lead, I), w_down, precision=precision, partials=partials,
                       backend=backend)
    fused = _fusing(M, K, (I, I), w_down, (x, w_gate, w_up, w_down), backend)
    if fused:
        (group, interpret), down = fused
        gate_up = kernels.project_group(x.reshape(M, K), (w_gate, w_up), config=group,
                                        interpret=interpret, partials=True)
        y = kernels.project_swiglu(gate_up, w_down, config=down, interpret=interpret,
                                   partials=partials)
        return y.reshape(-1, *lead, y.shape[-1]) if partials else y.reshape(*lead, y.shape[-1])
    gate, up = project_group(x, (w_gate, w_up), precision=precision, backend=backend)
    return project(jax.nn.silu(gate) * up, w_down, precision=precision, partials=partials,
                   backend=backend)


def gated_norm_project(o, z, norm_weight, w, eps: float, *, precision=None,
                       partials: bool = False, backend: str | None = None):
    """`gated_rms_norm(o, z, norm_weight, eps)` per head, then `project` by w (same arguments).
    o, z: [..., H, V] in w's dtype (z may be a `Partials` view of H * V columns: the kernel then
    reads the producer's partial sums); norm_weight: [V]; w: [H * V, N] -> [..., N]. Where the
    kernel takes the projection with K-steps of one head (and GDN_JAX_PROJECTION_PROLOGUE fuses
    the pair: "on", or "row" at one row): one launch of `kernels.project_gated_norm`; elsewhere
    the norm (`residual_norm.gated_norm`: z's partial sums added there), then `project`."""
    *lead, H, V = o.shape
    M, K = math.prod(lead), H * V
    view = isinstance(z, Partials)
    z_shape = (*z.lead, z.width) if view else z.shape
    if (z_shape not in (o.shape, (*lead, K)) or norm_weight.shape != (V,)
            or (view and z.parts.shape[1] != M)):
        raise ValueError(f"gated_norm_project: z [..., H, V] = {list(o.shape)} (or a Partials "
                         f"view of {K} columns) and norm_weight [V] = [{V}] expected, got z"
                         f"{list(z_shape)}, norm_weight{list(norm_weight.shape)}")
    choice = _fusing(M, K, None, w, (o, z, w), backend) and _select(
        M, K, w.shape[1], o.dtype, w.dtype, backend, strict=False)
    z_bytes = (z.parts.shape[0] * jnp.dtype(z.parts.dtype).itemsize if view
               else jnp.dtype(z.dtype).itemsize)
    config = choice and _one_head_steps(choice[0], M, K, w.shape[1], V, o.dtype, z_bytes)
    if config:
        z_arg, z_col = (z.parts, z.start) if view else (z.reshape(M, K), 0)
        y = kernels.project_gated_norm(o.reshape(M, K), z_arg, norm_weight, w, eps=eps,
                                       z_col=z_col, config=config, interpret=choice[1],
                                       partials=partials)
        return y.reshape(-1, *lead, y.shape[-1]) if partials else y.reshape(*lead, y.shape[-1])
    x = gated_norm(o, z.parts if view else z.reshape(o.shape), norm_weight, eps,
                   z_col=z.start if view else None, backend=backend)
    return project(x.reshape(*lead, K), w, precision=precision, partials=partials,
                   backend=backend)


def epilogue_config(M: int, K: int, widths, dtype, backend: str | None = None, *,
                    weights: int = 1):
    """(config, interpret) for a group launch of M rows of [K, N_i] weights (widths: the N_i) whose
    programs finish their column blocks themselves (an epilogue: `kernels.project_conv`,
    `kernels.project_glu`), or None where the few-row kernel does not take the group in one
    launch. The config is `config_for`'s unsplit (an epilogue needs each block's whole sum), its
    column blocks cut by the slices it would have taken, down to 32 columns (64 where the product
    is taken weight first, `swap_ab`, whose 64-row wgmma tile the columns fill: offline, sm_90,
    32 columns there fell back to mma.sync with half the pipelined loads): as many programs as
    the split launch where that floor does not bind, fewer and longer where it does. weights:
    how many of the group's weights each program streams (`project_glu`: 2, a column block of
    each), which cuts the blocks by as much again: a 128-row gate / up in 64 columns, 80
    programs like the group's launch, not 40 of 128 (measured 30.4 us against 23.5, H100)."""
    widths = tuple(widths)
    asked = backend if backend not in (None, "auto") else (
        os.environ.get(ENV_VAR) or os.environ.get(_BACKEND_VAR))
    if len(widths) < 2 or not _grouping() or asked in ("mosaic", "xla-gemm"):
        return None
    choice = _select(M, K, widths, dtype, dtype, backend, strict=False)
    if not choice:
        return None
    config, interpret = choice
    block_n = max(64 if config.swap_ab else 32, config.block_n // (config.splits * weights))
    config = dataclasses.replace(config, splits=1, block_n=min(block_n, config.block_n))
    return config, interpret


def epilogue_asked(var: str, M: int) -> bool:
    """Whether the epilogue switch `var` (`EPILOGUES`, read at trace time) asks for it in a launch
    of M rows: "auto" (unset) up to AUTO_MAX_M rows, "on" always, "off" never; another value is
    a ValueError naming var."""
    wish = os.environ.get(var) or "auto"
    if wish not in EPILOGUES:
        raise ValueError(f"{var}: expected one of {list(EPILOGUES)}, got {wish!r}")
    return wish == "on" or (wish == "auto" and M <= AUTO_MAX_M)


def _glu(M, K, I, arrays, backend):
    """(config, interpret) of `kernels.project_glu` for the MLP's gate / up of M rows where
    GDN_JAX_PROJECTION_GLU asks for it (`epilogue_asked`), one dtype among the arrays, and the
    kernel takes the pair unsplit (`epilogue_config` of the gate / up group); else None."""
    asked = epilogue_asked(GLU_VAR, M)
    dtype = {jnp.dtype(a.dtype) for a in arrays}
    if not asked or len(dtype) != 1:
        return None
    choice = epilogue_config(M, K, (I, I), dtype.pop(), backend, weights=2)
    if not choice:
        return None
    config = _fewer_stages(choice[0], M, weights=2)  # a tile of each weight a stage
    if kernels.projection_misfit(M, K, I, arrays[0].dtype, config, weights=2):
        return None
    return config, choice[1]


def _prologue_level() -> str:
    """GDN_JAX_PROJECTION_PROLOGUE: "off", "views" (the default), "row" or "on" (`PROLOGUES`)."""
    wish = os.environ.get(PROLOGUE_VAR) or "views"
    if wish not in PROLOGUES:
        raise ValueError(f"{PROLOGUE_VAR}: expected one of {list(PROLOGUES)}, got {wish!r}")
    return wish


def _fusing(M, K, group_widths, w, arrays, backend, level="on"):
    """Whether a fused pair may run: the prologue switch at `level` or above, no Mosaic or
    xla-gemm request, one dtype among the arrays (anything with a .dtype). For swiglu
    (group_widths given): ((group config, interpret), down config) where the kernel takes both
    launches, else None; otherwise True (the caller selects its launch)."""
    wish = _prologue_level()
    if wish == "row":
        wish = "on" if M == 1 else "views"
    dtype = {jnp.dtype(a.dtype) for a in arrays}
    asked = backend if backend not in (None, "auto") else (
        os.environ.get(ENV_VAR) or os.environ.get(_BACKEND_VAR))
    if (PROLOGUES.index(wish) < PROLOGUES.index(level) or len(dtype) != 1
            or asked in ("mosaic", "xla-gemm")):
        return None
    if group_widths is None:
        return True
    x_dtype = dtype.pop()
    group = _grouping() and _select(M, K, group_widths, x_dtype, x_dtype, backend, strict=False)
    down = _select(M, w.shape[0], w.shape[1], x_dtype, x_dtype, backend, strict=False)
    if not group or not down or group[1] != down[1]:
        return None
    splits = group[0].splits  # gate / up's partials: fp32 slices, or unsplit the product itself
    parts_bytes = 4 * splits if splits > 1 else jnp.dtype(x_dtype).itemsize
    config = _fit_stages(down[0], M, w.shape[0], w.shape[1], x_dtype,
                         kernels.projection_source_bytes("swiglu", parts_bytes))
    return (group, config) if config else None


def _fewer_stages(config, M, x_bytes=None, weights: int = 1):
    """config with its stages cut (to 2 at least) until its tiles fit the shared memory (x's
    sources at x_bytes a column of a row, `weights` weights' tiles a stage:
    `kernels.ProjectionConfig.smem_bytes`)."""
    while (config.num_stages > 2 and config.smem_bytes(M, x_bytes=x_bytes, weights=weights)
           > kernels.projection_smem_limit()):
        config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    return config


def _gemv(M: int, prologue: bool) -> bool:
    """Whether a launch of M rows (with a prologue, or not) runs as a GEMV (`GEMV_VAR`)."""
    wish = os.environ.get(GEMV_VAR) or "off"
    if wish not in GEMVS:
        raise ValueError(f"{GEMV_VAR}: expected one of {list(GEMVS)}, got {wish!r}")
    return M == 1 and (wish == "on" or (wish == "prologues" and prologue))


def _fit_stages(config, M, K, N, dtype, x_bytes):
    """A prologue's config: `_fewer_stages`' (one row as a GEMV where `GEMV_VAR` asks), or None
    where the kernel then cannot take it."""
    config = dataclasses.replace(config, gemv=_gemv(M, prologue=True))
    config = _fewer_stages(config, M, x_bytes)
    return None if kernels.projection_misfit(M, K, N, dtype, config, x_bytes) else config


def _one_head_steps(config, M, K, N, V, dtype, z_bytes):
    """config with K-steps of one head (block_k = V), its stages cut to the shared memory; None
    where the kernel then cannot take it (V not a block: a power of two >= 16). z_bytes: z's
    column of a row (`kernels.projection_source_bytes`' parts_bytes)."""
    if V < 16 or V & (V - 1):
        return None
    return _fit_stages(dataclasses.replace(config, block_k=V), M, K, N, dtype,
                       kernels.projection_source_bytes("gated_norm", z_bytes))


def _grouping() -> bool:
    wish = os.environ.get(GROUPS_VAR) or "on"
    if wish not in ("on", "off"):
        raise ValueError(f"{GROUPS_VAR}: expected on or off, got {wish!r}")
    return wish == "on"


def config_for(M: int, K: int, N, *, sm_count: int = 132) -> kernels.ProjectionConfig:
    """The launch config for M rows of a [K, N] weight (N an int; or the widths of a group's
    weights, one launch) on a GPU of sm_count SMs, fit to H200 sweeps (the kernel alone).

    Up to 64 rows (bench/results/bench_projection-h200-sweep-2026-12-01.json): column blocks of
    64, and K cut into as many slices as give about two programs per SM at 16 rows, one from 64
    rows on (their fp32 partial sums then cost more than the extra programs save), and no more
    than keep the partials small beside the weight. At one row this picks within 6% of the
    sweep's best for the out_proj, in_proj_qkvz, gate_proj and down_proj shapes. From 17 to 32
    rows the product is taken weight first (`swap_ab`; the split rule was not re-fit for it): at
    the sweep's best configs 5-9% faster for gate_proj, out_proj and in_proj_qkvz, at this
    rule's 2-9% (bench/results/bench_projection-h200-rows32_swap-2026-12-02.json), and 1.7% off
    the 48-layer B = 32 decode step's kernel time. Unsplit 128-column blocks for the 32-row
    gate / up and in_proj groups (the 32-row sweep's best alone: 12.1 against 13.4 us,
    bench/results/bench_projection-h200-rows32_wave-2026-12-02.json) gained 0.4-0.5 us a group in
    that decode and the fusions around them lost it back (4412 against 4413 us, profile_step-
    h200-qwen3_5_text-b32-{rules,wy}-2026-12-02.json): not taken.

    From 65 rows (a verify of 4 tokens at B = 32 is 128) the x tile is as large as the weight's,
    and re-read by every column block: column blocks of 128 halve those reads, with [64, 128]
    ([block_k, block_n]) weight tiles in 4 stages and 8 warps, and K cut into slices of >= 1024
    rows while the programs stay within one wave: the sweep's best for gate_proj (10.9 us, 2
    slices), out_proj (10.2, 4) and in_proj_qkvz (17.6, 1), the kernel alone without the partial
    sums, against XLA's 13.2, 11.3 and 23.7 us (bench/results/bench_projection-h200-rows128_wide-
    2026-12-02.json). The dispatch sends all but the LM head there (`LONE_MAX_N`): in the
    48-layer model's B = 32 verify XLA runs it by cuBLAS in 260 against the kernel's 292 us.
    Re-swept on an H100 (2026-12-06): 2 or 4 slices at 3 stages (2 CTAs per SM), 64-column
    blocks and the Mosaic kernel all ran slower than this rule's config for each 128-row group
    (gate / up 22.0 us against 24.6-31.8, out_proj 12.7 against 14.0-30.2: bench/results/
    bench_projection-h100-groups128_configs-2026-12-06.json).

    One row runs as a GEMV where GDN_JAX_PROJECTION_GEMV is "on" (`GEMVS`; off by default)."""
    widths = (N,) if isinstance(N, int) else tuple(N)
    bm = kernels.projection_block_m(M)
    wide = bm >= 128
    tile = 128 if wide else _BLOCK_N
    # a group's weights take blocks of <= block_n each (kernels.project_group)
    block_n = max(pow2_tile(n, tile) for n in widths)
    block_k = pow2_tile(K, 64 if wide else 128)
    steps = max(1, K // block_k)
    column_blocks = sum(n // pow2_tile(n, tile) for n in widths)
    if wide:  # slices of >= 1024 rows, programs within one wave
        most = min(K // 1024, sm_count // max(1, column_blocks))
    else:
        max_splits = max(1, K // (16 * bm))  # partials (2 x S x bm x N x 4 bytes) <= weight / 4
        want = -(-(_WAVES if bm <= 32 else 1) * sm_count // max(1, column_blocks))
        most = min(want, max_splits)
    splits = max(d for d in range(1, steps + 1) if steps % d == 0 and d <= max(1, most))
    config = kernels.ProjectionConfig(
        block_n=block_n, block_k=block_k, splits=splits, num_warps=8 if wide else 4,
        num_stages=4 if wide else 3 if bm <= 32 else 5, swap_ab=16 < bm <= 32,
        gemv=_gemv(M, prologue=False))
    return _fewer_stages(config, M)


def pow2_tile(n: int, most: int) -> int:
    """The largest power of two <= most that divides n, at least 16 (the kernel's misfit check
    says so where none does): a block size for an axis of n."""
    return kernels.pow2_block(n, most) or 16


def _select(M, K, N, x_dtype, w_dtype, backend, *, strict: bool = True, rows_rule: bool = True):
    """(config, interpret) for the kernel, or None for XLA (N: the width, or a group's widths).
    An explicit backend is strict (an error where it cannot run; strict=False: None); the
    environment variable only steers: "xla" keeps every projection in XLA, "interpret" runs the
    kernel in the interpreter where it fits."""
    if backend not in (None, "auto", "xla", "triton", "interpret", "mosaic"):
        raise ValueError(f"project: backend expected one of ['auto', 'xla', 'triton', "
                         f"'interpret', 'mosaic', 'xla-gemm'], got {backend!r}")
    wish = backend if backend not in (None, "auto") else (
        os.environ.get(ENV_VAR) or os.environ.get(_BACKEND_VAR))
    if wish == "xla":
        return None
    dev = Device.of()
    config = config_for(M, K, N, sm_count=sm_count())
    why = (f"x is {x_dtype} and w {w_dtype}" if jnp.dtype(x_dtype) != jnp.dtype(w_dtype)
           else kernels.projection_misfit(M, K, N, x_dtype, config))
    if wish != "interpret" and not why and not dev.runs_triton:
        why = f"{dev} is not a CUDA GPU of compute capability >= 8.0"
    if why and strict and backend in ("triton", "interpret"):
        raise ValueError(f"project: backend {backend!r} cannot take x [{M}, {K}] @ "
                         f"w [{K}, {N}]: {why}")
    if not why and rows_rule and wish not in ("triton", "interpret") and not _kernel_rows(M, N):
        why = (f"M={M} rows of N={N}: XLA's GEMM is faster above {AUTO_MAX_M} rows for a lone "
               f"weight wider than {LONE_MAX_N}")
    return None if why else (config, wish == "interpret")


def _select_mosaic(M, K, widths, x_dtype, w_dtype, backend):
    """The `kernels.MosaicProjectionConfig` for the Hopper kernel (`project_group_mgpu`), or None
    where it does not run: GDN_JAX_PROJECTION=mosaic (or backend="mosaic") asks for it where it
    fits; by default it runs on Hopper for the rows `MOSAIC_ROWS` holds."""
    if backend not in (None, "auto", "mosaic"):
        return None
    wish = backend if backend not in (None, "auto") else (
        os.environ.get(ENV_VAR) or os.environ.get(_BACKEND_VAR))
    if wish not in (None, "auto", "mosaic") or jnp.dtype(x_dtype) != jnp.dtype(w_dtype):
        return None
    if wish != "mosaic" and M not in MOSAIC_ROWS:
        return None
    dev = Device.of()
    if dev.platform != "gpu" or dev.capability is None or dev.capability[0] != 9:
        return None
    config = mosaic_config_for(M, K, widths, sm_count=sm_count())
    if config is None or kernels.projection_mgpu_misfit(M, K, widths, x_dtype, config):
        return None
    return config


def mosaic_config_for(M: int, K: int, widths, *, sm_count: int = 132):
    """The Hopper kernel's config for M rows of [K, N_i] weights: column blocks of 128 where they
    tile every weight, else 64; as many stages as SMEM takes (one CTA per SM)."""
    widths = tuple(widths)
    for block_n in (128, 64):
        if all(n % block_n == 0 for n in widths):
            break
    else:
        return None
    for stages in (6, 5, 4, 3, 2):
        config = kernels.MosaicProjectionConfig(block_n=block_n, stages=stages, ctas=sm_count)
        if not kernels.projection_mgpu_misfit(M, K, widths, jnp.bfloat16, config):
            return config
    return None


def _kernel_rows(M: int, N) -> bool:
    """Whether the dispatch sends M rows of these widths (an int, or a group's) to the kernel."""
    if M <= AUTO_MAX_M:
        return True
    return M <= kernels.PROJECTION_MAX_M and (not isinstance(N, int) or N <= LONE_MAX_N)
