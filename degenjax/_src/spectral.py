"""Stochastic Lanczos quadrature: the eigenvalue density of a large symmetric operator (docs/maths.md#spectral-density).

For a unit probe ``v`` the Lanczos tridiagonal ``T_m`` (``m`` steps from ``v``) gives the Gauss quadrature rule
``v^T f(A) v ~= sum_i tau_i f(theta_i)`` with nodes ``theta_i`` (eigenvalues of ``T_m``) and weights ``tau_i``
(squared first components of its eigenvectors). With Rademacher probes ``z`` and ``v = z / sqrt(d)``,
``tr f(A) = d E[v^T f(A) v]`` (Hutchinson), so ``f = 1[lambda < t]`` counts the eigenvalues below ``t``: this is
how degeneracy (near-zero eigenvalues) is counted when the spectrum is too large for :func:`degenjax.eigh`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from degenjax._src.numerics import compute_dtype, default_symmetry_rtol, scale_exponent
from degenjax._src.operators import block_ops, check_operator, explicit_mesh_of, layout, operator_info, row_spec


class SpectralDensity(NamedTuple):
    """Quadrature rules of stochastic Lanczos quadrature, one per probe.

    Attributes:
      nodes: ``(num_probes, num_lanczos)`` Ritz values of each probe's Lanczos tridiagonal.
      weights: ``(num_probes, num_lanczos)`` quadrature weights (each row sums to 1).
      dim: the dimension ``d`` of the operator.
    """

    nodes: jax.Array
    weights: jax.Array
    dim: Any

    def _per_probe(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        per_probe = self.dim * jnp.sum(self.weights * values, axis=-1)
        num = per_probe.shape[0]
        stderr = jnp.std(per_probe, ddof=1) / np.sqrt(num) if num > 1 else jnp.full((), jnp.nan, per_probe.dtype)
        return jnp.mean(per_probe), stderr

    def trace(self, fn: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Estimate of ``tr f(A) = sum_i f(lambda_i)`` and its standard error over probes (NaN for one probe).

        Args:
          fn: elementwise function of the eigenvalues.

        Returns:
          ``(estimate, stderr)``, scalars.
        """
        return self._per_probe(fn(self.nodes).astype(self.weights.dtype))

    def count_below(self, threshold: ArrayLike) -> jax.Array:
        """Estimated number of eigenvalues ``< threshold`` (a scalar; see :meth:`count_below_stderr`)."""
        return self.trace(lambda x: x < threshold)[0]

    def count_below_stderr(self, threshold: ArrayLike) -> jax.Array:
        """Standard error over probes of :meth:`count_below` (NaN with a single probe)."""
        return self.trace(lambda x: x < threshold)[1]

    def density(self, grid: ArrayLike, sigma: float) -> jax.Array:
        """Eigenvalue density (eigenvalues per unit, integrating to ``d``) smoothed by a Gaussian of width ``sigma``.

        Args:
          grid: ``(g,)`` points at which to evaluate the density.
          sigma: Gaussian kernel width, > 0.

        Returns:
          ``(g,)`` smoothed density.
        """
        grid = jnp.asarray(grid, self.nodes.dtype)
        z = (grid[None, None, :] - self.nodes[:, :, None]) / sigma
        kernel = jnp.exp(-0.5 * z * z) / (sigma * np.sqrt(2.0 * np.pi))
        return self.dim * jnp.mean(jnp.sum(self.weights[:, :, None] * kernel, axis=1), axis=0)


def _lanczos_ops(mesh, comp):
    """Column dots, projections on the stored basis (d, m, P) and slot updates; sharded by rows on a mesh."""

    def dots(x, y):
        return jnp.sum(x.astype(comp) * y.astype(comp), axis=0)

    def coef(basis, w):
        return jnp.einsum("dmp,dp->mp", basis.astype(comp), w.astype(comp))

    def subtract(basis, c, w):
        return (w.astype(comp) - jnp.einsum("dmp,mp->dp", basis.astype(comp), c)).astype(w.dtype)

    def store(basis, v, j):
        return jax.lax.dynamic_update_index_in_dim(basis, v, j, axis=1)

    if mesh is None:
        return dots, coef, subtract, store
    axes = tuple(mesh.axis_names)
    rows, rows3 = P(axes, None), P(axes, None, None)

    def smap(f, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    return (smap(lambda x, y: jax.lax.psum(dots(x, y), axes), (rows, rows), P()),
            smap(lambda b, w: jax.lax.psum(coef(b, w), axes), (rows3, rows), P()),
            smap(subtract, (rows3, P(), rows), rows),
            smap(store, (rows3, rows, P()), rows3))


def spectral_density(a_or_matvec: ArrayLike | Callable[[jax.Array], jax.Array], *, key: jax.Array,
                     num_probes: int, num_lanczos: int, dim: int | None = None, mesh: Mesh | None = None,
                     dtype=None, symmetry_rtol: float | None = None, check: bool = True) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density of a symmetric operator.

    Runs ``num_lanczos`` Lanczos steps with full reorthogonalisation (classical Gram-Schmidt, twice) from
    ``num_probes`` Rademacher probes at once, as one ``(d, num_probes)`` block product per step. Memory: the Lanczos
    basis, ``d * num_lanczos * num_probes`` numbers (row-sharded on a mesh). An eigenvalue separated from the rest
    of the spectrum (such as an exact null space below a gap) gets its full quadrature weight after a few steps;
    the standard error of counts is that of Hutchinson's estimator, at most ``sqrt(2 count / num_probes)``.

    Args:
      a_or_matvec: symmetric ``(d, d)`` matrix (optionally row-sharded), or a function mapping a ``(d, b)`` block
        ``X`` to ``A X``.
      key: PRNG key for the probes.
      num_probes: number of Rademacher probes (>= 2 for a standard error).
      num_lanczos: Lanczos steps per probe, ``1 <= num_lanczos <= d``.
      dim: ``d``, required with a matvec.
      mesh: optional ``jax.sharding.Mesh`` (all axes Explicit or all Auto) to shard rows over; ``d`` must be
        divisible by its size.
      dtype: working dtype of the Lanczos vectors (as in :func:`degenjax.eigh_topk`).
      symmetry_rtol: tolerance of the symmetry probe, default ``10 sqrt(eps)`` of the working dtype.
      check: run the value checks (NaN/inf, symmetry) when called outside ``jax.jit``.

    Returns:
      ``SpectralDensity(nodes, weights, dim)``; ``count_below(t)`` estimates the number of eigenvalues below ``t``.

    Raises:
      ValueError: on a non-square or complex matrix, a matvec without ``dim`` or returning the wrong shape, bad
        ``num_probes``/``num_lanczos``, ``d`` not divisible by the mesh size, and (outside jit) non-finite or
        non-symmetric input.
    """
    name = "spectral_density"
    matvec = a_or_matvec if callable(a_or_matvec) else None
    operator, d, work = operator_info(a_or_matvec, dim, dtype, name)
    comp = compute_dtype(work)
    for label, value, upper in (("num_probes", num_probes, None), ("num_lanczos", num_lanczos, d)):
        if not isinstance(value, (int, np.integer)) or value < 1 or (upper is not None and value > upper):
            bound = f" and <= d = {d}" if upper is not None else ""
            raise ValueError(f"{name} needs an integer {label} >= 1{bound}; got {value!r}.")
    if mesh is None:
        mesh = explicit_mesh_of(operator)
    if mesh is not None and d % mesh.size:
        raise ValueError(f"{name} shards the {d} rows over {mesh.size} devices of the mesh, so d must be divisible "
                         f"by {mesh.size}; pad the operator with zero rows/columns or change the mesh.")
    if mesh is not None and matvec is None:
        operator = layout(mesh, row_spec(tuple(mesh.axis_names)))(operator)
    ops = block_ops(operator, mesh, work, comp)
    if check:
        check_operator(ops, d, num_probes, work, key, default_symmetry_rtol(work)
                              if symmetry_rtol is None else symmetry_rtol, name, matvec)
    dots, coef, subtract, store = _lanczos_ops(mesh, comp)
    m, num = int(num_lanczos), int(num_probes)
    signs = jax.random.rademacher(key, (d, num), dtype=work)
    v0 = ops.rows(signs / jnp.sqrt(jnp.asarray(d, work)))
    basis = jnp.zeros((d, m, num), work)
    if mesh is not None:
        basis = layout(mesh, P(tuple(mesh.axis_names), None, None))(basis)
    basis = store(basis, v0, 0)
    eps = float(jnp.finfo(work).eps)

    def step(j, state):
        basis, v, v_prev, beta_prev, alphas, betas, anorm, exp = state
        w = ops.matmat(v)
        # Scale invariance: run on 2^-e A with 2^e the magnitude of the first product (unit probes), so that no
        # square under- or overflows at extreme scales (e.g. a float32 Gram times 1e-20 or 1e20); exact in binary.
        exp = jnp.where(j == 0, scale_exponent(w), exp)
        w = jnp.ldexp(w, -exp)
        alpha = dots(v, w)
        anorm = jnp.maximum(anorm, jnp.sqrt(dots(w, w)))
        w = (w.astype(comp) - v.astype(comp) * alpha[None, :] - v_prev.astype(comp) * beta_prev[None, :]).astype(work)
        for _ in range(2):  # full reorthogonalisation against the stored basis (unfilled slots are zero)
            w = subtract(basis, coef(basis, w), w)
        beta = jnp.sqrt(dots(w, w))
        # Breakdown (invariant Krylov subspace): continue from zero, which decouples T with zero quadrature weight.
        alive = beta > 10.0 * eps * anorm
        v_next = (w.astype(comp) * jnp.where(alive, 1.0 / jnp.where(alive, beta, 1.0), 0.0)[None, :]).astype(work)
        beta = jnp.where(alive, beta, 0.0)
        # Slot j + 1 receives v_{j+1}; the last step's store (clamped to slot m - 1) is never read again.
        basis = store(basis, v_next, jnp.minimum(j + 1, m - 1)) if m > 1 else basis
        return (basis, v_next, v, beta, alphas.at[j].set(alpha), betas.at[j].set(beta), anorm, exp)

    zeros = jnp.zeros((m, num), comp)
    init = (basis, v0, jnp.zeros_like(v0), jnp.zeros((num,), comp), zeros, zeros, jnp.zeros((num,), comp),
            jnp.asarray(0, jnp.int32))
    _, _, _, _, alphas, betas, _, exp = jax.lax.fori_loop(0, m, step, init)
    # Tridiagonal T per probe, (num, m, m); its off-diagonal is the first m - 1 betas.
    tridiag = jax.vmap(lambda a, b: jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1))
    t = tridiag(alphas.T, betas[: m - 1].T)
    nodes, vecs = jnp.linalg.eigh(t, symmetrize_input=False)
    return SpectralDensity(jnp.ldexp(nodes, exp), vecs[:, 0, :] ** 2, d)
