"""What ptxas says of the project's Mosaic GPU kernels, on a machine with no GPU: registers, spills
and its performance warnings (C7515: wgmmas serialized; C7519: warpgroup.arrive injected), for
Hopper (sm_90a) by default.

The lowering tests lower every Mosaic GPU kernel for CUDA on the CPU; this script runs them
(pytest, in this process), then hands each Mosaic GPU module they lowered to the CUDA plugin's
compiler (`MosaicGpuCompile`, as JAX's own `as_torch_gpu_kernel` does) with
MOSAIC_GPU_DUMP_PTXAS=1. The compiler asks the driver only which GPU it compiles for: where no
libcuda is installed, a stub driver (built here with the C compiler) answers the compute
capability asked for (`--cc`), so the module goes through PTX and ptxas, and its load, the last
step, fails as it must. On the runner the real driver answers (the runner's own GPU).

Needs the CUDA plugin's compiler: a Python with `jax[cuda13]` (or cuda12), e.g. jax 0.11.2 on
Python 3.12 here (pip install "jax[cuda13]==0.11.2" flax), plus a C compiler where there is no
libcuda. 2026-12-06: it found C7515 in the 128-row projection kernel of 06c0273 (gate / up at 57%
of copy on an H100, bench/results/probe_stream-h100-*) and none in 688a155's. `--sass` counts each
kernel's SASS instructions (nvdisasm, from pip's nvidia-cuda-nvdisasm, beside ptxas): an
issue-bound kernel's form can be compared without a GPU (2026-12-07: the T = 4 ring kernel,
2832 -> 2704 instructions, FFMA 296 -> 168, with its ring part in the token groups' layout).

    python bench/ptxas_report.py            # every kernel the lowering tests lower
    python bench/ptxas_report.py -k projection_mgpu --out /tmp/ptxas   # some; JSON too
    python bench/ptxas_report.py -k verify_ring_mgpu --sass            # + SASS counts
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # lowering only: no backend of the plugin's
os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"

TESTS = ("tests/kernels/test_kernel_lowering.py", "tests/kernels/test_kernel_projection_mgpu.py")
_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The driver calls the compiler makes before PTX (the device, its compute capability) answered;
# every other entry point, the module's load included, is absent or fails.
_STUB = r"""
typedef int CUresult;
static int major_ = %d, minor_ = %d, ctx_;
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub driver: no GPU"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "STUB_DRIVER"; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = &ctx_; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuDeviceGet(int *d, int o) { *d = 0; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int d) {  /* 75, 76: CC major, minor */
  *v = attr == 75 ? major_ : attr == 76 ? minor_ : 0; return 0; }
CUresult cuModuleLoadData(void **m, const void *image) { return 999; }
CUresult cuModuleLoadDataEx(void **m, const void *image, unsigned n, void *o, void **v) {
  return 999; }
"""


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", default="", help="pytest -k: which lowering tests (default: all)")
    p.add_argument("--tests", default=",".join(TESTS), help="the test files, comma-separated")
    p.add_argument("--cc", default="9.0", help="compute capability the stub driver answers")
    p.add_argument("--out", help="a folder for ptxas_report.json")
    p.add_argument("--full", action="store_true", help="print ptxas's whole output")
    p.add_argument("--sass", action="store_true",
                   help="also count each kernel's SASS instructions, by opcode (needs nvdisasm "
                        "beside ptxas: pip install nvidia-cuda-nvdisasm)")
    return p.parse_args()


def _compiler():
    """The CUDA plugin's `MosaicGpuCompile`, or raise saying what is missing."""
    for name in ("xla_cuda13", "xla_cuda12"):
        try:
            plugin = __import__(f"jax_plugins.{name}", fromlist=["_get_library_path"])
            break
        except ImportError:
            continue
    else:
        raise SystemExit("ptxas_report: no CUDA plugin (jax_plugins.xla_cuda13 / 12): install "
                         "jax[cuda13] in a Python >= 3.11 environment to compile Mosaic modules")
    compile_fn = ctypes.CDLL(plugin._get_library_path()).MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_fn.restype = ctypes.POINTER(ctypes.c_void_p)
    return compile_fn


def _stub_driver(cc: str, folder: pathlib.Path):
    """Load a stub libcuda.so.1 answering compute capability `cc`, where no driver is
    installed: the plugin's dlopen("libcuda.so.1") then finds it by its soname."""
    if ctypes.util.find_library("cuda"):
        return "the installed driver"
    major, minor = (int(n) for n in cc.split("."))
    src, lib = folder / "stub_cuda.c", folder / "libcuda.so.1"
    src.write_text(_STUB % (major, minor))
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                    "-o", str(lib), str(src)], check=True)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return f"a stub driver answering compute capability {cc}"


def _compile_capturing(compile_fn, module: bytes, scratch: pathlib.Path) -> str:
    """What the compiler printed (its own stdout / stderr, not Python's) compiling `module`."""
    log = scratch / "compile.log"
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            compile_fn(ctypes.c_char_p(module), ctypes.c_int(len(module)))
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    return log.read_text(errors="replace")


def _summary(text: str) -> list[dict]:
    """A row per function ptxas compiled: registers, spill bytes and its warning codes."""
    rows = {}
    for m in re.finditer(r"Compiling entry function '(\w+)' for '(\w+)'", text):
        rows[m[1]] = {"function": m[1], "arch": m[2], "registers": None, "spill_bytes": 0,
                      "warnings": []}
    for m in re.finditer(r"\((C\d{4})\)[^\n]*?function '(\w+)'", text):
        rows.setdefault(m[2], {"function": m[2], "warnings": []})["warnings"].append(m[1])
    for m in re.finditer(r"Function properties for (\w+)\n(?:[^\n]*\n)*?[^\n]*Used (\d+) "
                         r"registers", text):
        rows[m[1]]["registers"] = int(m[2])
    for m in re.finditer(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", text):
        rows[m[1]]["spill_bytes"] = int(m[2]) + int(m[3])
    return list(rows.values())


def _sass_counts(text: str) -> dict[str, dict]:
    """Per function in a MOSAIC_GPU_DUMP_SASS listing: its instruction count and the commonest
    opcodes (static: a loop's body once, a branch's both sides)."""
    counts = {}
    parts = re.split(r"//-+ \.text\.(\w+) -+", text)
    for name, body in zip(parts[1::2], parts[2::2]):
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body)
        top = sorted(set(ops), key=lambda o: -ops.count(o))[:8]
        counts[name] = {"instructions": len(ops), "opcodes": {o: ops.count(o) for o in top}}
    return counts


def main():
    args = _parse()
    compile_fn = _compiler()
    if args.sass:
        os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"  # read by the compiler at each compile
    import pytest
    from jax.experimental.mosaic.gpu import core

    os.chdir(_ROOT)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "lowering", "-k", args.k,
                        *args.tests.split(",")])
    if code not in (0, 5):
        print(f"ptxas_report: the lowering tests failed (pytest exit {code}); reporting the "
              f"modules they lowered")
    modules = list(core.KNOWN_KERNELS.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        driver = _stub_driver(args.cc, pathlib.Path(tmp))
        print(f"\n{len(modules)} Mosaic GPU modules, compiled with {driver}")
        for module in modules:
            text = _compile_capturing(compile_fn, module, pathlib.Path(tmp))
            if args.full:
                print(text)
            found, sass = _summary(text), _sass_counts(text)
            for row in found:
                row.update(sass.get(row["function"], {}))
            if not found:
                err = next((line for line in text.splitlines() if "rror" in line), text[-200:])
                found = [{"function": "?", "error": err.strip()}]
            rows += found
    print(f"{'function':48} {'arch':>7} {'regs':>5} {'spill':>6}  warnings")
    for r in rows:
        if "error" in r:
            print(f"{r['function']:48} did not compile: {r['error'][:120]}")
            continue
        print(f"{r['function'][:48]:48} {r.get('arch', ''):>7} {r.get('registers') or '':>5} "
              f"{r.get('spill_bytes', 0):>6}  {' '.join(sorted(set(r['warnings'])))}")
        if "instructions" in r:
            print(f"    {r['instructions']} SASS instructions: "
                  + ", ".join(f"{o} {n}" for o, n in r["opcodes"].items()))
    if args.out:
        import jax
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ptxas_report.json").write_text(json.dumps(
            {"jax": jax.__version__, "cc": args.cc, "driver": driver, "k": args.k,
             "kernels": rows}, indent=1))


if __name__ == "__main__":
    main()
