"""The committed Hugging Face fixtures (tests/fixtures/hf) are the ones their manifest names, and,
where transformers is installed (the `hf` extra), still what transformers computes.

The sha256 check needs nothing but the files: a stale or hand-edited fixture fails it. The `hf`
tests skip without torch/transformers; where they are installed they regenerate one spec into a
temporary folder and compare it with the committed one (drift in transformers or torch), and
check that transformers loads a checkpoint gdn-jax saved.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import hf_fixtures as F

from gdn_jax.models import load_pretrained, save_pretrained

DRIFT_RTOL = 1e-5  # fp32 outputs: a tenth of the parity tests' 1e-4
DRIFT_RTOL_BF16 = 5e-2  # transformers' own bf16 run (its error vs fp32 is ~1e-2)
_NOT_FIXTURES = {"manifest.json", "regenerate.py"}


def test_fixture_files_match_manifest():
    manifest = F.manifest()
    assert {"transformers", "torch"} <= manifest["versions"].keys()
    on_disk = sorted(p.relative_to(F.FIXTURE_DIR).as_posix()
                     for p in F.FIXTURE_DIR.rglob("*")
                     if p.is_file() and p.name not in _NOT_FIXTURES and "__pycache__" not in
                     p.parts)
    assert on_disk == sorted(manifest["files"]), "fixture files differ from the manifest's list"
    stale = [name for name, digest in manifest["files"].items()
             if F.sha256(F.FIXTURE_DIR / name) != digest]
    assert not stale, (f"fixtures changed since regenerate.py wrote the manifest: {stale}; "
                       f"regenerate them (pip install -e \".[hf]\"; "
                       f"python tests/fixtures/hf/regenerate.py)")
    assert sorted(manifest["specs"]) == sorted(s.id for s in F.SPECS)


@pytest.fixture(scope="module")
def regen():
    """tests/fixtures/hf/regenerate.py as a module (it imports torch and transformers)."""
    reason = "needs torch + transformers (pip install -e \".[hf]\"): live transformers check"
    pytest.importorskip("torch", reason=reason)
    pytest.importorskip("transformers", reason=reason)
    spec = importlib.util.spec_from_file_location("hf_regenerate",
                                                  F.FIXTURE_DIR / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.hf
def test_regenerated_spec_matches_fixture(regen, tmp_path):
    spec = F.MTP_SPECS[1]  # the smallest model; its MTP head uses transformers' classes directly
    names = regen.write_spec(spec, tmp_path)
    assert sorted(names) == sorted(p.name for p in spec.dir.iterdir())
    configs = [json.loads((d / "config.json").read_text()) for d in (spec.dir, tmp_path)]
    for c in configs:
        c.pop("transformers_version")
    assert configs[0] == configs[1]
    for name in ("model.safetensors", "mtp.safetensors"):
        want, got = load_file(spec.dir / name), load_file(tmp_path / name)
        assert sorted(got) == sorted(want), name
        for key in want:  # seeded torch draws: the same bits
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    want, got = F.reference(spec), dict(np.load(tmp_path / "reference.npz"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if value.dtype.kind == "i":  # the token inputs
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            rtol = DRIFT_RTOL_BF16 if "bf16_hf" in key else DRIFT_RTOL
            assert F.rel_err(got[key], value) <= rtol, (key, F.rel_err(got[key], value))


@pytest.mark.hf
def test_transformers_loads_what_we_save(regen, tmp_path):
    """transformers checkpoint -> gdn-jax -> save -> transformers gives the same logits."""
    import torch

    spec = F.SPECS[0]  # Qwen3-Next: the interleaved GDN projections
    save_pretrained(load_pretrained(spec.dir), tmp_path)
    _, cls = regen.hf_config(spec)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = []
    for path in (spec.dir, tmp_path):
        hf = cls.from_pretrained(path).eval()
        hf.set_attn_implementation("eager")
        with torch.no_grad():
            logits.append(hf(ids).logits.numpy())
    np.testing.assert_array_equal(logits[0], logits[1])
