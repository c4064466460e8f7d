"""The ``degenjax`` command line: quickstart report, LLC of a user's model, interaction basis, resumable sweeps.

Run ``degenjax --help``, ``degenjax --version`` or ``degenjax COMMAND --help``. JAX and the numerical modules
are imported inside the commands, so ``--help`` answers without loading them. Errors in the user's input (a
missing file, a malformed config, an entry point that does not exist) print one line ``Error: ...`` and exit with
status 1; bugs still raise a traceback.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from enum import Enum
from typing import Optional

import typer

app = typer.Typer(
    name="degenjax",
    help="Degeneracy in the loss landscape for mechanistic interpretability (interaction basis, LLC), in JAX.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Kind(str, Enum):
    lib = "lib"
    pca = "pca"
    random = "random"
    global_ = "global"


class Sampler(str, Enum):
    sgld = "sgld"
    rmsprop_sgld = "rmsprop_sgld"
    sgnht = "sgnht"


# Output paths of each command, checked before any computation: "file" or "folder".
_OUTPUTS = {"quickstart": {"out": "folder"}, "llc": {"out": "file", "plot": "file"}, "basis": {"out": "folder"},
            "sweep": {"out": "folder"}}


def _check_arguments(command: str, kwargs: dict) -> None:
    """Checks what can be checked before computing: the seed's range and that every output path is writable."""
    from degenjax._src.validation import check_seed, check_writable

    if "seed" in kwargs and kwargs["seed"] is not None:
        check_seed(kwargs["seed"], "--seed")
    for name, kind in _OUTPUTS.get(command, {}).items():
        if kwargs.get(name) is not None:
            check_writable(kwargs[name], folder=kind == "folder", what=f"--{name}")


def _user_errors(fn):
    """Turns input errors (ValueError, OSError, a diverged sampler) into a one-line message and exit status 1.

    Before the command runs, its seed and output paths are checked (`_check_arguments`), so that an unwritable
    ``--out`` is reported before the computation, not after it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_arguments(fn.__name__, kwargs)
            return fn(*args, **kwargs)
        except (ValueError, OSError, FloatingPointError) as err:
            if type(err).__module__.split(".")[0] in ("jax", "jaxlib"):
                raise  # a JAX error (dtype promotion, tracing) is a bug to report, not a user input error
            msg = " ".join(str(err).split())
            typer.echo(f"Error: {msg}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"degenjax {version('degenjax')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the installed degenjax version and exit."),
    compile_cache: Optional[pathlib.Path] = typer.Option(
        None, "--compile-cache", envvar="DEGENJAX_COMPILE_CACHE",
        help="Folder for JAX's persistent compilation cache (or set DEGENJAX_COMPILE_CACHE): a rerun with the same "
             "shapes (a resumed sweep, the same model again) loads its compiled programs instead of compiling them. "
             "Placed before the command: degenjax --compile-cache DIR llc ..."),
):
    if compile_cache is not None:
        from degenjax._src.compilecache import enable_compilation_cache
        from degenjax._src.validation import check_writable

        try:
            check_writable(compile_cache, folder=True, what="--compile-cache")
            enable_compilation_cache(compile_cache)
        except (ValueError, OSError) as err:
            typer.echo(f"Error: {' '.join(str(err).split())}", err=True)
            raise typer.Exit(code=1) from None


def _search_dirs(*extra) -> list[str]:
    return [str(pathlib.Path.cwd()), *[str(e) for e in extra if e is not None]]


def _write_json(path: pathlib.Path, obj) -> None:
    from degenjax._src.resultsio import write_json

    write_json(path, obj, indent=2)


def _setup_jax(x64: bool) -> None:
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)


@app.command()
@_user_errors
def quickstart(
    out: pathlib.Path = typer.Option(pathlib.Path("demo-report"), "--out", "-o",
                                     help="Folder for report.json, report.md and the PNG plots."),
    tiny: bool = typer.Option(False, "--tiny", help="A seconds-long setting (small model and data, few draws)."),
    train_steps: Optional[int] = typer.Option(None, help="Training steps (default 1500; 150 with --tiny)."),
    hidden: Optional[int] = typer.Option(None, help="Width of the two hidden layers (default 32; 12 with --tiny)."),
    num_chains: Optional[int] = typer.Option(None, help="SGLD chains (default 4; 2 with --tiny)."),
    num_draws: Optional[int] = typer.Option(None, help="SGLD draws per chain (default 400; 40 with --tiny)."),
    num_points: Optional[int] = typer.Option(None, help="Use only the first N digits (default all 1797; 300 with --tiny)."),
    seed: int = typer.Option(0, help="PRNG seed."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    x64: bool = typer.Option(True, "--x64/--no-x64", help="Grams, bases and edges in float64."),
):
    """Train an MLP on scikit-learn's digits and write a full degeneracy report (LIB vs PCA, edges, modules, LLC)."""
    _setup_jax(x64)
    from degenjax._src import quickstart as qs

    cfg = qs.QuickstartConfig.tiny() if tiny else qs.QuickstartConfig()
    overrides = {"train_steps": train_steps, "hidden": hidden, "num_chains": num_chains, "num_draws": num_draws,
                 "num_points": num_points}
    cfg = cfg._replace(seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    report = qs.run_quickstart(out, cfg, progress=progress)
    typer.echo(f"LLC = {report['llc']:.4g} +- {report['llc_std']:.3g} (std over chains), "
               f"N_eff = {report['n_eff']:.4g}, test accuracy = {report['test_accuracy']:.3f}")
    recipe = report.get("recipe")
    if recipe is not None and not recipe["trustworthy"]:
        typer.echo(f"Warning: the LLC is not trustworthy (uncertainty incl. bias +- {report['llc_uncertainty']:.3g}): "
                   f"{recipe['message'].split('; ')[0]}; details in {out / 'report.md'}.")
    if not report.get("converged", True):
        reason = report["convergence_message"].removeprefix("not converged: ")
        typer.echo(f"Warning: the LLC chains did not converge ({reason})")
    typer.echo(f"Wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots.")


class Escalate(str, Enum):
    none = "none"
    localization = "localization"
    same_x = "same_x"


class OnDivergence(str, Enum):
    raise_ = "raise"
    drop = "drop"
    flag = "flag"


def _step_size(value: str):
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--step-size must be a positive number or 'auto'; got {value!r}.") from None


@app.command()
@_user_errors
def llc(
    target: str = typer.Argument(..., metavar="TARGET", help="package.module:function returning (loss_fn, params, data)."),
    checkpoint: Optional[pathlib.Path] = typer.Option(
        None, help="A .msgpack file or orbax folder whose parameters replace the entry point's params."),
    step_size: str = typer.Option("0.0001", help="SGLD step size epsilon, or 'auto': measure lambda^ on a ladder of "
                                                 "step sizes and extrapolate to 0 (the recipe; recommended for "
                                                 "numbers you publish)."),
    nbeta: Optional[float] = typer.Option(None, help="n * beta; default n / log(n) (beta = 1 / log n, WBIC)."),
    localization: float = typer.Option(1.0, help="Localization strength gamma (1.0: see degenjax.estimate_llc)."),
    num_chains: int = typer.Option(4, help="Number of chains (run together, sharded over devices)."),
    num_draws: int = typer.Option(200, help="Draws per chain (ignored with --step-size auto)."),
    num_burnin: int = typer.Option(0, help="Burn-in steps discarded per chain (ignored with --step-size auto, which "
                                           "discards the first half of every run)."),
    batch_size: int = typer.Option(64, help="Minibatch size."),
    sampler: Sampler = typer.Option(Sampler.sgld, help="Sampler."),
    on_divergence: OnDivergence = typer.Option(OnDivergence.raise_, help="raise: stop at a non-finite loss; drop: "
                                               "summarize the finite chains; flag: keep them (a NaN estimate "
                                               "still exits with status 1)."),
    max_steps: int = typer.Option(400_000, help="With --step-size auto: SGLD steps per chain over all rungs."),
    escalate: Escalate = typer.Option(Escalate.localization, help="With --step-size auto, when the chains cannot be "
                                      "sampled within --max-steps: localization: measure again at 10x the "
                                      "localization; same_x: then also at 100x n beta (the same finite-n value, up "
                                      "to 100x the steps); none: do not. Said in the output."),
    seed: int = typer.Option(0, help="PRNG seed."),
    x64: bool = typer.Option(False, "--x64", help="Enable float64 (jax_enable_x64)."),
    out: Optional[pathlib.Path] = typer.Option(None, help="Write the result as JSON here (the llc_record schema), "
                                                          "and the loss traces next to it (same name, .npz)."),
    plot: Optional[pathlib.Path] = typer.Option(None, help="Write the loss-trace plot (PNG) here."),
    progress: bool = typer.Option(True, help="Progress bar (runs the chains in 5 compiled chunks; --no-progress "
                                             "compiles once)."),
):
    """Estimate the local learning coefficient (and N_eff = 2 LLC) of a user's model."""
    _setup_jax(x64)
    import jax
    import numpy as np

    from degenjax._src.checkpoints import load_checkpoint
    from degenjax._src.checks import check_inputs
    from degenjax._src.llc import estimate_llc, finish
    from degenjax._src.records import llc_record, save_traces
    from degenjax._src.sweep import chain_mesh, load_problem

    eps = _step_size(step_size)
    loss_fn, params, data = load_problem(target, _search_dirs())
    if checkpoint is not None:
        params = load_checkpoint(checkpoint, params)
    # every input error (bad data rows, a non-scalar loss, integer params) before anything compiles
    check_inputs(params, data, step_size=eps, batch_size=batch_size, loss_fn=loss_fn)
    kw = dict(num_chains=num_chains, num_draws=num_draws, step_size=eps, batch_size=batch_size, nbeta=nbeta,
              localization=localization, num_burnin=num_burnin, sampler=sampler.value, mesh=chain_mesh(num_chains),
              on_divergence=on_divergence.value)
    if eps == "auto":
        res = estimate_llc(jax.random.key(seed), loss_fn, params, data, progress=progress, warn=False,
                           recipe_kwargs={"max_steps": max_steps, "escalate": escalate.value}, **kw)
    elif progress:  # eager, checked for divergence between chunks
        res = estimate_llc(jax.random.key(seed), loss_fn, params, data, progress=True, warn=False,
                           num_chunks=min(5, num_draws + num_burnin), **kw)
    else:  # one compilation; the same diagnostics afterwards
        res = jax.jit(lambda k, p, d: estimate_llc(k, loss_fn, p, d, **kw))(jax.random.key(seed), params, data)
        res = jax.device_get(res)
        if on_divergence.value == "raise" and not np.all(np.isfinite(np.asarray(res.loss_trace))):
            raise FloatingPointError(f"SGLD diverged (non-finite loss) with step_size={eps:g}; use a smaller "
                                     "--step-size (or auto), a larger --localization, or --on-divergence drop.")
        res = finish(res, warn=False, step_size=eps)
    res = jax.device_get(res)
    settings = {"target": target, "checkpoint": None if checkpoint is None else str(checkpoint),
                "batch_size": batch_size, "localization": localization, "num_burnin": num_burnin,
                "sampler": sampler.value, "seed": seed, "step_size_setting": step_size, "nbeta_setting": nbeta,
                "on_divergence": on_divergence.value,
                # the localization sampled (the recipe may escalate it; nbeta is the sampled one already)
                "localization_measured": localization if res.recipe is None or res.recipe.escalation is None
                else res.recipe.escalation["localization"],
                "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
    record = llc_record(res, **settings)
    typer.echo(f"LLC = {float(res.llc_mean):.5g} +- {float(res.llc_uncertainty):.3g} (std over chains "
               f"{float(res.llc_std):.3g}; N_eff = {2 * float(res.llc_mean):.4g}), L_n(w*) = "
               f"{float(res.init_loss):.5g}, step size = {float(res.step_size):.3g}, MALA acceptance = "
               f"{float(res.mala_acceptance):.2f}, ESS = {float(res.ess):.1f}, R-hat = {float(res.rhat):.3f}")
    if res.recipe is not None:
        typer.echo(("Recipe: " if res.recipe.trustworthy else "Warning: ") + res.recipe.message)
    else:
        typer.echo("Note: the step size was set by hand, so the estimate carries an unmeasured step-size bias "
                   "(the +- does not include it); --step-size auto measures and removes it.")
    if bool(np.asarray(res.converged)):
        typer.echo("Converged: R-hat <= 1.05 and ESS >= 100.")
    else:
        from degenjax._src.diagnostics import convergence

        typer.echo(f"Warning: {convergence(res.loss_trace).message or 'not converged'}.")
    if record["num_diverged"]:
        typer.echo(f"Warning: {record['num_diverged']} of {num_chains} chains diverged ({on_divergence.value}).")
    if out is not None:
        _write_json(out, record)
        save_traces(out.with_suffix(".npz"), res, **settings)
    if plot is not None:
        from degenjax._src.plots import plot_loss_traces

        plot_loss_traces(res.loss_trace, res.init_loss, llc=res.llc_mean, path=plot)
    if not np.isfinite(float(res.llc_mean)):
        raise ValueError("the LLC estimate is NaN (every chain diverged, or --on-divergence flag kept a diverged "
                         "chain); use a smaller --step-size or --step-size auto.")


@app.command()
@_user_errors
def basis(
    target: str = typer.Argument(..., metavar="TARGET", help="package.module:function returning (model, params, batches): model is "
                                           "degenjax.Sections or a list of section functions."),
    checkpoint: Optional[pathlib.Path] = typer.Option(None, help="Parameters to load into the entry point's params."),
    kind: Kind = typer.Option(Kind.lib, help="Basis: lib (local interaction basis), global, pca or random."),
    rtol: Optional[float] = typer.Option(None, help="Relative eigenvalue cutoff (default: the library's)."),
    seed: int = typer.Option(0, help="PRNG seed (random basis, random source vectors)."),
    x64: bool = typer.Option(True, "--x64/--no-x64", help="Enable float64 (recommended for Grams)."),
    out: Optional[pathlib.Path] = typer.Option(None, help="Folder for basis.npz, summary.json and plots."),
    progress: bool = typer.Option(True, help="Show a progress bar for every pass over the data."),
):
    """Compute an interaction basis, its edges and their sparsity for a user's model."""
    _setup_jax(x64)
    import jax
    import numpy as np

    from degenjax._src.basis import interaction_basis
    from degenjax._src.checkpoints import load_checkpoint
    from degenjax._src.edges import edge_sparsity, interaction_edges
    from degenjax._src.sweep import call_entry_point

    got = call_entry_point(target, _search_dirs())
    from degenjax._src.sections import Sections

    if not (isinstance(got, tuple) and len(got) == 3 and (isinstance(got[0], Sections) or (
            isinstance(got[0], (list, tuple)) and got[0] and all(callable(f) for f in got[0])))):
        raise ValueError(f"Entry point {target!r} must return (model, params, batches) with model a degenjax.Sections "
                         "or a list of section functions f(params, h); an llc entry point (loss_fn, params, data) "
                         "does not fit here.")
    model, params, batches = got
    from degenjax._src.grams import as_batch_list

    batches = as_batch_list(batches, f"the batches of {target}")  # a generator is used by the basis and the edges
    if checkpoint is not None:
        params = load_checkpoint(checkpoint, params)
    b = interaction_basis(model, params, batches, kind=kind.value, rtol=rtol, key=jax.random.key(seed),
                          progress=progress)
    edges = interaction_edges(model, params, b, batches, progress=progress)
    sparsity = edge_sparsity(edges)
    dims = [int(d) for d in jax.device_get(b.dims)]
    counts = [int(np.count_nonzero(np.asarray(e))) for e in edges]
    summary = {"target": target, "kind": kind.value, "dims": dims, "edge_counts": counts,
               "sparsity": _jsonable(sparsity)}
    typer.echo(f"{kind.value} basis dims per node layer: {dims}")
    typer.echo(f"nonzero edges per section: {counts}; sparsity: {json.dumps(summary['sparsity'])}")
    if out is not None:
        from degenjax._src.plots import plot_interaction_graph, plot_spectra

        out.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for l, (c, cp, lam) in enumerate(zip(b.C, b.C_pinv, b.Lambda)):
            arrays[f"C_{l}"], arrays[f"C_pinv_{l}"], arrays[f"Lambda_{l}"] = map(np.asarray, (c, cp, lam))
        for l, e in enumerate(edges):
            arrays[f"edges_{l}"] = np.asarray(e)
        np.savez(out / "basis.npz", **arrays)
        _write_json(out / "summary.json", summary)
        plot_spectra({"activation covariance": [np.asarray(v) for v in b.gram_spectrum],
                      "Lambda": [np.asarray(v) for v in b.Lambda]}, cutoffs=dims, cutoff_label=f"{kind.value} keeps",
                     path=out / "spectra.png")
        plot_interaction_graph(edges, path=out / "interaction_graph.png")
        typer.echo(f"Wrote {out / 'basis.npz'}, {out / 'summary.json'} and plots.")


def _jsonable(x):
    from degenjax._src.resultsio import json_ready

    return json_ready(x)


@app.command()
@_user_errors
def sweep(
    config: pathlib.Path = typer.Argument(..., metavar="CONFIG", help="Sweep TOML file (see examples/sweep.toml)."),
    out: pathlib.Path = typer.Option(..., "--out", "-o", help="Results folder; rerun with the same folder to resume."),
    plots: bool = typer.Option(True, help="Write llc_vs_checkpoint.png and calibration_heatmap.png at the end."),
    progress: bool = typer.Option(True, help="Show a progress bar over cells."),
    x64: bool = typer.Option(False, "--x64", help="Enable float64 (jax_enable_x64)."),
    cells_per_group: Optional[int] = typer.Option(
        None, "--cells-per-group", min=1,
        help="Cells per compiled program (default: as many as fit in memory). Results are written per group; the "
             "numbers do not depend on it."),
    distributed: bool = typer.Option(
        False, "--distributed",
        help="Run as one process of a multi-process JAX job (jax.distributed): start the same command in every "
             "process; process 0 writes --out. On SLURM, Open MPI and Cloud TPU pods nothing else is needed; "
             "elsewhere give --coordinator, --num-processes and --process-id."),
    coordinator: Optional[str] = typer.Option(
        None, "--coordinator", help="With --distributed: host:port of process 0, reachable from every process."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", min=1,
                                                help="With --distributed: the number of processes."),
    process_id: Optional[int] = typer.Option(None, "--process-id", min=0,
                                             help="With --distributed: this process's index, 0 to N-1."),
):
    """LLC over checkpoints x a grid of step size / nbeta / localization; resumable after a crash."""
    from degenjax._src.sweep import load_sweep_config, run_sweep

    if not distributed and (coordinator is not None or num_processes is not None or process_id is not None):
        raise ValueError("--coordinator, --num-processes and --process-id start a multi-process job; add "
                         "--distributed.")
    cfg = load_sweep_config(config)  # validate before importing JAX-heavy code
    if distributed:
        from degenjax._src.distributed import initialize

        initialize(coordinator, num_processes, process_id)
    _setup_jax(x64)
    import jax

    lead = jax.process_index() == 0
    try:
        rows = run_sweep(cfg, out, progress=progress and lead, plots=plots, log=typer.echo,
                         cells_per_group=cells_per_group)
    except KeyboardInterrupt:
        typer.echo(f"Interrupted: finished cells are kept in {out / 'results.jsonl'}; rerun the same command to "
                   "resume.", err=True)
        raise typer.Exit(code=130) from None
    failed = sum(bool(r.get("error")) for r in rows)
    diverged = sum(bool(r.get("diverged")) for r in rows)
    unconverged = sum(r.get("converged") is False and not r.get("diverged") for r in rows)
    notes = [f"{n} {what}" for n, what in ((diverged, "diverged"), (unconverged, "not converged (R-hat > 1.05 or "
                                           "ESS < 100)"), (failed, "failed")) if n]
    if lead:
        typer.echo(f"{len(rows)} cells in {out / 'results.jsonl'} (and results.csv, traces/)"
                   + (f"; {', '.join(notes)}" if notes else "") + ".")
    if failed:
        raise ValueError(f"{failed} of {len(rows)} cells failed (reasons above and in the error column of "
                         f"{out / 'results.csv'}); fix them and rerun the same command to compute only those.")


def main() -> None:
    """Console entry point (``degenjax``)."""
    app(prog_name="degenjax")


if __name__ == "__main__":
    sys.exit(main())
