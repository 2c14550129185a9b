"""The `gdn-jax` command line, through a subprocess, on the embedded model: reproducible output,
plain == speculative greedy decoding (the repetition stop included), the prompt shown, one-line
errors naming the file, progress lines off a terminal, a saved model directory that generates,
generate loading nothing of training (and training nothing of the CLI), and the packaged weights
in a non-editable install."""

import json
import os
import subprocess
import sys

import pytest

from gdn_jax.cli import SEPARATOR
from gdn_jax.models import embedded_path, load_embedded
from gdn_jax.ops import MAX_T
from gdn_jax.text import DEFAULT_PROMPT
from gdn_jax.train.command import DESCRIPTION, H100_TIME

CLI = [sys.executable, "-m", "gdn_jax.cli"]
DRAFTS = MAX_T - 1  # the verify limit, from the one constant that says it
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
    # Off a terminal the prompt comes first, then a separator line, then the completion.
    assert plain.startswith(PROMPT + SEPARATOR + "\n") and plain.strip() != PROMPT + SEPARATOR


LOOP_PROMPT = "x = 1\n" * 6


def test_repetition_stop_is_the_same_in_plain_and_speculative_decoding():
    # The embedded model continues this prompt with the same line over and over: the default
    # --stop-repeats stops it, after generation and in one place, so plain and speculative
    # greedy outputs stay identical.
    out = {}
    for d in ("0", "3"):
        r = run("generate", "--prompt", LOOP_PROMPT, "--max-new-tokens", "40", "--no-prompt",
                "--num-draft-tokens", d, "--state-dtype", "float32")
        assert r.returncode == 0, r.stderr
        assert "stopped at a repetition loop" in r.stderr, r.stderr
        out[d] = r.stdout
    assert out["0"] == out["3"]
    assert out["0"].count("x = 1") <= 4, out["0"]  # 3 repeats of the looping block at most


def test_broken_config_names_the_file_before_the_prompt(tmp_path):
    # No prompts.json and no --prompt: the config error comes first, naming the file.
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5_text",\n}')
    (tmp_path / "tokenizer.json").write_text(
        open(os.path.join(embedded_path(), "tokenizer.json")).read())
    r = run("generate", "--model", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdn-jax: error:"), r.stderr
    assert str(tmp_path / "config.json") in lines[0] and "not valid JSON" in lines[0]


_MODULES = ("import sys, json; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'optax' or m.startswith(('gdn_jax.train', 'gdn_jax.cli')))))")


def _loaded_modules(code):
    r = subprocess.run([sys.executable, "-c", code + "\n" + _MODULES], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r, set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_saved_model_generates_and_loads_nothing_of_training(tmp_path):
    # save_pretrained carries the tokenizer along; a directory without prompts.json generates
    # from the default prompt; generate imports no gdn_jax.train module, and optax only as far
    # as flax.nnx itself imports it.
    load_embedded().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "prompts.json").exists()
    r, modules = _loaded_modules(
        "from gdn_jax.cli import main\n"
        f"assert main(['generate', '--model', {str(tmp_path)!r}, '--max-new-tokens', '4']) == 0")
    _, flax_modules = _loaded_modules("import flax.nnx")
    assert not {m for m in modules if m.startswith("gdn_jax.train")}, modules
    assert {m for m in modules if m.startswith("optax")} <= flax_modules
    assert r.stdout.startswith(DEFAULT_PROMPT + SEPARATOR + "\n")
    # Progress off a terminal: plain lines for every phase, with sane labels.
    for line in ("has no prompts.json", "[gdn-jax] 1/3 load the model: ",
                 "[gdn-jax] 2/3 compile (a first run): ", "[gdn-jax] 3/3 generate: "):
        assert line in r.stderr, r.stderr
    assert ": :" not in r.stderr
    import jax
    drafts = 3 if jax.devices()[0].platform == "gpu" else 0  # the per-device default
    assert f"(num_draft {drafts})" in r.stderr, r.stderr


def test_training_has_its_own_entry_point():
    # python -m gdn_jax.train imports nothing of the CLI; gdn-jax train reaches the same parser.
    _, modules = _loaded_modules(
        "import runpy, sys\nsys.argv = ['x', '--out', 'x', '--steps', '0']\n"
        "try:\n    runpy.run_module('gdn_jax.train', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code")
    assert "gdn_jax.train.command" in modules and "gdn_jax.cli" not in modules
    r = run("train", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: gdn-jax train"), r.stderr
    # The help and the README give the same training time, and say what the corpus is.
    assert H100_TIME in DESCRIPTION and "3.12.3" in DESCRIPTION
    assert H100_TIME in " ".join(r.stdout.split())
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()
    training = readme[readme.index("## Training"):]
    training = " ".join(training[:training.index("\n## ")].split())
    assert H100_TIME in training and "3.12.3" in training


@pytest.mark.parametrize("args, message", [
    (("generate", "--model", "/nonexistent/dir"), "no such directory"),
    (("generate", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("generate", "--prompts-file", "/nonexistent.json"), "no such file"),
    (("generate", "--prompt", "x = 1", "--max-new-tokens", "100000"), "exceed the cache"),
    (("bench", "--batches", "a,b"), "--batches expected comma-separated integers"),
    (("generate", "--num-draft-tokens", "99"), f"--num-draft-tokens must be in 0..{DRAFTS}"),
    (("generate", "--num-draft-tokens", "-1"), f"--num-draft-tokens must be in 0..{DRAFTS}"),
    (("generate", "--stop-repeats", "1"), "--stop-repeats must be 0 (off) or >= 2"),
    (("train", "--out", "x", "--steps", "0"), "--steps must be >= 1, got 0"),
], ids=["missing-dir", "bad-max-new", "missing-prompts-file", "prompt-too-long", "bad-batches",
        "too-many-drafts", "negative-drafts", "bad-stop-repeats", "train-bad-steps"])
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
