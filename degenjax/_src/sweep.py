"""Resumable LLC sweeps: checkpoints x a grid of step size / nbeta / localization (DESIGN.md section 5).

A sweep is described by a TOML file::

    entry = "my_package.problem:make"      # module:function returning (loss_fn, params, data)
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

Every finished cell is appended as one JSON line to ``OUT/results.jsonl`` with a single ``write`` on an
``O_APPEND`` descriptor followed by ``fsync``; ``results.csv`` is regenerated from it (temp file + rename). A rerun
reads the finished cells and computes only the others, so a crash or SIGKILL at any point loses at most the cell
in flight and never duplicates one. Each cell's PRNG key depends only on ``seed`` and the cell, so results do not
depend on the order in which cells were run or on how often the sweep was interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import glob
import importlib
import io
import json
import math
import os
import pathlib
import sys
import time
import tomllib
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from degenjax._src.diagnostics import convergence

GRID_AXES = ("step_size", "nbeta", "localization")
SAMPLER_KEYS = ("num_chains", "num_draws", "batch_size", "num_burnin", "sampler")
_SAMPLER_INT_KEYS = ("num_chains", "num_draws", "batch_size", "num_burnin")
_TOP_KEYS = ("entry", "checkpoints", "seed", "sampler", "grid")
CSV_COLUMNS = ("checkpoint", "step_size", "nbeta", "localization", "llc_mean", "llc_std", "n_eff", "init_loss",
               "mala_acceptance", "ess", "rhat", "llc_mcse", "converged", "diverged", "seconds", "llc_per_chain",
               "cell")


# ---------------------------------------------------------------------------------------------------------------
# entry points


def load_entry_point(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Callable:
    """Imports ``"package.module:function"`` and returns the function.

    Args:
      spec: ``module:attribute`` (the attribute may be dotted, e.g. ``"pkg.mod:Class.method"``).
      search_dirs: folders put at the front of ``sys.path`` first (e.g. the config file's folder and the
        current directory), so that a user's local module is found without installing it.

    Raises:
      ValueError: malformed spec, module not importable, or attribute missing / not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"Entry point {spec!r} is not of the form 'package.module:function'.")
    mod_name, attr = spec.split(":")
    for d in reversed([str(pathlib.Path(d).resolve()) for d in search_dirs]):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"Entry point {spec!r}: cannot import module {mod_name!r} ({err}). Check the name and "
                         "that its folder is the current directory, the config's folder, or installed.") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Entry point {spec!r}: module {mod_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Entry point {spec!r} is not callable (got {type(obj).__name__}).")
    return obj


def load_problem(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> tuple[Callable, Any, Any]:
    """Calls an entry point and checks that it returned ``(loss_fn, params, data)``."""
    out = load_entry_point(spec, search_dirs)()
    if not (isinstance(out, tuple) and len(out) == 3 and callable(out[0])):
        raise ValueError(f"Entry point {spec!r} must return a tuple (loss_fn, params, data) with loss_fn(params, "
                         f"batch) -> scalar; got {type(out).__name__}.")
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
      sampler: `estimate_llc` keywords shared by all cells.
      grid: ``{axis: tuple of values}`` for the axes in `GRID_AXES`; nbeta None means the default.
      base_dir: the config file's folder (entry modules and relative checkpoint paths are resolved there).
    """

    entry: str
    checkpoints: tuple[tuple[str, str | None], ...]
    seed: int
    sampler: dict
    grid: dict
    base_dir: str

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
        """What must not change between a sweep and its resumption (the grid may grow)."""
        return {"entry": self.entry, "seed": self.seed, "sampler": dict(sorted(self.sampler.items()))}


def cell_id(cell: dict) -> str:
    """A stable text identity of a cell (checkpoint and grid values)."""
    b = "default" if cell["nbeta"] is None else repr(float(cell["nbeta"]))
    return f"{cell['checkpoint']}|step_size={float(cell['step_size'])!r}|nbeta={b}|localization={float(cell['localization'])!r}"


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
    base = pathlib.Path(base_dir).resolve()
    unknown = set(raw) - set(_TOP_KEYS)
    if unknown:
        raise ValueError(f"Unknown config keys {sorted(unknown)}; allowed: {list(_TOP_KEYS)}.")
    entry = raw.get("entry")
    if not isinstance(entry, str) or entry.count(":") != 1:
        raise ValueError("Config needs entry = \"package.module:function\" (returning (loss_fn, params, data)).")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")

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
            raise ValueError(f"[sampler] {k} must be a positive integer, got {sampler[k]!r}.")

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
                       base_dir=str(base))


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
    try:
        return parse_sweep_config(raw, path.parent)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


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


def read_results(path, *, repair: bool = False) -> list[dict]:
    """Reads ``results.jsonl``; drops a torn last line (rewriting the file when ``repair``); first copy wins.

    Raises:
      ValueError: a line other than the last is not valid JSON (the file was edited or corrupted).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    body = lines[:-1]
    rows, seen = [], set()
    for i, line in enumerate(body):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); remove that line to resume.") from err
        if row.get("cell") in seen:
            continue
        seen.add(row.get("cell"))
        rows.append(row)
    if torn and repair:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(l + b"\n" for l in body))
        os.replace(tmp, path)
    return rows


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
      ``converged`` (`degenjax.convergence`), ``diverged``.
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

    def cell(rng_key, params, *, step_size, nbeta, localization):
        dtype = jax.numpy.result_type(float)
        s, g = jax.numpy.asarray(step_size, dtype), jax.numpy.asarray(localization, dtype)
        if nbeta is None:
            out = run_default(rng_key, params, s, g)
        else:
            out = run_nbeta(rng_key, params, s, jax.numpy.asarray(nbeta, dtype), g)
        out = jax.device_get(out)
        trace = np.asarray(out.pop("loss_trace"), np.float64)
        out["diverged"] = bool(not np.all(np.isfinite(trace)))
        conv = convergence(trace)
        out["ess"], out["rhat"], out["converged"] = conv.ess, conv.rhat, conv.converged
        out["llc_mcse"] = float(out["nbeta_used"]) * conv.mcse
        return out

    return cell


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def run_sweep(config: SweepConfig, out_dir, *, cell_fn: Callable | None = None, progress: bool = True,
              plots: bool = True) -> list[dict]:
    """Runs (or resumes) a sweep; returns all result rows of the config's grid, in grid order.

    Args:
      config: from `load_sweep_config` / `parse_sweep_config`.
      out_dir: results folder (``results.jsonl``, ``results.csv``, ``sweep.json``, plots).
      cell_fn: ``cell_fn(rng_key, params, *, step_size, nbeta, localization) -> dict``; default `make_llc_cell`
        on the entry point's problem.
      progress: show a tqdm bar over the cells.
      plots: write ``llc_vs_checkpoint.png`` and ``calibration_heatmap.png`` at the end.

    Raises:
      ValueError: ``out_dir`` holds a sweep with another entry / seed / sampler settings, or another sweep
        process is writing there.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    with _exclusive(out):
        meta_path = out / "sweep.json"
        fp = config.fingerprint()
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old != fp:
                diff = {k: (old.get(k), fp[k]) for k in fp if old.get(k) != fp[k]}
                raise ValueError(f"{out} holds results of a different sweep ({diff}, as (stored, now)); resume with "
                                 "the same entry/seed/[sampler], or write to a new --out.")
        else:
            tmp = meta_path.with_name("sweep.json.tmp")
            tmp.write_text(json.dumps(fp, indent=1))
            os.replace(tmp, meta_path)

        done = {r["cell"] for r in read_results(results, repair=True)}
        cells = config.cells()
        todo = [c for c in cells if c["cell"] not in done]
        if todo:
            loss_fn, template, data = load_problem(config.entry, [config.base_dir, os.getcwd()])
            if cell_fn is None:
                cell_fn = make_llc_cell(loss_fn, data, config.sampler)
            from degenjax._src.checkpoints import load_checkpoint

            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep cells", unit="cell")
            paths = dict(config.checkpoints)
            loaded: dict[str, Any] = {}
            for c in todo:
                name = c["checkpoint"]
                if name not in loaded:
                    loaded.clear()
                    loaded[name] = template if paths[name] is None else load_checkpoint(paths[name], template)
                t0 = time.perf_counter()
                res = cell_fn(cell_key(config.seed, c), loaded[name], step_size=c["step_size"], nbeta=c["nbeta"],
                              localization=c["localization"])
                row = {**c, **res, "seconds": time.perf_counter() - t0, "pid": os.getpid(),
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                if c["nbeta"] is None and "nbeta_used" not in row:
                    n = jax.tree.leaves(data)[0].shape[0]
                    row["nbeta_used"] = n / math.log(n)
                append_result(results, row)
                write_csv(read_results(results), out / "results.csv")
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        rows = read_results(results)
        write_csv(rows, out / "results.csv")
    by_id = {r["cell"]: r for r in rows}
    grid_rows = [by_id[c["cell"]] for c in cells]
    if plots:
        from degenjax._src import plots as _plots

        _plots.plot_llc_vs_checkpoint(grid_rows, path=out / "llc_vs_checkpoint.png")
        _plots.plot_calibration_heatmap(grid_rows, path=out / "calibration_heatmap.png")
    return grid_rows
