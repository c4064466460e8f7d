"""Multi-process JAX: 2 real processes started here, each with 2 simulated CPU devices and gloo collectives.

- the Python API (tests/mp_worker.py): a batch of LLC cells with chains sharded over the 4 devices of both
  processes equals `estimate_llc` run cell by cell in this process; Grams, the interaction basis and edges on data
  of which each process streams only its own rows equal a float64 NumPy reference (Grams) and this process's
  single-process run on all rows (basis, edges);
- ``degenjax sweep --distributed``: resumes a sweep that this process started (half of its cells written), writes
  the missing cells once each (process 0), with the numbers of this process's uninterrupted single-process run.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import degenjax as dj
import mp_worker
from conftest import assert_trees_all_close
from degenjax._src import sweep
from degenjax._src.checkpoints import save_msgpack

HERE = pathlib.Path(__file__).parent
EXE = str(pathlib.Path(sys.executable).with_name("degenjax"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(commands, cwd):
    """Starts one process per command, each with 2 simulated CPU devices."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE)}
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in commands]


def _wait(procs, timeout=240):
    """Waits for every process; fails with their output if one fails (and kills the others)."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-3000:]}"


def _numpy_grams(sections_np, X):
    """Centred activation Grams with the constant appended, float64 NumPy (E over all rows, no N-1)."""
    out = []
    for h in sections_np(X):
        f = np.concatenate([h - h.mean(0), np.ones((h.shape[0], 1))], axis=1)
        out.append(f.T @ f / h.shape[0])
    return out


def test_api_cells_and_grams_over_two_processes(tmp_path):
    port, out = _free_port(), tmp_path / "mp.npz"
    procs = _start([[sys.executable, str(HERE / "mp_worker.py"), str(port), "2", str(i), str(out)]
                    for i in range(2)], tmp_path)
    # the references, while the workers run: the cell-by-cell path in one process (8 devices, no mesh) ...
    loss_fn, sections, params, (X, Y) = mp_worker.problem()
    keys = jax.random.split(jax.random.key(7), mp_worker.NUM_CELLS)
    cells = [dj.estimate_llc(keys[c], loss_fn, jax.tree.map(lambda x: jnp.asarray(x[c]), params),
                             (jnp.asarray(X), jnp.asarray(Y)), num_chains=mp_worker.NUM_CHAINS,
                             num_draws=mp_worker.NUM_DRAWS, batch_size=mp_worker.BATCH,
                             step_size=mp_worker.STEP_SIZES[c], nbeta=mp_worker.NBETAS[c], warn=False)
             for c in range(mp_worker.NUM_CELLS)]
    # ... and the basis and edges on all rows in one process
    p0 = jax.tree.map(lambda x: jnp.asarray(x[0]), params)
    one = [jnp.asarray(X[i:i + 64]) for i in range(0, len(X), 64)]
    basis = dj.interaction_basis(sections, p0, one)
    edges = dj.interaction_edges(sections, p0, basis, one)
    _wait(procs)
    got = dict(np.load(out))
    assert int(got["devices"]) == 4
    for c, r in enumerate(cells):
        assert_trees_all_close(got["loss_trace"][c], r.loss_trace, rtol=1e-12)
        assert_trees_all_close(got["llc_mean"][c], r.llc_mean, rtol=1e-9)
        assert_trees_all_close(got["init_loss"][c], r.init_loss, rtol=1e-12)
    w1 = params["w1"][0]
    ref = _numpy_grams(lambda x: [x, np.tanh(x @ w1)], X)  # float64 NumPy
    for l in range(2):
        assert_trees_all_close(got[f"grams{l}"], ref[l], rtol=1e-10, atol=1e-13)
    for l in range(2):
        assert_trees_all_close(got[f"Lambda{l}"], basis.Lambda[l], rtol=1e-8, atol=1e-12)
    for l in range(len(edges)):
        assert_trees_all_close(got[f"edges{l}"], edges[l], rtol=1e-8, atol=1e-12)


PROBLEM = '''
import jax.numpy as jnp
import numpy as np

_rng = np.random.default_rng(0)
X = _rng.normal(size=(128, 5))
Y = X @ _rng.normal(size=(5, 2)) + 0.1 * _rng.normal(size=(128, 2))


def make():
    params = {"w": jnp.asarray(np.linalg.lstsq(X, Y, rcond=None)[0]), "b": jnp.zeros((2,))}

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["w"] + p["b"][None, :] - batch[1]) ** 2)

    return loss, params, (jnp.asarray(X), jnp.asarray(Y))
'''

CONFIG = '''
entry = "mp_problem:make"
checkpoints = ["ck/*.msgpack"]
seed = 3
[sampler]
num_chains = 2
num_draws = 200
batch_size = 16
[grid]
step_size = [1e-4, 3e-4]
nbeta = ["default", 20.0]
'''


def test_sweep_distributed_resumes_a_single_process_sweep_with_its_numbers(tmp_path):
    (tmp_path / "mp_problem.py").write_text(PROBLEM)
    (tmp_path / "mp.toml").write_text(CONFIG)
    rng = np.random.default_rng(1)
    for step in (10, 20):
        save_msgpack(tmp_path / "ck" / f"step_{step}.msgpack",
                     {"w": rng.normal(size=(5, 2)), "b": 0.1 * rng.normal(size=(2,))})
    cfg = sweep.load_sweep_config(tmp_path / "mp.toml")
    ref_rows = sweep.run_sweep(cfg, tmp_path / "ref", progress=False, plots=False, log=None)  # one process
    assert len(ref_rows) == 8
    # a crash after half of the cells: keep the first 4 result lines
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    kept = b"".join((out / "results.jsonl").read_bytes().splitlines(keepends=True)[:4])
    (out / "results.jsonl").write_bytes(kept)
    port = _free_port()
    command = [EXE, "sweep", "mp.toml", "--out", str(out), "--no-progress", "--no-plots", "--x64", "--distributed",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    _wait(_start([command + ["--process-id", str(i)] for i in range(2)], tmp_path))
    data = (out / "results.jsonl").read_bytes()
    assert data.startswith(kept)
    rows = [json.loads(line) for line in data.splitlines()]
    assert sorted(r["cell"] for r in rows) == sorted(r["cell"] for r in ref_rows)  # each cell once
    assert len({r["pid"] for r in rows[4:]}) == 1 and rows[4]["pid"] != rows[0]["pid"]  # written by one process
    ref = {r["cell"]: r for r in ref_rows}
    for r in rows[4:]:
        want = ref[r["cell"]]
        assert_trees_all_close(r["llc_per_chain"], want["llc_per_chain"], rtol=1e-9, err_msg=r["cell"])
        assert_trees_all_close(r["init_loss"], want["init_loss"], rtol=1e-12, err_msg=r["cell"])
        with np.load(out / r["trace_file"]) as a, np.load(tmp_path / "ref" / want["trace_file"]) as b:
            assert_trees_all_close(a["loss_trace"], b["loss_trace"], rtol=1e-12, err_msg=r["cell"])
    assert len((out / "results.csv").read_text().splitlines()) == 9
