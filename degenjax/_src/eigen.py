"""Symmetric eigensolvers: dense ``eigh`` and a sharded top-k solver (docs/maths.md#eigensolvers).

``eigh`` wraps the dense ``jax.numpy.linalg.eigh`` with the conventions used across degenjax: eigenvalues in
descending order, eigenvectors as columns, the input symmetrised, float64 where x64 is enabled. ``eigh_topk`` is
block subspace iteration on row-sharded ``(d, b)`` blocks that never gathers the ``(d, d)`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from degenjax._src.numerics import compute_dtype, default_symmetry_rtol, scale_exponent
from degenjax._src.operators import (BlockOps, as_array, block_ops, check_operator, check_real, explicit_mesh_of, layout,
                                     operator_info, row_spec)
from degenjax._src.validation import is_traced


def eigh(a: ArrayLike, *, symmetry_rtol: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Dense symmetric eigendecomposition, eigenvalues in descending order.

    The input is symmetrised, ``(A + A^T) / 2``, and computed in float64 where x64 is enabled (float32 otherwise).
    Repeated and zero eigenvalues are handled by the dense solver (orthonormal eigenvectors in every case).

    Size limit: the dense solver does not partition the matrix. A row-sharded input is gathered, and each device
    then holds about ``3 d^2`` numbers (input, eigenvectors, workspace; measured with ``memory_analysis()`` in
    benchmarks/eigen.py), e.g. 6.4 GB in float64 at ``d = 16384``. Beyond what fits, use :func:`eigh_topk` for the
    leading eigenpairs (``~d^2 / n`` per device on ``n`` devices) and :func:`spectral_density` to count
    (near-)zero eigenvalues.

    Args:
      a: symmetric matrix of shape ``(..., d, d)`` (leading batch axes allowed).
      symmetry_rtol: largest allowed ``max|A - A^T| / max|A|`` before a ``ValueError`` is raised (checked only
        when ``a`` is concrete, i.e. not under ``jax.jit``). Default ``10 sqrt(eps)`` of the input dtype.

    Returns:
      ``(values, vectors)``: ``values`` of shape ``(..., d)``, descending; ``vectors`` of shape ``(..., d, d)``
      whose column ``i`` is the unit eigenvector of ``values[..., i]``.

    Raises:
      ValueError: if ``a`` is not a (batch of) square matrix, is complex, or (when concrete) contains NaN/inf or is
        not symmetric within ``symmetry_rtol``.
    """
    a = as_array(a, "eigh input")
    check_real(a, "eigh input")
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"eigh needs a square matrix of shape (..., d, d); got shape {a.shape}.")
    in_dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.dtype(jnp.float32)
    a = a.astype(compute_dtype(a.dtype))
    mesh = explicit_mesh_of(a)
    if mesh is not None:  # the dense solver needs the whole matrix: gather it (replicate) on the Explicit mesh
        a = jax.reshard(a, NamedSharding(mesh, P()))
    if not is_traced(a) and a.size:
        _check_dense(np.asarray(a), in_dtype, symmetry_rtol)
    a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
    values, vectors = jnp.linalg.eigh(a, symmetrize_input=False)
    return values[..., ::-1], vectors[..., ::-1]


def _check_dense(a: np.ndarray, in_dtype, symmetry_rtol: float | None):
    """`eigh`'s input checks on concrete values (NumPy on the host: no device program is compiled for them)."""
    if not np.all(np.isfinite(a)):
        raise ValueError("eigh input contains NaN or inf entries; check how the matrix was computed.")
    scale = float(np.max(np.abs(a)))
    asym = float(np.max(np.abs(a - np.swapaxes(a, -1, -2))))
    rtol = default_symmetry_rtol(in_dtype) if symmetry_rtol is None else symmetry_rtol
    if asym > rtol * scale:
        raise ValueError(f"eigh input is not symmetric: max|A - A^T| / max|A| = {asym / scale:.3g} > "
                         f"symmetry_rtol = {rtol:.3g}. Pass a symmetric matrix, or raise symmetry_rtol to accept "
                         "the symmetrised (A + A^T)/2.")


def host_eigh(a, *, symmetry_rtol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`eigh` of a concrete matrix in float64 LAPACK on the host (NumPy): the same conventions and checks, no
    device program to compile (for the small per-layer steps of the basis, whose first call would otherwise be
    dominated by compiling them). The input's dtype sets the symmetry tolerance."""
    a = np.asarray(a)
    in_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float32)
    a = a.astype(np.float64)
    if a.size:
        _check_dense(a, in_dtype, symmetry_rtol)
    values, vectors = np.linalg.eigh(0.5 * (a + np.swapaxes(a, -1, -2)))
    return values[..., ::-1], vectors[..., ::-1]


class EigResult(NamedTuple):
    """Leading eigenpairs from :func:`eigh_topk`.

    Attributes:
      values: ``(k,)`` Ritz values, descending (float64 where x64 is enabled).
      vectors: ``(d, k)`` orthonormal Ritz vectors as columns (the dtype of ``A``; row-sharded on a mesh).
      residuals: ``(k,)`` residual norms ``||A v_i - values_i v_i||`` (float64 where x64 is enabled).
      iterations: ``()`` int32, number of block products with ``A`` in the subspace iteration.
    """

    values: jax.Array
    vectors: jax.Array
    residuals: jax.Array
    iterations: jax.Array


def _upper_inverse(g, shift):
    """Inverse of the upper Cholesky factor R of ``g + shift I`` (R^T R = g + shift I); NaN if not positive."""
    b = g.shape[0]
    eye = jnp.eye(b, dtype=g.dtype)
    lower = jnp.linalg.cholesky(g + shift * eye, symmetrize_input=True)
    return jax.lax.linalg.triangular_solve(lower, eye, left_side=False, lower=True, transpose_a=True)


def _orthonormalize(ops: BlockOps, y, key, comp):
    """Orthonormal basis of the columns of ``y`` (d, b): shifted CholeskyQR, then CholeskyQR2.

    After scaling the columns to unit norm, a first Cholesky QR of ``Y^T Y + s I`` (shift ``s = 100 b^2 eps``)
    always succeeds and leaves a block of condition number <= 10 unless ``Y`` is numerically rank-deficient;
    then two plain Cholesky QR passes give orthonormality to machine precision (Fukaya et al. 2020, shifted
    CholeskyQR3). If ``Y`` is rank-deficient (e.g. rank A < b), the directions of the first pass with squared
    singular value below 1e-2 (of the largest) are replaced by fresh random directions orthogonal to the rest.
    """
    b = y.shape[1]
    eps, tiny = jnp.finfo(comp).eps, jnp.finfo(comp).tiny
    g = ops.inner(y, y)
    # Equilibrate the columns first: y = A V has columns ~ lambda_i v_i, ill-conditioned only through their norms.
    norms = jnp.sqrt(jnp.diagonal(g))
    col_scale = jnp.where(norms > tiny, 1.0 / jnp.where(norms > tiny, norms, 1.0), 0.0)
    g = g * col_scale[:, None] * col_scale[None, :]
    shift = 100.0 * b * eps * jnp.trace(g) + tiny
    q1 = ops.rmul(y, col_scale[:, None] * _upper_inverse(g, shift))
    g1 = ops.inner(q1, q1)
    w, u = jnp.linalg.eigh(g1, symmetrize_input=True)
    full_rank = jnp.all(jnp.isfinite(w)) & (w[0] > 1e-2 * w[-1])

    def complete(q1, key):
        keep = jnp.isfinite(w) & (w > 1e-2 * w[-1])
        scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)
        kept = ops.rmul(q1, u * scale[None, :])  # whitened kept directions, zero columns elsewhere
        fresh = ops.rows(jax.random.normal(key, y.shape, comp) / np.sqrt(y.shape[0])).astype(y.dtype)
        fresh = fresh - ops.rmul(kept, ops.inner(kept, fresh))
        return kept + fresh * jnp.where(keep, 0.0, 1.0).astype(y.dtype)[None, :]

    z = jax.lax.cond(full_rank, lambda q1, key: q1, complete, q1, key)
    for _ in range(2):  # CholeskyQR2
        z = ops.rmul(z, _upper_inverse(ops.inner(z, z), 0.0))
    return z


def _rayleigh_ritz(ops: BlockOps, q, y, k: int):
    """Ritz pairs of A on span(q) given y = A q, ordered: the k of largest |theta| first (descending), then the rest."""
    t = ops.inner(q, y)
    theta, s = jnp.linalg.eigh(0.5 * (t + t.T), symmetrize_input=False)
    by_magnitude = jnp.argsort(-jnp.abs(theta), stable=True)
    top, rest = by_magnitude[:k], by_magnitude[k:]
    top = top[jnp.argsort(-theta[top], stable=True)]
    order = jnp.concatenate([top, rest])
    theta, s = theta[order], s[:, order]
    v, av, sq = ops.ritz(q, y, s, theta)
    return theta, v, av, jnp.sqrt(sq)


def eigh_topk(a_or_matvec: ArrayLike | Callable[[jax.Array], jax.Array], k: int, *, key: jax.Array,
              dim: int | None = None, num_iters: int = 200, tol: float | None = None, oversample: int = 10,
              mesh: Mesh | None = None, dtype=None, symmetry_rtol: float | None = None,
              check: bool = True) -> EigResult:
    """Leading eigenpairs of a symmetric operator by block subspace iteration with Rayleigh-Ritz (docs/maths.md#eigensolvers).

    Iterates ``Q <- orth(A Q)`` on a ``(d, b)`` block, ``b = k + oversample``, with CholeskyQR2 orthonormalisation
    (a shifted first pass, and random completion of rank-deficient blocks), solves the small ``(b, b)`` projected
    problem in float64 where x64 is enabled, and stops when every one of the ``k`` residuals satisfies
    ``||A v - theta v|| <= tol * max|theta|`` or after ``num_iters`` products. The iteration runs on ``2^-e A``
    with ``2^e`` the magnitude of the first product, so results and residuals do not depend on the scale of ``A``
    (a float32 Gram times 1e-20 or 1e20 gives the same relative accuracy as at scale 1; a zero matrix gives zero
    eigenvalues and any orthonormal vectors) as long as ``||A||`` itself is representable. The eigenvalues found are the ``k``
    of largest magnitude (the largest ones for a positive semi-definite Gram), returned in descending order.
    Convergence of pair ``i`` goes like ``(|lambda_{b+1}| / |lambda_i|)^iterations``: raise ``oversample`` for slowly
    decaying spectra.

    On a mesh the block and the rows of a dense ``A`` are sharded over all mesh axes; every device multiplies its
    ``(d / n, d)`` row block by the gathered ``(d, b)`` block, and only ``(b, b)`` matrices are all-reduced: ``A``
    is never gathered (peak memory about ``d^2 / n`` per device). A matvec gets and must return a row-sharded
    global ``(d, b)`` block. An input whose type is sharded over Explicit mesh axes selects its mesh itself.

    Args:
      a_or_matvec: symmetric ``(d, d)`` matrix (optionally row-sharded), or a function mapping a ``(d, b)`` block
        ``X`` to ``A X`` (e.g. ``lambda x: J.T @ (J @ x)`` for an implicit Gram).
      k: number of eigenpairs, ``1 <= k < d``.
      key: PRNG key for the random start block.
      dim: ``d``, required with a matvec.
      num_iters: maximum number of block products with ``A``.
      tol: relative residual tolerance; default ``1e-6`` in float64, ``1e-4`` in float32 (the working dtype).
      oversample: extra block columns ``p`` (capped so that ``k + p <= d``).
      mesh: optional ``jax.sharding.Mesh`` (all axes Explicit or all Auto); ``d`` must be divisible by its size.
      dtype: working dtype of the ``(d, b)`` blocks; default the matrix dtype (for a matvec: float64 where x64 is
        enabled, else float32).
      symmetry_rtol: tolerance of the symmetry probe, default ``10 sqrt(eps)`` of the working dtype.
      check: run the value checks (NaN/inf, symmetry; one extra block product) when called outside ``jax.jit``.

    Returns:
      ``EigResult(values (k,), vectors (d, k), residuals (k,), iterations ())``.

    Raises:
      ValueError: on a non-square or complex matrix, ``k`` out of range, a matvec without ``dim`` or returning the
        wrong shape, ``d`` not divisible by the mesh size, and (outside jit) non-finite or non-symmetric input.
    """
    matvec = a_or_matvec if callable(a_or_matvec) else None
    operator, d, work = operator_info(a_or_matvec, dim, dtype, "eigh_topk")
    comp = compute_dtype(work)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k < d:
        raise ValueError(f"eigh_topk needs an integer k with 1 <= k < d = {d}; got k={k!r}. For the full spectrum "
                         "use eigh.")
    if int(num_iters) < 1 or int(oversample) < 0:
        raise ValueError(f"eigh_topk needs num_iters >= 1 and oversample >= 0; got {num_iters}, {oversample}.")
    tol = (1e-6 if work == jnp.float64 else 1e-4) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"eigh_topk needs tol > 0; got {tol}.")
    if mesh is None:
        mesh = explicit_mesh_of(operator)
    if mesh is not None and d % mesh.size:
        raise ValueError(f"eigh_topk shards the {d} rows over {mesh.size} devices of the mesh, so d must be "
                         f"divisible by {mesh.size}; pad the operator with zero rows/columns or change the mesh.")
    b = min(k + int(oversample), d)
    if mesh is not None and matvec is None:
        operator = layout(mesh, row_spec(tuple(mesh.axis_names)))(operator)
    ops = block_ops(operator, mesh, work, comp)
    key_start, key_loop = jax.random.split(key)
    if check:
        check_operator(ops, d, b, work, key, default_symmetry_rtol(work) if symmetry_rtol is None
                        else symmetry_rtol, "eigh_topk", matvec)

    def body(state):
        it, key, _, _, av, _, exp = state
        key, sub = jax.random.split(key)
        q = _orthonormalize(ops, av, sub, comp)
        y = ops.matmat(q)
        # Scale invariance: the iteration runs on 2^-e A, with 2^e the magnitude of the first product A Q (Q with
        # orthonormal columns), so that no square of an entry under- or overflows (a Gram scaled by 1e-20 in
        # float32 would otherwise give zero residuals; by 1e20, infinities). Powers of two scale exactly.
        exp = jnp.where(it == 0, scale_exponent(y), exp)
        theta, v, av, res = _rayleigh_ritz(ops, q, jnp.ldexp(y, -exp), k)
        return it + 1, key, theta, v, av, res[:k], exp

    def not_converged(state):
        it, _, theta, _, _, res, _ = state
        return (it < num_iters) & ~jnp.all(res <= tol * jnp.max(jnp.abs(theta)))

    # The loop starts from A Q := a random block, so that its first pass orthonormalises the start block.
    start = ops.rows(jax.random.normal(key_start, (d, b), work))
    inf = jnp.full((k,), jnp.inf, comp)
    state = (jnp.asarray(0, jnp.int32), key_loop, jnp.zeros((b,), comp), start, start, inf,
             jnp.asarray(0, jnp.int32))
    it, _, theta, v, _, res, exp = jax.lax.while_loop(not_converged, body, state)
    return EigResult(jnp.ldexp(theta[:k], exp), v[:, :k], jnp.ldexp(res, exp), it)
