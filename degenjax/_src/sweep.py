"""Resumable LLC sweeps: checkpoints x a grid of step size / nbeta / localization (the LLC of arXiv 2405.10927).

A sweep is described by a TOML file::

    entry = "my_package.problem:make"      # module:function returning (loss_fn, params, data)
    entry_version = "v3"                   # optional: identifies the entry's code instead of its source files
    checkpoints = ["ckpts/*.msgpack"]      # files or orbax folders; globs relative to this file
    seed = 0

    [sampler]                              # estimate_llc keywords shared by every cell
    num_chains = 4
    num_draws = 200
    batch_size = 64

    [grid]                                 # one cell per checkpoint and combination
    step_size = [1e-4, 1e-3]
    nbeta = ["default", 30.0]              # "default" = 1/log(n) tempering (nbeta=None)
    localization = [1.0, 100.0]

**Results.** Every finished cell is appended as one JSON line to ``OUT/results.jsonl`` with a single ``write`` on
an ``O_APPEND`` descriptor followed by ``fsync``; its loss traces go first to ``OUT/traces/*.npz`` (temp file,
``fsync``, rename); ``results.csv`` is regenerated from the JSON lines (temp file + rename). A rerun reads the
finished cells and computes only the others, so a crash or SIGKILL at any point loses at most the cell in flight
and never duplicates one. Each cell's PRNG key depends only on ``seed`` and the cell (checkpoint name and grid
values), so results do not depend on the order in which cells were run or on how often the sweep was interrupted.

**Identity.** A cell's result is determined by the checkpoint's *content* (SHA-256), the entry point's code (the
``.py`` files of its module's folder, or ``entry_version``), the sampler settings (after defaults are filled in),
the seed, the grid values, float64 on/off, the JAX backend and number of devices the chains are sharded over, and
the versions of degenjax, jax and jaxlib. ``OUT/sweep.json`` records the sweep-wide part and every result line the
rest, so a rerun never reuses a result that another checkpoint, entry point or setting produced: it refuses with a
message naming what changed. The grid and the list of checkpoints may grow between runs.

**Failures.** Everything that can be checked before computing (the config, the entry point, the sampler settings
against the data, a writable ``OUT``) is checked before ``sweep.json`` is written. A checkpoint that cannot be
loaded (or a cell that raises a ``ValueError``) fails only its cells: the reason is recorded in the ``error``
column and the sweep goes on; a rerun retries failed cells.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import glob
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pathlib
import re
import sys
import time
import tomllib
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from degenjax._src.diagnostics import convergence
from degenjax._src.validation import check_seed, check_writable

FORMAT = 2  # of sweep.json and the result lines; 1 = before content hashes (degenjax <= 0.1.0 main of 2026-11)
GRID_AXES = ("step_size", "nbeta", "localization")
SAMPLER_KEYS = ("num_chains", "num_draws", "batch_size", "num_burnin", "sampler")
_SAMPLER_INT_KEYS = ("num_chains", "num_draws", "batch_size", "num_burnin")
_TOP_KEYS = ("entry", "entry_version", "checkpoints", "seed", "sampler", "grid")
CSV_COLUMNS = ("checkpoint", "step", "step_size", "nbeta", "localization", "llc_mean", "llc_std", "n_eff",
               "init_loss", "mala_acceptance", "ess", "rhat", "llc_mcse", "converged", "diverged", "error", "seconds",
               "llc_per_chain", "trace_file", "checkpoint_sha256", "cell")
_ROW_KEYS = ("cell", "checkpoint", "step_size", "nbeta", "localization")


# ---------------------------------------------------------------------------------------------------------------
# entry points


def _import_entry(spec: str, search_dirs: Iterable[str | os.PathLike] = ()):
    """Imports the module of ``"package.module:function"``; returns ``(module, attribute)``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"Entry point {spec!r} is not of the form 'package.module:function'.")
    mod_name, attr = spec.split(":")
    dirs = [str(pathlib.Path(d).resolve()) for d in search_dirs]
    for d in reversed(dirs):
        if d not in sys.path:
            sys.path.insert(0, d)
    reloaded = _drop_stale_module(mod_name, dirs)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"Entry point {spec!r}: cannot import module {mod_name!r} ({err}). Check the name and "
                         "that its folder is the current directory, the config's folder, or installed.") from err
    except SyntaxError as err:
        raise ValueError(f"Entry point {spec!r}: module {mod_name!r} has a syntax error ({err.filename} line "
                         f"{err.lineno}: {err.msg}).") from err
    except Exception as err:  # noqa: BLE001 - the user's module failed; say so in one line, keep the cause chained
        raise ValueError(f"Entry point {spec!r}: importing module {mod_name!r} raised {type(err).__name__}: {err} "
                         f"(run `python -c \"import {mod_name}\"` in that folder for the traceback).") from err
    file = getattr(module, "__file__", None)
    if file is not None and (reloaded or file not in _IMPORTED):
        _IMPORTED[file] = _file_digest(file)
    return module, attr


_IMPORTED: dict[str, str] = {}  # module file -> sha256 of its source when this process imported it


def _file_digest(path) -> str | None:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _drop_stale_module(mod_name: str, dirs: list[str]) -> bool:
    """Forgets an imported entry module (and its package) that is not the one the search folders hold now.

    In one Python session two sweeps may name the same module in different folders, or the module may be edited
    between two sweeps; Python's import cache would silently keep running the first one.
    """
    import importlib.machinery

    top = mod_name.split(".")[0]
    cached = sys.modules.get(top)
    if cached is None or not dirs or top == "degenjax" or top in sys.stdlib_module_names:
        return False
    cached_file = getattr(cached, "__file__", None) or ""
    if "site-packages" in cached_file or "dist-packages" in cached_file:
        return False  # an installed package is not the user's folder of entry modules
    found = importlib.machinery.PathFinder.find_spec(top, dirs)
    stale = found is not None and found.origin is not None and bool(cached_file) and (
        os.path.realpath(found.origin) != os.path.realpath(cached_file))
    if not stale:
        module = sys.modules.get(mod_name)
        file = getattr(module, "__file__", None)
        stale = file is not None and file in _IMPORTED and _IMPORTED[file] != _file_digest(file)
    if stale:
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
    return stale


def load_entry_point(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Callable:
    """Imports ``"package.module:function"`` and returns the function.

    Args:
      spec: ``module:attribute`` (the attribute may be dotted, e.g. ``"pkg.mod:Class.method"``).
      search_dirs: folders put at the front of ``sys.path`` first (e.g. the config file's folder and the
        current directory), so that a user's local module is found without installing it.

    Raises:
      ValueError: malformed spec, module not importable, or attribute missing / not callable.
    """
    obj, attr = _import_entry(spec, search_dirs)
    mod_name = obj.__name__
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Entry point {spec!r}: module {mod_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Entry point {spec!r} is not callable (got {type(obj).__name__}).")
    return obj


def load_problem(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> tuple[Callable, Any, Any]:
    """Calls an entry point and checks that it returned ``(loss_fn, params, data)``."""
    out = call_entry_point(spec, search_dirs)
    if not (isinstance(out, tuple) and len(out) == 3 and callable(out[0])):
        raise ValueError(f"Entry point {spec!r} must return a tuple (loss_fn, params, data) with loss_fn(params, "
                         f"batch) -> scalar; got {type(out).__name__}.")
    return out


def call_entry_point(spec: str, search_dirs: Iterable[str | os.PathLike] = ()):
    """Imports and calls an entry point; an exception inside the user's function becomes a one-line ValueError
    naming the entry point (with the original exception chained as its cause)."""
    fn = load_entry_point(spec, search_dirs)
    try:
        return fn()
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code failed; report it in one line
        raise ValueError(f"Entry point {spec!r} raised {type(err).__name__}: {err}") from err


def entry_source_digests(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> dict[str, str] | None:
    """SHA-256 of the ``.py`` files in the folder of the entry point's module (None: a module without a file).

    The folder (not only the module's file) is hashed so that an edited helper module next to the entry point
    counts as a change too. Code elsewhere (an installed package the entry imports) is covered by ``entry_version``.

    Raises:
      ValueError: the entry point's module cannot be imported.
    """
    load_entry_point(spec, search_dirs)
    module, _ = _import_entry(spec, search_dirs)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    folder = pathlib.Path(file).resolve().parent
    out = {}
    for f in sorted(folder.glob("*.py")):
        with contextlib.suppress(OSError):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A parsed sweep configuration.

    Attributes:
      entry: ``module:function`` returning ``(loss_fn, params, data)``.
      checkpoints: ``(name, path)`` pairs; ``path`` is None for the entry point's own parameters.
      seed: base PRNG seed.
      sampler: `estimate_llc` keywords shared by all cells, with the defaults filled in (so that writing a
        default explicitly is the same sweep).
      grid: ``{axis: tuple of values}`` for the axes in `GRID_AXES`; nbeta None means the default.
      base_dir: the config file's folder (entry modules and relative checkpoint paths are resolved there).
      entry_version: a user-given version of the entry point's code, used instead of hashing its source files.
    """

    entry: str
    checkpoints: tuple[tuple[str, str | None], ...]
    seed: int
    sampler: dict
    grid: dict
    base_dir: str
    entry_version: str | None = None

    def cells(self) -> list[dict]:
        """All cells, checkpoint-major, each ``{"checkpoint", "step_size", "nbeta", "localization", "cell"}``."""
        out = []
        for name, _ in self.checkpoints:
            for s in self.grid["step_size"]:
                for b in self.grid["nbeta"]:
                    for g in self.grid["localization"]:
                        c = {"checkpoint": name, "step_size": s, "nbeta": b, "localization": g}
                        c["cell"] = cell_id(c)
                        out.append(c)
        return out

    def fingerprint(self) -> dict:
        """The settings every cell shares (entry, its version if given, seed, sampler with defaults filled)."""
        return {"entry": self.entry, "entry_version": self.entry_version, "seed": self.seed,
                "sampler": dict(sorted(self.sampler.items()))}


def cell_id(cell: dict) -> str:
    """A stable text identity of a cell's place in the grid (checkpoint name and grid values)."""
    b = "default" if cell["nbeta"] is None else repr(float(cell["nbeta"]))
    return f"{cell['checkpoint']}|step_size={float(cell['step_size'])!r}|nbeta={b}|localization={float(cell['localization'])!r}"


def checkpoint_step(name: str) -> int | None:
    """The training step in a checkpoint's name: the last number of its file (or folder) name, e.g.
    ``ckpts/step_00300.msgpack`` -> 300, ``run/checkpoint-1500`` -> 1500; None when the name has no number."""
    found = re.findall(r"\d+", pathlib.PurePath(str(name)).name.split(".")[0])
    if not found:
        found = re.findall(r"\d+", pathlib.PurePath(str(name)).name)
    return int(found[-1]) if found else None


def _sampler_defaults() -> dict:
    """`estimate_llc`'s defaults of the optional [sampler] keys (read from its signature, so they stay in sync)."""
    from degenjax._src.llc import estimate_llc

    params = inspect.signature(estimate_llc).parameters
    return {k: params[k].default for k in ("num_burnin", "sampler") if k in params}


def _positive_list(name: str, raw, allow_default: bool = False) -> tuple:
    values = raw if isinstance(raw, list) else [raw]
    out = []
    for v in values:
        if allow_default and v in ("default", None):
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            out.append(float(v))
        else:
            extra = ' or "default"' if allow_default else ""
            raise ValueError(f"[grid] {name}: {v!r} is not a positive number{extra}.")
    if not out:
        raise ValueError(f"[grid] {name} is an empty list; give at least one value.")
    if len(set(out)) != len(out):
        raise ValueError(f"[grid] {name} has repeated values {values}; list each value once.")
    return tuple(out)


def parse_sweep_config(raw: dict, base_dir: str | os.PathLike = ".") -> SweepConfig:
    """Validates a sweep config given as a dict (the parsed TOML).

    Raises:
      ValueError: naming the offending key and what it should be.
    """
    from degenjax._src.sgld import resolve_sampler

    base = pathlib.Path(base_dir).resolve()
    unknown = set(raw) - set(_TOP_KEYS)
    if unknown:
        raise ValueError(f"Unknown config keys {sorted(unknown)}; allowed: {list(_TOP_KEYS)}.")
    entry = raw.get("entry")
    if not isinstance(entry, str) or entry.count(":") != 1 or not all(entry.split(":")):
        raise ValueError("Config needs entry = \"package.module:function\" (returning (loss_fn, params, data)).")
    version = raw.get("entry_version")
    if version is not None and (not isinstance(version, str) or not version.strip()):
        raise ValueError(f"entry_version must be a non-empty string (e.g. \"v2\" or a git commit); got {version!r}.")
    seed = check_seed(raw.get("seed", 0), "seed")

    sampler = raw.get("sampler", {})
    if not isinstance(sampler, dict):
        raise ValueError("[sampler] must be a table of estimate_llc keywords.")
    bad = set(sampler) - set(SAMPLER_KEYS)
    if bad:
        raise ValueError(f"Unknown [sampler] keys {sorted(bad)}; allowed: {list(SAMPLER_KEYS)}. Grid values go in [grid].")
    for k in ("num_chains", "num_draws", "batch_size"):
        if k not in sampler:
            raise ValueError(f"[sampler] needs {k} (an integer).")
    for k in _SAMPLER_INT_KEYS:
        if k in sampler and (not isinstance(sampler[k], int) or isinstance(sampler[k], bool) or sampler[k] < 0
                             or (k != "num_burnin" and sampler[k] == 0)):
            kind = "a non-negative" if k == "num_burnin" else "a positive"
            raise ValueError(f"[sampler] {k} must be {kind} integer, got {sampler[k]!r}.")
    if "sampler" in sampler:
        if not isinstance(sampler["sampler"], str):
            raise ValueError(f"[sampler] sampler must be a name (a string); got {sampler['sampler']!r}.")
        try:
            resolve_sampler(sampler["sampler"])
        except ValueError as err:
            raise ValueError(f"[sampler] {err}") from None
    sampler = {**_sampler_defaults(), **sampler}

    grid = raw.get("grid")
    if not isinstance(grid, dict):
        raise ValueError("Config needs a [grid] table with step_size (and optionally nbeta, localization).")
    bad = set(grid) - set(GRID_AXES)
    if bad:
        raise ValueError(f"Unknown [grid] keys {sorted(bad)}; allowed: {list(GRID_AXES)}.")
    if "step_size" not in grid:
        raise ValueError("[grid] needs step_size = [ ... ].")
    grid = {
        "step_size": _positive_list("step_size", grid["step_size"]),
        "nbeta": _positive_list("nbeta", grid.get("nbeta", ["default"]), allow_default=True),
        "localization": _positive_list("localization", grid.get("localization", [1.0])),
    }

    ckpts = raw.get("checkpoints")
    if ckpts is None:
        pairs = (("entry", None),)
    else:
        if isinstance(ckpts, str):
            ckpts = [ckpts]
        if not isinstance(ckpts, list) or not all(isinstance(c, str) for c in ckpts):
            raise ValueError("checkpoints must be a list of paths or globs (strings).")
        if not ckpts:
            raise ValueError("checkpoints is an empty list; give at least one path or glob, or leave it out to use "
                             "the entry point's own parameters.")
        pairs = []
        for pattern in ckpts:
            full = pattern if os.path.isabs(pattern) else str(base / pattern)
            matches = sorted(glob.glob(full)) if glob.has_magic(full) else ([full] if os.path.exists(full) else [])
            if not matches:
                raise ValueError(f"checkpoints: {pattern!r} matches no file or folder (relative to {base}).")
            for m in matches:
                p = pathlib.Path(m)
                try:
                    name = str(p.resolve().relative_to(base))
                except ValueError:
                    name = str(p.resolve())
                pairs.append((name, str(p.resolve())))
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints lists the same file twice: {names}.")
        pairs = tuple(pairs)
    return SweepConfig(entry=entry, checkpoints=pairs, seed=seed, sampler=dict(sampler), grid=grid,
                       base_dir=str(base), entry_version=version)


def load_sweep_config(path) -> SweepConfig:
    """Reads and validates a sweep TOML file (see the module docstring for the format).

    Raises:
      ValueError: missing file, TOML syntax error, or invalid settings.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"Sweep config not found: {path}.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"Malformed TOML in {path}: {err}.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Cannot read the sweep config {path}: {err}.") from err
    try:
        return parse_sweep_config(raw, path.parent)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------------------------------
# identity


def sweep_identity(config: SweepConfig, *, chain_devices: int | None = None) -> dict:
    """Everything besides the checkpoint and the grid values that determines a cell's result (see module docs).

    Args:
      config: the sweep.
      chain_devices: number of devices the chains are sharded over (default: as `make_llc_cell` shards them).

    Raises:
      ValueError: the entry point cannot be imported.
    """
    import jaxlib

    from degenjax import __version__

    search = [config.base_dir, os.getcwd()]
    source = None if config.entry_version is not None else entry_source_digests(config.entry, search)
    if config.entry_version is not None:
        load_entry_point(config.entry, search)  # importable?
    if chain_devices is None:
        mesh = chain_mesh(config.sampler["num_chains"])
        chain_devices = 1 if mesh is None else mesh.size
    return {"format": FORMAT, **config.fingerprint(), "entry_source": source,
            "x64": bool(jax.config.jax_enable_x64), "backend": jax.default_backend(),
            "chain_devices": int(chain_devices), "degenjax": __version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__}


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _describe_change(stored: dict, now: dict) -> str:
    """What differs between two identities, in words."""
    parts = []
    for k in sorted(set(stored) | set(now)):
        a, b = stored.get(k), now.get(k)
        if a == b:
            continue
        if k == "entry_source" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            parts.append(f"the entry point's source changed ({', '.join(changed)}; if that cannot change the "
                         "results, set entry_version in the config to name the code's version yourself)")
        elif k == "sampler" and isinstance(a, dict) and isinstance(b, dict):
            for kk in sorted(set(a) | set(b)):
                if a.get(kk) != b.get(kk):
                    parts.append(f"[sampler] {kk}: {a.get(kk)!r} -> {b.get(kk)!r}")
        elif k == "format":
            parts.append(f"it was written by another degenjax version (format {a!r}, now {b!r})")
        else:
            parts.append(f"{k}: {a!r} -> {b!r}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# results file


def _clean(v):
    """JSON-safe scalars: non-finite floats become None."""
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
        a = np.asarray(v)
        return _clean(a.tolist()) if a.ndim else _clean(a.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_result(path, row: dict) -> None:
    """Appends one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``.

    A process killed during the call leaves either no line or the whole line (a torn final line, which only a
    power loss could leave, is dropped by `read_results`).
    """
    data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # only possible on a full disk: fail loudly rather than leave half a record
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes); is the disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_failed(row: dict) -> bool:
    return bool(row.get("error"))


def read_results(path, *, repair: bool = False) -> list[dict]:
    """Reads ``results.jsonl``: one row per cell, the first successful copy, else the last failed one.

    A torn last line is dropped (and removed from the file when ``repair``).

    Raises:
      ValueError: a line other than the last is not valid JSON or not a sweep result (the file was edited or
        corrupted); the message names the file and the line.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    body = lines[:-1]
    ok: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    order: list[str] = []
    for i, line in enumerate(body):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); remove that line to resume.") from err
        if not isinstance(row, dict) or not isinstance(row.get("cell"), str) or any(k not in row for k in _ROW_KEYS):
            raise ValueError(f"{path} line {i + 1} is not a sweep result (it needs the keys {list(_ROW_KEYS)}); "
                             "remove that line to resume.")
        c = row["cell"]
        if c not in ok and c not in failed:
            order.append(c)
        if _is_failed(row):
            failed[c] = row
        elif c not in ok:
            ok[c] = row
    if torn and repair:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(l + b"\n" for l in body))
        os.replace(tmp, path)
    return [ok.get(c) or failed[c] for c in order]


def write_csv(rows: list[dict], path) -> None:
    """Regenerates ``results.csv`` from result rows (temp file + rename)."""
    path = pathlib.Path(path)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        vals = []
        for c in CSV_COLUMNS:
            v = r.get(c)
            if c == "nbeta" and v is None:
                v = r.get("nbeta_used")
            if isinstance(v, list):
                v = ";".join("nan" if x is None else repr(x) for x in v)
            vals.append("" if v is None else v)
        w.writerow(vals)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def trace_path(out_dir, cell: dict) -> pathlib.Path:
    """Where a cell's loss traces are saved: ``OUT/traces/<readable cell name>-<hash>.npz``."""
    label = re.sub(r"[^A-Za-z0-9._=-]+", "_", cell["cell"])[:150]
    digest = hashlib.sha256(cell["cell"].encode()).hexdigest()[:10]
    return pathlib.Path(out_dir) / "traces" / f"{label}-{digest}.npz"


def _save_npz_atomic(path: pathlib.Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_traces(out_dir, row: dict) -> dict:
    """The arrays saved for a result row: ``loss_trace`` (chains, draws), ``init_loss``, ``llc_per_chain``, ..."""
    if not row.get("trace_file"):
        raise ValueError(f"Cell {row.get('cell')!r} has no saved traces (failed, or computed by a custom cell).")
    with np.load(pathlib.Path(out_dir) / row["trace_file"]) as z:
        return {k: z[k] for k in z.files}


@contextlib.contextmanager
def _exclusive(out: pathlib.Path):
    fd = os.open(out / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(f"Another sweep is running in {out}; wait for it or use another --out.") from err
        yield
    finally:
        os.close(fd)


def _read_meta(meta_path: pathlib.Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}): the file was truncated or edited (degenjax writes "
                         "it atomically). Restore it, or write to a new --out.") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} is not a sweep description (a JSON object); restore it or use a new --out.")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# cells


def cell_key(seed: int, cell: dict) -> jax.Array:
    """The PRNG key of a cell: ``fold_in(key(seed), crc32(cell id))`` (independent of run order)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(cell["cell"].encode()) & 0x7FFFFFFF)


def chain_mesh(num_chains: int, devices=None):
    """A 1-D mesh (axis ``"chains"``) over as many devices as evenly divide ``num_chains``; None for one device."""
    devices = list(jax.devices() if devices is None else devices)
    size = max(k for k in range(1, len(devices) + 1) if num_chains % k == 0)
    if size == 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:size]), ("chains",))


def make_llc_cell(loss_fn: Callable, data, sampler: dict, *, mesh="auto") -> Callable:
    """Builds the default cell: one jitted `estimate_llc` call per (checkpoint, grid point).

    The grid values enter as traced scalars, so every cell of a sweep reuses one compilation (two when the grid
    mixes the default nbeta with explicit values). Chains are sharded over the devices (`chain_mesh`).

    Args:
      loss_fn, data: the entry point's problem.
      sampler: `estimate_llc` keywords (`SAMPLER_KEYS`).
      mesh: a `jax.sharding.Mesh` with a ``"chains"`` axis, None (no sharding) or ``"auto"`` (`chain_mesh`).

    Returns:
      ``cell(rng_key, params, *, step_size, nbeta, localization) -> dict`` with ``llc_mean``, ``llc_std``,
      ``llc_per_chain``, ``init_loss``, ``mala_acceptance``, ``n_eff``, ``ess``, ``rhat``, ``llc_mcse``,
      ``converged`` and ``convergence`` (`degenjax.convergence`), ``diverged`` and ``loss_trace`` (chains,
      draws). ``cell.check(params, nbeta_values)`` traces the estimator without running it, so that bad sampler
      settings (e.g. ``batch_size`` larger than the data) raise before anything is computed.
    """
    from degenjax._src.llc import effective_parameter_count, estimate_llc

    kw = {k: sampler[k] for k in SAMPLER_KEYS if k in sampler}
    if isinstance(mesh, str):
        mesh = chain_mesh(kw["num_chains"])

    def run(rng_key, params, step_size, nbeta, localization):
        res = estimate_llc(rng_key, loss_fn, params, data, step_size=step_size, nbeta=nbeta,
                           localization=localization, mesh=mesh, **kw)
        return {"llc_mean": res.llc_mean, "llc_std": res.llc_std, "llc_per_chain": res.llc_per_chain,
                "init_loss": res.init_loss, "mala_acceptance": res.mala_acceptance,
                "n_eff": effective_parameter_count(res.llc_mean), "nbeta_used": res.nbeta,
                "loss_trace": res.loss_trace}

    run_default = jax.jit(lambda k, p, s, g: run(k, p, s, None, g))
    run_nbeta = jax.jit(run)
    dtype = jax.numpy.result_type(float)

    def cell(rng_key, params, *, step_size, nbeta, localization):
        s, g = jax.numpy.asarray(step_size, dtype), jax.numpy.asarray(localization, dtype)
        if nbeta is None:
            out = run_default(rng_key, params, s, g)
        else:
            out = run_nbeta(rng_key, params, s, jax.numpy.asarray(nbeta, dtype), g)
        out = jax.device_get(out)
        trace = np.asarray(out["loss_trace"], np.float64)
        out["loss_trace"] = trace
        out["diverged"] = bool(not np.all(np.isfinite(trace)))
        conv = convergence(trace)
        out["ess"], out["rhat"], out["converged"] = conv.ess, conv.rhat, conv.converged
        out["convergence"] = conv.message
        out["llc_mcse"] = float(out["nbeta_used"]) * conv.mcse
        return out

    def check(params, nbeta_values=(None,)):
        key = jax.random.key(0)
        s = jax.ShapeDtypeStruct((), dtype)
        for nb in set(nbeta_values):
            if nb is None:
                jax.eval_shape(run_default, key, params, s, s)
            else:
                jax.eval_shape(run_nbeta, key, params, s, s, s)

    cell.check = check
    return cell


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _user_error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def run_sweep(config: SweepConfig, out_dir, *, cell_fn: Callable | None = None, progress: bool = True,
              plots: bool = True, log: Callable[[str], None] | None = _stderr) -> list[dict]:
    """Runs (or resumes) a sweep; returns all result rows of the config's grid, in grid order.

    Args:
      config: from `load_sweep_config` / `parse_sweep_config`.
      out_dir: results folder (``results.jsonl``, ``results.csv``, ``sweep.json``, ``traces/``, plots).
      cell_fn: ``cell_fn(rng_key, params, *, step_size, nbeta, localization) -> dict``; default `make_llc_cell`
        on the entry point's problem. A ``loss_trace`` entry of its result is saved to ``traces/`` (not to the
        JSON line); a ``ValueError`` it raises fails that cell only (recorded in ``error``).
      progress: show a tqdm bar over the cells.
      plots: write ``llc_vs_checkpoint.png`` and ``calibration_heatmap.png`` at the end.
      log: called with one line per failed and per unconverged cell at the end (default: print to stderr;
        None: silent).

    Raises:
      ValueError: ``out_dir`` is not writable, holds results of a sweep with other settings (the message names
        what changed), or another sweep process is writing there; the entry point or the sampler settings are
        invalid (checked before ``sweep.json`` is written).
    """
    out = pathlib.Path(out_dir)
    check_writable(out, folder=True, what="Sweep output folder")
    search = [config.base_dir, os.getcwd()]
    identity = sweep_identity(config, chain_devices=None if cell_fn is None else 1)
    sweep_id = _identity_hash(identity)
    paths = dict(config.checkpoints)
    digests: dict[str, str | None] = {}
    digest_errors: dict[str, str] = {}
    if any(p is not None for p in paths.values()):
        from degenjax._src.checkpoints import checkpoint_digest

        for name, p in paths.items():
            if p is None:
                continue
            try:
                digests[name] = checkpoint_digest(p)
            except ValueError as err:
                digests[name], digest_errors[name] = None, str(err)
    cells = config.cells()
    for c in cells:
        c["checkpoint_sha256"] = digests.get(c["checkpoint"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"Cannot create the sweep output folder {out}: {err.strerror or err}.") from err
    results = out / "results.jsonl"
    with _exclusive(out):
        meta_path = out / "sweep.json"
        stored = _read_meta(meta_path) if meta_path.exists() else None
        if stored is not None and stored != identity:
            raise ValueError(f"{out} holds results of a different sweep: {_describe_change(stored, identity)}. "
                             "Resuming would mix the two runs' results; rerun with the same settings, or write to "
                             "a new --out.")
        rows = read_results(results, repair=True)
        for r in rows:
            if r.get("sweep_id") != sweep_id and not _is_failed(r):
                why = ("its sweep.json is missing" if stored is None else "its lines belong to another sweep")
                raise ValueError(f"{results} holds results of a different sweep ({why}); write to a new --out.")
        by_cell = {r["cell"]: r for r in rows}
        for c in cells:
            r = by_cell.get(c["cell"])
            if r is not None and not _is_failed(r) and r.get("checkpoint_sha256") != c["checkpoint_sha256"]:
                raise ValueError(
                    f"Checkpoint {c['checkpoint']} changed since its cells were computed in {out} (content sha256 "
                    f"{str(r.get('checkpoint_sha256'))[:12]} -> {str(c['checkpoint_sha256'])[:12]}): resuming would "
                    "mix results of two different checkpoints. Restore the file, or write to a new --out.")
        done = {c for c, r in by_cell.items() if not _is_failed(r)}
        todo = [c for c in cells if c["cell"] not in done]
        if todo:
            loss_fn, template, data = load_problem(config.entry, search)
            if cell_fn is None:
                cell_fn = make_llc_cell(loss_fn, data, config.sampler)
                try:
                    cell_fn.check(template, [c["nbeta"] for c in todo])
                except (TypeError, ValueError) as err:
                    raise ValueError(f"The LLC estimator rejects the entry point's problem with these [sampler] "
                                     f"settings (checked before computing anything): {err}") from err
        if stored is None:
            tmp = meta_path.with_name("sweep.json.tmp")
            tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
            os.replace(tmp, meta_path)
        if todo:
            _run_cells(config, out, todo, cell_fn, template, data, paths, digest_errors, sweep_id, progress)
        rows = read_results(results)
        write_csv(rows, out / "results.csv")
    by_cell = {r["cell"]: r for r in rows}
    grid_rows = [by_cell[c["cell"]] for c in cells]
    if log is not None:
        for r in grid_rows:
            if _is_failed(r):
                log(f"failed: {r['cell']}: {r['error']}")
            elif r.get("converged") is False:
                why = (r.get('convergence') or 'R-hat or ESS out of bounds').removeprefix('not converged: ')
                log(f"not converged: {r['cell']}: {why}")
    if plots:
        from degenjax._src import plots as _plots

        _plots.plot_llc_vs_checkpoint(grid_rows, path=out / "llc_vs_checkpoint.png")
        _plots.plot_calibration_heatmap(grid_rows, path=out / "calibration_heatmap.png")
    return grid_rows


def _run_cells(config, out, todo, cell_fn, template, data, paths, digest_errors, sweep_id, progress):
    """Computes ``todo`` cells, checkpoint by checkpoint; appends one line per cell (result or failure)."""
    from degenjax._src.checkpoints import load_checkpoint

    results = out / "results.jsonl"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(config.cells())
        bar = tqdm(total=total, initial=total - len(todo), desc="sweep cells", unit="cell")
    loaded: dict[str, Any] = {}
    for c in todo:
        name = c["checkpoint"]
        if name not in loaded:
            loaded.clear()
            try:
                if name in digest_errors:
                    raise ValueError(digest_errors[name])
                loaded[name] = template if paths[name] is None else load_checkpoint(paths[name], template)
            except ValueError as err:
                loaded[name] = err
        base = {**c, "step": checkpoint_step(name), "sweep_id": sweep_id}
        t0 = time.perf_counter()
        if isinstance(loaded[name], Exception):
            row = {**base, "error": _user_error(loaded[name])}
        else:
            try:
                res = dict(cell_fn(cell_key(config.seed, c), loaded[name], step_size=c["step_size"],
                                   nbeta=c["nbeta"], localization=c["localization"]))
            except (ValueError, FloatingPointError) as err:
                row = {**base, "error": _user_error(err)}
            else:
                trace = res.pop("loss_trace", None)
                row = {**base, **res, "seconds": time.perf_counter() - t0}
                if c["nbeta"] is None and "nbeta_used" not in row:
                    n = jax.tree.leaves(data)[0].shape[0]
                    row["nbeta_used"] = n / math.log(n)
                if trace is not None:
                    tp = trace_path(out, c)
                    _save_npz_atomic(tp, {"loss_trace": np.asarray(trace),
                                          **{k: np.asarray(row[k]) for k in ("init_loss", "llc_per_chain",
                                                                             "nbeta_used") if k in row}})
                    row["trace_file"] = str(tp.relative_to(out))
        row.update(pid=os.getpid(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        append_result(results, row)
        write_csv(read_results(results), out / "results.csv")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
