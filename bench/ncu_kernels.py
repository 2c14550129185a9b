"""Kernel time of the GDN kernels (and fla's, side by side) from Nsight Compute, on the GPU runner.

Run under ncu, which this script starts itself:

    python bench/ncu_kernels.py --out DIR [--fla] [--fla-jax] [--quick] [--no-mosaic]
                                          [--sweep-mosaic decode,replay,intermediate]

It re-runs itself as `ncu ... python bench/ncu_kernels.py --worker`, profiling only the launches
between cudaProfilerStart/Stop (each case: compile and warm up first, then --reps launches), with
`--cache-control all --clock-control none` (caches flushed before each launch, clocks as found).
Then it maps ncu's rows back to the cases in order and writes DIR/ncu_kernels.json with each
case's median kernel duration, DRAM throughput, registers per thread and achieved occupancy, the
byte model, GB/s, and % of the copy bandwidth measured in the same run (torch `copy_`, 1 GiB).

Cases: H = 16, HV = 32, K = V = 128, bf16 inputs; B in {1, 8, 32, 128, 256}; bf16 and fp32 pools.
  decode            T = 1, nothing pending
  mosaic decode     the same call through the Mosaic GPU kernel (kernels/decode_mgpu.py), with
                    dispatch's Mosaic tuning; by default on capability >= 9.0 (--no-mosaic: off)
  replay3+T         3 pending candidates folded, then T tokens (T = 4 by default)
  intermediate T    nothing pending, T states written
  mosaic replay3+T, mosaic intermediate T
                    the same through kernels/verify_mgpu.py, with dispatch's Mosaic tuning
  fla T             fla's fused_recurrent_gated_delta_rule over T tokens from a state of the pool's
                    dtype (it writes its final state in fp32), batch-indexed, no slots
  fla-jax T         the same Triton kernel, the same flags and inputs, launched from a jitted JAX
                    program through jax-triton (bench/fla_jax.py); first checked against
                    gdn_jax.ops.reference at B = 8, T = 4 (fp32 and bf16 state; the errors go into
                    the first fla-jax case's "check"). At T = 1 jax-triton makes T a constexpr.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import io
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

H, HV, K, V = 16, 32, 128, 128
PENDING = 3
METRICS = ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active")


def cases(args):
    if args.sweep:
        return sweep_cases()
    if args.sweep_mosaic:
        return sweep_mosaic_cases(tuple(args.sweep_mosaic.split(",")),
                                  tuple(int(x) for x in args.sweep_batches.split(",")))
    batches = (args.batches or ((8, 256) if args.quick else (1, 8, 32, 128, 256)))
    out = []
    for dtype in ("bfloat16", "float32"):
        for B in batches:
            out.append(dict(impl="gdn", op="decode", B=B, T=1, dtype=dtype))
            if args.mosaic:
                out.append(dict(impl="mosaic", op="decode", B=B, T=1, dtype=dtype))
            for T in args.tokens:
                for op in ("replay", "intermediate"):
                    out.append(dict(impl="gdn", op=op, B=B, T=T, dtype=dtype))
                    if args.mosaic:
                        out.append(dict(impl="mosaic", op=op, B=B, T=T, dtype=dtype))
            for impl in ("fla",) * args.fla + ("fla-jax",) * args.fla_jax:
                for T in (1,) + tuple(args.tokens):
                    out.append(dict(impl=impl, op="fla", B=B, T=T, dtype=dtype))
    return out


def sweep_cases():
    """Tuning sweep: block_v x num_warps (x num_stages for the pending-candidate loop of replay)
    for decode and replay 3+4 at B = 32 and 256, and intermediate T = 4 at B = 256."""
    out = []
    for op in ("decode", "replay", "intermediate"):
        for dtype in ("bfloat16", "float32"):
            for B in (32, 256):
                if op == "intermediate" and (B == 32 or dtype == "float32"):
                    continue
                for bv in ((8, 16, 32, 64) if op == "decode" else (8, 16, 32)):
                    for w in (1, 2):
                        for stages in ((1, 3) if op == "replay" else (1,)):
                            out.append(dict(impl="gdn", op=op, B=B, T=1 if op == "decode" else 4,
                                            dtype=dtype, block_v=bv, num_warps=w,
                                            num_stages=stages))
    return out


def sweep_mosaic_cases(ops=("decode", "replay", "intermediate"), batches=(32, 256)):
    """Tuning sweep of the Mosaic GPU kernels: block_v x tiles_per_cta x stages for decode,
    replay 3+4 and intermediate T = 4 at B = 32 and 256, with the Triton kernel (dispatch's
    tuning) first in each group as the baseline."""
    out = []
    for op in ops:
        T = 1 if op == "decode" else 4
        for dtype in ("bfloat16", "float32"):
            for B in batches:
                out.append(dict(impl="gdn", op=op, B=B, T=T, dtype=dtype))
                for bv in (64, 128):
                    for per in (1, 2, 4, 8) if op == "decode" else (1, 2, 4):
                        for stages in (2, 3):
                            out.append(dict(impl="mosaic", op=op, B=B, T=T, dtype=dtype,
                                            block_v=bv, tiles_per_cta=per, stages=stages))
    return out


def byte_model(c):
    """Unique bytes a perfect kernel moves: state once in and once out (or T times out), I/O."""
    sb = 2 if c["dtype"] == "bfloat16" else 4
    B, T = c["B"], c["T"]
    state = B * HV * V * K * sb
    tokens = B * T * (2 * H * K + HV * V + 2 * HV) * 2 + B * T * HV * V * 2  # q,k,v,a,b in; o out
    if c["op"] == "intermediate":
        return state + T * state + tokens
    if c["op"] == "replay":
        pend = B * PENDING * (H * K + HV * V) * 2 + B * PENDING * HV * 8
        return 2 * state + tokens + pend
    if c["op"] == "fla":  # reads the state in its dtype, writes fp32
        return state + B * HV * V * K * 4 + tokens
    return 2 * state + tokens


def _profiler(on: bool):
    """cudaProfilerStart/Stop: ncu runs with --profile-from-start off, so only these launches."""
    import torch

    (torch.cuda.profiler.start if on else torch.cuda.profiler.stop)()


def worker(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from gdn_jax import kernels, ops
    from gdn_jax.ops import dispatch

    rng = np.random.default_rng(0)
    results = []
    fla_jax_check = None  # None: not run yet; else the check's result or its error
    for c in cases(args):
        B, T, dtype = c["B"], c["T"], jnp.dtype(c["dtype"])
        mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(jnp.bfloat16)
        q, k, v, a, b = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, HV, V), mk(B, T, HV), mk(B, T, HV)
        A_log = jnp.asarray(rng.uniform(-3, 0.5, HV), jnp.float32)
        dt = jnp.asarray(rng.standard_normal(HV), jnp.float32)
        if c["impl"] == "fla":
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            t = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()
            tq, tk, tv, ta, tb = (t(x).bfloat16() for x in (q, k, v, a, b))
            tdt = torch.bfloat16 if c["dtype"] == "bfloat16" else torch.float32
            h0 = (0.3 * torch.randn(B, HV, V, K, device="cuda")).to(tdt)

            def run():  # gating, sigmoid and l2norm fused, V-first state: our layout and work
                return fused_recurrent_gated_delta_rule(
                    tq, tk, tv, ta, beta=tb, initial_state=h0, output_final_state=True,
                    use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=t(A_log),
                    dt_bias=t(dt), use_beta_sigmoid_in_kernel=True, state_v_first=True)
            try:
                for _ in range(2):
                    run()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - fla or Triton cannot run here: record it
                c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                results.append(c)
                continue
            _profiler(True)
            for _ in range(args.reps):
                run()
            torch.cuda.synchronize()
            _profiler(False)
            results.append(c)
            continue
        if c["impl"] == "fla-jax":
            from fla_jax import check_against_reference, fla_decode_jax

            if fla_jax_check is None:  # once, before the first timing, outside the profiled range
                try:
                    fla_jax_check = [check_against_reference(state_dtype=d)
                                     for d in ("float32", "bfloat16")]
                    c["check"] = fla_jax_check
                except Exception as e:  # noqa: BLE001 - a wrong or failing kernel: time nothing
                    fla_jax_check = f"check failed: {type(e).__name__}: {str(e)[:300]}"
                print(f"fla-jax vs gdn_jax.ops.reference: {fla_jax_check}", flush=True)
            if isinstance(fla_jax_check, str):
                c["error"] = fla_jax_check
                results.append(c)
                continue
            h0 = (0.3 * jax.random.normal(jax.random.key(1), (B, HV, V, K))).astype(dtype)
            f = jax.jit(fla_decode_jax)  # as the torch case: h0 only read, ht a new fp32 array
            fargs = (q, k, v, a, b, A_log, dt, h0)
            for _ in range(2):
                jax.block_until_ready(f(*fargs))
            _profiler(True)
            for _ in range(args.reps):
                jax.block_until_ready(f(*fargs))
            _profiler(False)
            results.append(c)
            continue
        st = ops.GDNState.create(B, H, HV, K, V, 8, dtype=dtype, input_dtype=jnp.bfloat16)
        st = st.replace(pool=(0.3 * jax.random.normal(jax.random.key(1), st.pool.shape)).astype(dtype),
                        cand_k=mk(B, 8, H, K), cand_v=mk(B, 8, HV, V),
                        cand_g=jnp.full((B, 8, HV), -0.1, jnp.float32),
                        cand_beta=jnp.full((B, 8, HV), 0.5, jnp.float32),
                        count=jnp.full((B,), PENDING if c["op"] == "replay" else 0, jnp.int32))
        slots = jnp.asarray(rng.permutation(B), jnp.int32)
        keys = ("block_v", "tiles_per_cta", "stages", "num_warps", "num_stages", "form")
        cfg = {key: c[key] for key in keys if key in c}
        if not cfg:
            cfg = dataclasses.asdict(dispatch.tuning(
                c["op"] if c["op"] == "decode" else "verify", state_dtype=dtype, B=B, V=V,
                backend="mosaic" if c["impl"] == "mosaic" else "triton",
                mode=None if c["op"] == "decode" else c["op"]))
        c.update(cfg)
        config = (kernels.MosaicConfig if c["impl"] == "mosaic" else kernels.TuningConfig)(
            **{key: val for key, val in cfg.items() if key != "form"})
        kernel = {"decode": kernels.decode, "replay": kernels.verify_replay,
                  "intermediate": kernels.verify_intermediate}[c["op"]]
        if c["impl"] == "mosaic":
            kernel = {"decode": kernels.decode_mgpu, "replay": kernels.verify_replay_mgpu,
                      "intermediate": kernels.verify_intermediate_mgpu}[c["op"]]
        toks = (q, k, v, a, b, A_log, dt)
        pend = (st.cand_k, st.cand_v, st.cand_g, st.cand_beta, st.count)
        if c["op"] == "intermediate":  # pool only read; inter is the output
            f = jax.jit(lambda pool: (pool, kernel(*toks, pool, *pend, slots, config=config)[1][0, 0, 0, 0]))
        else:
            f = jax.jit(lambda pool: (kernel(*toks, pool, *pend, slots, config=config)[1], 0),
                        donate_argnums=0)
        pool = st.pool
        try:
            pool, _ = jax.block_until_ready(f(pool))
        except Exception as e:  # noqa: BLE001 - a config that does not compile: record, go on
            c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results.append(c)
            continue
        _profiler(True)
        for _ in range(args.reps):
            pool, _ = jax.block_until_ready(f(pool))
        _profiler(False)
        results.append(c)
    with open(os.path.join(args.out, "ncu_cases.json"), "w") as fh:
        json.dump(results, fh)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for ncu_kernels.json and the raw CSV")
    p.add_argument("--fla", action="store_true", help="also profile fla's fused_recurrent kernel")
    p.add_argument("--fla-jax", action="store_true",
                   help="also profile fla's kernel launched from JAX through jax-triton "
                        "(bench/fla_jax.py), after a check against the XLA reference")
    p.add_argument("--quick", action="store_true", help="B in {8, 256} only")
    p.add_argument("--batches", default=None,
                   help="B values of the standard cases, comma-separated (overrides --quick)")
    p.add_argument("--tokens", default="4", help="verify T values, comma-separated (default 4)")
    p.add_argument("--reps", type=int, default=3, help="profiled launches per case (median)")
    p.add_argument("--sweep", action="store_true",
                   help="tuning sweep (block_v x num_warps) instead of the standard cases")
    p.add_argument("--no-mosaic", dest="mosaic", action="store_false",
                   help="leave out the Mosaic GPU kernels (on by default where they can run)")
    p.add_argument("--sweep-mosaic", default=None, metavar="OPS",
                   help="tuning sweep of the Mosaic GPU kernels (block_v x tiles_per_cta x "
                        "stages) for OPS, comma-separated of decode, replay, intermediate, "
                        "instead of the standard cases")
    p.add_argument("--sweep-batches", default="32,256",
                   help="B values of --sweep-mosaic, comma-separated (default 32,256)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = tuple(int(x) for x in args.tokens.split(","))
    args.batches = args.batches and tuple(int(x) for x in args.batches.split(","))
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)

    import jax
    import torch

    from gdn_jax.ops import dispatch

    if args.fla_jax:
        from fla_jax import why_unavailable

        why = why_unavailable()
        if why is not None:
            print(f"fla through jax-triton left out: {why}", flush=True)
            args.fla_jax = False
    why = dispatch.why_not("mosaic", dispatch.Device.of(), "decode", 1, K=K, V=V)
    if args.mosaic and why is not None:
        print(f"Mosaic GPU decode left out: {why}", flush=True)
        args.mosaic = False

    from bench_kernels import copy_bandwidth  # one copy-bandwidth method for every bench

    bw = copy_bandwidth(1.0, smoke=False)["GBps"]
    torch.cuda.empty_cache()
    raw = os.path.join(args.out, "ncu_raw.csv")
    cmd = ["ncu", "--cache-control", "all", "--clock-control", "none", "--profile-from-start",
           "off", "--kernel-name", "regex:gdn_|fused_recurrent", "--metrics", ",".join(METRICS),
           "--csv", "--page", "raw", "--log-file", raw,
           sys.executable, os.path.abspath(__file__), "--worker", "--out", args.out,
           "--tokens", ",".join(map(str, args.tokens)), "--reps", str(args.reps)]
    cmd += ["--fla"] * args.fla + ["--fla-jax"] * args.fla_jax + ["--quick"] * args.quick + ["--sweep"] * args.sweep
    if args.batches:
        cmd += ["--batches", ",".join(map(str, args.batches))]
    cmd += ["--no-mosaic"] * (not args.mosaic)
    if args.sweep_mosaic:
        cmd += ["--sweep-mosaic", args.sweep_mosaic, "--sweep-batches", args.sweep_batches]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(args.out, "ncu_cases.json")) as fh:
        done = json.load(fh)
    text = open(raw).read()
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    rows = [r for r in rows if r.get("Kernel Name") and not r["ID"].startswith("=")]
    rows = [r for r in rows if r["ID"].isdigit()]
    table = []
    ran = [c for c in done if "error" not in c]
    if len(rows) != len(ran) * args.reps:
        raise SystemExit(f"{len(rows)} profiled launches for {len(ran)} cases x {args.reps}: "
                         "cannot map them; see ncu_raw.csv")
    for c in done:
        if "error" in c:
            table.append(c)
    for i, c in enumerate(ran):
        mine = rows[i * args.reps:(i + 1) * args.reps]
        num = lambda key: statistics.median(float(r[key].replace(",", "")) for r in mine)
        dur_ns = num("gpu__time_duration.sum")
        nbytes = byte_model(c)
        c.update(kernel=mine[0]["Kernel Name"][:60], kernel_us=dur_ns / 1e3,
                 dram_pct=num(METRICS[1]), regs=num(METRICS[2]), occupancy_pct=num(METRICS[3]),
                 bytes=nbytes, GBps=nbytes / dur_ns, pct_copy=100 * nbytes / dur_ns / bw)
        table.append(c)
    dev = jax.devices()[0]
    result = dict(device=dev.device_kind, capability=getattr(dev, "compute_capability", None),
                  jax=jax.__version__, copy_GBps=bw, copy_method="torch copy_ 1 GiB fp32, read+write",
                  ncu="--cache-control all --clock-control none", reps=args.reps, cases=table)
    with open(os.path.join(args.out, "ncu_kernels.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{dev.device_kind}, jax {jax.__version__}, copy {bw:.0f} GB/s")
    print(f"{'cfg':11s} {'impl':7s} {'op':13s} {'dtype':9s} {'B':>4s} {'T':>2s} {'kernel us':>10s} "
          f"{'GB/s':>6s} {'%copy':>6s} {'dram%':>6s} {'regs':>5s} {'occ%':>5s}")
    for c in table:
        if "error" in c:
            print(f"{c['impl']:7s} {c['op']:13s} {c['dtype']:9s} {c['B']:4d} {c.get('block_v')} "
                  f"{c.get('num_warps', c.get('tiles_per_cta'))}: {c['error'][:80]}")
            continue
        if "tiles_per_cta" in c:
            cfg = f"bv{c['block_v']}t{c['tiles_per_cta']}s{c['stages']}"
        elif "block_v" in c:
            cfg = f"bv{c['block_v']}w{c['num_warps']}s{c.get('num_stages', 1)}"
        else:
            cfg = ""
        print(f"{cfg:11s} {c['impl']:7s} {c['op']:13s} {c['dtype']:9s} {c['B']:4d} {c['T']:2d} "
              f"{c['kernel_us']:10.1f} {c['GBps']:6.0f} {c['pct_copy']:6.1f} {c['dram_pct']:6.1f} "
              f"{c['regs']:5.0f} {c['occupancy_pct']:5.1f}")


if __name__ == "__main__":
    main()
