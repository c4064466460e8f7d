"""LLC benchmark: degenjax.estimate_llc against devinterp, SGLD-step throughput, and memory.

Three parts (``--parts``):

* ``dln``: the same deep linear network (widths 10-20-20-10, true rank 5), data, and hyperparameters (batch, eps,
  gamma, nbeta = n / log n, chains x draws) for devinterp's ``estimate_learning_coeff_with_summary`` (PyTorch,
  chains one after another) and ``degenjax.estimate_llc`` (chains vmapped in one ``lax.scan``). Wall time includes
  compilation; lambda^ is compared with the exact value ``degenjax.theory.dln_learning_coefficient``. devinterp is
  given the full-data ``L_n(w*)`` as ``init_loss`` (its default averages a few minibatches, which at nbeta ~ 1e4
  shifts lambda^ by the minibatch noise); everything else is devinterp's default path. devinterp runs with each data
  loader of ``--devinterp-loader``: ``default`` (a ``DataLoader`` with per-item indexing and collation, devinterp's
  documented usage; ~30 ms per batch of 500 here) and ``fast`` (a ``BatchSampler`` over a ``TensorDataset``: one
  batched tensor index per batch, no collation), and both speed-up ratios are printed. ``--time-to-5`` adds the
  wall time to an estimate within 5% of the exact value: degenjax's recipe (``step_size="auto"``, a fresh process,
  compile included) against devinterp at these usual settings.
* ``dln-step``: where one compiled step of that DLN estimator goes: the whole step against its loss + gradient, its
  minibatch shuffle and its Gaussian noise, each alone in a scan of the same length.
* ``mlp``: an MLP 784-1024-1024-10 (cross-entropy), batch 512: achieved GFLOP/s of one SGLD step (inside
  ``estimate_llc``, compiled, MALA off) against the measured float32 matmul peak of the same device.
* ``memory``: a 10M-parameter MLP; peak memory of ``estimate_llc`` (XLA's compiled memory analysis and the peak RSS
  growth of a fresh process) in units of parameter copies per chain.

Run: ``.venv/bin/python benchmarks/llc.py`` (full size), or smaller, e.g. ``--draws 2000 --n 20000``. Needs the
``bench`` extra (torch, devinterp) for the ``dln`` part only; degenjax itself never imports torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import warnings

import numpy as np



def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------------------------
# Part 1: deep linear network, devinterp vs degenjax


def _dln_problem(widths, rank, n, noise, seed):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    # make the end-to-end product rank `rank` by truncating the middle factor's singular values
    mid = len(ws) // 2
    u, s, vt = np.linalg.svd(ws[mid], full_matrices=False)
    s[rank:] = 0.0
    ws[mid] = (u * s) @ vt
    prod = ws[0]
    for w in ws[1:]:
        prod = w @ prod
    assert np.linalg.matrix_rank(prod) == rank
    x = rng.standard_normal((n, widths[0]))
    y = x @ prod.T + noise * rng.standard_normal((n, widths[-1]))
    return [w.astype(np.float32) for w in ws], x.astype(np.float32), y.astype(np.float32)


def _fast_loader(x, y, batch, seed):
    """devinterp's fastest reasonable data loading: a DataLoader whose sampler yields whole index batches and whose
    dataset is indexed by them in one tensor operation (``batch_size=None``: no per-item collation)."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    gen = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(ds, generator=gen), batch_size=batch, drop_last=False)
    loader = DataLoader(ds, sampler=sampler, batch_size=None)
    # devinterp reads loader.batch_size for its default nbeta even when nbeta is given; the attribute is only read
    # (iteration uses the batch sampler above), so set it past DataLoader's guard
    object.__setattr__(loader, "batch_size", batch)
    return loader


def run_devinterp(ws, x, y, args, nbeta, init_loss, loader_kind="default"):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from devinterp.utils import evaluate_mse

    # One intra-op thread: the fastest setting for these tiny matmuls here (two threads on the shared 2-core machine
    # made devinterp ~30x slower through oversubscription), so this favours devinterp.
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in ws]).to(args.device)
    with torch.no_grad():
        for layer, w in zip(model, ws):
            layer.weight.copy_(torch.from_numpy(w).to(args.device))
    if loader_kind == "fast":
        loader = _fast_loader(x, y, args.batch, args.seed)
    else:  # devinterp's documented usage: a default DataLoader (per-item indexing, then collation)
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=args.batch,
                            shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate_learning_coeff_with_summary(
            model, loader, evaluate=evaluate_mse, sampling_method=SGLD,
            optimizer_kwargs=dict(lr=args.step_size, localization=args.gamma, nbeta=nbeta),
            num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin, init_loss=init_loss,
            seed=args.seed, verbose=False, cores=1, device=args.device)
    wall = time.perf_counter() - t0
    per_chain = np.array([res[f"llc-chain/{i}"] for i in range(args.chains)])
    return wall, float(res["llc/mean"]), float(np.std(per_chain, ddof=1)) if args.chains > 1 else float("nan")


def run_degenjax(ws, x, y, args, nbeta):
    """One mode (``args.dln_mode``, ``eager`` or ``jit``) of degenjax on the DLN; called first in a fresh process, so
    the first call pays everything a user's first call pays (tracing, XLA compile and autotuning, kernel loading)."""
    import jax
    import jax.numpy as jnp

    import degenjax

    params = [jnp.asarray(w) for w in ws]
    data = (jnp.asarray(x), jnp.asarray(y))
    jax.block_until_ready((params, data))

    def loss_fn(params, batch):
        xb, yb = batch
        h = xb
        for w in params:
            h = h @ w.T
        return jnp.mean(jnp.square(h - yb))  # = torch.nn.functional.mse_loss (mean over batch and outputs)

    if args.dln_mode == "eager":
        def once(seed):
            t0 = time.perf_counter()
            res = degenjax.estimate_llc(jax.random.key(seed), loss_fn, params, data, num_chains=args.chains,
                                        num_draws=args.draws, num_burnin=args.burnin, step_size=args.step_size,
                                        batch_size=args.batch, nbeta=nbeta, localization=args.gamma, warn=False)
            res.llc_mean.block_until_ready()
            return time.perf_counter() - t0, res

        cold, res = once(args.seed)
        warm, _ = once(args.seed + 1)
        return dict(cold=cold, warm=warm, llc=float(res.llc_mean), std=float(res.llc_std),
                    acc=float(res.mala_acceptance), init_loss=float(res.init_loss))

    # The estimator inside the caller's jax.jit (how it composes in a jitted pipeline): one compiled program.
    def estimate(key, params, data):
        res = degenjax.estimate_llc(key, loss_fn, params, data, num_chains=args.chains, num_draws=args.draws,
                                    num_burnin=args.burnin, step_size=args.step_size, batch_size=args.batch,
                                    nbeta=nbeta, localization=args.gamma)
        return res.llc_mean, res.llc_std

    # the first call in stages (what a first jitted call does), to show where its time goes
    stamps = [time.perf_counter()]
    traced = jax.jit(estimate, compiler_options=args.compiler_options).trace(jax.random.key(args.seed), params, data)
    stamps.append(time.perf_counter())
    lowered = traced.lower()
    stamps.append(time.perf_counter())
    compiled = lowered.compile()
    stamps.append(time.perf_counter())
    llc, std = jax.block_until_ready(compiled(jax.random.key(args.seed), params, data))
    stamps.append(time.perf_counter())
    stages = np.diff(stamps)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(jax.random.key(args.seed + 1), params, data))
    jit_warm = time.perf_counter() - t0
    return dict(jit_cold=float(stages.sum()), jit_warm=jit_warm, stages=[float(v) for v in stages],
                llc=float(llc), std=float(std))


def _dln_flags(args):
    """The DLN problem and sampler flags, to run a part of it in a child process."""
    return ["--widths", args.widths, "--rank", str(args.rank), "--n", str(args.n), "--noise", str(args.noise),
            "--batch", str(args.batch), "--step-size", repr(args.step_size), "--gamma", repr(args.gamma),
            "--chains", str(args.chains), "--draws", str(args.draws), "--burnin", str(args.burnin),
            "--seed", str(args.seed)]


def _degenjax_child(args, mode):
    """Run one degenjax mode of the DLN part in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--parts", "dln-child", "--dln-mode", mode, *_dln_flags(args),
           "--compiler-options", json.dumps(args.compiler_options or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"degenjax {mode} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_dln_child(args):
    widths = [int(v) for v in args.widths.split(",")]
    ws, x, y = _dln_problem(widths, args.rank, args.n, args.noise, args.seed)
    print(json.dumps(run_degenjax(ws, x, y, args, args.n / np.log(args.n))), flush=True)


def part_dln(args, rows):
    from degenjax.theory import dln_learning_coefficient

    widths = [int(v) for v in args.widths.split(",")]
    exact = float(dln_learning_coefficient(widths, args.rank))
    ws, x, y = _dln_problem(widths, args.rank, args.n, args.noise, args.seed)
    nbeta = args.n / np.log(args.n)
    name = "DLN " + "-".join(map(str, widths)) + f" r={args.rank}"
    h = x.astype(np.float64)  # L_n(w*) on the full data, in float64, given to devinterp as its init_loss
    for w in ws:
        h = h @ w.T.astype(np.float64)
    init_loss = float(np.mean(np.square(h - y)))
    if args.skip_degenjax:  # devinterp alone (e.g. on another torch device, in a second process beside a full run)
        wall_d, llc_d, std_d = run_devinterp(ws, x, y, args, nbeta, init_loss)
        if args.json:
            print(json.dumps(dict(wall=wall_d, llc=llc_d, std=std_d)), flush=True)
            return
        print(f"[dln] devinterp on {args.device}: {wall_d:.2f} s; lambda^ = {llc_d:.2f} +- {std_d:.2f} "
              f"(exact {exact:g})", flush=True)
        rows.append((f"{name}: devinterp 1.3.2 on torch device {args.device}, wall", f"{wall_d:.2f} s"))
        rows.append(("  devinterp lambda^ (mean +- std over chains) vs exact", f"{llc_d:.2f} +- {std_d:.2f} vs {exact:g}"))
        return
    beside = None
    if args.devinterp_beside and not args.skip_devinterp:
        # devinterp on the host CPU in its own process (JAX kept off the accelerator), while degenjax runs on it
        cmd = [sys.executable, os.path.abspath(__file__), *_dln_flags(args), "--parts", "dln", "--skip-degenjax",
               "--json", "--device", args.device, "--torch-threads", str(args.torch_threads)]
        beside = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, JAX_PLATFORMS="cpu"))
    opts = f" (jax.jit compiler_options {json.dumps(args.compiler_options)})" if args.compiler_options else ""
    runs = {"eager": [], "jit": []}
    for mode in args.dln_mode.split(","):
        j = _degenjax_child(args, mode)
        runs[mode].append(j)
        if mode == "eager":
            print(f"[dln] degenjax eager, fresh process: {j['cold']:.2f} s (first call, with compile), "
                  f"{j['warm']:.2f} s (second call); lambda^ = {j['llc']:.2f} +- {j['std']:.2f} (exact {exact:g}), "
                  f"MALA acceptance {j['acc']:.3f}", flush=True)
            rows.append((f"{name}: degenjax estimate_llc eager, fresh process: first call (incl. compile) / second",
                         f"{j['cold']:.2f} s / {j['warm']:.2f} s"))
        else:
            print(f"[dln] degenjax under jax.jit{opts}, fresh process: {j['jit_cold']:.2f} s (first call, with "
                  f"compile), {j['jit_warm']:.2f} s (compiled); lambda^ = {j['llc']:.2f} +- {j['std']:.2f} (exact "
                  f"{exact:g}); first call: trace / lower / compile / run = "
                  + " / ".join(f"{v:.2f}" for v in j["stages"]) + " s", flush=True)
            rows.append((f"{name}: degenjax estimate_llc under jax.jit{opts}, fresh process: first call "
                         "(incl. compile) / compiled", f"{j['jit_cold']:.2f} s / {j['jit_warm']:.2f} s"))
            rows.append(("  first call under jax.jit: trace / lower / XLA compile / first run",
                         " / ".join(f"{v:.2f}" for v in j["stages"]) + " s"))
        rows.append(("  degenjax lambda^ (mean +- std over chains) vs exact",
                     f"{j['llc']:.2f} +- {j['std']:.2f} vs {exact:g}"))
    if args.skip_devinterp:
        return
    med = {k: float(np.median([r[k] for r in runs[mode]])) if runs[mode] else float("nan")
           for mode, keys in (("eager", ("cold", "warm")), ("jit", ("jit_cold", "jit_warm"))) for k in keys}
    counts = f"medians of {len(runs['eager'])} eager / {len(runs['jit'])} jit fresh processes"
    for kind in args.devinterp_loader.split(","):
        if beside is not None and kind == "default":
            out, err = beside.communicate()
            if beside.returncode != 0:
                raise RuntimeError(f"devinterp child failed:\n{err[-4000:]}")
            d = json.loads(out.strip().splitlines()[-1])
            wall_d, llc_d, std_d = d["wall"], d["llc"], d["std"]
            where = f"on {args.device}, in a process beside degenjax's"
        else:
            wall_d, llc_d, std_d = run_devinterp(ws, x, y, args, nbeta, init_loss, loader_kind=kind)
            where = f"on {args.device}"
        label = {"default": "default DataLoader (per-item collation)",
                 "fast": "fast loader (batched tensor indexing, no collation)"}[kind]
        print(f"[dln] devinterp {where}, {label}: {wall_d:.2f} s; lambda^ = {llc_d:.2f} +- {std_d:.2f} "
              f"(exact {exact:g})", flush=True)
        ratios = {k: wall_d / v for k, v in med.items()}
        print(f"[dln] speed-up devinterp ({kind} loader) wall / degenjax wall (" + counts + "): eager first call "
              "{cold:.1f}x, eager second {warm:.1f}x, jit incl. compile {jit_cold:.1f}x, jit compiled "
              "{jit_warm:.1f}x".format(**ratios), flush=True)
        rows.append((f"  devinterp 1.3.2 estimate_learning_coeff_with_summary {where}, {label}, wall",
                     f"{wall_d:.2f} s"))
        rows.append(("  devinterp lambda^ (mean +- std over chains) vs exact",
                     f"{llc_d:.2f} +- {std_d:.2f} vs {exact:g}"))
        rows.append((f"  **speed-up devinterp ({kind} loader) / degenjax, incl. compile: eager / under jit** "
                     f"({counts})", f"**{ratios['cold']:.1f}x / {ratios['jit_cold']:.1f}x**"))
        rows.append((f"  speed-up devinterp ({kind} loader) / degenjax, compiled: eager second call / under jit",
                     f"{ratios['warm']:.1f}x / {ratios['jit_warm']:.1f}x"))
        if kind == args.devinterp_loader.split(",")[0]:
            first_devinterp = (wall_d, llc_d)
    if args.time_to_5:
        _time_to_5(args, rows, name, exact, first_devinterp)


def _time_to_5(args, rows, name, exact, devinterp):
    """Wall time to an estimate within 5% of the exact value: degenjax's recipe (fresh process, compile included)
    against devinterp at its usual settings (the run above)."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llc_accuracy.py"),
           "--child", "dln-devinterp", "--chains", str(args.chains), "--seed", str(args.seed)] + (
        [] if args.recipe_max_steps is None else ["--max-steps", str(args.recipe_max_steps)])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recipe child failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    within = abs(r["rel_error"]) <= 0.05
    wall_d, llc_d = devinterp
    d_within = abs(llc_d / exact - 1.0) <= 0.05
    print(f"[dln] time to an estimate within 5% of {exact:g}: degenjax recipe {r['recipe_s']:.1f} s -> "
          f"{r['llc_mean']:.2f} +- {r['llc_uncertainty']:.2f} ({100 * r['rel_error']:+.1f}%, trustworthy "
          f"{r['trustworthy']}); devinterp usual settings {wall_d:.1f} s -> {llc_d:.2f} "
          f"({100 * (llc_d / exact - 1):+.1f}%)", flush=True)
    rows.append((f"{name}: wall time to an estimate within 5% of exact, degenjax recipe (step_size='auto', fresh "
                 "process, incl. compile)", f"{r['recipe_s']:.1f} s -> {r['llc_mean']:.2f} +- "
                 f"{r['llc_uncertainty']:.2f} ({100 * r['rel_error']:+.1f}%{'' if within else ': NOT within 5%'}; "
                 f"trustworthy: {r['trustworthy']})"))
    rows.append(("  devinterp at its usual settings (the run above)",
                 f"{wall_d:.1f} s -> {llc_d:.2f} ({100 * (llc_d / exact - 1):+.1f}%"
                 f"{'' if d_within else ': never within 5% at these settings'})"))


def part_dln_step(args, rows):
    """Where one compiled step of the DLN estimator goes: the whole step against its pieces, each alone in a scan
    of the same length (loss + gradient of every chain, the minibatch shuffle, the Gaussian noise)."""
    import jax
    import jax.numpy as jnp

    import degenjax
    from degenjax._src.llc import batch_indices

    widths = [int(v) for v in args.widths.split(",")]
    ws, x, y = _dln_problem(widths, args.rank, args.n, args.noise, args.seed)
    params = [jnp.asarray(w) for w in ws]
    data = (jnp.asarray(x), jnp.asarray(y))
    n, batch, chains, steps = args.n, args.batch, args.chains, args.draws
    dim = sum(w.size for w in ws)

    def loss_fn(params, b):
        h = b[0]
        for w in params:
            h = h @ w.T
        return jnp.mean(jnp.square(h - b[1]))

    def estimator(mala_every):
        def run(key, params, data):
            return degenjax.estimate_llc(key, loss_fn, params, data, num_chains=chains, num_draws=steps,
                                         step_size=args.step_size, batch_size=batch, nbeta=n / np.log(n),
                                         mala_every=mala_every).llc_mean
        return run

    def grad_only(key, params, data):
        stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (chains, *p.shape)), params)

        def body(ps, t):
            idx = (jnp.arange(chains)[:, None] * batch + t * batch + jnp.arange(batch)[None]) % n
            loss, g = jax.vmap(jax.value_and_grad(loss_fn))(ps, (data[0][idx], data[1][idx]))
            return jax.tree.map(lambda p, gg: p - 1e-9 * gg, ps, g), loss

        return jax.lax.scan(body, stacked, jnp.arange(steps))[1].mean()

    def shuffle_only(key, params, data):
        keys = jax.random.split(key, chains)

        def body(c, t):
            return c + jax.vmap(batch_indices, (0, None, None, None))(keys, t, n, batch).sum(), None

        return jax.lax.scan(body, 0, jnp.arange(steps))[0]

    def noise_only(key, params, data):
        keys = jax.random.split(key, chains)

        def body(c, t):
            k = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
            return c + jax.vmap(lambda kk: jax.random.normal(kk, (dim,)))(k).sum(), None

        return jax.lax.scan(body, 0.0, jnp.arange(steps))[0]

    pieces = [("whole SGLD step (estimate_llc under jit, MALA every 10th step)", estimator(10)),
              ("whole SGLD step, MALA off (mala_every=0)", estimator(0)),
              ("loss + gradient of every chain, with a plain gradient step", grad_only),
              ("minibatch indices (swap-or-not shuffle) of every chain", shuffle_only),
              ("Gaussian noise of every chain (fold_in + normal)", noise_only)]
    rows.append((f"DLN {args.widths}, {chains} chains, batch {batch}: one compiled step (best of {args.repeats} "
                 f"runs of {steps} steps)", ""))
    for label, fn in pieces:
        compiled = jax.jit(fn).lower(jax.random.key(0), params, data).compile()
        jax.block_until_ready(compiled(jax.random.key(0), params, data))
        best = float("inf")
        for r in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(jax.random.key(r + 1), params, data))
            best = min(best, time.perf_counter() - t0)
        print(f"[dln-step] {label}: {best / steps * 1e6:.1f} us per step", flush=True)
        rows.append((f"  {label}", f"{best / steps * 1e6:.1f} us per step"))


# ---------------------------------------------------------------------------------------------------------------
# Part 2: MLP SGLD-step throughput vs matmul peak


def _mlp_init(widths, seed):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), len(widths) - 1)
    return [dict(w=jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), b=jnp.zeros((b,), jnp.float32))
            for k, a, b in zip(keys, widths[:-1], widths[1:])]


def _mlp_loss(params, batch):
    import jax
    import jax.numpy as jnp

    x, labels = batch
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"][None, :]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _matmul_peak(size, repeats):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)  # the peak with XLA's defaults
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e9


def part_mlp(args, rows):
    import jax
    import jax.numpy as jnp

    import degenjax

    widths = [784, 1024, 1024, 10]
    batch = args.mlp_batch
    params = _mlp_init(widths, 0)
    n = batch * 8
    x = jax.random.normal(jax.random.key(2), (n, widths[0]), jnp.float32)
    labels = jax.random.randint(jax.random.key(3), (n,), 0, widths[-1])
    steps = args.mlp_steps
    # matmul FLOPs of one SGLD step of one chain: forward 2 B sum(in*out); backward: weight grads 2 B sum(in*out)
    # and input grads 2 B sum over the layers after the first.
    mats = [a * b for a, b in zip(widths[:-1], widths[1:])]
    flops = 2 * batch * (2 * sum(mats) + sum(mats[1:]))
    rows.append((f"MLP 784-1024-1024-10, batch {batch}: matmul GFLOP per SGLD step per chain (fwd + bwd, analytic)",
                 f"{flops / 1e9:.2f}"))

    def best_time(compiled, make_key):
        jax.block_until_ready(compiled(make_key(0), params, (x, labels)))
        best = float("inf")
        for r in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(make_key(r + 1), params, (x, labels)))
            best = min(best, time.perf_counter() - t0)
        return best / steps

    def compile_for(fn, key):
        return jax.jit(fn, compiler_options=args.compiler_options).lower(key, params, (x, labels)).compile()

    def row(label, per_step, chains, peak, bold=True):
        achieved = chains * flops / per_step / 1e9
        pct = f"{100 * achieved / peak:.0f}%"
        print(f"[mlp] {label}: {per_step * 1e3:.3f} ms per step; {achieved:.1f} GFLOP/s = {pct} of matmul peak",
              flush=True)
        rows.append((f"  {label}: time per step (all chains); achieved GFLOP/s / peak",
                     f"{per_step * 1e3:.3f} ms; {achieved:.1f} / {peak:.1f} = " + (f"**{pct}**" if bold else pct)))

    chain_counts = [int(c) for c in args.mlp_chains.split(",")]
    for precision in args.mlp_precision.split(","):
        # the peak and the steps are traced under the same jax.default_matmul_precision (on GPUs "default" lets
        # float32 matmuls use TF32 tensor cores, "highest" keeps them in float32)
        with jax.default_matmul_precision(None if precision == "default" else precision):
            peak = _matmul_peak(args.matmul_size, args.repeats)
            print(f"[mlp] measured f32 matmul peak ({args.matmul_size}^3, precision {precision}): {peak:.1f} GFLOP/s",
                  flush=True)
            rows.append((f"measured f32 matmul peak ({args.matmul_size}^3, matmul precision `{precision}`)",
                         f"{peak:.1f} GFLOP/s"))
            for impl in args.mlp_prng.split(","):
                def make_key(seed, impl=impl):
                    return jax.random.key(seed, impl=impl)

                key_label = "" if impl == "threefry2x32" else f", `jax.random.key(seed, impl=\"{impl}\")`"
                for chains in chain_counts:
                    def run(key, params, data, chains=chains):
                        return degenjax.estimate_llc(key, _mlp_loss, params, data, num_chains=chains,
                                                     num_draws=steps, step_size=1e-6, batch_size=batch, nbeta=100.0,
                                                     mala_every=0).llc_mean

                    compiled = compile_for(run, make_key(0))
                    row(f"SGLD, {chains} chain(s){key_label}", best_time(compiled, make_key), chains, peak)
            if not args.mlp_grad_only:
                continue
            # Reference: the same scan doing only what the matmul count covers (minibatch gather, loss and gradient
            # per chain, a plain gradient step; no noise, no localization): the ceiling of an SGLD step here.
            for chains in chain_counts:
                def grad_only(key, params, data, chains=chains):
                    stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (chains, *p.shape)), params)
                    xs, ys = data

                    def body(ps, t):
                        idx = (jnp.arange(chains)[:, None] * batch + t * 7 + jnp.arange(batch)[None]) % n
                        l, g = jax.vmap(jax.value_and_grad(_mlp_loss))(ps, (xs[idx], ys[idx]))
                        return jax.tree.map(lambda p, gg: p - 1e-6 * gg, ps, g), l

                    return jax.lax.scan(body, stacked, jnp.arange(steps))[1].mean()

                compiled = compile_for(grad_only, jax.random.key(0))
                row(f"reference, loss + gradient + plain gradient step only (no noise), {chains} chain(s)",
                    best_time(compiled, jax.random.key), chains, peak, bold=False)

                # Reference: the step's matrix products alone (a linear network with the same shapes and a linear
                # loss, fixed inputs: no gather, ReLU or softmax), the ceiling set by the GEMMs at these shapes.
                def matmuls_only(key, params, data, chains=chains):
                    stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (chains, *p.shape)), params)
                    xs = jnp.broadcast_to(data[0][:batch], (chains, batch, widths[0]))
                    r = jnp.broadcast_to(data[0][:batch, :widths[-1]], (chains, batch, widths[-1]))

                    def linear_loss(ps, xb, rb):
                        h = xb
                        for layer in ps:
                            h = h @ layer["w"]
                        return jnp.sum(h * rb)

                    def body(ps, t):
                        l, g = jax.vmap(jax.value_and_grad(linear_loss))(ps, xs, r)
                        return jax.tree.map(lambda p, gg: p - 1e-9 * gg, ps, g), l

                    return jax.lax.scan(body, stacked, jnp.arange(steps))[1].mean()

                compiled = compile_for(matmuls_only, jax.random.key(0))
                row(f"reference, the step's matrix products alone (linear net, no gather), {chains} chain(s)",
                    best_time(compiled, jax.random.key), chains, peak, bold=False)


# ---------------------------------------------------------------------------------------------------------------
# Part 3: memory of a 10M-parameter model


def part_memory_child(args):
    import jax
    import jax.numpy as jnp

    import degenjax

    widths = [784, 2048, 2048, 2048, 10]
    params = _mlp_init(widths, 0)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    param_bytes = 4 * num_params
    n = 2048
    x = jax.random.normal(jax.random.key(2), (n, widths[0]), jnp.float32)
    labels = jax.random.randint(jax.random.key(3), (n,), 0, widths[-1])
    jax.block_until_ready((params, x, labels))
    chains = args.mem_chains
    rss0 = _rss_mib()

    def run(key, params, data):
        return degenjax.estimate_llc(key, _mlp_loss, params, data, num_chains=chains, num_draws=args.mem_steps,
                                     step_size=1e-6, batch_size=128, nbeta=100.0)

    compiled = jax.jit(run).lower(jax.random.key(0), params, (x, labels)).compile()
    mem = compiled.memory_analysis()
    out = compiled(jax.random.key(0), params, (x, labels))
    out.llc_mean.block_until_ready()
    rss1 = _rss_mib()
    stats = jax.devices()[0].memory_stats() or {}
    peak_dev = stats.get("peak_bytes_in_use", float("nan"))
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    outb = getattr(mem, "output_size_in_bytes", float("nan")) if mem is not None else float("nan")
    print(json.dumps(dict(num_params=num_params, param_bytes=param_bytes, chains=chains, temp_bytes=temp,
                          output_bytes=outb, rss_growth_mib=rss1 - rss0, device_peak_bytes=peak_dev,
                          llc=float(out.llc_mean))), flush=True)


def part_memory(args, rows):
    cmd = [sys.executable, os.path.abspath(__file__), "--parts", "memory-child", "--mem-chains", str(args.mem_chains),
           "--mem-steps", str(args.mem_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    m = json.loads(out)
    pb = m["param_bytes"]
    per_chain_temp = m["temp_bytes"] / pb / m["chains"]
    per_chain_rss = m["rss_growth_mib"] * 2 ** 20 / pb / m["chains"]
    print(f"[memory] {m['num_params'] / 1e6:.2f}M params ({pb / 2 ** 20:.1f} MiB f32), {m['chains']} chains: XLA temp "
          f"{m['temp_bytes'] / 2 ** 20:.1f} MiB = {per_chain_temp:.2f} param copies per chain; peak RSS growth "
          f"{m['rss_growth_mib']:.1f} MiB = {per_chain_rss:.2f} copies per chain", flush=True)
    rows.append((f"{m['num_params'] / 1e6:.2f}M-param MLP, {m['chains']} chains: XLA temp memory",
                 f"{m['temp_bytes'] / 2 ** 20:.1f} MiB = {per_chain_temp:.2f} param copies/chain"))
    rows.append(("  peak RSS growth during compile + run (fresh process)",
                 f"{m['rss_growth_mib']:.1f} MiB = {per_chain_rss:.2f} param copies/chain"))
    if np.isfinite(m["device_peak_bytes"]):
        peak = m["device_peak_bytes"]
        print(f"[memory] device peak bytes in use {peak / 2 ** 20:.1f} MiB = {peak / pb / m['chains']:.2f} param "
              "copies per chain (includes data and w*)", flush=True)
        rows.append(("  device peak bytes in use (includes data, w*)",
                     f"{peak / 2 ** 20:.1f} MiB = {peak / pb / m['chains']:.2f} param copies/chain"))


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="dln,mlp,memory",
                   help="comma-separated: dln, dln-step (where one step of the DLN estimator goes), mlp, memory")
    p.add_argument("--widths", default="10,20,20,10")
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--noise", type=float, default=1.0, help="std of the Gaussian label noise")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--step-size", type=float, default=1e-5)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=10_000)
    p.add_argument("--burnin", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-devinterp", action="store_true")
    p.add_argument("--dln-mode", default="eager,jit",
                   help="comma-separated degenjax modes for the dln part, each timed in a fresh process: eager, jit "
                        "(repeat one to time more processes: ratios use the median)")
    p.add_argument("--compiler-options", default="{}",
                   help='JSON dict passed as jax.jit(..., compiler_options=...) to the jitted degenjax programs, '
                        'e.g. \'{"xla_gpu_autotune_level": 0}\'')
    p.add_argument("--skip-degenjax", action="store_true", help="dln part: run devinterp only")
    p.add_argument("--json", action="store_true", help="with --skip-degenjax: print devinterp's result as JSON only")
    p.add_argument("--devinterp-beside", action="store_true",
                   help="dln part: run devinterp in a second process while degenjax runs (for an accelerator machine, "
                        "with devinterp on the host CPU)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--devinterp-loader", default="default,fast",
                   help="comma-separated devinterp data loaders for the dln part: default (DataLoader with per-item "
                        "collation, devinterp's documented usage) and/or fast (batched tensor indexing)")
    p.add_argument("--time-to-5", action="store_true",
                   help="dln part: also time degenjax's recipe to an estimate within 5%% of exact (a fresh process "
                        "running benchmarks/llc_accuracy.py's dln-devinterp case) against devinterp's usual settings")
    p.add_argument("--recipe-max-steps", type=int, default=None,
                   help="--time-to-5: the recipe's budget of SGLD steps per chain (default: the accuracy battery's)")
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--device", default="cpu", help="torch device for devinterp (cpu or cuda)")
    p.add_argument("--mlp-steps", type=int, default=50)
    p.add_argument("--mlp-chains", default="1,4", help="comma-separated chain counts for the throughput part")
    p.add_argument("--mlp-prng", default="threefry2x32",
                   help="comma-separated jax.random key implementations for the throughput part (e.g. unsafe_rbg)")
    p.add_argument("--mlp-precision", default="default",
                   help="comma-separated jax.default_matmul_precision values for the throughput part (default, highest)")
    p.add_argument("--mlp-grad-only", action="store_true",
                   help="also time a loss + gradient-only scan (the ceiling of an SGLD step)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-chains", type=int, default=4)
    p.add_argument("--mem-steps", type=int, default=20)
    p.add_argument("--no-results", action="store_true", help="do not record the run (benchmarks/results.jsonl -> RESULTS.md)")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    args.compiler_options = json.loads(args.compiler_options) or None
    if parts == ["memory-child"]:
        part_memory_child(args)
        return
    if parts == ["dln-child"]:
        part_dln_child(args)
        return

    import jax

    rows = []
    if "dln" in parts:
        part_dln(args, rows)
    if "dln-step" in parts:
        part_dln_step(args, rows)
    if "mlp" in parts:
        part_mlp(args, rows)
    if "memory" in parts:
        part_memory(args, rows)
    if args.no_results or not rows:
        return
    command = "python benchmarks/llc.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    devices = ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
    section = [f"\n## LLC: estimate_llc vs devinterp, SGLD throughput, memory ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)\n",
               f"- machine: `{platform.platform()}`, {os.cpu_count()} CPUs; jax {jax.__version__} devices: {devices}",
               f"- command: `{command.strip()}`",
               *([f"- jitted degenjax programs compiled with `compiler_options={json.dumps(args.compiler_options)}`"]
                 if args.compiler_options else []),
               *([] if not {"dln", "dln-step"} & set(parts) else [
                   f"- DLN settings: widths {args.widths}, rank {args.rank}, n={args.n}, batch {args.batch}, "
                   f"eps={args.step_size:g}, gamma={args.gamma:g}, nbeta=n/log n, {args.chains} chains x "
                   f"{args.draws} draws (burn-in {args.burnin}); devinterp runs chains sequentially (cores=1), "
                   "float32 both"]),
               "", "| measurement | value |", "| --- | --- |"]
    section += [f"| {k} | {v} |" for k, v in rows]
    text = "\n".join(section) + "\n"
    print(text)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

    append_section(text, benchmark="llc")


if __name__ == "__main__":
    main()
