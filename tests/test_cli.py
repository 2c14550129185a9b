"""The `gdn-jax` command line, through a subprocess, on the embedded model: reproducible output,
plain == speculative greedy decoding, one-line errors, and the packaged weights in a non-editable
install."""

import json
import os
import subprocess
import sys

import pytest

from gdn_jax.models import embedded_path

CLI = [sys.executable, "-m", "gdn_jax.cli"]
PROMPT = "def read_file(path):\n    with open(path) as f:\n"


def run(*args, cwd=None, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=env)


def generate(*args):
    r = run("generate", "--prompt", PROMPT, "--max-new-tokens", "12", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_generate_is_reproducible_for_a_seed():
    args = ("--temperature", "0.8", "--top-k", "20", "--seed", "3")
    first = generate(*args)
    assert first.strip()
    assert generate(*args) == first


@pytest.mark.slow
def test_plain_and_speculative_greedy_agree():
    # fp32 state: plain and speculative greedy decoding are then the same tokens (README).
    spec = generate("--num-draft-tokens", "3", "--state-dtype", "float32")
    plain = generate("--num-draft-tokens", "0", "--state-dtype", "float32")
    assert spec == plain


@pytest.mark.parametrize("args, message", [
    (("generate", "--model", "/nonexistent/dir"), "no such directory"),
    (("generate", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("generate", "--prompts-file", "/nonexistent.json"), "no such file"),
    (("generate", "--prompt", "x = 1", "--max-new-tokens", "100000"), "exceed the cache"),
    (("bench", "--batches", "a,b"), "--batches expected comma-separated integers"),
], ids=["missing-dir", "bad-max-new", "missing-prompts-file", "prompt-too-long", "bad-batches"])
def test_errors_are_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdn-jax: error:") and message in lines[0], \
        r.stderr


def test_bad_config_is_one_line(tmp_path):
    with open(os.path.join(embedded_path(), "config.json")) as f:
        config = json.load(f)
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(
        open(os.path.join(embedded_path(), "tokenizer.json")).read())
    r = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "hidden_act" in r.stderr, r.stderr


def test_info():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stdout and "capability" in r.stdout


@pytest.mark.slow
def test_packaged_weights_load_from_a_non_editable_install(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = tmp_path / "site"
    # A real (non-editable) build, as `pip install .` does it; --no-deps: the test environment
    # already has them on its path.
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--target", str(target), root],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    code = ("import gdn_jax, os; from gdn_jax.models import embedded_path, load_embedded; "
            "m = load_embedded(); print(gdn_jax.__file__); print(embedded_path()); "
            "print(sorted(os.listdir(embedded_path())))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    for name in ("config.json", "tokenizer.json", "prompts.json"):
        assert name in lines[2]
