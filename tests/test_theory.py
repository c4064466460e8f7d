"""Exact learning coefficients: degenjax.theory against closed forms and a brute-force reading of the theorems."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax
from degenjax.theory import dln_learning_coefficient, regular, rrr_learning_coefficient, rrr_multiplicity


def _aoyagi_brute_force(widths, r):
    """Aoyagi (2024) main theorem read literally: search ALL subsets S of {M_j} (not only sorted prefixes).

    Returns the list of lambdas of every subset that satisfies the three conditions, so the test can also check
    existence and uniqueness of S.
    """
    m = [h - r for h in widths]
    found = []
    idx = range(len(m))
    for size in range(2, len(m) + 1):
        for subset in itertools.combinations(idx, size):
            S = [m[i] for i in subset]
            rest = [m[i] for i in idx if i not in subset]
            l = size - 1
            min_rest = min(rest) if rest else math.inf
            if not (max(S) < min_rest and sum(S) >= l * max(S) and sum(S) < l * min_rest):
                continue
            s = sum(S)
            a = s - (math.ceil(Fraction(s, l)) - 1) * l
            pairs = sum(S[i] * S[j] for i in range(size) for j in range(i + 1, size))
            lam = (Fraction(-r * r + r * (widths[0] + widths[-1]), 2) + Fraction(a * (l - a), 4 * l)
                   - Fraction(l * (l - 1), 4) * Fraction(s, l) ** 2 + Fraction(pairs, 2))
            found.append(lam)
    return found


@pytest.mark.parametrize("widths, rank, expected", [
    ([5, 3, 5], 0, Fraction(13, 2)),        # DESIGN.md section 5 examples
    ([4, 4, 4], 2, Fraction(15, 2)),
    ([10, 20, 20, 10], 5, Fraction(50)),
    ([3, 7], 2, Fraction(21, 2)),            # one layer: regular, d / 2
    ([1, 1, 1], 0, Fraction(1, 2)),          # K = (ab)^2: the classic RLCT 1/2
    ([1, 1, 1], 1, Fraction(1, 2)),          # ab = c != 0: a smooth curve of codimension 1
    ([3, 3, 3], 3, Fraction(9, 2)),          # full-rank 3x3 product: dim of the function space / 2
])
def test_dln_known_values(widths, rank, expected):
    lam = dln_learning_coefficient(widths, rank)
    assert isinstance(lam, Fraction)
    assert lam == expected


@pytest.mark.parametrize("M, H, N, r, expected", [
    # Each case of Aoyagi & Watanabe (2005), evaluated by hand from the theorem.
    (5, 3, 5, 0, Fraction(52, 8)),    # case 1, M+H+N+r odd: (2*3*10 - 0 - 9 + 1) / 8
    (5, 4, 5, 0, Fraction(64, 8)),    # case 1, even: (2*4*10 - 0 - 16) / 8
    (3, 2, 3, 1, Fraction(28, 8)),    # case 1, odd: (2*3*6 - 0 - 9 + 1) / 8
    (4, 3, 8, 0, Fraction(12, 2)),    # case 2 (M+H < N+r): (H M - H r + N r) / 2
    (2, 1, 4, 1, Fraction(2 - 1 + 4, 2)),
    (8, 3, 4, 0, Fraction(12, 2)),    # case 3 (N+H < M+r): (H N - H r + M r) / 2
    (4, 1, 2, 1, Fraction(2 - 1 + 4, 2)),
    (3, 8, 4, 0, Fraction(12, 2)),    # case 4 (M+N < H+r): M N / 2
    (1, 4, 2, 1, Fraction(2, 2)),
])
def test_rrr_cases(M, H, N, r, expected):
    lam = rrr_learning_coefficient(M, H, N, r)
    assert isinstance(lam, Fraction)
    assert lam == expected
    assert rrr_learning_coefficient(N, H, M, r) == lam  # the theorem is symmetric in input and output


def test_dln_equals_rrr_on_two_layer_grid():
    # Aoyagi (2024) specialises to Aoyagi & Watanabe (2005) for L = 2: exact equality over every size up to 9.
    count = 0
    for M, H, N in itertools.product(range(1, 10), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert dln_learning_coefficient([M, H, N], r) == rrr_learning_coefficient(M, H, N, r), (M, H, N, r)
            count += 1
    assert count > 2000


def test_dln_matches_brute_force_subset_search():
    rng = np.random.default_rng(0)
    cases = [list(w) for w in itertools.product(range(1, 6), repeat=4)]
    cases += [rng.integers(1, 12, size=int(rng.integers(2, 7))).tolist() for _ in range(300)]
    for widths in cases:
        for r in range(min(widths) + 1):
            found = _aoyagi_brute_force(widths, r)
            assert len(found) == 1, (widths, r, found)  # S exists and is unique
            lam = dln_learning_coefficient(widths, r)
            assert lam == found[0], (widths, r)
            # Degeneracy can only lower the coefficient: lambda <= (number of parameters) / 2.
            d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
            assert 0 <= lam <= regular(d), (widths, r)
            # Transposing the network (reversed widths) parametrises the transposed maps: same lambda.
            assert dln_learning_coefficient(widths[::-1], r) == lam


def test_single_layer_is_regular():
    for h1, h2 in itertools.product(range(1, 8), repeat=2):
        for r in range(min(h1, h2) + 1):
            assert dln_learning_coefficient([h1, h2], r) == regular(h1 * h2) == Fraction(h1 * h2, 2)


def test_regular():
    assert regular(0) == 0
    assert regular(7) == Fraction(7, 2) and isinstance(regular(7), Fraction)
    assert regular(np.int32(10)) == 5


def test_float_and_numpy_inputs():
    lam = dln_learning_coefficient([5.0, 3.0, 5.0], 0)
    assert isinstance(lam, float) and lam == 6.5
    assert dln_learning_coefficient(np.array([10, 20, 20, 10]), np.int64(5)) == 50
    assert isinstance(dln_learning_coefficient(np.array([10, 20, 20, 10]), 5), Fraction)
    assert dln_learning_coefficient((4, 4, 4), jnp.asarray(2)) == Fraction(15, 2)
    assert rrr_learning_coefficient(5, 3, 5, 0.0) == 6.5
    assert isinstance(regular(3.0), float)


@pytest.mark.parametrize("call, match", [
    (lambda: dln_learning_coefficient([5], 0), "at least an input and an output"),
    (lambda: dln_learning_coefficient(5, 0), "sequence of layer widths"),
    (lambda: dln_learning_coefficient([5, 3, 5], 4), "cannot exceed the narrowest width"),
    (lambda: dln_learning_coefficient([5, 0, 5], 0), r"widths\[1\] must be >= 1"),
    (lambda: dln_learning_coefficient([5, 2.5, 5], 0), "whole number"),
    (lambda: dln_learning_coefficient([5, 3, 5], -1), "rank must be >= 0"),
    (lambda: rrr_learning_coefficient(2, 3, 4, 3), "cannot exceed min"),
    (lambda: rrr_learning_coefficient("2", 3, 4, 0), "must be a Python or NumPy number"),
    (lambda: regular(-1), "d must be >= 0"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_under_jit():
    # Static sizes inside the user's jit: the exact value becomes a constant of the traced computation.
    @jax.jit
    def scaled(x):
        lam = dln_learning_coefficient([10, 20, 20, 10], 5)
        return (x * float(lam) + float(rrr_learning_coefficient(5, 3, 5, 0)) + float(regular(4))
                + rrr_multiplicity(5, 3, 4, 1))

    np.testing.assert_allclose(np.asarray(scaled(jnp.asarray(2.0))), 2.0 * 50 + 6.5 + 2.0 + 2, rtol=0, atol=0)

    # A traced size is a clear error, not an opaque ConcretizationTypeError.
    with pytest.raises(ValueError, match="traced JAX value"):
        jax.jit(lambda r: jnp.asarray(float(dln_learning_coefficient([4, 4, 4], r))))(2)


@pytest.mark.parametrize("M, H, N, r, m", [
    (1, 1, 1, 0, 2),  # L = (ab)^2 = a^2 b^2: normal crossing, both coordinates reach the threshold 1/2
    (1, 1, 1, 1, 1),  # (ab - c)^2, c != 0: a smooth hypersurface, regular in the normal direction
    (1, 2, 1, 0, 1),  # (a1 b1 + a2 b2)^2: smooth away from 0, the blow-up of 0 gives 4/4 = 1 > 1/2
    (1, 1, 2, 0, 1),  # a^2 (b1^2 + b2^2): threshold 1/2 from a only, 2/2 = 1 from the blown-up b
    (2, 1, 1, 0, 1),  # the mirror image of the previous case
    (4, 4, 4, 2, 1),  # M + H + N + r even
    (5, 3, 4, 1, 2),  # odd, case 1
    (5, 1, 5, 1, 1),  # case 1 on its boundary (N + r = M + H = 6), even sum
    (1, 1, 5, 0, 1),  # case 2 (M + H < N + r): m = 1 although the sum is odd
    (6, 1, 1, 1, 1),  # case 3 (N + H < M + r), odd sum
    (1, 5, 1, 1, 1),  # case 4 (M + N < H + r), even
    (1, 6, 1, 1, 1),  # case 4, odd sum
])
def test_rrr_multiplicity_cases(M, H, N, r, m):
    assert rrr_multiplicity(M, H, N, r) == m
    assert rrr_multiplicity(N, H, M, r) == m  # symmetric in M and N, like lambda
    assert isinstance(rrr_multiplicity(float(M), H, N, r), int)


def test_rrr_multiplicity_sets_the_finite_t_offset_by_quadrature():
    """L = (ab)^2 on [-1, 1]^2 (rrr (1, 1, 1, 0): lambda 1/2, m 2): t E_t[L] = lambda - (m - 1) / log t + o(1/log t).

    Independent float64 quadrature of the tempered posterior: the inner integral over b in closed form (incomplete
    gamma), the outer over log a.
    """
    from scipy import integrate, special

    def t_mean_loss(t):
        def inner(k, c):  # int_0^1 b^(2k) exp(-c b^2) db
            s = k + 0.5
            return special.gamma(s) * special.gammainc(s, c) / (2 * c ** s)

        lo = -0.5 * np.log(t) - 40
        z = integrate.quad(lambda u: inner(0, t * np.exp(2 * u)) * np.exp(u), lo, 0, limit=500, epsabs=0, epsrel=1e-12)[0]
        k = integrate.quad(lambda u: np.exp(3 * u) * inner(1, t * np.exp(2 * u)), lo, 0, limit=500, epsabs=0, epsrel=1e-12)[0]
        return t * k / z

    lam, m = float(rrr_learning_coefficient(1, 1, 1, 0)), rrr_multiplicity(1, 1, 1, 0)
    assert (lam, m) == (0.5, 2)
    # (t E[L] - lambda) log t -> -(m - 1): -0.78 at t = 1086 (n = 10^4, t = n / log n), -0.93 at t = 10^12
    scaled = [(t_mean_loss(t) - lam) * np.log(t) for t in (1086.0, 1e6, 1e12)]
    assert scaled[0] > scaled[1] > scaled[2] > -(m - 1) - 0.02
    assert scaled[2] < -(m - 1) + 0.1
    # at t = 1086: 0.388; the m = 2 prediction 0.357 is 3.6x closer than lambda = 0.5
    v = t_mean_loss(1086.0)
    assert abs(v - (lam - (m - 1) / np.log(1086.0))) < 0.035
    assert abs(v - lam) > 3 * abs(v - (lam - (m - 1) / np.log(1086.0)))


def test_rrr_multiplicity_bad_inputs():
    with pytest.raises(ValueError, match="cannot exceed min"):
        rrr_multiplicity(2, 3, 4, 3)
    with pytest.raises(ValueError, match="must be a Python or NumPy number"):
        rrr_multiplicity("2", 3, 4, 0)


def test_public_namespace():
    assert degenjax.theory.rrr_multiplicity is rrr_multiplicity
    assert degenjax.theory.dln_learning_coefficient is dln_learning_coefficient
    assert "theory" in degenjax.__all__
