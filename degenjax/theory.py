"""Exact learning coefficients of reference models (docs/maths.md#exact-learning-coefficients): targets for LLC estimates.

``dln_learning_coefficient(widths, rank)`` (Aoyagi 2024), ``rrr_learning_coefficient(M, H, N, r)`` (Aoyagi &
Watanabe 2005) with its multiplicity ``rrr_multiplicity(M, H, N, r)``, and ``regular(d) = d / 2``. Exact `fractions.Fraction` results for integer inputs.
"""

from degenjax._src.theory import dln_learning_coefficient as dln_learning_coefficient
from degenjax._src.theory import regular as regular
from degenjax._src.theory import rrr_learning_coefficient as rrr_learning_coefficient
from degenjax._src.theory import rrr_multiplicity as rrr_multiplicity

__all__ = ["dln_learning_coefficient", "rrr_learning_coefficient", "rrr_multiplicity", "regular"]
