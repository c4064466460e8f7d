"""Input checks shared by the modules: whether values are traced, and finite parameters."""

import jax
import numpy as np


def is_traced(tree) -> bool:
    """True when any leaf of ``tree`` is a tracer (inside ``jax.jit``/``vmap``), where value checks cannot run."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def check_finite_params(params, why: str) -> None:
    """Raises a ValueError naming the first parameter leaf with NaN or inf; a no-op for traced params.

    Args:
      params: the parameter pytree.
      why: what the finite parameters are needed for, appended to the message.
    """
    if is_traced(params):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            raise ValueError(f"params leaf {jax.tree_util.keystr(path) or '<root>'} contains NaN or inf; fix the "
                             f"parameters (e.g. a diverged training run): {why}.")
