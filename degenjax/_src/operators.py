"""Linear operators given as a matrix or a block matvec: validation and row-sharded block primitives.

The eigensolvers (`degenjax.eigh_topk`, `degenjax.spectral_density`) accept a symmetric ``(d, d)`` matrix (optionally
row-sharded over a mesh) or a function mapping a ``(d, b)`` block ``X`` to ``A X``, so that a Gram too large to form
can stay implicit (docs/maths.md#spectral-density). This module turns either into `BlockOps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from degenjax._src.numerics import compute_dtype
from degenjax._src.validation import is_traced


def as_array(a, name: str):
    """``a`` as a JAX/NumPy array; a ValueError (not a TypeError deep in NumPy) for strings, None, ragged lists."""
    if isinstance(a, (jax.Array, np.ndarray)):
        return a
    try:
        if a is None or isinstance(a, (str, bytes)):
            raise TypeError
        out = np.asarray(a)
        if out.dtype == object or not (np.issubdtype(out.dtype, np.number) or out.dtype == bool):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric (d, d) array (or a matvec callable where accepted); got "
                         f"{type(a).__name__} {str(a)[:40]!r}.") from None
    return out


def check_real(a, name: str):
    dtype = jnp.result_type(a)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"{name} must be a real symmetric matrix; got complex dtype {dtype}. Pass the real part, or "
                         "split a Hermitian matrix into the real symmetric [[Re, -Im], [Im, Re]] form.")


class BlockOps(NamedTuple):
    """Distributed primitives on row-sharded (d, b) blocks; small (b, b) matrices are replicated."""

    rows: Callable  # (d, b) -> (d, b) laid out row-sharded
    matmat: Callable  # Q (d, b) -> A Q (d, b)
    inner: Callable  # X, Y (d, b), (d, c) -> X^T Y (b, c) in the compute dtype
    rmul: Callable  # X (d, b), S (b, c) -> X S (d, c)
    ritz: Callable  # Q, Y, S, theta -> (Q S, Y S, column sums of squares of (Y S - Q S diag(theta)))


def row_spec(axes) -> P:
    return P(axes, None)


def is_explicit_mesh(mesh) -> bool:
    types = set(mesh.axis_types)
    if types - {AxisType.Explicit, AxisType.Auto} or len(types) > 1:
        raise ValueError(f"The eigensolvers need a mesh whose axes are all Explicit or all Auto; got axis types "
                         f"{mesh.axis_types}. Build it with jax.make_mesh(shape, names, axis_types=...).")
    return types == {AxisType.Explicit}


def layout(mesh, spec: P) -> Callable:
    """Function laying an array out as ``spec`` on ``mesh`` (reshard on Explicit, sharding constraint on Auto)."""
    sharding = NamedSharding(mesh, spec)
    if is_explicit_mesh(mesh):
        return lambda x: jax.reshard(x, sharding)
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def block_ops(operator, mesh, work, comp) -> BlockOps:
    """Block primitives for a dense matrix (row-sharded already when ``mesh`` is given) or a block matvec."""
    dense = not callable(operator)

    def local_inner(x, y):
        return jnp.matmul(x.astype(comp).T, y.astype(comp))

    def local_rmul(x, s):
        return jnp.matmul(x.astype(comp), s).astype(work)

    def local_ritz(q, y, s, theta):
        v, av = jnp.matmul(q.astype(comp), s), jnp.matmul(y.astype(comp), s)
        r = av - v * theta[None, :]
        return v.astype(work), av.astype(work), jnp.sum(r * r, axis=0)

    if mesh is None:
        matmat = (lambda q: jnp.matmul(operator, q)) if dense else operator
        return BlockOps(lambda x: x, matmat, local_inner, local_rmul, local_ritz)

    axes = tuple(mesh.axis_names)
    rows_spec = row_spec(axes)
    rows = layout(mesh, rows_spec)

    def smap(f, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    inner = smap(lambda x, y: jax.lax.psum(local_inner(x, y), axes), (rows_spec, rows_spec), P())
    rmul = smap(local_rmul, (rows_spec, P()), rows_spec)

    def sharded_ritz(q, y, s, theta):
        v, av, sq = local_ritz(q, y, s, theta)
        return v, av, jax.lax.psum(sq, axes)

    ritz = smap(sharded_ritz, (rows_spec, rows_spec, P(), P()), (rows_spec, rows_spec, P()))
    if dense:
        # Each device multiplies its row block of A by the gathered (d, b) block: the only all-gather is of Q.
        row_matmat = smap(lambda a, q: jnp.matmul(a, jax.lax.all_gather(q, axes, axis=0, tiled=True)),
                          (rows_spec, rows_spec), rows_spec)
        matmat = lambda q: row_matmat(operator, q)  # noqa: E731
    else:
        matmat = lambda q: rows(operator(q))  # noqa: E731
    return BlockOps(rows, matmat, inner, rmul, ritz)


def operator_info(a_or_matvec, dim, dtype, name):
    """Validates a matrix or block matvec; returns (operator cast to the working dtype, d, working dtype)."""
    if callable(a_or_matvec):
        if dim is None:
            raise ValueError(f"{name} got a matvec callable, so it cannot infer the dimension: pass dim=d (the "
                             "matvec maps a (d, b) block to a (d, b) block).")
        d = int(dim)
        work = jnp.dtype(dtype) if dtype is not None else compute_dtype(jnp.float32)
        return a_or_matvec, d, work
    a_or_matvec = as_array(a_or_matvec, f"{name} input")
    check_real(a_or_matvec, f"{name} input")
    a = jnp.asarray(a_or_matvec)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} needs a square (d, d) matrix or a matvec callable; got shape {a.shape}.")
    if dim is not None and int(dim) != a.shape[0]:
        raise ValueError(f"{name} got dim={dim} but the matrix has shape {a.shape}; drop dim or make them agree.")
    work = jnp.dtype(dtype) if dtype is not None else (
        a.dtype if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize >= 4 else compute_dtype(a.dtype))
    return a.astype(work), a.shape[0], work


def explicit_mesh_of(a):
    """The mesh of an array whose type is sharded over Explicit mesh axes (None otherwise)."""
    if callable(a):
        return None
    try:
        sharding = jax.typeof(a).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    if not any(s is not None for s in sharding.spec):
        return None
    concrete = getattr(getattr(a, "sharding", None), "mesh", None)  # eager arrays carry the device mesh
    return concrete if isinstance(concrete, Mesh) else mesh


def check_operator(ops: BlockOps, d, b, work, key, symmetry_rtol, name, matvec):
    """Shape check (always, via eval_shape) and, outside jit, a random-probe check for NaN/inf and asymmetry."""
    if matvec is not None:
        out = jax.eval_shape(matvec, jax.ShapeDtypeStruct((d, b), work))
        if getattr(out, "shape", None) != (d, b):
            raise ValueError(f"{name}: the matvec returned the wrong shape: it must map a (d, b) = {(d, b)} block to "
                             f"a {(d, b)} block but returned {getattr(out, 'shape', type(out).__name__)}. Apply A "
                             "column-wise to the block (e.g. A @ X, or J^T (J X) for an implicit Gram).")
    # Columns of norm ~1 (not ~sqrt(d)), so that the probe itself cannot overflow where A is near the dtype's range.
    x = ops.rows(jax.random.normal(jax.random.fold_in(key, 7), (d, b), work) / np.sqrt(d).astype(work))
    s = ops.inner(x, ops.matmat(x))
    if is_traced(s):
        return
    s = np.asarray(s)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name}: applying A to a random block gave NaN or inf; the matrix (or matvec) has "
                         "non-finite entries.")
    scale = np.max(np.abs(s))
    asym = np.max(np.abs(s - s.T))
    if asym > symmetry_rtol * scale:
        raise ValueError(f"{name}: the operator is not symmetric: for random X, max|X^T A X - (X^T A X)^T| / "
                         f"max|X^T A X| = {asym / scale:.3g} > symmetry_rtol = {symmetry_rtol:.3g}. Pass a symmetric "
                         "matrix (e.g. (A + A.T) / 2) or raise symmetry_rtol.")
