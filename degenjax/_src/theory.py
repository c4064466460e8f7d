"""Exact learning coefficients (real log canonical thresholds) of reference models (docs/maths.md#exact-learning-coefficients).

These are the analytic targets that LLC estimates are validated against:

* a regular model with ``d`` parameters: ``lambda = d / 2``;
* reduced-rank regression ``y = B A x`` (Aoyagi & Watanabe 2005, "Stochastic complexities of reduced rank
    regression in Bayesian estimation", Neural Networks 18(7)), the two-layer linear network;
* deep linear networks of any depth (Aoyagi 2024, "Consideration on the learning efficiency of multiple-layered
    neural networks with linear units", Neural Networks 172).

Besides the learning coefficient ``lambda`` (the RLCT), the free energy ``F(t) = lambda log t - (m - 1) log log t +
O(1)`` of a posterior tempered at ``t = n beta`` depends on its *multiplicity* (order) ``m``
(`rrr_multiplicity`). Differentiating, the SGLD estimator's target ``t E_t[nL(w) - nL(w*)] / n`` is ``lambda - (m - 1) /
log t + O(1 / log^2 t)``: at ``n = 10^4`` (``t = n / log n = 1086``) a model with ``m = 2`` sits ``0.14`` below
``lambda``, a property of the finite-``n`` estimator, not of the sampler.

All functions are exact: with integer inputs they return a `fractions.Fraction`; with integer-valued floats they
return a Python ``float``. They run on the host (the sizes are static), so inside a jitted function call them with
Python numbers and use the result as a constant.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from fractions import Fraction

import jax
import numpy as np

__all__ = ["dln_learning_coefficient", "rrr_learning_coefficient", "rrr_multiplicity", "regular"]


def _as_int(value, name: str, *, minimum: int) -> tuple[int, bool]:
    """Validates a static integer size; returns (value as int, whether the input was an exact integer type)."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} is a traced JAX value; learning coefficients depend only on static sizes, so compute them "
            "outside jax.jit (or from Python ints inside it) and use the result as a constant.")
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a Python or NumPy number known before tracing (got {type(value).__name__}); "
            "the learning coefficient depends only on static sizes, so pass plain ints, not traced arrays.")
    if isinstance(value, numbers.Integral):
        exact, as_int = True, int(value)
    else:
        value = float(value)
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value}.")
        exact, as_int = False, int(value)
    if as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}.")
    return as_int, exact


def _result(value: Fraction, exact: bool):
    return value if exact else float(value)


def regular(d) -> Fraction | float:
    """Learning coefficient of a regular (identifiable, non-degenerate Fisher information) model: ``d / 2``.

    Args:
        d: number of parameters, a non-negative integer.

    Returns:
        ``d / 2`` as a `Fraction` for integer ``d`` (a ``float`` for an integer-valued float).

    Raises:
        ValueError: if ``d`` is negative, fractional or not a static number.
    """
    d, exact = _as_int(d, "d", minimum=0)
    return _result(Fraction(d, 2), exact)


def rrr_learning_coefficient(M, H, N, r) -> Fraction | float:
    """Learning coefficient of reduced-rank regression (Aoyagi & Watanabe 2005, main theorem).

    The model is ``y = B A x`` with ``A`` of shape ``(H, M)`` and ``B`` of shape ``(N, H)``; the true map ``B0 A0``
    has rank ``r``. The formula is symmetric in ``M`` and ``N``:

    * case 1, ``N + r <= M + H``, ``M + r <= N + H`` and ``H + r <= M + N``:
        ``lambda = (2 (H + r)(M + N) - (M - N)^2 - (H + r)^2) / 8``, plus ``1/8`` when ``M + H + N + r`` is odd;
    * case 2, ``M + H < N + r``: ``lambda = (H M - H r + N r) / 2``;
    * case 3, ``N + H < M + r``: ``lambda = (H N - H r + M r) / 2``;
    * case 4, ``M + N < H + r``: ``lambda = M N / 2``.

    Args:
        M: input dimension (>= 1).
        H: inner (bottleneck) dimension of the model (>= 1).
        N: output dimension (>= 1).
        r: rank of the true map, ``0 <= r <= min(M, H, N)``.

    Returns:
        The learning coefficient, a `Fraction` for integer inputs (a ``float`` if any input is an integer-valued float).

    Raises:
        ValueError: for non-integer sizes or a rank outside ``[0, min(M, H, N)]``.
    """
    (M, e1), (H, e2), (N, e3) = (_as_int(v, k, minimum=1) for v, k in ((M, "M"), (H, "H"), (N, "N")))
    r, e4 = _as_int(r, "r", minimum=0)
    if r > min(M, H, N):
        raise ValueError(f"the true rank r={r} cannot exceed min(M, H, N) = {min(M, H, N)} for (M, H, N) = "
                         f"({M}, {H}, {N}); pass the rank of the true map B0 A0.")
    exact = e1 and e2 and e3 and e4
    if M + H < N + r:
        lam = Fraction(H * M - H * r + N * r, 2)
    elif N + H < M + r:
        lam = Fraction(H * N - H * r + M * r, 2)
    elif M + N < H + r:
        lam = Fraction(M * N, 2)
    else:
        k = H + r
        lam = Fraction(2 * k * (M + N) - (M - N) ** 2 - k * k + (M + H + N + r) % 2, 8)
    return _result(lam, exact)


def rrr_multiplicity(M, H, N, r) -> int:
    """Multiplicity (order) ``m`` of the learning coefficient of reduced-rank regression (Aoyagi & Watanabe 2005).

    In the theorem's case 1 (``N + r <= M + H``, ``M + r <= N + H`` and ``H + r <= M + N``, see
    `rrr_learning_coefficient`) ``m = 2`` when ``M + H + N + r`` is odd (the case whose ``lambda`` carries the extra
    ``1/8``) and ``m = 1`` when it is even; in the other three cases ``m = 1``. Examples: ``(1, 1, 1, 0)``, i.e.
    ``L = (a b)^2``, has ``lambda = 1/2`` and ``m = 2`` (normal crossing ``a^2 b^2``: both coordinates attain the
    threshold); ``(4, 4, 4, 2)`` has ``m = 1`` and ``(5, 3, 4, 1)`` has ``m = 2``.

    The multiplicity sets the estimator's finite-``n`` offset ``-(m - 1) / log(n beta)`` (module docstring).

    Args:
        M, H, N, r: as for `rrr_learning_coefficient`.

    Returns:
        ``m``, 1 or 2 (a Python int).

    Raises:
        ValueError: for non-integer sizes or a rank outside ``[0, min(M, H, N)]``.
    """
    (M, _), (H, _), (N, _) = (_as_int(v, k, minimum=1) for v, k in ((M, "M"), (H, "H"), (N, "N")))
    r, _ = _as_int(r, "r", minimum=0)
    if r > min(M, H, N):
        raise ValueError(f"the true rank r={r} cannot exceed min(M, H, N) = {min(M, H, N)} for (M, H, N) = "
                         f"({M}, {H}, {N}); pass the rank of the true map B0 A0.")
    case1 = N + r <= M + H and M + r <= N + H and H + r <= M + N
    return 2 if case1 and (M + H + N + r) % 2 == 1 else 1


def _dln_subset(m_sorted: Sequence[int]) -> int:
    """Size ``l + 1`` of the subset S in Aoyagi's theorem for ascending ``M_j = H_j - r``.

    S = the smallest prefix of size ``l + 1 >= 2`` of the sorted list with ``max S < min(rest)``,
    ``sum S >= l max S`` and ``sum S < l min(rest)`` (with ``min(empty) = +inf``). Such a prefix always exists and
    is unique: the condition ``sum S >= l max S`` holds at size 2 and is inherited by the next size whenever one of the
    other two fails, and the whole list satisfies the other two vacuously; once ``sum S < l min(rest)`` holds,
    ``sum S >= l max S`` fails for every longer prefix.
    """
    total = len(m_sorted)
    for size in range(2, total + 1):
        l = size - 1
        s = sum(m_sorted[:size])
        top = m_sorted[size - 1]
        if size == total:
            if s >= l * top:
                return size
            break
        nxt = m_sorted[size]
        if top < nxt and s >= l * top and s < l * nxt:
            return size
    # Unreachable by the argument in the docstring; kept as an internal consistency check.
    raise AssertionError(f"no subset satisfies Aoyagi's conditions for M = {list(m_sorted)}")


def dln_learning_coefficient(widths, rank) -> Fraction | float:
    """Learning coefficient of a deep linear network ``x -> W_L ... W_1 x`` (Aoyagi 2024, main theorem).

    With layer widths ``H_1, ..., H_{L+1}`` (``H_1`` the input, ``H_{L+1}`` the output, ``W_i`` of shape
    ``(H_{i+1}, H_i)``) and true product of rank ``r``, let ``M_j = H_j - r``. Sorted ascending, take the prefix S of
    size ``l + 1 >= 2`` with ``max S < min(rest)``, ``sum S >= l max S`` and ``sum S < l min(rest)`` (it exists and is
    unique; the whole list when no shorter prefix qualifies). With ``s = sum S`` and ``a = s - (ceil(s / l) - 1) l``:

    ``lambda = (-r^2 + r (H_1 + H_{L+1})) / 2 + a (l - a) / (4 l) - l (l - 1) / 4 (s / l)^2
    + 1/2 sum_{i < j in S} M_i M_j``.

    For two layers (widths ``[M, H, N]``) this equals `rrr_learning_coefficient` and for one layer ``H_1 H_2 / 2``.

    Args:
        widths: ``[H_1, ..., H_{L+1}]``, at least two positive integers (input width first, output width last).
        rank: rank ``r`` of the true end-to-end matrix, ``0 <= r <= min(widths)``.

    Returns:
        The learning coefficient, a `Fraction` for integer inputs (a ``float`` if any input is an integer-valued float).
        Examples: ``[5, 3, 5], 0 -> 13/2``; ``[4, 4, 4], 2 -> 15/2``; ``[10, 20, 20, 10], 5 -> 50``.

    Raises:
        ValueError: for fewer than two widths, non-integer widths or a rank outside ``[0, min(widths)]``.
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (Sequence, np.ndarray)):
        raise ValueError(f"widths must be a sequence of layer widths [input, hidden..., output]; got {widths!r}.")
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output width, got {list(widths)}.")
    parsed = [_as_int(h, f"widths[{i}]", minimum=1) for i, h in enumerate(widths)]
    hs = [h for h, _ in parsed]
    r, exact_r = _as_int(rank, "rank", minimum=0)
    if r > min(hs):
        raise ValueError(f"rank={r} cannot exceed the narrowest width min(widths) = {min(hs)}; a product of the "
                         f"matrices of widths {hs} has rank at most {min(hs)}.")
    exact = exact_r and all(e for _, e in parsed)

    m_sorted = sorted(h - r for h in hs)
    size = _dln_subset(m_sorted)
    S = m_sorted[:size]
    l = size - 1
    s = sum(S)
    a = s - (-(-s // l) - 1) * l  # ceil(s / l) with integer arithmetic
    pair_sum = (s * s - sum(m * m for m in S)) // 2  # sum_{i<j} M_i M_j
    lam = (Fraction(-r * r + r * (hs[0] + hs[-1]), 2) + Fraction(a * (l - a), 4 * l)
           - Fraction(l * (l - 1), 4) * Fraction(s, l) ** 2 + Fraction(pair_sum, 2))
    return _result(lam, exact)
