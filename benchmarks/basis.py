"""Interaction basis benchmark: sparsity of LIB vs PCA vs random, and LIB + edges speed vs per-example jacrev.

Part 1 (sparsity table, issue 4 item 6): a one-layer transformer trained on modular addition (a fraction of the
pairs; held-out pairs for the ablation metric) and an MLP trained on scikit-learn's digits. For each basis kind:
the basis dimensions, a Lambda spectrum summary, the number of edges carrying 50/90/99% of the edge weight per
layer, and the edges required (bisection) to keep held-out accuracy within 0.001 when all other edges are ablated.

Part 2 (speed): the full LIB (activation stats, Jacobian Grams last layer first, bases) plus all edges with
degenjax, against the same maths written with a per-example ``jax.jacrev`` (``lax.scan`` over examples, one
Jacobian at a time), both jitted, same data, same machine; each timed after a warm-up run, so compile time is
excluded (it is printed separately). The two results are compared (Lambda and edges agree to float tolerance).

    .venv/bin/python benchmarks/basis.py                      # defaults sized for a few minutes on a small CPU
    .venv/bin/python benchmarks/basis.py --p 113 --steps 12000 --train-cache p113.msgpack --mlp-n 10000  # issue sizes
    .venv/bin/python benchmarks/basis.py --p 113 --train-cache .cache/p113-bias-train.msgpack --skip-sparsity \
        --gpt2-ns 2,4,8                                       # reference-convention rows and the GPT-2 row

Part 3 (the reference convention, issue 14): the p=113 transformer's LIB + edges as ApolloResearch rib computes them
(folded node layers, output edges), one call in a fresh process with compilation, and its peak memory. Part 4: a
GPT-2-small-shaped model (time per sample and peak memory against n).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import serialization  # noqa: E402

import degenjax as dj  # noqa: E402
from degenjax import models  # noqa: E402
from degenjax._src.basis import from_hat, layer_basis, to_hat  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# training


def _fit(loss, params, steps, lr, wd, chunk=500, cache=None, report=None, quiet=False):
    """AdamW, full batch, in jitted chunks of ``chunk`` steps. With ``cache`` (a path), the params, optimiser state
    and step count are written atomically after every chunk, and a rerun resumes from them."""
    opt = optax.adamw(lr, b1=0.9, b2=0.98, weight_decay=wd)

    @jax.jit
    def run(carry):
        def body(c, _):
            p, s = c
            l, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), l

        return jax.lax.scan(body, carry, None, length=chunk)

    carry, done, final = (params, opt.init(params)), 0, float("nan")
    if cache and os.path.exists(cache):
        state = serialization.msgpack_restore(open(cache, "rb").read())
        carry = serialization.from_state_dict(carry, state["carry"])
        done, final = int(state["step"]), float(state["loss"])
        if not quiet:
            print(f"  resumed from {cache} at step {done}", flush=True)
    total = max(chunk, steps // chunk * chunk)
    while done < total:
        carry, losses = run(carry)
        done, final = done + chunk, float(losses[-1])
        if cache:
            tmp = cache + ".tmp"
            with open(tmp, "wb") as f:
                f.write(serialization.msgpack_serialize({"carry": serialization.to_state_dict(carry), "step": done,
                                                         "loss": final}))
            os.replace(tmp, cache)
        if report is not None and report(done, final, carry[0]):
            break
    return carry[0], final, done


def train_modadd(p, frac, steps, seed=0, cache=None, stop_acc=None, use_bias=False, quiet=False):
    pairs = np.array([(a, b) for a in range(p) for b in range(p)])
    perm = np.random.default_rng(seed).permutation(len(pairs))
    n_tr = int(frac * len(pairs))
    x = models.one_hot_pairs(p, pairs)
    y = jnp.asarray((pairs[:, 0] + pairs[:, 1]) % p)
    tr, te = perm[:n_tr], perm[n_tr:]
    module = models.Transformer(vocab=p + 1, seq_len=3, d_model=128, num_heads=4, d_mlp=512, num_out=p,
                                use_bias=use_bias)
    v = module.init(jax.random.key(seed), x[:2])
    xtr, ytr = x[tr], y[tr]

    def loss(q):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply(q, xtr), ytr).mean()

    def report(step, train_loss, q):
        if step % 1000 == 0 and not quiet:
            acc = float(jnp.mean((jnp.argmax(module.apply(q, x[te]), -1) == y[te]).astype(jnp.float32)))
            print(f"  step {step}: train loss {train_loss:.2e}, held-out acc {acc:.3f}", flush=True)
            return stop_acc is not None and acc >= stop_acc
        return False

    v, final, done = _fit(loss, v, steps, 1e-3, 1.0, cache=cache, report=report, quiet=quiet)
    return module, v, x, y, tr, te, (final, done)


def train_digits(steps, hidden, seed=0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:1300], perm[1300:]
    module = models.MLP(features=(hidden, hidden, 10))
    v = module.init(jax.random.key(seed), X[:2])
    xtr, ytr = jnp.asarray(X[tr]), jnp.asarray(y[tr])

    def loss(q):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply(q, xtr), ytr).mean()

    v, final, _ = _fit(loss, v, steps, 3e-3, 1e-2, chunk=min(500, steps))
    return module, v, jnp.asarray(X), jnp.asarray(y), tr, te, final


# ---------------------------------------------------------------------------------------------------------------
# part 1: sparsity


def _accuracy(labels):
    return lambda out: jnp.mean((jnp.argmax(out, -1) == labels).astype(jnp.float32))


def sparsity_rows(name, model, params, x_fit, x_eval, y_eval, req_layers, batch):
    rows = []
    batches = [x_fit[i:i + batch] for i in range(0, x_fit.shape[0], batch)]
    for kind in ("lib", "pca", "random"):
        t0 = time.perf_counter()
        b = dj.interaction_basis(model, params, batches, kind=kind, key=jax.random.key(0))
        e = dj.interaction_edges(model, params, b, batches)
        sp = dj.edge_sparsity(e)
        req = dj.edges_required(model, params, b, e, x_eval, _accuracy(y_eval), tol=1e-3, layers=req_layers,
                                chunk_size=16, jit=True)
        dt = time.perf_counter() - t0
        lam = [np.asarray(l[1:]) for l in b.Lambda]
        spec = "; ".join(f"{l.max():.3g}..{l.min():.2g} ({int(np.sum(l > 1e-3 * l.max()))} > 1e-3 max)" for l in lam)
        counts = np.asarray(sp["counts"])
        for l in range(counts.shape[0]):
            r = next((q for q in req if q["layer"] == l), None)
            rows.append((name, kind, l, f"{b.dims[l]}->{b.dims[l + 1]}", int(sp["num_edges"][l]),
                         *[int(c) for c in counts[l]],
                         "-" if r is None else f"{r['required']} ({r['metric_full']:.4f})"))
        rows.append((name, kind, "spectra", "dims " + ",".join(map(str, b.dims)), spec, "", "", "",
                     f"{dt:.1f}s"))
        print(f"  {name} {kind}: dims {b.dims}, 90% counts {counts[:, 1].tolist()}, {dt:.1f}s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# part 2: speed vs per-example jacrev


def _scan_sum(fn, xs):
    """``sum_i fn(xs[i])``, one example at a time (``lax.scan`` with a running sum: no per-example stack)."""
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, xs[0]))
    return jax.lax.scan(lambda c, e: (jax.tree.map(jnp.add, c, fn(e)), None), zero, xs)[0]


def naive_lib_edges(model, params, x, dims, output=True):
    """The same maths with one ``jax.jacrev`` per example (``lax.scan``), float64 accumulation, on the model's own
    node layers (folded: the constant is differentiated and the target is the next layer's full C)."""
    L = len(model)
    fold = model.constant == "last"
    _, acts = dj.forward(model, params, x)
    Cs = [None] * L
    Cps = [None] * L
    lams = [None] * L
    for l in reversed(range(L)):
        h = acts[l]
        hf = jnp.reshape(h, (-1, h.shape[-1])).astype(jnp.float64)
        if fold:
            hf = hf[:, :-1]
        mu = jnp.mean(hf, axis=0)
        cov = (hf - mu[None]).T @ (hf - mu[None]) / hf.shape[0]
        Cn = None if l == L - 1 else Cs[l + 1]

        def g(he, l=l, Cn=Cn):
            y = model.fns[l](params, he[None])[0]
            return y if Cn is None else to_hat(y, Cn)

        def jtj(he, g=g):
            J = jax.jacrev(g)(he)  # (out..., positions..., d)
            J = jnp.reshape(J, (-1, he.shape[-1])).astype(jnp.float64)
            return J.T @ J

        M = _scan_sum(jtj, h) / hf.shape[0]
        Cs[l], Cps[l], lams[l] = layer_basis(cov, mu, M, keep=dims[l], jit=False)[:3]
    edges = []
    for l in range(L if output else L - 1):
        h = acts[l]
        d_in = h.shape[-1]

        def edge_ex(he, l=l, d_in=d_in):
            hh = to_hat(he, Cs[l])

            def fh(hh):
                y = model.fns[l](params, from_hat(hh, Cps[l], d_in)[None])[0]
                return y if l + 1 == L else to_hat(y, Cs[l + 1])

            J = jax.jacrev(fh)(hh)  # (P_out.., d_{l+1}, P_in.., d^_l)
            d_next = J.shape[J.ndim - hh.ndim - 1]  # the last output axis: features
            J = jnp.reshape(J, (-1, d_next, hh.size // hh.shape[-1], hh.shape[-1]))
            a = jnp.einsum("tisj,sj->tij", J, jnp.reshape(hh, (-1, hh.shape[-1]))).astype(jnp.float64)
            return jnp.sum(a * a, axis=0)

        P = h.size // (h.shape[0] * h.shape[-1])
        edges.append(_scan_sum(edge_ex, h) / (h.shape[0] * P))
    return lams, edges


def fast_lib_edges(model, params, x, dims, batch, structured=True, output=True):
    batches = [x[i:i + batch] for i in range(0, x.shape[0], batch)]
    b = dj.interaction_basis(model, params, batches, dims=dims, jacobian_kwargs={"structured": structured})
    return list(b.Lambda), dj.interaction_edges(model, params, b, batches, structured=structured, output=output)


def _block(tree):
    return jax.tree.map(lambda a: a.block_until_ready(), tree)


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_pair(name, model, params, x, batch, output=True, repeats=3, baselines=("per-example", "jacrev")):
    dims0 = dj.interaction_basis(model, params, [x[i:i + batch] for i in range(0, x.shape[0], batch)]).dims
    dims = tuple(d - 1 for d in dims0)
    fast = jax.jit(lambda q, xx: fast_lib_edges(model, q, xx, dims, batch, output=output))
    generic = jax.jit(lambda q, xx: fast_lib_edges(model, q, xx, dims, batch, structured=False, output=output))
    naive = jax.jit(lambda q, xx: naive_lib_edges(model, q, xx, dims, output=output))
    structured = "".join("s" if f else "-" for f in dj.structured_sections(model, params, x[:2]))
    out, cpu, loads = {}, {}, []
    for label, fn in (("degenjax", fast), ("per-example", generic), ("jacrev", naive)):
        if label != "degenjax" and label not in baselines:
            out[label], cpu[label] = (float("nan"), float("nan"), None), float("nan")
            continue
        t0 = time.perf_counter()
        res = _block(fn(params, x))
        first = time.perf_counter() - t0
        warm, warm_cpu = [], []
        for _ in range(repeats if label == "degenjax" else 1):
            loads.append(os.getloadavg()[0])
            t0, c0 = time.perf_counter(), _cpu()
            res = _block(fn(params, x))
            warm.append(time.perf_counter() - t0)
            warm_cpu.append(_cpu() - c0)
        out[label] = (first, float(np.median(warm)), res)
        cpu[label] = float(np.median(warm_cpu))
        print(f"  {name} {label}: first call {first:.2f}s, warm {out[label][1]:.3f}s, process CPU {cpu[label]:.2f}s "
              f"(median of {len(warm)}; load {loads[-1]:.1f})", flush=True)
    (lf, ef), ref = out["degenjax"][2], out["jacrev"][2]
    ln, en = ref if ref is not None else (lf, ef)
    agree = float("nan") if ref is None else max(max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c))) for a, c in zip(lf, ln)),
                max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c))) for a, c in zip(ef, en)))
    return (name, x.shape[0], "dims " + ",".join(map(str, dims0)), structured, f"{out['degenjax'][1]:.3f}",
            f"{out['per-example'][1]:.3f}", f"{out['jacrev'][1]:.3f}",
            f"**{out['jacrev'][1] / out['degenjax'][1]:.1f}x**",
            " / ".join(f"{cpu[k]:.2f}" for k in ("degenjax", "per-example", "jacrev")),
            f"**{cpu['jacrev'] / cpu['degenjax']:.1f}x** / {cpu['per-example'] / cpu['degenjax']:.1f}x",
            f"{out['degenjax'][0]:.1f} / {out['per-example'][0]:.1f} / {out['jacrev'][0]:.1f}", f"{agree:.1e}",
            f"{min(loads):.1f}-{max(loads):.1f}")


# ---------------------------------------------------------------------------------------------------------------
# the reference (rib) convention: one call in a fresh process (compile included), peak memory


def reference_sections(module, v, x):
    """The mod-add transformer as rib analyses it: folded residual-stream node layers before attention, the MLP and
    the unembedding (biases tied to the constant), with the embedded inputs as batches."""
    ts = models.transformer_sections(module, x[:2])
    res = dj.forward(ts, v, x)[1][1]
    return dj.Sections(ts.fns[1:], names=ts.names[1:], constant="last"), res


def first_call_main(args):
    """Runs in a fresh process: the one-call LIB + edges (+ output edges) and its peak memory."""
    module, v, x, y, tr, te, _ = train_modadd(args.p, args.frac, args.steps, cache=args.train_cache,
                                              use_bias=not args.no_bias, quiet=True)
    model, res = reference_sections(module, v, x[tr])
    res = jax.block_until_ready(jnp.asarray(res, jnp.float64))
    v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kw = {} if args.rib_cut is False else {"rtol": 0.0, "atol": 1e-15}
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), _cpu()
    b = dj.interaction_basis(model, v, [res], **kw)
    e = dj.interaction_edges(model, v, b, [res], output=True)
    _block(e)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_gib": rss / 2**20, "rss_before_gib": rss0 / 2**20,
                      "load": load, "load_end": os.getloadavg()[0],
                      "dims": list(b.dims), "lambda0": [float(l[0]) for l in b.Lambda],
                      "edge00": [float(a[0, 0]) for a in e[:-1]]}))


def gpt2_main(args):
    """Runs in a fresh process: LIB + edges of a GPT-2-small-shaped model on n random token sequences."""
    cfg = models.GPT2Config(n_layer=args.gpt2_layers, n_positions=max(64, args.gpt2_context))
    mod = models.GPT2(cfg, param_dtype=jnp.float64)
    v = mod.init(jax.random.key(0), jnp.zeros((1, args.gpt2_context), jnp.int32))
    ids = jax.random.randint(jax.random.key(1), (args.gpt2_n, args.gpt2_context), 0, cfg.vocab_size)
    model = models.gpt2_sections(cfg)
    batches = [models.gpt2_embed(v, ids[i:i + args.gpt2_batch]) for i in range(0, args.gpt2_n, args.gpt2_batch)]
    _block(batches)
    flags = dj.structured_sections(model, v, batches[0][:1])
    load = os.getloadavg()[0]

    def call():
        t0, c0 = time.perf_counter(), _cpu()
        b = dj.interaction_basis(model, v, batches, jacobian_kwargs={"chunk_size": args.gpt2_chunk})
        _block(b.Lambda)
        t1 = time.perf_counter()
        e = dj.interaction_edges(model, v, b, batches, chunk_size=32)
        _block(e)
        return b, time.perf_counter() - t0, t1 - t0, _cpu() - c0

    b, wall, basis_s, cpu = call()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    row = {"n": args.gpt2_n, "wall": wall, "basis": basis_s, "cpu": cpu, "peak_rss_gib": rss / 2**20,
           "load": load, "load_end": os.getloadavg()[0], "dims": list(b.dims),
           "structured": "".join("s" if f else "-" for f in flags), "device": f"{dev.platform}:{dev.device_kind}"}
    if stats:  # accelerator memory: the peak of the allocator over the process (model, data and the call)
        row["peak_device_gib"] = stats.get("peak_bytes_in_use", float("nan")) / 2**30
    if args.gpt2_warm:  # a second call, compiled: the time per sample without compilation
        row["warm"] = call()[1]
    print(json.dumps(row))


def _subprocess(argv):
    out = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"subprocess {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=23, help="modulus of the modular-addition transformer (issue: 113)")
    ap.add_argument("--frac", type=float, default=0.3, help="fraction of pairs used for training")
    ap.add_argument("--steps", type=int, default=1000, help="AdamW steps for the transformer")
    ap.add_argument("--digits-hidden", type=int, default=64)
    ap.add_argument("--digits-steps", type=int, default=500)
    ap.add_argument("--req-n", type=int, default=1000, help="held-out examples for edges_required")
    ap.add_argument("--mlp-n", type=int, default=1000, help="samples for the 784-512-512-10 timing (issue: 10000)")
    ap.add_argument("--mlp-width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1000, help="batch size of the streamed degenjax computation")
    ap.add_argument("--train-cache", default=None,
                    help="file for the transformer's training state: written after every 500 steps, resumed from")
    ap.add_argument("--stop-acc", type=float, default=None,
                    help="stop training early once held-out accuracy reaches this (checked every 1000 steps)")
    ap.add_argument("--no-bias", action="store_true",
                    help="train the transformer without attention/unembedding biases (default: biases, as rib's)")
    ap.add_argument("--rib-cut", action="store_true",
                    help="reference rows with rib's truncation (rtol=0, atol=1e-15) instead of degenjax's default")
    ap.add_argument("--skip-sparsity", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="skip the fresh-process first-call measurement")
    ap.add_argument("--repeats", type=int, default=3, help="warm repeats of the degenjax timing (median)")
    ap.add_argument("--baselines", default="per-example,jacrev",
                    help="comma-separated baselines timed beside degenjax: per-example (degenjax with structured=False) "
                    "and/or jacrev (the same maths with one jax.jacrev per example; needed for the agreement column)")
    ap.add_argument("--gpt2-ns", default="", help="comma-separated sample counts for the GPT-2-small-shaped row "
                    "(empty: skip), each in a fresh process")
    ap.add_argument("--gpt2-context", type=int, default=4, help="tokens per sample in the GPT-2 row")
    ap.add_argument("--gpt2-layers", type=int, default=1, help="blocks of the GPT-2-small-shaped model")
    ap.add_argument("--gpt2-batch", type=int, default=2, help="samples per streamed batch in the GPT-2 row")
    ap.add_argument("--gpt2-chunk", type=int, default=1, help="examples per vmapped chunk of the per-example "
                    "Jacobian Grams in the GPT-2 row (LayerNorm sections)")
    ap.add_argument("--gpt2-warm", action="store_true", help="GPT-2 row: time a second (compiled) call too")
    ap.add_argument("--cache-rows", action="store_true", help="reference rows also with the on-disk compilation "
                    "cache (degenjax.enable_compilation_cache) filled by an earlier process")
    ap.add_argument("--compile-cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpt2-n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-results", action="store_true", help="do not record the run (benchmarks/results.jsonl -> RESULTS.md)")
    args = ap.parse_args(argv)
    if args.first_call_only:
        args.rib_cut = bool(args.rib_cut)
        if args.compile_cache:
            dj.enable_compilation_cache(args.compile_cache)
        return first_call_main(args)
    if args.gpt2_n:
        return gpt2_main(args)

    sp_rows, t_rows, ref_rows, g_rows, notes = [], [], [], [], []
    t_start = time.perf_counter()
    load = os.getloadavg()
    if not (args.skip_sparsity and args.skip_timing and args.skip_reference):  # the GPT-2 rows alone need no training
        print("training the modular-addition transformer ...", flush=True)
        module, v, x, y, tr, te, (final, trained) = train_modadd(args.p, args.frac, args.steps, cache=args.train_cache,
                                                                 stop_acc=args.stop_acc, use_bias=not args.no_bias)
        acc_tr = float(_accuracy(y[tr])(module.apply(v, x[tr])))
        acc_te = float(_accuracy(y[te])(module.apply(v, x[te])))
        notes.append(f"mod-add transformer p={args.p}: {len(tr)} training pairs ({args.frac:.0%}), {trained} AdamW "
                     f"steps (lr 1e-3, wd 1.0), d_model 128, 4 heads, d_mlp 512, biases "
                     f"{'none in attention' if args.no_bias else 'everywhere (as rib)'}; train loss {final:.2e}, train "
                     f"acc {acc_tr:.3f}, held-out acc {acc_te:.3f}")
        print("  " + notes[-1], flush=True)
        tmodel = models.transformer_sections(module, x[:2])
    if not args.skip_reference:
        print("the reference convention: one call in a fresh process ...", flush=True)
        fc_args = ["--first-call-only", "--p", str(args.p), "--frac", str(args.frac), "--steps", str(trained)]
        fc_args += ["--no-bias"] if args.no_bias else []
        fc_args += ["--train-cache", args.train_cache] if args.train_cache else []
        fc_args += ["--rib-cut"] if args.rib_cut else []
        variants = [("", fc_args)]
        if args.cache_rows:  # a fresh process whose on-disk compilation cache an earlier process filled
            cache_dir = tempfile.mkdtemp(prefix="degenjax-basis-cache-")
            _subprocess(fc_args + ["--compile-cache", cache_dir])  # fills the cache (not timed)
            variants.append((", compilation cache filled by an earlier process", fc_args + ["--compile-cache",
                                                                                           cache_dir]))
        for label, fa in variants:
            runs = [_subprocess(fa) for _ in range(args.repeats)]
            for r in runs:
                print(f"  first call{label}: {r}", flush=True)
            walls = sorted(r["wall"] for r in runs)
            ref_rows.append((f"modadd p={args.p}, folded, 3 node layers + output{label}", len(tr),
                             "dims " + ",".join(map(str, runs[0]["dims"])),
                             " / ".join(f"{w:.2f}" for w in walls), f"{np.median(walls):.2f}",
                             " / ".join(f"{r['cpu']:.1f}" for r in runs),
                             f"{max(r['peak_rss_gib'] for r in runs):.2f}", f"{runs[0]['rss_before_gib']:.2f}",
                             " / ".join(f"{r['load']:.1f}-{r['load_end']:.1f}" for r in runs)))
    if not args.skip_sparsity:
        te_sub = te[: args.req_n]
        sp_rows += sparsity_rows(f"modadd p={args.p}", tmodel, v, x[tr], x[te_sub], y[te_sub], None, args.batch)
        print("training the digits MLP ...", flush=True)
        dmod, dv, X, Y, dtr, dte, dfinal = train_digits(args.digits_steps, args.digits_hidden)
        dacc = float(_accuracy(Y[dte])(dmod.apply(dv, X[dte])))
        notes.append(f"digits MLP 64-{args.digits_hidden}-{args.digits_hidden}-10: 1300 training images, "
                     f"{args.digits_steps} AdamW steps; held-out acc {dacc:.3f} on {len(dte)} images")
        print("  " + notes[-1], flush=True)
        sp_rows += sparsity_rows("digits MLP", models.mlp_sections(dmod, X[:2]), dv, X[dtr], X[dte], Y[dte], None,
                                 args.batch)
    if not args.skip_timing:
        print("timing LIB + edges vs per-example jacrev ...", flush=True)
        rmodel, res = reference_sections(module, v, x[tr])
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
        t_rows.append(time_pair(f"modadd p={args.p} transformer (reference convention)", rmodel, v64,
                                jnp.asarray(res, jnp.float64), res.shape[0], repeats=args.repeats,
                                baselines=tuple(args.baselines.split(","))))
        w = args.mlp_width
        mlp = models.MLP(features=(w, w, 10))
        xm = jax.random.normal(jax.random.key(3), (args.mlp_n, 784), jnp.float32)
        mv = mlp.init(jax.random.key(4), xm[:2])
        t_rows.append(time_pair(f"MLP 784-{w}-{w}-10 (random data, folded)", models.mlp_sections(mlp, xm[:2]), mv,
                                xm, args.batch, repeats=args.repeats, baselines=tuple(args.baselines.split(","))))
    for n in [int(a) for a in args.gpt2_ns.split(",") if a.strip()]:
        print(f"GPT-2-small-shaped, n={n} ...", flush=True)
        r = _subprocess(["--gpt2-n", str(n), "--gpt2-context", str(args.gpt2_context), "--gpt2-layers",
                         str(args.gpt2_layers), "--gpt2-batch", str(args.gpt2_batch), "--gpt2-chunk",
                         str(args.gpt2_chunk)] + (["--gpt2-warm"] if args.gpt2_warm else []))
        print(f"  {r}", flush=True)
        warm = r.get("warm")
        g_rows.append((n, args.gpt2_context, args.gpt2_layers, r["structured"], r["device"], f"{r['wall']:.1f}",
                       f"{r['basis']:.1f}", f"{r['wall'] / n:.2f}",
                       "-" if warm is None else f"{warm:.2f} ({warm / n:.3f})", f"{r['cpu']:.1f}",
                       f"{r['cpu'] / n:.2f}", f"{r['peak_rss_gib']:.2f}",
                       f"{r['peak_device_gib']:.2f}" if "peak_device_gib" in r else "-",
                       f"{r['load']:.1f} / {r['load_end']:.1f}"))
    if g_rows and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        notes.append("GPT-2 rows: a persistent compilation cache (JAX_COMPILATION_CACHE_DIR) was shared between their "
                     "processes, so the first call of a later row compiles little; the second-call column is "
                     "compiled in every row")
    notes.append(f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min; "
                 f"{os.cpu_count()} cores shared with other jobs), at the end: {os.getloadavg()[0]:.2f}")

    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    cmd = "python benchmarks/basis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = [f"\n## basis: interaction-basis sparsity and LIB + edges speed ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})",
               "", f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs; jax {jax.__version__} devices: {len(jax.devices())} x {devices}",
               f"- command: `{cmd.strip()}`", *[f"- {n}" for n in notes],
               f"- total wall time {time.perf_counter() - t_start:.0f}s", ""]
    if sp_rows:
        section += ["Edges per layer (constant node excluded) carrying 50/90/99% of the edge weight, and edges "
                    "required (bisection) to keep held-out accuracy within 0.001 with all other edges of that layer "
                    "mean-ablated (accuracy with all edges in brackets). `spectra` rows: Lambda range per node "
                    "layer and how many Lambda exceed 1e-3 of the layer's largest; last column the time for basis + "
                    "edges + ablations.", "",
                    _table(("model", "kind", "layer", "dims", "edges", "50%", "90%", "99%", "required @ acc-0.001"),
                           sp_rows), ""]
    if ref_rows:
        section += ["The reference (ApolloResearch rib) convention, float64: folded node layers (the residual stream "
                    "before attention, the MLP and the unembedding, biases tied to the constant), Lambda_0 = M~_00, "
                    "the next layer's full C as target, and the last node layer -> raw output edges. One call of "
                    "`interaction_basis` + `interaction_edges(output=True)` in a fresh Python process (compilation "
                    "included), on one batch of all training pairs; repeats are separate processes (with --cache-rows also "
                    "fresh processes that load the compiled programs from an on-disk cache an earlier process filled, "
                    "`degenjax.enable_compilation_cache`). Peak memory = "
                    "the process's peak RSS (before the call: the model, data and JAX runtime).", "",
                    _table(("model", "N", "LIB dims", "first call, each (s)", "median (s)", "CPU time (s)",
                            "peak RSS (GiB)", "RSS before the call (GiB)", "load (1 min) at start-end, each"),
                           ref_rows), ""]
    if t_rows:
        section += ["Full LIB (stats, Jacobian Grams, bases) + all edges including the output edges, float64 "
                    "accumulation, warm (compiled) times in seconds, all under `jax.jit` (degenjax: median of the "
                    "repeats). `degenjax` = the default (sections marked `s` in the `fast path` column take the exact "
                    "structured Jacobians: affine-elementwise sections and softmax attention; the others `vmap` of "
                    "`jvp`/`vjp`); `per-example` = degenjax with `structured=False`; `jacrev` = the same maths with one "
                    "`jax.jacrev` per example (`lax.scan` with a running sum). Speed-up = jacrev / degenjax. First "
                    "call includes compilation. Agreement = max relative difference of Lambda and edges, degenjax vs "
                    "jacrev.", "",
                    _table(("model", "N", "LIB dims", "fast path", "degenjax (s)", "per-example (s)", "jacrev (s)",
                            "speed-up", "process CPU degenjax / per-example / jacrev (s)",
                            "CPU speed-up vs jacrev / vs per-example", "first call incl. compile (s)", "agreement",
                            "load (1 min) during the warm calls"), t_rows), ""]
    if g_rows:
        section += ["GPT-2-small-shaped (d_model 768, 12 heads, d_mlp 3072, vocab 50257; random init, float64) with "
                    "the blocks and context given: LIB of every residual-stream node layer + edges between "
                    "them, each n in a fresh process (compilation included). Sections marked `-` (LayerNorm inside) "
                    "take the per-example path; the unembedding is structured.", "",
                    _table(("samples n", "context", "blocks", "fast path", "device", "wall (s)", "of which basis (s)",
                            "wall per sample (s)", "second call, compiled (s) (per sample)", "process CPU (s)",
                            "CPU per sample (s)", "peak RSS (GiB)", "peak device memory (GiB)",
                            "load (1 min) at start / end"), g_rows), ""]
    text = "\n".join(section) + "\n"
    print(text)
    if not args.no_results:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

        append_section(text, benchmark="basis")


if __name__ == "__main__":
    main()
