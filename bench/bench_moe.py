"""The routed experts of a MoE block alone (`gdn_jax.ops.moe.routed`: the plan, the gate / up and
down kernels, the combine) against the bytes of the experts each call touches, at decode and
verify token counts; with --sweep, a search over each kernel's config.

    python bench/bench_moe.py --out DIR                          # the dispatch's configs
    python bench/bench_moe.py --out DIR --tokens 1,8 --sweep     # + each kernel's config grid
    python bench/bench_moe.py --out DIR --interpret --smoke      # the script on CPU

Shape: Qwen3.5-35B-A3B's experts by default (hidden 2048, 256 experts of 512, top 8; bf16);
--shared adds its shared expert (512) to routed's launches as the model's default does at
small token counts (`gdn_jax.ops.moe.folds_shared`), its bytes to the floor.
Each case runs one jitted program of --routings calls, each with its own random routing (every
token k distinct experts, uniform), over one expert stack: a call's touched experts (~50 MB at
one token) are seldom the previous call's, so they come from HBM. Its GPU kernel time (JAX's
profiler: every kernel of the call, the plan's and the combine's fusions included) / routings is
the figure; the floor is the distinct experts a call touches x their gate, up and down bytes /
the copy bandwidth measured in the same run (`gdn_jax.benchmark.copy_bandwidth`). The gate / up
and down kernels are also reported alone (their share of the profile; floor: their own bytes).

The router kernel (`gdn_jax.kernels.route`: softmax, top k, renormalisation) is timed at each
token count with each of --router-warps warps a program (its launches are named by warps).

--sweep times a grid of each kernel's configs, a program each, all in one profile (one program
of them all lets XLA interleave the configs' calls, which then find each other's experts in
L2; a profile per config costs seconds): gate / up at (block_n, block_k, splits, warps,
stages), down likewise on a bf16 h (the unsplit gate / up's output); then `routed` end to end
with the best pair (down forming silu(gate) * up from the gate / up's partial sums where that
one splits). The sweep of 2026-12-04 (bench/results/bench_moe-h200-sweep-2026-12-04.json) was
one program of all configs: its B = 1 figures are flattered by L2 (the dispatch's gate / up
9.9 us there, 13.5 in `routed`), its ranking is a lead only.
JSON: DIR/bench_moe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import re
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdn_jax import kernels  # noqa: E402
from gdn_jax.benchmark import copy_bandwidth  # noqa: E402
from gdn_jax.kernels import moe as kmoe  # noqa: E402
from gdn_jax.ops import moe  # noqa: E402
from gdn_jax.ops.dispatch import sm_count  # noqa: E402
from gdn_jax.ops.projection import config_for as projection_config  # noqa: E402
from gdn_jax.profiling import kernel_seconds  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="directory for bench_moe.json")
    p.add_argument("--tokens", default="1,4,8,32,128",
                   help="tokens per call (B at decode, B x T at verify)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=512, help="each expert's")
    p.add_argument("--routings", type=int, default=8, help="calls (random routings) a program")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="search each kernel's config")
    p.add_argument("--shared", action="store_true",
                   help="a shared expert of the experts' size in routed's launches (the fold)")
    p.add_argument("--router-warps", default="1,2,4",
                   help="the router kernel's launches to time at each token count ('' skips)")
    p.add_argument("--sweep-block-n", default="16,32,64")
    p.add_argument("--sweep-block-k", default="64,128,256")
    p.add_argument("--sweep-splits", default="1,2,4,8")
    p.add_argument("--sweep-warps", default="2,4")
    p.add_argument("--sweep-stages", default="3,4")
    p.add_argument("--smoke", action="store_true", help="tiny shape (with --interpret)")
    p.add_argument("--interpret", action="store_true", help="the kernels interpreted (CPU)")
    return p.parse_args(argv)


def _seconds(fn, args, reps, names=()):
    """(all kernels' time of one fn(*args), {name: that kernel's time}) in seconds, from the
    profiler (`gdn_jax.profiling.kernel_seconds`); (0.0, {}) where no GPU was traced (CPU)."""
    total, mine = kernel_seconds(fn, args, reps, names)
    return total or 0.0, mine


def _jit(fn, max_constant: int = 4096):
    """jax.jit(fn), refusing on its first call a program that compiles in a constant of more than
    max_constant bytes. jit embeds the arrays a function closes over in its HLO: closed-over
    expert stacks (0.5 GB each at the real shape) made every program compile for a minute and
    the sweep's profile pass the profiler's 2 GB limit (2026-12-06, H100: every config read 0 us).
    The programs take every array as an argument instead."""
    jitted = jax.jit(fn)
    checked = []

    def call(*args):
        if not checked:
            hlo = jitted.lower(*args).as_text()
            largest = max((len(h) // 2 for h in re.findall(r'dense<"0x([0-9A-Fa-f]+)"', hlo)),
                          default=0)
            if largest > max_constant:
                raise SystemExit(f"bench_moe: a program embeds a {largest}-byte constant (an "
                                 "array it closes over): pass it as an argument")
            checked.append(True)
        return jitted(*args)
    return call


_FIELDS = ("block_m", "block_n", "block_k", "splits", "num_warps", "num_stages")


def _cfg(c: kmoe.MoEConfig) -> list[int]:
    return [getattr(c, f) for f in _FIELDS]


def best_pair(sweep: dict) -> tuple[kmoe.MoEConfig, kmoe.MoEConfig]:
    """The fastest (gate / up, down) configs of a case's sweep (its lists fastest first)."""
    return tuple(kmoe.MoEConfig(**dict(zip(_FIELDS, sweep[w][0][0])))
                 for w in ("gate_up", "down"))


# Hopper's shared memory a CTA, less a margin for Triton's own scratch: a config whose pipeline
# buffers pass it fails to compile, and one failure would end the sweep's single profile
_SMEM_BYTES = 220 * 1024


def _grid(args, base: kmoe.MoEConfig, K: int, N: int,
          gated: bool = False) -> list[kmoe.MoEConfig]:
    """The sweep's configs that take [K, N] experts and whose stages' buffers (an x tile and
    one weight tile, two with gated: bf16) fit `_SMEM_BYTES`."""
    ints = lambda text: [int(v) for v in text.split(",") if v]
    grid = [dataclasses.replace(base, block_n=bn, block_k=bk, splits=s, num_warps=w,
                                num_stages=st)
            for bn, bk, s, w, st in itertools.product(
                ints(args.sweep_block_n), ints(args.sweep_block_k), ints(args.sweep_splits),
                ints(args.sweep_warps), ints(args.sweep_stages))]
    fits = lambda c: c.num_stages * 2 * c.block_k * (c.block_m + (1 + gated) * c.block_n) \
        <= _SMEM_BYTES
    return [c for c in grid if not c.misfit(K, N) and fits(c)]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        args.experts, args.top_k, args.hidden, args.intermediate = 8, 2, 64, 32
        args.routings, args.reps = 2, 1
        args.sweep_block_n, args.sweep_block_k, args.sweep_splits = "16,32", "16", "1,2"
        args.sweep_warps, args.sweep_stages = "4", "1"
    dev = jax.devices()[0]
    copy = copy_bandwidth(1 << 30 if dev.platform == "gpu" else 1 << 24)
    sms = sm_count()
    E, k, H, I, L = args.experts, args.top_k, args.hidden, args.intermediate, args.routings
    result = {"bench": "bench_moe", "device": dev.device_kind, "jax": jax.__version__,
              "python": platform.python_version(), "copy_gbps": copy, "sm_count": sms,
              "shape": {"experts": E, "top_k": k, "hidden": H, "intermediate": I},
              "routings": L, "reps": args.reps, "argv": sys.argv[1:],
              "method": "JAX profiler kernel time per call (all kernels of the call), median "
                        "not taken: the sum over reps x routings calls / (reps x routings)",
              "cases": []}
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    init = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)
                                      * shape[-2] ** -0.5, dtype)
    wg, wu, wd = init(E, H, I), init(E, H, I), init(E, I, H)
    lone = (init(H, I), init(H, I), init(I, H)) if args.shared else None  # gate, up, down
    expert_bytes = 3 * H * I * 2
    print(f"{dev.device_kind}, jax {jax.__version__}, copy {copy:.0f} GB/s, {sms} SMs, "
          f"{E} experts top {k}, hidden {H}, intermediate {I}")
    print(f"{'tokens':>6s} {'experts':>7s} {'MB':>6s} {'routed':>8s} {'floor':>7s} {'x':>5s} "
          f"{'gate_up':>8s} {'down':>7s} configs (block_m, n, k, splits, warps, stages)")
    for T in map(int, args.tokens.split(",")):
        ids = [jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]),
                           jnp.int32) for _ in range(L)]
        xs = [jnp.asarray(rng.standard_normal((T, H), np.float32), dtype) for _ in range(L)]
        weights = [jnp.asarray(rng.random((T, k), np.float32), dtype) for _ in range(L)]
        if lone:  # the shared expert's weight last, as the router appends it
            weights = [jnp.concatenate([w, jnp.asarray(rng.random((T, 1), np.float32), dtype)],
                                       1) for w in weights]
        touched = float(np.mean([len(np.unique(np.asarray(i))) for i in ids])) + bool(lone)
        floor = touched * expert_bytes / copy / 1e3
        P = T * k
        configs = moe.default_configs(P, T, E, H, I, shared=bool(lone), sm_count=sms)

        def routed_us(cfgs):
            fn = _jit(lambda xs, ws, ids, experts, lone: [moe.routed(
                x, w, i, *experts, interpret=args.interpret, configs=cfgs, shared=lone)
                for x, w, i in zip(xs, ws, ids)])
            total, mine = _seconds(fn, (xs, weights, ids, (wg, wu, wd), lone), args.reps,
                                   ("gdn_moe_gate_up", "gdn_moe_down"))
            return total / L * 1e6, {n: v / L * 1e6 for n, v in mine.items()}

        us, mine = routed_us(configs)
        case = {"tokens": T, "pairs": P, "shared": bool(lone), "touched_experts": touched,
                "touched_bytes": touched * expert_bytes, "floor_us": floor,
                "configs": [_cfg(c) for c in configs], "routed_us": us,
                "gate_up_us": mine.get("gdn_moe_gate_up"), "down_us": mine.get("gdn_moe_down"),
                "gate_up_floor_us": 2 / 3 * floor, "down_floor_us": floor / 3}
        case["routed_over_floor"] = us / floor if us else None
        print(f"{T:6d} {touched:7.1f} {touched * expert_bytes / 1e6:6.1f} {us:8.1f} "
              f"{floor:7.1f} {case['routed_over_floor'] or 0:5.2f} "
              f"{case['gate_up_us'] or 0:8.1f} {case['down_us'] or 0:7.1f} {case['configs']}",
              flush=True)
        if args.router_warps:
            case["router_us"] = _router(args, T, E, k, L, rng, H if lone else None)
        if args.sweep:
            case["sweep"] = _sweep(args, case, configs, ids, xs, wg, wu, wd, lone, routed_us)
        result["cases"].append(case)
        with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
            json.dump(result, f, indent=1)


def _router(args, T, E, k, L, rng, hidden=None) -> dict:
    """{num_warps: us} of the router kernel (`kernels.route`) on L random [T, E] bf16 logits
    (with hidden, as the folded model runs it: the router projection's split-K partial sums
    [S, T, E] fp32 at its dispatch's S, and the shared expert's gate of hidden inputs), each
    launch its own program, all in one profile; {} where the shape does not fit."""
    if hidden and kernels.route_misfit((T, E), k, hidden):  # the model's gate joins after it
        hidden = None
    why = kernels.route_misfit((T, E), k)
    if why:
        print(f"    router: skipped ({why})")
        return {}
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    S = projection_config(T, hidden, E, sm_count=sm_count()).splits if hidden else 0
    logits = [jnp.asarray(rng.standard_normal((S, T, E), np.float32)) if S else bf16(T, E)
              for _ in range(L)]
    gates = [(bf16(T, hidden), bf16(hidden)) if hidden else None for _ in range(L)]
    parts = dict(parts_dtype=jnp.bfloat16) if S else {}
    warps = [int(w) for w in args.router_warps.split(",") if w]
    fns = {w: _jit(lambda ls, w=w: [kernels.route(
        lg, k=k, shared_gate=g, interpret=args.interpret, num_warps=w, **parts)
        for lg, g in zip(ls, gates)]) for w in warps}
    every = lambda *_: [jax.block_until_ready(fn(logits)) for fn in fns.values()]
    _, mine = _seconds(every, (), args.reps, [f"gdn_moe_route_w{w}" for w in warps])
    out = {w: mine.get(f"gdn_moe_route_w{w}", 0) / L * 1e6 for w in warps}
    what = "softmax, top k, renormalise" + (f", {S} partial sums, shared gate" if hidden else "")
    print(f"    router ({what}; one launch): " + ", ".join(
        f"{w} warps {us:.2f} us" for w, us in out.items()), flush=True)
    return out


def _sweep(args, case, configs, ids, xs, wg, wu, wd, lone, routed_us):
    """Each kernel's config grid in one program apiece, then routed with the best pair; lone:
    the shared expert's (gate, up, down) as routed runs it (expert E of the plan), or None."""
    E, H, I, L = wg.shape[0], wg.shape[1], wg.shape[2], len(ids)
    bm = configs[0].block_m
    blocks = [moe.plan_blocks(i, E, bm, shared=bool(lone)) for i in ids]
    up_lone = dict(w_shared=lone[0], w_up_shared=lone[1]) if lone else {}
    down_lone = dict(w_shared=lone[2]) if lone else {}
    # every plan here has the same shared_blocks (a static argument: not in the programs' inputs)
    plan = dict(shared_blocks=blocks[0].shared_blocks) if lone else {}
    hs = [kernels.grouped_matmul(x, wg, b.block_expert, w_up=wu, row_token=b.row_token,
                                 config=dataclasses.replace(configs[0], splits=1),
                                 interpret=args.interpret, **up_lone, **plan)
          for x, b in zip(xs, blocks)]
    runs = []  # (kernel, config, name, jitted program, its arguments)
    for which, base, K, N in (("gate_up", configs[0], H, I), ("down", configs[1], I, H)):
        for j, c in enumerate(_grid(args, base, K, N, gated=which == "gate_up")):
            name = f"{which}_sweep{j}x"
            if which == "gate_up":
                fn = _jit(lambda xs, wg, wu, lone, c=c, name=name: [kernels.grouped_matmul(
                    x, wg, b.block_expert, w_up=wu, row_token=b.row_token, config=c,
                    name=name, interpret=args.interpret, **lone, **plan)
                    for x, b in zip(xs, blocks)])
                inputs = (xs, wg, wu, up_lone)
            else:
                fn = _jit(lambda hs, wd, lone, c=c, name=name: [kernels.grouped_matmul(
                    h, wd, b.block_expert, config=c, name=name, interpret=args.interpret,
                    **lone, **plan) for h, b in zip(hs, blocks)])
                inputs = (hs, wd, down_lone)
            runs.append((which, c, name, fn, inputs))
    # one profile (a profiler session costs seconds); each config its own program, run one
    # after another (in one program XLA may interleave the configs' calls)
    every = lambda *_: [jax.block_until_ready(fn(*a)) for _, _, _, fn, a in runs]
    _, mine = _seconds(every, (), args.reps, [r[2] for r in runs])
    out = {}
    for which in ("gate_up", "down"):
        tried = sorted(([_cfg(c), mine.get(n, 0) / L * 1e6] for w, c, n, _, _ in runs
                        if w == which), key=lambda t: t[1] or float("inf"))
        out[which] = tried
        floor = case[f"{which}_floor_us"]
        print(f"    {which}: {len(tried)} configs; best " + "; ".join(
            f"{c} {us:.1f} us ({floor / us * 100 if us else 0:.0f}% of copy)"
            for c, us in tried[:4]), flush=True)
    if not out["gate_up"] or not out["down"]:
        raise SystemExit("bench_moe: every config of a sweep grid misfits the expert's dims")
    # the down sweep ran on a bf16 h: where the best gate / up splits, this pairs it with a
    # down config never timed on partial sums (its prologue, 2026-12-04: 7.4 -> 13.9 us)
    best = best_pair(out)
    us, mine = routed_us(best)
    out["routed_best"] = {"configs": [_cfg(c) for c in best], "routed_us": us,
                          "gate_up_us": mine.get("gdn_moe_gate_up"),
                          "down_us": mine.get("gdn_moe_down"),
                          "routed_over_floor": us / case["floor_us"] if us else None}
    print(f"    routed with the best pair: {us:.1f} us "
          f"({out['routed_best']['routed_over_floor'] or 0:.2f}x floor; gate_up "
          f"{mine.get('gdn_moe_gate_up', 0):.1f}, down {mine.get('gdn_moe_down', 0):.1f})",
          flush=True)
    return out


if __name__ == "__main__":
    main()
