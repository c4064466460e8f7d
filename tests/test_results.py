"""Benchmark results as data: benchmarks/RESULTS.md and history.md are exactly what benchmarks/results.jsonl gives,
and the shared writer records a run with its date, machine, load, command and commit."""

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _results  # noqa: E402

# Benchmarks that still append markdown to RESULTS.md themselves (edited on other branches at the time of writing):
# each should end with `_results.append_section(section, benchmark=...)` like grams.py, eigen.py and modularity.py.
NOT_YET_WIRED: set[str] = set()


def test_results_markdown_is_generated_from_the_records():
    records = _results.load()
    assert records, "benchmarks/results.jsonl is empty"
    ids = [r["id"] for r in records]
    assert ids == [f"r{k:04d}" for k in range(1, len(ids) + 1)]
    for r in records:
        assert {"schema", "benchmark", "title", "heading", "date", "machine", "device", "load", "command", "commit",
                "tables", "markdown"} <= set(r), r["id"]
        assert r["date"] is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}Z)?", r["date"]), r["date"]
        for t in r["tables"]:
            assert t["columns"] and all(len(row) <= len(t["columns"]) for row in t["rows"]), r["id"]
    assert _results.render(check=True), ("benchmarks/RESULTS.md or history.md is not what results.jsonl gives: a "
                                         "section was appended by hand or by a benchmark not using _results.py; "
                                         "add it with `python benchmarks/_results.py ingest FILE` and re-render.")


def test_benchmarks_record_through_the_shared_writer():
    appends = re.compile(r"RESULTS(\.md)?\b.*[\"']a[\"']|open\([^)]*results[^)]*,\s*[\"']a[\"']")
    direct = {p.name for p in (ROOT / "benchmarks").glob("*.py")
              if p.name != "_results.py" and appends.search(p.read_text())}
    wired = {p.name for p in (ROOT / "benchmarks").glob("*.py") if "append_section(" in p.read_text()}
    assert {"grams.py", "eigen.py", "modularity.py"} <= wired
    assert direct == NOT_YET_WIRED, "update NOT_YET_WIRED: these benchmarks write RESULTS.md themselves"


SECTION = """## toy: a benchmark ({date})

- machine: test box, 2 CPUs
- command: `python benchmarks/toy.py --n {n}`

| measurement | degenjax | baseline |
|---|---|---|
| speed, n={n} | {a} s | {b} s |
|   ratio | {r}x | |
| only in run {run} | 1 | 2 |
"""


def test_writer_keeps_the_latest_value_per_row_and_the_whole_history(tmp_path):
    path = tmp_path / "r.jsonl"
    first = _results.append_section(SECTION.format(date="2026-01-01 10:00 UTC", n=10, a=2.0, b=6.0, r=3.0, run=1),
                                    benchmark="toy", results=path)
    second = _results.append_section(SECTION.format(date="2026-01-02 10:00 UTC", n=10, a=1.0, b=5.0, r=5.0, run=2),
                                     benchmark="toy", results=path)
    assert (first["id"], second["id"]) == ("r0001", "r0002")
    # what the run knows about itself
    for rec in (first, second):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z", rec["date"])
        assert rec["command"].startswith("python ") and len(rec["load"].split()) == 3
        assert rec["machine"] and rec["device"].startswith("CPU") and rec["commit"]
    assert second["tables"] == [{"columns": ["measurement", "degenjax", "baseline"],
                                 "rows": [["speed, n=10", "1.0 s", "5.0 s"], ["  ratio", "5.0x", ""],
                                          ["only in run 2", "1", "2"]]}]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == ["r0001", "r0002"]
    current = _results.render_current(records)
    table = [l for l in current.splitlines() if l.startswith("| ")]
    assert table == ["| measurement | degenjax | baseline | run |", "| speed, n=10 | 1.0 s | 5.0 s | r0002 |",
                     "|   ratio | 5.0x |  | r0002 |", "| only in run 2 | 1 | 2 | r0002 |",
                     "| only in run 1 | 1 | 2 | r0001 |"]
    assert "- r0002: `python" in current and "- r0001: `python" in current
    history = _results.render_history(records)
    assert history.count("## toy: a benchmark") == 2 and "| 2.0 s | 6.0 s |" in history and "| 1.0 s | 5.0 s |" in history
    # render / check against files
    cur, hist = tmp_path / "RESULTS.md", tmp_path / "history.md"
    assert not _results.render(path, cur, hist, check=True)
    _results.render(path, cur, hist)
    assert _results.render(path, cur, hist, check=True) and cur.read_text() == current


def test_markdown_sections_parse_into_records():
    (rec,) = _results.parse_sections(
        "## grams (2026-11-25 23:24 UTC)\n\n- machine: Linux-x86_64, x86_64, 2 CPUs (shared); jax 0.10.2, devices: "
        "cpu:0\n- command: `.venv/bin/python benchmarks/grams.py --n-act 200`\n\nload average 3.5 during the run, "
        "at commit abc1234.\n\n| a | b |\n| --- | --- |\n| x | 1 |\n")
    assert rec["benchmark"] == "grams" and rec["title"] == "grams" and rec["date"] == "2026-11-25T23:24Z"
    assert rec["command"] == ".venv/bin/python benchmarks/grams.py --n-act 200"
    assert rec["device"] == "CPU, 2 cores" and rec["load"] == "3.5" and rec["commit"] == "abc1234"
    assert rec["tables"] == [{"columns": ["a", "b"], "rows": [["x", "1"]]}]
    (gpu,) = _results.parse_sections("## LLC: x (2026-11-26 03:11 UTC)\n\n- machine: `Linux-gpu`, 16 CPUs; jax "
                                     "0.11.2 devices: gpu:NVIDIA H200\n")
    assert gpu["benchmark"] == "llc" and gpu["device"] == "NVIDIA H200" and gpu["tables"] == []
    with pytest.raises(ValueError, match="before the first"):
        _results.parse_sections("text\n## a (2026-01-01)\n")
