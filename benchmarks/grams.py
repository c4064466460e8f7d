"""Benchmark: streamed activation and Jacobian Grams (issue 2).

(a) Activation Gram throughput: degenjax's compiled accumulator update (float32, pairwise + compensated) vs NumPy/BLAS
    ``X.T @ X`` on the same float32 activations (goal: ratio >= 0.8).
(b) Jacobian Gram of an MLP 256-512-512-10 (all node layers, target="next"): `jacobian_grams` vs a per-example
    ``jax.jacrev`` loop, J^T J summed in NumPy: once with the per-example Jacobian jitted (a strong baseline) and
    once calling ``jax.jacrev`` eagerly (the literal naive loop). The loops are timed on a subset and scaled
    linearly to the same number of examples (goal: ratio >= 10).
(c) Peak memory (ru_maxrss of a fresh subprocess) of `jacobian_grams` streaming n = 1e4 vs 1e5 examples generated
    batch by batch (goal: the same).

Run: .venv/bin/python benchmarks/grams.py [--n-act 200000 --d-act 256 --n-jac 2000 --n-naive 100 ...]
The results are printed and recorded in benchmarks/results.jsonl (RESULTS.md and history.md are generated from it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def _best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _mlp(widths, seed=0):
    import jax
    import jax.numpy as jnp

    from degenjax import models

    module = models.MLP(features=tuple(widths[1:]))
    x = jnp.zeros((2, widths[0]), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), x)
    return module, variables, models.mlp_sections(module, x)


def _batches(n, batch, d, seed=1):
    """Inputs generated batch by batch (nothing of size n is ever held)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        yield rng.standard_normal((min(batch, n - start), d), dtype=np.float32)


def bench_activation(n, d, repeats):
    import jax
    import jax.numpy as jnp

    import degenjax as dj

    X = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32) + np.float32(1.0)
    Xj = jax.device_put(X)
    acc = dj.gram_accumulator(accum_dtype=jnp.float32)

    @jax.jit
    def gram(x):
        return acc.finalize(acc.update(acc.init(x), x)).gram

    jax.block_until_ready(gram(Xj))  # compile
    # Interleaved repeats (best of each), so that load from other jobs hits both sides alike.
    t_dj, t_np = np.inf, np.inf
    for _ in range(repeats):
        t_dj = min(t_dj, _best_of(lambda: jax.block_until_ready(gram(Xj)), 1))
        t_np = min(t_np, _best_of(lambda: X.T @ X, 1))
    # Accuracy of the same float32 result against float64 (max |error| / max |G|).
    X64 = X.astype(np.float64)
    mu = X64.mean(0)
    ref = (X64 - mu).T @ (X64 - mu) / n
    err = np.abs(np.asarray(gram(Xj))[:-1, :-1] - ref).max() / np.abs(ref).max()
    return {"t_dj": t_dj, "t_np": t_np, "ratio": t_np / t_dj, "err": float(err)}


def bench_jacobian(n, n_naive, batch, widths, repeats):
    import jax
    import jax.numpy as jnp

    import degenjax as dj

    module, variables, model = _mlp(widths)
    data = list(_batches(n, batch, widths[0]))

    def run():
        return jax.block_until_ready(dj.jacobian_grams(model, variables, data))

    run()  # compile
    t_dj = _best_of(run, repeats)

    # Naive baseline: one jitted jax.jacrev call per example and section, J^T J accumulated in NumPy.
    jacs = [jax.jit(jax.jacrev(lambda h, f=f: f(variables, h[None])[0])) for f in model.fns]
    x = data[0][:n_naive]
    _, acts = jax.jit(dj.forward, static_argnums=0)(model, variables, jnp.asarray(x))
    acts = [np.asarray(a) for a in acts]

    def naive():
        out = [np.zeros((a.shape[1], a.shape[1]), np.float32) for a in acts]
        for i in range(n_naive):
            for l, jac in enumerate(jacs):
                J = np.asarray(jac(acts[l][i]))
                out[l] += J.T @ J
        return out

    for l, jac in enumerate(jacs):
        jax.block_until_ready(jac(acts[l][0]))  # compile
    t_naive_subset = _best_of(naive, 1)
    t_naive = t_naive_subset * n / n_naive

    # Literal naive loop: jax.jacrev called eagerly per example (no jit), on a smaller subset.
    n_eager = max(1, n_naive // 10)

    def eager():
        for i in range(n_eager):
            for l, f in enumerate(model.fns):
                J = np.asarray(jax.jacrev(lambda h: f(variables, h[None])[0])(jnp.asarray(acts[l][i])))
                J.T @ J

    eager()  # warm the per-primitive caches
    t_eager = _best_of(eager, 1) * n / n_eager
    # Check both agree on the subset.
    ref = naive()
    got = dj.jacobian_grams(model, variables, x)
    err = max(float(np.abs(np.asarray(g) - r / n_naive).max() / np.abs(r / n_naive).max()) for g, r in zip(got, ref))
    return {"t_dj": t_dj, "t_naive": t_naive, "t_naive_subset": t_naive_subset, "ratio": t_naive / t_dj,
            "t_eager": t_eager, "n_eager": n_eager, "ratio_eager": t_eager / t_dj, "err": err}


def memory_child(n, batch, widths, target):
    """Runs in a fresh process: streams n examples through jacobian_grams and prints ru_maxrss (MiB)."""
    import jax

    import degenjax as dj

    module, variables, model = _mlp(widths)
    t0 = time.perf_counter()
    ms = dj.jacobian_grams(model, variables, _batches(n, batch, widths[0]), target=target)
    jax.block_until_ready(ms)
    dt = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    peak_dev = stats.get("peak_bytes_in_use", -(1 << 20)) / 2**20  # accelerators only; -1 where not reported
    print(f"RESULT {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} {dt:.2f} {peak_dev:.1f}")


def bench_memory(ns, batch, widths, target):
    out = {}
    for n in ns:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--batch", str(batch),
               "--widths", ",".join(map(str, widths)), "--memory-target", target]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
        rss, dt, peak_dev = map(float, line.split()[1:])
        out[n] = (rss, dt, peak_dev)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-act", type=int, default=200_000, help="samples for the activation Gram (a)")
    ap.add_argument("--d-act", type=int, default=256, help="feature size for (a)")
    ap.add_argument("--n-jac", type=int, default=2000, help="examples for the Jacobian Gram (b)")
    ap.add_argument("--n-naive", type=int, default=100, help="examples timed in the naive jacrev loop (b)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--widths", default="256,512,512,10")
    ap.add_argument("--memory-ns", default="10000,100000", help="n values for the peak-memory comparison (c)")
    ap.add_argument("--memory-target", default="output", choices=["next", "output"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-append", action="store_true", help="do not record the results (benchmarks/results.jsonl)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch, widths, args.memory_target)
        return

    import jax

    act = bench_activation(args.n_act, args.d_act, args.repeats)
    print(f"(a) activation Gram n={args.n_act} d={args.d_act} float32: degenjax {act['t_dj'] * 1e3:.1f} ms, "
          f"NumPy X.T@X {act['t_np'] * 1e3:.1f} ms, throughput ratio {act['ratio']:.2f}x (goal >= 0.8), "
          f"rel. error vs float64 {act['err']:.1e}")
    jac = bench_jacobian(args.n_jac, args.n_naive, args.batch, widths, args.repeats)
    print(f"(b) Jacobian Grams MLP {args.widths} n={args.n_jac}: degenjax {jac['t_dj']:.2f} s, naive jacrev loop "
          f"{jac['t_naive']:.1f} s (timed on {args.n_naive} examples: {jac['t_naive_subset']:.2f} s, scaled), "
          f"speed-up {jac['ratio']:.1f}x (goal >= 10), max rel. difference {jac['err']:.1e}")
    print(f"(b) vs an eager (un-jitted) jax.jacrev loop: {jac['t_eager']:.1f} s (timed on {jac['n_eager']} "
          f"examples, scaled), speed-up {jac['ratio_eager']:.1f}x")
    ns = [int(v) for v in args.memory_ns.split(",")]
    mem = bench_memory(ns, args.batch, widths, args.memory_target)
    for n, (rss, dt, peak_dev) in mem.items():
        dev = f", device peak {peak_dev:.0f} MiB" if peak_dev >= 0 else ""
        print(f"(c) jacobian_grams target={args.memory_target} n={n}: peak RSS {rss:.0f} MiB{dev}, {dt:.1f} s")
    if len(ns) >= 2:
        print(f"(c) peak memory ratio n={ns[-1]} / n={ns[0]}: {mem[ns[-1]][0] / mem[ns[0]][0]:.2f} (goal: 1)")

    if args.no_append:
        return
    devices = ", ".join(str(d) for d in jax.devices())
    cmd = " ".join([".venv/bin/python", "benchmarks/grams.py"] + sys.argv[1:])
    rows = [
        "| measurement | degenjax | baseline | ratio |",
        "|---|---|---|---|",
        f"| (a) activation Gram, n={args.n_act}, d={args.d_act}, float32 (rel. err vs float64 {act['err']:.1e}) | "
        f"{act['t_dj'] * 1e3:.1f} ms | NumPy `X.T @ X` {act['t_np'] * 1e3:.1f} ms | {act['ratio']:.2f}x |",
        f"| (b) Jacobian Grams (target=next, all layers), MLP {args.widths}, n={args.n_jac} | {jac['t_dj']:.2f} s | "
        f"per-example jitted `jax.jacrev` loop {jac['t_naive']:.1f} s (timed on {args.n_naive} examples, "
        f"scaled) | {jac['ratio']:.1f}x |",
        f"| (b') same, vs an eager (un-jitted) per-example `jax.jacrev` loop | {jac['t_dj']:.2f} s | "
        f"{jac['t_eager']:.1f} s (timed on {jac['n_eager']} examples, scaled) | {jac['ratio_eager']:.1f}x |",
    ]
    for n, (rss, dt, peak_dev) in mem.items():
        dev = f"; device peak {peak_dev:.0f} MiB" if peak_dev >= 0 else ""
        rows.append(f"| (c) peak memory, jacobian_grams target={args.memory_target}, n={n} (fresh process, "
                    f"{dt:.1f} s) | host RSS {rss:.0f} MiB{dev} | | |")
    if len(ns) >= 2:
        rows.append(f"| (c) peak RSS ratio n={ns[-1]} / n={ns[0]} | | | {mem[ns[-1]][0] / mem[ns[0]][0]:.2f} |")
    section = "\n".join([
        f"\n## grams ({datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared with other jobs); jax {jax.__version__}, devices: {devices}",
        f"- command: `{cmd}`",
        "",
        *rows,
        "",
    ])
    from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

    append_section(section, benchmark="grams")


if __name__ == "__main__":
    main()
