"""Each projection of a Qwen3.5-shaped step alone, against its byte floor: XLA's GEMM beside the
few-row kernel (gdn_jax.ops.project / gdn_jax.kernels.project), at the row counts of decode and
verify.

    python bench/bench_projection.py --out DIR                    # the dispatch's configs
    python bench/bench_projection.py --out DIR --sweep            # + a config sweep per case
    python bench/bench_projection.py --out DIR --rows 1,32 --shapes out_proj,lm_head
    python bench/bench_projection.py --out DIR --rows 1 --groups   # + one launch per group
    python bench/bench_projection.py --out DIR --rows 128 --groups --group-configs 128:64:2:8:3
                                                     # + the group's launch at other configs

Shapes (hidden 2048; GDN H = 16, HV = 32, K = V = 128; attention 16 heads of 256, 2 KV heads;
MLP 5120; vocab 248320), as [K, N] = [in, out]: in_proj_qkvz 2048 x 12288, in_proj_ba 2048 x 64,
out_proj 4096 x 2048, q_proj 2048 x 8192 (with the output gate), k_proj / v_proj 2048 x 512,
o_proj 4096 x 2048, gate_proj / up_proj 2048 x 5120, down_proj 5120 x 2048, lm_head
2048 x 248320, mtp_fc 4096 x 2048; gate_up_proj 2048 x 10240 (the MLP's gate / up group as one
weight: the same column blocks).

Each case runs one jitted program of L projections of the same rows through L distinct copies of
the weight (L copies >= 3 x the 50 MB L2, so every weight comes from HBM), repeated --reps times
under jax.profiler; its GPU kernel time (the padding, the kernel and the sum of the partials
included; the time some kernel ran, so a PDL launch's wait for the kernel before it is not
counted twice: since 2026-12-07, summed durations before) / (L x reps) is the figure, and weight
bytes / figure its bandwidth, beside the copy bandwidth measured in the same run
(`gdn_jax.benchmark.copy_bandwidth`). Paths: `xla` (the dot
as the modules made it so far), `xla_cublas` (the same with XLA's Triton GEMM off for this one
program, `compiler_options`), `kernel` (the dispatch's config), and with --sweep the best of a
coordinate search over the kernel's config (all of a grid in one profiled program, each config a kernel of its own name: the kernel alone). JSON: DIR/bench_projection.json.

--groups adds the projections of one input that the modules make as a group (`GROUPS`: GDN
in_proj_qkvz + in_proj_ba, attention q / k / v, MLP gate / up, the 35B MoE's router with its
shared expert's gate / up), each timed three ways over the group's bytes: XLA's dots, one kernel
launch per weight (GDN_JAX_PROJECTION_GROUPS=off), and one launch for the group
(`kernels.project_group`, GDN_JAX_PROJECTION_GROUPS=on). JSON: its "groups" list.
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
from jax import lax  # noqa: E402

from gdn_jax import kernels  # noqa: E402
from gdn_jax.benchmark import copy_bandwidth  # noqa: E402
from gdn_jax.ops import projection  # noqa: E402
from gdn_jax.ops.dispatch import sm_count  # noqa: E402
from gdn_jax.profiling import kernel_seconds  # noqa: E402

SHAPES = {  # name: (K, N), [in, out]
    "in_proj_qkvz": (2048, 12288), "in_proj_ba": (2048, 64), "out_proj": (4096, 2048),
    "q_proj": (2048, 8192), "k_proj": (2048, 512), "o_proj": (4096, 2048),
    "gate_proj": (2048, 5120), "down_proj": (5120, 2048), "lm_head": (2048, 248320),
    "mtp_fc": (4096, 2048), "gate_up_proj": (2048, 10240),
}
L2_BYTES = 50 << 20
GROUPS = {  # name: (K, widths of the weights of one x)
    "gdn_in": (2048, (12288, 64)), "attn_qkv": (2048, (8192, 512, 512)),
    "mlp_gate_up": (2048, (5120, 5120)), "moe35b_router_shared": (2048, (256, 512, 512)),
    "gdn_qkvz": (2048, (12288,)), "out_proj": (4096, (2048,)), "down_proj": (5120, (2048,)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="directory for bench_projection.json")
    p.add_argument("--rows", default="1,4,8,16,32,64,128", help="M values (B x T tokens)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="names from the list above")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="search the kernel's config per case")
    p.add_argument("--sweep-rows", default="16,64", help="the rows --sweep searches at")
    p.add_argument("--sweep-block-n", default="32,64,128", help="block_n values --sweep tries")
    p.add_argument("--sweep-block-k", default="128,256", help="block_k values --sweep tries")
    p.add_argument("--sweep-splits", default="1,2,4,8,16", help="splits values --sweep tries")
    p.add_argument("--sweep-stages", default="3,5", help="num_stages values --sweep tries")
    p.add_argument("--sweep-warps", default="",
                   help="num_warps values --sweep tries (default: the dispatch's)")
    p.add_argument("--sweep-swap", default="",
                   help="swap_ab values --sweep tries, 0 and / or 1 (default: the dispatch's)")
    p.add_argument("--sweep-gemv", default="",
                   help="gemv values --sweep tries at one row, 0 and / or 1 (default: the "
                        "dispatch's; ProjectionConfig.gemv)")
    p.add_argument("--max-seconds", type=float, default=1e9,
                   help="stop sweeping (not measuring) after this many seconds")
    p.add_argument("--groups", action="store_true",
                   help="also each group of projections of one x, in one launch and apart")
    p.add_argument("--groups-only", default="", help="with --groups: these GROUPS names only")
    p.add_argument("--mosaic", default="",
                   help="with --groups: also the Mosaic GPU stream-K kernel "
                        "(kernels.project_group_mgpu) at these block_n:stages configs, e.g. "
                        "128:4,64:6 (block_n:stages[:CTAs per SM]; its fp32 output's zeros and the cast to bf16 counted)")
    p.add_argument("--group-configs", default="",
                   help="with --groups: also the one-launch kernel at these configs, "
                        "block_n:block_k:splits:num_warps:num_stages each, e.g. "
                        "128:64:2:8:3,64:64:1:4:4 (one_<config>_us; the split sums counted)")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    return p.parse_args(argv)


def _kernel_seconds(fn, args, reps, main=None):
    """GPU kernel time of one call of fn(*args) (jitted), or wall time where no GPU was traced;
    with main (a kernel name), also that kernel's share: (all, main) seconds."""
    # active time: with PDL each Pallas kernel of the chain launches while the one before runs
    # and waits at its entry, and summed durations count that wait too: since the early trigger
    # (2026-12-06) the 128-row groups summed 40.2-48.1 us here where each kernel's own time in
    # the step was 20.9-24.2 (H100, 2026-12-07: bench/results/bench_projection-h100-streamk128-*)
    busy, mine = kernel_seconds(fn, args, reps, () if main is None else (main,), active=True)
    if busy is not None:
        return busy if main is None else (busy, mine[main])
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / reps


def _program(proj):
    return lambda x, ws: tuple(proj(x, w) for w in ws)


def _xla(x, w):
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    copy = copy_bandwidth(1 << 30 if dev.platform == "gpu" else 1 << 24)
    sms = sm_count()
    result = {"device": dev.device_kind, "jax": jax.__version__, "copy_gbps": copy,
              "python": platform.python_version(), "sm_count": sms, "reps": args.reps,
              "argv": sys.argv[1:], "cases": []}
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    started = time.perf_counter()
    print(f"{dev.device_kind}, jax {jax.__version__}, copy {copy:.0f} GB/s, {sms} SMs")
    print(f"{'shape':14s} {'M':>4s} {'MB':>7s} {'xla us':>8s} {'cublas':>8s} {'kernel':>8s} "
          f"{'GB/s':>6s} {'%copy':>6s} {'alone':>6s} {'best':>8s} best config")
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        nbytes = K * N * 2
        copies = 1 if args.interpret else max(1, min(16, -(-3 * L2_BYTES // nbytes)))
        ws = [jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02, dtype)
              for _ in range(copies)]
        for M in map(int, args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
            case = {"shape": name, "K": K, "N": N, "M": M, "copies": copies,
                    "weight_bytes": nbytes}

            def time_of(proj, options=None):
                fn = jax.jit(_program(proj))
                if options:
                    fn = fn.lower(x, ws).compile(compiler_options=options)
                return _kernel_seconds(fn, (x, ws), args.reps) / copies

            case["xla_us"] = time_of(_xla) * 1e6
            try:
                case["xla_cublas_us"] = time_of(_xla, {"xla_gpu_enable_triton_gemm": False}) * 1e6
            except Exception as e:  # noqa: BLE001 - an option this XLA lacks: report, go on
                case["xla_cublas_us"], case["xla_cublas_error"] = None, repr(e)[:200]
            config = projection.config_for(M, K, N, sm_count=sms)

            def kernel_us(cfg):
                return time_of(lambda x, w: kernels.project(x, w, config=cfg,
                                                            interpret=args.interpret)) * 1e6

            case["config"] = _cfg(config)
            case["kernel_us"] = kernel_us(config)
            if not args.interpret:  # the kernel alone, without the padding and the partial sum
                fn = jax.jit(_program(lambda x, w: kernels.project(x, w, config=config)))
                _, main_s = _kernel_seconds(fn, (x, ws), args.reps, main="gdn_projection")
                case["kernel_only_us"] = main_s / copies * 1e6
            best = (case["kernel_us"], config)
            if args.sweep and M in map(int, args.sweep_rows.split(",")) \
                    and time.perf_counter() - started < args.max_seconds:
                best, case["sweep"] = _sweep(x, ws, K, N, M, args, best)
            case["best_us"], case["best_config"] = best[0], _cfg(best[1])
            case["kernel_gbps"] = nbytes / case["kernel_us"] / 1e3
            case["kernel_pct_copy"] = 100 * case["kernel_gbps"] / copy
            case["floor_us"] = nbytes / copy / 1e3
            result["cases"].append(case)
            cub = case["xla_cublas_us"]
            print(f"{name:14s} {M:4d} {nbytes / 1e6:7.1f} {case['xla_us']:8.1f} "
                  f"{cub if cub is None else round(cub, 1)!s:>8s} {case['kernel_us']:8.1f} "
                  f"{case['kernel_gbps']:6.0f} {case['kernel_pct_copy']:6.1f} "
                  f"{case.get('kernel_only_us', 0):6.1f} "
                  f"{best[0]:8.1f} {case['best_config']}", flush=True)
            with open(os.path.join(args.out, "bench_projection.json"), "w") as f:
                json.dump(result, f, indent=1)
    if args.groups:
        result["groups"] = _groups(args, rng, dtype, copy, sms)
        with open(os.path.join(args.out, "bench_projection.json"), "w") as f:
            json.dump(result, f, indent=1)


def _groups(args, rng, dtype, copy, sms):
    """Each of GROUPS at each --rows: XLA, a launch per weight, one launch (module docstring)."""
    print(f"\n{'group':22s} {'M':>4s} {'MB':>7s} {'xla us':>8s} {'apart':>8s} {'one':>8s} "
          f"{'%copy':>6s} config")
    cases = []
    only = [g for g in args.groups_only.split(",") if g]
    for name, (K, widths) in GROUPS.items():
        if only and name not in only:
            continue
        nbytes = K * sum(widths) * 2
        copies = 1 if args.interpret else max(1, min(16, -(-3 * L2_BYTES // nbytes)))
        groups = [tuple(jnp.asarray(rng.standard_normal((K, n), np.float32) * 0.02, dtype)
                        for n in widths) for _ in range(copies)]
        for M in map(int, args.rows.split(",")):
            if M > kernels.PROJECTION_MAX_M:
                continue
            x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
            apart = [projection.config_for(M, K, n, sm_count=sms) for n in widths]
            config = projection.config_for(M, K, widths, sm_count=sms)

            def time_of(one_group):
                fn = jax.jit(lambda x, gs: [one_group(x, ws) for ws in gs])
                return _kernel_seconds(fn, (x, groups), args.reps) / copies * 1e6

            case = {"group": name, "K": K, "widths": list(widths), "M": M, "copies": copies,
                    "weight_bytes": nbytes, "config": _cfg(config),
                    "xla_us": time_of(lambda x, ws: [_xla(x, w) for w in ws]),
                    "apart_us": time_of(lambda x, ws: [
                        kernels.project(x, w, config=c, interpret=args.interpret)
                        for w, c in zip(ws, apart)]),
                    "one_us": time_of(lambda x, ws: kernels.project_group(
                        x, ws, config=config, interpret=args.interpret)),
                    "floor_us": nbytes / copy / 1e3}
            case["one_pct_copy"] = 100 * case["floor_us"] / case["one_us"]
            for text in filter(None, args.group_configs.split(",")):
                bn, bk, splits, warps, stages = map(int, text.split(":"))
                gcfg = kernels.ProjectionConfig(block_n=bn, block_k=bk, splits=splits,
                                                num_warps=warps, num_stages=stages,
                                                swap_ab=config.swap_ab)
                _record(case, f"one_{text}_us", None if kernels.projection_misfit(
                    M, K, widths, dtype, gcfg) else time_of(
                    lambda x, ws, c=gcfg: kernels.project_group(x, ws, config=c,
                                                                interpret=args.interpret)))
            for text in filter(None, args.mosaic.split(",")):
                bn, stages, *per_sm = map(int, text.split(":"))
                mcfg = kernels.MosaicProjectionConfig(block_n=bn, stages=stages,
                                                      ctas=sms * (per_sm or [1])[0])
                _record(case, f"mosaic_{text}_us", None if kernels.projection_mgpu_misfit(
                    M, K, widths, dtype, mcfg) else time_of(lambda x, ws, c=mcfg: [
                        y.astype(dtype) for y in kernels.project_group_mgpu(
                            x, ws, config=c, interpret=args.interpret)]))
            cases.append(case)
            print(f"{name:22s} {M:4d} {nbytes / 1e6:7.1f} {case['xla_us']:8.1f} "
                  f"{case['apart_us']:8.1f} {case['one_us']:8.1f} {case['one_pct_copy']:6.1f} "
                  f"{case['config']}", flush=True)
    return cases


def _record(case, key, us):
    """case[key] = us (None: the config does not fit), printed beside the group's floor."""
    case[key] = us
    if us is not None:
        print(f"{'':22s} {case['M']:4d} {key[:-3]:22s} {us:8.1f} us "
              f"{100 * case['floor_us'] / us:6.1f} %copy", flush=True)


def _cfg(c):
    return [c.block_n, c.block_k, c.splits, c.num_warps, c.num_stages, int(c.swap_ab),
            int(c.gemv)]


def _sweep(x, ws, K, N, M, args, best):
    """Every config of a grid around the dispatch's, in one program: each config is a kernel of
    its own name, so one profile times them all (the kernel alone: the row padding and the
    partial sums are not counted; more splits cost a larger sum after). Returns the best
    (us, config) and the list of [config, us]."""
    import dataclasses
    import itertools
    reps, interpret = args.reps, args.interpret
    base = projection.config_for(M, K, N, sm_count=sm_count())
    ints = lambda text: tuple(int(v) for v in text.split(",") if v)
    grid = []
    for bn, bk, splits, stages, warps, swap, gemv in itertools.product(
            ints(args.sweep_block_n), ints(args.sweep_block_k), ints(args.sweep_splits),
            ints(args.sweep_stages), ints(args.sweep_warps) or (base.num_warps,),
            ints(args.sweep_swap) or (int(base.swap_ab),),
            ints(args.sweep_gemv) or (int(base.gemv),)):
        cfg = dataclasses.replace(base, block_n=bn, block_k=bk, splits=splits, num_stages=stages,
                                  num_warps=warps, swap_ab=bool(swap), gemv=bool(gemv))
        if not cfg.misfit(K, N, M):
            grid.append(cfg)
    names = [f"sweep{i}x" for i in range(len(grid))]

    def program(x, ws):
        return tuple(kernels.project(x, w, config=cfg, interpret=interpret, name=name)
                     for cfg, name in zip(grid, names) for w in ws)

    _, mine = kernel_seconds(jax.jit(program), (x, ws), reps, names)
    tried = []
    for cfg, name in zip(grid, names):
        us = mine.get(name, 0.0) / len(ws) * 1e6
        tried.append([_cfg(cfg), us])
        if us and us < best[0]:
            best = (us, cfg)
    return best, tried


if __name__ == "__main__":
    main()
