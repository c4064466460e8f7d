"""Interaction edges between basis directions, their sparsity, and edge/node ablations (arXiv 2405.10928, sec. 2).

``E^l_{ij} = (1/(N P_l)) sum_x sum_t ( sum_s d h^_{l+1,(t,i)} / d h^_{l,(s,j)} * h^_{l,(s,j)} )^2``: gradient times
activation, summed over input positions inside the square, squared, summed over output positions ``t``, averaged
over data points and normalised by the node layer's number of positions ``P_l`` (the normalisation of the Jacobian
Gram ``M^l``, so that for a linear section ``sum E^l = sum Lambda^l``; with no positions axis ``P_l = 1``).
Derivatives are taken at the data's activations; the tangent of ``h^_{l,j}`` is row ``j`` of ``C^{l+}`` over the
features the section takes (on folded node layers the constant included: the constant node then has edges, the bias
contributions). Edges run between consecutive node layers ``l -> l+1`` for ``l = 0..L-2``, and with
``output=True`` also from the last node layer to the raw output (no basis there). Row 0 and column 0 are the
constant nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.basis import InteractionBasis, check_basis_matches, from_hat, section_width, to_hat
from degenjax._src.compileopts import lib_jit
from degenjax._src.grams import as_batch_list
from degenjax._src.numerics import HIGHEST, acc_dtype
from degenjax._src.progress import track
from degenjax._src.sections import as_sections, forward, section_shapes
from degenjax._src.attention import attention_edges
from degenjax._src.structure import affine_elementwise, attention_structure
from degenjax._src.types import getitem_by_field
from degenjax._src.validation import (check_batch_list, check_finite_nonnegative, check_finite_params,
                                      check_positive_int, is_traced)


def _section_to_hat(model, params, C_next, l):
    """``h -> f_l(h) C^{l+1}`` (basis coordinates of the next node layer), or the raw output when ``C_next`` is
    None."""
    f = model.fns[l]
    if C_next is None:
        return lambda h: f(params, h)
    return lambda h: to_hat(f(params, h), C_next)


def _batch_edges(g, h, hh, Cp, chunk_size: int, mode: str):
    """Unnormalised ``sum_x sum_t (sum_s J h^)^2`` for one batch: ``(d^_{l+1}, d^_l)`` in the accumulation dtype."""
    dt = acc_dtype()
    d = h.shape[-1]
    dh = hh.shape[-1]
    Cp_h = Cp[:, :d].astype(h.dtype)  # (d^_l, d_l): tangent of each basis coordinate in the section's input space
    if mode == "jvp":
        _, lin = jax.linearize(g, h)
        cols = []
        for start in range(0, dh, chunk_size):
            j = np.arange(start, min(start + chunk_size, dh))
            # tangent_j[b, s, :] = h^_{b,s,j} C^+[j, :d]
            t = jnp.moveaxis(hh[..., j], -1, 0)[..., None] * jnp.reshape(Cp_h[j], (len(j),) + (1,) * (h.ndim - 1) + (d,))
            out = jax.vmap(lin)(t)  # (k, B, ..., d^_{l+1})
            o = jnp.reshape(out, (len(j), -1, out.shape[-1])).astype(dt)
            cols.append(jnp.einsum("kni,kni->ik", o, o))
        return jnp.concatenate(cols, axis=1)
    y, pullback = jax.vjp(g, h)
    n_out, d_next = math.prod(y.shape[1:]), y.shape[-1]
    rows = []
    hh_flat = jnp.reshape(hh, (hh.shape[0], -1, dh))
    for start in range(0, n_out, chunk_size):
        idx = jnp.arange(start, min(start + chunk_size, n_out))
        e = jax.nn.one_hot(idx, n_out, dtype=y.dtype).reshape((idx.shape[0], 1) + y.shape[1:])
        grads = jax.vmap(pullback)(jnp.broadcast_to(e, (idx.shape[0],) + y.shape))[0]  # (k, B, ..., d_l)
        gh = jnp.reshape(grads, (idx.shape[0], h.shape[0], -1, d)) @ Cp_h.T  # (k, B, P_l, d^_l)
        a = jnp.sum(gh * hh_flat[None], axis=2).astype(dt)  # (k, B, d^_l)
        rows.append(jnp.sum(a * a, axis=1))
    flat = jnp.concatenate(rows, axis=0)  # (P_out * d^_{l+1}, d^_l)
    return jnp.sum(jnp.reshape(flat, (-1, d_next, dh)), axis=0)


_EDGE_CHUNK_ELEMENTS = 1 << 22


def _structured_edges(split, hh, Cp, C_next):
    """Edge sums for an affine-elementwise section ``post(h W) [V] [+ h A0]`` (see structure.py), one row ``r`` at
    a time in chunks: ``sum_r (h^_rj (A0' + A diag(s_r) B)_ji)^2`` with ``A = C^+ W``, ``B = V C'``,
    ``A0' = C^+ A0 C'`` (``C'`` the next layer's basis over the section's output features, or the identity on the
    raw output).

    Rows are data points times (selected) positions: the section acts on each position separately, so the
    input-position sum of the edge definition has one term. One large matrix product per chunk of rows, in the
    section's dtype at full precision; each chunk's squares are summed in that dtype (at most ``c`` positive
    terms) and the chunks in the accumulation dtype. Returns ``(d^_{l+1}, d^_l)``.
    """
    dt = acc_dtype()
    cdt = split.z.dtype
    dk = split.slope.shape[-1]
    d_in, d_out = split.W.shape[0], split.d_out
    Cp_h = Cp[:, :d_in].astype(cdt)
    Bn = jnp.eye(d_out, dtype=cdt) if C_next is None else C_next[:d_out].astype(cdt)  # (d_out, d^_{l+1})
    A = jnp.matmul(Cp_h, split.W.astype(cdt), precision=HIGHEST)  # (d^_l, d_k)
    B = Bn if split.V is None else jnp.matmul(split.V.astype(cdt), Bn, precision=HIGHEST)  # (d_k, d^_{l+1})
    A0 = None if split.A0 is None else jnp.matmul(jnp.matmul(Cp_h, split.A0.astype(cdt), precision=HIGHEST), Bn,
                                                    precision=HIGHEST)  # (d^_l, d^_{l+1})
    dh, dn = A.shape[0], B.shape[1]
    s = jnp.reshape(split.slope, (-1, dk)).astype(cdt)
    hr = jnp.reshape(split.select(hh), (-1, dh)).astype(cdt)
    rows = s.shape[0]
    c = max(1, min(rows, _EDGE_CHUNK_ELEMENTS // max(1, max(dh, dk) * dn)))
    m, rem = divmod(rows, c)

    def chunk(sc, hc):
        # one wide product A @ [diag(s_1) B | ... | diag(s_c) B]: (d^_l, d_k) x (d_k, c d^_{l+1}); about twice the
        # throughput of c products (A diag(s_r)) @ B on CPU
        n = sc.shape[0]
        # formed in its (d_k, c, d^_{l+1}) layout from the small transposed slopes: no copy of a transposed product
        Bs = jnp.reshape(sc.T[:, :, None] * B[:, None, :], (dk, n * dn))
        U = jnp.reshape(jnp.matmul(A, Bs, precision=HIGHEST), (dh, n, dn))  # U[j, r, i]
        if A0 is not None:
            U = U + A0[:, None, :]
        U = U * hc.T[:, :, None]
        return jnp.sum(U * U, axis=1).T.astype(dt)

    def body(total, xs):
        return total + chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((dn, dh), dt),
                            (jnp.reshape(s[:m * c], (m, c, dk)), jnp.reshape(hr[:m * c], (m, c, dh))))
    if rem:
        total = total + chunk(s[m * c:], hr[m * c:])
    return total


def _edges_step(params, x, Cs, Cps, *, model, chunk_size: int, modes: tuple, structured: bool = False):
    """Unnormalised edge sums of every layer for one input batch (``len(modes)`` layers; the last one maps to the
    raw output when ``len(modes) == L``)."""
    _, acts = forward(model, params, x)
    out = []
    L = len(model)
    for l, m in enumerate(modes):
        h = acts[l]
        hh = to_hat(h, Cs[l])
        C_next = Cs[l + 1] if l + 1 < L else None
        split = affine_elementwise(model.fns[l], params, h) if structured else None
        if split is not None:
            out.append(_structured_edges(split, hh, Cps[l], C_next))
            continue
        att = attention_structure(model.fns[l], params, h) if structured else None
        if att is not None:
            out.append(attention_edges(att, hh, Cps[l], C_next, acc_dtype()))
            continue
        g = _section_to_hat(model, params, C_next, l)
        out.append(_batch_edges(g, h, hh, Cps[l], chunk_size, m))
    return out


_edges_step_jit = lib_jit(_edges_step, static_argnames=("model", "chunk_size", "modes", "structured"))


def interaction_edges(model, params, basis: InteractionBasis, batches, *, chunk_size: int = 64,
                      mode: str = "auto", jit: bool = True, structured: bool = True, output: bool = False,
                      constant: str | None = None, progress: bool = False) -> list[jax.Array]:
    """Interaction edges ``E^l`` between node layers ``l`` and ``l+1`` for ``l = 0..L-2``, streamed over batches.

    With ``output=True`` the list also holds ``E^{L-1}``, from the last node layer to the raw network output
    (output features as nodes, no basis and no constant node there; ApolloResearch rib's convention).

    Sections of the form ``[h +] phi(h @ W) [@ V + c]`` (dense layers around an elementwise activation, with an
    optional residual connection and position read-out; see `degenjax.structured_sections`) use the exact
    factorised Jacobian ``[I +] W diag(phi') V`` in one large matrix product per chunk of rows
    (``structured=True``, the default). For the others, per batch, one linearisation of section
    ``l`` is pushed through ``chunk_size`` basis directions at a time
    (``vmap`` of ``jvp`` over input directions ``j``, or of ``vjp`` over output entries ``(t, i)`` when those are
    fewer), so memory is ``chunk_size x batch x positions x width``, never the whole data set's Jacobian.

    Args:
      model: `Sections` (or a list of functions).
      params: the model's params.
      basis: an `InteractionBasis` of this model.
      batches: an input batch or an iterable of batches.
      chunk_size: basis directions (or output entries) per ``vmap``.
      mode: ``"auto"`` (cheaper of the two), ``"jvp"`` or ``"vjp"``.
      jit: compile the per-batch step (cached per model and shapes), as the Gram functions do; False runs it op
        by op. Inside the user's ``jax.jit`` either way works.
      structured: use the factorised path where a section allows it; False always uses ``vmap`` of ``jvp``/``vjp``.
      output: also return the edges from the last node layer to the raw output.
      constant: ``"append"`` or ``"last"`` (see `degenjax.Sections`); default the model's own.
      progress: show a tqdm progress bar over the batches.

    Returns:
      List of ``L - 1`` arrays (``L`` with ``output=True``), ``E^l`` of shape ``(d^_{l+1}, d^_l)`` in the
      accumulation dtype (float64 with x64); row 0 / column 0 belong to the constant nodes (``E^{L-1}``: shape
      ``(d_out, d^_{L-1})``, rows the output features).

    Raises:
      ValueError: a basis for another model (layer count or feature sizes), NaN params, bad mode.
    """
    if mode not in ("auto", "jvp", "vjp"):
        raise ValueError(f"mode must be 'auto', 'jvp' or 'vjp'; got {mode!r}.")
    check_positive_int(chunk_size, "chunk_size", "interaction_edges")
    model = as_sections(model, constant)
    check_basis_matches(model, basis)
    check_finite_params(params, "edges need a finite network")
    batches = as_batch_list(batches, "interaction_edges")
    check_batch_list(model, params, batches, "interaction_edges", float_inputs=True)
    shapes = section_shapes(model, params, batches[0])
    check_basis_matches(model, basis, shapes)
    L = len(model)
    n_layers = L if output else L - 1
    modes = []
    for l in range(n_layers):
        nxt = shapes[l + 1]
        if l == L - 1 and (not isinstance(nxt, jax.ShapeDtypeStruct) or len(nxt.shape) < 2):
            raise ValueError("interaction_edges(output=True): the network output must be one array of shape (batch, "
                             "[positions...,] features).")
        width = basis.C[l + 1].shape[1] if l + 1 < L else nxt.shape[-1]
        n_out = math.prod(nxt.shape[1:-1]) * width
        modes.append(mode if mode != "auto" else ("jvp" if basis.C[l].shape[1] <= n_out else "vjp"))
    step = _edges_step_jit if jit else _edges_step
    totals, count = None, [0] * n_layers
    for x in track(batches, "interaction edges", progress):
        sums = step(params, x, tuple(basis.C), tuple(basis.C_pinv), model=model, chunk_size=int(chunk_size),
                    modes=tuple(modes), structured=bool(structured))
        if not is_traced(sums):  # summed on the host: no small device programs to compile
            sums = [np.asarray(a) for a in sums]
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
        n = jnp.shape(jax.tree.leaves(x)[0])[0]
        count = [c + n * math.prod(shapes[l].shape[1:-1]) for l, c in enumerate(count)]
    if totals is None:
        return []
    edges = [t / c for t, c in zip(totals, count)]
    if not is_traced(edges):
        edges = [jax.device_put(e) for e in edges]  # no per-shape program (as jnp.asarray would compile)
        for l, e in enumerate(edges):
            if not bool(np.all(np.isfinite(np.asarray(e)))):
                nxt = model.layer_name(l + 1) if l + 1 < L else "output"
                raise ValueError(f"edges E^{l} ({model.layer_name(l)} -> {nxt}) are not finite; check the inputs and "
                                 "params.")
    return edges


class EdgeSparsity(NamedTuple):
    """How many edges carry each fraction of the total edge weight, per layer (from `edge_sparsity`).

    Attributes:
      fractions: the fractions asked for, a tuple of floats in ``(0, 1]``.
      counts: ``(num_layers, num_fractions)`` int, the fewest edges whose weights sum to at least
        ``fraction * total`` (0 for a layer without weight).
      num_edges: ``(num_layers,)`` int, non-constant edges per layer.
      total_weight: ``(num_layers,)`` total non-constant edge weight per layer.
      fraction_of_edges: ``(num_layers, num_fractions)``, ``counts / num_edges``.

    ``_asdict()`` gives a dict; ``result["counts"]`` also works (the former dict interface).
    """

    fractions: tuple
    counts: jax.Array
    num_edges: jax.Array
    total_weight: jax.Array
    fraction_of_edges: jax.Array

    __getitem__ = getitem_by_field


class EdgesRequired(NamedTuple):
    """One layer's result of `edges_required`.

    Attributes:
      layer: the section ``l`` (edges ``l -> l + 1``).
      required: the fewest non-constant edges kept so that ``metric`` stays within ``tol``.
      num_edges: the layer's non-constant edges.
      metric_full: ``metric`` with every edge kept (the truncated network).
      metric_at_required: ``metric`` with the ``required`` largest edges kept.
    """

    layer: int
    required: int
    num_edges: int
    metric_full: float
    metric_at_required: float

    __getitem__ = getitem_by_field


def edge_sparsity(edges: Sequence, fractions: Sequence[float] = (0.5, 0.9, 0.99)) -> EdgeSparsity:
    """How many edges carry each fraction of the total edge weight, per layer (constant nodes excluded).

    Args:
      edges: list of ``E^l`` of shape ``(d^_{l+1}, d^_l)`` (from `interaction_edges`); row 0 and column 0 (the
        constant nodes) are left out.
      fractions: fractions in ``(0, 1]``.

    Returns:
      `EdgeSparsity` with ``fractions``, ``counts`` (int ``(num_layers, num_fractions)``: the fewest edges whose
      weights sum to at least ``fraction * total``), ``num_edges``, ``total_weight`` and ``fraction_of_edges``.
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1]; got {fractions}.")
    if len(edges) == 0:
        raise ValueError("edges is empty; a model with one section has no edges between node layers.")
    check_finite_nonnegative(edges, "edges", "edge_sparsity")
    counts, nums, totals = [], [], []
    fr = jnp.asarray(fractions)
    for l, e in enumerate(edges):
        e = jnp.asarray(e)
        if e.ndim != 2 or min(e.shape) < 2:
            raise ValueError(f"edges[{l}] must be a (d^_{{l+1}}, d^_l) matrix with non-constant nodes; got {e.shape}.")
        w = jnp.sort(jnp.reshape(e[1:, 1:], (-1,)))[::-1]
        cum = jnp.cumsum(w)
        total = cum[-1]
        # fewest n with cum[n-1] >= f * total; the relative slack absorbs rounding of the cumulative sum
        need = fr.astype(cum.dtype) * total * (1.0 - 8.0 * jnp.finfo(cum.dtype).eps)
        c = jnp.sum(cum[None, :] < need[:, None], axis=1) + 1
        counts.append(jnp.where(total > 0, jnp.minimum(c, w.shape[0]), 0))
        nums.append(w.shape[0])
        totals.append(total)
    counts = jnp.stack(counts)
    num = jnp.asarray(nums)
    return EdgeSparsity(fractions=fractions, counts=counts, num_edges=num, total_weight=jnp.stack(totals),
                        fraction_of_edges=counts / num[:, None])


# ---------------------------------------------------------------------------------------------------------------
# ablations


def ablated_output(model, params, basis: InteractionBasis, x, layer: int, mask, *, chunk_size: int = 64,
                   constant: str | None = None):
    """The network output with the edges of section ``layer`` masked (docs/maths.md#sparsity).

    Output node ``i`` of node layer ``layer + 1`` is computed from ``h^_layer * mask[i]``: an ablated input is set to
    its mean over the data, which is 0 for every centred (non-constant) basis coordinate. The remaining sections run
    on the reconstructed activations ``(h^_{layer+1} C^+)[:d]``. A mask of ones gives the output of the truncated
    network.

    Args:
      model, params, basis: the model, its params and basis.
      x: an input batch.
      layer: ``l`` in ``0..L-2``.
      mask: ``(d^_{l+1}, d^_l)`` array of 0/1 (float) entries.
      chunk_size: output nodes evaluated per ``vmap``.
      constant: the model's constant convention (default its own; see `degenjax.Sections`).

    Returns:
      The output ``h_L`` for ``x``.
    """
    check_positive_int(chunk_size, "chunk_size", "ablated_output")
    model = as_sections(model, constant)
    L = len(model)
    _, acts = forward(model, params, x)
    hh = to_hat(acts[layer], basis.C[layer])
    g = _section_to_hat(model, params, basis.C[layer + 1], layer)
    d_in = section_width(model, basis.C[layer])
    mask = jnp.asarray(mask).astype(hh.dtype)
    n_next = mask.shape[0]
    parts = []
    for start in range(0, n_next, chunk_size):
        i = np.arange(start, min(start + chunk_size, n_next))
        m = jnp.reshape(mask[i], (len(i),) + (1,) * (hh.ndim - 1) + (hh.shape[-1],))
        outs = jax.vmap(lambda mm: g(from_hat(hh * mm, basis.C_pinv[layer], d_in)))(m)  # (k, B, ..., d^_{l+1})
        parts.append(jnp.take_along_axis(outs, jnp.reshape(jnp.asarray(i), (len(i),) + (1,) * (outs.ndim - 1)),
                                         axis=-1)[..., 0])
    h_next = jnp.moveaxis(jnp.concatenate(parts, axis=0), 0, -1)
    h = from_hat(h_next, basis.C_pinv[layer + 1], section_width(model, basis.C[layer + 1]))
    for f in model.fns[layer + 1:L]:
        h = f(params, h)
    return h


def _top_mask(weights, k: int, dtype):
    """Mask keeping the constant row/column and the ``k`` largest non-constant edges."""
    sub = np.asarray(weights, np.float64)[1:, 1:]
    order = np.argsort(-sub, axis=None, kind="stable")
    m = np.zeros(sub.size)
    m[order[:k]] = 1.0
    full = np.ones(weights.shape)
    full[1:, 1:] = m.reshape(sub.shape)
    return jnp.asarray(full, dtype)


def edges_required(model, params, basis: InteractionBasis, edges: Sequence, x, metric: Callable, *,
                   tol: float = 1e-3, layers: Sequence[int] | None = None, chunk_size: int = 64,
                   jit: bool = False, constant: str | None = None) -> list[EdgesRequired]:
    """The fewest edges to keep in each layer so that ``metric`` stays within ``tol``, by bisection.

    For each layer separately (the other layers intact), the ``k`` largest non-constant edges of ``E^l`` are kept
    and all others mean-ablated (`ablated_output`); the constant node's edges are always kept. The reference is
    the same truncated network with every edge kept. Bisection assumes the deviation shrinks as ``k`` grows.

    Args:
      model, params, basis: the model, its params and basis.
      edges: ``E^l`` from `interaction_edges`.
      x: a held-out input batch.
      metric: ``metric(output) -> scalar`` (e.g. accuracy or loss against labels closed over).
      tol: allowed ``|metric(ablated) - metric(all edges)|``.
      layers: which layers to analyse (default all ``0..L-2``).
      chunk_size: output nodes per ``vmap`` in `ablated_output`.
      jit: compile the per-step evaluation with ``jax.jit`` (opt-in; the mask is its only changing argument).
      constant: the model's constant convention (default its own; see `degenjax.Sections`).

    Returns:
      One `EdgesRequired` per analysed layer: ``layer``, ``required`` (edges kept), ``num_edges``, ``metric_full``,
      ``metric_at_required``.
    """
    model = as_sections(model, constant)
    check_basis_matches(model, basis)
    L = len(model)
    layers = range(L - 1) if layers is None else layers
    out = []
    for l in layers:
        if not 0 <= l < L - 1:
            raise ValueError(f"layer {l} has no edges; layers must be in 0..{L - 2}.")
        e = np.asarray(edges[l])
        if e.shape != (basis.C[l + 1].shape[1], basis.C[l].shape[1]):
            raise ValueError(f"edges[{l}] has shape {e.shape}, expected {(basis.C[l + 1].shape[1], basis.C[l].shape[1])}"
                             " from the basis; were the edges computed with another basis?")

        def ev(mask, l=l):
            return metric(ablated_output(model, params, basis, x, l, mask, chunk_size=chunk_size))

        ev = jax.jit(ev) if jit else ev
        dtype = jnp.result_type(basis.C[l])
        n = (e.shape[0] - 1) * (e.shape[1] - 1)
        full = float(ev(_top_mask(e, n, dtype)))
        ok = lambda k: abs(float(ev(_top_mask(e, k, dtype))) - full) <= tol  # noqa: E731
        lo, hi = 0, n  # invariant: ok(hi); lo is the last count known to fail (or 0, untested)
        if ok(0):
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        out.append(EdgesRequired(layer=int(l), required=hi, num_edges=n, metric_full=full,
                                 metric_at_required=float(ev(_top_mask(e, hi, dtype)))))
    return out


def node_ablation_curves(model, params, basis: InteractionBasis, x, metric: Callable, *,
                         layers: Sequence[int] | None = None, num_points: int | None = None,
                         constant: str | None = None) -> list[tuple]:
    """Metric when only the top-``n`` basis directions of one node layer are kept (the rest mean-ablated).

    Directions are ranked by ``Lambda`` (descending); the constant direction is always kept; ablated centred
    coordinates are set to their mean 0; the network then runs from ``(h^ C^+)[:d]``.

    Args:
      model, params, basis: the model, its params and basis.
      x: an input batch.
      metric: ``metric(output) -> scalar``.
      layers: node layers to ablate (default all).
      num_points: number of ``n`` values (evenly spaced, always including 0 and all); default every ``n``.
      constant: the model's constant convention (default its own; see `degenjax.Sections`).

    Returns:
      Per layer, ``(ns, values)``: int array of kept counts and float array of metric values.
    """
    model = as_sections(model, constant)
    check_basis_matches(model, basis)
    L = len(model)
    _, acts = forward(model, params, x)
    result = []
    for l in (range(L) if layers is None else layers):
        hh = to_hat(acts[l], basis.C[l])
        n_dirs = hh.shape[-1] - 1
        order = 1 + np.argsort(-np.asarray(basis.Lambda[l][1:]), kind="stable")
        ns = np.arange(n_dirs + 1) if num_points is None else np.unique(np.linspace(0, n_dirs, num_points).round())
        ns = ns.astype(int)
        vals = []
        for n in ns:
            keep = np.zeros(n_dirs + 1)
            keep[0] = 1.0
            keep[order[:n]] = 1.0
            h = from_hat(hh * jnp.reshape(jnp.asarray(keep, hh.dtype), (1,) * (hh.ndim - 1) + (n_dirs + 1,)),
                         basis.C_pinv[l], section_width(model, basis.C[l]))
            for f in model.fns[l:]:
                h = f(params, h)
            vals.append(float(metric(h)))
        result.append((ns, np.asarray(vals)))
    return result
