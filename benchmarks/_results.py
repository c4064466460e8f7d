"""Benchmark results as data: one JSON record per benchmark run in ``benchmarks/results.jsonl``.

Every benchmark ends by calling ``append_section(markdown, benchmark=...)`` with the section it prints (a
``## title (date)`` heading, bullets and tables). The writer adds what the run knows about itself (UTC date,
machine, devices, load average, command line, git commit), appends one line to ``results.jsonl`` and regenerates
the two markdown views:

- ``benchmarks/RESULTS.md``: the current figures. For each benchmark, machine and table layout, every row is its
  latest measurement (the last record that has it), with the run it comes from listed below the table.
- ``benchmarks/history.md``: every run in the order recorded, as it was printed (nothing is lost).

A record (one line of ``results.jsonl``)::

    {"schema": 1, "id": "r0042", "benchmark": "grams", "title": "grams", "heading": "grams (2026-11-25 23:24 UTC)",
     "date": "2026-11-25T23:24Z", "machine": "...", "device": "CPU, 2 cores", "load": "3.1 2.9 2.7",
     "command": "python benchmarks/grams.py ...", "commit": "a752922",
     "tables": [{"columns": ["measurement", ...], "rows": [["...", ...], ...]}], "markdown": "<the section body>"}

Fields that a run did not record (old sections seeded from the former append-only RESULTS.md) are null.

Command line::

    python benchmarks/_results.py render            # rewrite RESULTS.md and history.md from results.jsonl
    python benchmarks/_results.py render --check    # exit 1 if they are not what results.jsonl gives
    python benchmarks/_results.py ingest FILE ...   # add records: sections of a markdown file (a benchmark's
                                                    # --results file from another machine) or a .jsonl of records
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RECORDS = HERE / "results.jsonl"
CURRENT = HERE / "RESULTS.md"
HISTORY = HERE / "history.md"
SCHEMA = 1

# benchmark name from a section title (sections seeded from markdown, where no benchmark name was recorded)
_BENCHMARK_OF_TITLE = (("LLC accuracy", "llc_accuracy"), ("LLC", "llc"), ("grams", "grams"), ("eigen", "eigen"),
                       ("basis", "basis"), ("modularity", "modularity"), ("reliability", "reliability"),
                       ("sweep", "sweep"))


# ---------------------------------------------------------------------------------------------------------------
# reading markdown sections


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row; a cell's leading spaces beyond the first are kept (indented rows)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [c[1:].rstrip() if c.startswith(" ") else c.rstrip() for c in inner.split("|")]


def _tables(body: str) -> list[dict]:
    tables, block = [], []
    for line in body.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2 and re.fullmatch(r"[\s|:\-]+", block[1]):
            tables.append({"columns": [c.strip() for c in _cells(block[0])], "rows": [_cells(r) for r in block[2:]]})
        block = []
    return tables


def _first(pattern: str, *texts: str, flags=0) -> str | None:
    for text in texts:
        m = re.search(pattern, text, flags)
        if m:
            return " ".join(m.group(1).split())
    return None


def _device(machine: str | None, heading: str, body: str) -> str:
    """A short machine class: the accelerator's name, else "CPU, N cores"."""
    text = " ".join(t for t in (machine, heading) if t)
    devices = _first(r"devices?:?\s*(?:\d+\s*x\s*)?([^;,\n]+)", machine or "")
    gpu = _first(r"(NVIDIA [\w\- ]*?\w)(?:\s*\(|,|;|$| at| \d)", devices or "", text, body[:600])
    if gpu and not (devices and devices.lower().startswith("cpu")):
        return gpu
    cores = _first(r"(\d+) (?:shared )?(?:CPUs|cores)", text, body[:600])
    return f"CPU, {cores} cores" if cores else "CPU"


def parse_sections(text: str) -> list[dict]:
    """Records (without ``id``) from markdown: one per ``## `` section, in order, the body kept verbatim."""
    parts = re.split(r"^## ", text, flags=re.M)
    if parts[0].strip():
        raise ValueError("text before the first '## ' heading; each section must start with '## title (date)'.")
    out = []
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        heading = heading.strip()
        day = _first(r"(\d{4}-\d{2}-\d{2})", heading)
        clock = _first(r"(?:\d{4}-\d{2}-\d{2}[ T]|\()(\d{2}:\d{2})", heading)
        title = re.sub(r"\s*\((?=[^()]*\d{4}-\d{2}-\d{2})[^()]*\)\s*$", "", heading).strip()
        benchmark = next((b for prefix, b in _BENCHMARK_OF_TITLE if title.startswith(prefix)), "notes")
        machine = _first(r"^[-\s]*machine:\s*(.+)$", body, flags=re.M | re.I)
        machine = machine.replace("`", "") if machine else None
        command = _first(r"command[^`\n]*?:\s*`([^`]+)`", body, flags=re.I | re.S) or _first(
            r"`((?:\.venv/bin/)?python3? [^`]+)`", body)
        out.append({
            "schema": SCHEMA, "benchmark": benchmark, "title": title, "heading": heading,
            "date": None if day is None else day + (f"T{clock}Z" if clock else ""),
            "machine": machine, "device": _device(machine, heading, body),
            "load": _first(r"load(?: average)?[^0-9\n]{0,12}(\d+(?:\.\d+)?(?:\s*-\s*\d+(?:\.\d+)?)?)", heading, body),
            # the run's commit only where the text says so (prose also names other commits)
            "command": command, "commit": _first(r"(?:at commit|\(git) `?([0-9a-f]{7,40})\b", heading, body),
            "tables": _tables(body), "markdown": body.strip("\n"),
        })
    return out


# ---------------------------------------------------------------------------------------------------------------
# the records file


def load(path=RECORDS) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not a JSON record ({err.msg}); fix or remove that line.") from None
    return records


def _append(records: list[dict], path) -> list[dict]:
    """Appends records (numbered after those in ``path``) in one write; returns them with their ids."""
    path = pathlib.Path(path)
    start = len(load(path))
    numbered = [{"id": f"r{start + k + 1:04d}", **r} for k, r in enumerate(records)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in numbered)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write of whole lines: a crash leaves the earlier records intact
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return numbered


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def _this_run() -> dict:
    """What a run knows about itself: date, machine, device, load, command, commit."""
    devices = None
    if "jax" in sys.modules:  # the benchmark has imported JAX: name its devices (never import it here)
        jax = sys.modules["jax"]
        devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
               + (f"; jax {sys.modules['jax'].__version__}, devices: {devices}" if devices else ""))
    gpu = next((d.split(":", 1)[1] for d in (devices or "").split(", ") if d.startswith(("gpu:", "cuda:"))), None)
    argv = [os.path.relpath(sys.argv[0], HERE.parent) if sys.argv and os.path.exists(sys.argv[0]) else "?",
            *sys.argv[1:]]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": machine, "device": gpu or f"CPU, {os.cpu_count()} cores",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "python " + " ".join(argv), "commit": _git_commit(),
    }


def append_section(markdown: str, *, benchmark: str, results=None) -> dict:
    """Records one benchmark run from the markdown section it prints, and regenerates RESULTS.md and history.md.

    Args:
      markdown: ``"## title (date)\\n\\n- bullets ...\\n\\n| table |"``: one section, as the benchmark prints it.
      benchmark: the benchmark's name (its file name without ``.py``).
      results: where to write: None for ``benchmarks/results.jsonl`` (and the two markdown views); a ``.jsonl``
        path for a record file elsewhere (e.g. on another machine, to `ingest` later); a ``.md`` path to append
        the markdown there as before.

    Returns:
      The record written.
    """
    if results is not None and str(results).endswith(".md"):
        with open(results, "a") as f:
            f.write("\n" + markdown.strip("\n") + "\n")
        return {}
    (record,) = parse_sections(markdown.strip("\n") + "\n")
    record.update(benchmark=benchmark, **{k: v for k, v in _this_run().items() if v is not None})
    path = RECORDS if results is None else pathlib.Path(results)
    (record,) = _append([record], path)
    if path == RECORDS:
        render()
        print(f"recorded {record['id']} in {path.relative_to(HERE.parent)}; regenerated RESULTS.md and history.md")
    return record


# ---------------------------------------------------------------------------------------------------------------
# the markdown views

_HEADER = """# Benchmark results: the current figures

Generated from `benchmarks/results.jsonl` by `python benchmarks/_results.py render` (`make results`); do not edit
by hand. Each benchmark appends one record per run to `results.jsonl` (date, machine, load, command, git commit,
its tables). Here, for every benchmark, machine and table layout, each row is its latest measurement, with the run
it comes from; the runs are listed under each table. Every run as it was printed, with its settings and notes, is
in [history.md](history.md). Ratios (degenjax vs a baseline) are measured side by side in one run on one machine.
"""


def _when(r: dict) -> str:
    d = r.get("date")
    return "date not recorded" if not d else d.replace("T", " ").replace("Z", " UTC")


def _run_line(r: dict) -> str:
    bits = [_when(r)]
    if r.get("commit"):
        bits.append(f"commit {r['commit']}")
    if r.get("load"):
        bits.append(f"load {r['load']}")
    if r.get("machine"):
        bits.append(f"machine: {r['machine']}")
    cmd = f"`{r['command']}`" if r.get("command") else "command not recorded"
    return f"- {r['id']}: {cmd} ({'; '.join(bits)})"


def _keyed_rows(table: dict):
    """``[(parent, row)]``: an indented row (its label starts with spaces) belongs to the last row above it that
    is not indented."""
    out, parent = [], ""
    for row in table["rows"]:
        if row and not row[0].startswith(" "):
            parent = row[0].strip()
        out.append((parent if row and row[0].startswith(" ") else "", row))
    return out


def _unique_prefix(table: dict) -> int:
    """How many leading cells identify a row of this table: the fewest that are distinct on every row (a label,
    or e.g. size + method), at most all but the last column."""
    keyed = _keyed_rows(table)
    for n in range(1, max(len(table["columns"]), 2)):
        keys = [(parent, *[c.strip() for c in row[:n]]) for parent, row in keyed]
        if len(set(keys)) == len(keys):
            return n
    return max(len(table["columns"]) - 1, 1)


def _current_groups(records: list[dict]):
    """``{(benchmark, device, columns): {row_key: (record, row, parent)}}`` keeping each row's last record."""
    tables: dict = {}
    for r in records:
        for t in r.get("tables", []):
            tables.setdefault((r["benchmark"], r.get("device") or "CPU", tuple(t["columns"])), []).append((r, t))
    groups = {}
    for key, found in tables.items():
        n = max(_unique_prefix(t) for _, t in found)  # one row identity for the whole group
        rows = groups[key] = {}
        for r, t in found:
            for parent, row in _keyed_rows(t):
                k = (parent, *[c.strip() for c in row[:n]])
                rows.pop(k, None)  # re-insert: the dict's order is the order of the latest records
                rows[k] = (r, row, parent)
    return groups


# benchmarks in this order (others after them, most recently run first); machines: CPU before accelerators
_ORDER = ("llc", "llc_accuracy", "grams", "eigen", "basis", "modularity", "sweep", "reliability")


def render_current(records: list[dict]) -> str:
    groups = _current_groups(records)
    # A row also measured in a newer run with another table layout (same benchmark, machine and label) is shown
    # only there: a layout that a benchmark no longer prints keeps only the rows nothing newer replaced.
    newest: dict = {}
    for (benchmark, device, _), rows in groups.items():
        for (r, row, parent) in rows.values():
            k = (benchmark, device, parent, row[0].strip() if row else "")
            newest[k] = max(newest.get(k, ""), r["id"])
    recent = {b: k for k, b in enumerate(dict.fromkeys(r["benchmark"] for r in reversed(records)))}
    rank = {b: (0, _ORDER.index(b)) if b in _ORDER else (1, recent[b]) for b in recent}
    out, last_benchmark = [_HEADER], None

    device_latest: dict = {}
    for (benchmark, device, _), rows in groups.items():
        for (r, _, _) in rows.values():
            device_latest[benchmark, device] = max(device_latest.get((benchmark, device), 0), int(r["id"][1:]))

    def sort_key(item):  # per benchmark: CPU machines first, the most recently used machine first, then its tables
        (benchmark, device, _), rows = item
        return (rank[benchmark], not device.startswith("CPU"), -device_latest[benchmark, device], device,
                -max(int(v[0]["id"][1:]) for v in rows.values()))

    for (benchmark, device, columns), rows in sorted(groups.items(), key=sort_key):
        rows = {k: v for k, v in rows.items()
                if v[0]["id"] == newest[(benchmark, device, v[2], v[1][0].strip() if v[1] else "")]}
        if not rows:
            continue
        latest = max((v[0] for v in rows.values()), key=lambda r: r["id"])
        runs = sorted({v[0]["id"]: v[0] for v in rows.values()}.values(), key=lambda r: r["id"], reverse=True)
        if benchmark != last_benchmark:
            out += [f"## {benchmark}", ""]
            last_benchmark = benchmark
        out += [f"### {latest['title']} ({device})", ""]
        out.append("| " + " | ".join((*columns, "run")) + " |")
        out.append("|" + "---|" * (len(columns) + 1))
        # rows of the latest run first (in its order), then those only older runs have, newest run first
        by_run = {run["id"]: [] for run in runs}
        for (r, row, parent) in rows.values():
            by_run[r["id"]].append((row, parent))
        for rid, entries in by_run.items():
            shown = {row[0].strip() for row, _ in entries}
            for row, parent in entries:
                cells = list(row) + [""] * (len(columns) - len(row))
                if cells[0].startswith(" ") and parent not in shown:  # its parent row comes from another run
                    cells[0] = f"{parent} / {cells[0].strip()}"
                out.append("| " + " | ".join((*cells, rid)) + " |")
        out += ["", "Runs:", "", *(_run_line(r) for r in runs), ""]
    notes = [r for r in records if not r.get("tables")]
    if notes:
        out += ["## Notes", "", "Sections without a table (sessions, diagnoses), in history.md:", ""]
        out += [f"- {r['id']}: {r['heading']}" for r in notes] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def render_history(records: list[dict]) -> str:
    out = ["# Benchmark history: every recorded run, in the order recorded", "",
           "Generated from `benchmarks/results.jsonl` by `python benchmarks/_results.py render`; do not edit by hand. "
           "The current figures are in [RESULTS.md](RESULTS.md).", ""]
    for r in records:
        out += [f"## {r['heading']}", "", f"<!-- {r['id']}: benchmark {r['benchmark']} -->", ""]
        if r.get("markdown"):
            out += [r["markdown"], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render(records_path=RECORDS, current=CURRENT, history=HISTORY, check: bool = False) -> bool:
    """Writes (or with ``check``, compares) the two markdown views; returns whether they were up to date."""
    records = load(records_path)
    fresh = True
    for path, text in ((pathlib.Path(current), render_current(records)),
                       (pathlib.Path(history), render_history(records))):
        same = path.exists() and path.read_text() == text
        fresh &= same
        if not check and not same:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return fresh


def ingest(paths, records_path=RECORDS) -> list[dict]:
    """Adds the sections of markdown files / the records of .jsonl files, in the order given, and re-renders."""
    new = []
    for p in map(pathlib.Path, paths):
        if p.suffix == ".jsonl":
            new += [{k: v for k, v in r.items() if k != "id"} for r in load(p)]
        else:
            new += parse_sections(p.read_text().lstrip("\n"))
    added = _append(new, records_path)
    if pathlib.Path(records_path) == RECORDS:
        render()
    return added


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="regenerate RESULTS.md and history.md from results.jsonl")
    r.add_argument("--check", action="store_true", help="only check that they are up to date (exit 1 if not)")
    i = sub.add_parser("ingest", help="append records from markdown sections or .jsonl record files")
    i.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "render":
        fresh = render(check=args.check)
        if args.check and not fresh:
            print("RESULTS.md / history.md differ from results.jsonl: run `python benchmarks/_results.py render`.")
            return 1
        return 0
    added = ingest(args.files)
    print(f"added {len(added)} records ({added[0]['id']}..{added[-1]['id']})" if added else "added nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
