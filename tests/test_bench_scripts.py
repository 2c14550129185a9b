"""The step benchmarks run end to end on a tiny model (`--smoke`, CPU): every program they time
or profile, every path setting they take, and the JSON they write. The numbers mean nothing here;
a script that breaks on the runner costs device time, so it breaks here first."""

import json
import os
import subprocess
import sys

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
