"""Ground truth for the LLC battery's deep linear networks: what an exact sampler of the localized tempered posterior
gives, lambda_ideal(n, gamma) = n beta E[L_n(w)], against Aoyagi's learning coefficient.

The battery's networks (``benchmarks/llc_accuracy.py``, ``dln_case`` and ``dln_generic_case``) are noise-free and
realizable, so their loss (mean over rows of the sum over outputs of the squared error) is a quadratic form of the
end-to-end matrix:

    L_n(w) = tr((P(w) - T)^T S (P(w) - T)),   P(w) = W_1 W_2 ... W_L,  S = X^T X / n,

and the localized tempered potential ``U(w) = n beta L_n(w) + gamma / 2 ||w - w*||^2`` (arXiv 2308.12108, eq. 5;
arXiv 2405.10927 section 3) costs a few small matrix products for any n. This script samples it with numpyro's NUTS
in float64 (full batch, Metropolis-corrected: no step-size or minibatch bias), 4 chains from ``w*``, and reports
``n beta E[L_n]`` with its standard error over chains, the split R-hat and ESS of the loss and of ``||w - w*||^2``
(the slow observable along the networks' symmetry orbits), and ``E ||w - w*||^2``.

Run (from the repository root):

    python benchmarks/llc_ground_truth.py --cases dln3333,dln-5-10-10-10-5 --gammas 1,10,100 --ns 20000,100000
    python benchmarks/llc_ground_truth.py --print            # the table of the rows recorded so far

What it shows (rows in ``benchmarks/llc_ground_truth.jsonl``):

* the estimand itself is off at the battery's n: the 3-3-3-3 network (rank 1, exact 4) gives 3.73 at gamma = 1 for
  n = 10^4 and still 3.73 at n = 10^6 (3.82 at gamma = 0.1), so no sampler lands within 5% of 4 at localization 1;
  its values over n = 10^4..10^6 and gamma = 0.1..10 lie on lines in ``x = 1 / log(n beta / gamma^2)`` that meet
  ``x = 0`` at 3.9-4.1 (``extrapolations``; the recipe's localization extrapolation);
* the 5-10-10-10-5 network (rank 2, exact 12.5, n = 2 x 10^4) gives 12.31 at gamma = 1 but 11.72 at 10 and 7.93 at
  100, while the recipe gave 20.6 at gamma = 1: there the sampler is what fails. At equilibrium under gamma = 1 the
  chains sit ~200 from ``w*`` (squared distance) along the symmetry orbits, where the top curvature of U is
  400-1600x that at ``w*`` (``curvature at equilibrium``): full-batch SGLD started there diverges at step 1e-6 and is
  +12% at 1e-7, +5% at 3e-8 (``--sgld-steps``), while the orbits relax over ~1 unit of diffusion time (10^7-10^8
  steps); at gamma = 3 the curvature is ~50x and at 10 ~6x;
* the reduced-rank regressions reproduce the closed forms: 5-3-4 (m = 2) 6.83 for the finite-n value 6.857, 4-4-4
  7.38 for 7.5;
* at localization 10, where the recipe escalates when its chains cannot be sampled at 1, the generic-point
  networks give 12.34 (5-10-10-10-5, exact 12.5), 49.84 (10-20-20-10, 50), 31.21 (8-16x4-8, 32), 193.1
  (20-30-30-20, 199.5) and 125.7 (16x6, 128), and at 100: 11.43, 48.53, 29.04, 184.1, 113.4; the 50-100-100-50
  network (2 x 10^4 parameters, exact 1250) gives 1246.3 at 10 and 1184.8 at 100, but at 10 its chains sit at
  squared distance 1340 from ``w*`` (17 500 of its directions are flat), where the top curvature is 41x that at
  ``w*`` (2.3x at 100): SGLD steps ~40x smaller than at ``w*``;
* the column "Gaussian at w*" (`gaussian_value`: the Laplace approximation ``1/2 sum_i a_i / (a_i + gamma)``, ``a_i
  = n beta h_i`` over the nonzero Hessian eigenvalues at ``w*``) separates the localization's part of that gap from
  the rest: at a generic point it reproduces the localization dependence (10-20-20-10: 49.87 and 48.79 at 10 and
  100), and its change from 10 to 100 is 3.2x to 8.3x its bias at 10 on every generic-point network (above the
  ``sqrt(10) - 1 = 2.16`` the recipe's check assumes), while 20-30-30-20 samples 5.5 below it at both 10 and 100:
  a finite-n gap, not the localization's. At a zero-padded point it counts only the quadratic directions (8 of
  5-10-10-10-5's 12.5).

Rows are appended to ``--out`` (default ``benchmarks/llc_ground_truth.jsonl``) as each (case, n, gamma) finishes,
with the date, machine, command and load; a rerun skips the triples that already have a row. ``--results`` appends
the table to ``benchmarks/RESULTS.md`` (via ``benchmarks/_results.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time

sys.dont_write_bytecode = True

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

sys.path.insert(0, HERE)
import llc_accuracy as battery  # the battery's networks: one table of cases

# name: (widths, rank, generic point): the battery's networks, plus a generic point of 3-3-3-3 (not a battery case:
# its generic local value, 4.5, is not the global one, 4)
CASES = {name: (widths, rank, name.startswith("gdln-"))
         for name, (kind, widths, rank, _) in battery.MODELS.items() if kind == "dln"}
CASES["gdln3333"] = ((3, 3, 3, 3), 1, True)


def build(name, n):
    """``(ws_star, S, T, exact)`` of the battery's case ``name`` at n data points (its own data, seed 0)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    widths, rank, generic = CASES[name]
    loss, params, (x, y), exact = (battery.dln_generic_case if generic else battery.dln_case)(list(widths), rank, n)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    s = x.T @ x / n
    t = np.linalg.lstsq(x, y, rcond=None)[0]  # noise-free: y = x T exactly
    ws = [np.asarray(w, np.float64) for w in params]
    # the battery's loss equals the quadratic form (checked on w* and a perturbed point)
    rng = np.random.default_rng(1)
    pert = tuple(jax.numpy.asarray(w + 0.1 * rng.normal(size=w.shape)) for w in ws)
    prod = np.linalg.multi_dot([np.asarray(w) for w in pert]) if len(pert) > 1 else np.asarray(pert[0])
    quad = float(np.trace((prod - t).T @ s @ (prod - t)))
    direct = float(loss(pert, (jax.numpy.asarray(x), jax.numpy.asarray(y))))
    assert abs(quad - direct) <= 1e-8 * max(1.0, abs(direct)), (quad, direct)
    return ws, s, t, float(exact)


def run_nuts(name, n, gamma, *, num_warmup, num_samples, num_chains, seed, max_tree_depth, dense, target_accept=0.9,
             sgld_steps=(), sgld_time=0.05):
    """One row: `sample_exact` on the battery's case ``name`` at n data points, nbeta = n / log n."""
    ws, s, t, exact = build(name, n)
    nbeta = n / math.log(n)
    row = sample_exact(ws, s, t, nbeta, gamma, num_warmup=num_warmup, num_samples=num_samples,
                       num_chains=num_chains, seed=seed, max_tree_depth=max_tree_depth, dense=dense,
                       target_accept=target_accept, sgld_steps=sgld_steps, sgld_time=sgld_time)
    gauss, _ = gaussian_value(ws, s, nbeta, gamma)
    return {"case": name, "n": n, "nbeta": nbeta, "gamma": gamma, "exact": exact, **row, "lambda_gaussian": gauss,
            "sampler": "numpyro NUTS float64 full batch", "load": os.getloadavg()[0],
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "command": shlex.join(["python"] + sys.argv)}


def sample_exact(ws, s, t, nbeta, gamma, *, num_warmup=500, num_samples=1000, num_chains=4, seed=0,
                 max_tree_depth=10, dense=False, target_accept=0.95, sgld_steps=(), sgld_time=0.05):
    """NUTS (float64, full batch) on ``U(w) = nbeta tr((P - T)^T S (P - T)) + gamma / 2 ||w - w*||^2``.

    Args:
      ws: the factors at ``w*`` (a list of 2-d arrays, ``P = ws[0] @ ws[1] @ ...``).
      s: ``(d_in, d_in)`` input second moment ``X^T X / n``.
      t: ``(d_in, d_out)`` teacher.
      nbeta, gamma: inverse temperature times n, localization.
      sgld_steps, sgld_time: full-batch SGLD runs from the chains' last draws (`_sgld_from`).

    Returns:
      dict: ``lambda_ideal`` (``nbeta E[L]``, mean over chains), ``se`` (over chains), diagnostics of the loss and of
      ``||w - w*||^2``, the top curvature of U at the last draws and at ``w*``, and the SGLD rows.
    """
    import jax
    import jax.numpy as jnp
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    shapes = [w.shape for w in ws]
    sizes = [w.size for w in ws]
    w0 = np.concatenate([w.ravel() for w in ws])
    s_j, t_j, w0_j = jnp.asarray(s), jnp.asarray(t), jnp.asarray(w0)

    def unflat(v):
        out, i = [], 0
        for shp, k in zip(shapes, sizes):
            out.append(v[i:i + k].reshape(shp))
            i += k
        return out

    def loss(v):
        ps = unflat(v)
        prod = ps[0]
        for p in ps[1:]:
            prod = prod @ p
        e = prod - t_j
        return jnp.sum(e * (s_j @ e))

    def potential(v):
        return nbeta * loss(v) + 0.5 * gamma * jnp.sum(jnp.square(v - w0_j))

    kernel = NUTS(potential_fn=potential, max_tree_depth=max_tree_depth, dense_mass=dense,
                  target_accept_prob=target_accept)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method="sequential", progress_bar=False)
    t0 = time.perf_counter()
    with jax.numpy_dtype_promotion("standard"):  # numpyro's NUTS mixes int and float internally
        mcmc.run(jax.random.key(seed), init_params=jnp.tile(w0_j, (num_chains, 1)),
                 extra_fields=("num_steps", "diverging"))
    wall = time.perf_counter() - t0
    v = mcmc.get_samples(group_by_chain=True)  # (chains, draws, d)
    lv = np.asarray(jax.vmap(jax.vmap(loss))(v))
    dv = np.asarray(jnp.sum(jnp.square(v - w0_j[None, None]), axis=-1))
    ex = mcmc.get_extra_fields(group_by_chain=True)
    per_chain = nbeta * lv.mean(axis=1)
    se = float(np.std(per_chain, ddof=1) / math.sqrt(num_chains))
    # the stiffness the sampler meets at equilibrium: the top eigenvalue of the Hessian of U at the chains' last draws
    # (exact, dense Hessian) against the one at w*
    top = lambda x: _top_curvature(potential, loss, nbeta, gamma, x)
    curv = [top(v[c, -1]) for c in range(num_chains)]
    curv_star = top(w0_j)
    sgld = [_sgld_from(v[:, -1], potential, loss, w0_j, nbeta, eps, sgld_time, seed) for eps in sgld_steps]
    return {"num_params": int(w0.size), "lambda_ideal": float(per_chain.mean()), "se": se, "per_chain": per_chain.tolist(),
            "rhat_loss": float(split_gelman_rubin(lv[..., None])[0]),
            "ess_loss": float(effective_sample_size(lv[..., None])[0]),
            "dist2": float(dv.mean()), "rhat_dist2": float(split_gelman_rubin(dv[..., None])[0]),
            "ess_dist2": float(effective_sample_size(dv[..., None])[0]),
            "curvature_equilibrium": curv, "curvature_at_w_star": curv_star, "sgld_full_batch": sgld,
            "mean_leapfrogs": float(np.mean(ex["num_steps"])), "divergences": int(np.sum(ex["diverging"])),
            "num_warmup": num_warmup, "num_samples": num_samples, "num_chains": num_chains, "seed": seed,
            "max_tree_depth": max_tree_depth, "dense_mass": dense, "target_accept": target_accept, "seconds": wall}


def gaussian_value(ws, s, nbeta, gamma):
    """``n beta E[L_n]`` under the Gaussian (Laplace) approximation of the localized posterior at ``w*``:
    ``1/2 sum_i n beta h_i / (n beta h_i + gamma)`` over the nonzero eigenvalues ``h_i`` of the Hessian of ``L_n``.

    At a zero of ``L_n = tr((P - T)^T S (P - T))`` that Hessian is ``2 J^T (S (x) I) J`` with ``J`` the Jacobian of
    the end-to-end map ``w -> P``; its nonzero eigenvalues are those of ``2 (S^1/2 (x) I) J J^T (S^1/2 (x) I)``, a
    ``d_in d_out`` square matrix (``J J^T``: ``llc_accuracy.end_to_end_gram``), so the value costs one ``d_in d_out``
    eigendecomposition for any number of parameters. At a generic point (a submersion, ``d_in d_out`` nonzero
    ``h_i``) it tends to lambda as gamma -> 0 and its change with gamma is the localization's part of the gap between
    ``lambda_ideal`` and lambda; at a zero-padded point it omits the quartic directions. Returns ``(value, number of
    nonzero h_i)``."""
    jjt = battery.end_to_end_gram(ws)
    d_out = ws[-1].shape[1]
    ev, vec = np.linalg.eigh(np.asarray(s, np.float64))
    root = np.kron((vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T, np.eye(d_out))
    h = np.linalg.eigvalsh(2 * root @ jjt @ root)
    h = h[h > 1e-9 * h.max()]
    return float(0.5 * np.sum(nbeta * h / (nbeta * h + gamma))), int(h.size)


def _top_curvature(potential, loss, nbeta, gamma, x, dense_limit=3000, iters=200):
    """The top eigenvalue of the Hessian of ``potential = nbeta loss + gamma / 2 ||w - w*||^2`` at ``x``: exact (dense
    ``eigvalsh``) up to ``dense_limit`` parameters, above that the recipe's power iteration on Hessian-vector
    products (`degenjax._src.recipe.top_curvature`, ``nbeta h_max(L) + gamma``)."""
    import jax
    import jax.numpy as jnp

    from degenjax._src.recipe import top_curvature

    if x.size <= dense_limit:
        return float(jnp.linalg.eigvalsh(jax.hessian(potential)(x))[-1])
    return top_curvature(lambda v, _: loss(v), x, jnp.zeros((1,)), nbeta=nbeta, localization=gamma, num_iters=iters)


def _sgld_from(start, potential, loss, w0, nbeta, eps, diffusion_time, seed):
    """Full-batch SGLD (the recipe's update, no minibatch noise) on the exact potential, started at the NUTS chains'
    last draws (already at equilibrium): ``n beta E[L]`` over ``diffusion_time / eps`` steps after a quarter of that
    as burn-in. Its difference from lambda_ideal is SGLD's step-size bias at equilibrium; NaN = diverged."""
    import functools

    import jax
    import jax.numpy as jnp

    grad = jax.vmap(jax.grad(potential))
    lvals = jax.vmap(loss)
    num = max(4, int(round(diffusion_time / eps)))

    @functools.partial(jax.jit, static_argnums=2)
    def run(x, key, steps):
        def body(c, i):
            x, acc = c
            x = x - 0.5 * eps * grad(x) + jnp.sqrt(eps) * jax.random.normal(jax.random.fold_in(key, i), x.shape)
            return (x, acc + lvals(x)), None

        (x, acc), _ = jax.lax.scan(body, (x, jnp.zeros(x.shape[0], x.dtype)), jnp.arange(steps))
        return x, acc / steps

    t0 = time.perf_counter()
    x, _ = run(start, jax.random.key(seed + 101), num // 4)
    x, acc = run(x, jax.random.key(seed + 102), num)
    lam = nbeta * np.asarray(acc)
    return {"step_size": eps, "steps": num, "llc": float(lam.mean()),
            "se": float(np.std(lam, ddof=1) / math.sqrt(lam.size)), "seconds": time.perf_counter() - t0}


def _curv(r):
    if "curvature_equilibrium" not in r:
        return ""
    c = np.array(r["curvature_equilibrium"]) / r["curvature_at_w_star"]
    return f"{np.median(c):.3g} ({c.min():.2g}-{c.max():.2g})"


def with_gaussian(rows):
    """``rows`` with ``lambda_gaussian`` (`gaussian_value`) filled in where a row predates it."""
    cache = {}
    out = []
    for r in rows:
        if "lambda_gaussian" not in r and r["case"] in CASES:
            key = (r["case"], r["n"])
            if key not in cache:
                ws, s, _, _ = build(r["case"], r["n"])
                cache[key] = (ws, s)
            r = {**r, "lambda_gaussian": gaussian_value(*cache[key], r["nbeta"], r["gamma"])[0]}
        out.append(r)
    return out


def table(rows):
    cols = ("| case | params | n | n beta | gamma | exact lambda | lambda_ideal = n beta E[L] | vs exact "
            "| Gaussian at w* | R-hat (L) "
            "| ESS (L) | E ||w-w*||^2 | R-hat (dist) | ESS (dist) | leapfrogs/draw | divergences | s | curvature at "
            "equilibrium / at w* | full-batch SGLD from equilibrium, step: n beta E[L] |")
    lines = [cols, "|" + "---|" * cols.count(" | ") + "---|"]
    latest = {}
    for r in rows:
        latest[(r["case"], r["n"], r["gamma"])] = r
    for k in sorted(latest, key=lambda k: (list(CASES).index(k[0]) if k[0] in CASES else 99, k[1], k[2])):
        r = latest[k]
        lines.append(f"| {r['case']} | {r['num_params']} | {r['n']} | {r['nbeta']:.0f} | {r['gamma']:g} | "
                     f"{r['exact']:.4g} | {r['lambda_ideal']:.3f} +- {r['se']:.2f} | "
                     f"{100 * (r['lambda_ideal'] / r['exact'] - 1):+.1f}% | "
                     + (f"{r['lambda_gaussian']:.3f}" if "lambda_gaussian" in r else "") + f" | {r['rhat_loss']:.3f} | "
                     f"{r['ess_loss']:.0f} | {r['dist2']:.3g} | {r['rhat_dist2']:.3f} | {r['ess_dist2']:.0f} | "
                     f"{r['mean_leapfrogs']:.0f} | {r['divergences']} | {r['seconds']:.0f} | {_curv(r)} | "
                     + ", ".join(f"{g['step_size']:.2g}: {g['llc']:.3g}" for g in r.get("sgld_full_batch", [])) + " |")
    return "\n".join(lines)


def extrapolations(rows, factor=10.0):
    """The recipe's localization extrapolation applied to exact-sampler values: for every case, n and pair (gamma,
    factor x gamma) with ``n beta / (factor gamma)^2 > e^2``, the line through ``(x, lambda_ideal)`` with ``x = 1 /
    log(n beta / gamma^2)``, evaluated at ``x = 0`` (markdown table)."""
    latest = {}
    for r in rows:
        latest[(r["case"], r["n"], r["gamma"])] = r
    lines = ["| case | n | gamma pair | lambda_ideal at the pair | x at the pair | extrapolated to x = 0 | exact | error |",
             "|---|---|---|---|---|---|---|---|"]
    for (case, n, g), r in sorted(latest.items(), key=lambda kv: (list(CASES).index(kv[0][0])
                                                                   if kv[0][0] in CASES else 99, kv[0][1], kv[0][2])):
        r2 = latest.get((case, n, g * factor))
        if r2 is None or r["nbeta"] <= math.e ** 2 * (g * factor) ** 2:
            continue
        x1, x2 = 1 / math.log(r["nbeta"] / g ** 2), 1 / math.log(r["nbeta"] / (g * factor) ** 2)
        l1, l2 = r["lambda_ideal"], r2["lambda_ideal"]
        ext = l1 + (l1 - l2) * x1 / (x2 - x1)
        lines.append(f"| {case} | {n} | {g:g}, {g * factor:g} | {l1:.3f}, {l2:.3f} | {x1:.3f}, {x2:.3f} | {ext:.3f} | "
                     f"{r['exact']:.4g} | {100 * (ext / r['exact'] - 1):+.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="dln3333,dln-5-10-10-10-5")
    p.add_argument("--gammas", default="1,10,100")
    p.add_argument("--ns", default="20000")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tree-depth", type=int, default=10)
    p.add_argument("--dense", action="store_true", help="dense mass matrix adaptation")
    p.add_argument("--target-accept", type=float, default=0.9)
    p.add_argument("--sgld-steps", default="", help="comma-separated step sizes: also run full-batch SGLD from the "
                   "NUTS chains' last draws (equilibrium) at each, for --sgld-time of diffusion time")
    p.add_argument("--sgld-time", type=float, default=0.05)
    p.add_argument("--out", default=os.path.join(HERE, "llc_ground_truth.jsonl"))
    p.add_argument("--print", action="store_true", help="print the table of --out and exit")
    p.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not args.print:
        # a row counts as done when it has every requested SGLD step (a rerun with --sgld-steps replaces the row)
        want = {float(e) for e in args.sgld_steps.split(",") if e}
        have = {(r["case"], r["n"], r["gamma"]) for r in rows
                if want <= {g["step_size"] for g in r.get("sgld_full_batch", [])}}
        for name in args.cases.split(","):
            for n in (int(float(x)) for x in args.ns.split(",")):
                for gamma in (float(x) for x in args.gammas.split(",")):
                    if (name, n, gamma) in have:
                        continue
                    r = run_nuts(name, n, gamma, num_warmup=args.warmup, num_samples=args.samples,
                                 num_chains=args.chains, seed=args.seed, max_tree_depth=args.max_tree_depth,
                                 dense=args.dense, target_accept=args.target_accept,
                                 sgld_steps=[float(e) for e in args.sgld_steps.split(",") if e],
                                 sgld_time=args.sgld_time)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                    rows.append(r)
                    print(f"{name} n={n} gamma={gamma:g}: lambda_ideal {r['lambda_ideal']:.3f} +- {r['se']:.2f} "
                          f"(exact {r['exact']:.4g}), R-hat {r['rhat_loss']:.3f}/{r['rhat_dist2']:.3f}, ESS "
                          f"{r['ess_loss']:.0f}/{r['ess_dist2']:.0f}, dist2 {r['dist2']:.3g}, "
                          f"{r['mean_leapfrogs']:.0f} leapfrogs, {r['seconds']:.0f} s", flush=True)
    rows = with_gaussian(rows)
    text = table(rows) + ("\n\nThe localization extrapolation of `degenjax` 's recipe (lambda^ linear in x = 1 / log(n beta "
                          "/ gamma^2), evaluated at x = 0) applied to these exact-sampler values:\n\n"
                          + extrapolations(rows))
    print(text)
    if args.results:
        sys.path.insert(0, HERE)
        from _results import append_section

        append_section(f"\n## LLC ground truth (exact sampler) ({datetime.date.today()}, {platform.machine()} "
                       f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n\n`{shlex.join(['python'] + sys.argv)}`"
                       f"\n\n{text}\n", benchmark="llc_ground_truth")


if __name__ == "__main__":
    main()
