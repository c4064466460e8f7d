"""The (Local) Interaction Basis and the network re-expressed in it (DESIGN.md section 3).

Row convention throughout: a node layer's activations ``h`` (feature axis last) get a constant coordinate appended,
and its basis coordinates are ``h^ = [h, 1] @ C`` with ``C`` of shape ``(d + 1, d^)``. Column 0 of ``C`` is the
constant direction, ``C[:, 0] = sqrt(Lambda_0) e_d``, so ``h^_0 = sqrt(Lambda_0)`` on every input; the other columns
are centred (their mean over the data is zero). ``C^+`` of shape ``(d^, d + 1)`` satisfies ``C^+ C = I`` and
``h ~= (h^ @ C^+)[..., :d]`` (exactly when nothing was truncated).

For one node layer with mean ``mu``, covariance ``Cov = U D U^T`` (descending, truncated to ``k`` directions) and
Jacobian Gram ``M`` (``d x d``, DESIGN section 2), with ``S = U_k D_k^{1/2}`` (whitened coordinates -> activations):

- ``M~ = S^T M S = V Lambda V^T`` (descending, truncated to ``m`` directions), the non-constant block of
  DESIGN's ``R^+ M R^{+T}``;
- ``C[:d, 1:] = U_k D_k^{-1/2} V_m Lambda_m^{1/2}``, ``C[d, 1:] = -mu^T C[:d, 1:]`` (the centring ``Y``);
- the constant coordinate is kept apart: in the centred frame ``h = mu * 1 + (h - mu)``, so its Jacobian is
  ``J mu`` and ``Lambda_0 = mu^T M mu``. Then every kept coordinate, the constant included, has unit Jacobian
  Gram (``diag(C^+ M C^{+T}) = 1``), which makes the sum of a linear section's edges equal to the sum of Lambda.
  If ``Lambda_0`` is below the cutoff (the mean carries no interaction), ``Lambda_0 = 1`` is used instead.

Truncation picks array shapes, so it needs concrete eigenvalues: under ``jax.jit`` pass static ``dims`` (e.g. from
an eager run). The per-layer linear algebra and the streamed Gram/edge steps are compiled and cached per shape
(``jit=True``, the convention of the Gram functions); ``jit=False`` runs them op by op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from degenjax._src.eigen import eigh
from degenjax._src.grams import activation_stats, as_batch_list, jacobian_gram
from degenjax._src.sections import Sections, as_sections
from degenjax._src.validation import check_dims, check_finite_params, check_rtol, is_traced

_KINDS = ("lib", "global", "pca", "random")


class InteractionBasis(NamedTuple):
    """A basis for every node layer ``0..L-1`` (tuples indexed by node layer).

    Attributes:
      C: ``C^l`` of shape ``(d_l + 1, d^_l)``; ``h^ = [h, 1] @ C^l``, column 0 the constant direction.
      C_pinv: ``C^{l+}`` of shape ``(d^_l, d_l + 1)``, with ``C^{l+} C^l = I``.
      Lambda: ``(d^_l,)``: the second moment of each basis coordinate on the data (``Lambda[0]`` the constant's).
        For ``kind="lib"``/``"global"`` the Jacobian-Gram eigenvalues, for ``"pca"`` the activation variances, for
        ``"random"`` the variances along the rotated directions.
      mean: ``mu^l`` of shape ``(d_l,)``, the activation mean over data points and positions.
      dims: ``d^_l``, the number of basis directions (constant included).
      gram_spectrum: ``(d_l,)``: all eigenvalues of the activation covariance, descending (before truncation).
      interaction_spectrum: ``(k_l,)``: all eigenvalues of ``M~`` (lib/global; the kept variances for pca/random),
        descending, before the second truncation.
      num_dropped_gram: how many covariance directions the activation cutoff dropped (int array).
      num_dropped_interaction: how many whitened directions the interaction cutoff dropped (int array).
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


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with edges.py


def acc_dtype():
    """Accumulation dtype: float64 when x64 is enabled, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def to_hat(h, C) -> jax.Array:
    """``[h, 1] @ C`` for ``h`` of shape ``(..., d)``."""
    C = C.astype(h.dtype)
    return h @ C[:-1] + jnp.reshape(C[-1], (1,) * (h.ndim - 1) + (C.shape[1],))


def from_hat(hh, C_pinv) -> jax.Array:
    """``(h^ @ C^+)[..., :d]``: activations from basis coordinates."""
    return hh @ C_pinv[:, :-1].astype(hh.dtype)


def check_basis_matches(model: Sections, basis: InteractionBasis, shapes=None):
    """ValueError when ``basis`` was computed for a model with other node layers."""
    if not isinstance(basis, InteractionBasis):
        raise ValueError(f"basis must be an InteractionBasis (from degenjax.interaction_basis); got "
                         f"{type(basis).__name__}.")
    if len(basis.C) != len(model):
        raise ValueError(f"the basis has {len(basis.C)} node layers but the model has {len(model)} sections; it was "
                         "computed for another model.")
    if shapes is not None:
        for l in range(len(model)):
            d = shapes[l].shape[-1]
            if basis.C[l].shape[0] != d + 1:
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has {d} features but the basis C^{l} has "
                                 f"{basis.C[l].shape[0]} rows (expected d + 1 = {d + 1}); the basis was computed "
                                 "for another model.")


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


def _safe_inv(v):
    pos = v > 0
    return jnp.where(pos, 1.0 / jnp.where(pos, v, 1.0), 0.0)


def _assemble(mu, R, Rp, lam0):
    """``C`` (constant column first, centring row last) and ``C^+`` from the non-constant maps (module docstring)."""
    d, n = R.shape
    dt = R.dtype
    s0 = jnp.sqrt(lam0)
    top = jnp.concatenate([jnp.zeros((d, 1), dt), R], axis=1)
    bottom = jnp.concatenate([s0[None], -(mu @ R)])[None, :]
    C = jnp.concatenate([top, bottom], axis=0)
    first = jnp.concatenate([mu / s0, (1.0 / s0)[None]])[None, :]
    rest = jnp.concatenate([Rp, jnp.zeros((n, 1), dt)], axis=1)
    return C, jnp.concatenate([first, rest], axis=0)


def _layer_full(cov, mu, M, rtol, key, *, kind: str, k: int | None):
    """Untruncated basis of one layer: ``C`` ``(d+1, d+1)``, ``C^+``, ``Lambda`` with columns in descending order.

    The activation cutoff is applied by masking (directions at or below it get zero weight, so no noise direction
    is whitened); the interaction cutoff is applied afterwards by slicing the leading columns, which is exact since
    each column depends only on its own eigenpair. ``k`` (static) is only used by ``kind="random"``.
    """
    dt = cov.dtype
    D, U = eigh(cov)
    cut_g = rtol * jnp.maximum(D[0], 0.0)
    keep_g = D > cut_g
    count_g = jnp.sum(keep_g).astype(jnp.int32)
    if kind == "pca":
        R = U * keep_g[None, :].astype(dt)
        C, Cp = _assemble(mu, R, R.T, jnp.ones((), dt))
        return C, Cp, jnp.concatenate([jnp.ones((1,), dt), jnp.where(keep_g, D, 0.0)]), D, D, count_g, count_g
    if kind == "random":
        Uk, Dk = U[:, :k], D[:k]
        q, r = jnp.linalg.qr(jax.random.normal(key, (k, k), dt))
        Q = q * jnp.sign(jnp.diag(r))[None, :]  # Haar-distributed orthogonal matrix
        C, Cp = _assemble(mu, Uk @ Q, Q.T @ Uk.T, jnp.ones((), dt))
        lam = jnp.einsum("ij,i,ij->j", Q, Dk, Q)
        return C, Cp, jnp.concatenate([jnp.ones((1,), dt), lam]), D, Dk, count_g, jnp.asarray(k, jnp.int32)
    s = jnp.where(keep_g, jnp.sqrt(jnp.where(keep_g, D, 1.0)), 0.0)
    S = U * s[None, :]  # whitened coordinates -> activations (zero for dropped directions)
    Lam, V = eigh(S.T @ M @ S)
    cut_i = rtol * jnp.maximum(Lam[0], 0.0)
    count_i = jnp.sum(Lam > cut_i).astype(jnp.int32)
    R = (U * _safe_inv(s)[None, :]) @ V * jnp.sqrt(jnp.maximum(Lam, 0.0))[None, :]
    Rp = (_safe_inv(jnp.sqrt(jnp.maximum(Lam, 0.0)))[:, None] * V.T) @ (s[:, None] * U.T)
    # constant coordinate kept apart: its Jacobian in the centred frame is J mu, so Lambda_0 = mu^T M mu
    lam0 = mu @ M @ mu
    lam0 = jnp.where(lam0 > cut_i, lam0, jnp.ones((), dt))
    C, Cp = _assemble(mu, R, Rp, lam0)
    return C, Cp, jnp.concatenate([lam0[None], Lam]), D, Lam, count_g, count_i


_layer_full_jit = jax.jit(_layer_full, static_argnames=("kind", "k"))


def layer_basis(cov: ArrayLike, mean: ArrayLike, M: ArrayLike | None, *, kind: str = "lib",
                rtol: float | None = None, key=None, keep: int | None = None, name: str = "layer",
                jit: bool = True):
    """The basis of one node layer from its covariance, mean and Jacobian Gram (DESIGN section 3, steps 1-4).

    Args:
      cov: ``(d, d)`` activation covariance (the non-constant block of the centred Gram).
      mean: ``(d,)`` activation mean.
      M: ``(d, d)`` Jacobian Gram (``kind="lib"``/``"global"``); ignored for ``"pca"``/``"random"``.
      kind: ``"lib"``, ``"global"``, ``"pca"`` or ``"random"``.
      rtol: relative cutoff; eigenvalues ``<= rtol * max`` are dropped. Default ``(d + 1) * eps`` of the dtype.
      key: PRNG key for ``kind="random"``.
      keep: if given, keep exactly ``min(keep, d)`` non-constant directions (static shapes, so this works under
        ``jax.jit``); the cutoffs still mask directions below them.
      name: the layer's name for error messages.
      jit: compile the linear algebra (cached per shape); False runs it op by op.

    Returns:
      ``(C, C_pinv, Lambda, gram_spectrum, interaction_spectrum, num_dropped_gram, num_dropped_interaction)``.

    Raises:
      ValueError: a rank-0 layer (all activations constant), or no direction with non-zero interaction.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")
    check_rtol(rtol, "layer_basis")
    dt = acc_dtype()
    cov = jnp.asarray(cov, dt)
    mu = jnp.asarray(mean, dt)
    d = cov.shape[0]
    rtol = jnp.asarray((d + 1) * float(jnp.finfo(dt).eps) if rtol is None else rtol, dt)
    fn = _layer_full_jit if jit else _layer_full
    k = None
    if kind == "random":
        if key is None:
            raise ValueError('kind="random" needs key=jax.random.key(...) for the random rotation.')
        count_g = fn(cov, mu, jnp.zeros_like(cov), rtol, None, kind="pca", k=None)[5]  # shares the pca compile
        k = _num_kept(count_g, keep, d, "activation")
        if k == 0:
            raise ValueError(f"node layer {name} has rank 0: its activations are constant on the data.")
    M = jnp.zeros_like(cov) if M is None else jnp.asarray(M, dt)
    C, Cp, Lambda, D, spec, count_g, count_i = fn(cov, mu, M, rtol, key, kind="lib" if kind == "global" else kind,
                                                  k=k)
    n = _num_kept(count_i, keep, d if kind != "random" else k, "interaction")
    if n == 0:
        raise ValueError(f"node layer {name} has rank 0 or no interaction: every activation-covariance eigenvalue, "
                         "or every eigenvalue of the Jacobian Gram in whitened coordinates, is below the cutoff; "
                         "the later sections do not depend on this layer on the data.")
    dropped_g = jnp.asarray(d, jnp.int32) - count_g
    dropped_i = jnp.zeros((), jnp.int32) if kind in ("pca", "random") else count_g - count_i
    if kind in ("pca", "random"):
        spec = spec[:n]
    return C[:, :n + 1], Cp[:n + 1], Lambda[:n + 1], D, spec, dropped_g, dropped_i


# ---------------------------------------------------------------------------------------------------------------
# public API


def interaction_basis(model, params, batches, *, kind: str = "lib", rtol: float | None = None, key=None,
                      dims: Sequence[int] | None = None, jacobian_kwargs: dict | None = None,
                      activation_kwargs: dict | None = None, jit: bool = True) -> InteractionBasis:
    """The (Local) Interaction Basis of every node layer, computed last layer first (DESIGN section 3).

    ``kind="lib"``: the Jacobian Gram of node layer ``l`` differentiates the next node layer's basis coordinates
    ``f_l(h_l) @ C^{l+1}[:d]`` (for the last node layer: the output logits, identity basis). ``"global"``: the
    Jacobian to the network output. ``"pca"``: the centred rotation ``C = Y U`` without whitening. ``"random"``: a
    random orthogonal rotation of the PCA directions (the constant direction stays column 0).

    Args:
      model: `Sections` (or a list of ``f_l(params, h)``); node layers must be arrays with the feature axis last,
        optionally with positions axes before it.
      params: passed to every section.
      batches: an input batch (array or pytree) or an iterable of batches; it is iterated once per node layer plus
        once, so pass a list rather than a one-shot generator.
      kind: ``"lib"`` (default), ``"global"``, ``"pca"`` or ``"random"``.
      rtol: relative eigenvalue cutoff for both truncations; default ``(d_l + 1) * eps`` of the accumulation dtype
        (NumPy's ``matrix_rank`` convention), which drops float noise. Dropped counts and full spectra are
        recorded in the result.
      key: PRNG key, required for ``kind="random"``.
      dims: optional static number of non-constant directions per node layer (overrides ``rtol`` for the choice
        of shapes; required under ``jax.jit``, where the cutoff cannot pick array shapes).
      jacobian_kwargs: extra keyword arguments for `degenjax.jacobian_gram` (e.g. ``num_sources``, ``key``,
        ``chunk_size``, ``mesh``, ``jit``).
      activation_kwargs: extra keyword arguments for `degenjax.activation_stats` (e.g. ``mesh``, ``jit``).
      jit: compile the per-batch Gram steps and the per-layer linear algebra (each cached per shape), as the Gram
        functions do; False runs everything op by op. Inside the user's ``jax.jit`` either way works.

    Returns:
      `InteractionBasis` with tuples over node layers ``0..L-1``.

    Raises:
      ValueError: unknown kind, NaN/inf params or activations (naming the leaf or layer), a rank-0 layer, a layer
        with no interaction, or traced values under ``jax.jit`` without ``dims``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")
    check_rtol(rtol, "interaction_basis")
    model = as_sections(model)
    L = len(model)
    if dims is not None and len(dims) != L:
        raise ValueError(f"dims has {len(dims)} entries but the model has {L} node layers.")
    check_finite_params(params, "the interaction basis needs a finite network")
    batches = as_batch_list(batches, "interaction_basis")
    stats = activation_stats(model, params, batches, center=True, **{"jit": jit, **(activation_kwargs or {})})
    means = list(stats.means)
    covs = [g[:-1, :-1] for g in stats.grams]  # centred Gram = blockdiag(Cov, 1)
    check_dims(dims, [c.shape[0] for c in covs], "interaction_basis")
    if not is_traced(covs):
        for l in range(L):
            if not bool(jnp.all(jnp.isfinite(covs[l]))):
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has NaN or inf activations; check the "
                                 "inputs and the sections before it.")
            var, scale = float(jnp.max(jnp.diag(covs[l]))), float(jnp.max(means[l] ** 2))
            if var <= (covs[l].shape[0] + 1) * float(jnp.finfo(covs[l].dtype).eps) * max(var, scale):
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has rank 0: its activations are constant "
                                 "on the data; there is nothing to interpret. Check the params (dead layer?) or the "
                                 "data, or leave this layer out of the sections.")
    jkw = {"jit": jit, **(jacobian_kwargs or {})}
    keys = jax.random.split(key, L) if (kind == "random" and key is not None) else [None] * L
    results: list[Any] = [None] * L
    C_next = None
    for l in reversed(range(L)):
        M = None
        if kind == "lib":
            M = jacobian_gram(model, params, batches, l, out_basis=None if l == L - 1 else C_next, target="next",
                              **jkw)
        elif kind == "global":
            M = jacobian_gram(model, params, batches, l, target="output", **jkw)
        if M is not None and not is_traced(M) and not bool(jnp.all(jnp.isfinite(M))):
            raise ValueError(f"node layer {l} ({model.layer_name(l)}): the Jacobian Gram has NaN or inf entries; "
                             "check the params and the sections after this layer.")
        results[l] = layer_basis(covs[l], means[l], M, kind=kind, rtol=rtol, key=keys[l],
                                 keep=None if dims is None else dims[l], name=f"{l} ({model.layer_name(l)})",
                                 jit=jit)
        C_next = results[l][0]
    C, Cp, Lam, Dfull, spec, dg, di = (tuple(r[i] for r in results) for i in range(7))
    return InteractionBasis(C=C, C_pinv=Cp, Lambda=Lam, mean=tuple(means), dims=tuple(c.shape[1] for c in C),
                            gram_spectrum=Dfull, interaction_spectrum=spec, num_dropped_gram=dg,
                            num_dropped_interaction=di)


def transform(model, basis: InteractionBasis) -> Sections:
    """The network re-expressed in the basis: ``f^_l(p, h^) = [f_l(p, (h^ C_l^+)[:d]), 1] C_{l+1}``.

    The first section takes ``h^_0 = [x, 1] C_0`` (not the raw input); the last section maps to the raw output
    ``f_{L-1}((h^ C_{L-1}^+)[:d])``. Sections take ``params`` like the original model. On the data the composition
    reproduces the original outputs up to the truncated directions (exactly when nothing was truncated).

    Args:
      model: `Sections` (or a list of functions).
      basis: an `InteractionBasis` for this model.

    Returns:
      `Sections` with the same number of sections and names.

    Raises:
      ValueError: if the basis has another number of node layers, or (when called) a node layer's feature size does
        not match ``C^l``.
    """
    model = as_sections(model)
    check_basis_matches(model, basis)
    L = len(model)

    def make(l):
        f, Cp = model.fns[l], basis.C_pinv[l]
        C_next = basis.C[l + 1] if l + 1 < L else None

        def section(params, hh):
            if hh.shape[-1] != Cp.shape[0]:
                raise ValueError(f"transformed section {l} expects {Cp.shape[0]} basis coordinates (d^_{l}) in the "
                                 f"last axis; got shape {hh.shape}.")
            out = f(params, from_hat(hh, Cp))
            if C_next is None:
                return out
            if out.shape[-1] + 1 != C_next.shape[0]:
                raise ValueError(f"section {l} outputs {out.shape[-1]} features but the basis C^{l + 1} has "
                                 f"{C_next.shape[0]} rows (expected {out.shape[-1] + 1}); the basis was computed for "
                                 "another model.")
            return to_hat(out, C_next)

        section.__name__ = f"hat_section_{l}"
        return section

    return Sections(tuple(make(l) for l in range(L)), names=model.names)
