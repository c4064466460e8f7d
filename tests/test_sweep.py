"""Sweep engine: config validation, the results file, sweep identity, failures, traces and plots.

Resumption after real SIGKILLs of the real LLC cell is tested in test_sweep_faults.py.
"""

import json
import pathlib

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
    counts = np.asarray(edge_sparsity([e], (0.5, 0.9)).counts)[0]
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


# ---------------------------------------------------------------------------------------------------------------
# sweep identity: a resume never mixes results of different checkpoints, code or settings


def _setup(tmp_path, config=CONFIG):
    tmp_path.mkdir(parents=True, exist_ok=True)
    _write_problem(tmp_path)
    (tmp_path / "sweep.toml").write_text(config)
    return tmp_path / "sweep.toml", tmp_path / "out"


def _run(cfg_path, out, cell=_fake_cell, **kw):
    return sweep.run_sweep(sweep.load_sweep_config(cfg_path), out, cell_fn=cell, progress=False, plots=False,
                           log=None, **kw)


def _must_not_run(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")


def test_resume_refuses_a_retrained_checkpoint_under_the_same_name(tmp_path):
    cfg, out = _setup(tmp_path)
    rows = _run(cfg, out)
    assert all(len(r["checkpoint_sha256"]) == 64 for r in rows)
    checkpoints.save_msgpack(tmp_path / "ckpts" / "step_1.msgpack", {"w": np.full((3,), 7.0, np.float32),
                                                                      "b": np.float32(0.5)})
    with pytest.raises(ValueError, match=r"Checkpoint ckpts/step_1\.msgpack changed since its cells were computed"):
        _run(cfg, out)
    # Adding a checkpoint (the grid grows) is a resume: only the new cells are computed.
    checkpoints.save_msgpack(tmp_path / "ckpts" / "step_1.msgpack", {"w": np.full((3,), 2.0, np.float32),
                                                                      "b": np.float32(10.0)})  # restored
    checkpoints.save_msgpack(tmp_path / "ckpts" / "step_2.msgpack", {"w": np.zeros(3, np.float32),
                                                                      "b": np.float32(1.0)})
    computed = []
    rows = _run(cfg, out, cell=lambda *a, **k: computed.append(1) or _fake_cell(*a, **k))
    assert len(computed) == 6 and len(rows) == 18


def test_resume_refuses_an_edited_entry_point_unless_versioned(tmp_path):
    cfg, out = _setup(tmp_path)
    _run(cfg, out)
    (tmp_path / "helpers.py").write_text("SCALE = 2.0\n")  # a new helper module next to the entry point
    with pytest.raises(ValueError, match=r"entry point's source changed \(helpers\.py;.*entry_version"):
        _run(cfg, out)
    with (tmp_path / "toy_problem.py").open("a") as f:
        f.write("# edited\n")
    with pytest.raises(ValueError, match=r"source changed \(helpers\.py, toy_problem\.py;"):
        _run(cfg, out)
    # With a user-given version, the version identifies the code (its source files are not hashed).
    cfg2, out2 = tmp_path / "v.toml", tmp_path / "out2"
    cfg2.write_text('entry_version = "v1"\n' + CONFIG)
    _run(cfg2, out2)
    (tmp_path / "helpers.py").write_text("SCALE = 3.0\n")
    assert len(_run(cfg2, out2, cell=_must_not_run)) == 12
    cfg2.write_text('entry_version = "v2"\n' + CONFIG)
    with pytest.raises(ValueError, match="entry_version: 'v1' -> 'v2'"):
        _run(cfg2, out2)


def test_resume_refuses_toggled_x64(tmp_path):
    cfg, out = _setup(tmp_path)
    _run(cfg, out)  # the test suite runs with x64 on
    with jax.enable_x64(False), pytest.raises(ValueError, match="x64: True -> False"):
        _run(cfg, out)


def test_config_in_another_folder_resumes_only_on_the_same_content(tmp_path):
    cfg, out = _setup(tmp_path / "a")
    _run(cfg, out)
    other = tmp_path / "b"  # the same layout and the same files: the same results, a legitimate resume
    import shutil

    shutil.copytree(tmp_path / "a", other, ignore=shutil.ignore_patterns("out", "__pycache__"))
    assert len(_run(other / "sweep.toml", out, cell=_must_not_run)) == 12
    checkpoints.save_msgpack(other / "ckpts" / "step_0.msgpack", {"w": np.ones(3, np.float32), "b": np.float32(5.0)})
    with pytest.raises(ValueError, match=r"Checkpoint ckpts/step_0\.msgpack changed"):
        _run(other / "sweep.toml", out)


def test_explicit_defaults_are_the_same_sweep(tmp_path):
    cfg, out = _setup(tmp_path)
    _run(cfg, out)
    cfg.write_text(CONFIG.replace("batch_size = 2", 'batch_size = 2\nnum_burnin = 0\nsampler = "sgld"'))
    assert len(_run(cfg, out, cell=_must_not_run)) == 12
    cfg.write_text(CONFIG.replace("batch_size = 2", "batch_size = 2\nnum_burnin = 5"))
    with pytest.raises(ValueError, match=r"\[sampler\] num_burnin: 0 -> 5"):
        _run(cfg, out)


# ---------------------------------------------------------------------------------------------------------------
# a failed start does not poison --out; one bad checkpoint fails only its cells


def test_failed_start_leaves_no_trace_and_the_fixed_rerun_works(tmp_path):
    cfg, out = _setup(tmp_path)
    cfg.write_text(CONFIG.replace("toy_problem:make", "toy_problem:mkae"))
    with pytest.raises(ValueError, match="has no attribute 'mkae'"):
        _run(cfg, out)
    assert not (out / "sweep.json").exists()
    # batch_size larger than the data (n = 4): found by tracing the real estimator before anything is written.
    cfg.write_text(CONFIG.replace("batch_size = 2", "batch_size = 100"))
    with pytest.raises(ValueError, match="batch_size=100 is larger than the data set"):
        _run(cfg, out, cell=None)
    assert not (out / "sweep.json").exists() and not (out / "results.jsonl").exists()
    cfg.write_text(CONFIG.replace("batch_size = 2", 'batch_size = 2\nsampler = "sgdl"'))
    with pytest.raises(ValueError, match="Unknown sampler 'sgdl'"):
        _run(cfg, out)
    cfg.write_text(CONFIG)
    assert len(_run(cfg, out)) == 12


def test_a_bad_checkpoint_fails_only_its_cells(tmp_path):
    cfg, out = _setup(tmp_path)
    good = (tmp_path / "ckpts" / "step_1.msgpack").read_bytes()
    (tmp_path / "ckpts" / "step_1.msgpack").write_bytes(b"\xc1\xc1 not a checkpoint")
    lines = []
    rows = sweep.run_sweep(sweep.load_sweep_config(cfg), out, cell_fn=_fake_cell, progress=False, plots=True,
                           log=lines.append)
    ok = [r for r in rows if not r.get("error")]
    bad = [r for r in rows if r.get("error")]
    assert [r["checkpoint"] for r in ok] == ["ckpts/step_0.msgpack"] * 6
    assert [r["checkpoint"] for r in bad] == ["ckpts/step_1.msgpack"] * 6
    assert all("not a Flax msgpack checkpoint" in r["error"] for r in bad)
    assert len(lines) == 6 and all(l.startswith("failed: ckpts/step_1.msgpack|") for l in lines)
    csv_rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert sum(bool(r["error"]) for r in csv_rows) == 6
    assert (out / "calibration_heatmap.png").exists()
    # The repaired checkpoint: a rerun computes exactly the failed cells.
    (tmp_path / "ckpts" / "step_1.msgpack").write_bytes(good)
    computed = []
    rows = _run(cfg, out, cell=lambda *a, **k: computed.append(k) or _fake_cell(*a, **k))
    assert len(computed) == 6 and not any(r.get("error") for r in rows)
    # A cell raising ValueError fails that cell only.
    def picky(rng_key, params, *, step_size, nbeta, localization):
        if step_size == 0.01:
            raise ValueError("step size rejected")
        return _fake_cell(rng_key, params, step_size=step_size, nbeta=nbeta, localization=localization)

    rows = _run(cfg, tmp_path / "out2", cell=picky)
    assert sum("step size rejected" in (r.get("error") or "") for r in rows) == 4


def test_damaged_results_and_sweep_json_are_named(tmp_path):
    cfg, out = _setup(tmp_path)
    _run(cfg, out)
    meta = (out / "sweep.json").read_bytes()
    (out / "sweep.json").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=r"sweep\.json is not valid JSON .* truncated"):
        _run(cfg, out)
    (out / "sweep.json").write_bytes(meta)
    with (out / "results.jsonl").open("a") as f:
        f.write("{}\n")
    with pytest.raises(ValueError, match=r"results\.jsonl line 13 is not a sweep result"):
        _run(cfg, out)


# ---------------------------------------------------------------------------------------------------------------
# the real LLC cell: traces, convergence, plots


def test_real_cell_saves_traces_and_flags_convergence(tmp_path):
    cfg, out = _setup(tmp_path, CONFIG.replace("step_size = [0.001, 0.01, 0.1]", "step_size = [0.001]")
                      .replace('checkpoints = ["ckpts/*.msgpack"]', 'checkpoints = ["ckpts/step_1.msgpack"]'))
    lines = []
    rows = sweep.run_sweep(sweep.load_sweep_config(cfg), out, progress=False, plots=True, log=lines.append)
    assert len(rows) == 2
    data = np.arange(12.0).reshape(4, 3)
    for r in rows:
        z = sweep.load_traces(out, r)
        trace = z["loss_trace"]
        assert trace.shape == (2, 10)
        # The saved trace reproduces the row's estimate (lambda_c = nbeta (mean_t L_t - L_n(w*)), w* = step_1).
        init = np.mean((data @ np.full(3, 2.0) + 10.0) ** 2)
        np.testing.assert_allclose(r["init_loss"], init, rtol=1e-6)
        np.testing.assert_allclose(r["llc_per_chain"], r["nbeta_used"] * (trace.mean(axis=1) - init), rtol=1e-5)
        assert r["converged"] is (r["rhat"] <= 1.05 and r["ess"] >= 100)
    # 2 chains x 10 draws cannot converge: each cell is reported, and marked on both plots.
    assert not any(r["converged"] for r in rows)
    assert len(lines) == 2 and all(l.startswith("not converged: ") and "R-hat" in l or "ESS" in l for l in lines)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"converged", "trace_file", "error", "step"} <= set(header)
    # the sweep's batched cells give each cell the numbers of estimate_llc with the cell's key (bitwise)
    from degenjax import estimate_llc

    loss_fn, template, data = sweep.load_problem("toy_problem:make", [str(tmp_path)])
    params = checkpoints.load_checkpoint(tmp_path / "ckpts" / "step_1.msgpack", template)
    for r in rows:
        one = estimate_llc(sweep.cell_key(3, r), loss_fn, params, data, num_chains=2, num_draws=10, batch_size=2,
                           step_size=r["step_size"], localization=r["localization"], warn=False)
        got = sweep.load_traces(out, r)["loss_trace"]  # saved as float64
        assert np.asarray(one.loss_trace).dtype == np.float32
        assert np.array_equal(np.asarray(one.loss_trace, np.float64), got)
        assert np.asarray(one.llc_per_chain, np.float64).tolist() == r["llc_per_chain"]


def test_sweep_plots_mark_unconverged_cells_and_use_training_steps(tmp_path):
    from degenjax._src import plots

    rows = [{"checkpoint": f"ck/step_{s:05d}.msgpack", "step_size": e, "nbeta": None, "localization": 1.0,
             "llc_mean": m, "llc_std": 0.1, "converged": c}
            for s, e, m, c in ((100, 1e-4, 1.0, True), (100, 1e-3, 1.5, False), (3000, 1e-4, 2.0, False),
                               (3000, 1e-3, None, False))]
    fig = plots.plot_llc_vs_checkpoint(rows, path=tmp_path / "l.png")
    ax = fig.axes[0]
    assert "training step" in ax.get_xlabel() and ax.get_xscale() == "log"
    rings = [c for c in ax.collections if c.get_gid() == "unconverged"]
    assert len(rings) == 1 and len(rings[0].get_offsets()) == 2  # the two finite unconverged cells
    np.testing.assert_allclose(sorted(np.asarray(rings[0].get_offsets())[:, 1]), [1.5, 2.0])
    xs = sorted({round(float(np.log10(x))) for x in np.asarray(rings[0].get_offsets())[:, 0]})
    assert xs == [2, 3]  # at steps ~100 and ~3000 (log10 3000 = 3.48), not at checkpoint indices
    fig = plots.plot_calibration_heatmap(rows, path=tmp_path / "h.png")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["2*", "x"]
    assert len([p for p in ax.patches if p.get_gid() == "unconverged"]) == 1
    # Names without distinct numbers: checkpoints in order, labelled by name.
    rows2 = [dict(r, checkpoint=r["checkpoint"].replace("step_00100", "first").replace("step_03000", "last"))
             for r in rows]
    ax = plots.plot_llc_vs_checkpoint(rows2).axes[0]
    assert ax.get_xlabel() == "checkpoint" and [t.get_text() for t in ax.get_xticklabels()] == ["first.msgpack",
                                                                                                "last.msgpack"]
    assert sweep.checkpoint_step("ck/step_00300.msgpack") == 300
    assert sweep.checkpoint_step("run/checkpoint-1500") == 1500 and sweep.checkpoint_step("final.msgpack") is None


def _split_rhat(trace):
    """Split R-hat (Gelman et al., BDA3 section 11.4) in NumPy: chains halved, between/within variances."""
    c, n = trace.shape
    half = n // 2
    x = np.concatenate([trace[:, :half], trace[:, n - half:]])
    b = half * np.var(x.mean(axis=1), ddof=1)
    w = np.mean(np.var(x, axis=1, ddof=1))
    return np.sqrt(((half - 1) / half * w + b / half) / w)


def test_shipped_example_converges_at_its_slowest_setting(tmp_path):
    # The slowest-mixing cell of examples/sweep.toml (smallest step size and localization) on every checkpoint;
    # the whole example is run by the slow test below.
    import dataclasses

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = sweep.load_sweep_config(root / "examples" / "sweep.toml")
    cfg = dataclasses.replace(cfg, grid={**cfg.grid, "step_size": (min(cfg.grid["step_size"]),),
                                         "localization": (min(cfg.grid["localization"]),)})
    rows = sweep.run_sweep(cfg, tmp_path / "out", progress=False, plots=False, log=None)
    assert len(rows) == 4
    for r in rows:
        trace = sweep.load_traces(tmp_path / "out", r)["loss_trace"]
        assert trace.shape == (4, 2000)
        np.testing.assert_allclose(r["rhat"], _split_rhat(trace), rtol=1e-8)
        assert r["rhat"] <= 1.05 and r["ess"] >= 100 and r["converged"], r


@pytest.mark.slow
def test_shipped_example_converges_everywhere(tmp_path):
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    exe = pathlib.Path(sys.executable).with_name("degenjax")
    proc = subprocess.run([str(exe), "sweep", str(root / "examples" / "sweep.toml"), "--out", str(tmp_path / "o"),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "not converged" not in proc.stdout + proc.stderr
    rows = [json.loads(l) for l in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for r in rows:
        trace = sweep.load_traces(tmp_path / "o", r)["loss_trace"]
        assert _split_rhat(trace) <= 1.05 and r["ess"] >= 100 and r["converged"], r["cell"]


def test_sweep_cli_multiprocess_options_need_distributed(tmp_path):
    from typer.testing import CliRunner

    from degenjax.cli import app

    _write_problem(tmp_path)
    (tmp_path / "sweep.toml").write_text(CONFIG)
    res = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "out"),
                                   "--process-id", "1"])
    assert res.exit_code == 1
    assert "add --distributed" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
