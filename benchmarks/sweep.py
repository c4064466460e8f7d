"""Sweep benchmark: a grid of LLC cells, degenjax batched vs degenjax cell by cell vs devinterp.

The grid: 4 checkpoints x 3 step sizes x 2 nbeta (n / log n and a fixed value) = 24 cells, each 4 chains x 2000
draws (``--draws``), on two problems:

* ``dln``: a deep linear network 10-20-20-10 (true rank 5), MSE, n = 10000, batch 100; the checkpoints are full-
  batch gradient-descent iterates from a small random start (steps 250, 500, 1000, 2000);
* ``digits``: the quickstart's MLP 64-32-32-10 (ReLU, cross-entropy) on scikit-learn's digits (1438 training
  points), batch 100; the checkpoints are full-batch Adam iterates (steps 100, 200, 400, 800).

Each mode runs in a fresh process and is timed from its first call to the results on the host, compilation
included (imports and data set-up excluded), then once more (compiled):

* ``batched``: ONE ``degenjax.estimate_llc_batched`` call over all 24 cells (96 chains in one program);
* ``cells``: ``degenjax.estimate_llc`` called cell by cell (compiled once: its programs take the hyperparameters
  as arguments), the same keys; the numbers equal ``batched``'s (checked, printed);
* ``devinterp``: devinterp 1.3.2's ``estimate_learning_coeff_with_summary`` per cell (chains one after another,
  ``cores=1``, one torch thread: the fastest setting on this 2-core machine) with the fast data loader of
  ``benchmarks/llc.py`` (a ``BatchSampler`` over a ``TensorDataset``, no per-item collation), given the full-data
  ``L_n(w*)`` as ``init_loss``. With ``--devinterp-cells K < 24`` only the first K cells of the grid are run and
  the wall time is extrapolated to 24 cells linearly (per cell), which the printed table says.

Run: ``.venv/bin/python benchmarks/sweep.py`` (needs the ``bench`` extra for devinterp). Records the run in
benchmarks/results.jsonl (RESULTS.md and history.md are regenerated from it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from llc import _mlp_loss  # benchmarks/llc.py (this folder): the digits MLP's cross-entropy

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------------
# problems and checkpoints (made once by the parent, saved to npz, loaded by every mode's process)


def _dln_checkpoints(seed=0, n=10000):
    import jax
    import jax.numpy as jnp

    widths, rank = [10, 20, 20, 10], 5
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    u, s, vt = np.linalg.svd(ws[1], full_matrices=False)
    s[rank:] = 0.0
    ws[1] = (u * s) @ vt
    x = rng.standard_normal((n, widths[0])).astype(np.float32)
    y = (x @ ws[0] @ ws[1] @ ws[2] + 0.1 * rng.standard_normal((n, widths[-1]))).astype(np.float32)
    params = [jnp.asarray(0.3 * rng.standard_normal(w.shape) / np.sqrt(w.shape[0]), jnp.float32) for w in ws]
    loss = jax.jit(jax.value_and_grad(lambda p: _dln_loss(p, (x, y))))
    ckpts, steps = [], (250, 500, 1000, 2000)
    for t in range(1, steps[-1] + 1):
        _, g = loss(params)
        params = [p - 0.05 * gi for p, gi in zip(params, g)]
        if t in steps:
            ckpts.append([np.asarray(p) for p in params])
    return {"x": x, "y": y, **{f"w{l}": np.stack([c[l] for c in ckpts]) for l in range(3)}}


def _dln_loss(params, batch):
    import jax.numpy as jnp

    x, y = batch
    h = x
    for w in params:
        h = h @ w
    return jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


def _digits_checkpoints(seed=0):
    import jax
    import jax.numpy as jnp
    import optax

    from degenjax._src.quickstart import load_digits_split

    x, y, _, _ = load_digits_split(None, seed)
    widths = [64, 32, 32, 10]
    keys = jax.random.split(jax.random.key(seed), 3)
    params = [dict(w=jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), b=jnp.zeros((b,), jnp.float32))
              for k, a, b in zip(keys, widths[:-1], widths[1:])]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: _mlp_loss(q, (x, y)))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    ckpts, steps = [], (100, 200, 400, 800)
    for t in range(1, steps[-1] + 1):
        params, state = step(params, state)
        if t in steps:
            ckpts.append(jax.tree.map(np.asarray, params))
    out = {"x": x, "y": y}
    for l in range(3):
        out[f"w{l}"] = np.stack([c[l]["w"] for c in ckpts])
        out[f"b{l}"] = np.stack([c[l]["b"] for c in ckpts])
    return out


PROBLEMS = {
    # step sizes and the fixed nbeta of the grid; batch size
    "dln": dict(step_sizes=(1e-5, 3e-5, 1e-4), nbeta=100.0, batch=100),
    "digits": dict(step_sizes=(1e-5, 3e-5, 1e-4), nbeta=100.0, batch=100),
}


def _grid(problem, n):
    """The 24 cells in grid order: (checkpoint, step size, nbeta)."""
    spec = PROBLEMS[problem]
    cells = []
    for c in range(4):
        for eps in spec["step_sizes"]:
            for nbeta in (n / np.log(n), spec["nbeta"]):
                cells.append((c, eps, float(nbeta)))
    return cells


def _jax_params(problem, z, c=None):
    import jax.numpy as jnp

    sel = (lambda a: a) if c is None else (lambda a: a[c])
    if problem == "dln":
        return [jnp.asarray(sel(z[f"w{l}"])) for l in range(3)]
    return [dict(w=jnp.asarray(sel(z[f"w{l}"])), b=jnp.asarray(sel(z[f"b{l}"]))) for l in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# modes (each in its own process)


def run_degenjax(problem, z, mode, args):
    import jax
    import jax.numpy as jnp

    import degenjax

    loss_fn = _dln_loss if problem == "dln" else _mlp_loss
    data = (jnp.asarray(z["x"]), jnp.asarray(z["y"]))
    n = int(z["x"].shape[0])
    cells = _grid(problem, n)
    ckpt = np.asarray([c for c, _, _ in cells])
    steps = np.asarray([e for _, e, _ in cells])
    nbetas = np.asarray([b for _, _, b in cells])
    keys = jax.random.split(jax.random.key(args.seed), len(cells))
    all_params = _jax_params(problem, z)
    kw = dict(num_chains=args.chains, num_draws=args.draws, batch_size=PROBLEMS[problem]["batch"], warn=False)

    def once():
        if mode == "batched":
            params = jax.tree.map(lambda a: a[ckpt], all_params)
            res = degenjax.estimate_llc_batched(keys, loss_fn, params, data, step_size=steps, nbeta=nbetas,
                                                cells_per_group=args.cells_per_group, **kw)
            return np.asarray(res.llc_mean), np.asarray(res.loss_trace)
        means, traces = [], []
        for i, (c, eps, nbeta) in enumerate(cells):
            res = degenjax.estimate_llc(keys[i], loss_fn, jax.tree.map(lambda a: a[c], all_params), data,
                                        step_size=eps, nbeta=nbeta, **kw)
            means.append(np.asarray(res.llc_mean))
            traces.append(np.asarray(res.loss_trace))
        return np.stack(means), np.stack(traces)

    t0, c0 = time.perf_counter(), time.process_time()
    means, traces = once()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    once()
    second = time.perf_counter() - t0
    return {"first": first, "first_cpu": first_cpu, "second": second, "llc": means.tolist(),
            "trace_sha": _sha(traces)}


def _sha(a):
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def run_devinterp(problem, z, args):
    import torch
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    torch.set_num_threads(args.torch_threads)
    n = int(z["x"].shape[0])
    batch = PROBLEMS[problem]["batch"]
    cells = _grid(problem, n)[: args.devinterp_cells]
    x = torch.from_numpy(np.asarray(z["x"], np.float32))
    if problem == "dln":
        y = torch.from_numpy(np.asarray(z["y"], np.float32))

        def evaluate(model, data):
            xb, yb = data
            out = model(xb)
            return ((out - yb) ** 2).sum(-1).mean(), {"output": out}
    else:
        y = torch.from_numpy(np.asarray(z["y"], np.int64))

        def evaluate(model, data):
            xb, yb = data
            out = model(xb)
            return torch.nn.functional.cross_entropy(out, yb), {"output": out}

    def model_for(c):
        if problem == "dln":
            layers = [torch.nn.Linear(w.shape[1], w.shape[2], bias=False) for w in (z["w0"], z["w1"], z["w2"])]
            model = torch.nn.Sequential(*layers)
            with torch.no_grad():
                for l, layer in enumerate(layers):
                    layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(z[f"w{l}"][c].T)))
            return model
        layers = [torch.nn.Linear(z[f"w{l}"].shape[1], z[f"w{l}"].shape[2]) for l in range(3)]
        model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        with torch.no_grad():
            for l, layer in enumerate(layers):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(z[f"w{l}"][c].T)))
                layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(z[f"b{l}"][c])))
        return model

    ds = TensorDataset(x, y)
    means = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (c, eps, nbeta) in enumerate(cells):
        model = model_for(c)
        with torch.no_grad():
            init_loss = float(evaluate(model, (x, y))[0])
        gen = torch.Generator().manual_seed(args.seed + i)
        loader = DataLoader(ds, sampler=BatchSampler(RandomSampler(ds, generator=gen), batch_size=batch,
                                                     drop_last=False), batch_size=None)
        object.__setattr__(loader, "batch_size", batch)  # devinterp reads it (see benchmarks/llc.py)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = estimate_learning_coeff_with_summary(
                model, loader, evaluate=evaluate, sampling_method=SGLD,
                optimizer_kwargs=dict(lr=eps, localization=1.0, nbeta=nbeta), num_chains=args.chains,
                num_draws=args.draws, num_burnin_steps=0, init_loss=init_loss, seed=args.seed + i, verbose=False,
                cores=1, device="cpu")
        means.append(float(res["llc/mean"]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"first": wall, "first_cpu": cpu, "cells": len(cells), "llc": means}


def child(args):
    z = dict(np.load(args.data))
    if args.mode == "devinterp":
        out = run_devinterp(args.problem, z, args)
    else:
        out = run_degenjax(args.problem, z, args.mode, args)
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(args, problem, mode, data):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--problem", problem, "--mode", mode, "--data", data,
           "--chains", str(args.chains), "--draws", str(args.draws), "--seed", str(args.seed),
           "--devinterp-cells", str(args.devinterp_cells), "--torch-threads", str(args.torch_threads)]
    if args.cells_per_group is not None:
        cmd += ["--cells-per-group", str(args.cells_per_group)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{problem}/{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="dln,digits")
    p.add_argument("--modes", default="batched,cells,devinterp")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devinterp-cells", type=int, default=24,
                   help="run devinterp on the first K cells only and extrapolate its wall time to 24 cells")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--cells-per-group", type=int, default=None, help="batched mode: cells per program")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--problem", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    load_before = os.getloadavg()
    rows = []
    tmp = tempfile.mkdtemp(prefix="sweep_bench_")
    modes = args.modes.split(",")
    for problem in args.problems.split(","):
        z = _dln_checkpoints(args.seed) if problem == "dln" else _digits_checkpoints(args.seed)
        path = os.path.join(tmp, f"{problem}.npz")
        np.savez(path, **z)
        res = {}
        for mode in modes:
            res[mode] = _spawn(args, problem, mode, path)
            print(f"[{problem}] {mode}: {json.dumps({k: v for k, v in res[mode].items() if k != 'llc'})}",
                  flush=True)
        n = int(z["x"].shape[0])
        label = {"dln": f"DLN 10-20-20-10 (n={n}, batch 100)",
                 "digits": f"digits MLP 64-32-32-10 (n={n}, batch 100)"}[problem]
        cells = len(_grid(problem, n))
        if "batched" in res:
            b = res["batched"]
            rows.append((f"{label}: degenjax batched (1 call, 24 cells): wall incl. compile (CPU time) / compiled",
                         f"{b['first']:.2f} s ({b['first_cpu']:.2f} s) / {b['second']:.2f} s"))
        if "cells" in res:
            c = res["cells"]
            rows.append((f"{label}: degenjax cell by cell (24 estimate_llc calls): wall incl. compile (CPU time) / "
                         "compiled", f"{c['first']:.2f} s ({c['first_cpu']:.2f} s) / {c['second']:.2f} s"))
        if "batched" in res and "cells" in res:
            same = res["batched"]["trace_sha"] == res["cells"]["trace_sha"]
            diff = float(np.max(np.abs(np.asarray(res["batched"]["llc"]) - np.asarray(res["cells"]["llc"]))))
            rows.append((f"{label}: batched vs cell by cell: loss traces bitwise equal; max lambda^ difference",
                         f"{same}; {diff:.3g}"))
            rows.append((f"{label}: **speed-up cell by cell / batched, incl. compile: wall (CPU time)**",
                         f"**{res['cells']['first'] / res['batched']['first']:.1f}x** "
                         f"({res['cells']['first_cpu'] / res['batched']['first_cpu']:.1f}x)"))
        if "devinterp" in res:
            d = res["devinterp"]
            total, total_cpu = d["first"] / d["cells"] * cells, d["first_cpu"] / d["cells"] * cells
            note = "" if d["cells"] == cells else f" (ran {d['cells']} of {cells} cells, extrapolated per cell)"
            rows.append((f"{label}: devinterp 1.3.2, fast loader, 24 cells{note}: wall (CPU time)",
                         f"{total:.1f} s ({total_cpu:.1f} s)"))
            if "batched" in res:
                b = np.asarray(res["batched"]["llc"])[: d["cells"]]
                rows.append((f"{label}: lambda^ of devinterp's cells vs degenjax batched (same cells)",
                             ", ".join(f"{a:.2f}/{c:.2f}" for a, c in zip(d["llc"], b))))
                rows.append((f"{label}: **speed-up devinterp / degenjax batched, incl. compile: wall (CPU time)**",
                             f"**{total / res['batched']['first']:.0f}x** "
                             f"({total_cpu / res['batched']['first_cpu']:.0f}x)"))
    load_after = os.getloadavg()
    if args.no_results:
        for k, v in rows:
            print(f"| {k} | {v} |")
        return
    import jax

    command = "python benchmarks/sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = [f"\n## Sweep: batched cells vs cell by cell vs devinterp "
               f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)\n",
               f"- machine: `{platform.platform()}`, {os.cpu_count()} CPUs, shared with other jobs: load average "
               f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; jax {jax.__version__}, "
               f"devices: {', '.join(d.platform for d in jax.devices())}",
               f"- command: `{command.strip()}`",
               f"- grid: 4 checkpoints x 3 step sizes x 2 nbeta (n/log n, 100), localization 1, {args.chains} chains x "
               f"{args.draws} draws per cell, float32; each mode in a fresh process, timed from its first call "
               "(compilation included, imports and data set-up excluded); CPU time = the process's user + system time (both cores), "
               "less sensitive than wall time to the other jobs on this machine",
               "", "| measurement | value |", "| --- | --- |"]
    section += [f"| {k} | {v} |" for k, v in rows]
    text = "\n".join(section) + "\n"
    print(text)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

    append_section(text, benchmark="sweep")


if __name__ == "__main__":
    main()
