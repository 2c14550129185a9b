"""`gdn_jax.kernels` depends on jax only, and says its public face in `__all__`."""

from __future__ import annotations

import os
import subprocess
import sys

import gdn_jax.kernels as kernels


def test_importing_the_kernels_loads_jax_and_nothing_above_them(tmp_path):
    code = ("import sys, gdn_jax.kernels; mods = sorted(sys.modules); "
            "print('jax' in mods); "
            "print([m for m in mods if m.split('.')[0] in ('flax', 'optax', 'torch') "
            "or m.startswith(('gdn_jax.ops', 'gdn_jax.modules', 'gdn_jax.models', "
            "'gdn_jax.speculative', 'gdn_jax.cli', 'gdn_jax.train'))])")
    # Run outside the checkout: `python -c` puts the working directory first on sys.path, where
    # the source folder gdn_jax/ has no kernels/ (it is mapped there at install time).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["True", "[]"], out.stdout + out.stderr


def test_the_public_face_is_complete():
    for name in kernels.__all__:
        assert hasattr(kernels, name), name
        assert not name.startswith("_"), name
    assert kernels.MAX_T == 16 and kernels.MOSAIC_MAX_K == 256
    assert set(kernels.MOSAIC_MODES) == {"decode", "replay", "intermediate"}
