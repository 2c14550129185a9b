"""gdn_jax.benchmark: the chained per-call timer (`time_chain`) and `gdn-jax bench` on CPU (through
a subprocess): no per-call time that reads zero, no % over 100, every column in a legend."""

import re
import subprocess
import sys
import time

import jax
import pytest

from gdn_jax.benchmark import time_chain


def _sleeper(per_call_s):
    """run(state, n): n calls of per_call_s each (host sleep; the timer only sees wall time)."""
    def run(state, n):
        time.sleep(per_call_s * n)
        return state + n
    return run


def test_whole_chain_grows_until_resolvable():
    timing, state = time_chain(_sleeper(1e-4), 0, calls=2, reps=3, method="whole",
                               min_seconds=0.02)
    assert timing.method == "whole" and timing.calls >= 200  # 2 doubled until >= 20 ms
    assert 1e-4 <= timing.per_call_s < 3e-4
    assert state > 4 * timing.calls  # the state threads through every run


def test_difference_cancels_the_fixed_cost():
    def run(state, n):
        time.sleep(0.02 + 1e-3 * n)  # 20 ms fixed per program, 1 ms per call
        return state
    timing, _ = time_chain(run, 0, calls=10, reps=3)
    assert timing.method == "difference" and not timing.note
    assert 0.5e-3 < timing.per_call_s < 1.6e-3  # the fixed cost cancelled...
    assert timing.whole_s > 2.5e-3              # ...which the whole-chain figure keeps


def test_difference_lost_in_noise_falls_back_and_says_so():
    times = iter([0.0, 0.0] + [0.05, 0.01] * 3)  # t(2n) < t(n): noise

    def run(state, n):
        time.sleep(next(times))
        return state
    timing, _ = time_chain(run, 0, calls=10, reps=3)
    assert timing.method == "whole" and "noise" in timing.note
    assert timing.per_call_s > 0


def test_bad_method():
    with pytest.raises(ValueError, match="method expected"):
        time_chain(_sleeper(0), 0, calls=1, reps=1, method="fast")


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the CPU table")
def test_cli_bench_on_cpu_prints_supported_figures():
    r = subprocess.run([sys.executable, "-m", "gdn_jax.cli", "bench", "--batches", "1",
                        "--reps", "1", "--calls", "4"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    times = [float(x) for x in re.findall(r"([0-9.]+(?:e[-+]?\d+)?) us", out)]
    assert len(times) == 2 and min(times) > 0, out  # decode and verify, never zero
    assert all(float(p) <= 100 for p in re.findall(r"([0-9.]+)%", out)), out
    assert "% copy" not in out.splitlines()[1]  # no copy yardstick on CPU
    legend = out[out.index("legend:"):]
    for column in ("op", "B, T", "per call", "GB/s", "not shown on CPU"):
        assert f"\n  {column}" in legend, (column, out)
