"""Shared numerics: accumulation and compute dtypes, matmul precision, scale exponents, float32 warnings.

One home for the dtype and precision conventions every numerical module follows (arXiv 2405.10928, section 2 needs
eigenvalues far below float32's resolution, hence float64 accumulation where x64 is enabled; see docs/maths.md).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
"""Matmul precision for every Gram and edge product (no TF32 / bf16 passes on accelerators)."""


def acc_dtype():
    """Accumulation dtype: float64 when x64 is enabled, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def compute_dtype(dtype):
    """float64 when x64 is enabled, otherwise the input's float dtype (at least float32)."""
    if jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def default_symmetry_rtol(dtype) -> float:
    """``10 sqrt(eps)`` of ``dtype``: the asymmetry ``max|A - A^T| / max|A|`` the eigensolvers tolerate."""
    return float(10.0 * np.sqrt(np.finfo(jnp.dtype(dtype)).eps))


def scale_exponent(y) -> jax.Array:
    """``e`` (int32) with ``2^(e-1) <= max|y| < 2^e``; 0 for an all-zero or non-finite ``y``."""
    m = jnp.max(jnp.abs(y))
    _, e = jnp.frexp(m)
    return jnp.where(jnp.isfinite(m) & (m > 0), e, 0).astype(jnp.int32)


def warn_float32(what: str) -> None:
    """Warns that ``what`` runs in float32 (x64 disabled) where precision matters."""
    warnings.warn(f"{what} runs in float32 because jax_enable_x64 is off; small eigenvalues and cutoffs may differ "
                  "from a float64 run. Call jax.config.update('jax_enable_x64', True) before creating arrays.",
                  stacklevel=3)
