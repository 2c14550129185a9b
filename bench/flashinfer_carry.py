"""Carry FlashInfer's GDN kernels to the GPU runner, which has no network (for bench/ncu_kernels.py).

FlashInfer's Hopper GDN kernels are CuTe DSL: they need `flashinfer-python` and `nvidia-cutlass-dsl`
with its libs wheels (about 160 MB of wheels; one shared library alone is 193 MB unpacked), more than
the 64 MiB a device call carries. This script builds a slim site folder holding only what the GDN
path imports, archives it and splits the archive into parts that travel in back-to-back calls:

    python bench/flashinfer_carry.py pack --out .fi            # here (needs PyPI): .fi/part-*
    # on the runner, one call per part (name the part in `carry`), the machine kept warm:
    python bench/flashinfer_carry.py stash --parts .fi          # copies the parts to /tmp/fi-parts
    python bench/flashinfer_carry.py unpack                     # reassembles into /tmp/fi-site
    eval "$(python bench/flashinfer_carry.py env)"              # PYTHONPATH for the site folder

What is kept (the runner already has torch, cuda-bindings, filelock, einops, protobuf, ...):
  flashinfer-python   its Python sources only (no data/, no prebuilt cubins); the package's
                      `__init__` and `jit/__init__` are replaced by stubs (they import every
                      FlashInfer feature and its dependencies); the GDN kernels are imported as
                      `flashinfer.gdn_kernels.<module>`, the modules sglang calls
  nvidia-cutlass-dsl  and its libs-core, libs-base, libs-cu13 wheels (the CUDA 13 flavour, as the
                      runner's driver), without the aarch64/QNX stubs
  apache-tvm-ffi      imported by flashinfer.jit.core
Nothing of it is committed: the parts live in a git-excluded folder.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

FLASHINFER = "flashinfer-python==0.7.2.post1"
CUTLASS = "4.8.1"
WHEELS = (FLASHINFER, f"nvidia-cutlass-dsl=={CUTLASS}", f"nvidia-cutlass-dsl-libs-core=={CUTLASS}",
          f"nvidia-cutlass-dsl-libs-base=={CUTLASS}", f"nvidia-cutlass-dsl-libs-cu13=={CUTLASS}",
          "apache-tvm-ffi==0.1.15.post2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_BYTES = 44 << 20  # a part plus the working tree stays under the 64 MiB a call carries
PARTS_DIR = "/tmp/fi-parts"
SITE = "/tmp/fi-site"

_INIT_STUB = '''"""Stub written by gdn-jax's bench/flashinfer_carry.py: FlashInfer's own __init__ imports
every feature and its dependencies; the GDN kernels are imported by module path instead."""
from .version import __version__, __git_version__  # noqa: F401
'''
_JIT_STUB = '''"""Stub written by gdn-jax's bench/flashinfer_carry.py (see flashinfer/__init__.py)."""
'''


def _download(dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", dest]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(WHEELS), check=True)


def _keep(name: str) -> bool:
    """Which members of the wheels go into the site folder."""
    if name.startswith("flashinfer/"):
        return name.endswith(".py") and not name.startswith("flashinfer/data/")
    if "/stubs/" in name or name.endswith(".a"):
        return False
    return not name.startswith("flashinfer_python-")


def pack(out: str, wheel_dir: str | None) -> None:
    tmp = tempfile.mkdtemp(prefix="fi-pack-")
    wheel_dir = wheel_dir or os.path.join(tmp, "wheels")
    if not glob.glob(os.path.join(wheel_dir, "flashinfer_python-*.whl")):
        _download(wheel_dir)
    site = os.path.join(tmp, "site")
    for whl in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site, [m for m in z.namelist() if _keep(m)])
    for stub, path in ((_INIT_STUB, "flashinfer/__init__.py"), (_JIT_STUB, "flashinfer/jit/__init__.py")):
        with open(os.path.join(site, path), "w") as fh:
            fh.write(stub)
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "part-*")):
        os.remove(old)
    archive = os.path.join(tmp, "fi-site.tar.xz")
    with tarfile.open(archive, "w:xz", preset=1) as tar:
        tar.add(site, arcname="fi-site")
    with open(archive, "rb") as fh:
        i = 0
        while chunk := fh.read(PART_BYTES):
            with open(os.path.join(out, f"part-{i:02d}"), "wb") as part:
                part.write(chunk)
            i += 1
    print(f"{os.path.getsize(archive) / 2**20:.1f} MiB in {i} parts under {out}")
    shutil.rmtree(tmp)


def stash(parts: str) -> None:
    os.makedirs(PARTS_DIR, exist_ok=True)
    for p in sorted(glob.glob(os.path.join(parts, "part-*"))):
        shutil.copy(p, PARTS_DIR)
    print("stashed:", sorted(os.listdir(PARTS_DIR)))


def unpack() -> None:
    parts = sorted(glob.glob(os.path.join(PARTS_DIR, "part-*")))
    if not parts:
        raise SystemExit(f"no parts under {PARTS_DIR}: stash them first")
    archive = os.path.join(PARTS_DIR, "fi-site.tar.xz")
    with open(archive, "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                shutil.copyfileobj(fh, out)
    shutil.rmtree(SITE, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(os.path.dirname(SITE))
    print(f"unpacked {len(parts)} parts into {SITE}")


def env() -> str:
    paths = [SITE, os.path.join(SITE, "nvidia_cutlass_dsl", "dsl_packages")]
    return f'export PYTHONPATH={":".join(paths)}${{PYTHONPATH:+:$PYTHONPATH}}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="download, slim and split (here, with PyPI)")
    pk.add_argument("--out", default=".fi", help="folder for the parts (git-excluded)")
    pk.add_argument("--wheels", default=None, help="folder of already downloaded wheels")
    st = sub.add_parser("stash", help=f"copy the carried parts to {PARTS_DIR} (on the runner)")
    st.add_argument("--parts", default=".fi")
    sub.add_parser("unpack", help=f"reassemble the stashed parts into {SITE} (on the runner)")
    sub.add_parser("env", help="print the PYTHONPATH export for the site folder")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.out, args.wheels)
    elif args.cmd == "stash":
        stash(args.parts)
    elif args.cmd == "unpack":
        unpack()
    else:
        print(env())


if __name__ == "__main__":
    main()
