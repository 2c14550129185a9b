"""Every ```python block of README.md runs, on CPU at tiny shapes.

Blocks are keyed by the README section they sit in (its `## ` heading; "Heading #2" for a second
block there). A block runs in a fresh namespace after its prelude (`PRELUDES` below), which
defines the names the block leaves to the reader (`tokens`, `q`, a model) at tiny shapes; the
entry also swaps the block's full-size literals (B = 8 with 128-wide heads) for tiny ones, each
of which must still be in the block, and "path/to/hf_dir" becomes a tiny saved checkpoint. A
block with no prelude runs as it stands. A block that cannot run
here is marked in the README by an HTML comment on the line just before it:

    <!-- readme-test: skip (needs GPUs) -->

and is listed as skipped with that reason. A block that raises fails, unmarked or not.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.models import ModelConfig
from tiny_models import random_model

README = Path(__file__).resolve().parent.parent / "README.md"
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]*)\)\s*-->")


def python_blocks(text: str):
    """[(key, code, skip reason or None)] for every ```python block of a markdown text."""
    blocks, heading, seen, prev = [], "(top)", {}, ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.strip() == "```python":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"README: the ```python block at line {i + 1} is not closed")
            seen[heading] = seen.get(heading, 0) + 1
            key = heading if seen[heading] == 1 else f"{heading} #{seen[heading]}"
            m = _SKIP.search(prev)
            blocks.append((key, textwrap.dedent("\n".join(lines[i + 1:j])),
                           m.group("why") if m else None))
            i = j
        if line.strip():
            prev = line
        i += 1
    return blocks


# ---- tiny models: a Qwen3.5-shaped one with an MTP head; head counts that 4 devices divide

_TINY = ModelConfig(
    model_type="qwen3_5_text", vocab_size=64, hidden_size=32, num_hidden_layers=2,
    layer_types=("linear_attention", "full_attention"), num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, linear_num_key_heads=4, linear_num_value_heads=8,
    linear_key_head_dim=16, linear_value_head_dim=16, intermediate_size=64,
    mtp_num_hidden_layers=1)
B = 2
_I32 = jnp.int32


def _checkpoint(tmp_path):
    path = tmp_path / "hf_dir"
    random_model(_TINY, seed=0, scale=0.2).save_pretrained(path)
    return str(path)


def _ops_prelude(tmp_path):
    rng = np.random.default_rng(0)
    H, HV, K, V = 2, 4, 16, 16

    def toks(T):
        f = lambda *s: jnp.asarray(rng.standard_normal((B, T) + s), jnp.float32)  # noqa: E731
        bf16 = lambda *s: f(*s).astype(jnp.bfloat16)  # noqa: E731  (the state's input dtype)
        return bf16(H, K), bf16(H, K), bf16(HV, V), f(HV), f(HV)

    q, k, v, a, b = toks(1)
    q4, k4, v4, a4, b4 = toks(4)
    return dict(q=q, k=k, v=v, a=a, b=b, q4=q4, k4=k4, v4=v4, a4=a4, b4=b4,
                A_log=jnp.zeros((HV,), jnp.float32), dt_bias=jnp.zeros((HV,), jnp.float32),
                num_accepted=jnp.array([4, 1], _I32))


def _ops_check(ns):
    assert ns["o"].shape == (B, 4, 4, 16)
    assert np.isfinite(np.asarray(ns["o"])).all()
    np.testing.assert_array_equal(np.asarray(ns["state"].count[:B]), [4, 1])


def _models_prelude(tmp_path):
    return dict(tokens=jnp.array([[3, 14, 15, 9], [2, 6, 0, 0]], _I32),
                lengths=jnp.array([4, 2], _I32), slots=jnp.array([5, 1], _I32),
                next_tokens=jnp.array([7, 8], _I32), draft=jnp.array([[1, 2, 3], [4, 5, 6]], _I32),
                num_accepted=jnp.array([3, 1], _I32))


def _models_check(ns):
    assert ns["mtp"].logits.shape == (B, 1, _TINY.vocab_size)
    assert (Path("out_dir") / "config.json").is_file()


def _kernel_paths_prelude(tmp_path):
    return dict(model=random_model(_TINY, seed=0, scale=0.2))


def _kernel_paths_check(ns):
    from gdn_jax.modules import Attention
    from flax import nnx
    impls = {n.impl for _, n in nnx.iter_graph(ns["model"]) if isinstance(n, Attention)}
    assert impls == {"xla"}


def _speculative_prelude(tmp_path):
    return dict(model=random_model(_TINY, seed=0, scale=0.2),
                prompts=jnp.array([[3, 14, 15, 9], [2, 6, 0, 0]], _I32),
                prompt_lengths=jnp.array([4, 2], _I32), eos_id=1)


def _speculative_check(ns):
    assert ns["out"].tokens.shape == (B, 8)
    assert 1 <= int(ns["out"].lengths.min()) and int(ns["out"].lengths.max()) <= 8


def _tp_prelude(tmp_path):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 8 CPU devices)")
    return dict(next_tok=jnp.array([7, 8], _I32), slots=jnp.array([5, 1], _I32))


def _tp_check(ns):
    assert ns["out"].logits.shape == (B, 1, _TINY.vocab_size)
    assert len(ns["out"].logits.sharding.device_set) == 4


# key -> (prelude(tmp_path) -> dict of names, {README text: tiny text}, check(namespace))
PRELUDES = {
    "The ops": (_ops_prelude,
                {"B, H, HV, K, V = 8, 16, 32, 128, 128": "B, H, HV, K, V = 2, 2, 4, 16, 16"},
                _ops_check),
    "The models": (_models_prelude, {"max_len=4096": "max_len=16"}, _models_check),
    "The models #2": (_kernel_paths_prelude, {}, _kernel_paths_check),
    "Speculative decoding": (_speculative_prelude, {"max_new_tokens=256": "max_new_tokens=8"},
                             _speculative_check),
    "Multi-GPU (tensor parallel)": (_tp_prelude, {"max_len=4096": "max_len=16"}, _tp_check),
}
BLOCKS = python_blocks(README.read_text())
# Blocks that take more than about 10 s on a 2-core CPU (eager model calls compile op by op).
SLOW = {"The models", "Speculative decoding"}


def test_the_readme_has_python_blocks_and_every_prelude_its_block():
    keys = [key for key, _, _ in BLOCKS]
    assert len(keys) >= 4, keys
    assert not set(PRELUDES) - set(keys), f"preludes for blocks the README no longer has: " \
        f"{sorted(set(PRELUDES) - set(keys))}"
    assert SLOW <= set(keys), sorted(SLOW - set(keys))


def test_python_blocks_parser():
    text = textwrap.dedent("""\
        ## A
        ```python
        x = 1
        ```
        <!-- readme-test: skip (needs GPUs) -->

        ```python
        y = 2
        ```
        ```bash
        z
        ```
        ## B
        ```python
          w = 3
        ```
        """)
    assert python_blocks(text) == [("A", "x = 1", None), ("A #2", "y = 2", "needs GPUs"),
                                   ("B", "w = 3", None)]
    with pytest.raises(ValueError, match="not closed"):
        python_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("key, code, skip", [
    pytest.param(*block, id=block[0], marks=[pytest.mark.slow] if block[0] in SLOW else [])
    for block in BLOCKS])
def test_readme_block_runs(key, code, skip, tmp_path, monkeypatch):
    if skip is not None:
        pytest.skip(f"marked in the README: {skip}")
    monkeypatch.chdir(tmp_path)  # a block may write files ("out_dir")
    prelude, subs, check = PRELUDES.get(key, (lambda _: {}, {}, None))
    for old, new in subs.items():
        assert old in code, f"README block {key!r} no longer has {old!r}: update its PRELUDES entry"
        code = code.replace(old, new)
    ns = {"__name__": f"readme_{key}"}
    ns.update(prelude(tmp_path))
    if "path/to/hf_dir" in code:
        code = code.replace("path/to/hf_dir", _checkpoint(tmp_path))
    exec(compile(code, f"README.md: {key}", "exec"), ns)
    if check is not None:
        check(ns)
