"""GPU kernel time from JAX's own profiler: no Nsight tools, no TensorBoard.

    with kernel_trace() as trace:
        jax.block_until_ready(f(x))
    trace.totals  # {kernel name: ns}, every GPU of the process
    trace.busy_ns()  # their sum per GPU
    trace.active_ns()  # per GPU, the time some kernel ran (overlaps counted once)
    kernel_seconds(f, (x,), reps=5, names=("gdn_moe_down",))  # per call: (all, {name: share})
    by_category(trace.totals)  # {"matmul": ns, "gdn": ns, ...}: what kind of work the time is

The trace's XSpace is read with `jax.profiler.ProfileData`; the kernels are the events of the
"Stream" lines of the `/device:GPU:N` planes (the XLA-op and module lines summarise them). On CPU
there are no such planes: the totals stay empty and `busy_ns()` is None.

On Hopper and later XLA launches kernels as programmatic dependent launches (PDL): a kernel may
start while the one before it runs, its programs waiting at its entry, and that wait is part of
its traced duration. Summed durations (`busy_ns`) then count the overlap twice; `active_ns`, the
union of the kernels' intervals, counts it once (and leaves the idle gaps out).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import tempfile

import jax


@dataclasses.dataclass
class KernelTrace:
    totals: dict = dataclasses.field(default_factory=dict)  # kernel name -> ns, all GPUs
    counts: dict = dataclasses.field(default_factory=dict)  # kernel name -> launches, all GPUs
    gpus: int = 0  # device planes seen
    active: float = 0.0  # ns some kernel ran, summed over the GPUs

    def busy_ns(self) -> float | None:
        """Kernel time summed over kernels, per GPU (None where no GPU plane was traced)."""
        return sum(self.totals.values()) / self.gpus if self.gpus else None

    def active_ns(self) -> float | None:
        """The time at least one kernel ran, per GPU (None where no GPU plane was traced)."""
        return self.active / self.gpus if self.gpus else None

    def share_ns(self, name: str) -> float:
        """The time of the kernels named `name` or `name_...` (XLA's `__2` copies, a name's
        variants), per GPU (0 where none ran or no GPU plane was traced)."""
        ns = sum(t for k, t in self.totals.items() if k == name or k.startswith(name + "_"))
        return ns / self.gpus if self.gpus else 0.0


def read_trace(trace_dir: str) -> KernelTrace:
    """The kernel totals of the profile(s) written under trace_dir."""
    totals: dict = collections.defaultdict(float)
    counts: dict = collections.defaultdict(int)
    gpus, active = 0, 0.0
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU:"):
                continue
            gpus += 1
            spans = []
            for line in plane.lines:
                if "stream" in line.name.lower():
                    for event in line.events:
                        totals[event.name] += event.duration_ns
                        counts[event.name] += 1
                        spans.append((event.start_ns, event.start_ns + event.duration_ns))
            active += union_ns(spans)
    return KernelTrace(dict(totals), dict(counts), gpus, active)


def union_ns(spans) -> float:
    """The length of the union of (start, end) intervals: overlapping kernels counted once."""
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


# (category, name fragments), first match wins: our Pallas kernels by their names, then XLA's and
# cuBLAS's kernels by what their names say they are.
_CATEGORIES = (
    ("attention", ("gdn_decode_attention",)),
    ("moe", ("gdn_moe_",)),
    ("scatter", ("scatter",)),  # gdn_scatter_rows and XLA's scatter fusions
    ("matmul", ("gdn_projection", "gemm", "nvjet", "cutlass", "xmma", "splitkreduce", "cublas",
                "dot")),
    ("conv", ("gdn_conv_",)),  # the GDN layer's causal conv (kernels.conv_step)
    ("gdn", ("gdn_",)),
    ("copy", ("concatenate", "slice", "transpose", "copy", "memcpy", "memset", "pad", "gather",
              "dynamic_update")),
)
CATEGORIES = tuple(c for c, _ in _CATEGORIES) + ("other",)


def kernel_category(name: str) -> str:
    """The kind of work a kernel name is: one of CATEGORIES ("other": XLA's elementwise and
    reduction fusions, and whatever the name does not tell)."""
    low = name.lower()
    for category, parts in _CATEGORIES:
        if any(p in low for p in parts):
            return category
    return "other"


def by_category(totals: dict) -> dict:
    """{kernel name: time} -> {category: summed time}, every category of CATEGORIES present."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, t in totals.items():
        out[kernel_category(name)] += t
    return out


def kernel_seconds(fn, args=(), reps: int = 1, names=(), *,
                   active: bool = False) -> tuple[float | None, dict]:
    """fn(*args) run once (to compile), then reps times under the profiler: (its kernels' time
    per call per GPU in seconds, None where no GPU was traced; {name: `share_ns(name)` per call
    in seconds} for each of names). The time: the kernels' summed durations (`busy_ns`), or with
    active, the time some kernel ran (`active_ns`: what a chain of PDL-launched kernels takes;
    summed, each one's wait for the one before counts too). The shares are summed durations."""
    jax.block_until_ready(fn(*args))
    with kernel_trace() as trace:
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    busy = trace.active_ns() if active else trace.busy_ns()
    if busy is None:
        return None, {}
    return busy / reps / 1e9, {n: trace.share_ns(n) / reps / 1e9 for n in names}


@contextlib.contextmanager
def kernel_trace():
    """Profile the block; on exit the yielded KernelTrace holds its GPU kernels."""
    trace = KernelTrace()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            yield trace
        result = read_trace(tmp)
    vars(trace).update(vars(result))  # every field of the trace read, into the yielded one
