"""Benchmark: degenjax.eigh_topk vs full LAPACK eigh (NumPy, jax) vs jax's lobpcg_standard; per-device memory.

PSD test matrices with a known power-law spectrum lambda_i = (i + 1)^-alpha and dense eigenvectors:
A = H Lambda H^T with H a product of random Householder reflections (built in O(d^2); no solver exploits it).
Times are steady-state medians (compilation excluded and reported apart), measured side by side in one run.
Accuracy: max over the top k of |theta_i - lambda_i| / lambda_i against the exact lambda_i.
Memory: XLA memory_analysis() of the compiled program (arguments + outputs + temporaries, per device) with the
matrix row-sharded over 1/2/4/8 simulated CPU devices, for eigh_topk and for jnp.linalg.eigh (which gathers).

    .venv/bin/python benchmarks/eigen.py --sizes 2048 4096 --ks 16 64
    .venv/bin/python benchmarks/eigen.py --sizes 8192 16384 --ks 16 64 --memory-d 16384   # larger machines
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="matrix dimensions d")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64], help="numbers of leading eigenpairs")
    p.add_argument("--alpha", type=float, default=1.0, help="spectrum lambda_i = (i + 1)^-alpha")
    p.add_argument("--tol", type=float, default=1e-5, help="eigh_topk residual tolerance (relative to lambda_max)")
    p.add_argument("--oversample", type=int, default=None, help="eigh_topk oversampling p (default: p = k)")
    p.add_argument("--num-iters", type=int, default=300, help="iteration cap for eigh_topk and lobpcg")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median) for the fast methods")
    p.add_argument("--numpy-max-d", type=int, default=16384,
                   help="skip numpy.linalg.eigh for d above this (minutes at d=16384 on small CPUs)")
    p.add_argument("--jax-full-max-d", type=int, default=16384, help="skip jnp.linalg.eigh for d above this")
    p.add_argument("--no-lobpcg", action="store_true", help="skip jax.experimental.sparse.linalg.lobpcg_standard")
    p.add_argument("--memory-d", type=int, default=4096, help="d for the per-device memory table (0: skip)")
    p.add_argument("--memory-devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--results", default=None, help="record file: default benchmarks/results.jsonl (and the RESULTS.md "
                   "/ history.md views); another .jsonl (e.g. on a lent machine, to `_results.py ingest` later)")
    return p.parse_args()


ARGS = parse_args()
import jax  # noqa: E402

# Simulated CPU devices for the memory table (a compile-time measurement); timings use the default backend.
jax.config.update("jax_num_cpu_devices", max(ARGS.memory_devices))
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.experimental.sparse.linalg import lobpcg_standard  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import degenjax as dj  # noqa: E402


def test_matrix(d, alpha, seed=0, reflections=4):
    """A = H Lambda H^T, H = product of random Householder reflections; returns (A float64, exact spectrum)."""
    rng = np.random.default_rng(seed)
    lam = (np.arange(d) + 1.0) ** -alpha
    a = np.diag(lam)
    for _ in range(reflections):
        v = rng.standard_normal(d)
        v /= np.linalg.norm(v)
        av = a @ v
        a = a - 2.0 * np.outer(v, av) - 2.0 * np.outer(av, v) + 4.0 * (v @ av) * np.outer(v, v)
    return 0.5 * (a + a.T), lam


def timed(fn, repeats):
    """(median seconds, last output) over `repeats` calls, each blocked until ready."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def rel_err(values, lam, k):
    values = np.sort(np.asarray(values, np.float64))[::-1][:k]
    return float(np.max(np.abs(values - lam[:k]) / lam[:k]))


def bench_size(d, rows):
    a64, lam = test_matrix(d, ARGS.alpha)
    dtype = jnp.dtype(ARGS.dtype)
    a = jax.device_put(jnp.asarray(a64, dtype), jax.devices()[0])
    key = jax.random.key(0)
    base = {}

    def add(k, name, t, err, its, compile_s):
        ratios = [f"{t / base[b]:.3f}" if b in base else "-" for b in ("numpy", "jax")]
        rows.append((d, k, name, f"{t:.3f}", *ratios, f"{err:.1e}", its, compile_s))
        print(rows[-1], flush=True)

    def compiled(fn, *args):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return f"{time.perf_counter() - t0:.1f}"

    kmax = max(ARGS.ks)
    if d <= ARGS.numpy_max_d:
        np.linalg.eigh(np.eye(64))  # load LAPACK and start its threads outside the timing
        a_np = np.asarray(a64, ARGS.dtype)
        t, (w, _) = timed(lambda: np.linalg.eigh(a_np), ARGS.repeats if d <= 4096 else 1)
        base["numpy"] = t
        add("-", "numpy.linalg.eigh (full, LAPACK)", t, rel_err(w, lam, kmax), "-", "-")
    if d <= ARGS.jax_full_max_d:
        full = jax.jit(jnp.linalg.eigh)
        compile_s = compiled(full, a)
        t, (w, _) = timed(lambda: full(a), ARGS.repeats if d <= 4096 else 1)
        base["jax"] = t
        add("-", "jnp.linalg.eigh (full)", t, rel_err(w, lam, kmax), "-", compile_s)
    for k in ARGS.ks:
        p = k if ARGS.oversample is None else ARGS.oversample
        topk = jax.jit(lambda a, key, k=k, p=p: dj.eigh_topk(a, k, key=key, tol=ARGS.tol, oversample=p,
                                                               num_iters=ARGS.num_iters))
        compile_s = compiled(topk, a, key)
        t, res = timed(lambda: topk(a, key), ARGS.repeats)
        add(k, f"degenjax.eigh_topk (p={p}, tol={ARGS.tol:g})", t, rel_err(res.values, lam, k),
            int(res.iterations), compile_s)
        if not ARGS.no_lobpcg:
            x0 = jax.random.normal(jax.random.key(1), (d, k), dtype)
            # lobpcg stops when ||r|| < tol * 10 d (lambda + ||A v||) ~ 20 d tol lambda: rescale to our tolerance.
            lob = jax.jit(lambda a, x0: lobpcg_standard(a, x0, m=ARGS.num_iters, tol=ARGS.tol / (20.0 * d)))
            compile_s = compiled(lob, a, x0)
            t, (theta, _, its) = timed(lambda: lob(a, x0), ARGS.repeats)
            add(k, "jax lobpcg_standard", t, rel_err(theta, lam, k), int(its), compile_s)


def memory_table(d, k):
    """Per-device bytes (arguments + outputs + temporaries) of the compiled programs, in units of d^2 elements."""
    out = []
    itemsize = jnp.dtype(ARGS.dtype).itemsize
    key = jax.random.key(0)
    cpus = jax.devices("cpu")
    for n in ARGS.memory_devices:
        if n > len(cpus):
            continue
        row = [n, 1.0 / n]
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh((n,), ("x",), axis_types=(axis_type,), devices=cpus[:n])
            spec = jax.ShapeDtypeStruct((d, d), jnp.dtype(ARGS.dtype), sharding=NamedSharding(mesh, P("x", None)))
            solve = jax.jit(lambda a, key: dj.eigh_topk(a, k, key=key, tol=ARGS.tol, oversample=k, mesh=mesh))
            m = solve.lower(spec, key).compile().memory_analysis()
            row.append((m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                        - m.alias_size_in_bytes) / (d * d * itemsize))
        mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,), devices=cpus[:n])
        spec = jax.ShapeDtypeStruct((d, d), jnp.dtype(ARGS.dtype), sharding=NamedSharding(mesh, P("x", None)))
        m = jax.jit(jnp.linalg.eigh).lower(spec).compile().memory_analysis()
        row.append((m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes) / (d * d * itemsize))
        out.append(row)
        print(row, flush=True)
    return out


def main():
    devices = jax.devices()
    machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; " \
              f"jax {jax.__version__}, devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    print(machine, flush=True)
    rows = []
    for d in ARGS.sizes:
        bench_size(d, rows)
    mem = memory_table(ARGS.memory_d, min(ARGS.ks)) if ARGS.memory_d else []

    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    lines = [f"\n## eigen: eigh_topk vs full eigh vs lobpcg ({stamp})", "", f"- machine: {machine}",
             f"- command: `.venv/bin/python benchmarks/eigen.py {' '.join(sys.argv[1:])}`",
             f"- matrix: PSD, lambda_i = (i+1)^-{ARGS.alpha:g}, dense eigenvectors, {ARGS.dtype}; time = median "
             f"steady-state seconds ({ARGS.repeats} runs; 1 for full eigh above d = 4096); rel. err = max over top "
             "k of |theta_i - lambda_i| / lambda_i vs the exact spectrum (full eigh: over the top max(ks)).",
             "", "| d | k | method | time (s) | / numpy eigh | / jnp eigh | rel. err | iterations | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    if mem:
        lines += ["", f"Per-device memory (arguments + outputs + temporaries from `memory_analysis()`, in units of "
                  f"d^2 elements, d = {ARGS.memory_d}, k = p = {min(ARGS.ks)}), matrix row-sharded over n "
                  "simulated CPU devices:", "",
                  "| devices n | 1/n (ideal) | eigh_topk Explicit mesh | eigh_topk Auto mesh "
                  "| jnp.linalg.eigh (Auto mesh) |",
                  "|---|---|---|---|---|"]
        for n, ideal, ex, au, full in mem:
            lines.append(f"| {n} | {ideal:.3f} | {ex:.3f} | {au:.3f} | {full:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

    append_section(text, benchmark="eigen", results=ARGS.results)


if __name__ == "__main__":
    main()
