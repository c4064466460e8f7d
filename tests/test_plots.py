"""Figures are checked through their artists (lines, collections, labels, colours, legend entries), not pixels."""

import matplotlib.colors as mcolors
import numpy as np
import pytest

from degenjax._src import plots


def _legend_labels(ax):
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_spectra_keep_coinciding_lines_visible_and_mark_the_cutoff():
    rng = np.random.default_rng(0)
    layer = [np.sort(rng.random(6))[::-1] * 10.0 ** -np.arange(6) for _ in range(2)]
    # PCA variances equal the activation Gram's eigenvalues (centred layer): the two lines coincide
    spectra = {"activation Gram": layer, "LIB Lambda": [v[:4] * 2 for v in layer], "PCA variance": layer}
    fig = plots.plot_spectra(spectra, cutoffs=[4, None], cutoff_label="LIB keeps")
    ax0, ax1 = fig.axes[:2]
    lines = {l.get_gid(): l for l in ax0.get_lines()}
    assert set(lines) == {"activation Gram", "LIB Lambda", "PCA variance", "cutoff"}
    gram, pca = lines["activation Gram"], lines["PCA variance"]
    np.testing.assert_allclose(gram.get_ydata(), pca.get_ydata())  # same data ...
    # ... drawn distinguishably: the first wide and underneath, the later one narrower, dashed/dotted, marked, above
    assert gram.get_linewidth() > 2 * pca.get_linewidth() and gram.get_zorder() < pca.get_zorder()
    assert gram.get_linestyle() != pca.get_linestyle() and pca.get_marker() not in ("", "None", None)
    colours = [mcolors.to_hex(lines[k].get_color()) for k in ("activation Gram", "LIB Lambda", "PCA variance")]
    assert len(set(colours)) == 3
    # the cutoff after the 4th direction, in the legend with its count; layer 1 has no cutoff
    np.testing.assert_allclose(lines["cutoff"].get_xdata(), [3.5, 3.5])
    assert _legend_labels(ax0) == ["activation Gram", "LIB Lambda", "PCA variance", "LIB keeps: 4"]
    assert "cutoff" not in {l.get_gid() for l in ax1.get_lines()} and len(ax1.get_lines()) == 3


def _graph_edges():
    rng = np.random.default_rng(1)
    e0, e1 = rng.random((4, 3)) + 0.1, rng.random((3, 4)) + 0.1
    e0[0, :] = e0[:, 0] = e1[0, :] = e1[:, 0] = 50.0  # heavy constant-direction edges
    e1[2, 3] = 0.0  # one missing edge
    return [e0, e1]


def test_interaction_graph_drops_constant_nodes_and_their_edges():
    edges = _graph_edges()
    modules = [np.array([-1, 0, 1]), np.array([-1, 0, 1, -1]), np.array([-1, 1, 0])]  # -1: constant / isolated
    fig = plots.plot_interaction_graph(edges, modules=modules)
    ax = fig.axes[0]
    (lc,) = [c for c in ax.collections if c.get_gid() == "edges"]
    segments = lc.get_segments()
    # every non-constant nonzero edge is drawn and nothing else: 3 x 2 + (2 x 3 - 1)
    assert len(segments) == 3 * 2 + 2 * 3 - 1
    scatters = {c.get_gid(): c for c in ax.collections if c.get_gid() != "edges"}
    assert set(scatters) == {"constant", "no_module", "module_0", "module_1"}
    constant_xy = {tuple(p) for p in np.round(scatters["constant"].get_offsets(), 9)}
    assert constant_xy == {(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)}  # node 0 of each layer (drawn at the top)
    for seg in segments:  # no drawn edge touches a constant node
        assert not ({tuple(p) for p in np.round(seg, 9)} & constant_xy)
    # the constant nodes are hollow and grey, not in any module colour; the isolated node is grey too
    assert scatters["constant"].get_facecolors().size == 0 or np.all(scatters["constant"].get_facecolors()[:, 3] == 0)
    module_colours = {mcolors.to_hex(scatters[f"module_{m}"].get_facecolors()[0]) for m in (0, 1)}
    grey = {mcolors.to_hex(scatters[k].get_edgecolors()[0] if k == "constant" else scatters[k].get_facecolors()[0])
            for k in ("constant", "no_module")}
    assert len(module_colours) == 2 and not (module_colours & grey)
    assert all(len(set(mcolors.to_rgb(c))) == 1 for c in grey)  # r = g = b
    assert len(scatters["module_0"].get_offsets()) == 3 and len(scatters["module_1"].get_offsets()) == 3
    assert _legend_labels(ax) == ["module 0", "module 1", "no module", "constant (dropped)"]
    # without dropping, the constant's edges are drawn too
    ax = plots.plot_interaction_graph(edges, drop_constant=False).axes[0]
    (lc,) = [c for c in ax.collections if c.get_gid() == "edges"]
    assert len(lc.get_segments()) == 3 * 4 + 4 * 3 - 1


def test_llc_vs_checkpoint_uses_the_step_key_and_labels_the_axis():
    rows = [{"checkpoint": name, "step": s, "step_size": 1e-4, "nbeta": None, "localization": 1.0,
             "llc_mean": m, "llc_std": 0.1, "converged": True}
            for name, s, m in (("final.msgpack", 5000, 3.0), ("warmup.msgpack", 50, 1.0), ("mid.msgpack", 700, 2.0))]
    ax = plots.plot_llc_vs_checkpoint(rows).axes[0]
    assert ax.get_xlabel() == "training step" and ax.get_xscale() == "log"
    (container,) = ax.containers
    line = container.lines[0]  # the errorbar's data line: x = the steps of the `step` key, not the file names
    np.testing.assert_allclose(line.get_xdata(), [5000, 50, 700])
    np.testing.assert_allclose(line.get_ydata(), [3.0, 1.0, 2.0])
    assert not any(t.get_text().endswith(".msgpack") for t in ax.get_xticklabels())


def test_calibration_heatmap_colourbars_are_labelled():
    rows = [{"checkpoint": "c", "step_size": e, "nbeta": nb, "localization": g, "llc_mean": e * 1e4 + g,
             "llc_std": 0.1, "converged": True} for e in (1e-4, 1e-3) for g in (1.0, 10.0) for nb in (None, 50.0)]
    fig = plots.plot_calibration_heatmap(rows)
    images = [ax for ax in fig.axes if ax.images]
    colourbars = [ax for ax in fig.axes if not ax.images]
    assert len(images) == 2 and len(colourbars) == 2  # one panel per nbeta, each with its colour bar
    for cb in colourbars:
        assert "LLC" in cb.get_ylabel()


@pytest.mark.parametrize("diverged", [False, True])
def test_loss_traces_draw_running_mean_and_band(diverged):
    rng = np.random.default_rng(2)
    trace = 1.0 + 0.1 * rng.normal(size=(3, 50)) + np.linspace(0, 0.3, 50)
    if diverged:
        trace[2, 30:] = np.nan
    fig = plots.plot_loss_traces(trace, init_loss=0.9, llc=2.0)
    ax = fig.axes[0]
    finite = trace[:2] if diverged else trace
    # independent reference: per-chain running means by explicit loops
    running = np.array([[np.mean(chain[: t + 1]) for t in range(50)] for chain in finite])
    (mean_line,) = [l for l in ax.get_lines() if l.get_gid() == "running_mean"]
    np.testing.assert_allclose(mean_line.get_ydata(), running.mean(0), rtol=1e-12)
    (band,) = [c for c in ax.collections if c.get_gid() == "band"]
    ys = band.get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([ys.min(), ys.max()], [np.min(running.mean(0) - running.std(0)),
                                                      np.max(running.mean(0) + running.std(0))], rtol=1e-12)
    labels = _legend_labels(ax)
    assert "running mean" in labels and any("std over chains" in t for t in labels)
    assert len([l for l in ax.get_lines() if l.get_gid() is None and l.get_label().startswith("chain")]) == 3
