"""Modules of the interaction graph (docs/maths.md#modularity).

Nodes are basis directions of the node layers, edges connect consecutive layers with weights from the interaction
edges ``E^l`` (shape ``(d^_{l+1}, d^_l)``, see `interaction_edges`). Edge weights are log-scaled,
``w = log(1 + E / s)`` with ``s`` the mean positive edge over the whole graph, so that a few dominant edges do not
decide the clustering alone while small edges stay (nearly) linear. The constant direction (basis column 0) is
dropped. Clustering uses Leiden (python-igraph + leidenalg, default) or Louvain (networkx); the reported modularity
is Newman's Q (resolution 1) of the returned assignment.

Modularity maximisation finds some structure in any graph, so the partition is tested against a null model that
keeps each node's strength profile but no block structure: in each layer pair the ratios of the weights to their
configuration-model expectation ``s_i t_j / T`` (row and column strengths, total) are permuted at random and
multiplied back onto the expectation (a plain permutation of the weights would destroy the hub structure that
interaction graphs have and give the null graphs a spuriously high Q). Null graphs are clustered the same way. When
the partition's Q does not exceed the null mean by ``null_z`` null standard deviations, ``significant`` is False and
the modules reported are the connected components of the graph (structure that no reweighting can create): one
module for a connected graph (Q = 0), the components otherwise (with their Q).

Clustering runs on the host (igraph/networkx), so `find_modules` is not traceable; call it on concrete edges
(e.g. the output of a jitted `interaction_edges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class ModuleResult(NamedTuple):
    """Result of `find_modules`.

    Attributes:
      assignment: per node layer ``l = 0..L``, an int array ``(d^_l,)`` with the module of each basis direction;
        -1 for the dropped constant direction and for isolated nodes (no edge with positive weight).
      modularity: Newman Q (resolution 1) of ``assignment``; 0.0 when the graph is one module.
      num_modules: the number of modules in ``assignment``.
      significant: whether the best partition beat the null model (always True when ``num_null = 0``); when
        False, ``assignment`` holds the connected components (one module for a connected graph).
      partition_modularity: Q of the best partition found, before the significance test.
      null_modularity: ``(num_null,)`` Q of the partitions found on the null graphs (strength-preserving
        permutations, see the module docstring).
      weights: per ``l``, the log-scaled weights ``(d^_{l+1}, d^_l)`` used as the graph (constant rows/columns zero).
      method: "leiden" or "louvain".
    """

    assignment: tuple[np.ndarray, ...]
    modularity: float
    num_modules: int
    significant: bool
    partition_modularity: float
    null_modularity: np.ndarray
    weights: tuple[np.ndarray, ...]
    method: str


def _check_edges(edges) -> list[np.ndarray]:
    if hasattr(edges, "shape") and len(np.shape(edges)) == 2:
        edges = [edges]
    if not isinstance(edges, Sequence) or isinstance(edges, (str, bytes)):
        raise ValueError(f"edges must be a list of matrices E^l of shape (d_{{l+1}}, d_l) (from interaction_edges) or "
                         f"one such matrix; got {type(edges).__name__}.")
    if len(edges) == 0:
        raise ValueError("edges is empty; pass the list returned by interaction_edges.")
    out = []
    for l, e in enumerate(edges):
        a = np.asarray(e, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"edges[{l}] must be a matrix (d_{{l+1}}, d_l); got shape {a.shape}.")
        if a.size == 0:
            raise ValueError(f"edges[{l}] has shape {a.shape}: a layer with zero basis directions has no nodes.")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"edges[{l}] contains NaN or inf; recompute the edges (check the basis for "
                             "divergence) before clustering.")
        if np.any(a < 0):
            raise ValueError(f"edges[{l}] has negative entries (min {a.min():.3g}); interaction edges are squared "
                             "attributions and must be >= 0. Pass E^l from interaction_edges, not signed weights.")
        if l > 0 and a.shape[1] != out[-1].shape[0]:
            raise ValueError(f"edges[{l}] has {a.shape[1]} input nodes but edges[{l - 1}] has {out[-1].shape[0]} "
                             "output nodes; consecutive E^l must share the node layer between them.")
        out.append(a)
    return out


def _log_weights(edges: list[np.ndarray], drop: list[bool]) -> list[np.ndarray]:
    masked = []
    for l, e in enumerate(edges):
        e = e.copy()
        if drop[l]:
            e[:, 0] = 0.0
        if drop[l + 1]:
            e[0, :] = 0.0
        masked.append(e)
    pos = np.concatenate([e[e > 0] for e in masked])
    if pos.size == 0:
        raise ValueError("all edges are zero (after dropping the constant direction); there is no graph to cluster.")
    scale = pos.mean()
    return [np.log1p(e / scale) for e in masked]


def _graph_arrays(weights: list[np.ndarray]):
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    src, dst, wts = [], [], []
    for l, w in enumerate(weights):
        i, j = np.nonzero(w > 0)
        src.append(offsets[l + 1] + i)
        dst.append(offsets[l] + j)
        wts.append(w[i, j])
    return sizes, offsets, np.concatenate(src), np.concatenate(dst), np.concatenate(wts)


def _cluster(n, src, dst, wts, *, method, resolution, seed):
    """Returns (membership (n,), Newman Q at resolution 1) for the weighted undirected graph."""
    if method == "leiden":
        import igraph as ig
        import leidenalg

        g = ig.Graph(n=n, edges=list(zip(src.tolist(), dst.tolist())), directed=False)
        g.es["weight"] = wts.tolist()
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                        resolution_parameter=resolution, seed=int(seed), n_iterations=-1)
        membership = np.asarray(part.membership, np.int64)
        q = g.modularity(membership.tolist(), weights="weight")
    else:
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(range(n))
        g.add_weighted_edges_from(zip(src.tolist(), dst.tolist(), wts.tolist()))
        comms = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=int(seed))
        membership = np.zeros(n, np.int64)
        for k, c in enumerate(comms):
            membership[list(c)] = k
        q = nx.community.modularity(g, comms, weight="weight")
    return membership, float(q)


def _components(n, src, dst) -> np.ndarray:
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(src.tolist(), dst.tolist()))
    membership = np.zeros(n, np.int64)
    for k, c in enumerate(sorted(nx.connected_components(g), key=min)):
        membership[list(c)] = k
    return membership


def _modularity(n, src, dst, wts, membership) -> float:
    """Newman Q: sum over modules of (internal weight / W) - (module strength / 2W)^2."""
    total = wts.sum()
    internal = np.bincount(membership[src], weights=np.where(membership[src] == membership[dst], wts, 0.0),
                           minlength=n)
    strength = np.bincount(membership[src], weights=wts, minlength=n) + np.bincount(membership[dst], weights=wts,
                                                                                   minlength=n)
    return float(np.sum(internal / total - (strength / (2.0 * total)) ** 2))


def find_modules(edges, *, resolution: float = 1.0, seed: int = 0, method: str = "leiden",
                 drop_constant: bool | Sequence[bool] = True, num_null: int = 20, null_z: float = 3.0) -> ModuleResult:
    """Clusters the interaction graph into modules (docs/maths.md#modularity).

    Args:
      edges: list of ``E^l``, ``l = 0..L-1``, shape ``(d^_{l+1}, d^_l)``, entries >= 0 (from `interaction_edges`);
        a single matrix is one layer pair.
      resolution: resolution of the modularity objective (1 = Newman modularity; larger gives smaller modules).
      seed: seed of the clustering and of the null permutations.
      method: "leiden" (igraph + leidenalg) or "louvain" (networkx).
      drop_constant: drop basis direction 0 (the constant direction) of every node layer (True), of none (False),
        or per node layer (a sequence of ``L + 1`` bools).
      num_null: number of null graphs for the significance test (0 disables it).
      null_z: the partition is kept when ``Q > mean(Q_null) + null_z * std(Q_null)``.

    Returns:
      `ModuleResult`.

    Raises:
      ValueError: for negative, NaN or all-zero edges, empty layers, mismatched shapes or bad options.
    """
    if method not in ("leiden", "louvain"):
        raise ValueError(f"method must be 'leiden' or 'louvain'; got {method!r}.")
    resolution = float(resolution)
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0; got {resolution}.")
    if int(num_null) < 0:
        raise ValueError(f"num_null must be >= 0; got {num_null}.")
    mats = _check_edges(edges)
    num_layers = len(mats) + 1
    if isinstance(drop_constant, (bool, np.bool_)):
        drop = [bool(drop_constant)] * num_layers
    else:
        drop = [bool(x) for x in drop_constant]
        if len(drop) != num_layers:
            raise ValueError(f"drop_constant has {len(drop)} entries; pass one per node layer ({num_layers}).")
    weights = _log_weights(mats, drop)
    sizes, offsets, src, dst, wts = _graph_arrays(weights)
    n = int(offsets[-1])
    membership, q = _cluster(n, src, dst, wts, method=method, resolution=resolution, seed=seed)

    rng = np.random.default_rng(seed)
    null_q = []
    for r in range(int(num_null)):
        perm = []
        for l, w in enumerate(weights):
            # strength-preserving null: permute the ratios w_ij / (s_i t_j / T) to the configuration-model
            # expectation (row strengths s, column strengths t, total T), then multiply the expectation back
            r0, c0 = int(drop[l + 1]), int(drop[l])
            block = w[r0:, c0:]
            expect = np.outer(block.sum(1), block.sum(0)) / block.sum()
            support = expect > 0
            ratio = np.zeros_like(block)
            ratio[support] = block[support] / expect[support]
            p = np.zeros_like(w)
            p[r0:, c0:][support] = expect[support] * rng.permutation(ratio[support])
            perm.append(p)
        _, _, s2, d2, w2 = _graph_arrays(perm)
        null_q.append(_cluster(n, s2, d2, w2, method=method, resolution=resolution, seed=seed + 1 + r)[1])
    null_q = np.asarray(null_q, np.float64)
    significant = bool(null_q.size == 0 or q > null_q.mean() + null_z * null_q.std())

    degree = np.zeros(n)
    np.add.at(degree, src, wts)
    np.add.at(degree, dst, wts)
    isolated = degree == 0
    if not significant:
        membership = _components(n, src, dst)
        q_returned = _modularity(n, src, dst, wts, membership)
    else:
        q_returned = q
    membership = np.where(isolated, -1, membership)
    # renumber modules 0..K-1 by first appearance
    labels = {}
    for m in membership:
        if m >= 0 and m not in labels:
            labels[m] = len(labels)
    membership = np.asarray([labels.get(m, -1) for m in membership], np.int64)
    for l in range(num_layers):
        if drop[l]:
            membership[offsets[l]] = -1
    modularity = q_returned if len(labels) > 1 else 0.0
    assignment = tuple(membership[offsets[l]:offsets[l + 1]] for l in range(num_layers))
    return ModuleResult(assignment, float(modularity), len(labels), significant, float(q), null_q,
                        tuple(weights), method)
