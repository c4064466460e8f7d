"""Fault injection: the real `degenjax sweep` (real LLC cells) SIGKILLed at random points, then resumed, gives
bitwise the results and traces of an uninterrupted run, each cell exactly once.

The fast test (default suite) kills twice: once during start-up / compilation / the first cell, once mid-sweep,
with a shared compilation cache so that restarts are quick. The slow test kills 20 times, each at a time drawn
uniformly over the run's expected life (start-up, compilation, the cells still to do), without a compilation cache.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from degenjax._src.checkpoints import save_msgpack

PROBLEM = '''
import jax.numpy as jnp
import numpy as np

_rng = np.random.default_rng(0)
X = _rng.normal(size=(256, 8)).astype(np.float32)
Y = (X @ _rng.normal(size=(8, 2)) + 0.1 * _rng.normal(size=(256, 2))).astype(np.float32)
W = np.linalg.lstsq(X, Y, rcond=None)[0].astype(np.float32)


def make():
    params = {"w": jnp.asarray(W), "b": jnp.zeros((2,), jnp.float32)}

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["w"] + p["b"][None, :] - batch[1]) ** 2)

    return loss, params, (jnp.asarray(X), jnp.asarray(Y))
'''

CONFIG = '''
entry = "ft_problem:make"
checkpoints = ["ck/*.msgpack"]
seed = 1
[sampler]
num_chains = 2
num_draws = {draws}
batch_size = 32
[grid]
step_size = [1e-4, 3e-4]
localization = {localization}
'''

VOLATILE = ("seconds", "pid", "finished_at")
EXE = str(pathlib.Path(sys.executable).with_name("degenjax"))


def _setup(tmp_path, draws, localization):
    (tmp_path / "ft_problem.py").write_text(PROBLEM)
    rng = np.random.default_rng(0)
    for step in (100, 200):
        save_msgpack(tmp_path / "ck" / f"step_{step}.msgpack",
                     {"w": rng.normal(size=(8, 2)).astype(np.float32), "b": np.zeros(2, np.float32)})
    (tmp_path / "ft.toml").write_text(CONFIG.format(draws=draws, localization=localization))


def _command(out, cache=None, group=None):
    """The sweep command; interrupted runs use groups of ``group`` cells (the reference: the default grouping), so
    that resumed cells run in other groups than in the reference and must still give bitwise its numbers."""
    cmd = [EXE] + (["--compile-cache", str(cache)] if cache else [])
    extra = ["--cells-per-group", str(group)] if group else []
    return cmd + ["sweep", "ft.toml", "--out", str(out), "--no-progress", "--no-plots"] + extra


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _run_until(cmd, cwd, kill_when):
    """Starts ``cmd``; SIGKILLs it as soon as ``kill_when(elapsed)`` is true. Returns True if it was killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None:
        if kill_when(time.monotonic() - t0):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode == -signal.SIGKILL
        if time.monotonic() - t0 > 300:
            proc.kill()
            raise AssertionError("a sweep process ran for more than 5 minutes")
        time.sleep(0.005)
    assert proc.returncode == 0, f"the sweep exited with status {proc.returncode}"
    return False


def _reference(tmp_path, cache=None):
    """An uninterrupted run; returns (rows by cell, wall time, time of the first result line)."""
    out = tmp_path / "ref"
    t0, first = time.monotonic(), []

    def never(elapsed):
        if not first and _lines(out / "results.jsonl"):
            first.append(elapsed)
        return False

    _run_until(_command(out, cache), tmp_path, never)
    return out, time.monotonic() - t0, (first or [time.monotonic() - t0])[0]


def _compare(ref, out, num_cells):
    """Every cell exactly once, and bitwise equal to the reference: JSON fields and saved traces."""
    lines = (out / "results.jsonl").read_bytes().splitlines()
    rows = [json.loads(l) for l in lines]
    assert len(rows) == len({r["cell"] for r in rows}) == num_cells  # no duplicate, none missing
    ref_rows = {r["cell"]: r for r in map(json.loads, (ref / "results.jsonl").read_bytes().splitlines())}
    for r in rows:
        want = ref_rows[r["cell"]]
        assert {k: v for k, v in r.items() if k not in VOLATILE} == {k: v for k, v in want.items()
                                                                     if k not in VOLATILE}, r["cell"]
        with np.load(out / r["trace_file"]) as got, np.load(ref / want["trace_file"]) as exp:
            assert sorted(got.files) == sorted(exp.files)
            for k in got.files:
                assert got[k].dtype == exp[k].dtype and got[k].tobytes() == exp[k].tobytes(), (r["cell"], k)
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == num_cells + 1
    return rows


def _check_snapshot(results, previous):
    data = results.read_bytes() if results.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "a kill left a torn line"
    assert data.startswith(previous), "a kill rewrote finished results"
    return data


def test_sigkill_during_startup_and_mid_sweep_gives_bitwise_the_uninterrupted_results(tmp_path):
    _setup(tmp_path, draws=20000, localization="[10.0]")
    cache = tmp_path / "cache"
    ref, _, t_first = _reference(tmp_path, cache)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    rng = np.random.default_rng(0)
    # Kill 1: at a random time before the first result (start-up, import, compile or the first cell), at the
    # latest right after the first result line is written (then likely inside the CSV rewrite).
    t_kill = rng.uniform(0.2, 1.0) * t_first
    assert _run_until(_command(out, cache, 2), tmp_path, lambda t: t >= t_kill or _lines(results) > 0)
    snap = _check_snapshot(results, b"")
    # Kill 2: mid-sweep, a random moment after this run's first finished cell (mid-cell or in the CSV rewrite).
    start = _lines(results)
    state = {}

    def mid_sweep(t):
        if "t" not in state and _lines(results) > start:
            state["t"] = t + rng.uniform(0.0, 0.15)
        return "t" in state and t >= state["t"]

    assert _run_until(_command(out, cache, 2), tmp_path, mid_sweep)
    snap = _check_snapshot(results, snap)
    # (under load the first kill can land after the first group of 2 cells wrote its lines; then only the last group
    # is left, and the second kill lands in it or in the CSV rewrite after it, still before the process ended)
    assert 1 <= _lines(results) < 4 or start >= 2, "the mid-sweep kill came too late"
    assert not _run_until(_command(out, cache, 2), tmp_path, lambda t: False)  # resume to the end
    _check_snapshot(results, snap)
    _compare(ref, out, num_cells=4)


@pytest.mark.slow
def test_twenty_sigkills_at_random_times_give_bitwise_the_uninterrupted_results(tmp_path):
    _setup(tmp_path, draws=20000, localization="[1.0, 10.0]")
    ref, wall, t_first = _reference(tmp_path)
    per_cell = (wall - t_first) / 7
    out = tmp_path / "out"
    results = out / "results.jsonl"
    rng = np.random.default_rng(1)
    snap, kills, finished = b"", 0, False
    while kills < 20:
        # uniform over this run's expected life: start-up and compilation, then the cells still to do
        t_kill = rng.uniform(0.0, t_first + per_cell * (8 - _lines(results)))
        killed = _run_until(_command(out, group=1 + kills % 3), tmp_path, lambda t: t >= t_kill)
        snap = _check_snapshot(results, snap)
        if not killed:
            finished = True
            break
        kills += 1
    if not finished:
        assert not _run_until(_command(out), tmp_path, lambda t: False)
    _check_snapshot(results, snap)
    _compare(ref, out, num_cells=8)
    assert kills >= 10, f"only {kills} kills landed before the sweep finished"
