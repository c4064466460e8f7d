"""Sweep engine: config validation, the results file, and resumption after real SIGKILLs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from degenjax._src import checkpoints, sweep

PROBLEM = '''
import jax.numpy as jnp

def make():
    params = {"w": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    data = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
    return (lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)), params, data
'''

# A sweep driver whose cell sleeps (so that kills land mid-sweep) and logs every cell it starts.
DRIVER = '''
import os, sys, time
import numpy as np
sys.path.insert(0, {src!r})
from degenjax._src import sweep

log = {log!r}

def cell(rng_key, params, *, step_size, nbeta, localization):
    with open(log, "a") as f:
        f.write(f"{{os.getpid()}} {{step_size}} {{localization}} {{float(params['b'])}}\\n")
    time.sleep(0.12)
    total = float(np.sum(params["w"]) + params["b"])
    return {{"llc_mean": total * step_size * localization, "llc_std": 0.5, "llc_per_chain": [1.0, 2.0]}}

cfg = sweep.load_sweep_config({config!r})
sweep.run_sweep(cfg, {out!r}, cell_fn=cell, progress=False, plots=False)
'''


def _write_problem(tmp_path, num_ckpts=2):
    (tmp_path / "toy_problem.py").write_text(PROBLEM)
    for i in range(num_ckpts):
        checkpoints.save_msgpack(tmp_path / "ckpts" / f"step_{i}.msgpack",
                                 {"w": np.full((3,), i + 1.0, np.float32), "b": np.float32(10.0 * i)})


CONFIG = '''
entry = "toy_problem:make"
checkpoints = ["ckpts/*.msgpack"]
seed = 3
[sampler]
num_chains = 2
num_draws = 10
batch_size = 2
[grid]
step_size = [0.001, 0.01, 0.1]
localization = [1.0, 100.0]
'''


def _expected_grid():
    out = {}
    for i in range(2):
        for s in (0.001, 0.01, 0.1):
            for g in (1.0, 100.0):
                out[f"ckpts/step_{i}.msgpack|step_size={s!r}|nbeta=default|localization={g!r}"] = \
                    (3 * (i + 1.0) + 10.0 * i) * s * g
    return out


def _num_lines(p):
    return p.read_bytes().count(b"\n") if p.exists() else 0


def test_resume_after_sigkill_at_several_points(tmp_path):
    _write_problem(tmp_path)
    (tmp_path / "sweep.toml").write_text(CONFIG)
    out, log = tmp_path / "out", tmp_path / "started.log"
    src = str(pathlib.Path(__file__).resolve().parents[1])
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(src=src, log=str(log), config=str(tmp_path / "sweep.toml"), out=str(out)))
    results = out / "results.jsonl"
    snapshots = []
    # Kill points: while the very first cell runs, after 2 finished cells, after 5 (mid-cell or between cells).
    for target_lines, target_starts in ((0, 1), (2, 0), (5, 0)):
        starts_before = _num_lines(log)
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if _num_lines(results) >= target_lines and _num_lines(log) - starts_before >= target_starts \
                    and _num_lines(log) > starts_before:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the sweep finished before it could be killed; make the cells slower"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        snapshots.append(results.read_bytes() if results.exists() else b"")
    # Every kill left whole lines only, and each snapshot extends the previous one.
    for a, b in zip(snapshots, snapshots[1:]):
        assert b.startswith(a)
    assert snapshots[-1].endswith(b"\n")
    assert 5 <= _num_lines(results) < 12
    # Resume to the end.
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
    final = results.read_bytes()
    assert final.startswith(snapshots[-1])  # nothing finished was lost or rewritten
    rows = [json.loads(l) for l in final.splitlines()]
    cells = [r["cell"] for r in rows]
    expected = _expected_grid()
    assert len(cells) == len(set(cells)) == 12  # no duplicates
    assert set(cells) == set(expected)  # exactly the grid
    for r in rows:  # values come from the right checkpoint and grid point
        np.testing.assert_allclose(r["llc_mean"], expected[r["cell"]], rtol=1e-6)
    # No finished cell was recomputed: after the run that finished a cell, no later run started it.
    order = []
    for line in log.read_text().splitlines():
        pid = int(line.split()[0])
        if pid not in order:
            order.append(pid)
    starts = {}
    for line in log.read_text().splitlines():
        pid, s, g, b = line.split()
        ck = f"ckpts/step_{int(float(b) / 10)}.msgpack|step_size={float(s)!r}|nbeta=default|localization={float(g)!r}"
        starts.setdefault(ck, []).append(order.index(int(pid)))
    for r in rows:
        assert max(starts[r["cell"]]) == order.index(r["pid"]), r["cell"]
    # results.csv is regenerated from the jsonl: one row per cell.
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 13 and csv_lines[0].startswith("checkpoint,step,step_size")
    # A rerun of a finished sweep computes nothing (and does not even import the entry point).
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    with jax.enable_x64(False):  # as in the driver's process (the same sweep identity)
        rerun = sweep.run_sweep(sweep.load_sweep_config(tmp_path / "sweep.toml"), out, cell_fn=must_not_run,
                                progress=False, plots=False)
    assert [r["cell"] for r in rerun] == [c["cell"] for c in sweep.load_sweep_config(tmp_path / "sweep.toml").cells()]
    assert results.read_bytes() == final


def _fake_cell(rng_key, params, *, step_size, nbeta, localization):
    u = float(jax.random.uniform(rng_key))
    return {"llc_mean": step_size * localization + u, "llc_std": 0.1, "llc_per_chain": [u, u]}


def test_run_sweep_in_process_plots_keys_and_fingerprint(tmp_path):
    _write_problem(tmp_path)
    (tmp_path / "sweep.toml").write_text(CONFIG.replace('localization = [1.0, 100.0]',
                                                        'localization = [1.0, 100.0]\nnbeta = ["default", 5.0]'))
    cfg = sweep.load_sweep_config(tmp_path / "sweep.toml")
    assert len(cfg.cells()) == 2 * 3 * 2 * 2
    rows = sweep.run_sweep(cfg, tmp_path / "out", cell_fn=_fake_cell, progress=False)
    assert [r["cell"] for r in rows] == [c["cell"] for c in cfg.cells()]
    # Keys depend on the cell only: recompute one independently.
    r = rows[7]
    u = float(jax.random.uniform(jax.random.fold_in(jax.random.key(3), __import__("zlib").crc32(r["cell"].encode()))))
    np.testing.assert_allclose(r["llc_mean"], r["step_size"] * r["localization"] + u, rtol=1e-12)
    assert len({row["llc_per_chain"][0] for row in rows}) == len(rows)  # distinct keys per cell
    default_rows = [row for row in rows if row["nbeta"] is None]
    np.testing.assert_allclose(default_rows[0]["nbeta_used"], 4 / np.log(4), rtol=1e-12)
    for png in ("llc_vs_checkpoint.png", "calibration_heatmap.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resuming with other sampler settings is refused with an explanation.
    (tmp_path / "sweep.toml").write_text(CONFIG.replace("num_draws = 10", "num_draws = 20"))
    with pytest.raises(ValueError, match="different sweep"):
        sweep.run_sweep(sweep.load_sweep_config(tmp_path / "sweep.toml"), tmp_path / "out", cell_fn=_fake_cell,
                        progress=False, plots=False)


def _row(cell, **kw):
    return {"cell": cell, "checkpoint": "c", "step_size": 1.0, "nbeta": None, "localization": 1.0, **kw}


def test_read_results_drops_torn_line_and_keeps_first_copy(tmp_path):
    p = tmp_path / "results.jsonl"
    sweep.append_result(p, _row("a", llc_mean=1.0))
    sweep.append_result(p, _row("b", llc_mean=float("nan")))
    sweep.append_result(p, _row("a", llc_mean=3.0))
    sweep.append_result(p, _row("d", error="ValueError: bad checkpoint"))  # a failed cell, then its retry
    sweep.append_result(p, _row("d", llc_mean=4.0))
    sweep.append_result(p, _row("e", error="first failure"))  # failed twice: the last reason is kept
    sweep.append_result(p, _row("e", error="second failure"))
    with open(p, "ab") as f:
        f.write(b'{"cell": "c", "llc')
    rows = sweep.read_results(p, repair=True)
    assert [(r["cell"], r.get("llc_mean"), r.get("error")) for r in rows] == [
        ("a", 1.0, None), ("b", None, None), ("d", 4.0, None), ("e", None, "second failure")]
    assert p.read_bytes().endswith(b"\n") and b'"cell": "c"' not in p.read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"cell": "a"}\nnot json\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match="line 1 is not a sweep result"):
        sweep.read_results(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(_row("a")) + '\nnot json\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        sweep.read_results(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(_row("a")) + "\n{}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not a sweep result"):
        sweep.read_results(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("text,match", [
    ("entry = 3", "entry"),
    ('entry = "m:f"\n[grid]\nstep_size = [0.1]', "num_chains"),
    ('entry = "m:f"\n[sampler]\nnum_chains=1\nnum_draws=1\nbatch_size=1\n', r"\[grid\]"),
    ('entry = "m:f"\n[sampler]\nnum_chains=1\nnum_draws=1\nbatch_size=1\n[grid]\nstep_size = [-1.0]', "positive"),
    ('entry = "m:f"\n[sampler]\nnum_chains=1\nnum_draws=1\nbatch_size=1\n[grid]\nstep_size = [0.1, 0.1]', "repeated"),
    ('entry = "m:f"\n[sampler]\nnum_chains=0\nnum_draws=1\nbatch_size=1\n[grid]\nstep_size = [0.1]', "positive integer"),
    ('entry = "m:f"\n[sampler]\nnum_chains=1\nnum_draws=1\nbatch_size=1\nstep_size=1\n[grid]\nstep_size=[1.0]', "Unknown"),
    ('entry = "m:f"\nchekpoints = []', "Unknown config keys"),
    ('entry = "m:f"\ncheckpoints = ["nope/*.msgpack"]\n[sampler]\nnum_chains=1\nnum_draws=1\nbatch_size=1\n'
     '[grid]\nstep_size=[1.0]', "matches no file"),
    ("entry = [", "Malformed TOML"),
])
def test_config_errors(tmp_path, text, match):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ValueError, match=match):
        sweep.load_sweep_config(tmp_path / "c.toml")


def test_entry_point_errors(tmp_path):
    (tmp_path / "mod_ok.py").write_text("X = 1\ndef f():\n    return 1\n")
    with pytest.raises(ValueError, match="form"):
        sweep.load_entry_point("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        sweep.load_entry_point("does_not_exist_xyz:f", [tmp_path])
    with pytest.raises(ValueError, match="no attribute"):
        sweep.load_entry_point("mod_ok:g", [tmp_path])
    with pytest.raises(ValueError, match="not callable"):
        sweep.load_entry_point("mod_ok:X", [tmp_path])
    with pytest.raises(ValueError, match="must return a tuple"):
        sweep.load_problem("mod_ok:f", [tmp_path])


def test_checkpoints_msgpack_and_orbax_roundtrip(tmp_path):
    params = {"params": {"dense": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3, np.float32)}}}
    checkpoints.save_msgpack(tmp_path / "a.msgpack", params)
    template = jax.tree.map(jnp.zeros_like, params)
    got = checkpoints.load_checkpoint(tmp_path / "a.msgpack", template)
    assert got["params"]["dense"]["bias"].dtype == np.float32
    np.testing.assert_array_equal(got["params"]["dense"]["kernel"], np.arange(6.0).reshape(2, 3))
    # {"params": p} restores into a template p.
    got = checkpoints.load_checkpoint(tmp_path / "a.msgpack", template["params"])
    np.testing.assert_array_equal(got["dense"]["bias"], np.ones(3))
    with pytest.raises(ValueError, match="different architecture"):
        checkpoints.load_checkpoint(tmp_path / "a.msgpack",
                                    {"params": {"dense": {"kernel": np.zeros((3, 3)), "bias": np.zeros(3)}}})
    with pytest.raises(ValueError, match="does not match"):
        checkpoints.load_checkpoint(tmp_path / "a.msgpack", {"w": np.zeros(2)})
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1\xc1garbage")
    with pytest.raises(ValueError, match="not a Flax msgpack"):
        checkpoints.load_checkpoint(tmp_path / "junk.msgpack")
    with pytest.raises(ValueError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.msgpack")
    # orbax: a CheckpointManager root with numbered steps; the latest step is read.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "orbax") as mngr:
        for step in (1, 2):
            p = jax.tree.map(lambda a: np.asarray(a) * step, params)
            mngr.save(step, args=ocp.args.PyTreeSave(p))
        mngr.wait_until_finished()
    got = checkpoints.load_checkpoint(tmp_path / "orbax", template)
    np.testing.assert_array_equal(got["params"]["dense"]["kernel"], 2 * np.arange(6.0).reshape(2, 3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "empty")


def test_shipped_example_config_is_valid():
    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = sweep.load_sweep_config(root / "examples" / "sweep.toml")
    assert [n for n, _ in cfg.checkpoints] == [f"checkpoints/step_{s:05d}.msgpack" for s in (100, 300, 1000, 3000)]
    assert len(cfg.cells()) == 4 * 3 * 2
    loss_fn, template, data = sweep.load_problem(cfg.entry, [cfg.base_dir])
    params = checkpoints.load_checkpoint(cfg.checkpoints[-1][1], template)
    # The last checkpoint is trained: its loss is near the teacher's noise variance 0.05^2 (summed over 2 outputs
    # and averaged: 0.0025), far below the untrained loss.
    assert float(loss_fn(params, data)) < 0.004 < float(loss_fn(template, data))


def test_plot_helpers(tmp_path):
    from degenjax._src import plots

    rng = np.random.default_rng(0)
    e = rng.random((4, 3))
    w = np.sort(e[1:, 1:].ravel())[::-1]  # constant nodes (row 0, column 0) excluded
    np.testing.assert_allclose(plots.cumulative_edge_weight(e), np.cumsum(w) / w.sum(), rtol=1e-14)
    # the curve crosses each fraction at the count edge_sparsity reports
    from degenjax import edge_sparsity
    counts = np.asarray(edge_sparsity([e], (0.5, 0.9))["counts"])[0]
    c = plots.cumulative_edge_weight(e)
    assert [int(np.argmax(c >= f * (1 - 1e-12)) + 1) for f in (0.5, 0.9)] == list(counts)
    with pytest.raises(ValueError, match="consecutive"):
        plots.plot_interaction_graph([rng.random((4, 3)), rng.random((2, 5))])
    with pytest.raises(ValueError, match="num_chains, num_draws"):
        plots.plot_loss_traces(np.zeros(5))
    with pytest.raises(ValueError, match="zero"):
        plots.cumulative_edge_weight(np.zeros((3, 3)))
    fig = plots.plot_spectra({"a": [np.array([3.0, 1.0, 0.0]), np.array([2.0])], "b": [np.array([1.0])]},
                             path=tmp_path / "s.png")
    assert len(fig.axes) == 2 and (tmp_path / "s.png").stat().st_size > 1000
    rows = [{"checkpoint": c, "step_size": s, "nbeta": None, "localization": 1.0, "llc_mean": m, "llc_std": 0.1}
            for c, s, m in (("a", 1e-4, 1.0), ("a", 1e-3, None), ("b", 1e-4, 2.0), ("b", 1e-3, 3.0))]
    plots.plot_llc_vs_checkpoint(rows, path=tmp_path / "l.png")
    fig = plots.plot_calibration_heatmap(rows, checkpoint="a", path=tmp_path / "h.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1", "x"]  # the diverged cell (None) is marked


def test_chain_mesh_uses_devices_that_divide_the_chains(num_devices):
    devs = jax.devices()[:8]
    assert sweep.chain_mesh(1, devs) is None
    assert sweep.chain_mesh(11, devs) is None  # prime and larger than the device count: no even split but 1
    assert sweep.chain_mesh(7, devs).shape["chains"] == 7
    m = sweep.chain_mesh(12, devs)
    assert m.axis_names == ("chains",) and m.shape["chains"] == 6
    assert sweep.chain_mesh(16, devs).shape["chains"] == 8
