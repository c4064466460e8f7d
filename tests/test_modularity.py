"""Modules of the interaction graph (DESIGN.md section 6): planted blocks, random graphs, Q against networkx."""

import jax
import jax.numpy as jnp
import matplotlib
import networkx as nx
import numpy as np
import pytest

import degenjax as dj

matplotlib.use("Agg")


def _planted(sizes=(10, 10, 10, 7), k=3, inter=0.0, seed=0):
    """Layered edges with node 0 of every layer the constant; the others in k modules (node i in module i % k)."""
    rng = np.random.default_rng(seed)
    mods = [np.r_[-1, np.arange(s - 1) % k] for s in sizes]
    edges = []
    for l in range(len(sizes) - 1):
        same = (mods[l + 1][:, None] == mods[l][None, :])
        e = np.where(same, rng.uniform(0.5, 2.0, same.shape), inter * rng.uniform(0.0, 1.0, same.shape))
        e[:, 0] = 50.0  # heavy constant edges must be dropped, or they would glue everything together
        e[0, :] = 30.0
        edges.append(e)
    return edges, mods


def _networkx_q(edges, assignment):
    """Newman Q computed independently: networkx on log(1 + E / mean positive E), constant nodes removed."""
    masked = [e[1:, 1:] for e in edges]
    scale = np.concatenate([m[m > 0] for m in masked]).mean()
    g = nx.Graph()
    for l, m in enumerate(masked):
        for i, j in zip(*np.nonzero(m)):
            g.add_edge((l + 1, i + 1), (l, j + 1), weight=np.log1p(m[i, j] / scale))
    comms = {}
    for l, a in enumerate(assignment):
        for i, mod in enumerate(a):
            if i > 0:
                comms.setdefault(int(mod), set()).add((l, i))
    return nx.community.modularity(g, list(comms.values()), weight="weight")


def _same_partition(a, b):
    a, b = np.concatenate(a), np.concatenate(b)
    keep = b >= 0
    pairs = {}
    for x, y in zip(a[keep], b[keep]):
        pairs.setdefault(int(y), set()).add(int(x))
    return all(len(v) == 1 for v in pairs.values()) and len(set().union(*pairs.values())) == len(pairs)


@pytest.mark.parametrize("method", ["leiden", "louvain"])
@pytest.mark.parametrize("inter", [0.0, 0.05])
def test_planted_blocks_recovered(method, inter):
    edges, mods = _planted(inter=inter)
    res = dj.find_modules([jnp.asarray(e) for e in edges], method=method, seed=1, num_null=10)
    assert res.significant and res.num_modules == 3
    assert _same_partition(res.assignment, mods)
    assert all(a[0] == -1 for a in res.assignment)  # constant nodes dropped
    assert res.modularity > 0.3
    np.testing.assert_allclose(res.modularity, _networkx_q(edges, res.assignment), rtol=1e-10)
    # the null graphs (entries permuted within each layer) have clearly lower Q
    assert res.modularity > res.null_modularity.max()


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_random_dense_graph_is_one_module(method):
    rng = np.random.default_rng(2)
    edges = [rng.uniform(0.5, 1.5, (12, 12)) for _ in range(3)]
    res = dj.find_modules(edges, method=method, seed=0, num_null=10)
    assert not res.significant and res.num_modules == 1 and res.modularity == 0.0
    assert all(np.all(a[1:] == 0) for a in res.assignment)
    # the partition that was rejected was no better than what the null graphs give
    assert abs(res.partition_modularity - res.null_modularity.mean()) < 3 * res.null_modularity.std() + 1e-12


def test_disconnected_components_are_modules_even_without_significance():
    """Heavy-tailed weights give the null graphs a high Q; exact disconnection is still reported as modules."""
    rng = np.random.default_rng(5)
    edges = []
    for _ in range(2):
        e = np.zeros((13, 13))
        e[1:7, 1:7] = rng.exponential(1.0, (6, 6)) ** 4
        e[7:, 7:] = rng.exponential(1.0, (6, 6)) ** 4
        edges.append(e)
    res = dj.find_modules(edges, num_null=10, null_z=50.0)  # an impossible bar: the null test fails
    assert not res.significant and res.num_modules == 2
    truth = [np.r_[-1, np.zeros(6, int), np.ones(6, int)]] * 3
    assert _same_partition(res.assignment, truth)
    np.testing.assert_allclose(res.modularity, _networkx_q(edges, res.assignment), rtol=1e-10)


def test_resolution_and_no_null():
    edges, mods = _planted(k=2)
    res = dj.find_modules(edges, num_null=0, resolution=1.0)
    assert res.significant and res.num_modules == 2 and res.null_modularity.shape == (0,)
    fine = dj.find_modules(edges, num_null=0, resolution=20.0)  # a high resolution splits the planted modules
    assert fine.num_modules > 2


def test_isolated_nodes_and_edges_from_jit():
    edges, mods = _planted(k=2)
    edges[1][:, 3] = 0.0  # node 3 of layer 1 is isolated (no edge out)
    edges[0][3, :] = 0.0  # and no edge in
    res = dj.find_modules(jax.jit(lambda es: [jnp.sqrt(jnp.square(e)) for e in es])(edges), num_null=5)
    assert res.assignment[1][3] == -1 and res.num_modules == 2


def test_plot_modules():
    edges, _ = _planted()
    res = dj.find_modules(edges, num_null=0)
    ax = dj.plot_modules(res, layer_names=["a", "b", "c", "d"])
    assert len(ax.collections) == 1 + len(edges) + 1  # edges, then one scatter per node layer
    colors = ax.collections[2].get_facecolors()
    assert np.allclose(colors[0][:3], 0.7)  # the constant node is grey
    assert len({tuple(c) for c in colors[1:]}) == 3
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("edges,match", [
    ([np.array([[1.0, -0.5], [0.2, 0.3]])], "negative"),
    ([np.array([[1.0, np.nan], [0.2, 0.3]])], "NaN"),
    ([np.zeros((3, 3))], "all edges are zero"),
    ([np.ones((3, 4)), np.ones((2, 2))], "share the node layer"),
    ([np.ones((0, 3))], "zero basis directions"),
    ([], "empty"),
    ("abc", "list of matrices"),
])
def test_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        dj.find_modules(edges)


def test_bad_options():
    edges, _ = _planted()
    with pytest.raises(ValueError, match="method"):
        dj.find_modules(edges, method="spectral")
    with pytest.raises(ValueError, match="resolution"):
        dj.find_modules(edges, resolution=0.0)
    with pytest.raises(ValueError, match="drop_constant"):
        dj.find_modules(edges, drop_constant=[True, False])
