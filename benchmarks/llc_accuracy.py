"""LLC accuracy battery: the recipe's lambda^ (``estimate_llc(..., step_size="auto")``, no hand-tuning) against exact
learning coefficients.

Cases (``--cases``, comma-separated names; default all):

* regular regressions (lambda = d/2), with label noise and ``w*`` the exact least-squares minimum;
* reduced-rank regressions (two-layer linear networks, Aoyagi & Watanabe 2005) and deep linear networks of several
  depths, widths and ranks (Aoyagi 2024), noise-free and realizable, at the minimal-rank factorisation of the
  teacher (each factor of rank r, zero-padded), where the local learning coefficient is the global one;
* ``dln-devinterp``: the devinterp benchmark's network (10-20-20-10, rank 5, random factors, label noise 1, n = 10^5,
  float32, ``w*`` the noisy teacher), where devinterp's usual settings give 57.4.

Every case runs the recipe with the library defaults (nbeta = n / log n, localization 1, 4 chains) and the case's
batch size; ``one estimate`` is the wall time of the finest rung alone (one run at the chosen step for the same
diffusion time: what a user who already knew the step would pay), and the table gives the recipe's total against it.

Run: ``.venv/bin/python benchmarks/llc_accuracy.py`` (all cases; the largest take long on 2 CPU cores) or
``--cases linreg5,rrr444``; ``--max-steps`` caps each recipe's steps per chain. Rows are appended to
``benchmarks/llc_accuracy.jsonl`` as they finish (rerun to resume) and the table to ``benchmarks/RESULTS.md``.
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
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


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


# name: (builder, batch size, float64)
CASES = {
    "linreg5": (lambda: linreg_case(5, 10_000), 256, True),
    "linreg50": (lambda: linreg_case(50, 20_000), 256, True),
    "rrr444": (lambda: dln_case([4, 4, 4], 2, 10_000), 100, True),
    "rrr534": (lambda: dln_case([5, 3, 4], 1, 10_000), 100, True),
    "dln3333": (lambda: dln_case([3, 3, 3, 3], 1, 10_000), 100, True),
    "dln-5-10-10-10-5": (lambda: dln_case([5, 10, 10, 10, 5], 2, 20_000), 100, True),
    "dln-10-20-20-10": (lambda: dln_case([10, 20, 20, 10], 5, 20_000), 100, True),
    "dln-20-30-30-20": (lambda: dln_case([20, 30, 30, 20], 8, 20_000), 100, True),
    "dln-16x6": (lambda: dln_case([16, 32, 32, 32, 32, 16], 4, 20_000), 100, True),
    "dln-50-100-100-50": (lambda: dln_case([50, 100, 100, 50], 10, 20_000), 100, False),
    "dln-100-200-200-100": (lambda: dln_case([100, 200, 200, 100], 20, 20_000), 100, False),
    "dln-devinterp": (devinterp_dln_case, 500, False),
}


def run_case(name, args):
    import jax

    builder, batch, x64 = CASES[name]
    jax.config.update("jax_enable_x64", x64)
    import degenjax as dj

    loss, params, data, exact = builder()
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    t0 = time.perf_counter()
    res = dj.estimate_llc(jax.random.key(args.seed), loss, params, data, num_chains=args.chains, num_draws=1,
                          step_size="auto", batch_size=batch, warn=False, progress=args.verbose,
                          recipe_kwargs={"max_steps": args.max_steps})
    wall = time.perf_counter() - t0
    r = res.recipe
    finest = [row for row in r.rungs if not row["diverged"]][-1]
    est = float(res.llc_mean)
    return {"case": name, "num_params": num_params, "n": int(res.num_data), "batch_size": batch, "exact": exact,
            "llc_mean": est, "llc_uncertainty": float(res.llc_uncertainty), "rel_error": est / exact - 1.0,
            "trustworthy": r.trustworthy, "step_size": r.step_size,
            "rungs": [(row["step_size"], row["llc_mean"]) for row in r.rungs], "total_steps": r.total_steps,
            "recipe_s": wall, "one_estimate_s": float(finest["seconds"]), "dtype": "float64" if x64 else "float32",
            "equilibrated": [bool(row.get("equilibrated", False)) for row in r.rungs],
            "localization_check": None if r.localization_check is None else (
                r.localization_check["localization"], r.localization_check["llc_mean"]),
            "load": os.getloadavg()[0], "max_steps": args.max_steps, "message": r.message}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=2_000_000)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "llc_accuracy.jsonl"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args)))
        return
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    done = {}
    if os.path.exists(args.out):
        for line in open(args.out):
            row = json.loads(line)
            done[row["case"]] = row
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        # a fresh process per case: its own x64 setting, and compile time counted as a user would pay it
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--chains", str(args.chains), "--seed",
               str(args.seed), "--max-steps", str(args.max_steps)] + (["--verbose"] if args.verbose else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(_line(row), flush=True)
    table = ["| case | params | n | exact | recipe lambda^ | error | trustworthy | chosen step | recipe (s) | "
             "one estimate (s) | ratio | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [_line(r) for r in rows]
    text = "\n".join(table)
    untrusted = [r for r in rows if not r["trustworthy"]]
    if untrusted:
        text += "\n\n" + "\n".join(f"- {r['case']}: {r.get('message', '')}" for r in untrusted)
    print(text)
    if not args.no_results:
        load = os.getloadavg()
        sys.path.insert(0, HERE)
        from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

        append_section(f"\n## LLC accuracy battery ({datetime.date.today()}, {platform.machine()} "
                       f"{os.cpu_count()} cores, load {load[0]:.1f})\n\n`{shlex.join(['python'] + sys.argv)}` "
                       f"(git {_git()})\n\n{text}\n", benchmark="llc_accuracy")


def _line(r):
    return (f"| {r['case']} | {r['num_params']} | {r['n']} | {r['exact']:.4g} | {r['llc_mean']:.4g} +- "
            f"{r['llc_uncertainty']:.2g} | {100 * r['rel_error']:+.1f}% | {'yes' if r['trustworthy'] else 'NO'} | "
            f"{r['step_size']:.3g} | {r['recipe_s']:.0f} | {r['one_estimate_s']:.0f} | "
            f"{r['recipe_s'] / max(r['one_estimate_s'], 1e-9):.1f} | {r.get('load', float('nan')):.0f} |")


def _git():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
