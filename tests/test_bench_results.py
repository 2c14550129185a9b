"""bench/results/headline.json, the project's scoreboard, keeps its convention: a
JSON list of {"metric", "value", "unit", "target", "device", "date", "source"}, one entry per
metric, each figure backed by a committed results file (the developers' guide says so)."""

import datetime
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = os.path.join(ROOT, "bench", "results", "headline.json")
FIELDS = {"metric", "value", "unit", "target", "device", "date", "source"}


def test_headline_entries_follow_the_convention():
    with open(HEADLINE) as f:
        entries = json.load(f)
    assert isinstance(entries, list) and entries
    metrics = [e.get("metric") for e in entries]
    assert len(set(metrics)) == len(metrics), f"a metric twice: {sorted(metrics)}"
    for e in entries:
        name = e.get("metric")
        assert set(e) == FIELDS, f"{name}: fields {sorted(e)}, expected {sorted(FIELDS)}"
        assert isinstance(e["value"], (int, float)) and not isinstance(e["value"], bool), name
        assert all(isinstance(e[k], str) and e[k] for k in FIELDS - {"value"}), name
        datetime.date.fromisoformat(e["date"])  # YYYY-MM-DD
        for source in e["source"].split(","):  # one results file, or several
            path = os.path.join(ROOT, source.strip())
            assert os.path.exists(path), f"{name}: source {source.strip()} is not committed"
