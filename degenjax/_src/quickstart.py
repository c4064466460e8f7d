"""The quickstart report (``degenjax quickstart`` / ``make demo``): every method of the toolkit on one small model.

An MLP (64 -> hidden -> hidden -> 10, ReLU) is trained on scikit-learn's bundled handwritten digits (no download);
then, at the trained parameters:

1. activation Grams and the LIB and PCA bases of the three node layers (docs/maths.md#grams and #interaction-basis);
2. interaction edges and their sparsity in both bases;
3. the degeneracy report (free directions from activation/Jacobian rank deficits, synchronized/dead ReLUs, section 6)
   and modules of the LIB interaction graph;
4. the LLC of the training loss with SGLD and N_eff = 2 LLC (section 5).

Results go to ``OUT/report.json`` (numbers), ``OUT/report.md`` (summary), ``OUT/params.msgpack`` (the trained
parameters, loadable with ``degenjax.load_checkpoint``), ``OUT/edges.npz`` (edges ``lib_l``/``pca_l`` and
spectra ``lib_Lambda_l``/``pca_Lambda_l``) and four PNG figures.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class QuickstartConfig(NamedTuple):
    """Settings of the quickstart (defaults: the ``make demo`` report; `tiny`: a test-sized run).

    Attributes:
      hidden: width of the two hidden layers.
      num_points: use the first ``num_points`` digits after a fixed shuffle (None: all 1797); 80% train.
      train_steps: full-batch Adam steps.
      learning_rate: Adam learning rate.
      num_chains, num_draws, num_burnin: SGLD chains, recorded draws per chain, discarded steps (draws and burn-in
        only for a hand-set ``step_size``: the recipe chooses its own lengths).
      llc_batch_size: SGLD minibatch size.
      step_size: ``"auto"`` (default: the recipe of ``estimate_llc(step_size="auto")``, which measures and removes
        the step-size bias and reports whether its estimate is trustworthy), or a hand-set SGLD step.
      localization: SGLD localization gamma; 1.0, the default of `estimate_llc` and ``degenjax llc`` (weak enough
        not to bias lambda^ down, see `degenjax.estimate_llc`).
      llc_max_steps: the recipe's budget of SGLD steps per chain.
      gram_batch_size: batch size of the streamed Gram / edge computations.
      seed: PRNG seed (initialisation, shuffle, SGLD).
    """

    hidden: int = 32
    num_points: int | None = None
    train_steps: int = 1500
    learning_rate: float = 3e-3
    num_chains: int = 4
    num_draws: int = 400
    num_burnin: int = 100
    llc_batch_size: int = 128
    step_size: float | str = "auto"
    localization: float = 1.0
    gram_batch_size: int = 2048
    seed: int = 0
    llc_max_steps: int = 100_000

    @classmethod
    def tiny(cls) -> "QuickstartConfig":
        """A seconds-long setting for tests and smoke runs."""
        return cls(hidden=12, num_points=300, train_steps=150, num_chains=2, num_draws=40, num_burnin=10,
                   llc_batch_size=60, step_size=1e-4)


def load_digits_split(num_points: int | None, seed: int, dtype=np.float32):
    """scikit-learn's digits, pixels scaled to [0, 1], shuffled with ``seed``, split 80/20.

    Returns:
      ``(x_train, y_train, x_test, y_test)`` with ``x`` of shape ``(n, 64)`` and integer labels ``y``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.data, np.float64) / 16.0
    y = np.asarray(digits.target, np.int32)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    if num_points is not None:
        if not 10 <= num_points <= x.shape[0]:
            raise ValueError(f"num_points must be between 10 and {x.shape[0]} (the digits data set); got {num_points}.")
        order = order[:num_points]
    x, y = x[order].astype(dtype), y[order]
    n_train = int(round(0.8 * x.shape[0]))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _batches(x, size: int) -> list:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _train(module, params, x, y, cfg: QuickstartConfig, progress: bool):
    import optax

    opt = optax.adam(cfg.learning_rate)

    def loss_fn(p):
        return _cross_entropy(module.apply(p, x), y)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = opt.init(params)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train_steps, desc="training", unit="step")
    losses = []
    every = max(1, cfg.train_steps // 50)
    for t in range(cfg.train_steps):
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes Python floats and int32
            params, state, loss = step(params, state)
        if (t + 1) % every == 0 or t + 1 == cfg.train_steps:
            losses.append(float(loss))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(every if (t + 1) % every == 0 else (t + 1) % every)
    if bar is not None:
        bar.close()
    return params, losses


class Trained(NamedTuple):
    """The training stage's result: the Flax module, its trained (float32) params, the loss curve and the data."""

    module: Any
    params: Any
    train_losses: list
    accuracy: dict
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class Analysis(NamedTuple):
    """The analysis stage's result (docs/maths.md#grams, #interaction-basis, #degeneracy-accounting).

    Attributes:
      stats: the centred activation statistics (one pass), shared by both bases and the degeneracy report.
      bases: ``{"lib": InteractionBasis, "pca": InteractionBasis}``.
      edges: ``{"lib": [E^0, E^1], "pca": [...]}``.
      sparsity: ``{"lib": EdgeSparsity, "pca": EdgeSparsity}``.
      degeneracy: the `DegeneracyReport`.
      modules: the `ModuleResult` of the LIB interaction graph.
    """

    stats: Any
    bases: dict
    edges: dict
    sparsity: dict
    degeneracy: Any
    modules: Any


def train_stage(config: QuickstartConfig, *, progress: bool = False) -> Trained:
    """Loads the digits and trains the MLP (float32, full-batch Adam)."""
    from degenjax._src.models import MLP

    x_tr, y_tr, x_te, y_te = load_digits_split(config.num_points, config.seed)
    if config.llc_batch_size > x_tr.shape[0]:
        raise ValueError(f"quickstart: llc_batch_size={config.llc_batch_size} exceeds the {x_tr.shape[0]} training "
                         "points; lower it or raise num_points.")
    module = MLP(features=(config.hidden, config.hidden, 10))
    params = module.init(jax.random.key(config.seed), jnp.asarray(x_tr[:1]))
    params, train_losses = _train(module, params, jnp.asarray(x_tr), jnp.asarray(y_tr), config, progress)
    predict = jax.jit(lambda p, xs: jnp.argmax(module.apply(p, xs), -1))
    acc = {split: float(np.mean(np.asarray(predict(params, jnp.asarray(xs))) == ys))
           for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te))}
    return Trained(module, params, train_losses, acc, x_tr, y_tr, x_te, y_te)


def analysis_stage(model, params, batches, *, seed: int = 0, progress: bool = False) -> Analysis:
    """Grams, LIB and PCA bases, edges, degeneracy and modules, streaming the data once per kind of statistic.

    Passes over ``batches``: one for the activation statistics (shared by both bases and the degeneracy report),
    one per node layer for the LIB Jacobian Grams (each differentiates the next layer's basis, so they cannot share
    a pass), one for the edges in each basis, one for the ReLU on/off patterns and one for the pre-activation
    Jacobian Grams of the degeneracy report.

    Args:
      model: `Sections` of the network.
      params: its parameters (in the analysis dtype).
      batches: a list of input batches.
      seed: seed of the module detection.
      progress: tqdm bars for every pass.

    Returns:
      `Analysis`.
    """
    from degenjax._src.basis import interaction_basis
    from degenjax._src.degeneracy import degeneracy_report
    from degenjax._src.edges import edge_sparsity, interaction_edges
    from degenjax._src.grams import activation_stats
    from degenjax._src.modularity import find_modules

    stats = activation_stats(model, params, batches, center=True, progress=progress)
    bases = {kind: interaction_basis(model, params, batches, kind=kind, stats=stats, progress=progress)
             for kind in ("lib", "pca")}
    edges = {kind: interaction_edges(model, params, b, batches, progress=progress) for kind, b in bases.items()}
    sparsity = {kind: edge_sparsity(e) for kind, e in edges.items()}
    degen = degeneracy_report(model, params, batches, stats=stats, progress=progress)
    modules = find_modules(edges["lib"], seed=seed)
    return Analysis(stats, bases, edges, sparsity, degen, modules)


def llc_stage(trained: Trained, config: QuickstartConfig, *, progress: bool = False):
    """The LLC of the training loss at the trained (float32) params (docs/maths.md#llc).

    Returns:
      ``(LLCResult, Convergence)`` with ``ess``, ``rhat`` and ``llc_mcse`` from the host-side diagnostics (the same
      numbers whether or not the run was jitted).
    """
    from degenjax._src.diagnostics import convergence
    from degenjax._src.llc import estimate_llc
    from degenjax._src.sweep import chain_mesh

    module = trained.module

    def loss_fn(p, batch):
        bx, by = batch
        return _cross_entropy(module.apply(p, bx), by)

    params = trained.params
    data = (jnp.asarray(trained.x_train), jnp.asarray(trained.y_train))
    key = jax.random.key(config.seed + 1)
    llc_kw = dict(num_chains=config.num_chains, num_draws=config.num_draws, step_size=config.step_size,
                  batch_size=config.llc_batch_size, localization=config.localization, num_burnin=config.num_burnin,
                  mesh=chain_mesh(config.num_chains))
    if config.step_size == "auto":  # the recipe (eager: it decides between runs)
        llc = estimate_llc(key, loss_fn, params, data, warn=False,
                           # a demo's budget: no escalation (measured on this MLP: +35 s, and 10x the localization
                           # is not trustworthy either); the report says what escalation would do
                           recipe_kwargs={"max_steps": config.llc_max_steps, "initial_steps": 1000,
                                          "escalate": "none"}, **llc_kw)
    elif progress:  # eager: a progress bar between chunks of the scan
        llc = estimate_llc(key, loss_fn, params, data, progress=True,
                           num_chunks=min(5, config.num_draws + config.num_burnin), **llc_kw)
    else:  # one compilation
        llc = jax.jit(lambda k, p, d: estimate_llc(k, loss_fn, p, d, **llc_kw))(key, params, data)
    llc = jax.device_get(llc)
    conv = convergence(llc.loss_trace)
    llc = llc._replace(ess=np.asarray(conv.ess), rhat=np.asarray(conv.rhat),
                       llc_mcse=np.asarray(float(llc.nbeta) * conv.mcse))
    return llc, conv


def run_quickstart(out_dir, config: QuickstartConfig = QuickstartConfig(), *, progress: bool = True) -> dict:
    """Trains the digits MLP, runs the full analysis and writes the report: `train_stage`, `analysis_stage`,
    `llc_stage`, then the files.

    The Grams, bases and edges are computed in float64 when ``jax_enable_x64`` is on (the CLI turns it on),
    else in float32; training and SGLD use float32 parameters.

    Args:
      out_dir: output folder (created).
      config: `QuickstartConfig`.
      progress: tqdm progress bars for training, every pass over the data and sampling.

    Returns:
      The report as a dict (also written to ``out_dir/report.json``).
    """
    from degenjax._src.checkpoints import save_msgpack
    from degenjax._src.models import mlp_sections
    from degenjax._src.numerics import acc_dtype

    for name in ("hidden", "train_steps", "num_chains", "num_draws", "llc_batch_size", "gram_batch_size"):
        if int(getattr(config, name)) < 1:
            raise ValueError(f"quickstart: {name} must be a positive integer; got {getattr(config, name)}.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    trained = train_stage(config, progress=progress)
    save_msgpack(out / "params.msgpack", trained.params)
    timings["train_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    fdt = acc_dtype()
    p_an = jax.tree.map(lambda a: jnp.asarray(a, fdt), trained.params)
    x_an = jnp.asarray(trained.x_train, fdt)
    model = mlp_sections(trained.module, x_an[:2])
    analysis = analysis_stage(model, p_an, _batches(x_an, config.gram_batch_size), seed=config.seed,
                              progress=progress)
    timings["analysis_s"] = time.perf_counter() - t1

    t3 = time.perf_counter()
    llc, conv = llc_stage(trained, config, progress=progress)
    timings["llc_s"] = time.perf_counter() - t3
    return write_report(out, trained, analysis, llc, conv, config, timings, t0, dtype=str(jnp.dtype(fdt)))


def write_report(out: pathlib.Path, trained: Trained, analysis: Analysis, llc, conv, config: QuickstartConfig,
                 timings: dict, t0: float, *, dtype: str) -> dict:
    """Writes ``edges.npz``, the four figures, ``report.json`` and ``report.md``; returns the report dict."""
    from degenjax._src import plots
    from degenjax._src.llc import effective_parameter_count
    from degenjax._src.resultsio import json_ready, write_json

    bases, edges, modules, degen = analysis.bases, analysis.edges, analysis.modules, analysis.degeneracy
    layer_names = ["input", "hidden 1", "hidden 2"]
    np.savez(out / "edges.npz", **{f"{kind}_{l}": np.asarray(e) for kind, es in edges.items() for l, e in enumerate(es)},
             **{f"{kind}_Lambda_{l}": np.asarray(v) for kind, b in bases.items() for l, v in enumerate(b.Lambda)})

    # -- figures
    plot_files = {
        "llc_traces": "llc_traces.png", "spectra": "spectra.png", "interaction_graph": "interaction_graph.png",
        "sparsity": "sparsity_lib_vs_pca.png",
    }
    plots.plot_loss_traces(llc.loss_trace, llc.init_loss, llc=llc.llc_mean, path=out / plot_files["llc_traces"])
    plots.plot_spectra({
        "activation Gram": [np.linalg.eigvalsh(np.asarray(g, np.float64))[::-1] for g in analysis.stats.grams],
        "LIB Lambda": [np.asarray(v) for v in bases["lib"].Lambda],
        "PCA variance": [np.asarray(v) for v in bases["pca"].Lambda],
    }, layer_names=layer_names, cutoffs=[int(d) for d in bases["lib"].dims], cutoff_label="LIB keeps",
        path=out / plot_files["spectra"], title="Eigenvalue spectra per node layer")
    plots.plot_interaction_graph(edges["lib"], modules=modules.assignment, path=out / plot_files["interaction_graph"],
                                 title=f"LIB interaction graph ({modules.num_modules} module{'s' if modules.num_modules != 1 else ''}, "
                                       f"Q = {modules.modularity:.2f})")
    plots.plot_sparsity({"LIB": edges["lib"], "PCA": edges["pca"]}, path=out / plot_files["sparsity"],
                        title="Edge sparsity: LIB vs PCA")

    # -- report
    num_params = int(sum(np.size(a) for a in jax.tree.leaves(trained.params)))
    input_dim = int(trained.x_train.shape[-1])
    layers = []
    for l, name in enumerate(layer_names):
        layers.append({
            "name": name, "width": input_dim if l == 0 else config.hidden,
            "lib_dim": int(bases["lib"].dims[l]), "pca_dim": int(bases["pca"].dims[l]),
            "lib_dropped_gram": int(bases["lib"].num_dropped_gram[l]),
            "lib_dropped_interaction": int(bases["lib"].num_dropped_interaction[l]),
        })
    edge_report = {}
    for kind in ("lib", "pca"):
        sp = analysis.sparsity[kind]
        edge_report[kind] = {
            "shapes": [list(np.shape(e)) for e in edges[kind]],
            "nonzero": [int(np.count_nonzero(np.asarray(e)[1:, 1:] > 0)) for e in edges[kind]],
            "num_edges": sp.num_edges,
            "fractions": list(sp.fractions),
            "edges_for_fraction": sp.counts,
            "total_weight": sp.total_weight,
        }
    report = {
        "model": {"kind": "MLP", "features": [config.hidden, config.hidden, 10], "input_dim": input_dim,
                  "num_params": num_params},
        "data": {"name": "sklearn digits", "num_train": int(trained.x_train.shape[0]),
                 "num_test": int(trained.x_test.shape[0])},
        "train_loss": trained.train_losses[-1], "train_accuracy": trained.accuracy["train"],
        "test_accuracy": trained.accuracy["test"],
        "llc": float(llc.llc_mean), "llc_std": float(llc.llc_std), "llc_per_chain": llc.llc_per_chain,
        "n_eff": float(effective_parameter_count(llc.llc_mean)), "n_eff_std": float(2.0 * llc.llc_std),
        "init_loss": float(llc.init_loss),
        "nbeta": float(llc.nbeta), "mala_acceptance": float(llc.mala_acceptance), "ess": float(llc.ess),
        "rhat": float(llc.rhat), "llc_mcse": float(llc.llc_mcse), "converged": conv.converged,
        "convergence_message": conv.message, "llc_uncertainty": float(llc.llc_uncertainty),
        "step_size": float(llc.step_size),
        "recipe": None if llc.recipe is None else {"trustworthy": llc.recipe.trustworthy,
                                                   "message": llc.recipe.message,
                                                   "rungs": [dict(r) for r in llc.recipe.rungs]},
        "layers": layers,
        "edges": edge_report,
        "degeneracy": {"totals": degen.totals(),
                       "activation_rank": degen.activation_rank, "jacobian_rank": degen.jacobian_rank,
                       "activation_free": degen.activation_free, "jacobian_free": degen.jacobian_free,
                       "sync_free": degen.sync_free, "num_dead": degen.num_dead,
                       "num_always_on": degen.num_always_on},
        "modules": {"num_modules": int(modules.num_modules), "modularity": float(modules.modularity),
                    "significant": bool(modules.significant), "assignment": list(modules.assignment)},
        "settings": config._asdict(),
        "dtype_analysis": dtype,
        "devices": [str(d) for d in jax.devices()],
        "plots": plot_files,
    }
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = timings
    report = json_ready(report)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report, degen.table()))
    return report


def _fmt(v, spec=".4g"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _markdown(r: dict, degeneracy_table: str) -> str:
    m = r["model"]
    lines = [
        "# degenjax quickstart report",
        "",
        f"MLP {m['input_dim']} -> {' -> '.join(map(str, m['features']))} (ReLU, {m['num_params']} parameters) trained "
        f"on {r['data']['num_train']} scikit-learn digits: train accuracy {r['train_accuracy']:.3f}, test accuracy "
        f"{r['test_accuracy']:.3f}, train loss {_fmt(r['train_loss'])}.",
        "",
        "## Local learning coefficient",
        "",
        f"- LLC = **{_fmt(r['llc'])}** +- {_fmt(r['llc_std'], '.3g')} (std over {len(r['llc_per_chain'])} chains); "
        f"N_eff = 2 LLC = **{_fmt(r['n_eff'])}** of {m['num_params']} parameters.",
        f"- nbeta = {_fmt(r['nbeta'])}, L_n(w*) = {_fmt(r['init_loss'])}, MALA acceptance = "
        f"{_fmt(r['mala_acceptance'], '.3f')}, ESS = {_fmt(r['ess'], '.1f')}, R-hat = {_fmt(r['rhat'], '.3f')}, "
        f"MCSE of the LLC = {_fmt(r['llc_mcse'], '.3g')}.",
        "- " + ("Converged (R-hat <= 1.05, ESS >= 100)." if r["converged"]
                else f"**Warning: {r['convergence_message']}.**"),
        "- " + (f"Step size {_fmt(r['step_size'], '.3g')} set by hand: the estimate carries an unmeasured step-size "
                "bias (the +- does not include it)." if r["recipe"] is None else
                (f"Step-size recipe: {r['recipe']['message']}" if r["recipe"]["trustworthy"] else
                 f"**Warning: {r['recipe']['message']}**")),
        "",
        "![LLC loss traces](llc_traces.png)",
        "",
        "## Interaction basis: LIB vs PCA",
        "",
        "| node layer | width | LIB dim | PCA dim |",
        "|---|---|---|---|",
    ]
    for layer in r["layers"]:
        lines.append(f"| {layer['name']} | {layer['width']} | {layer['lib_dim']} | {layer['pca_dim']} |")
    lines += ["", "(dims include the constant direction)", "",
              "| section | basis | edges | nonzero | " + " | ".join(f"edges for {f:.0%}" for f in r["edges"]["lib"]["fractions"]) + " |",
              "|---|---|---|---|" + "---|" * len(r["edges"]["lib"]["fractions"])]
    for l in range(len(r["edges"]["lib"]["num_edges"])):
        for kind in ("lib", "pca"):
            e = r["edges"][kind]
            lines.append(f"| {l} -> {l + 1} | {kind.upper()} | {e['num_edges'][l]} | {e['nonzero'][l]} | "
                         + " | ".join(str(c) for c in e["edges_for_fraction"][l]) + " |")
    lines += ["", "![spectra](spectra.png)", "", "![LIB vs PCA sparsity](sparsity_lib_vs_pca.png)", "",
              "## Degeneracy", "", degeneracy_table,
              "## Modules", "",
              f"{r['modules']['num_modules']} module(s) in the LIB interaction graph, modularity Q = "
              f"{r['modules']['modularity']:.3f} (significant against permuted graphs: {r['modules']['significant']}).",
              "", "![interaction graph](interaction_graph.png)", "",
              f"Total time {r['timings']['total_s']:.1f} s on {len(r['devices'])} device(s); parameters in "
              "`params.msgpack`, all numbers in `report.json`.", ""]
    return "\n".join(lines)
