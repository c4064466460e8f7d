"""LLC accuracy battery: the recipe's lambda^ (``estimate_llc(..., step_size="auto")``, no hand-tuning) against exact
learning coefficients.

Cases (``--cases``, comma-separated names; default ``cpu``: all but the networks of 800+ parameters,
``gpu``: those, ``all``):

* regular regressions (lambda = d/2), with label noise and ``w*`` the exact least-squares minimum;
* reduced-rank regressions (two-layer linear networks, Aoyagi & Watanabe 2005) and deep linear networks of several
  depths, widths and ranks, 300 to 120 000 parameters (Aoyagi 2024), noise-free and realizable, at the
  minimal-rank factorisation of the teacher (each factor of rank r, zero-padded), where the local learning
  coefficient is the global one, and ``gdln-*`` at a generic point of the same zero set (random factors, as in
  Lau et al. 2023, arXiv 2308.12108; depths 3 to 5, ranks 2 to 20, 300 to 120 000 parameters, hidden layers twice
  as wide as the ends, where the generic point's local value ``d_in d_out / 2`` equals Aoyagi's global one);
* ``dln-devinterp``: the devinterp benchmark's network (10-20-20-10, rank 5, random factors, label noise 1, n = 10^5,
  float32, ``w*`` the noisy teacher), where devinterp's usual settings give 57.4.

Every case runs the recipe with the library defaults (nbeta = n / log n, localization 1, 4 chains) and the case's
batch size; ``one estimate`` is the wall time of the finest rung alone (one run at the chosen step for the same
diffusion time: what a user who already knew the step would pay), and the table gives the recipe's total against it.

What the error is judged against. The issue's criterion is |lambda^ / lambda - 1| <= 5% with lambda the exact
learning coefficient (column ``error``). The estimator itself, at a finite ``t = n beta``, targets
``lambda - (m - 1) / log t + O(1 / log^2 t)`` (Watanabe's free energy ``F(t) = lambda log t - (m - 1) log log t +
O(1)``, ``m`` the multiplicity, `degenjax.theory.rrr_multiplicity`): for ``m = 2`` at n = 10^4 that is 0.14 below
lambda whatever the sampler does. Columns ``m`` and ``target`` give it where ``m`` is known (regular models: 1;
two-layer networks: Aoyagi & Watanabe 2005); for deeper networks ``m`` is not computed here (blank), and for their
lambda >= 12.5 the term is below 1.2% of lambda per unit of ``m - 1``.

Run (from the repository root; the package need not be installed, nothing is written outside ``--out``):

    python benchmarks/llc_accuracy.py                               # CPU cases, rows -> benchmarks/llc_accuracy.jsonl
    python benchmarks/llc_accuracy.py --cases linreg5,rrr444 --no-results
    PYTHONPATH=. python3 benchmarks/llc_accuracy.py --cases gpu --jobs 8 --max-steps 400000 --case-timeout 230 \
        --out $OUT/llc_gpu.jsonl --no-results    # the networks of 800 to 120 000 parameters on one GPU, float32
    python benchmarks/llc_accuracy.py --ingest llc_gpu.jsonl --no-results   # add those rows to the table

Each case runs in a fresh process (its own x64 setting; compile time counted as a user pays it), ``--jobs K`` of
them at a time (each child with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and a ``1/K`` share of an accelerator's
memory). Rows are appended to ``--out`` as they finish (rerun to resume: a case with a row for the same device kind
is skipped) and record the machine, the device, the dtype and the load; the table goes to ``benchmarks/RESULTS.md``
unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # nothing written outside --out (no __pycache__ in the checkout)

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)


def linreg_case(d, n, noise=0.5, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d,)) + noise * rng.normal(size=(n,))
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])

    def loss(w, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2)

    return loss, w, (jnp.asarray(x), jnp.asarray(y)), d / 2


def dln_case(widths, rank, n, seed=0):
    """Noise-free teacher ``x -> x U V^T`` (orthonormal U, V of rank r); ``w*`` = the zero-padded factorisation."""
    import jax.numpy as jnp

    from degenjax.theory import dln_learning_coefficient

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, widths[0]))
    u = np.linalg.qr(rng.normal(size=(widths[0], rank)))[0]
    v = np.linalg.qr(rng.normal(size=(widths[-1], rank)))[0]
    depth = len(widths) - 1
    ws = []
    for l in range(depth):
        w = np.zeros((widths[l], widths[l + 1]))
        if l == 0:
            w[:, :rank] = u
        elif l == depth - 1:
            w[:rank] = v.T
        else:
            w[:rank, :rank] = np.eye(rank)
        ws.append(jnp.asarray(w))

    def loss(ws, batch):
        bx, by = batch
        h = bx
        for w in ws:
            h = h @ w
        return jnp.mean(jnp.sum(jnp.square(h - by), axis=1))

    return loss, tuple(ws), (jnp.asarray(x), jnp.asarray(x @ u @ v.T)), float(dln_learning_coefficient(widths, rank))


def generic_factors(widths, rank, rng):
    """The factors of `dln_generic_case`'s teacher, drawn from ``rng`` (float64 NumPy): random Gaussian ``W_l`` of
    scale ``1/sqrt(fan-in)``, the middle one truncated to rank r."""
    ws = [rng.normal(size=(a, b)) / np.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    mid = len(ws) // 2
    u, sv, vt = np.linalg.svd(ws[mid], full_matrices=False)
    sv[rank:] = 0.0
    ws[mid] = (u * sv) @ vt
    return ws


def end_to_end_gram(ws):
    """``J J^T`` of the end-to-end map ``w -> P = W_1 ... W_L`` at the factors ``ws`` (row-major vec; float64 NumPy):
    ``dP = sum_l A_l dW_l B_l`` with ``A_l = W_1 .. W_{l-1}``, ``B_l = W_{l+1} .. W_L``, and ``vec(A dW B) =
    kron(A, B^T) vec(dW)``, so ``J J^T = sum_l kron(A_l A_l^T, B_l^T B_l)``: a ``d_in d_out`` square matrix for any
    number of parameters. Full rank = the map is a submersion at ``ws`` (a generic point)."""
    ws = [np.asarray(w, np.float64) for w in ws]
    d_in, d_out = ws[0].shape[0], ws[-1].shape[1]
    gram = np.zeros((d_in * d_out, d_in * d_out))
    for l in range(len(ws)):
        a = np.linalg.multi_dot([np.eye(d_in)] + ws[:l] + [np.eye(ws[l].shape[0])])
        b = np.linalg.multi_dot([np.eye(ws[l].shape[1])] + ws[l + 1:] + [np.eye(d_out)])
        gram += np.kron(a @ a.T, b.T @ b)
    return gram


def dln_generic_case(widths, rank, n, seed=0):
    """Noise-free teacher at a generic point of the zero set (as in Lau et al. 2023, arXiv 2308.12108, and the
    devinterp DLN): random Gaussian factors ``W_l`` of scale ``1/sqrt(fan-in)``, the middle one truncated to rank r;
    ``w*`` = the teacher. Its exact value: with ``W_1`` injective and ``W_L`` surjective (generic random factors of
    a network whose hidden layers are at least as wide as its ends), the end-to-end map is a submersion at ``w*``, so
    ``L_n`` is locally a non-degenerate quadratic in the ``d_in d_out`` entries of ``P - T`` and the local learning
    coefficient is ``d_in d_out / 2``; for 10-20-20-10 at rank 5 that equals Aoyagi's global value, 50 (not in
    general: the global one is a minimum over the zero set, e.g. 4 for 3-3-3-3 at rank 1, whose generic points have
    4.5). What the estimator targets as n -> infinity at a fixed Gaussian localization is the global value in any
    case (the localization has full support on the connected, unbounded zero set): an exact sampler gives 3.84 and
    3.45 at a generic point of 3-3-3-3 (gamma = 1, 10, n = 10^4; 3.73 and 3.20 at the zero-padded one), which
    extrapolate to 4.05, not 4.5; and 49.90 +- 0.28, 49.84 +- 0.22 here (gamma = 1, 10, n = 2 x 10^4;
    ``benchmarks/llc_ground_truth.py``)."""
    import jax.numpy as jnp

    from degenjax.theory import dln_learning_coefficient

    rng = np.random.default_rng(seed)
    ws = generic_factors(widths, rank, rng)
    x = rng.normal(size=(n, widths[0]))
    prod = ws[0]
    for w in ws[1:]:
        prod = prod @ w
    assert np.linalg.matrix_rank(prod) == rank

    def loss(ps, batch):
        bx, by = batch
        h = bx
        for w in ps:
            h = h @ w
        return jnp.mean(jnp.sum(jnp.square(h - by), axis=1))

    return (loss, tuple(jnp.asarray(w) for w in ws), (jnp.asarray(x), jnp.asarray(x @ prod)),
            float(dln_learning_coefficient(widths, rank)))


def devinterp_dln_case():
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from llc import _dln_problem  # the devinterp benchmark's problem

    ws, x, y = _dln_problem([10, 20, 20, 10], 5, 100_000, 1.0, 0)
    params = [jnp.asarray(w) for w in ws]

    def loss(ps, batch):
        xb, yb = batch
        h = xb
        for w in ps:
            h = h @ w.T
        return jnp.mean(jnp.square(h - yb))

    return loss, params, (jnp.asarray(x), jnp.asarray(y)), 50.0


# name: (builder, batch size, float64 = the default dtype)
CASES = {}
# name: (kind, sizes, rank, in the 'gpu' group): the model, for m and the target
MODELS = {}


def _add(name, build, batch, x64, kind, size, rank=None, gpu=False):
    CASES[name] = (build, batch, x64)
    MODELS[name] = (kind, size, rank, gpu)


def _dln(name, widths, rank, n, batch=100, x64=True, gpu=False):
    _add(name, lambda: dln_case(widths, rank, n), batch, x64, "dln", tuple(widths), rank, gpu)


_add("linreg5", lambda: linreg_case(5, 10_000), 256, True, "regular", 5)
_add("linreg50", lambda: linreg_case(50, 20_000), 256, True, "regular", 50)
_dln("rrr444", [4, 4, 4], 2, 10_000)
_dln("rrr534", [5, 3, 4], 1, 10_000)
_dln("dln3333", [3, 3, 3, 3], 1, 10_000)
_dln("dln-5-10-10-10-5", [5, 10, 10, 10, 5], 2, 20_000)
# GPU-sized (float32; ~20-70 min each on one CPU core at the default budget): 800 to 1.2 x 10^5 parameters, depths 3
# to 5, ranks 4 to 20
_dln("dln-10-20-20-10", [10, 20, 20, 10], 5, 20_000, x64=False, gpu=True)
_dln("dln-20-30-30-20", [20, 30, 30, 20], 8, 20_000, x64=False, gpu=True)
_dln("dln-16x6", [16, 32, 32, 32, 32, 16], 4, 20_000, x64=False, gpu=True)
_dln("dln-50-100-100-50", [50, 100, 100, 50], 10, 20_000, x64=False, gpu=True)
_dln("dln-50-100x4-50", [50, 100, 100, 100, 100, 50], 10, 20_000, x64=False, gpu=True)
_dln("dln-100-200-200-100", [100, 200, 200, 100], 20, 20_000, x64=False, gpu=True)
_dln("dln-100-200x3-100", [100, 200, 200, 200, 100], 20, 20_000, x64=False, gpu=True)


def _gdln(name, widths, rank, n, batch=100, x64=False, gpu=True):
    _add(name, lambda: dln_generic_case(widths, rank, n), batch, x64, "dln", tuple(widths), rank, gpu)


# generic points: depths 3 to 5, ranks 2 to 20, 300 to 1.2 x 10^5 parameters (hidden layers twice the ends, where
# the generic local value d_in d_out / 2 equals Aoyagi's global one; 20-30-30-20 at rank 8: 200 vs 199.5)
_gdln("gdln-5-10-10-10-5", [5, 10, 10, 10, 5], 2, 20_000, x64=True, gpu=False)
_gdln("gdln-10-20-20-10", [10, 20, 20, 10], 5, 20_000)
_gdln("gdln-8-16x4-8", [8, 16, 16, 16, 16, 8], 3, 20_000)
_gdln("gdln-20-30-30-20", [20, 30, 30, 20], 8, 20_000)
_gdln("gdln-16x6", [16, 32, 32, 32, 32, 16], 4, 20_000)
_gdln("gdln-50-100-100-50", [50, 100, 100, 50], 10, 20_000)
_gdln("gdln-50-100x4-50", [50, 100, 100, 100, 100, 50], 10, 20_000)
_gdln("gdln-100-200-200-100", [100, 200, 200, 100], 20, 20_000)
_gdln("gdln-100-200x3-100", [100, 200, 200, 200, 100], 20, 20_000)
_add("dln-devinterp", devinterp_dln_case, 500, False, "devinterp", (10, 20, 20, 10), 5)


def multiplicity(name):
    """The multiplicity m of the case's learning coefficient where known (None otherwise)."""
    if name not in MODELS:
        return None
    kind, size, rank, _ = MODELS[name]
    if kind == "regular" or (kind == "dln" and len(size) == 2):
        return 1
    if kind == "dln" and len(size) == 3:
        from degenjax.theory import rrr_multiplicity

        return rrr_multiplicity(*size, rank)
    return None


def finite_target(exact, m, nbeta):
    """The estimator's finite-t target ``lambda - (m - 1) / log(n beta)`` (None where m is unknown)."""
    return None if m is None else exact - (m - 1) / math.log(nbeta)


GROUND_TRUTH = os.path.join(HERE, "llc_ground_truth.jsonl")


def ideal_value(name, n, localization=1.0, path=GROUND_TRUTH):
    """What an exact sampler gives for the case: ``n beta E[L_n]`` under the localized tempered posterior at the case's
    n and the recipe's localization, with its standard error, from ``benchmarks/llc_ground_truth.py`` (NUTS in
    float64 on the exact full-batch potential of the noise-free networks); None where not measured.

    This is the quantity the recipe estimates (its ``lambda^`` at this n and localization); ``lambda`` is its limit.
    Their gap is not the sampler's: e.g. the 3-3-3-3 network (rank 1, exact 4) gives 3.73 at n = 10^4 and still 3.73
    at n = 10^6 at localization 1 (``-(m - 1) / log(n beta)``-type terms), so no sampler lands within 5% of 4 there.
    """
    if not os.path.exists(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r["case"] == name and int(r["n"]) == int(n) and float(r["gamma"]) == float(localization):
                    found = (float(r["lambda_ideal"]), float(r["se"]))
    return found


def _device():
    import jax

    d = jax.devices()[0]
    return {"device": f"{d.platform}:{d.device_kind}", "device_platform": d.platform, "jax": jax.__version__}


def run_case(name, args):
    import jax

    build, batch, case_x64 = CASES[name]
    x64 = case_x64 if args.dtype == "case" else args.dtype == "float64"
    jax.config.update("jax_enable_x64", x64)
    import degenjax as dj

    loss, params, data, exact = build()
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    t0 = time.perf_counter()
    try:
        res = dj.estimate_llc(jax.random.key(args.seed), loss, params, data, num_chains=args.chains, num_draws=1,
                              step_size="auto", batch_size=batch, warn=False, progress=args.verbose,
                              recipe_kwargs={"max_steps": args.max_steps})
    except dj.LLCDivergenceError as e:  # every rung diverged: a row of the table too (no estimate, not trusted)
        n = int(jax.tree.leaves(data)[0].shape[0])
        nan = float("nan")
        return {"case": name, "num_params": num_params, "n": n, "batch_size": batch, "exact": exact,
                "m": multiplicity(name), "nbeta": n / math.log(n), "target": None, "llc_mean": nan,
                "llc_uncertainty": nan, "rel_error": nan, "trustworthy": False, "step_size": nan, "rungs": [],
                "recipe_s": time.perf_counter() - t0, "one_estimate_s": nan, "message": f"no estimate: {e}",
                **_run_info(x64, args)}
    wall = time.perf_counter() - t0
    r = res.recipe
    finest = [row for row in r.rungs if not row["diverged"]][-1]
    est = float(res.llc_mean)
    n = int(res.num_data)
    m = multiplicity(name)
    nbeta = float(res.nbeta)
    return {"case": name, "num_params": num_params, "n": n, "batch_size": batch, "exact": exact,
            "m": m, "nbeta": nbeta, "target": finite_target(exact, m, nbeta),
            "llc_mean": est, "llc_uncertainty": float(res.llc_uncertainty), "rel_error": est / exact - 1.0,
            "trustworthy": r.trustworthy, "step_size": r.step_size,
            "rungs": [(row["step_size"], row["llc_mean"]) for row in r.rungs], "total_steps": r.total_steps,
            # per rung: ||w - w*||^2 over the window, its relaxation time and the burn-in (diffusion time)
            "rung_dist2": [(row.get("dist2"), row.get("relaxation_time"), row.get("burn_in_time")) for row in r.rungs],
            "recipe_s": wall, "one_estimate_s": float(finest["seconds"]),
            "equilibrated": [bool(row.get("equilibrated", False)) for row in r.rungs],
            "localization_check": None if r.localization_check is None else (
                r.localization_check["localization"], r.localization_check["llc_mean"]),
            # the recipe's escalation (step 8 of degenjax/_src/recipe.py): the setting measured and the first attempt
            "escalation": None if r.escalation is None else {
                k: r.escalation[k] for k in ("stage", "nbeta", "localization", "from_llc", "from_uncertainty",
                                             "from_problems")},
            "message": r.message, **_run_info(x64, args)}


def _run_info(x64, args):
    """The fields every row records about how it was run: dtype, budget, load, machine, date and device."""
    return {"dtype": "float64" if x64 else "float32", "load": os.getloadavg()[0], "max_steps": args.max_steps,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), **_device()}


def _platform_of(row):
    return row.get("device_platform", "cpu")


def _read(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def _append(path, row):
    """Appends one row (one write of one line, flushed and fsynced: a crash leaves whole rows only)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _child_cmd(name, args):
    return [sys.executable, os.path.abspath(__file__), "--child", name, "--chains", str(args.chains), "--seed",
            str(args.seed), "--max-steps", str(args.max_steps), "--dtype", args.dtype] + (
        ["--verbose"] if args.verbose else [])


def _child_env(jobs):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if jobs > 1:  # share one accelerator between the concurrent children
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / jobs:.2f}"
    return env


def _run_children(names, args, on_row):
    """Runs the cases in fresh processes, ``args.jobs`` at a time; ``on_row(row)`` as each finishes."""
    lock = threading.Lock()
    queue = list(names)
    failed = []
    t_all = time.perf_counter()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
                print(f"[{time.perf_counter() - t_all:7.1f} s] {name}: started", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(_child_cmd(name, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_child_env(args.jobs), cwd=ROOT)
            err = []
            timer = None
            if args.case_timeout:
                timer = threading.Timer(args.case_timeout, proc.kill)
                timer.start()
            t_err = threading.Thread(target=err.extend, args=(proc.stderr,), daemon=True)
            t_err.start()
            last = None
            for line in proc.stdout:
                if line.startswith("{"):
                    last = line
                elif args.verbose:
                    print(f"  [{name}] {line.rstrip()}", flush=True)
            proc.wait()
            t_err.join()
            if timer is not None:
                timer.cancel()
            wall = time.perf_counter() - t0
            with lock:
                if proc.returncode != 0 or last is None:
                    print("".join(err)[-3000:], file=sys.stderr)
                    why = "timed out" if args.case_timeout and wall >= args.case_timeout else "FAILED"
                    print(f"[{time.perf_counter() - t_all:7.1f} s] {name}: {why} after {wall:.0f} s", flush=True)
                    failed.append(name)
                    continue
                row = json.loads(last)
                row["process_s"] = wall
                on_row(row)
                print(f"[{time.perf_counter() - t_all:7.1f} s] {name}: done in {wall:.0f} s (recipe "
                      f"{row['recipe_s']:.0f} s): lambda^ {row['llc_mean']:.4g} +- {row['llc_uncertainty']:.2g} "
                      f"(exact {row['exact']:.4g}, {100 * row['rel_error']:+.1f}%), trusted {row['trustworthy']}",
                      flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="cpu", help="comma-separated case names, or 'cpu' (default: every case that is "
                   "not GPU-sized), 'gpu' (the GPU-sized ones) or 'all'")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=2_000_000, help="the recipe's budget of SGLD steps per chain")
    p.add_argument("--dtype", choices=("case", "float32", "float64"), default="case",
                   help="'case': each case's own (float32 for the GPU-sized networks and dln-devinterp)")
    p.add_argument("--jobs", type=int, default=1, help="cases run concurrently (each in its own process)")
    p.add_argument("--case-timeout", type=float, default=None, metavar="S",
                   help="kill a case after S seconds (no row is written for it)")
    p.add_argument("--verbose", action="store_true", help="print the recipe's progress lines")
    p.add_argument("--out", default=os.path.join(HERE, "llc_accuracy.jsonl"))
    p.add_argument("--ingest", action="append", default=[], metavar="JSONL",
                   help="add the rows of another run's --out file (e.g. a GPU run) to --out, then print the table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-results", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args)), flush=True)
        return
    # the parent never computes, but it imports degenjax.theory for the table: it must not reserve an accelerator's
    # memory that the children need
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.jobs < 1 or args.max_steps < 8 or args.chains < 1:
        p.error("--jobs and --chains must be >= 1 and --max-steps >= 8")
    groups = {"cpu": [c for c in CASES if not MODELS[c][3]], "gpu": [c for c in CASES if MODELS[c][3]],
              "all": list(CASES)}
    names = []
    for c in (x for x in args.cases.split(",") if x):
        names += groups.get(c, [c])
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)} or cpu, gpu, all")
    rows = _read(args.out)
    for path in args.ingest:
        have = {(r["case"], _platform_of(r), r.get("date")) for r in rows}
        new = [r for r in _read(path) if (r["case"], _platform_of(r), r.get("date")) not in have]
        for r in new:
            _append(args.out, r)
        rows += new
        print(f"ingested {len(new)} rows from {path}", flush=True)
    if args.ingest:
        names = [c for c in CASES if any(r["case"] == c for r in rows)]
    else:
        # resume: skip the cases that already have a row on this kind of device (cpu unless CUDA/ROCm is visible)
        kind = "gpu" if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1") or os.path.exists(
            "/dev/nvidia0") else "cpu"
        done = {r["case"] for r in rows if (_platform_of(r) == "cpu") == (kind == "cpu")}
        todo = [c for c in names if c not in done]
        if todo:
            print(f"{len(todo)} case(s) to run, {args.jobs} at a time: {', '.join(todo)}", flush=True)

        def on_row(row):
            _append(args.out, row)
            rows.append(row)

        failed = _run_children(todo, args, on_row)
        if failed:
            print(f"failed: {failed}", file=sys.stderr)
    text = table(rows, names)
    print(text)
    if not args.no_results:
        load = os.getloadavg()
        sys.path.insert(0, HERE)
        from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

        append_section(f"\n## LLC accuracy battery ({datetime.date.today()}, {platform.machine()} "
                       f"{os.cpu_count()} cores, load {load[0]:.1f})\n\n`{shlex.join(['python'] + sys.argv)}` "
                       f"(git {_git()})\n\n{text}\n", benchmark="llc_accuracy")


COLUMNS = ("| case | params | n | dtype | device | exact lambda | m | target lambda - (m-1)/log(n beta) | exact sampler "
           "n beta E[L] | recipe lambda^ | error vs lambda | vs target | vs exact sampler | trustworthy | chosen step "
           "| recipe (s) | one estimate (s) | ratio | load |")


def table(rows, names, ideal_path=GROUND_TRUTH):
    """The markdown table of the latest row of every (case, device) among ``names``, with its notes (the exact-sampler
    column from ``ideal_path``, `ideal_value`)."""
    latest = {}
    for r in rows:
        if r["case"] in names:
            latest[(r["case"], r.get("device", "cpu"))] = r
    order = sorted(latest, key=lambda k: (names.index(k[0]), k[1]))
    lines = [COLUMNS, "|" + "---|" * COLUMNS.count(" | ") + "---|"]
    lines += [_line(latest[k], ideal_path) for k in order]
    text = "\n".join(lines)
    text += ("\n\nThe criterion (issue: within 5% of the exact value, goal 3%) is judged against the exact learning "
             "coefficient lambda (`error vs lambda`). `target` is what the estimator itself converges to at this "
             "n beta, lambda - (m - 1) / log(n beta) (Watanabe's free energy lambda log t - (m - 1) log log t, t = "
             "n beta); for m = 2 at n = 10^4 (n beta = 1086) it is 0.14 below lambda. m is blank where it is not "
             "computed (networks deeper than two layers). `exact sampler` is n beta E[L_n] under the same localized "
             "tempered posterior (localization 1, this n; for an escalated row, the localization it measured at) "
             "sampled by NUTS in float64 on the exact full-batch "
             "potential (benchmarks/llc_ground_truth.py): what the recipe would give with no sampling bias, so "
             "`vs exact sampler` is the recipe's own error and the rest of `error vs lambda` belongs to the "
             "estimand at this n. Where lambda^ depends significantly on the localization, the recipe extrapolates "
             "it along 1 / log(n beta / gamma^2) to gamma -> 0 (degenjax's recipe, step 6), i.e. to lambda itself: "
             "then `error vs lambda` is its error, and `target` and `exact sampler` (finite-n values) are below it "
             "by design.")
    escalated = [latest[k] for k in order if latest[k].get("escalation")]
    if escalated:
        text += ("\n\nEscalated (the recipe's step 8: the chains could not be sampled at localization 1 within the "
                 "budget, so it measured at 10x the localization (with escalate='same_x' also at 100x n beta) and "
                 "accepted the first result whose own check against 10x that localization bounded the localization "
                 "bias with confidence):\n\n" + "\n".join(
                     f"- {r['case']} ({r.get('device', 'cpu')}): measured at localization "
                     f"{r['escalation']['localization']:g}, n beta {r['escalation']['nbeta']:.4g}; the first attempt "
                     f"gave {r['escalation']['from_llc']:.4g} +- {r['escalation']['from_uncertainty']:.2g} "
                     f"({', '.join(r['escalation']['from_problems'])})" for r in escalated))
    untrusted = [latest[k] for k in order if not latest[k]["trustworthy"]]
    if untrusted:
        text += "\n\n" + "\n".join(f"- {r['case']} ({r.get('device', 'cpu')}): {r.get('message', '')}"
                                     for r in untrusted)
    return text


def _line(r, ideal_path=GROUND_TRUTH):
    m = r.get("m", multiplicity(r["case"]))
    # the finite-n target at the case's own n beta (an escalated row's nbeta is the one it sampled)
    nbeta = (None if r.get("escalation") else r.get("nbeta")) or r["n"] / math.log(r["n"])
    target = finite_target(r["exact"], m, nbeta)
    vs_target = "" if target is None else f"{100 * (r['llc_mean'] / target - 1):+.1f}%"
    # an escalated row is compared with the exact sampler at the localization it measured (same n beta only)
    esc = r.get("escalation") or {}
    gamma = esc.get("localization", r.get("localization") or 1.0)
    ideal = (ideal_value(r["case"], r["n"], gamma, ideal_path) if esc.get("stage", "localization") == "localization"
             else None)
    ideal_cell = "" if ideal is None else (f"{ideal[0]:.4g} +- {ideal[1]:.2g}"
                                           + (f" (at localization {gamma:g})" if gamma != 1 else ""))
    vs_ideal = "" if ideal is None else f"{100 * (r['llc_mean'] / ideal[0] - 1):+.1f}%"
    if not math.isfinite(r["llc_mean"]):  # no estimate (every rung diverged): said in the notes below the table
        vs_target = vs_ideal = ""
    return (f"| {r['case']} | {r['num_params']} | {r['n']} | {r.get('dtype', '')} | {r.get('device', 'cpu')} | "
            f"{r['exact']:.4g} | {'' if m is None else m} | {'' if target is None else format(target, '.4g')} | "
            f"{ideal_cell} | "
            f"{r['llc_mean']:.4g} +- {r['llc_uncertainty']:.2g} | {100 * r['rel_error']:+.1f}% | {vs_target} | {vs_ideal} | "
            f"{'yes' if r['trustworthy'] else 'NO'} | {r['step_size']:.3g} | {r['recipe_s']:.0f} | "
            f"{r['one_estimate_s']:.0f} | {r['recipe_s'] / max(r['one_estimate_s'], 1e-9):.1f} | "
            f"{r.get('load', float('nan')):.0f} |")


def _git():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
