"""Figures for reports, notebooks and sweeps (matplotlib ``Figure`` objects; no global pyplot state).

Every function returns the ``Figure`` and, when ``path`` is given, also saves it there (PNG by extension).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path):
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def plot_loss_traces(loss_trace, init_loss=None, *, llc=None, path=None, title="SGLD loss traces"):
    """Per-chain loss traces of an LLC estimate, marked with their convergence.

    Over the chains it draws the running mean ``(1/t) sum_{s <= t} L_s`` averaged over the finite chains (the
    average whose end point gives the LLC estimate, ``nbeta (mean - L_n(w*))``) and a band of +- one standard
    deviation of the per-chain running means. The corner label gives split R-hat and ESS of the trace
    (`degenjax.convergence`, the numbers `estimate_llc` reports); an unconverged trace (R-hat > 1.05 or
    ESS < 100) gets a red "NOT CONVERGED" label and frame, and a chain with a non-finite loss is named.

    Args:
      loss_trace: shape ``(num_chains, num_draws)``.
      init_loss: ``L_n(w*)``, drawn as a dashed line.
      llc: optional LLC estimate shown in the title.
      path: optional output file.
    """
    from degenjax._src.diagnostics import convergence

    trace = np.asarray(loss_trace, np.float64)
    if trace.ndim != 2:
        raise ValueError(f"loss_trace must have shape (num_chains, num_draws); got {trace.shape}.")
    fig, ax = _figure()
    ax = ax[0, 0]
    steps = np.arange(trace.shape[1])
    for c in range(trace.shape[0]):
        ax.plot(steps, trace[c], lw=0.8, alpha=0.6, label=f"chain {c}" if trace.shape[0] <= 8 else None)
    finite = np.all(np.isfinite(trace), axis=1)
    if finite.any():  # the running mean of the finite chains: the average that the LLC estimate is made of
        running = np.cumsum(trace[finite], axis=1) / np.arange(1, trace.shape[1] + 1)
        mean, std = running.mean(axis=0), running.std(axis=0)
        ax.fill_between(steps, mean - std, mean + std, color="k", alpha=0.15, lw=0, zorder=4, gid="band",
                        label="$\\pm$ std over chains")
        ax.plot(steps, mean, color="k", lw=1.8, zorder=5, gid="running_mean", label="running mean")
    if init_loss is not None:
        ax.axhline(float(init_loss), color="k", ls="--", lw=1, label="$L_n(w^*)$")
    ax.set_xlabel("draw")
    ax.set_ylabel("loss")
    ax.set_title(title if llc is None else f"{title}  ($\\hat\\lambda$ = {float(llc):.3g})")
    conv = convergence(trace[finite] if finite.any() else trace)
    text = f"R-hat {conv.rhat:.3f}, ESS {conv.ess:.0f}"
    if not finite.all():
        text += f"\ndiverged: chains {np.flatnonzero(~finite).tolist()}"
    if conv.converged and finite.all():
        ax.text(0.99, 0.02, "converged: " + text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="green")
    else:
        ax.text(0.99, 0.02, "NOT CONVERGED: " + text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                color="red", fontweight="bold")
        for spine in ax.spines.values():
            spine.set_edgecolor("red")
            spine.set_linewidth(2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # clear of the corner label
    return _save(fig, path)


# One style per spectrum, in order: the first is drawn wide and pale underneath, the next ones narrower, dashed or
# dotted, with their own markers and above it, so that spectra that coincide (the activation Gram and PCA variances
# of a centred layer) stay visible one on top of the other.
_SPECTRUM_STYLES = (
    dict(ls="-", lw=4.0, alpha=0.4, marker="", zorder=2),
    dict(ls="--", lw=1.4, alpha=0.95, marker="o", ms=3.5, mfc="none", zorder=3),
    dict(ls=":", lw=1.4, alpha=0.95, marker="x", ms=3.5, zorder=4),
    dict(ls="-.", lw=1.2, alpha=0.95, marker="s", ms=3, mfc="none", zorder=5),
    dict(ls=(0, (1, 1)), lw=1.2, alpha=0.95, marker="^", ms=3, mfc="none", zorder=6),
)


def plot_spectra(spectra: Mapping[str, Sequence], *, layer_names: Sequence[str] | None = None,
                 cutoffs: Sequence[int | None] | None = None, cutoff_label: str = "kept", path=None,
                 title="Eigenvalue spectra"):
    """Eigenvalues per node layer (log scale), one panel per layer and one line per spectrum kind.

    Each spectrum has its own colour, line style, width and marker, drawn in order from the bottom up, so a spectrum
    that coincides with another one is not hidden under it. The truncation is marked by a vertical line after the
    last kept direction.

    Args:
      spectra: ``{label: [values of layer 0, values of layer 1, ...]}``, e.g. Gram eigenvalues and LIB Lambda.
      layer_names: panel titles.
      cutoffs: per layer, how many directions the basis keeps (e.g. ``basis.dims``); drawn as a vertical line at
        ``k - 0.5`` labelled ``"{cutoff_label}: k"``. None (for the figure or a layer) draws none.
      cutoff_label: the legend text before the count.
      path: optional output file.
    """
    from matplotlib import colormaps

    if not spectra:
        raise ValueError("plot_spectra needs at least one spectrum.")
    num_layers = max(len(v) for v in spectra.values())
    ncols = min(num_layers, 4)
    nrows = math.ceil(num_layers / ncols)
    fig, axes = _figure(ncols, nrows, width=3.6, height=3.0)
    for l in range(nrows * ncols):
        ax = axes[l // ncols, l % ncols]
        if l >= num_layers:
            ax.set_axis_off()
            continue
        for k, (label, per_layer) in enumerate(spectra.items()):
            if l < len(per_layer) and per_layer[l] is not None:
                v = np.sort(np.abs(np.asarray(per_layer[l], np.float64)))[::-1]
                v = v[v > 0]
                if v.size:
                    style = _SPECTRUM_STYLES[k % len(_SPECTRUM_STYLES)]
                    ax.semilogy(np.arange(v.size), v, color=colormaps["tab10"](k % 10), label=label, gid=label,
                                **style)
        if cutoffs is not None and l < len(cutoffs) and cutoffs[l] is not None:
            ax.axvline(int(cutoffs[l]) - 0.5, color="0.35", ls="--", lw=1.0, zorder=1, gid="cutoff",
                       label=f"{cutoff_label}: {int(cutoffs[l])}")
        ax.set_title(layer_names[l] if layer_names is not None and l < len(layer_names) else f"layer {l}", fontsize=9)
        ax.set_xlabel("index")
        if l % ncols == 0:
            ax.set_ylabel("eigenvalue")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_interaction_graph(edges: Sequence, *, modules: Sequence | None = None, drop_constant: bool = True,
                           max_edges: int = 300, max_nodes_per_layer: int = 40, path=None, title="Interaction graph"):
    """The layered interaction graph: node layer ``l`` at x = l, edge width and opacity by log edge weight.

    Node 0 of every layer is the constant direction (basis column 0); with ``drop_constant`` it is drawn as a hollow
    grey square and its edges are not drawn, as `find_modules` and `edge_sparsity` leave it out. With ``modules``,
    each module has its colour and nodes without a module (label -1: the constant, isolated nodes) are grey.

    Args:
      edges: ``[E^0, ..., E^{L-1}]`` with ``E^l`` of shape ``(d_{l+1}, d_l)`` (`interaction_edges`).
      modules: optional module label per node, as ``[labels of layer 0, ..., labels of layer L]``
        (`ModuleResult.assignment`; -1 = no module).
      drop_constant: leave out the constant direction's edges and mark its node as dropped.
      max_edges: draw only the strongest edges (the figure stays readable).
      max_nodes_per_layer: draw only the first nodes of each layer (basis directions are ordered by importance).
      path: optional output file.
    """
    from matplotlib.collections import LineCollection

    mats = [np.abs(np.asarray(e, np.float64)) for e in edges]
    if not mats or any(m.ndim != 2 for m in mats):
        raise ValueError("edges must be a non-empty list of 2-D arrays E^l of shape (d_{l+1}, d_l).")
    for l in range(len(mats) - 1):
        if mats[l].shape[0] != mats[l + 1].shape[1]:
            raise ValueError(f"edges[{l}] has {mats[l].shape[0]} outputs but edges[{l + 1}] has {mats[l + 1].shape[1]} "
                             "inputs; pass consecutive layers.")
    sizes = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    shown = [min(s, max_nodes_per_layer) for s in sizes]

    def y(l, i):
        return 0.5 if shown[l] == 1 else 1.0 - i / (shown[l] - 1)

    segs, weights = [], []
    for l, m in enumerate(mats):
        sub = m[: shown[l + 1], : shown[l]]
        for j, i in zip(*np.nonzero(sub > 0)):
            if drop_constant and (i == 0 or j == 0):
                continue
            segs.append(((l, y(l, i)), (l + 1, y(l + 1, j))))
            weights.append(sub[j, i])
    fig, ax = _figure(width=max(4.0, 1.8 * len(sizes)), height=4.5)
    ax = ax[0, 0]
    if weights:
        w = np.log10(np.asarray(weights))
        keep = np.argsort(w)[::-1][:max_edges]
        w = w[keep]
        span = max(w.max() - w.min(), 1e-12)
        strength = (w - w.min()) / span
        lc = LineCollection([segs[k] for k in keep[::-1]], linewidths=0.3 + 2.7 * strength[::-1],
                            colors=[(0.1, 0.2, 0.6, 0.15 + 0.85 * s) for s in strength[::-1]], gid="edges")
        ax.add_collection(lc)
    cmap = __import__("matplotlib").colormaps["tab10"]
    groups: dict = {}  # category -> node positions; one scatter (and legend entry) per category
    for l, n in enumerate(shown):
        labels = (np.asarray(modules[l]).astype(int)[:n] if modules is not None and l < len(modules)
                  else np.full(n, -2))  # -2: no modules given
        for i in range(n):
            cat = "constant" if drop_constant and i == 0 else int(labels[i]) if i < labels.size else -2
            groups.setdefault(cat, []).append((l, y(l, i)))
    # legend order: modules 0, 1, ..., then the nodes without a module, then the constant
    for cat in sorted(groups, key=lambda c: (2, 0) if c == "constant" else (1, 0) if c < 0 else (0, c)):
        xy = np.asarray(groups[cat], float)
        if cat == "constant":
            ax.scatter(xy[:, 0], xy[:, 1], s=22, marker="s", facecolors="none", edgecolors="0.55", linewidths=1.0,
                       zorder=3, gid="constant", label="constant (dropped)")
        elif cat == -2:
            ax.scatter(xy[:, 0], xy[:, 1], s=14, c="0.3", zorder=3, gid="nodes")
        elif cat < 0:
            ax.scatter(xy[:, 0], xy[:, 1], s=14, c="0.75", zorder=3, gid="no_module", label="no module")
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=14, color=cmap(cat % 10), zorder=3, gid=f"module_{cat}",
                       label=f"module {cat}" if cat < 10 else None)
    for l, n in enumerate(shown):
        extra = f" (+{sizes[l] - n})" if sizes[l] > n else ""
        ax.text(l, 1.06, f"{sizes[l]}{extra}", ha="center", fontsize=8)
    ax.set_xlim(-0.3, len(sizes) - 0.7)
    ax.set_ylim(-0.08, 1.12)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"h{l}" for l in range(len(sizes))])
    ax.set_yticks([])
    ax.set_title(title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(fig, path)


def cumulative_edge_weight(edge_matrix) -> np.ndarray:
    """Fraction of a layer's edge weight carried by its k strongest edges, k = 1..num_edges.

    Row 0 and column 0 of ``edge_matrix`` (the constant nodes) are left out, as in `edge_sparsity`.
    """
    e = np.abs(np.asarray(edge_matrix, np.float64))
    if e.ndim != 2 or min(e.shape) < 2:
        raise ValueError(f"expected a (d^_{{l+1}}, d^_l) edge matrix with non-constant nodes; got shape {e.shape}.")
    w = e[1:, 1:].ravel()
    total = w.sum()
    if not total > 0:
        raise ValueError("All edges are zero; there is no edge weight to accumulate.")
    return np.cumsum(np.sort(w)[::-1]) / total


def plot_sparsity(edge_sets: Mapping[str, Sequence], *, fractions=(0.5, 0.9, 0.99), path=None,
                  title="Edge sparsity"):
    """Cumulative edge weight against the number of edges kept: one panel per layer, one curve per basis.

    Constant nodes are excluded, so the curves cross the guide lines at the counts of `edge_sparsity`.

    Args:
      edge_sets: ``{label: [E^0, ..., E^{L-2}]}`` (e.g. LIB and PCA edges of the same model).
      fractions: horizontal guide lines.
      path: optional output file.
    """
    num_layers = max(len(edges) for edges in edge_sets.values())
    fig, axes = _figure(ncols=num_layers, width=4.2)
    for l in range(num_layers):
        ax = axes[0, l]
        for label, edges in edge_sets.items():
            if l < len(edges):
                c = cumulative_edge_weight(edges[l])
                ax.semilogx(np.arange(1, c.size + 1), c, label=f"{label} ({c.size} edges)")
        for f in fractions:
            ax.axhline(f, color="0.6", lw=0.7, ls=":")
        ax.set_xlabel("number of strongest edges kept")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}: layer {l} -> {l + 1}", fontsize=10)
    axes[0, 0].set_ylabel("fraction of the layer's edge weight")
    return _save(fig, path)


def _setting(r):
    nb = "default" if r.get("nbeta") is None else f"{r['nbeta']:.3g}"
    return f"eps={r['step_size']:.3g}, nbeta={nb}, gamma={r['localization']:.3g}"


_UNCONVERGED = "not converged (R-hat > 1.05 or ESS < 100)"


def _checkpoint_axis(rows, ckpts):
    """x positions of checkpoints: their training steps (a ``step`` key, else parsed from the name) when every
    checkpoint has a distinct one, else their order; returns ``(x, label, log_scale, tick_labels or None)``."""
    from degenjax._src.sweep import checkpoint_step

    step, parsed = {}, False
    for r in rows:
        if r["checkpoint"] not in step:
            s = r.get("step")
            if not isinstance(s, (int, float)) or isinstance(s, bool):
                s, parsed = checkpoint_step(r["checkpoint"]), True
            step[r["checkpoint"]] = s
    steps = [step[c] for c in ckpts]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        x = np.asarray(steps, float)
        log = bool(np.min(x) > 0 and np.max(x) >= 10 * np.min(x))
        return x, "training step" + (" (from the checkpoint name)" if parsed else ""), log, None
    return np.arange(len(ckpts), dtype=float), "checkpoint", False, [pathlib.Path(c).name for c in ckpts]


def plot_llc_vs_checkpoint(rows: Sequence[Mapping], *, path=None, max_lines: int = 12, title="LLC per checkpoint"):
    """LLC mean +- std over chains against the training step of each checkpoint, one line per grid setting.

    The x axis is the training step parsed from each checkpoint's name (``step_00300.msgpack`` -> 300; log scale
    when the steps span a factor of 10 or more); checkpoints without distinct numbers are placed in order and
    labelled by file name. Cells that did not converge (``converged`` False: split R-hat > 1.05 or ESS < 100) are
    circled in red; failed or diverged cells (no finite LLC) are left out of their line.

    Args:
      rows: sweep result rows with ``checkpoint``, ``step_size``, ``nbeta``, ``localization``, ``llc_mean``,
        ``llc_std`` and optionally ``converged`` and ``step``; checkpoints appear in first-seen order.
      max_lines: draw at most this many settings (the first ones).
      path: optional output file.
    """
    ckpts = list(dict.fromkeys(r["checkpoint"] for r in rows))
    settings = list(dict.fromkeys(_setting(r) for r in rows))[:max_lines]
    fig, ax = _figure(width=max(5.0, 0.9 * len(ckpts) + 3), height=4.0)
    ax = ax[0, 0]
    x, xlabel, log, ticks = _checkpoint_axis(rows, ckpts)
    spread = (np.log10(np.max(x) / np.min(x)) if log else np.ptp(x)) if len(x) > 1 else 1.0
    bad_x, bad_y = [], []
    for k, s in enumerate(settings):
        by = {r["checkpoint"]: r for r in rows if _setting(r) == s}
        mean = np.array([np.nan if by.get(c, {}).get("llc_mean") is None else by[c]["llc_mean"] for c in ckpts], float)
        std = np.array([np.nan if by.get(c, {}).get("llc_std") is None else by[c]["llc_std"] for c in ckpts], float)
        off = (k - (len(settings) - 1) / 2) * 0.01 * max(spread, 1e-12)
        xs = x * 10.0**off if log else x + off
        ax.errorbar(xs, mean, yerr=std, marker="o", ms=3, capsize=3, lw=1, label=s)
        for c, xi, m in zip(ckpts, xs, mean):
            if by.get(c, {}).get("converged") is False and np.isfinite(m):
                bad_x.append(xi)
                bad_y.append(m)
    if bad_x:
        ax.scatter(bad_x, bad_y, s=90, facecolors="none", edgecolors="red", linewidths=1.3, zorder=5,
                   label=_UNCONVERGED, gid="unconverged")
    if log:
        ax.set_xscale("log")
    if ticks is not None:
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\hat\lambda$ (mean $\pm$ std over chains)")
    ax.set_title(title)
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_calibration_heatmap(rows: Sequence[Mapping], *, checkpoint: str | None = None, path=None,
                             title="LLC calibration"):
    """LLC mean over step size (x) and localization (y), one panel per nbeta, for one checkpoint.

    Cells without a finite LLC (diverged or failed) show ``x``; cells that did not converge (``converged``
    False: split R-hat > 1.05 or ESS < 100) show their value with a ``*`` and a red frame.

    Args:
      rows: sweep result rows.
      checkpoint: which checkpoint; default the last one in ``rows``.
      path: optional output file.
    """
    from matplotlib.patches import Rectangle

    if not rows:
        raise ValueError("plot_calibration_heatmap needs at least one result row.")
    checkpoint = checkpoint if checkpoint is not None else list(dict.fromkeys(r["checkpoint"] for r in rows))[-1]
    sel = [r for r in rows if r["checkpoint"] == checkpoint]
    if not sel:
        raise ValueError(f"No rows for checkpoint {checkpoint!r}.")
    steps = sorted({r["step_size"] for r in sel})
    locs = sorted({r["localization"] for r in sel})
    nbetas = list(dict.fromkeys(r.get("nbeta") for r in sel))
    fig, axes = _figure(len(nbetas), 1, width=1.0 + 0.9 * max(len(steps), 3), height=1.4 + 0.6 * max(len(locs), 3))
    any_bad = False
    for k, nb in enumerate(nbetas):
        ax = axes[0, k]
        grid = np.full((len(locs), len(steps)), np.nan)
        unconverged = np.zeros(grid.shape, bool)
        for r in sel:
            if r.get("nbeta") == nb:
                i, j = locs.index(r["localization"]), steps.index(r["step_size"])
                if r.get("llc_mean") is not None:
                    grid[i, j] = r["llc_mean"]
                unconverged[i, j] = r.get("converged") is False
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for i in range(len(locs)):
            for j in range(len(steps)):
                if not np.isfinite(grid[i, j]):
                    ax.text(j, i, "x", ha="center", va="center", fontsize=7, color="red")
                    continue
                txt = f"{grid[i, j]:.3g}" + ("*" if unconverged[i, j] else "")
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white")
                if unconverged[i, j]:
                    any_bad = True
                    ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="red", lw=1.5,
                                           gid="unconverged"))
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([f"{s:.2g}" for s in steps], fontsize=7)
        ax.set_yticks(range(len(locs)))
        ax.set_yticklabels([f"{g:.2g}" for g in locs], fontsize=7)
        ax.set_xlabel("step size")
        ax.set_ylabel("localization")
        ax.set_title(f"nbeta = {'default' if nb is None else f'{nb:.3g}'}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label=r"$\hat\lambda$ (LLC, mean over chains)")
    note = "\n* and red frame: not converged\n(R-hat > 1.05 or ESS < 100)" if any_bad else ""
    fig.suptitle(f"{title}: {pathlib.Path(checkpoint).name}{note}", **({"fontsize": 9} if note else {}))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# figures of the calibration (`degenjax.calibrate`, `degenjax.recommend`) and of the modules (`degenjax.find_modules`);
# they lived next to the numerics before and are drawn here so that those modules compute only


def _plot_recipe(calibration, *, path=None, title=None):
    """lambda^ against the step size (log axis) for every recipe of a `calibrate` result, with error bars, the
    extrapolation to step 0 (a star at the left edge, with its uncertainty), open markers and a "not converged"
    label on unconverged rungs, crosses on diverged ones, and the chosen step circled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    pairs = sorted({(r["nbeta"], r["localization"]) for r in calibration.table})
    recipes = calibration.recipes or (None,) * len(pairs)
    left = min(r["step_size"] for r in calibration.table) / 4
    for k, (nb, gamma) in enumerate(pairs):
        rows = [r for r in calibration.table if (r["nbeta"], r["localization"]) == (nb, gamma)]
        color = f"C{k}"
        label = f"nbeta={nb:.3g}, gamma={gamma:.3g}"
        ok = [r for r in rows if not r["diverged"]]
        xs = [r["step_size"] for r in ok]
        ax.errorbar(xs, [r["llc_mean"] for r in ok], yerr=[r["llc_se"] for r in ok], color=color, marker="o",
                    ls="-", lw=1, label=label, mfc=color)
        for r in ok:
            if not r["converged"]:
                ax.plot(r["step_size"], r["llc_mean"], "o", mfc="white", mec="red", ms=9)
                ax.annotate("not converged", (r["step_size"], r["llc_mean"]), fontsize=6, color="red",
                            xytext=(4, 4), textcoords="offset points")
            if r["chosen"]:
                ax.plot(r["step_size"], r["llc_mean"], "o", mfc="none", mec="black", ms=13, mew=1.5)
        for r in rows:
            if r["diverged"]:
                ax.plot(r["step_size"], ax.get_ylim()[1] if ok else 0.0, "x", color="red", ms=8)
        rec = recipes[k] if k < len(recipes) else None
        if rec is not None and np.isfinite(rec.llc):
            ax.errorbar([left], [rec.llc], yerr=[rec.uncertainty], color=color, marker="*", ms=12,
                        mfc=color if rec.trustworthy else "white")
            if xs:
                ax.plot([left, min(xs)], [rec.llc, min(ok, key=lambda r: r["step_size"])["llc_mean"]], color=color,
                        ls=":", lw=1)
            ax.annotate(f"{rec.llc:.4g} +- {rec.uncertainty:.2g}" + ("" if rec.trustworthy else " (not trusted)"),
                        (left, rec.llc), fontsize=7, xytext=(6, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("step size (star: extrapolated to 0)")
    ax.set_ylabel(r"$\hat\lambda$")
    ax.legend(fontsize=7)
    ax.set_title(title or "LLC recipe: lambda^ against the step size (open red: not converged)", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_calibration(calibration, *, metric: str = "llc_mean", path=None, title: str | None = None):
    """A calibration's figure: from `calibrate`, lambda^ against the step size with the extrapolation to 0 and the
    convergence of every rung (unconverged rungs are open red markers); from a grid (`recommend`), a heatmap of
    step size (x) by nbeta (y), one panel per localization.

    Each cell shows ``metric`` (colour and text) and the MALA acceptance; unstable cells are hatched and marked with
    the first letter of what failed (D diverged, N non-positive, F drifting, A acceptance); the recommended cell is
    outlined in red.

    Args:
      calibration: a `degenjax.Calibration` (from `calibrate`, or built from `recommend`'s grid).
      metric: a numeric table column (``"llc_mean"``, ``"llc_std"``, ``"mala_acceptance"``, ``"drift"``).
      path: optional file to save the figure to.
      title: figure title.

    Returns:
      A matplotlib ``Figure``.

    Raises:
      ValueError: for an unknown metric or an empty calibration.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    table = calibration.table
    if not table:
        raise ValueError("plot_calibration needs a calibration with at least one cell.")
    if calibration.grid is None:
        return _plot_recipe(calibration, path=path, title=title)
    if metric not in ("llc_mean", "llc_std", "mala_acceptance", "drift"):
        raise ValueError(f"metric must be one of 'llc_mean', 'llc_std', 'mala_acceptance', 'drift'; got {metric!r}.")
    eps = sorted({r["step_size"] for r in table})
    nbs = sorted({r["nbeta"] for r in table})
    gammas = sorted({r["localization"] for r in table})
    fig = Figure(figsize=(1.5 + 1.1 * len(eps) * len(gammas) + 1.0, 1.5 + 0.7 * len(nbs)), layout="constrained")
    axes = fig.subplots(1, len(gammas), squeeze=False)[0]
    finite_vals = [r[metric] for r in table if np.isfinite(r[metric])]
    vmin, vmax = (min(finite_vals), max(finite_vals)) if finite_vals else (0.0, 1.0)
    best = calibration.recommended
    for k, gamma in enumerate(gammas):
        ax = axes[k]
        values = np.full((len(nbs), len(eps)), np.nan)
        for r in table:
            if r["localization"] == gamma:
                values[nbs.index(r["nbeta"]), eps.index(r["step_size"])] = r[metric]
        im = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap="viridis", vmin=vmin,
                       vmax=vmax)
        for r in table:
            if r["localization"] != gamma:
                continue
            i, j = nbs.index(r["nbeta"]), eps.index(r["step_size"])
            text = f"{r[metric]:.3g}"
            if np.isfinite(r["mala_acceptance"]) and metric != "mala_acceptance":
                text += f"\nacc {r['mala_acceptance']:.2f}"
            if not r["stable"]:
                flags = "".join(c for c, bad in (("D", not r["finite"]), ("N", r["finite"] and not r["positive"]),
                                                  ("F", r["finite"] and not r["flat"]),
                                                  ("A", r["finite"] and not r["acceptance_ok"])) if bad)
                text += f"\n[{flags}]"
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=(1.0, 1.0, 1.0, 0.65), hatch="//",
                                       edgecolor="0.6", lw=0))
            bright = np.isfinite(r[metric]) and (r[metric] - vmin) > 0.6 * (vmax - vmin)  # viridis: light at the top
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if r["stable"] and not bright else "black")
            if best is not None and r is best:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
        ax.set_xticks(range(len(eps)), [f"{e:.2g}" for e in eps], fontsize=7)
        ax.set_yticks(range(len(nbs)), [f"{b:.3g}" for b in nbs], fontsize=7)
        ax.set_xlabel("step size")
        ax.set_ylabel("nbeta")
        ax.set_title(f"localization = {gamma:.3g}", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=metric)
    fig.suptitle(title or f"LLC calibration: {metric} (red: recommended; hatched: unstable)", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_modules(result, *, ax=None, layer_names: Sequence[str] | None = None, max_edges: int = 3000,
                 cmap: str = "tab10"):
    """Draws the interaction graph with node layers as columns, nodes coloured by module.

    Edge opacity and width scale with the log-scaled weight; only the ``max_edges`` heaviest edges are drawn.
    Unassigned nodes (constant direction, isolated) are grey.

    Args:
      result: a `degenjax.ModuleResult` from `find_modules`.
      ax: matplotlib Axes to draw into (default: a new ``Figure``, no pyplot state).
      layer_names: optional labels of the node layers.
      max_edges: the number of heaviest edges drawn.
      cmap: matplotlib colormap for the modules.

    Returns:
      The matplotlib Axes.
    """
    import matplotlib
    from matplotlib.collections import LineCollection

    if ax is None:
        _, axes = _figure(width=2.0 + 1.6 * len(result.assignment), height=4.5)
        ax = axes[0, 0]
    sizes = [len(a) for a in result.assignment]
    ymax = max(sizes)
    pos = [np.stack([np.full(s, float(l)), (np.arange(s) - (s - 1) / 2.0) / max(ymax - 1, 1)], axis=1)
           for l, s in enumerate(sizes)]
    segs, ws = [], []
    for l, w in enumerate(result.weights):
        i, j = np.nonzero(w > 0)
        segs.append(np.stack([pos[l][j], pos[l + 1][i]], axis=1))
        ws.append(w[i, j])
    if segs:
        segs_a, ws_a = np.concatenate(segs), np.concatenate(ws)
        keep = np.argsort(ws_a)[::-1][:max_edges]
        rel = ws_a[keep] / ws_a.max()
        colors = np.zeros((keep.size, 4))
        colors[:, 3] = 0.05 + 0.6 * rel
        ax.add_collection(LineCollection(segs_a[keep], colors=colors, linewidths=0.3 + 2.0 * rel, zorder=1))
    cm = matplotlib.colormaps[cmap]
    for l, a in enumerate(result.assignment):
        col = [cm(m % cm.N) if m >= 0 else (0.7, 0.7, 0.7, 1.0) for m in a]
        ax.scatter(pos[l][:, 0], pos[l][:, 1], c=col, s=30, zorder=2, edgecolors="k", linewidths=0.3)
    names = list(layer_names) if layer_names is not None else [f"layer {l}" for l in range(len(sizes))]
    ax.set_xticks(range(len(sizes)), names)
    ax.set_yticks([])
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_ylim(-0.6, 0.6)
    ax.set_title(f"{result.num_modules} module(s), Q = {result.modularity:.3f} ({result.method})")
    return ax
