"""Where the first XLA compile of ``estimate_llc`` spends its time: the DLN program of ``benchmarks/llc.py``, compiled
once in this (fresh) process under ``jax.profiler``, its compiler trace events summed by name.

Run: ``python benchmarks/compile_profile.py [--compiler-options '{"xla_gpu_autotune_level": 0}'] [--mala-every 0]
[--warm-up]``. ``--warm-up`` first compiles a trivial program, so the difference to a run without it is the
process's one-time compiler start-up. Prints the compile time, the first run and the 30 longest event names; nothing
is written to RESULTS.md (diagnostics, not a benchmark).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compiler-options", default="{}", help="JSON dict for jax.jit(..., compiler_options=...)")
    p.add_argument("--mala-every", type=int, default=10)
    p.add_argument("--draws", type=int, default=10_000)
    p.add_argument("--warm-up", action="store_true", help="compile a trivial program first")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--eval-batch-size", type=int, default=None, help="estimate_llc(eval_batch_size=...)")
    p.add_argument("--threefry-kernel", action="store_true",
                   help="jax_threefry_gpu_kernel_lowering: threefry as one GPU kernel instead of HLO operations")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    if args.threefry_kernel:
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llc import _dln_problem

    import degenjax

    n = 100_000
    ws, x, y = _dln_problem([10, 20, 20, 10], 5, n, 1.0, 0)
    params = [jnp.asarray(w) for w in ws]
    data = (jnp.asarray(x), jnp.asarray(y))
    jax.block_until_ready((params, data))
    if args.warm_up:
        t0 = time.perf_counter()
        jax.jit(lambda v: jnp.sin(v) + 1.0).lower(data[0]).compile()
        print(f"warm-up: trivial program compiled in {time.perf_counter() - t0:.2f} s")

    def loss_fn(params, batch):
        h = batch[0]
        for w in params:
            h = h @ w.T
        return jnp.mean(jnp.square(h - batch[1]))

    def estimate(key, params, data):
        res = degenjax.estimate_llc(key, loss_fn, params, data, num_chains=4, num_draws=args.draws, step_size=1e-5,
                                    batch_size=500, nbeta=n / np.log(n), mala_every=args.mala_every,
                                    eval_batch_size=args.eval_batch_size)
        return res.llc_mean, res.llc_std

    options = json.loads(args.compiler_options) or None
    lowered = jax.jit(estimate, compiler_options=options).trace(jax.random.key(0), params, data).lower()
    trace_dir = tempfile.mkdtemp(prefix="degenjax-compile-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    t0 = time.perf_counter()
    llc = float(jax.block_until_ready(compiled(jax.random.key(0), params, data))[0])
    run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(jax.random.key(1), params, data))
    warm_s = time.perf_counter() - t0
    print(f"devices {jax.devices()}; compiler_options {options}; mala_every {args.mala_every}; threefry kernel "
          f"{args.threefry_kernel}; eval_batch_size {args.eval_batch_size}: XLA compile {compile_s:.2f} s, first run "
          f"{run_s:.2f} s, second {warm_s:.2f} s, "
          f"lambda^ {llc:.2f}")

    events = json.load(gzip.open(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                                           recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e.get("dur", 0) / 1e3
            count[e["name"]] += 1
    print("  key passes: " + ", ".join(f"{k} {total[k] / 1e3:.2f} s" for k in
                                       ("OptimizeHloModule", "priority-fusion", "config-assigner", "fusion")))
    for name, ms in total.most_common(args.top):
        print(f"{ms:9.1f} ms {count[name]:6d}x  {name[:120]}")


if __name__ == "__main__":
    main()
