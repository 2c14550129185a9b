"""A/B two versions of a module in one runner call: put this directory on PYTHONPATH and name the
swap in GDN_JAX_AB_SWAP, and any script (a benchmark, pytest, ncu's worker) runs with that module
replaced by the given file:

    GDN_JAX_AB_SWAP=gdn_jax.kernels._ring_wy_mgpu=devtmp/old_ring_wy_mgpu.py \\
        PYTHONPATH=bench/ab python bench/ncu_kernels.py --out $OUT/old ...

(`git show main:kernels/_ring_wy_mgpu.py > devtmp/old_ring_wy_mgpu.py` makes the file.) The file
is loaded as a module of the same package (its relative imports resolve there), the package
itself is imported first, and every imported module that holds the original module as an
attribute gets the replacement; names imported by value (`from m import X`) keep the original's.
Several swaps: comma-separated. A line on stderr says what was swapped. Python runs this file at
start-up (the `site` module's sitecustomize hook) only when its directory is on PYTHONPATH.
"""

import os

if os.environ.get("GDN_JAX_AB_SWAP"):
    import importlib
    import importlib.util
    import sys

    def _swap(name: str, path: str) -> None:
        package, _, leaf = name.rpartition(".")
        original = importlib.import_module(name)
        spec = importlib.util.spec_from_file_location(f"{package}._ab_{leaf}", path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = package
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        sys.modules[name] = module
        for other in list(sys.modules.values()):
            for attr, value in list(getattr(other, "__dict__", {}).items()):
                if value is original and other is not module:
                    setattr(other, attr, module)
        print(f"GDN_JAX_AB_SWAP: {name} <- {os.path.abspath(path)}", file=sys.stderr)

    for item in os.environ["GDN_JAX_AB_SWAP"].split(","):
        _swap(*item.split("=", 1))
