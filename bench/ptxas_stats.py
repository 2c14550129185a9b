"""Registers, spills, dots and layout conversions of a Pallas-Triton kernel, compiled offline.

    python bench/ptxas_stats.py [--kernel ring|decode|replay|intermediate] [--pool bfloat16]
                                [--block-v 128] [--num-warps 4] [--T 4] [--arch 90]
    python bench/ptxas_stats.py --kernel projection|projection-group|projection-group-128|
                                projection-swiglu|projection-gated-norm|moe-gate-up|moe-down|
                                moe-b1-gate-up|moe-b1-down|attention|conv|in-proj|
                                projection-conv|projection-glu|gated-norm [--T 4] [--gemv]
                                [--pdl]
        (the model's kernels at the Qwen3.5 shapes, with the configs gdn_jax.ops picks; --gemv:
        the one-row projections as a GEMV)

No GPU needed: the kernel is lowered for CUDA on this machine (an abstract H100, as the lowering
tests do), its Triton IR is printed by jax's own MLIR (jax's Triton dialect), parsed by the pip
`triton` package (`pip install triton`; 3.6 was used), taken through Triton's ttir -> ttgir ->
llir -> ptx stages and assembled by the ptxas it ships (`ptxas -v`). It prints what decides a
latency-bound kernel's occupancy before any device time is spent: registers per thread, spill
bytes, the number of `tt.dot` and `ttg.convert_layout` ops, and the async copies of the
software-pipelined loads (2026-12-05: none in the one-row GEMV form, whose loop has no tt.dot,
until the loop said its stages: Pallas's loops carry no `tt.num_stages`, without which Triton
pipelines only a dot's operands; `kernels._pallas.pipelined_fori_loop`).
--pdl checks the launch trigger (`gdn_jax.kernels._pallas`, PDL): with a stand-in for the wait
XLA puts first in each kernel, whether every global load of the PTX comes after that wait
(2026-12-06: every kernel here, `wait_before_loads True`:
bench/results/ptxas_stats-sm90-pdl_order-2026-12-06.log).
XLA's own Triton may schedule a little differently (2026-12-01: ring bv128 w4 255 registers here
and in ncu on the H200, replay bv16 w1 128 in both, decode bv32 w1 227 here against 168 there);
the runner's ncu `launch__registers_per_thread` is the final word.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_ir(fn, args, **kwargs) -> list[str]:
    """The Triton IR (MLIR text) of every Triton custom call in fn's CUDA lowering."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh

    sys.path.insert(0, ROOT)
    from gdn_jax.kernels import _pallas

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    return _pallas.triton_ir(lowered)


def compile_stats(ir: str, num_warps: int, arch: int = 90, num_stages: int = 1) -> dict:
    """ir: the Triton IR text of jax's Pallas-Triton lowering (`triton_ir`) -> ptxas -v
    figures."""
    import triton
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget, Language
    from triton.backends.nvidia.compiler import CUDABackend

    text = re.sub(r"^module @[\w.]+", "module", ir, count=1)  # pip triton reads the text
    work = tempfile.mkdtemp()
    path = os.path.join(work, "kernel.ttir")
    with open(path, "w") as fh:
        fh.write(text)
    ctx = tir.context()
    tir.load_dialects(ctx)
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    backend.load_dialects(ctx)
    module = tir.parse_mlir_module(path, ctx)
    module.context = ctx
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    src, metadata, out = module, {}, {}
    for name, stage in stages.items():
        if name == "cubin":
            break
        src = stage(src, metadata)
        if name == "ttgir":
            ttgir = str(src)
            # async_copies: the loop's loads software-pipelined (none: each step waits on its
            # loads; Triton pipelines a loop without a tt.dot only where the loop says its stages)
            out.update(dots=ttgir.count("tt.dot"), convert_layouts=ttgir.count("ttg.convert_layout"),
                       local_allocs=ttgir.count("ttg.local_alloc"),
                       async_copies=ttgir.count("ttg.async_copy_global_to_local"))
    # the tensor-core form: wgmma (Hopper's, asynchronous) or mma.sync (Ampere's, in SM90 too)
    out.update(wgmma=src.count("wgmma.mma_async"), mma_sync=src.count("mma.sync"))
    if "griddepcontrol.wait" in src:  # --pdl: does any global load come before the wait?
        loads = [m.start() for m in re.finditer(r"\b(ld\.global|cp\.async\.c)", src)]
        out.update(wait_before_loads=not loads or src.index("griddepcontrol.wait") < min(loads))
    ptx = os.path.join(work, "kernel.ptx")
    with open(ptx, "w") as fh:
        fh.write(src)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o",
                          os.path.join(work, "kernel.cubin")], capture_output=True, text=True)
    log = run.stdout + run.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None
    out.update(shared=metadata.get("shared"), registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
               spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))
    return out


def kernel_call(kernel: str, pool: str, T: int, block_v: int, num_warps: int):
    """(fn, args, kwargs) of one kernel at the benchmark's shapes (H = 16, HV = 32, K = V = 128)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from gdn_jax import kernels

    B, H, HV, K, V, N = 8, 16, 32, 128, 128, 12
    W = 16 if kernel != "ring" or T <= 8 else 32
    W = W if kernel == "ring" else 8
    T = 1 if kernel == "decode" else T
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    args = (S((B, T, H, K), bf), S((B, T, H, K), bf), S((B, T, HV, V), bf), S((B, T, HV), bf),
            S((B, T, HV), bf), S((HV,), f32), S((HV,), f32), S((N, HV, V, K), jnp.dtype(pool)),
            S((N, W, H, K), bf), S((N, W, HV, V), f32 if kernel == "ring" else bf),
            S((N, W, HV), f32), S((N, W, HV), f32),
            S((N,), jnp.int32), S((B,), jnp.int32))
    fn = {"ring": kernels.verify_ring, "decode": kernels.decode,
          "replay": kernels.verify_replay, "intermediate": kernels.verify_intermediate}[kernel]
    kwargs = dict(config=kernels.TuningConfig(block_v, num_warps))
    if kernel == "ring":
        kwargs.update(reserve=T)
    return fn, args, kwargs


MODEL_KERNELS = ("projection", "projection-group", "projection-group-128", "projection-swiglu",
                 "projection-gated-norm", "moe-gate-up", "moe-down", "moe-b1-gate-up",
                 "moe-b1-down", "attention", "conv", "in-proj", "projection-conv", "projection-glu",
                 "gated-norm")


def model_kernel_call(kernel: str, T: int, gemv: bool = False):
    """(fn, args, kwargs, config) of one of the model's kernels at Qwen3.5 shapes: the out_proj
    at one row (plain; or GDN's, its output norm in the launch), the MLP down at one row with
    silu * up formed from the gate / up group's two partial sums, the 35B-A3B experts (256,
    top 8) at B = 8 (and at B = 1, the shared expert folded),
    attention at B = 32 over 4K. gemv: the projections' config as a GEMV."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from gdn_jax import kernels
    from gdn_jax.ops import attention, moe, projection

    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    def one_row(K, N):
        return dataclasses.replace(projection.config_for(1, K, N), gemv=gemv)

    if kernel == "projection":
        return kernels.project, (S((1, 4096), bf), S((4096, 2048), bf)), {}, one_row(4096, 2048)
    if kernel == "projection-swiglu":
        return (kernels.project_swiglu, (S((2, 1, 10240), jnp.float32), S((5120, 2048), bf)), {},
                one_row(5120, 2048))
    if kernel == "projection-gated-norm":  # z: in_proj's two partial sums, from column 8192
        return (kernels.project_gated_norm, (S((1, 4096), bf), S((2, 1, 12352), jnp.float32),
                                             S((128,), bf), S((4096, 2048), bf)),
                dict(eps=1e-6, z_col=8192), one_row(4096, 2048))
    if kernel == "gated-norm":  # GDN's output norm of a B = 32 verify (T x 32 rows), z in place
        from gdn_jax.ops import residual_norm
        return (kernels.gated_rms_norm, (S((32 * T, 4096), bf), S((1, 32 * T, 12352), bf),
                                         S((128,), bf)),  # unsplit in_proj: bf16
                dict(eps=1e-6, z_col=8192), residual_norm.gated_config(32 * T * 32))
    if kernel == "projection-group":  # attention q / k / v of one row, one launch
        widths = (8192, 512, 512)
        config = dataclasses.replace(projection.config_for(1, 2048, widths), gemv=gemv)
        return (kernels.project_group, (S((1, 2048), bf), tuple(S((2048, n), bf) for n in widths)),
                {}, config)
    if kernel == "projection-group-128":  # the MLP gate / up of a B = 32 verify
        args = (S((128, 2048), bf), (S((2048, 5120), bf),) * 2)
        return kernels.project_group, args, {}, projection.config_for(128, 2048, (5120, 5120))
    if kernel in ("in-proj", "projection-conv"):  # GDN's in_proj of one row's T tokens: alone,
        widths = (12288, 64)               # or its conv in the launch (GDN_JAX_CONV_EPILOGUE)
        args = (S((T, 2048), bf), tuple(S((2048, n), bf) for n in widths))
        if kernel == "in-proj":
            return (kernels.project_group, args, dict(partials=True),
                    dataclasses.replace(projection.config_for(T, 2048, widths), gemv=gemv))
        config = dataclasses.replace(projection.epilogue_config(T, 2048, widths, bf,
                                                                backend="interpret")[0], gemv=gemv)
        return (kernels.project_conv, (*args, S((40, 3 + T, 8192), bf), S((4, 8192), bf),
                                       S((1,), jnp.int32)),
                dict(widths=(2048, 2048, 4096, 4096, 32, 32), tokens=T,
                     keep="window" if T == 1 else "all"), config)
    if kernel == "projection-glu":  # the MLP's gate / up and silu * up of T rows, one launch
        config = dataclasses.replace(projection.epilogue_config(
            T, 2048, (5120, 5120), bf, backend="interpret", weights=2)[0], gemv=gemv)
        w = S((2048, 5120), bf)
        return kernels.project_glu, (S((T, 2048), bf), w, w), {}, config
    if kernel == "conv":  # the GDN conv of B = 32 rows: decode (T = 1) or verify
        config = kernels.ConvConfig()
        keep = "window" if T == 1 else "all"
        return (kernels.conv_step, (S((32, T, 8192), bf), S((40, 3 + T, 8192), bf),
                                    S((4, 8192), bf), S((32,), jnp.int32)),
                dict(widths=(2048, 2048, 4096), keep=keep), config)
    if kernel.startswith("moe-b1"):  # B = 1 decode, the shared expert folded (ops.moe.routed)
        E, H, I, k = 256, 2048, 512, 8
        up, down = moe.default_configs(k, 1, E, H, I, shared=True)
        rows = (k + 1) * up.block_m
        if kernel == "moe-b1-gate-up":
            return (kernels.grouped_matmul, (S((1, H), bf), S((E, H, I), bf), S((k,), jnp.int32)),
                    dict(w_up=S((E, H, I), bf), row_token=S((rows,), jnp.int32),
                         w_shared=S((H, I), bf), w_up_shared=S((H, I), bf), shared_blocks=1), up)
        return (kernels.grouped_matmul, (S((rows, I), bf), S((E, I, H), bf), S((k,), jnp.int32)),
                dict(w_shared=S((I, H), bf), shared_blocks=1), down)
    if kernel.startswith("moe"):
        pairs, E = 8 * 8, 256
        K, N = (2048, 512) if kernel == "moe-gate-up" else (512, 2048)
        config = moe.config_for(pairs, E, K, N)
        G = kernels.moe.num_blocks(pairs, E, config.block_m)
        w = S((E, K, N), bf)
        rows = G * config.block_m
        if kernel == "moe-gate-up":  # as ops.moe runs it: the block rows gathered from 8 tokens
            kwargs = dict(w_up=w, row_token=S((rows,), jnp.int32))
            x = S((pairs // 8, K), bf)
        else:
            kwargs, x = {}, S((rows, K), bf)
        return kernels.grouped_matmul, (x, w, S((G,), jnp.int32)), kwargs, config
    B, L = 32, 4096
    config = attention.config_for(B, 2, L, T * 8)
    cache = S((B + 8, L, 2, 256), bf)
    return (kernels.decode_attention, (S((B, T, 16, 256), bf), cache, cache,
                                       S((B,), jnp.int32), S((B, T), jnp.int32)), {}, config)


def _stand_in_wait():
    """XLA puts `griddepcontrol.wait` first in each Triton kernel when it compiles it for a Hopper
    GPU (PDL): here the launch trigger's Triton rule emits that wait before the trigger."""
    from gdn_jax.kernels import _pallas

    _pallas.trigger_rule("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;")
    os.environ[_pallas.TRIGGER_VAR] = "early"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="ring",
                   choices=("ring", "decode", "replay", "intermediate") + MODEL_KERNELS)
    p.add_argument("--pool", default="bfloat16", help="the pool's dtype")
    p.add_argument("--T", type=int, default=4, help="tokens per call (verify)")
    p.add_argument("--block-v", type=int, default=128)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--arch", type=int, default=90, help="SM version for ptxas (90: Hopper)")
    p.add_argument("--gemv", action="store_true", help="one-row projections as a GEMV")
    p.add_argument("--pdl", action="store_true",
                   help="put a stand-in for XLA's griddepcontrol.wait first in each kernel, with "
                        "the launch trigger (kernels._pallas), and say whether every global load "
                        "of the PTX comes after it")
    args = p.parse_args(argv)
    if args.pdl:
        _stand_in_wait()
    if args.kernel in MODEL_KERNELS:
        fn, call_args, kwargs, config = model_kernel_call(args.kernel, args.T, args.gemv)
        for ir in triton_ir(fn, call_args, config=config, **kwargs):
            stats = compile_stats(ir, config.num_warps, args.arch, config.num_stages)
            print(f"{args.kernel} {config}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        return
    fn, call_args, kwargs = kernel_call(args.kernel, args.pool, args.T, args.block_v,
                                        args.num_warps)
    T = call_args[0].shape[1]
    for ir in triton_ir(fn, call_args, **kwargs):
        stats = compile_stats(ir, args.num_warps, args.arch)
        print(f"{args.kernel} pool {args.pool} T {T} block_v {args.block_v} warps "
              f"{args.num_warps}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
