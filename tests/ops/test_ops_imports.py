"""The ops use the kernels through their public face only (`gdn_jax.kernels.__init__`)."""

from __future__ import annotations

import ast
import pathlib

import gdn_jax.ops

OPS = pathlib.Path(gdn_jax.ops.__file__).parent


def _private_kernel_imports(path: pathlib.Path):
    """(line, what) for every import of a private kernels module, or of a private name from
    the kernels package, in the source at `path`."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if "kernels" in parts:
                after = parts[parts.index("kernels") + 1:]
                if any(p.startswith("_") for p in after):
                    bad.append((node.lineno, name))
    return bad


def test_ops_import_no_private_kernel_module():
    sources = sorted(OPS.glob("*.py"))
    assert len(sources) > 5
    bad = {p.name: b for p in sources if (b := _private_kernel_imports(p))}
    assert not bad, f"gdn_jax.ops imports private kernel modules: {bad}"


def test_the_check_itself_sees_a_private_import(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from gdn_jax.kernels._common import Dims\nfrom gdn_jax import kernels\n"
                   "import gdn_jax.kernels._mgpu as mg\nfrom gdn_jax.kernels import _mgpu\n")
    assert [n for _, n in _private_kernel_imports(src)] == [
        "gdn_jax.kernels._common", "gdn_jax.kernels._common.Dims", "gdn_jax.kernels._mgpu",
        "gdn_jax.kernels._mgpu"]
