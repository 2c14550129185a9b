"""gdn_jax.train: a few steps on a tiny config lower the loss and are deterministic for a seed;
the corpus split and the tokenizer are deterministic."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.train import TrainConfig
from gdn_jax.train import loop
from gdn_jax.train.corpus import Corpus
from gdn_jax.train.tokenizer import EOS, train_tokenizer

STEPS = 6


def _run(seed):
    cfg = TrainConfig(steps=STEPS, batch=2, seq_len=32, lr=1e-2, warmup=1, seed=seed,
                      hidden_size=64, num_layers=4, intermediate_size=64)
    config = loop.model_config(64, cfg.hidden_size, cfg.num_layers, cfg.intermediate_size)
    graphdef, params = nnx.split(loop.build_model(config, cfg.seed))
    opt = loop.make_optimizer(cfg)
    state = opt.init(params)
    step = loop.make_step(graphdef, opt, cfg.mtp_weight)
    # One fixed batch: the loss on it must fall (memorisation), whatever the data.
    stream = np.random.default_rng(0).integers(0, 64, 4096).astype(np.int32)
    window = jnp.asarray(loop.sample_windows(stream, cfg.seed, 0, cfg.batch, cfg.seq_len + 1))
    out = []
    for _ in range(STEPS):
        params, state, main, mtp = step(params, state, window)
        out.append((float(main), float(mtp)))
    return np.asarray(out), params


@pytest.mark.slow
def test_steps_lower_loss_and_are_deterministic():
    a, pa = _run(0)
    b, pb = _run(0)
    assert a[-1, 0] < a[0, 0] - 0.1, a
    assert a[-1, 1] < a[0, 1] - 0.1, a
    np.testing.assert_array_equal(a, b)
    for x, y in zip(nnx.to_flat_state(pa), nnx.to_flat_state(pb)):
        np.testing.assert_array_equal(np.asarray(x[1].get_value()), np.asarray(y[1].get_value()))


def test_sample_windows_depend_on_seed_and_step_only():
    stream = np.arange(1000, dtype=np.int32)
    w = loop.sample_windows(stream, 3, 7, 4, 17)
    assert w.shape == (4, 17)
    np.testing.assert_array_equal(w, loop.sample_windows(stream, 3, 7, 4, 17))
    assert not np.array_equal(w, loop.sample_windows(stream, 3, 8, 4, 17))
    with pytest.raises(ValueError, match="fewer than a window"):
        loop.sample_windows(stream[:10], 0, 0, 1, 17)


def test_corpus_split_and_tokenizer(tmp_path):
    for i in range(40):
        sub = tmp_path / ("test" if i % 10 == 0 else "pkg")
        sub.mkdir(exist_ok=True)
        (sub / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 5)
    corpus = Corpus.from_stdlib(str(tmp_path))
    assert len(corpus.files) == 36 and not any(f.startswith("test/") for f in corpus.files)
    assert set(corpus.train) | set(corpus.held_out) == set(corpus.files)
    rec = corpus.record()
    assert rec["num_files"] == 36 and len(rec["file_list_sha256"]) == 64
    texts = corpus.read(corpus.train)
    tok = train_tokenizer(texts, 300)
    assert tok.to_str() == train_tokenizer(texts, 300).to_str()
    assert tok.token_to_id(EOS) == 0
    assert tok.decode(tok.encode(texts[0]).ids) == texts[0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        TrainConfig(seq_len=1)
    with pytest.raises(ValueError, match="hidden_size must be a multiple of 64"):
        TrainConfig(hidden_size=100)


def test_corpus_difference_against_the_shipped_model(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    rec = Corpus.from_stdlib(str(tmp_path)).record()
    diff = loop.corpus_difference(rec)
    # The shipped model's corpus (its training_record.json) is another file list.
    assert diff["python_version"] == "3.12.3" and diff["same_file_list"] is False
    assert diff["num_files"] == 517 and len(diff["held_out_only_there"]) == 15
    rec["vs_embedded_model"] = diff
    note = loop.corpus_note(rec)
    assert f"Python {rec['python_version']} stdlib, 1 files" in note and "3.12.3" in note
    same = loop.corpus_difference({**rec, "file_list_sha256": diff["file_list_sha256"]})
    assert same["same_file_list"] is True
    assert "unavailable" in loop.corpus_difference(rec, reference_dir=str(tmp_path))
