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

**Cells batched.** The cells still to compute run in groups of ``cells_per_group`` cells (``--cells-per-group``;
default: as many as fit in memory), each group ONE compiled program whose chain axis holds every chain of every
cell of the group (`degenjax.estimate_llc_batched`); every group has the same shape, so the sweep compiles once.
A cell's numbers do not depend on the group it ran in or on the devices (bitwise on CPU, tested), so a sweep may
be resumed with another group size or on another number of devices.

**Results.** Every finished cell is appended as one JSON line to ``OUT/results.jsonl`` with a single ``write`` on
an ``O_APPEND`` descriptor followed by ``fsync``, as soon as its group is done; its loss traces go first to
``OUT/traces/*.npz`` (temp file, ``fsync``, rename); ``results.csv`` is regenerated from the JSON lines (temp file
+ rename). A rerun reads the finished cells and computes only the others, so a crash or SIGKILL at any point loses
at most the group in flight and never duplicates a cell. Each cell's PRNG key depends only on ``seed`` and the cell
(checkpoint name and grid values), so results do not depend on the order in which cells were run or on how often
the sweep was interrupted.

**Many processes.** Under ``jax.distributed`` (``degenjax sweep --distributed``) every process runs the same
command: chains are sharded over every device of every process, process 0 alone reads and writes ``OUT`` and loads
the checkpoints (sending them to the others, bitwise), and a restart of all processes resumes.

**Identity.** A cell's result is determined by the checkpoint's *content* (SHA-256), the entry point's code (the
``.py`` files of its module's folder, or ``entry_version``), the sampler settings (after defaults are filled in),
the seed, the grid values, float64 on/off, the JAX backend, and the versions of degenjax, jax and jaxlib.
``OUT/sweep.json`` records the sweep-wide part and every result line the rest, so a rerun never reuses a result that
another checkpoint, entry point or setting produced: it refuses with a message naming what changed. The grid and the
list of checkpoints may grow between runs.

**Failures.** Everything that can be checked before computing (the config, the entry point, the sampler settings
against the data, a writable ``OUT``) is checked before ``sweep.json`` is written. A checkpoint that cannot be
loaded (or a cell that raises a ``ValueError``) fails only its cells: the reason is recorded in the ``error``
column and the sweep goes on; a rerun retries failed cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib
import inspect
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
from degenjax._src.resultsio import append_jsonl
from degenjax._src.resultsio import write_csv as resultsio_write_csv
from degenjax._src.validation import check_seed, check_writable

FORMAT = 3  # of sweep.json and the result lines; 1 = before content hashes, 2 = cells one at a time (before
# batched cells: a cell's numbers then depended on the device count, recorded as chain_devices)
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


def sweep_identity(config: SweepConfig) -> dict:
    """Everything besides the checkpoint and the grid values that determines a cell's result (see module docs).

    How cells are grouped and how chains are sharded over devices and processes is not part of it: a cell's numbers
    do not depend on them (`degenjax.estimate_llc_batched`).

    Raises:
      ValueError: the entry point cannot be imported.
    """
    import jaxlib

    from degenjax import __version__

    search = [config.base_dir, os.getcwd()]
    source = None if config.entry_version is not None else entry_source_digests(config.entry, search)
    if config.entry_version is not None:
        load_entry_point(config.entry, search)  # importable?
    return {"format": FORMAT, **config.fingerprint(), "entry_source": source,
            "x64": bool(jax.config.jax_enable_x64), "backend": jax.default_backend(), "degenjax": __version__,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__}


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


def append_result(path, row: dict) -> None:
    """Appends one result row to ``results.jsonl`` (`resultsio.append_jsonl`: one ``write`` on an ``O_APPEND``
    descriptor, then ``fsync``; non-finite numbers become null).

    A process killed during the call leaves either no line or the whole line (a torn final line, which only a
    power loss could leave, is dropped by `read_results`).
    """
    append_jsonl(path, row)


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
    """Regenerates ``results.csv`` from result rows (`resultsio.write_csv`: temp file + rename)."""
    rows = [{**r, "nbeta": r.get("nbeta_used")} if r.get("nbeta") is None else r for r in rows]
    resultsio_write_csv(path, rows, CSV_COLUMNS)


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


def sweep_mesh(total_chains: int):
    """The mesh a sweep shards its chains over: every device of every process under ``jax.distributed``; in one
    process, as many devices as evenly divide ``total_chains`` (`chain_mesh`; None for one)."""
    from degenjax._src import distributed

    if distributed.is_multiprocess():
        return distributed.global_mesh("chains")
    return chain_mesh(total_chains)


def make_llc_cells(loss_fn: Callable, data, sampler: dict, *, cells_per_group: int | None = None,
                   mesh="auto") -> Callable:
    """Builds the default computation of a sweep: groups of cells as one program (`estimate_llc_batched`).

    Every group has ``cells_per_group`` cells (a smaller one is padded), so one compilation serves the sweep; the
    grid values are per-cell arrays. Cells' numbers do not depend on the grouping (bitwise on CPU; see
    `degenjax.estimate_llc_batched`), so a sweep may be resumed with another group size or device count.

    Args:
      loss_fn, data: the entry point's problem.
      sampler: `estimate_llc` keywords (`SAMPLER_KEYS`).
      cells_per_group: cells per program (default 1).
      mesh: a mesh with a ``"chains"`` axis, None, or ``"auto"`` (`sweep_mesh`).

    Returns:
      ``run(rng_keys, params, *, step_size, nbeta, localization) -> list of dicts`` for a group of cells
      (``params`` stacked on a leading cell axis, the grid values one per cell, nbeta None = the default), with
      ``llc_mean``, ``llc_std``, ``llc_per_chain``, ``init_loss``, ``mala_acceptance``, ``n_eff``, ``nbeta_used``,
      ``ess``, ``rhat``, ``llc_mcse``, ``converged``, ``convergence``, ``diverged`` and ``loss_trace`` (chains,
      draws). ``run.check(params)`` traces the estimator without running it, so that bad sampler settings raise
      before anything is computed.
    """
    from degenjax._src.cells import estimate_llc_batched
    from degenjax._src.checks import default_nbeta, num_data

    kw = {k: sampler[k] for k in SAMPLER_KEYS if k in sampler}
    group = 1 if cells_per_group is None else int(cells_per_group)
    if isinstance(mesh, str):
        mesh = sweep_mesh(group * kw["num_chains"])
    dtype = jax.numpy.result_type(float)

    def run(rng_keys, params, *, step_size, nbeta, localization) -> list[dict]:
        n = num_data(data)
        nbeta = [default_nbeta(n) if b is None else b for b in nbeta]
        res = estimate_llc_batched(rng_keys, loss_fn, params, data, step_size=np.asarray(step_size, np.float64),
                                   nbeta=np.asarray(nbeta, np.float64),
                                   localization=np.asarray(localization, np.float64), mesh=mesh,
                                   cells_per_group=group, warn=False, **kw)
        res = jax.device_get(res)
        rows = []
        for c in range(len(nbeta)):
            trace = np.asarray(res.loss_trace[c], np.float64)
            conv = convergence(trace)
            llc = np.asarray(res.llc_mean[c])
            rows.append({"llc_mean": llc, "llc_std": res.llc_std[c], "llc_per_chain": res.llc_per_chain[c],
                         "init_loss": res.init_loss[c], "mala_acceptance": res.mala_acceptance[c],
                         "n_eff": 2.0 * llc, "nbeta_used": res.nbeta[c], "loss_trace": trace,
                         "diverged": bool(not np.all(np.isfinite(trace))), "ess": conv.ess, "rhat": conv.rhat,
                         "converged": conv.converged, "convergence": conv.message,
                         "llc_mcse": float(res.nbeta[c]) * conv.mcse})
        return rows

    def check(params):
        s = jax.ShapeDtypeStruct((1,), dtype)
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + np.shape(x), jax.numpy.result_type(x)), params)
        jax.eval_shape(lambda k, p, a, b, g: estimate_llc_batched(
            k, loss_fn, p, data, step_size=a, nbeta=b, localization=g, mesh=mesh, cells_per_group=group,
            warn=False, **kw), jax.random.split(jax.random.key(0), 1), one, s, s, s)

    run.check = check
    run.cells_per_group = group
    run.mesh = mesh
    return run


def make_llc_cell(loss_fn: Callable, data, sampler: dict, *, mesh="auto") -> Callable:
    """Builds a one-cell computation (`make_llc_cells` with groups of one cell), e.g. to run cells yourself.

    Returns:
      ``cell(rng_key, params, *, step_size, nbeta, localization) -> dict`` (the keys of `make_llc_cells`);
      ``cell.check(params)`` traces it without running it.
    """
    if isinstance(mesh, str):
        mesh = sweep_mesh(sampler["num_chains"])
    run = make_llc_cells(loss_fn, data, sampler, cells_per_group=1, mesh=mesh)

    def cell(rng_key, params, *, step_size, nbeta, localization):
        return run(rng_key[None], jax.tree.map(lambda x: jax.numpy.asarray(x)[None], params), step_size=[step_size],
                   nbeta=[nbeta], localization=[localization])[0]

    cell.check = run.check
    return cell


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _user_error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _on_lead(fn: Callable, multi: bool):
    """``fn()`` on process 0, its value (JSON) on every process; a ValueError it raises is raised on every process
    (any other exception on process 0 is raised there, and the others get a ValueError saying so)."""
    from degenjax._src import distributed

    lead = jax.process_index() == 0
    if not multi:
        return fn()
    msg, error = None, None
    if lead:
        try:
            msg = {"ok": fn()}
        except ValueError as err:
            msg, error = {"error": str(err)}, err
        except BaseException as err:  # noqa: BLE001 - tell the others before failing here
            msg, error = {"error": f"process 0 failed: {_user_error(err)}"}, err
    msg = distributed.broadcast_json(msg)
    if "error" in msg:
        if error is not None:
            raise error
        raise ValueError(msg["error"])
    return msg["ok"]


def run_sweep(config: SweepConfig, out_dir, *, cell_fn: Callable | None = None, cells_per_group: int | None = None,
              progress: bool = True, plots: bool = True, log: Callable[[str], None] | None = _stderr) -> list[dict]:
    """Runs (or resumes) a sweep; returns all result rows of the config's grid, in grid order.

    The cells still to compute run in groups of ``cells_per_group`` as one compiled program each
    (`make_llc_cells`, `degenjax.estimate_llc_batched`); each group's rows are written as soon as it is done.
    Under ``jax.distributed`` (several processes), every process calls this with the same config: the chains are
    sharded over every device of every process, process 0 alone reads and writes ``out_dir`` (it need not be
    shared) and loads the checkpoints, which it sends to the others; every process returns the rows.

    Args:
      config: from `load_sweep_config` / `parse_sweep_config`.
      out_dir: results folder (``results.jsonl``, ``results.csv``, ``sweep.json``, ``traces/``, plots).
      cell_fn: ``cell_fn(rng_key, params, *, step_size, nbeta, localization) -> dict``, a custom computation run
        one cell at a time instead (one process only). A ``loss_trace`` entry of its result is saved to
        ``traces/`` (not to the JSON line); a ``ValueError`` it raises fails that cell only (recorded in
        ``error``).
      cells_per_group: cells per compiled program (default: as many as fit in memory,
        `degenjax._src.cells.cells_per_group_for_memory`). Fewer cells per group write results more often (a crash
        loses at most the group in flight); more run faster. The numbers do not depend on it.
      progress: show a tqdm bar over the cells.
      plots: write ``llc_vs_checkpoint.png`` and ``calibration_heatmap.png`` at the end.
      log: called with one line per failed and per unconverged cell at the end (default: print to stderr;
        None: silent; process 0 only).

    Raises:
      ValueError: ``out_dir`` is not writable, holds results of a sweep with other settings (the message names
        what changed), or another sweep process is writing there; the entry point or the sampler settings are
        invalid (checked before ``sweep.json`` is written); the processes of a multi-process run disagree on the
        config, the entry point's data or parameters.
    """
    from degenjax._src import distributed

    multi = distributed.is_multiprocess()
    lead = jax.process_index() == 0
    if multi and cell_fn is not None:
        raise ValueError("A custom cell_fn runs one cell at a time in one process; run it without jax.distributed, "
                         "or use the default LLC cells.")
    if cells_per_group is not None and (isinstance(cells_per_group, bool) or not isinstance(cells_per_group, int)
                                        or cells_per_group < 1):
        raise ValueError(f"cells_per_group must be an integer >= 1; got {cells_per_group!r}.")
    out = pathlib.Path(out_dir)
    search = [config.base_dir, os.getcwd()]
    identity = sweep_identity(config)
    sweep_id = _identity_hash(identity)
    cells = config.cells()
    if multi:
        distributed.check_same(_identity_hash({"identity": identity, "cells": [c["cell"] for c in cells]}),
                               "The sweep (its config, checkpoints list or entry point's code)")
    with contextlib.ExitStack() as stack:
        plan = _on_lead(lambda: _plan(config, out, identity, sweep_id, cells, stack), multi)
        for c in cells:
            c["checkpoint_sha256"] = plan["digests"].get(c["checkpoint"])
        todo = [c for c in cells if c["cell"] in set(plan["todo"])]
        template = data = None
        if todo:
            loss_fn, template, data = load_problem(config.entry, search)
            if multi:
                distributed.check_same(distributed.tree_digest((template, data)),
                                       "The entry point's parameters and data")
            if cell_fn is None:
                group = cells_per_group
                if group is None:
                    from degenjax._src.cells import cells_per_group_for_memory

                    s = config.sampler
                    group = cells_per_group_for_memory(
                        loss_fn, template, data, num_chains=s["num_chains"], batch_size=s["batch_size"],
                        num_steps=s["num_draws"] + s.get("num_burnin", 0), devices=jax.devices())
                group = min(group, len(todo))
                cell_fn = make_llc_cells(loss_fn, data, config.sampler, cells_per_group=group)
                try:
                    cell_fn.check(template)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"The LLC estimator rejects the entry point's problem with these [sampler] "
                                     f"settings (checked before computing anything): {err}") from err
        if not plan["stored"]:
            _on_lead(lambda: _write_meta(out / "sweep.json", identity), multi)
        if todo:
            runner = _run_groups if hasattr(cell_fn, "cells_per_group") else _run_cells
            runner(config, out, todo, cell_fn, template, data, dict(config.checkpoints), plan["digest_errors"],
                   sweep_id, progress and lead, multi)
        rows = _on_lead(lambda: _finish_results(out), multi)
    by_cell = {r["cell"]: r for r in rows}
    grid_rows = [by_cell[c["cell"]] for c in cells]
    if log is not None and lead:
        for r in grid_rows:
            if _is_failed(r):
                log(f"failed: {r['cell']}: {r['error']}")
            elif r.get("converged") is False:
                why = (r.get('convergence') or 'R-hat or ESS out of bounds').removeprefix('not converged: ')
                log(f"not converged: {r['cell']}: {why}")
    if plots and lead:
        from degenjax._src import plots as _plots

        _plots.plot_llc_vs_checkpoint(grid_rows, path=out / "llc_vs_checkpoint.png")
        _plots.plot_calibration_heatmap(grid_rows, path=out / "calibration_heatmap.png")
    return grid_rows


def _plan(config, out, identity, sweep_id, cells, stack) -> dict:
    """Process 0's bookkeeping before computing: the output folder, its lock, the stored identity and results,
    the checkpoints' digests; returns ``{"todo": cell ids, "digests", "digest_errors", "stored"}``."""
    check_writable(out, folder=True, what="Sweep output folder")
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"Cannot create the sweep output folder {out}: {err.strerror or err}.") from err
    stack.enter_context(_exclusive(out))
    meta_path = out / "sweep.json"
    stored = _read_meta(meta_path) if meta_path.exists() else None
    if stored is not None and stored != identity:
        raise ValueError(f"{out} holds results of a different sweep: {_describe_change(stored, identity)}. "
                         "Resuming would mix the two runs' results; rerun with the same settings, or write to "
                         "a new --out.")
    results = out / "results.jsonl"
    rows = read_results(results, repair=True)
    for r in rows:
        if r.get("sweep_id") != sweep_id and not _is_failed(r):
            why = ("its sweep.json is missing" if stored is None else "its lines belong to another sweep")
            raise ValueError(f"{results} holds results of a different sweep ({why}); write to a new --out.")
    by_cell = {r["cell"]: r for r in rows}
    for c in cells:
        r = by_cell.get(c["cell"])
        sha = digests.get(c["checkpoint"])
        if r is not None and not _is_failed(r) and r.get("checkpoint_sha256") != sha:
            raise ValueError(
                f"Checkpoint {c['checkpoint']} changed since its cells were computed in {out} (content sha256 "
                f"{str(r.get('checkpoint_sha256'))[:12]} -> {str(sha)[:12]}): resuming would "
                "mix results of two different checkpoints. Restore the file, or write to a new --out.")
    done = {c for c, r in by_cell.items() if not _is_failed(r)}
    return {"todo": [c["cell"] for c in cells if c["cell"] not in done], "digests": digests,
            "digest_errors": digest_errors, "stored": stored is not None}


def _write_meta(meta_path: pathlib.Path, identity: dict) -> None:
    tmp = meta_path.with_name("sweep.json.tmp")
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    os.replace(tmp, meta_path)


def _finish_results(out: pathlib.Path) -> list[dict]:
    rows = read_results(out / "results.jsonl")
    write_csv(rows, out / "results.csv")
    return rows


def _progress(progress: bool, config, todo):
    if not progress:
        return None
    from tqdm.auto import tqdm

    total = len(config.cells())
    return tqdm(total=total, initial=total - len(todo), desc="sweep cells", unit="cell")


def _write_row(out: pathlib.Path, base: dict, res: dict | None, data, seconds: float,
               error: BaseException | str | None = None) -> None:
    """Saves a cell's traces (atomic) and appends its result line; ``error`` makes it a failed cell."""
    c = base
    if error is not None:
        row = {**base, "error": error if isinstance(error, str) else _user_error(error)}
    else:
        res = dict(res)
        trace = res.pop("loss_trace", None)
        row = {**base, **res, "seconds": seconds}
        if c["nbeta"] is None and "nbeta_used" not in row:
            n = jax.tree.leaves(data)[0].shape[0]
            row["nbeta_used"] = n / math.log(n)
        if trace is not None:
            tp = trace_path(out, c)
            _save_npz_atomic(tp, {"loss_trace": np.asarray(trace),
                                  **{k: np.asarray(row[k]) for k in ("init_loss", "llc_per_chain", "nbeta_used")
                                     if k in row}})
            row["trace_file"] = str(tp.relative_to(out))
    row.update(pid=os.getpid(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    append_result(out / "results.jsonl", row)


def _load(name, paths, digest_errors, template, loaded: dict):
    """A checkpoint's parameters (or the ValueError loading it raised), keeping only the last one loaded."""
    from degenjax._src.checkpoints import load_checkpoint

    if name not in loaded:
        loaded.clear()
        try:
            if name in digest_errors:
                raise ValueError(digest_errors[name])
            loaded[name] = template if paths[name] is None else load_checkpoint(paths[name], template)
        except ValueError as err:
            loaded[name] = err
    return loaded[name]


def _run_groups(config, out, todo, run, template, data, paths, digest_errors, sweep_id, progress, multi):
    """Computes ``todo`` cells in groups of ``run.cells_per_group`` (one program each); process 0 loads the
    checkpoints (sent to the other processes) and writes one line per cell as each group finishes."""
    from degenjax._src import distributed

    lead = jax.process_index() == 0
    bar = _progress(progress, config, todo) if lead else None
    size = run.cells_per_group
    loaded: dict[str, Any] = {}
    for start in range(0, len(todo), size):
        group = todo[start:start + size]
        stash: dict[str, Any] = {}

        def load_group(group=group, stash=stash):
            failed = {}
            for c in group:
                p = _load(c["checkpoint"], paths, digest_errors, template, loaded)
                if isinstance(p, Exception):
                    failed[c["cell"]] = _user_error(p)
                else:
                    stash[c["cell"]] = p
            return failed

        failed = _on_lead(load_group, multi)
        ok = [c for c in group if c["cell"] not in failed]
        t0 = time.perf_counter()
        error, rows = None, None
        if ok:
            if lead:
                params = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                      *[stash[c["cell"]] for c in ok])
            else:
                params = jax.tree.map(lambda x: np.zeros((len(ok),) + np.shape(x), np.asarray(x).dtype), template)
            params = distributed.broadcast_tree(params)
            keys = jax.random.wrap_key_data(np.stack([np.asarray(jax.random.key_data(cell_key(config.seed, c)))
                                                      for c in ok]))
            try:
                rows = run(keys, params, step_size=[c["step_size"] for c in ok], nbeta=[c["nbeta"] for c in ok],
                           localization=[c["localization"] for c in ok])
            except (ValueError, FloatingPointError) as err:
                error = err
        seconds = (time.perf_counter() - t0) / max(1, len(ok))
        if lead:
            for c in group:
                base = {**c, "step": checkpoint_step(c["checkpoint"]), "sweep_id": sweep_id}
                if c["cell"] in failed:
                    _write_row(out, base, None, data, 0.0, failed[c["cell"]])
                elif error is not None:
                    _write_row(out, base, None, data, 0.0, error)
                else:
                    _write_row(out, base, rows[ok.index(c)], data, seconds)
            write_csv(read_results(out / "results.jsonl"), out / "results.csv")
            if bar is not None:
                bar.update(len(group))
    if bar is not None:
        bar.close()


def _run_cells(config, out, todo, cell_fn, template, data, paths, digest_errors, sweep_id, progress, multi):
    """Computes ``todo`` cells one at a time with a custom ``cell_fn``; appends one line per cell."""
    del multi
    bar = _progress(progress, config, todo)
    loaded: dict[str, Any] = {}
    for c in todo:
        p = _load(c["checkpoint"], paths, digest_errors, template, loaded)
        base = {**c, "step": checkpoint_step(c["checkpoint"]), "sweep_id": sweep_id}
        t0 = time.perf_counter()
        if isinstance(p, Exception):
            _write_row(out, base, None, data, 0.0, p)
        else:
            try:
                res = cell_fn(cell_key(config.seed, c), p, step_size=c["step_size"], nbeta=c["nbeta"],
                              localization=c["localization"])
            except (ValueError, FloatingPointError) as err:
                _write_row(out, base, None, data, 0.0, err)
            else:
                _write_row(out, base, res, data, time.perf_counter() - t0)
        write_csv(read_results(out / "results.jsonl"), out / "results.csv")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
