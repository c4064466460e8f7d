"""The (Local) Interaction Basis and the network re-expressed in it (arXiv 2405.10928, section 2).

Row convention throughout. A node layer is ``f = (h, c)``: its ``d_h`` features ``h`` and a constant coordinate
``c = 1`` last (see `degenjax.Sections` for the two ways a model provides it). Basis coordinates are
``h^ = f @ C`` with ``C`` of shape ``(d_h + 1, d^)``; column 0 is the constant direction,
``C[:, 0] = sqrt(Lambda_0) e_c``, so ``h^_0 = sqrt(Lambda_0)`` on every input, and the other columns are centred
(their mean over the data is zero). ``C^+`` of shape ``(d^, d_h + 1)`` satisfies ``C^+ C = I`` and
``f ~= h^ @ C^+`` (exactly when nothing was truncated).

For one node layer with mean ``mu``, covariance ``Cov = U D U^T`` (descending, truncated to ``k`` directions) and
Jacobian Gram ``M`` with respect to ``f`` (``(d_h + 1)`` square, constant last; its constant row and column are zero
when no bias is tied to the constant), the LIB paper's steps are, with ``Y`` the centring (``f Y = (h - mu, 1)``):

1. ``G = E[(fY)^T (fY)] = blockdiag(Cov, 1)``, eigenvectors ``U~ = blockdiag(1, U)`` (constant first), ``D~ = (1, D)``;
2. ``R = Y U~ D~^{-1/2}`` (whitened coordinates), ``M~ = R^+ M R^{+T}``;
3. ``Lambda_0 = M~_00 = (mu, 1) M (mu, 1)^T`` (the constant's interaction, bias paths included) and
   ``(Lambda_rest, V) = eigh(M~[1:, 1:])`` with ``M~[1:, 1:] = S^T M_hh S``, ``S = U D^{1/2}`` (descending, truncated);
4. ``C = R blockdiag(1, V) Lambda^{1/2}``: ``C[:d_h, 1:] = U D^{-1/2} V Lambda^{1/2}``, ``C[d_h, 1:] = -mu^T C[:d_h, 1:]``
   and ``C^+ = Lambda^{-1/2} blockdiag(1, V)^T D~^{1/2} U~^T Y^{-1}``.

In the new basis the second moment of the coordinates is ``diag(Lambda)``. If ``Lambda_0`` is at or below the cutoff
(nothing interacts through the constant), ``Lambda_0 = 1`` is used so that ``C`` stays invertible.

Truncation keeps eigenvalues ``> max(rtol * largest, atol)`` in each of the two cuts (activation covariance, then
``M~``), settable per node layer and per cut. It picks array shapes, so it needs concrete eigenvalues: under
``jax.jit`` pass static ``dims`` (e.g. from an eager run). The streamed Gram/edge steps are compiled and cached per
shape (``jit=True``); ``jit=False`` runs them op by op. The per-layer linear algebra (two ``(d, d)``
eigendecompositions and a few products) runs on concrete values in float64 LAPACK on the host, whatever the dtype:
nothing is compiled for it (compiling it cost more than running it), and float32 runs keep the directions a float64
run keeps (the Grams are exact in float32, their eigenvalues are not). Under an outer ``jax.jit`` it is part of the
caller's program, in the default dtype (without x64 a warning names ``jax_enable_x64``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from degenjax._src.eigen import eigh, host_eigh
from degenjax._src.numerics import acc_dtype, warn_float32
from degenjax._src.grams import ActivationStats, activation_stats, as_batch_list, jacobian_gram
from degenjax._src.sections import Sections, as_sections
from degenjax._src.validation import check_dims, check_finite_params, is_traced

_KINDS = ("lib", "global", "pca", "random")
_CUTS = ("gram", "interaction")


class InteractionBasis(NamedTuple):
    """A basis for every node layer ``0..L-1`` (tuples indexed by node layer).

    Attributes:
      C: ``C^l`` of shape ``(d_h + 1, d^_l)`` (``d_h`` the layer's features without the constant);
        ``h^ = (h, 1) @ C^l``, column 0 the constant direction.
      C_pinv: ``C^{l+}`` of shape ``(d^_l, d_h + 1)``, with ``C^{l+} C^l = I``.
      Lambda: ``(d^_l,)``: the second moment of each basis coordinate on the data (``Lambda[0]`` the constant's).
        For ``kind="lib"``/``"global"`` the Jacobian-Gram eigenvalues (``Lambda[0] = M~_00``), for ``"pca"`` the
        activation variances, for ``"random"`` the variances along the rotated directions.
      mean: ``mu^l`` of shape ``(d_h,)``, the mean of the non-constant features over data points and positions.
      dims: ``d^_l``, the number of basis directions (constant included).
      gram_spectrum: ``(d_h,)``: all eigenvalues of the activation covariance, descending (before truncation).
      interaction_spectrum: ``(k_l,)``: all eigenvalues of ``M~[1:, 1:]`` (lib/global; the kept variances for
        pca/random), descending, before the second truncation.
      num_dropped_gram: how many covariance directions the activation cutoff dropped (int array).
      num_dropped_interaction: how many whitened directions the interaction cutoff dropped (int array).
      grams: the centred activation Gram per node layer, ``(d_h + 1, d_h + 1)`` = ``blockdiag(Cov, 1)`` (constant
        last); with ``mean`` it can be passed back as ``stats=`` so that another basis skips the activation pass.
    """

    C: tuple
    C_pinv: tuple
    Lambda: tuple
    mean: tuple
    dims: tuple
    gram_spectrum: tuple
    interaction_spectrum: tuple
    num_dropped_gram: tuple
    num_dropped_interaction: tuple
    grams: tuple = ()

    @classmethod
    def from_matrices(cls, C: Sequence[ArrayLike], C_pinv: Sequence[ArrayLike] | None = None, *,
                      Lambda: Sequence[ArrayLike] | None = None, mean: Sequence[ArrayLike] | None = None,
                      grams: Sequence[ArrayLike] | None = None) -> "InteractionBasis":
        """An `InteractionBasis` from given matrices (e.g. another implementation's bases, or a hand-made one).

        Args:
          C: one ``(d_h + 1, d^)`` matrix per node layer, constant coordinate last (row convention ``h^ = (h, 1) C``).
          C_pinv: the matching ``(d^, d_h + 1)`` left inverses; default the Moore-Penrose pseudo-inverses of ``C``.
          Lambda: optional ``(d^,)`` per layer (default: the second moments are unknown, NaN).
          mean: optional ``(d_h,)`` per layer (default NaN: unknown).
          grams: optional centred Grams ``(d_h + 1, d_h + 1)`` per layer.

        Returns:
          `InteractionBasis` usable with `interaction_edges`, `transform`, the ablations and as ``targets=``.

        Raises:
          ValueError: mismatched numbers of layers or shapes.
        """
        Cs = tuple(jnp.asarray(c) for c in C)
        if not Cs:
            raise ValueError("from_matrices: C is empty; pass one matrix per node layer.")
        for l, c in enumerate(Cs):
            if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
                raise ValueError(f"from_matrices: C[{l}] must be a (d_h + 1, d^) matrix; got shape {c.shape}.")
        if C_pinv is None:
            Cps = tuple(jnp.linalg.pinv(c) for c in Cs)
        else:
            Cps = tuple(jnp.asarray(c) for c in C_pinv)
        L = len(Cs)
        for name, seq in (("C_pinv", Cps), ("Lambda", Lambda), ("mean", mean), ("grams", grams)):
            if seq is not None and len(seq) != L:
                raise ValueError(f"from_matrices: {name} has {len(seq)} entries for {L} node layers.")
        for l, (c, cp) in enumerate(zip(Cs, Cps)):
            if cp.shape != c.shape[::-1]:
                raise ValueError(f"from_matrices: C_pinv[{l}] has shape {cp.shape}; expected {c.shape[::-1]} (the "
                                 f"transpose shape of C[{l}]).")
        nan = lambda n, like: jnp.full((n,), jnp.nan, jnp.result_type(like))  # noqa: E731
        lam = tuple(nan(c.shape[1], c) if Lambda is None else jnp.asarray(Lambda[l]) for l, c in enumerate(Cs))
        mu = tuple(nan(c.shape[0] - 1, c) if mean is None else jnp.asarray(mean[l]) for l, c in enumerate(Cs))
        for l, c in enumerate(Cs):
            if lam[l].shape != (c.shape[1],) or mu[l].shape != (c.shape[0] - 1,):
                raise ValueError(f"from_matrices: layer {l} needs Lambda of shape ({c.shape[1]},) and mean of shape "
                                 f"({c.shape[0] - 1},); got {lam[l].shape} and {mu[l].shape}.")
        zero = jnp.zeros((), jnp.int32)
        return cls(C=Cs, C_pinv=Cps, Lambda=lam, mean=mu, dims=tuple(c.shape[1] for c in Cs),
                   gram_spectrum=tuple(jnp.zeros((0,), jnp.result_type(c)) for c in Cs),
                   interaction_spectrum=tuple(jnp.zeros((0,), jnp.result_type(c)) for c in Cs),
                   num_dropped_gram=(zero,) * L, num_dropped_interaction=(zero,) * L,
                   grams=() if grams is None else tuple(jnp.asarray(g) for g in grams))


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with edges.py


def to_hat(h, C) -> jax.Array:
    """Basis coordinates ``(h, 1) @ C`` of a node layer ``h`` of shape ``(..., d)``.

    ``h`` may be the plain features (``C`` has ``d + 1`` rows: the constant row is added) or the folded node layer
    with the constant last (``C`` has ``d`` rows).
    """
    C = C.astype(h.dtype)
    d = h.shape[-1]
    if C.shape[0] == d:
        return h @ C
    if C.shape[0] != d + 1:
        raise ValueError(f"a node layer with {d} features does not match a basis with {C.shape[0]} rows (expected "
                         f"{d + 1}, or {d} for a folded layer whose last feature is the constant).")
    return h @ C[:-1] + jnp.reshape(C[-1], (1,) * (h.ndim - 1) + (C.shape[1],))


def from_hat(hh, C_pinv, d: int | None = None) -> jax.Array:
    """The node layer from basis coordinates: ``(h^ @ C^+)[..., :d]``.

    ``d`` is the width the sections take: the plain features (default, ``C^+.shape[1] - 1``) or the folded layer
    (``C^+.shape[1]``, the reconstructed constant last).
    """
    d = C_pinv.shape[1] - 1 if d is None else d
    return hh @ C_pinv[:, :d].astype(hh.dtype)


def section_width(model: Sections, C) -> int:
    """Features the sections take at a node layer with basis ``C``: ``d_h`` (append) or ``d_h + 1`` (folded)."""
    return C.shape[0] if model.constant == "last" else C.shape[0] - 1


def check_basis_matches(model: Sections, basis: InteractionBasis, shapes=None):
    """ValueError when ``basis`` was computed for a model with other node layers."""
    if not isinstance(basis, InteractionBasis):
        raise ValueError(f"basis must be an InteractionBasis (from degenjax.interaction_basis or "
                         f"InteractionBasis.from_matrices); got {type(basis).__name__}.")
    if len(basis.C) != len(model):
        raise ValueError(f"the basis has {len(basis.C)} node layers but the model has {len(model)} sections; it was "
                         "computed for another model.")
    if shapes is not None:
        fold = model.constant == "last"
        for l in range(len(model)):
            d = shapes[l].shape[-1]
            want = d if fold else d + 1
            if basis.C[l].shape[0] != want:
                hint = (" (a folded layer: its last feature is the constant, so C has d rows)" if fold else
                        " (d + 1: the features plus the constant)")
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has {d} features but the basis C^{l} has "
                                 f"{basis.C[l].shape[0]} rows, expected {want}{hint}; the basis was computed for "
                                 "another model or with another constant convention.")


# ---------------------------------------------------------------------------------------------------------------
# cutoffs


def _one_cut(v, what: str) -> dict:
    if isinstance(v, Mapping):
        bad = set(v) - set(_CUTS)
        if bad:
            raise ValueError(f"{what}: per-cut values are keyed by {_CUTS}; got {sorted(bad)}.")
        return {c: v.get(c) for c in _CUTS}
    return {c: v for c in _CUTS}


def resolve_cuts(value, L: int, what: str, fn: str = "interaction_basis") -> list[dict]:
    """``[{"gram": x, "interaction": y}, ...]`` per node layer from a scalar, a per-cut mapping, or a sequence."""
    if value is None or isinstance(value, (int, float, np.floating, np.integer, Mapping)) or (
            hasattr(value, "ndim") and np.ndim(value) == 0):
        per = [_one_cut(value, what)] * L
    elif isinstance(value, Sequence) or hasattr(value, "__len__"):
        if len(value) != L:
            raise ValueError(f"{what} has {len(value)} entries but the model has {L} node layers; pass a scalar, "
                             "a mapping {'gram': ..., 'interaction': ...}, or one of those per node layer.")
        per = [_one_cut(v, what) for v in value]
    else:
        raise ValueError(f"{what} must be a number, a mapping {{'gram': ..., 'interaction': ...}} or a sequence of "
                         f"those per node layer; got {type(value).__name__}.")
    for l, p in enumerate(per):
        for c, v in p.items():
            if v is None:
                continue
            if is_traced(v):
                continue
            v = float(v)
            if what == "rtol" and not (np.isfinite(v) and 0 <= v < 1):
                raise ValueError(f"{fn}: rtol={v!r} is not a relative cutoff in [0, 1) (node layer {l}, {c} cut): "
                                 "eigenvalues below rtol x the largest are dropped, so rtol >= 1 drops everything and "
                                 "rtol < 0 keeps numerical zeros. Typical values: 1e-12 (float64) to 1e-6 (float32).")
            if what == "atol" and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{fn}: atol={v!r} is not an absolute cutoff >= 0 (node layer {l}, {c} cut); rib's "
                                 "is 1e-15.")
    return per


# ---------------------------------------------------------------------------------------------------------------
# the per-layer maths


def _num_kept(count, fixed: int | None, available: int, what: str) -> int:
    """Python int: ``fixed`` if given, else the count of values above the cutoff (needs a concrete count)."""
    if fixed is not None:
        return max(0, min(int(fixed), available))
    if is_traced(count):
        raise ValueError(f"interaction_basis under jax.jit cannot choose the {what} truncation from traced values; "
                         "pass static dims=(k_0, ..., k_{L-1}) (non-constant directions per node layer), e.g. "
                         "[d - 1 for d in basis.dims] of an eager run.")
    return int(count)


def _safe_inv(v, xp=jnp):
    pos = v > 0
    return xp.where(pos, 1.0 / xp.where(pos, v, 1.0), 0.0)


def _assemble(mu, R, Rp, lam0, xp=jnp):
    """``C`` (constant column first, centring row last) and ``C^+`` from the non-constant maps (module docstring)."""
    d, n = R.shape
    dt = R.dtype
    s0 = xp.sqrt(lam0)
    top = xp.concatenate([xp.zeros((d, 1), dt), R], axis=1)
    bottom = xp.concatenate([xp.reshape(s0, (1,)), -(mu @ R)])[None, :]
    C = xp.concatenate([top, bottom], axis=0)
    first = xp.concatenate([mu / s0, xp.reshape(1.0 / s0, (1,))])[None, :]
    rest = xp.concatenate([Rp, xp.zeros((n, 1), dt)], axis=1)
    return C, xp.concatenate([first, rest], axis=0)


def _layer_full(cov, mu, M, cuts, key, *, kind: str, k: int | None, xp=jnp):
    """Untruncated basis of one layer: ``C`` ``(d+1, d+1)``, ``C^+``, ``Lambda`` with columns in descending order.

    ``M`` is the ``(d + 1, d + 1)`` Jacobian Gram with respect to ``(h, c)``. ``cuts = (rtol_g, atol_g, rtol_i,
    atol_i)``. The activation cutoff is applied by masking (directions at or below it get zero weight, so no noise
    direction is whitened); the interaction cutoff is applied afterwards by slicing the leading columns, which is
    exact since each column depends only on its own eigenpair. ``k`` (static) is only used by ``kind="random"``.
    ``xp`` is ``jax.numpy`` (traced or device values) or ``numpy`` (concrete float64 values on the host).
    """
    dt = cov.dtype
    rg, ag, ri, ai = cuts
    eig = eigh if xp is jnp else host_eigh
    D, U = eig(cov)
    keep_g = D > xp.maximum(rg * xp.maximum(D[0], 0.0), ag)
    count_g = xp.sum(keep_g).astype(xp.int32)
    if kind == "pca":
        R = U * keep_g[None, :].astype(dt)
        C, Cp = _assemble(mu, R, R.T, xp.ones((), dt), xp)
        return C, Cp, xp.concatenate([xp.ones((1,), dt), xp.where(keep_g, D, 0.0)]), D, D, count_g, count_g
    if kind == "random":
        Uk, Dk = U[:, :k], D[:k]
        if xp is jnp:
            g = jax.random.normal(key, (k, k), dt)
        else:
            with jax.enable_x64(True):
                g = np.asarray(jax.random.normal(key, (k, k), jnp.float64))
        q, r = xp.linalg.qr(g)
        Q = q * xp.sign(xp.diag(r))[None, :]  # Haar-distributed orthogonal matrix
        C, Cp = _assemble(mu, Uk @ Q, Q.T @ Uk.T, xp.ones((), dt), xp)
        lam = xp.einsum("ij,i,ij->j", Q, Dk, Q)
        return C, Cp, xp.concatenate([xp.ones((1,), dt), lam]), D, Dk, count_g, xp.asarray(k, xp.int32)
    d = cov.shape[0]
    s = xp.where(keep_g, xp.sqrt(xp.where(keep_g, D, 1.0)), 0.0)
    S = U * s[None, :]  # whitened coordinates -> activations (zero for dropped directions)
    Lam, V = eig(S.T @ M[:d, :d] @ S)
    cut_i = xp.maximum(ri * xp.maximum(Lam[0], 0.0), ai)
    count_i = xp.sum(Lam > cut_i).astype(xp.int32)
    R = (U * _safe_inv(s, xp)[None, :]) @ V * xp.sqrt(xp.maximum(Lam, 0.0))[None, :]
    Rp = (_safe_inv(xp.sqrt(xp.maximum(Lam, 0.0)), xp)[:, None] * V.T) @ (s[:, None] * U.T)
    # the constant direction: Lambda_0 = M~_00 = (mu, 1) M (mu, 1)^T, with the bias paths of a folded layer
    m1 = xp.concatenate([mu, xp.ones((1,), dt)])
    lam0 = m1 @ M @ m1
    lam0 = xp.where(lam0 > cut_i, lam0, xp.ones((), dt))
    C, Cp = _assemble(mu, R, Rp, lam0, xp)
    return C, Cp, xp.concatenate([xp.reshape(lam0, (1,)), Lam]), D, Lam, count_g, count_i


# only reached with traced values (a caller's jax.jit), where compiler options do not apply
_layer_full_jit = jax.jit(_layer_full, static_argnames=("kind", "k"))


def _run_layer(fn, cov, mu, M, cuts, key, kind, k):
    """The per-layer algebra: traced values in the caller's program (``fn``: `_layer_full`, compiled or not);
    concrete values in float64 LAPACK on the host, whatever the dtype (the Grams are exact in float32, their
    eigenvalues are not), returned in ``cov``'s dtype: nothing to compile, and no device round trips."""
    if is_traced((cov, mu, M, cuts)):
        if not jax.config.jax_enable_x64:
            warn_float32("the interaction basis (eigendecompositions and cutoffs, under jax.jit)")
        return fn(cov, mu, M, cuts, key, kind=kind, k=k)
    out_dt = np.dtype(cov.dtype)
    to64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    res = _layer_full(to64(cov), to64(mu), to64(M), tuple(to64(c) for c in cuts), key, kind=kind, k=k, xp=np)
    return tuple(np.asarray(r, out_dt if np.issubdtype(np.asarray(r).dtype, np.floating) else np.int32)
                 for r in res)


class LayerBasis(NamedTuple):
    """The basis of one node layer, from `layer_basis` (a tuple, so ``C, C_pinv, *rest = layer_basis(...)`` works).

    Attributes:
      C: ``(d + 1, d^)``, constant direction in column 0, centring row last.
      C_pinv: ``(d^, d + 1)`` with ``C_pinv @ C = I``.
      Lambda: ``(d^,)`` second moment of each basis coordinate (``Lambda[0]`` the constant's).
      gram_spectrum: ``(d,)`` all eigenvalues of the activation covariance, descending.
      interaction_spectrum: all eigenvalues of ``M~[1:, 1:]`` (lib/global) or the kept variances (pca/random).
      num_dropped_gram: int, covariance directions below the activation cutoff.
      num_dropped_interaction: int, whitened directions below the interaction cutoff.
    """

    C: jax.Array
    C_pinv: jax.Array
    Lambda: jax.Array
    gram_spectrum: jax.Array
    interaction_spectrum: jax.Array
    num_dropped_gram: jax.Array
    num_dropped_interaction: jax.Array


def layer_basis(cov: ArrayLike, mean: ArrayLike, M: ArrayLike | None, *, kind: str = "lib",
                rtol=None, atol=None, key=None, keep: int | None = None, name: str = "layer",
                jit: bool = True) -> LayerBasis:
    """The basis of one node layer from its covariance, mean and Jacobian Gram (arXiv 2405.10928, section 2).

    Args:
      cov: ``(d, d)`` activation covariance of the non-constant features (the leading block of the centred Gram).
      mean: ``(d,)`` their mean.
      M: the Jacobian Gram (``kind="lib"``/``"global"``; ignored for ``"pca"``/``"random"``): ``(d + 1, d + 1)``
        with respect to the folded layer ``(h, c)`` (constant last), or ``(d, d)`` with respect to ``h`` alone (no
        bias tied to the constant: its row and column are zero).
      kind: ``"lib"``, ``"global"``, ``"pca"`` or ``"random"``.
      rtol: relative cutoff: eigenvalues ``<= rtol * largest`` are dropped; a number or a mapping
        ``{"gram": ..., "interaction": ...}`` per cut. Default ``(d + 1) * eps`` of the dtype.
      atol: absolute cutoff (same forms); eigenvalues ``<= atol`` are dropped too. Default 0.
      key: PRNG key for ``kind="random"``.
      keep: if given, keep exactly ``min(keep, d)`` non-constant directions (static shapes, so this works under
        ``jax.jit``); the cutoffs still mask directions below them.
      name: the layer's name for error messages.
      jit: with traced values (under the caller's ``jax.jit``), compile the linear algebra as one nested program
        (False: op by op). Concrete values always run in float64 NumPy on the host (module docstring).

    Returns:
      `LayerBasis` ``(C, C_pinv, Lambda, gram_spectrum, interaction_spectrum, num_dropped_gram,
      num_dropped_interaction)``.

    Raises:
      ValueError: a rank-0 layer (all activations constant), no direction with non-zero interaction, bad cutoffs
        or a Jacobian Gram of the wrong shape.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")
    dt = acc_dtype()
    concrete = not is_traced((cov, mean, M, rtol, atol))
    xp = np if concrete else jnp  # small host-side steps when the values are concrete (nothing to compile)
    cov = xp.asarray(cov, dt)
    mu = xp.asarray(mean, dt)
    d = cov.shape[0]
    r_cut = resolve_cuts(rtol, 1, "rtol", "layer_basis")[0]
    a_cut = resolve_cuts(atol, 1, "atol", "layer_basis")[0]
    eps_r = (d + 1) * float(jnp.finfo(dt).eps)
    cuts = tuple(xp.asarray(v if v is not None else dflt, dt) for v, dflt in (
        (r_cut["gram"], eps_r), (a_cut["gram"], 0.0), (r_cut["interaction"], eps_r), (a_cut["interaction"], 0.0)))
    fn = _layer_full_jit if jit else _layer_full
    k = None
    if kind == "random":
        if key is None:
            raise ValueError('kind="random" needs key=jax.random.key(...) for the random rotation.')
        count_g = _run_layer(fn, cov, mu, xp.zeros((d + 1, d + 1), dt), cuts, None, "pca", None)[5]
        k = _num_kept(count_g, keep, d, "activation")
        if k == 0:
            raise ValueError(f"node layer {name} has rank 0: its activations are constant on the data.")
    if M is None:
        M = xp.zeros((d + 1, d + 1), dt)
    else:
        M = xp.asarray(M, dt)
        if M.shape == (d, d):
            M = xp.pad(M, ((0, 1), (0, 1)))
        elif M.shape != (d + 1, d + 1):
            raise ValueError(f"node layer {name}: the Jacobian Gram has shape {M.shape}; expected ({d + 1}, {d + 1}) "
                             f"(features and constant) or ({d}, {d}) (features only) for a layer with {d} features.")
    C, Cp, Lambda, D, spec, count_g, count_i = _run_layer(fn, cov, mu, M, cuts, key,
                                                          "lib" if kind == "global" else kind, k)
    n = _num_kept(count_i, keep, d if kind != "random" else k, "interaction")
    if n == 0:
        raise ValueError(f"node layer {name} has rank 0 or no interaction: every activation-covariance eigenvalue, "
                         "or every eigenvalue of the Jacobian Gram in whitened coordinates, is below the cutoff; "
                         "the later sections do not depend on this layer on the data.")
    if concrete:
        C, Cp, Lambda, D, spec, count_g, count_i = (np.asarray(a) for a in (C, Cp, Lambda, D, spec, count_g,
                                                                              count_i))
    dropped_g = xp.asarray(d, xp.int32) - count_g
    dropped_i = xp.zeros((), xp.int32) if kind in ("pca", "random") else count_g - count_i
    if kind in ("pca", "random"):
        spec = spec[:n]
    out = (C[:, :n + 1], Cp[:n + 1], Lambda[:n + 1], D, spec, dropped_g, dropped_i)
    # device_put, not jnp.asarray: moving host values compiles nothing (jnp.asarray stages a program per shape)
    return LayerBasis(*(jax.device_put(a) for a in out)) if concrete else LayerBasis(*out)


# ---------------------------------------------------------------------------------------------------------------
# public API


def _stats_from(stats, L: int):
    """``(grams, means)`` from an `ActivationStats` or an `InteractionBasis` with grams."""
    if isinstance(stats, InteractionBasis):
        if not stats.grams:
            raise ValueError("stats=: this InteractionBasis carries no grams (built with from_matrices without "
                             "grams=); pass an ActivationStats from degenjax.activation_stats instead.")
        grams, means = stats.grams, stats.mean
    elif isinstance(stats, ActivationStats):
        grams, means = stats.grams, stats.means
    else:
        raise ValueError(f"stats= must be a degenjax.ActivationStats (from activation_stats) or an InteractionBasis; "
                         f"got {type(stats).__name__}.")
    if len(grams) != L:
        raise ValueError(f"stats= has {len(grams)} node layers but the model has {L}.")
    return list(grams), list(means)


def _targets_from(targets, L: int):
    """Per node layer ``l``, the fixed basis of the coordinates its Jacobian differentiates (None: computed)."""
    if targets is None:
        return [None] * L
    if isinstance(targets, InteractionBasis):
        if len(targets.C) != L:
            raise ValueError(f"targets= has {len(targets.C)} node layers but the model has {L}.")
        return list(targets.C[1:]) + [None]
    if isinstance(targets, (jax.Array, np.ndarray)) or not isinstance(targets, Sequence) or len(targets) != L:
        raise ValueError(f"targets= must be an InteractionBasis or a sequence of {L} matrices (targets[l]: the basis of "
                         "node layer l + 1, or of the output for the last layer; None entries are computed).")
    return list(targets)


def interaction_basis(model, params, batches, *, kind: str = "lib", rtol=None, atol=None, key=None,
                      dims: Sequence[int] | None = None, constant: str | None = None, targets=None, stats=None,
                      jacobian_kwargs: dict | None = None, activation_kwargs: dict | None = None,
                      jit: bool = True, progress: bool = False) -> InteractionBasis:
    """The (Local) Interaction Basis of every node layer, computed last layer first (arXiv 2405.10928, section 2).

    ``kind="lib"``: the Jacobian Gram of node layer ``l`` differentiates the next node layer's basis coordinates
    ``f_{l+1} @ C^{l+1}`` with its full ``C^{l+1}`` (for the last node layer: the raw output, no basis). On folded
    node layers (``constant="last"``) the constant is an input of every section, so ``Lambda_0 = M~_00`` includes
    the bias paths and the constant's own target coordinate counts, as in the LIB paper. ``"global"``: the Jacobian
    to the raw network output. ``"pca"``: the centred rotation ``C = Y U`` without whitening. ``"random"``: a random
    orthogonal rotation of the PCA directions (the constant direction stays column 0).

    Args:
      model: `Sections` (or a list of ``f_l(params, h)``); node layers must be arrays with the feature axis last,
        optionally with positions axes before it.
      params: passed to every section.
      batches: an input batch (array or pytree) or an iterable of batches; it is iterated once per node layer plus
        once, so pass a list rather than a one-shot generator.
      kind: ``"lib"`` (default), ``"global"``, ``"pca"`` or ``"random"``.
      rtol: relative eigenvalue cutoff ``(>= 0, < 1)``: a number, a mapping ``{"gram": ..., "interaction": ...}``
        (the activation-covariance cut and the ``M~`` cut), or a sequence of those per node layer. Default
        ``(d_l + 1) * eps`` of the accumulation dtype (NumPy's ``matrix_rank`` convention). Dropped counts and full
        spectra are recorded in the result.
      atol: absolute eigenvalue cutoff, same forms (default 0). ApolloResearch rib's cut is ``rtol=0, atol=1e-15``.
      key: PRNG key, required for ``kind="random"``.
      dims: optional static number of non-constant directions per node layer (overrides the cutoffs for the choice
        of shapes; required under ``jax.jit``, where the cutoff cannot pick array shapes).
      constant: ``"append"`` or ``"last"`` (see `degenjax.Sections`); default the model's own (plain functions:
        ``"append"``; `from_linen` / `from_nnx` / `degenjax.models`: ``"last"``, biases folded).
      targets: fixed target bases (a "teacher-forced" run): an `InteractionBasis` (node layer ``l`` then
        differentiates ``f_{l+1} @ targets.C[l+1]``, the last layer the raw output) or a sequence of ``L``
        matrices-or-None (``targets[l]``: the basis of node layer ``l + 1``, or of the output for the last layer;
        None: the one computed in this call).
      stats: the activation statistics, if already computed: an `ActivationStats` (from `activation_stats` with
        ``center=True`` and the same ``constant``) or an `InteractionBasis` (its ``grams`` and ``mean``); then the
        activation pass is skipped. The result's ``grams`` field returns them for the next call.
      jacobian_kwargs: extra keyword arguments for `degenjax.jacobian_gram` (e.g. ``num_sources``, ``key``,
        ``chunk_size``, ``mesh``, ``jit``).
      activation_kwargs: extra keyword arguments for `degenjax.activation_stats` (e.g. ``mesh``, ``jit``).
      jit: compile the per-batch Gram steps (cached per shape), as the Gram functions do; False runs them op by op
        (the per-layer linear algebra runs on the host; module docstring). Inside the user's ``jax.jit`` either way
        works.
      progress: show a tqdm progress bar for each pass over the data (the activation pass and one Jacobian pass per
        node layer).

    Returns:
      `InteractionBasis` with tuples over node layers ``0..L-1``.

    Raises:
      ValueError: unknown kind, bad cutoffs, NaN/inf params or activations (naming the leaf or layer), a rank-0
        layer, a layer with no interaction, or traced values under ``jax.jit`` without ``dims``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")
    model = as_sections(model, constant)
    L = len(model)
    if dims is not None and len(dims) != L:
        raise ValueError(f"dims has {len(dims)} entries but the model has {L} node layers.")
    rt, at = resolve_cuts(rtol, L, "rtol"), resolve_cuts(atol, L, "atol")
    tg = _targets_from(targets, L)
    check_finite_params(params, "the interaction basis needs a finite network")
    batches = as_batch_list(batches, "interaction_basis")
    if stats is None:
        st = activation_stats(model, params, batches, center=True,
                              **{"jit": jit, "progress": progress, **(activation_kwargs or {})})
        grams, means = list(st.grams), list(st.means)
    else:
        grams, means = _stats_from(stats, L)
    concrete = not is_traced((grams, means))
    if concrete:  # the small per-layer steps on the host (no device programs to compile for them)
        grams, means = [np.asarray(g) for g in grams], [np.asarray(m) for m in means]
    covs = [g[:-1, :-1] for g in grams]  # centred Gram = blockdiag(Cov, 1)
    check_dims(dims, [c.shape[0] for c in covs], "interaction_basis")
    if concrete:
        for l in range(L):
            if not np.all(np.isfinite(covs[l])):
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has NaN or inf activations; check the "
                                 "inputs and the sections before it.")
            var = float(np.max(np.diag(covs[l])))
            # rank 0: the spread is below the resolution of the values themselves (the Gram is accumulated about a
            # shift, so a large mean does not swamp a small spread)
            res = float(np.finfo(covs[l].dtype).eps) * float(np.max(np.abs(means[l])))
            if var <= res * res:
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has rank 0: its activations are constant "
                                 "on the data; there is nothing to interpret. Check the params (dead layer?) or the "
                                 "data, or leave this layer out of the sections.")
    jkw = {"jit": jit, "progress": progress, **(jacobian_kwargs or {})}
    keys = jax.random.split(key, L) if (kind == "random" and key is not None) else [None] * L
    results: list[Any] = [None] * L
    C_next = None
    for l in reversed(range(L)):
        M = None
        if kind == "lib":
            target = tg[l] if tg[l] is not None else (None if l == L - 1 else C_next)
            M = jacobian_gram(model, params, batches, l, out_basis=target, target="next", **jkw)
        elif kind == "global":
            M = jacobian_gram(model, params, batches, l, target="output", **jkw)
        if M is not None and not is_traced(M) and not np.all(np.isfinite(np.asarray(M))):
            raise ValueError(f"node layer {l} ({model.layer_name(l)}): the Jacobian Gram has NaN or inf entries; "
                             "check the params and the sections after this layer.")
        results[l] = layer_basis(covs[l], means[l], M, kind=kind, rtol=rt[l], atol=at[l], key=keys[l],
                                 keep=None if dims is None else dims[l], name=f"{l} ({model.layer_name(l)})",
                                 jit=jit)
        C_next = results[l].C
    C, Cp, Lam, Dfull, spec, dg, di = (tuple(r[i] for r in results) for i in range(7))
    if concrete and not jax.config.jax_enable_x64 and dims is None and all(
            v is None for cuts in rt + at for v in cuts.values()):
        _warn_precision_cut(model, results, rt, at, kind)
    if concrete:
        grams, means = [jax.device_put(g) for g in grams], [jax.device_put(m) for m in means]
    return InteractionBasis(C=C, C_pinv=Cp, Lambda=Lam, mean=tuple(means), dims=tuple(c.shape[1] for c in C),
                            gram_spectrum=Dfull, interaction_spectrum=spec, num_dropped_gram=dg,
                            num_dropped_interaction=di, grams=tuple(grams))


def transform(model, basis: InteractionBasis, *, constant: str | None = None) -> Sections:
    """The network re-expressed in the basis: ``f^_l(p, h^) = f_l(p, h^ C_l^+) C_{l+1}``.

    On folded node layers the section gets the whole reconstruction ``h^ C_l^+`` (constant included) and its
    folded output is mapped by the full ``C_{l+1}``; on plain ones the constant part is dropped on the way in and
    ``(out, 1) C_{l+1}`` is taken on the way out. The first section takes ``h^_0 = (x, 1) C_0`` (not the raw input);
    the last section maps to the raw output. Sections take ``params`` like the original model. On the data the
    composition reproduces the original outputs up to the truncated directions (exactly when nothing was
    truncated).

    Args:
      model: `Sections` (or a list of functions).
      basis: an `InteractionBasis` for this model.
      constant: the model's constant convention (default the model's own; see `degenjax.Sections`).

    Returns:
      `Sections` with the same number of sections and names (``constant="append"``: its node layers are basis
      coordinates, whose constant is coordinate 0).

    Raises:
      ValueError: if the basis has another number of node layers, or (when called) a node layer's feature size does
        not match ``C^l``.
    """
    model = as_sections(model, constant)
    check_basis_matches(model, basis)
    L = len(model)

    def make(l):
        f, Cp = model.fns[l], basis.C_pinv[l]
        C_next = basis.C[l + 1] if l + 1 < L else None
        d_in = section_width(model, basis.C[l])

        def section(params, hh):
            if hh.shape[-1] != Cp.shape[0]:
                raise ValueError(f"transformed section {l} expects {Cp.shape[0]} basis coordinates (d^_{l}) in the "
                                 f"last axis; got shape {hh.shape}.")
            out = f(params, from_hat(hh, Cp, d_in))
            if C_next is None:
                return out
            want = section_width(model, C_next)
            if out.shape[-1] != want:
                raise ValueError(f"section {l} outputs {out.shape[-1]} features but the basis C^{l + 1} has "
                                 f"{C_next.shape[0]} rows (expected {want} features); the basis was computed for "
                                 "another model.")
            return to_hat(out, C_next)

        section.__name__ = f"hat_section_{l}"
        return section

    return Sections(tuple(make(l) for l in range(L)), names=model.names)


def _warn_precision_cut(model, results, rt, at, kind):
    """Warns that a float32 run (x64 off) truncates at float32's resolution, with how many directions lie between
    that cutoff and the float64 default one (genuine small eigenvalues, or float32 rounding noise: a float32 run
    cannot tell them apart).

    The eigenvalues themselves are computed in float64 either way (`layer_basis`) from Grams accumulated with
    compensated summation; what float32 cannot do is resolve eigenvalues below about ``1e-7`` of the largest.
    """
    eps64, eps32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
    band = 0
    for l, r in enumerate(results):
        D, spec = np.asarray(r.gram_spectrum, np.float64), np.asarray(r.interaction_spectrum, np.float64)
        d = D.shape[0]
        for cut, vals in (("gram", D), ("interaction", spec)):
            if vals.size == 0 or (cut == "interaction" and kind in ("pca", "random")):
                continue
            top = max(vals[0], 0.0)
            band += int(np.sum((vals > (d + 1) * eps64 * top) & (vals <= (d + 1) * eps32 * top)))
    warnings.warn(f"jax_enable_x64 is off: the interaction basis truncates at float32's resolution ((d + 1) * "
                  f"{eps32:.1e} of the largest eigenvalue); {band} eigenvalue(s) lie below it but above the float64 "
                  "cutoff (genuine small directions that a float64 run keeps, or float32 rounding noise: float32 "
                  "cannot tell them apart). Call jax.config.update('jax_enable_x64', True) for float64 Grams, or "
                  "pass rtol= explicitly.", stacklevel=3)
