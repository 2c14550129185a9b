"""The step benchmarks run end to end on a tiny model (`--smoke`, CPU): every program they time
or profile, every path setting they take, and the JSON they write. The numbers mean nothing here;
a script that breaks on the runner costs device time, so it breaks here first."""

import importlib
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
         "--variant", "base",
         "--variant", "paths:moe=gather;attention=xla;projection=xla;gemv=on;shared=apart",
         "--hlo")
    [result] = [p for p in os.listdir(tmp_path) if p.startswith("profile_step")]
    rows = json.load(open(tmp_path / result))["results"]
    assert {(r["variant"], r["program"]) for r in rows} == {
        (v, p) for v in ("base", "paths") for p in ("decode", "verify", "round")}
    assert all(r["launches_per_call"].keys() == r["kernels_us"].keys() for r in rows)
    assert sum(p.startswith("hlo-") for p in os.listdir(tmp_path)) == 6


def test_profile_step_runs_ring_mode(tmp_path):
    _run("profile_step.py", "--smoke", "--out", str(tmp_path), "--batches", "2",
         "--programs", "verify,round", "--commit-mode", "ring")
    [result] = [p for p in os.listdir(tmp_path) if p.startswith("profile_step")]
    rows = json.load(open(tmp_path / result))["results"]
    assert [(r["program"], r["commit_mode"]) for r in rows] == [("verify", "ring"),
                                                                ("round", "ring")]


def test_l2_prefetch_probe_runs_each_variant(tmp_path):
    _run("l2_prefetch.py", "--smoke", "--interpret", "--out", str(tmp_path))
    cases = json.load(open(tmp_path / "l2_prefetch.json"))["cases"]
    assert [(c["pattern"], c["fraction"]) for c in cases] == [
        ("head", 0.0), *((p, f) for p in ("head", "starts") for f in (0.125, 0.25, 0.5))]
    assert [bool(c["regions"]) for c in cases] == [False] + [True] * 6


def test_stream_probe_runs_each_mode(tmp_path):
    _run("probe_stream.py", "--smoke", "--interpret", "--out", str(tmp_path), "--per-sm", "1,2")
    cases = json.load(open(tmp_path / "probe_stream.json"))["cases"]
    # the Mosaic kernel only at one CTA an SM (its grid)
    streams = ("w", "w+x", "w+x+mma",
               *(f"w+x+mma+{e}" for e in ("add", "store", "tma", "acc", "nested", "scoped1",
                                          "scoped0")))
    assert [(c["mode"], c["ctas"]) for c in cases] == [
        *((m, 4) for m in (*streams, "kernel", "kernel-out128")), *((m, 8) for m in streams)]


def test_bench_moe_sweeps_each_kernel_and_counts_touched_experts(tmp_path):
    _run("bench_moe.py", "--smoke", "--interpret", "--out", str(tmp_path), "--tokens", "1,3",
         "--sweep")
    cases = json.load(open(tmp_path / "bench_moe.json"))["cases"]
    assert [c["tokens"] for c in cases] == [1, 3]
    for c in cases:
        assert 2 <= c["touched_experts"] <= 2 * c["tokens"] and c["floor_us"] > 0
        assert len(c["sweep"]["gate_up"]) == len(c["sweep"]["down"]) == 4  # 2 block_n x 2 splits
        assert c["sweep"]["routed_best"]["configs"][0][0] == c["configs"][0][0]  # one block_m
        assert sorted(c["router_us"]) == ["1", "2", "4"]  # each launch timed (0 on CPU)


def test_bench_moe_with_the_shared_expert(tmp_path):
    """--shared: the shared expert in routed's launches (a block each at 1 token, the grouped
    plan at 3), its bytes in the floor, the sweep's kernels given it too, the router launch
    with its gate."""
    _run("bench_moe.py", "--smoke", "--interpret", "--out", str(tmp_path), "--tokens", "1,3",
         "--sweep", "--shared", "--router-warps", "4")
    cases = json.load(open(tmp_path / "bench_moe.json"))["cases"]
    for c in cases:
        assert c["shared"] and 3 <= c["touched_experts"] <= 2 * c["tokens"] + 1
        assert len(c["sweep"]["gate_up"]) == len(c["sweep"]["down"]) == 4
        assert list(c["router_us"]) == ["4"]


def test_bench_speculative_reports_every_floor(tmp_path):
    _run("bench_speculative.py", "--smoke", "--out", str(tmp_path), "--batches", "2",
         "--reps", "1", "--chain", "20")
    [result] = os.listdir(tmp_path)
    [row] = json.load(open(tmp_path / result))["results"]
    for step in ("decode", "verify", "round"):
        assert row["floor"][f"{step}_ms"] > 0 and row[f"{step}_over_floor"] > 0


def test_bench_speculative_ring_mode_compares_with_plain_decode(tmp_path):
    """Ring mode's own decode is the ring kernel's; its ratios take the plain decode, timed on a
    replay-mode cache."""
    _run("bench_speculative.py", "--smoke", "--out", str(tmp_path), "--batches", "2",
         "--reps", "1", "--chain", "20", "--commit-mode", "ring")
    [result] = os.listdir(tmp_path)
    [row] = json.load(open(tmp_path / result))["results"]
    plain, rnd = row["plain_decode"]["per_call_ms"], row["round"]["per_call_ms"]
    assert plain > 0 and row["decode"]["per_call_ms"] > 0
    assert row["round_over_decode"] == rnd / plain
    assert row["tokens_per_s"]["plain"] == 2 / plain * 1e3


def test_bench_speculative_takes_a_sweeps_moe_configs(tmp_path, monkeypatch):
    """--moe-configs: each swept token count's best (gate / up, down) pair replaces
    `ops.moe.default_configs`' there, and only there; a JSON with no sweep is refused."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_speculative as bs
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    from gdn_jax.kernels.moe import MoEConfig
    from gdn_jax.ops import moe

    sweep = {"gate_up": [[[16, 64, 256, 1, 8, 5], 9.0], [[16, 32, 128, 1, 4, 3], 12.0]],
             "down": [[[16, 64, 64, 1, 2, 4], 4.0]]}
    path = tmp_path / "bench_moe.json"
    path.write_text(json.dumps({"cases": [{"tokens": 1, "sweep": sweep}, {"tokens": 4}]}))
    best = bs.swept_moe_configs(str(path))
    assert best == {1: (MoEConfig(16, 64, 256, num_warps=8, num_stages=5, splits=1),
                        MoEConfig(16, 64, 64, num_warps=2, num_stages=4, splits=1))}
    monkeypatch.setattr(moe, "default_configs", moe.default_configs)  # restored after
    shape = dict(num_experts=256, H=2048, I=512, shared=True, sm_count=132)
    before = moe.default_configs(32, 4, **shape)
    bs.use_moe_configs(best)
    assert moe.default_configs(8, 1, **shape) == best[1]
    assert moe.default_configs(32, 4, **shape) == before != best[1]
    path.write_text(json.dumps({"cases": [{"tokens": 1}]}))
    with pytest.raises(SystemExit, match="no swept case"):
        bs.swept_moe_configs(str(path))


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


def _bench_module(name):
    """bench/<name>.py imported as a module (bench/ is not a package)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def _ncu_kernels():
    return _bench_module("ncu_kernels")


def test_ncu_sweeps_keep_to_batches_dtypes_and_ops(monkeypatch):
    """`--sweep-batches`, `--dtypes` and `--ops` cut every sweep down (a runner call takes a few
    dozen cases); the Mosaic decode sweep leaves out the stages that do not fit."""
    nk = _ncu_kernels()
    seen = {}
    monkeypatch.setattr(nk, "worker", lambda args: seen.update(cases=nk.cases(args)))
    nk.main(["--out", "/tmp/unused", "--worker", "--sweep", "--ops", "decode",
             "--sweep-batches", "256", "--dtypes", "float32"])
    assert len(seen["cases"]) == 12  # block_v 8..64 x 1, 2, 4 warps
    assert {(c["op"], c["B"], c["dtype"]) for c in seen["cases"]} == {("decode", 256, "float32")}
    nk.main(["--out", "/tmp/unused", "--worker", "--sweep-mosaic", "decode",
             "--sweep-batches", "32"])
    mosaic = [c for c in seen["cases"] if c["impl"] == "mosaic"]
    assert {c["B"] for c in seen["cases"]} == {32}
    assert all(c["stages"] * c["block_v"] * 128 * (2 if c["dtype"] == "bfloat16" else 4)
               <= nk._SWEEP_SMEM for c in mosaic)
    assert any(c["stages"] == 4 for c in mosaic)
    # the ring sweep at each --tokens T, its ring W = 16, or 32 above T = 8
    nk.main(["--out", "/tmp/unused", "--worker", "--sweep-ring", "--tokens", "4,16",
             "--sweep-batches", "256", "--dtypes", "bfloat16", "--sweep-configs", "64:4,128:4"])
    assert sorted((c["T"], c["ring"], c["block_v"]) for c in seen["cases"]) == [
        (4, 16, 64), (4, 16, 128), (16, 32, 64), (16, 32, 128)]


def test_ncu_report_takes_jax_timed_cases(tmp_path, capsys):
    """A `--timer jax` table (no registers, occupancy or DRAM %) is written and printed."""
    nk = _ncu_kernels()
    case = dict(impl="mosaic", op="decode", B=256, T=1, dtype="bfloat16", block_v=64,
                tiles_per_cta=2, stages=3, kernel="k", kernel_us=140.0, call_us=150.0,
                kernels_per_call=2)
    nk._rate(case, case["call_us"] * 1e3, 4000.0)
    nk._report(str(tmp_path), [case, dict(case, error="boom")], 4000.0, 5, timer="jax")
    out = json.load(open(tmp_path / "ncu_kernels.json"))
    assert out["timer"] == "jax" and out["cases"][0]["pct_copy"] == pytest.approx(
        100 * nk.byte_model(case) / 150e3 / 4000.0)
    assert "bv64t2s3" in capsys.readouterr().out


def test_wy_opcount_counts_grow_with_tokens():
    """bench/wy_opcount.py: a tile's vector and scalar work grows with T (the ring's sum over its
    W entries per token row, the solve's T^2 terms)."""
    out = _run("wy_opcount.py", "--cases", "ring:1:16,ring:4:16,replay:4:3")
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()[1:]}
    assert rows["ring:4:16"][0] > rows["ring:1:16"][0] > 0
    assert rows["ring:4:16"][3] > rows["ring:1:16"][3] > 0
    assert rows["replay:4:3"][0] > 0


def test_ncu_stall_fields_rank_the_reasons():
    """`--stalls`: a kernel row's warp-state ratios become its top stall reasons (largest first,
    "n/a" skipped) and its issue-slot use; a row without those columns adds nothing."""
    nk = _ncu_kernels()
    row = {nk.STALLED.format("long_scoreboard"): "0.50", nk.STALLED.format("barrier"): "2.25",
           nk.STALLED.format("wait"): "1,234.5", nk.STALLED.format("drain"): "n/a",
           nk.ISSUE_ACTIVE: "41.7", "gpu__time_duration.sum": "12000"}
    fields = nk.stall_fields(row, top=2)
    assert fields == {"stalls": [["wait", 1234.5], ["barrier", 2.25]], "issue_active_pct": 41.7}
    assert nk.stall_fields({"gpu__time_duration.sum": "12000"}) == {}


def test_ab_swap_replaces_a_module_everywhere(tmp_path):
    """bench/ab: with GDN_JAX_AB_SWAP a process runs with the named module replaced by a file,
    also where another module holds it as an attribute (verify_mgpu's `_ring_wy_mgpu`)."""
    old = tmp_path / "old_ring.py"
    old.write_text(open(os.path.join(ROOT, "kernels", "_ring_wy_mgpu.py")).read()
                   + "\nAB_MARK = 'swapped'\n")
    env = dict(os.environ, GDN_JAX_AB_SWAP=f"gdn_jax.kernels._ring_wy_mgpu={old}",
               PYTHONPATH=os.path.join(ROOT, "bench", "ab"))
    code = ("from gdn_jax.kernels import verify_mgpu, _ring_wy_mgpu\n"
            "print(verify_mgpu._ring_wy_mgpu.AB_MARK, _ring_wy_mgpu.AB_MARK)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["swapped", "swapped"]
    assert "GDN_JAX_AB_SWAP: gdn_jax.kernels._ring_wy_mgpu" in proc.stderr


_PTXAS_TEXT = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 871 by compiler to allow use \
of registers in GMMA in function 'proj_kernel'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to non wgmma instructions defining accumulator registers of a wgmma between start and end of \
the pipeline stage in the function 'proj_kernel'
ptxas info    : Compiling entry function 'proj_kernel' for 'sm_90a'
ptxas info    : Function properties for proj_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 154 registers, used 2 barriers, 1 bytes smem
ptxas warning : Registers are spilled to local memory in function 'verify_kernel', 84 bytes \
spill stores, 104 bytes spill loads
ptxas info    : Compiling entry function 'verify_kernel' for 'sm_90a'
ptxas info    : Function properties for verify_kernel
    80 bytes stack frame, 84 bytes spill stores, 104 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 80 bytes cumulative stack size, 1 bytes smem
"""


def test_ptxas_report_reads_registers_spills_and_warnings():
    """bench/ptxas_report.py: each function ptxas compiled, with its registers, spill bytes and
    warning codes (ptxas 13's wording, 2026-12-06)."""
    rows = {r["function"]: r for r in _bench_module("ptxas_report")._summary(_PTXAS_TEXT)}
    assert rows["proj_kernel"] == {"function": "proj_kernel", "arch": "sm_90a", "registers": 154,
                                   "spill_bytes": 0, "warnings": ["C7519", "C7515"]}
    assert rows["verify_kernel"]["registers"] == 255
    assert rows["verify_kernel"]["spill_bytes"] == 188 and rows["verify_kernel"]["warnings"] == []


_SASS_TEXT = """\
//--------------------- .text.ring_kernel --------------------------
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
.L_x_1:
        /*0020*/               @P0 FFMA R2, R3, R4, R2 ;
        /*0030*/              @!P1 BRA `(.L_x_1) ;
//--------------------- .text.other_kernel --------------------------
        /*0000*/                   EXIT ;
"""


def test_ptxas_report_counts_sass_by_function_and_opcode():
    """`--sass`: each function's instructions in nvdisasm's listing, predicated ones included."""
    counts = _bench_module("ptxas_report")._sass_counts(_SASS_TEXT)
    assert counts["ring_kernel"] == {"instructions": 4, "opcodes": {"FFMA": 2, "LDC": 1, "BRA": 1}}
    assert counts["other_kernel"]["instructions"] == 1


def test_ptxas_report_says_what_it_needs_without_the_cuda_plugin():
    """Without jax's CUDA plugin (CI's CPU jax) the script stops at once, saying what to install."""
    for plugin in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            importlib.import_module(plugin)
        except ImportError:
            continue
        pytest.skip(f"{plugin} is installed: the script would compile for real")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ptxas_report.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "no CUDA plugin" in proc.stderr, proc.stderr[-2000:]
