"""Modularity study (issue 6, item 5) and timings of the degeneracy / modularity tools.

The study: a composite regression task made of two independent sub-tasks (y_a depends only on x_a, y_b only on x_b),
learned by (a) a ReLU MLP made of two sub-networks with no connections between them (block-diagonal weight masks)
and (b) the same architecture fully connected. For each we report the effective parameter count N_eff = 2 lambda^
(LLC, mean and standard error over chains), the degeneracy report (free directions) and the modularity Q of the LIB
interaction graph. The seed paper's heuristic predicts (a) is more degenerate (lower LLC) and more modular.

Timings (side by side, same machine, same work): `synchronized_neurons` (streamed, jitted) against NumPy's
``np.unique`` on the full boolean (points x units) pattern matrix; `find_modules` with Leiden against Louvain.

Run: ``.venv/bin/python benchmarks/modularity.py`` (flags for sizes: ``--help``). Prints the tables and records
them in benchmarks/results.jsonl (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import degenjax as dj  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# the study


def make_task(teacher_key, data_key, n: int, k_in: int, k_out: int, teacher_width: int = 4, noise: float = 0.1):
    """Inputs ``x = (x_a, x_b)`` (``2 k_in``), targets ``y = (g_a(x_a), g_b(x_b))`` (``2 k_out``) + noise.

    Each ``g`` is an independent random one-hidden-layer ReLU teacher of width ``teacher_width`` (fixed by
    ``teacher_key``); ``data_key`` draws the inputs and the noise.
    """
    ks = jax.random.split(teacher_key, 2)
    kx, kn = jax.random.split(data_key)
    x = jax.random.normal(kx, (n, 2 * k_in))

    def teacher(k, xs):
        k1, k2 = jax.random.split(k)
        a = jax.random.normal(k1, (k_in, teacher_width)) / np.sqrt(k_in)
        b = jax.random.normal(k2, (teacher_width, k_out)) / np.sqrt(teacher_width)
        return jax.nn.relu(xs @ a) @ b

    y = jnp.concatenate([teacher(ks[0], x[:, :k_in]), teacher(ks[1], x[:, k_in:])], axis=1)
    return x, y + noise * jax.random.normal(kn, y.shape)


def masks(k_in: int, hidden: int, k_out: int, modular: bool):
    """Weight masks of the three dense layers: block-diagonal (two sub-networks) or all ones."""
    def block(r, c):
        if not modular:
            return np.ones((2 * r, 2 * c))
        m = np.zeros((2 * r, 2 * c))
        m[:r, :c] = 1.0
        m[r:, c:] = 1.0
        return m

    return tuple(jnp.asarray(m) for m in (block(k_in, hidden), block(hidden, hidden), block(hidden, k_out)))


def make_model():
    """Sections x -> h1 -> h2 -> y of a ReLU MLP; weights are multiplied by the masks ``p["masks"]``.

    The masks travel in the params (not in a closure), so one compiled function serves both architectures; the
    sampler only moves the trainable entries (see `llc_fn`).
    """
    def dense(l, relu):
        def f(p, h):
            z = h @ (p[f"W{l}"] * p["masks"][l]) + p[f"b{l}"][None, :]
            return jax.nn.relu(z) if relu else z
        return f

    return dj.Sections((dense(0, True), dense(1, True), dense(2, False)), names=("x", "h1", "h2"))


MODEL = make_model()


def init_params(key, ms):
    ks = jax.random.split(key, 3)
    return {**{f"W{l}": jax.random.normal(ks[l], m.shape) / np.sqrt(m.sum(0).max()) for l, m in enumerate(ms)},
            **{f"b{l}": jnp.zeros((m.shape[1],)) for l, m in enumerate(ms)}}


def loss_with_masks(ms):
    """``loss(trainable_params, (x, y))``: half the mean squared error of the masked network."""
    def loss_fn(p, batch):
        xb, yb = batch
        out = dj.forward(MODEL, {**p, "masks": ms}, xb)[0]
        return 0.5 * jnp.mean(jnp.sum(jnp.square(out - yb), axis=1))
    return loss_fn


def make_trainer(steps: int, lr: float):
    opt = optax.adam(lr)

    @jax.jit
    def run(params, ms, x, y):
        loss_fn = loss_with_masks(ms)

        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, (x, y))
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        # zero the masked entries so that the reported weights are those of the architecture
        p = {k: (v * ms[int(k[1])] if k.startswith("W") else v) for k, v in p.items()}
        return p, losses

    return run


def make_llc(*, chains: int, draws: int, burnin: int, step_size: float, mala_every: int = 10):
    @jax.jit
    def llc_fn(key, params, ms, x, y):
        return dj.estimate_llc(key, loss_with_masks(ms), params, (x, y), num_chains=chains, num_draws=draws,
                               num_burnin=burnin, step_size=step_size, batch_size=x.shape[0],
                               mala_every=mala_every, warn=False)
    return llc_fn


_report = jax.jit(lambda p, xs: dj.degeneracy_report(MODEL, p, xs))


def neuron_basis(dims):
    """The neuron basis as an `InteractionBasis` (``h^ = [1, h]``), for the interaction graph of the raw units."""
    C, Cp = [], []
    for d in dims:
        c = np.zeros((d + 1, d + 1))
        c[d, 0] = 1.0
        c[:d, 1:] = np.eye(d)
        C.append(jnp.asarray(c))
        Cp.append(jnp.asarray(c.T))
    z = tuple(jnp.zeros((d + 1,)) for d in dims)
    return dj.InteractionBasis(C=tuple(C), C_pinv=tuple(Cp), Lambda=z, mean=tuple(jnp.zeros((d,)) for d in dims),
                               dims=tuple(d + 1 for d in dims), gram_spectrum=z, interaction_spectrum=z,
                               num_dropped_gram=(0,) * len(dims), num_dropped_interaction=(0,) * len(dims))


def study_one(seed: int, modular: bool, *, n: int, k_in: int, k_out: int, hidden: int, trainer, llc_fn,
              num_null: int):
    """Trains one network and measures N_eff, the degeneracy report and Q. Returns a dict of results."""
    key = jax.random.key(seed)
    k_task, k_init, k_llc, k_train, k_test = jax.random.split(key, 5)
    x, y = make_task(k_task, k_train, n, k_in, k_out)
    xt, yt = make_task(k_task, k_test, n, k_in, k_out)  # same teachers, fresh inputs
    ms = masks(k_in, hidden, k_out, modular)
    params, losses = trainer(init_params(k_init, ms), ms, x, y)
    loss_fn = loss_with_masks(ms)
    counts = tuple(int(m.sum()) + m.shape[1] for m in ms)
    full = {**params, "masks": ms}

    llc = llc_fn(k_llc, params, ms, x, y)
    n_eff, n_eff_std = dj.effective_parameter_count(llc)
    # nominal counts are static metadata: one compiled report for both architectures, counts filled in after
    rep = dataclasses.replace(_report(full, x), num_params=counts)
    basis = dj.interaction_basis(MODEL, full, x, kind="lib")
    edges = dj.interaction_edges(MODEL, full, basis, x)
    mods = dj.find_modules(edges, seed=seed, num_null=num_null)
    neuron_edges = dj.interaction_edges(MODEL, full, neuron_basis((2 * k_in, 2 * hidden, 2 * hidden)), x)
    neuron_mods = dj.find_modules(neuron_edges, seed=seed, num_null=num_null)
    return {
        "seed": seed, "arch": "(a) two sub-networks" if modular else "(b) fully connected",
        "num_params": sum(counts), "train_loss": float(loss_fn(params, (x, y))),
        "test_loss": float(loss_fn(params, (xt, yt))), "n_eff": float(n_eff),
        "n_eff_se": float(n_eff_std) / np.sqrt(llc.llc_per_chain.shape[0]), "mala": float(llc.mala_acceptance),
        "report": rep, "free": rep.totals(), "modules": mods, "edges": edges, "neuron_modules": neuron_mods,
        "neuron_edges": neuron_edges, "basis": basis, "params": full, "losses": np.asarray(losses),
    }


def study(args) -> list[dict]:
    trainer = make_trainer(args.steps, args.lr)
    llc_fn = make_llc(chains=args.chains, draws=args.draws, burnin=args.burnin, step_size=args.step_size)
    out = []
    for seed in range(args.seeds):
        for modular in (True, False):
            t = time.perf_counter()
            r = study_one(seed, modular, n=args.n, k_in=args.k_in, k_out=args.k_out, hidden=args.hidden,
                          trainer=trainer, llc_fn=llc_fn, num_null=args.num_null)
            r["seconds"] = time.perf_counter() - t
            out.append(r)
            m = r["modules"]
            print(f"seed {seed} {r['arch']}: N_eff {r['n_eff']:.1f} +- {r['n_eff_se']:.1f}, "
                  f"Q(LIB) {m.partition_modularity:.3f} (null {np.mean(m.null_modularity):.3f}, significant: "
                  f"{m.significant}), Q(neurons) {r['neuron_modules'].modularity:.3f} ({r['seconds']:.1f} s)",
                  flush=True)
    return out


def study_table(rows: list[dict]) -> str:
    head = ("| seed | architecture | params | train loss | test loss | N_eff (+- SE) | N_eff / params | MALA acc. "
            "| free: act. | jac. | sync | always-on | dead | sum | LIB modules | Q LIB (null mean) "
            "| neuron modules | Q neurons (null mean) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        f, m, nm = r["free"], r["modules"], r["neuron_modules"]
        lines.append(
            f"| {r['seed']} | {r['arch']} | {r['num_params']} | {r['train_loss']:.4f} | {r['test_loss']:.4f} "
            f"| {r['n_eff']:.1f} +- {r['n_eff_se']:.1f} | {r['n_eff'] / r['num_params']:.3f} | {r['mala']:.2f} "
            f"| {f['activation_free']} | {f['jacobian_free']} | {f['sync_free']} | {f['always_on_free']} "
            f"| {f['dead_free']} | {f['free']} | {m.num_modules} | {m.partition_modularity:.3f} "
            f"({np.mean(m.null_modularity) if m.null_modularity.size else float('nan'):.3f}) "
            f"| {nm.num_modules} | {nm.partition_modularity:.3f} "
            f"({np.mean(nm.null_modularity) if nm.null_modularity.size else float('nan'):.3f}) |")
    return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# timings


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def timings(args) -> str:
    rng = np.random.default_rng(0)
    n, d, nb = args.sync_points, args.sync_units, 8
    z = rng.normal(size=(n, d))
    z[:, 1::7] = z[:, 0:1]  # planted groups, so both sides do the same grouping work
    batches = [jnp.asarray(b) for b in np.split(z, nb)]
    acc = dj.sync_accumulator(d)

    @jax.jit
    def ours(bs):
        state, _ = jax.lax.scan(lambda s, b: (acc.update(s, b), None), acc.init(), bs)
        return acc.result(state)

    stacked = jnp.stack(batches)
    ours(stacked)  # compile

    def numpy_ref():
        on = z > 0
        _, inv = np.unique(on.T, axis=0, return_inverse=True)
        return inv

    r = ours(stacked)
    ref_groups = {}
    for u, g in enumerate(np.ravel(numpy_ref())):
        ref_groups.setdefault(int(g), []).append(u)
    assert r.groups == sorted(g for g in ref_groups.values() if len(g) >= 2), "sync groups disagree with NumPy"
    t_ours, t_np = _best(lambda: ours(stacked)), _best(numpy_ref)

    e_rng = np.random.default_rng(1)
    k, size = 4, args.graph_nodes
    mods = [np.arange(size) % k for _ in range(4)]
    edges = [np.where(mods[l + 1][:, None] == mods[l][None, :], e_rng.uniform(0.5, 2, (size, size)),
                      0.05 * e_rng.uniform(0, 1, (size, size))) for l in range(3)]
    t_leiden = _best(lambda: dj.find_modules(edges, method="leiden", num_null=0).modularity)
    t_louvain = _best(lambda: dj.find_modules(edges, method="louvain", num_null=0).modularity)
    q_l = dj.find_modules(edges, method="leiden", num_null=0).modularity
    q_v = dj.find_modules(edges, method="louvain", num_null=0).modularity
    return ("| operation | degenjax | baseline | time degenjax (s) | time baseline (s) | ratio baseline/degenjax |\n"
            "|---|---|---|---|---|---|\n"
            f"| synchronized neurons, {n} points x {d} units, {nb} batches | streamed hashes (jit, scan) "
            f"| NumPy np.unique on the boolean matrix | {t_ours:.4f} | {t_np:.4f} | {t_np / t_ours:.2f} |\n"
            f"| find_modules, 4 layers x {size} nodes, {k} planted modules | Leiden (Q {q_l:.3f}) "
            f"| networkx Louvain (Q {q_v:.3f}) | {t_leiden:.4f} | {t_louvain:.4f} | {t_louvain / t_leiden:.2f} |\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="training points")
    p.add_argument("--k-in", type=int, default=3, help="inputs per sub-task")
    p.add_argument("--k-out", type=int, default=1, help="outputs per sub-task")
    p.add_argument("--hidden", type=int, default=8, help="hidden units per sub-network (width 2*hidden)")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps (full batch)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--burnin", type=int, default=200)
    p.add_argument("--step-size", type=float, default=1e-4, help="SGLD step size")
    p.add_argument("--num-null", type=int, default=20, help="null graphs for the modularity significance test")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sync-points", type=int, default=100_000)
    p.add_argument("--sync-units", type=int, default=256)
    p.add_argument("--graph-nodes", type=int, default=64)
    p.add_argument("--no-append", action="store_true", help="do not record the results (benchmarks/results.jsonl)")
    args = p.parse_args(argv)

    rows = study(args)
    table = study_table(rows)
    print(table)
    timing = timings(args)
    print(timing)
    if not args.no_append:
        cmd = "python benchmarks/modularity.py " + " ".join(sys.argv[1:] if argv is None else argv)
        section = (f"\n## modularity study and degeneracy/modularity timings ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                   f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}; "
                   f"jax {jax.__version__}, devices {jax.devices()}\n\n"
                   f"Command: `{cmd.strip()}`\n\n"
                   "Composite task of two independent sub-tasks; (a) two disconnected sub-networks, (b) the same "
                   "architecture fully connected. N_eff = 2 lambda^ (SGLD LLC, +- standard error over chains); free "
                   "directions from `degeneracy_report` (dense-layer formulas, so for (a) they are counted as if the "
                   "masked weights existed); Q = modularity of the best Leiden partition of the LIB interaction graph "
                   "(and, as a control, of the graph of the raw neurons), with the mean Q of the strength-preserving "
                   "null graphs; when Q does not beat the null by 3 standard deviations, `modules` counts the "
                   "connected components (1 for a connected graph).\n\n"
                   + table + "\n" + timing)
        from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

        append_section(section, benchmark="modularity")
    return rows


if __name__ == "__main__":
    main()
