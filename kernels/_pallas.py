"""The one place that binds the kernels to the Pallas-Triton backend.

Every kernel goes through `pallas_call` below, which always passes `pltriton.CompilerParams`:
without them jax 0.10.x lowers `pl.pallas_call` with Mosaic GPU and 0.11.2+ with Triton. JAX
deprecated the Triton lowering in 0.11 (its exits are raw Triton through jax-triton, or Mosaic
GPU); swapping the backend should only touch this file.

`pipelined_fori_loop` is `lax.fori_loop` whose Triton loop says its software-pipelining stages
(`tt.num_stages`): Triton pipelines the loads of a loop that has no `tt.dot` only where the loop
says so, and Pallas's loops say nothing. The loop's body carries a marker (`_STAGES`, the identity
on the loop index) that wrappers of Pallas-Triton's `scan` and `while` lowering rules (a
fori_loop lowers through one or the other) turn into the attribute; where jax's internals differ
(another version), the loop lowers as a plain one.

On an SM90+ GPU `pallas_call` also puts a `griddepcontrol.launch_dependents` first in each
kernel (`TRIGGER_VAR`, programmatic dependent launch: the next kernel launches while this one
runs; the comment above `TRIGGER_VAR` says why that is safe and what it gained).

The deprecation warning is raised when XLA lowers the kernel, which happens inside whatever
`jax.jit` the caller wraps around us, long after our functions have returned. So the filter is
installed for the whole process when this module is imported (`warnings.filterwarnings` puts it
first, so it also wins over `-W error`). It matches that one message and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.extend.core import Primitive
from jax.interpreters import mlir

from ._common import is_pow2

TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Launch parameters of one kernel call (hashable: a static argument of `jax.jit`).

    block_v:    rows of the [V, K] state that one program owns (its tile is [block_v, K] fp32);
                a power of two dividing V. The grid is (B, HV, V // block_v).
    num_warps:  warps per program (power of two, 1..32).
    num_stages: Triton software-pipelining depth; only loops (the pending-candidate fold) use it.
    """

    block_v: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if not is_pow2(self.block_v):
            raise ValueError(f"TuningConfig: block_v must be a power of two, got {self.block_v=}")
        if not is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"TuningConfig: num_warps must be a power of two in 1..32, "
                             f"got {self.num_warps=}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TuningConfig: num_stages must be an int >= 1, got {self.num_stages=}")

    def check_head_dim(self, op: str, V: int) -> None:
        """block_v must tile V exactly (no masked tail: every load is a power-of-two block)."""
        if self.block_v > V or V % self.block_v:
            raise ValueError(f"{op}: block_v must divide V, got {self.block_v=}, {V=}")


def pallas_call(kernel, *, name: str, config, interpret: bool, **kwargs):
    """`pl.pallas_call` with the Triton compiler params of `config` (never Mosaic GPU): its
    num_warps and num_stages (a TuningConfig, or any kernel's config that has them). On an
    SM90+ GPU (`TRIGGER_VAR`), each program first lets the next kernel launch (`_TRIGGER`)."""
    trigger = os.environ.get(TRIGGER_VAR) or "auto"
    if trigger not in TRIGGERS:
        raise ValueError(f"{TRIGGER_VAR}: expected one of {list(TRIGGERS)}, got {trigger!r}")
    if not interpret and (trigger == "early" or (trigger == "auto" and _launches_dependents())):
        kernel = _triggering(kernel)
    return pl.pallas_call(
        kernel,
        name=name,
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        **kwargs,
    )


# Programmatic dependent launch: on Hopper and later XLA launches every Pallas-Triton kernel with
# the programmatic-serialisation attribute and puts `griddepcontrol.wait` first in it (jax 0.11's
# XLA: xla_gpu_enable_pdl, on by default; kept as programmatic edges in its CUDA graphs), so the
# kernel after it may launch before it ends; but with no trigger that launch waits until every
# program of this one has exited. "early": each program runs `griddepcontrol.launch_dependents`
# first (after XLA's wait), so the next kernel's launch overlaps this one's run; its programs
# still wait at their entry for the whole of this grid and its stores, so the trigger orders
# nothing, and it is a no-op where the launch is not programmatic (XLA without PDL). "auto" (the
# default): "early" where the first device is a GPU of compute capability 9.0 or more (ptxas
# takes `griddepcontrol` from sm_90 only; "early" asserts the target does, as the CPU lowering
# tests do), else "off": no trigger. The kernel after ours may then run beside it up to its wait,
# so no load of it may come before that wait: XLA keeps its own successors' loads off the
# invariant (`ld.global.nc`) path for that reason; Triton emits plain `ld.global` and `cp.async`
# here, and offline (sm_90, a stand-in wait first in the Triton IR) the decode, conv, attention
# and projection kernels' PTX have every global load after it. Measured on an H100, 48-layer
# dense step, chained calls, two runs each, interleaved: B = 1 decode 3.455 / 3.452 -> 3.273 /
# 3.264 ms (-5.4%), verify 3.635 -> 3.578, round 4.947 -> 4.885; B = 32 decode 4.726 -> 4.723
# (bench/results/bench_speculative-h100-qwen3_5_text-b1*-pdl_trigger_*-2026-12-06.json).
TRIGGER_VAR = "GDN_JAX_PDL_TRIGGER"
TRIGGERS = ("auto", "early", "off")
_PDL_CAPABILITY = 9  # griddepcontrol's: sm_90 and later
_TRIGGER = Primitive("gdn_jax_launch_dependents")
_TRIGGER.multiple_results = True
_TRIGGER.def_impl(lambda: [])
_TRIGGER.def_abstract_eval(lambda: [])


def capability(device=None) -> tuple[int, int] | None:
    """(major, minor) of `device` (default: the first device) where it is a GPU that says its
    compute capability ("9.0" -> (9, 0)); None elsewhere (CPU, or a GPU that does not say)."""
    device = device or jax.devices()[0]
    cap = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not isinstance(cap, str) or not cap[:1].isdigit():
        return None
    major, _, minor = cap.partition(".")
    return int(major), int(minor or 0)


def _launches_dependents() -> bool:
    """Whether the first device is a CUDA GPU whose kernels may trigger their dependents."""
    return (capability() or (0,))[0] >= _PDL_CAPABILITY


def _triggering(kernel):
    """The kernel with `_TRIGGER` bound first (its rules: `_install_trigger`)."""
    if not TRIGGERS_LAUNCH:
        return kernel

    @functools.wraps(kernel)
    def body(*refs, **kw):
        _TRIGGER.bind()
        return kernel(*refs, **kw)
    return body


# The marker: the identity on a fori_loop's index, naming the stages its Triton loop takes.
_STAGES = Primitive("gdn_jax_loop_stages")
_STAGES.def_impl(lambda index, *, stages: index)
_STAGES.def_abstract_eval(lambda index, *, stages: index)
mlir.register_lowering(_STAGES, lambda ctx, index, *, stages: [index])  # the interpreter's


def cta_barrier(interpret: bool) -> None:
    """A barrier of the program's threads (`plgpu.debug_barrier`, Triton's `gpu.barrier`): the
    program's global stores before it are seen by its loads after it. Nothing in the
    interpreter, which runs a program's ops in order (and has no rule for the barrier)."""
    if not interpret:
        pltriton.debug_barrier()


def pipelined_fori_loop(lower: int, upper: int, body, init, *, stages: int):
    """`lax.fori_loop(lower, upper, body, init)` whose Triton loop carries `tt.num_stages =
    stages` (module docstring): its loads are software-pipelined `stages` deep even where no
    `tt.dot` uses them. The marker rides on the loop index: a body that never reads its index
    loses it (a plain loop). `PIPELINES_LOOPS` says whether this jax's lowering takes it."""
    return lax.fori_loop(lower, upper,
                         lambda i, carry: body(_STAGES.bind(i, stages=stages), carry), init)


def _marked_stages(jaxpr) -> int | None:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's, or the Jaxpr
    return next((eqn.params["stages"] for eqn in jaxpr.eqns if eqn.primitive is _STAGES), None)


def _install_loop_stages() -> bool:
    """Wrap Pallas-Triton's scan and while rules (`lax.fori_loop` lowers to either, as scf.for
    where it can) so that a marked loop's scf.for carries tt.num_stages; False where jax's
    internals are not as read (jax 0.10.2 - 0.12)."""
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
        rules, ir = triton_lowering.triton_lowering_rules, triton_lowering.ir
        plain = {lax.scan_p: (rules[lax.scan_p], "jaxpr"),
                 lax.while_p: (rules[lax.while_p], "body_jaxpr")}
    except (ImportError, AttributeError, KeyError):
        return False

    def wrapped(rule, body_param):
        def marked_rule(ctx, *args, **params):
            stages = _marked_stages(params[body_param])
            if not stages:
                return rule(ctx, *args, **params)
            # the scf.for this rule appends (its results may be none, or follow the bounds')
            block = ir.InsertionPoint.current.block
            known = {op.operation for op in block.operations}
            out = rule(ctx, *args, **params)
            for op in block.operations:
                if op.operation not in known and op.operation.name == "scf.for":
                    op.operation.attributes["tt.num_stages"] = ir.IntegerAttr.get(
                        ir.IntegerType.get_signless(32), stages)
            return out
        return marked_rule

    for primitive, (rule, body_param) in plain.items():
        rules[primitive] = wrapped(rule, body_param)
    rules[_STAGES] = lambda ctx, index, *, stages: index
    return True


PIPELINES_LOOPS = _install_loop_stages()


def trigger_rule(asm: str):
    """A Triton lowering rule for `_TRIGGER` that emits the PTX `asm` inline, where Triton may
    not drop it (not pure; its one scalar result is unused). `_install_trigger` installs it for
    `griddepcontrol.launch_dependents;`; bench/ptxas_stats.py --pdl puts a wait before that."""
    from jax._src.lib.mlir.dialects import arith as arith_dialect
    from jax._src.lib.triton import dialect as tt
    from jax._src.pallas.triton import lowering as triton_lowering

    def rule(ctx):
        i32 = triton_lowering.ir.IntegerType.get_signless(32)
        tt.elementwise_inline_asm([i32], asm + "\n\tmov.b32 $0, $1;", constraints="=r,r",
                                  pure=False, packed_element=1,
                                  args=[arith_dialect.constant(i32, 0)])
        return []

    triton_lowering.triton_lowering_rules[_TRIGGER] = rule


def _install_trigger() -> bool:
    """`_TRIGGER`'s rules: kept by the kernel's dead-code pass (it has no output: its effect is
    the point) and lowered to an inline `griddepcontrol.launch_dependents` (`trigger_rule`);
    False where jax's internals differ."""
    try:
        from jax._src.interpreters import partial_eval as pe
        # (used_outs, eqn) to jax 0.11, (used_outs, live_ins, eqn) from 0.12: the eqn is last
        pe.dce_rules[_TRIGGER] = lambda *args: ([], args[-1])
        trigger_rule("griddepcontrol.launch_dependents;")
    except (ImportError, AttributeError):
        return False
    return True


TRIGGERS_LAUNCH = _install_trigger()


def triton_ir(lowered) -> list[str]:
    """The Triton IR (MLIR text) of each Pallas-Triton kernel in a jax lowering
    (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`): the bytecode its custom calls
    carry, printed by jax's MLIR (bench/ptxas_stats.py compiles it offline; tests read it)."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        config = child.attributes["mhlo.backend_config"]
                        found.append(bytes(config["ir"].value_bytes))
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    with _new_ir_context():  # jax's MLIR reads its own bytecode
        return [ir.Module.parse(b).operation.get_asm() for b in found]
