"""The step benchmarks run end to end on a tiny model (`--smoke`, CPU): every program they time
or profile, every path setting they take, and the JSON they write. The numbers mean nothing here;
a script that breaks on the runner costs device time, so it breaks here first."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each runs a benchmark script or builds a sharded model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_profile_step_runs_every_program_and_variant(tmp_path):
    _run("profile_step.py", "--smoke", "--out", str(tmp_path), "--batches", "2",
         "--variant", "base", "--variant", "paths:moe=gather;attention=xla;projection=xla",
         "--hlo")
    [result] = [p for p in os.listdir(tmp_path) if p.startswith("profile_step")]
    rows = json.load(open(tmp_path / result))["results"]
    assert {(r["variant"], r["program"]) for r in rows} == {
        (v, p) for v in ("base", "paths") for p in ("decode", "verify", "round")}
    assert sum(p.startswith("hlo-") for p in os.listdir(tmp_path)) == 6


def test_bench_speculative_reports_every_floor(tmp_path):
    _run("bench_speculative.py", "--smoke", "--out", str(tmp_path), "--batches", "2",
         "--reps", "1", "--chain", "20")
    [result] = os.listdir(tmp_path)
    [row] = json.load(open(tmp_path / result))["results"]
    for step in ("decode", "verify", "round"):
        assert row["floor"][f"{step}_ms"] > 0 and row[f"{step}_over_floor"] > 0


def test_random_model_is_drawn_into_its_shards():
    """`bench_speculative.random_model(..., mesh)`: every parameter is born with the sharding
    `param_specs` gives it (no device ever holds a split parameter whole), and the model runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py forces 8 CPU devices)")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_speculative as bs
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    from flax import nnx
    from gdn_jax.models.sharding import param_specs
    from gdn_jax.modules.sharding import auto_mesh

    config = bs.model_config(4, True, "qwen3_next")
    mesh = auto_mesh(jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2]))
    model = bs.random_model(config, jnp.bfloat16, mesh)
    specs = param_specs(model, mesh)
    split = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        assert value.sharding.spec == specs[tuple(path)], path
        shard = value.addressable_shards[0].data.shape
        split += shard != value.shape
    assert split > 10
    cache = model.init_cache(2, 16, t_max=4, state_dtype=jnp.bfloat16)
    out = model(jnp.asarray([[3], [5]], jnp.int32), cache, jnp.arange(2, dtype=jnp.int32),
                mode="decode")
    assert np.isfinite(np.asarray(out.logits, np.float32)).all()
