"""Where a model step's time goes: the GPU kernels of decode, verify and a speculative round, from
JAX's profiler (no ncu, no TensorBoard: the trace's XSpace is read with jax.profiler.ProfileData).

    python bench/profile_step.py --out DIR                       # dense, B = 1 and 32
    python bench/profile_step.py --out DIR --family qwen3_next --experts 512 --batches 1
    python bench/profile_step.py --out DIR --smoke               # tiny model on CPU (the script)
    python bench/profile_step.py --out DIR --layers 48 --batches 32 --commit-mode ring  # the
                                           # speculative loop's mode from RING_FROM_BATCH rows
    python bench/profile_step.py --out DIR --layers 48 --programs decode \
        --variant xla:projection=xla --variant kernel --variant graphs:xla_gpu_graph_min_graph_size=1

A --variant is `name[:setting;...]`, each setting `projection=xla|auto|triton|xla-gemm`
(GDN_JAX_PROJECTION: the model's projections in XLA, or through the few-row kernel where it runs),
`scatter=xla|auto` (GDN_JAX_SCATTER: the caches' writes by XLA's scatter or the row kernel),
`groups=on|off` (GDN_JAX_PROJECTION_GROUPS: a layer's projections of one input in one launch),
`conv=auto|xla` (GDN_JAX_CONV: the GDN conv of decode and verify by the conv kernel or XLA),
`conv_epilogue=auto|on|off` (GDN_JAX_CONV_EPILOGUE: a GDN decode's or verify's conv in its
in_proj launch, by default up to 32 rows),
`norm=auto|xla` (GDN_JAX_NORM: each residual add and the RMSNorm after it in one kernel, or XLA),
`gated_norm=auto|pallas|xla` (GDN_JAX_GATED_NORM: GDN's output norm before out_proj in one
kernel, "pallas", or XLA's fusion; "auto": `gdn_jax.ops.residual_norm.GATED_AUTO_KERNEL`),
`prologue=off|views|row|on` (GDN_JAX_PROJECTION_PROLOGUE: GDN's in_proj partial sums read in place
by the conv and the output norm, "views", the default; "on" also runs the MLP's silu * up and GDN's
output norm in the next projection's launch, "row" only where that launch has one row),
`glu=auto|on|off` (GDN_JAX_PROJECTION_GLU: the dense MLP's silu * up in its gate / up launch's
epilogue, by default up to 32 rows),
`gemv=off|prologues|on` (GDN_JAX_PROJECTION_GEMV: which one-row projections run as a GEMV on the
CUDA cores: none, the fused prologues' launches, or all),
`attn_prologue=auto|off` (GDN_JAX_ATTENTION_PROLOGUE: the attention layers' q / k norms, RoPE and
cache write in one launch before the attention kernel, or as XLA's steps),
`combine=xla|kernel` (GDN_JAX_ATTENTION_COMBINE: the attention kernel's splits combined and the
sigmoid gate applied by XLA's two fusions, the default, or in one launch),
`trigger=auto|early|off` (GDN_JAX_PDL_TRIGGER: each Triton kernel's programs trigger the next
kernel's programmatic launch first on an SM90+ GPU, the default, always, or never),
`router=auto|xla` (GDN_JAX_MOE_ROUTER: the MoE router's softmax, top k and renormalisation in
the one-launch kernel `gdn_jax.kernels.route`, the default, or as XLA's launches),
`shared=auto|apart|fold`
(GDN_JAX_MOE_SHARED: the MoE shared expert in the routed experts' launches at small token
counts, the default, as a SwiGLU of its own, or in the routed launches at any count),
`moe=auto|gather|grouped|pallas` (set_expert_path), `attention=auto|xla|pallas`
(set_attention_impl) or `KEY=VALUE`, an XLA option compiled into that variant's programs alone
(`compiler_options`; e.g. the command-buffer options). Variants run one after another on the
same model and caches.

The model and the chained programs are bench_speculative.py's (same flags). Each program runs
--calls chained calls in one jit under `jax.profiler.trace`; every kernel event of the GPU planes
is summed by name and divided by the calls: kernel time per call, by kernel, beside the wall time
per call, so the gap (launches, host syncs, idle) shows, and summed by kind of work
(`gdn_jax.profiling.kernel_category`: matmul, gdn, attention, moe, scatter, copy, other).
Kernels of every GPU are counted (with TP the per-device sums are divided by the device count).
On Hopper and later XLA launches kernels as programmatic dependent launches (PDL): a kernel's
time then includes its programs waiting at its entry for the one before it, so summed kernel
times of variants that change launches compare less well than chained step times
(bench_speculative.py; the 2026-12-06 PDL trigger gained 5.4% of a B = 1 decode there); the
"active" time (`gdn_jax.profiling.KernelTrace.active_ns`: the union of the kernels' intervals,
overlaps counted once, idle gaps left out) is the profile's figure to compare.
On CPU the device planes are absent and the table is empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bench_speculative as bs  # noqa: E402
from gdn_jax.modules.attention import set_attention_impl  # noqa: E402
from gdn_jax.modules.mlp import set_expert_path  # noqa: E402
from gdn_jax.profiling import by_category, kernel_trace  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="bench/results", help="directory for the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny model, any device")
    p.add_argument("--family", default="qwen3_5_text", choices=bs.FAMILIES)
    p.add_argument("--experts", type=int, default=None, help="routed experts (MoE families)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (3 GDN : 1 attention)")
    p.add_argument("--batches", default="1,32", help="comma-separated B values")
    p.add_argument("--tp", type=int, default=1, help="devices of the ('tp',) mesh")
    p.add_argument("--draft", type=int, default=3, help="d, drafts per round")
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV caches")
    p.add_argument("--calls", type=int, default=10, help="chained calls per traced program")
    p.add_argument("--top", type=int, default=12, help="kernels listed per program")
    p.add_argument("--programs", default="decode,verify,round", help="which programs to trace")
    p.add_argument("--commit-mode", default="replay", choices=("replay", "ring", "intermediate"),
                   help="the GDN layers' commit mode (bench_speculative's --commit-mode): ring "
                        "is what the speculative loop runs from RING_FROM_BATCH rows on Hopper")
    p.add_argument("--hlo", action="store_true",
                   help="also write each program's optimized HLO (the profile's kernel names are "
                        "its fusions and custom calls)")
    p.add_argument("--variant", action="append", default=None,
                   help="name[:projection=...;scatter=...;moe=...;attention=...;KEY=VALUE;...] "
                        "(repeatable; "
                        "docstring)")
    return p.parse_args(argv)


_ENV_PATHS = {"projection": "GDN_JAX_PROJECTION", "scatter": "GDN_JAX_SCATTER",
              "groups": "GDN_JAX_PROJECTION_GROUPS", "conv": "GDN_JAX_CONV",
              "conv_epilogue": "GDN_JAX_CONV_EPILOGUE",
              "norm": "GDN_JAX_NORM", "gated_norm": "GDN_JAX_GATED_NORM",
              "prologue": "GDN_JAX_PROJECTION_PROLOGUE",
              "attn_prologue": "GDN_JAX_ATTENTION_PROLOGUE", "trigger": "GDN_JAX_PDL_TRIGGER",
              "combine": "GDN_JAX_ATTENTION_COMBINE",
              "router": "GDN_JAX_MOE_ROUTER",
              "shared": "GDN_JAX_MOE_SHARED", "gemv": "GDN_JAX_PROJECTION_GEMV",
              "glu": "GDN_JAX_PROJECTION_GLU"}
_PATHS = (*_ENV_PATHS, "moe", "attention")


def parse_variant(text: str):
    """'name:projection=xla;moe=pallas;k=v' -> (name, {path setting: value}, {XLA option: v})."""
    name, _, rest = text.partition(":")
    paths, options = {}, {}
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        if key in _PATHS:
            paths[key] = value
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return name, paths, options


def main(argv=None):
    args = parse_args(argv)
    dev = jax.devices()[0]
    d = args.draft
    config = bs.model_config(args.layers, args.smoke, args.family, args.experts)
    model = bs.build(config, jnp.bfloat16, args.tp)
    calls = args.calls
    buf_tokens = calls * (d + 1) + 1
    max_len = args.context + calls * (d + 1) + 2 * (d + 1)
    print(f"{dev.device_kind}, jax {jax.__version__}, {args.family}, TP {args.tp}, calls {calls}",
          flush=True)
    results = []
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    for B, (variant, paths, options) in ((int(b), v) for b in args.batches.split(",")
                                        for v in variants):
        for setting, var in _ENV_PATHS.items():
            if setting in paths:
                os.environ[var] = paths[setting]
            else:
                os.environ.pop(var, None)
        set_expert_path(model, paths.get("moe", "auto"))
        set_attention_impl(model, paths.get("attention", "auto"))
        graphdef, params = nnx.split(model)
        progs = bs.chains(graphdef, d, config.vocab_size, buf_tokens=buf_tokens,
                          commit_mode=args.commit_mode)
        jax.clear_caches()  # every path is chosen at trace time: retrace every variant
        cache = model.init_cache(B, max_len, t_max=d + 1, state_dtype=jnp.bfloat16,
                                 commit_mode=args.commit_mode)
        tok = jnp.asarray(np.random.default_rng(B).integers(0, config.vocab_size, B), jnp.int32)
        for name in args.programs.split(","):
            cache = bs._reset(cache, args.context)
            t0 = time.perf_counter()
            run = jax.jit(progs[name], donate_argnums=(2,)).lower(
                params, jnp.int32(calls), cache, tok).compile(compiler_options=options or None)
            compile_s = time.perf_counter() - t0
            if args.hlo:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"hlo-{args.family}-B{B}-{name}-{variant}.txt"),
                          "w") as f:
                    f.write(run.as_text())
            # every program returns the cache first (the round also its pending tokens, counts)
            cache = jax.block_until_ready(run(params, jnp.int32(calls), cache, tok))[0]  # warm
            cache = jax.block_until_ready(bs._reset(cache, args.context))
            with kernel_trace() as trace:
                t0 = time.perf_counter()
                cache = jax.block_until_ready(run(params, jnp.int32(calls), cache, tok))[0]
                wall = time.perf_counter() - t0
            per = {k: v / calls / max(trace.gpus, 1) / 1e3 for k, v in trace.totals.items()}
            busy = sum(per.values())
            active = (trace.active_ns() or 0.0) / calls / 1e3  # overlapping launches once
            ranked = sorted(per.items(), key=lambda kv: -kv[1])
            top = ranked[:args.top]
            # launches per call by name: a fusion in the scanned layer body runs once per layer
            each = {k: v / calls / max(trace.gpus, 1) for k, v in trace.counts.items()}
            launches = sum(each.values())
            kinds = {k: v for k, v in by_category(per).items() if v}
            # the GDN layers' mode as the traced cache has it (not as asked)
            row = {"B": B, "program": name, "variant": variant, "commit_mode": cache.commit_mode,
                   **paths,
                   "options": options, "compile_s": compile_s,
                   "wall_us_per_call": wall / calls * 1e6, "kernel_us_per_call": busy,
                   "active_us_per_call": active,
                   "kernels_per_call": launches, "by_category_us": kinds, "top": top,
                   "kernels_us": dict(ranked),
                   "launches_per_call": {k: each.get(k, 0) for k, _ in ranked}}
            results.append(row)
            print(f"\nB={B} {name} [{variant}]: wall {wall / calls * 1e6:9.1f} us/call, kernels "
                  f"{busy:9.1f} us/call ({active:.1f} active), {launches:.0f} kernels/call "
                  f"({len(per)} distinct), compiled in {compile_s:.0f} s", flush=True)
            if kinds:
                print("   by kind (us): " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()))
            for k, v in top:
                n = each.get(k, 0)
                print(f"   {v:9.1f} us  {n:5.0f} x {v / max(n, 1):6.2f} us  {k[:90]}")
        del cache
    os.makedirs(args.out, exist_ok=True)
    kind = dev.device_kind.replace(" ", "_") if dev.platform == "gpu" else dev.platform
    path = os.path.join(args.out, f"profile_step-{kind}-{args.family}-tp{args.tp}"
                                  f"{'-smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump({"bench": "profile_step", "device": dev.device_kind, "jax": jax.__version__,
                   "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "argv": sys.argv[1:], "results": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
