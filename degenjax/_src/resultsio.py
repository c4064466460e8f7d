"""Results I/O: one way to turn results into JSON-ready values and to write JSON, JSONL and CSV files.

Every writer of the application layer (the quickstart report, the CLI's summaries, sweep rows) goes through
`json_ready`, so a value is written the same way everywhere: arrays and NumPy scalars become Python numbers and
lists, NamedTuples (the typed results) and dicts become objects, and NaN / inf become ``null`` (valid JSON; Python's
``json`` would write the invalid token ``NaN``). Files are replaced atomically (temp file + rename) or, for JSONL,
appended with one ``write`` followed by ``fsync``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def json_ready(obj):
    """``obj`` with every array, NumPy scalar, NamedTuple and tuple converted to JSON types; NaN and inf to None.

    Args:
      obj: a number, string, bool, None, array (JAX or NumPy), NumPy scalar, NamedTuple, dict, list or tuple,
        nested in any way.

    Returns:
      The same structure made of dicts, lists, str, int, float (finite), bool and None.

    Raises:
      TypeError: for an object that has no JSON form (naming its type).
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    if hasattr(obj, "_asdict"):  # a NamedTuple result
        return {str(k): json_ready(v) for k, v in obj._asdict().items()}
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "__array__"):
        a = np.asarray(obj)
        if a.dtype == object:
            return [json_ready(v) for v in a.tolist()]
        return json_ready(a.tolist()) if a.ndim else json_ready(a.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj, *, indent: int | None = None) -> str:
    """JSON text of ``json_ready(obj)`` (strict: no ``NaN`` tokens)."""
    return json.dumps(json_ready(obj), indent=indent, allow_nan=False)


def _replace_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj, *, indent: int = 1) -> None:
    """Writes ``obj`` (see `json_ready`) as JSON to ``path``, atomically (temp file + rename)."""
    _replace_atomically(pathlib.Path(path), dumps(obj, indent=indent) + "\n")


def append_jsonl(path, row) -> None:
    """Appends ``row`` as one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``.

    A process killed during the call leaves either no line or the whole line.
    """
    data = (dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # only possible on a full disk: fail loudly rather than leave half a record
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes); is the disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path) -> list:
    """The rows of a JSONL file (a torn last line, left by a crash mid-write, is skipped)."""
    rows = []
    lines = pathlib.Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def write_csv(path, rows: Iterable, columns: Sequence[str]) -> None:
    """Writes ``rows`` (dicts or NamedTuples) as CSV with the given ``columns``, atomically.

    Missing values and None are empty cells; lists are joined with ``;`` (None entries as ``nan``).
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        r = json_ready(r)
        vals = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, list):
                v = ";".join("nan" if x is None else repr(x) for x in v)
            vals.append("" if v is None else v)
        w.writerow(vals)
    _replace_atomically(pathlib.Path(path), buf.getvalue())
