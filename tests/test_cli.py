"""The degenjax CLI: --help, one-line errors for bad input, and the llc / basis / sweep commands end to end."""

import json
import math
import subprocess
import sys
import pathlib

import numpy as np
import pytest
from typer.testing import CliRunner

from degenjax._src.checkpoints import save_msgpack
from degenjax.cli import app

runner = CliRunner()

PROBLEM = '''
import jax, jax.numpy as jnp, numpy as np
import degenjax as dj

_rng = np.random.default_rng(0)
X = _rng.normal(size=(400, 3))
X[:, 2] = 0.0                      # a constant input coordinate: the input covariance has rank 2
Y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 * _rng.normal(size=(400, 1))

def make():
    params = {"w": jnp.asarray(np.array([[1.0], [-2.0], [0.5]])), "b": jnp.zeros((1,))}
    loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["b"][None, :] - batch[1]) ** 2)
    return loss, params, (jnp.asarray(X), jnp.asarray(Y))

def make_basis():
    params = {"W1": jnp.asarray(_rng.normal(size=(3, 4))), "W2": jnp.asarray(_rng.normal(size=(4, 2)))}
    model = dj.Sections((lambda p, h: h @ p["W1"], lambda p, h: h @ p["W2"]))
    return model, params, [jnp.asarray(X)]

def not_a_tuple():
    return 3

def make_marked():
    open("entry_called.marker", "w").close()   # shows whether the computation started
    return make()
'''


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "cli_problem.py").write_text(PROBLEM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("cmd,options", [
    ([], ["quickstart", "llc", "basis", "sweep"]),
    (["quickstart"], ["--out", "--tiny", "--train-steps", "--num-draws", "demo-report"]),
    (["llc"], ["TARGET", "--checkpoint", "--step-size", "--nbeta", "--localization", "--num-chains", "0.0001"]),
    (["basis"], ["TARGET", "--kind", "lib", "--rtol", "--out"]),
    (["sweep"], ["CONFIG", "--out", "--plots"]),
])
def test_help(cmd, options):
    res = runner.invoke(app, cmd + ["--help"])
    assert res.exit_code == 0, res.output
    for o in options:
        assert o in res.output, (o, res.output)


def test_errors_are_one_line(workdir):
    _one_line_error(runner.invoke(app, ["sweep", "missing.toml", "--out", "o"]), "not found", "missing.toml")
    (workdir / "bad.toml").write_text("entry = [1,\n")
    _one_line_error(runner.invoke(app, ["sweep", "bad.toml", "--out", "o"]), "Malformed TOML")
    (workdir / "bad_grid.toml").write_text('entry = "cli_problem:make"\n[sampler]\nnum_chains = 1\nnum_draws = 5\n'
                                           'batch_size = 10\n[grid]\nstep_size = "big"\n')
    _one_line_error(runner.invoke(app, ["sweep", "bad_grid.toml", "--out", "o"]), "step_size")
    _one_line_error(runner.invoke(app, ["llc", "no_such_module_xyz:make"]), "cannot import", "no_such_module_xyz")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:nope"]), "no attribute", "nope")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem"]), "package.module:function")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:not_a_tuple"]), "(loss_fn, params, data)")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:make", "--checkpoint", "nope.msgpack"]),
                    "Checkpoint not found")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:make", "--batch-size", "100000"]), "batch")
    _one_line_error(runner.invoke(app, ["basis", "cli_problem:make"]), "(model, params, batches)")
    (workdir / "cfg.toml").write_text('entry = "cli_problem:make"\ncheckpoints = ["ck/*.msgpack"]\n[sampler]\n'
                                      'num_chains = 1\nnum_draws = 5\nbatch_size = 10\n[grid]\nstep_size = [1e-4]\n')
    _one_line_error(runner.invoke(app, ["sweep", "cfg.toml", "--out", "o"]), "matches no file")
    # Usage errors (click) are short messages too, not tracebacks.
    res = runner.invoke(app, ["llc"])
    assert res.exit_code == 2 and "Missing argument" in res.output and "Traceback" not in res.output


def test_installed_entry_point_errors_without_traceback(tmp_path):
    exe = pathlib.Path(sys.executable).with_name("degenjax")
    proc = subprocess.run([str(exe), "sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr


def test_compile_cache_is_reused_by_a_rerun(workdir):
    # The second run finds every program in the cache (no new entries) and prints the same estimate.
    exe = pathlib.Path(sys.executable).with_name("degenjax")
    cmd = [str(exe), "--compile-cache", str(workdir / "cache"), "llc", "cli_problem:make", "--num-draws", "50",
           "--batch-size", "40", "--no-progress"]
    outputs, entries = [], []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
        entries.append(sorted(p.name for p in (workdir / "cache").iterdir()))
    # The rerun's programs are found in the cache. (A program compiling in just under the CLI's 0.05 s threshold in
    # the first run and just over it in the second, on a loaded machine, is stored then: allow a few such.)
    assert entries[0] and set(entries[0]) <= set(entries[1])
    assert len(entries[1]) - len(entries[0]) <= max(2, len(entries[0]) // 5), (entries[0], entries[1])
    assert outputs[1] == outputs[0] and "LLC =" in outputs[0]


def test_llc_command_with_checkpoint(workdir):
    # Parameters away from the entry point's: L_n(w*) must be the loss at the checkpoint's parameters.
    w = np.array([[0.9], [-2.1], [7.0]])
    save_msgpack(workdir / "ck.msgpack", {"w": w, "b": np.array([0.05])})
    res = runner.invoke(app, ["llc", "cli_problem:make", "--checkpoint", "ck.msgpack", "--num-chains", "2",
                              "--num-draws", "60", "--batch-size", "40", "--step-size", "1e-4", "--out", "r.json", "--no-progress",
                              "--plot", "trace.png"])
    assert res.exit_code == 0, res.output
    r = json.loads((workdir / "r.json").read_text())
    import cli_problem  # noqa: the user's module, imported by the CLI from the current directory

    X, Y = cli_problem.X, cli_problem.Y
    np.testing.assert_allclose(r["init_loss"], np.mean((X @ w + 0.05 - Y) ** 2), rtol=1e-10)
    np.testing.assert_allclose(r["nbeta"], 400 / math.log(400), rtol=1e-12)
    np.testing.assert_allclose(r["llc_mean"], np.mean(r["llc_per_chain"]), rtol=1e-12)
    np.testing.assert_allclose(r["n_eff"], 2 * r["llc_mean"], rtol=1e-12)
    assert (workdir / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert "LLC =" in res.output


def test_basis_command_dims_match_numpy_ranks(workdir):
    res = runner.invoke(app, ["basis", "cli_problem:make_basis", "--kind", "pca", "--out", "b"])
    assert res.exit_code == 0, res.output
    s = json.loads((workdir / "b" / "summary.json").read_text())
    import cli_problem

    X = cli_problem.X
    _, params, _ = cli_problem.make_basis()
    H1 = X @ np.asarray(params["W1"])
    ranks = [np.linalg.matrix_rank(np.cov(a, rowvar=False, bias=True), tol=1e-9) for a in (X, H1)]
    assert ranks == [2, 2]
    assert s["dims"] == [r + 1 for r in ranks]  # + the constant direction
    z = np.load(workdir / "b" / "basis.npz")
    assert z["C_0"].shape == (4, 3) and z["edges_0"].shape == (3, 3)
    assert s["edge_counts"] == [int(np.count_nonzero(z["edges_0"]))]


def test_sweep_command_real_llc(workdir):
    for i, w in enumerate((1.0, 1.5)):
        save_msgpack(workdir / "ck" / f"s{i}.msgpack", {"w": np.array([[w], [-2.0], [0.5]]), "b": np.array([0.0])})
    (workdir / "sw.toml").write_text('entry = "cli_problem:make"\ncheckpoints = ["ck/*.msgpack"]\n[sampler]\n'
                                     'num_chains = 2\nnum_draws = 30\nbatch_size = 40\n[grid]\n'
                                     'step_size = [1e-5, 1e-4]\nlocalization = [10.0]\n')
    res = runner.invoke(app, ["sweep", "sw.toml", "--out", "out", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in (workdir / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(r["diverged"] for r in rows)
    import cli_problem

    X, Y = cli_problem.X, cli_problem.Y
    for r in rows:
        w0 = 1.0 if r["checkpoint"].endswith("s0.msgpack") else 1.5
        want = np.mean((X @ np.array([[w0], [-2.0], [0.5]]) - Y) ** 2)
        np.testing.assert_allclose(r["init_loss"], want, rtol=1e-10)
        np.testing.assert_allclose(r["llc_mean"], np.mean(r["llc_per_chain"]), rtol=1e-10)
    assert (workdir / "out" / "calibration_heatmap.png").exists()
    # Rerun: nothing recomputed, the file is unchanged.
    before = (workdir / "out" / "results.jsonl").read_bytes()
    res = runner.invoke(app, ["sweep", "sw.toml", "--out", "out", "--no-progress", "--no-plots"])
    assert res.exit_code == 0 and (workdir / "out" / "results.jsonl").read_bytes() == before


def test_bad_paths_seeds_and_damaged_sweep_files_are_one_line_errors_before_computing(workdir):
    (workdir / "blocker").write_text("a file, not a folder")
    marker = workdir / "entry_called.marker"
    # --compile-cache: under a file, or a file itself.
    _one_line_error(runner.invoke(app, ["--compile-cache", "blocker/cache", "llc", "cli_problem:make_marked"]),
                    "--compile-cache", "blocker")
    _one_line_error(runner.invoke(app, ["--compile-cache", "blocker", "llc", "cli_problem:make_marked"]),
                    "--compile-cache", "not a folder")
    # A seed jax.random.key cannot take.
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:make_marked", "--seed", str(2**63)]), "--seed",
                    "64-bit range")
    # Unwritable outputs are found before the computation (the entry point is never called).
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:make_marked", "--out", "blocker/r.json"]), "--out",
                    "blocker")
    _one_line_error(runner.invoke(app, ["llc", "cli_problem:make_marked", "--plot", "blocker/p.png"]), "--plot")
    _one_line_error(runner.invoke(app, ["basis", "cli_problem:make_marked", "--out", "blocker"]), "--out",
                    "not a folder")
    assert not marker.exists()
    cfg = ('entry = "cli_problem:make_marked"\n[sampler]\nnum_chains = 1\nnum_draws = 5\nbatch_size = 10\n'
           '[grid]\nstep_size = [1e-4]\n')
    (workdir / "cfg.toml").write_text(cfg)
    _one_line_error(runner.invoke(app, ["sweep", "cfg.toml", "--out", "blocker"]), "--out", "not a folder")
    (workdir / "seed.toml").write_text("seed = 18446744073709551616\n" + cfg)
    _one_line_error(runner.invoke(app, ["sweep", "seed.toml", "--out", "o1"]), "seed", "64-bit range")
    # A truncated sweep.json and a line of results.jsonl that is not a result: named, not a traceback.
    (workdir / "o2").mkdir()
    (workdir / "o2" / "sweep.json").write_text('{"format": 2, "entry": "cli_pro')
    _one_line_error(runner.invoke(app, ["sweep", "cfg.toml", "--out", "o2"]), "sweep.json", "not valid JSON")
    (workdir / "o3").mkdir()
    (workdir / "o3" / "results.jsonl").write_text("{}\n")
    _one_line_error(runner.invoke(app, ["sweep", "cfg.toml", "--out", "o3"]), "results.jsonl line 1",
                    "not a sweep result")
    assert not marker.exists()
