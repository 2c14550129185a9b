"""gdn_jax.progress: off a terminal every phase prints plain start and end lines with sane labels,
a counted loop prints lines with its counts, and GDN_JAX_PROGRESS=0 silences both."""

import io

from gdn_jax.progress import Progress, Steps


def test_phases_print_plain_lines_off_a_terminal():
    out = io.StringIO()  # not a tty
    p = Progress(2, file=out)
    with p.phase("load the model"):
        pass
    with p.phase("compile"):
        pass
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[gdn-jax] 1/2 load the model ..."
    assert lines[1].startswith("[gdn-jax] 1/2 load the model: ") and lines[1].endswith(" s")
    assert lines[2] == "[gdn-jax] 2/2 compile ..." and len(lines) == 4
    assert ": :" not in out.getvalue() and "\r" not in out.getvalue()
    assert set(p.times) == {"load the model", "compile"}


def test_steps_print_counts_off_a_terminal():
    out = io.StringIO()
    s = Steps(10, "train", unit="step", file=out, every_s=0.0)
    s.update(5, loss="3.210")
    s.update(5, loss="2.500")
    s.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[gdn-jax] train: 0/10 steps")
    assert "5/10 steps" in lines[1] and "ETA" in lines[1] and "loss 3.210" in lines[1]
    assert "10/10 steps" in lines[-1] and "loss 2.500" in lines[-1]


def test_progress_can_be_silenced(monkeypatch):
    out = io.StringIO()
    with Progress(1, file=out, enabled=False).phase("x"):
        pass
    monkeypatch.setenv("GDN_JAX_PROGRESS", "0")
    s = Steps(2, "y", file=out)
    s.update(2)
    s.close()
    assert out.getvalue() == ""
