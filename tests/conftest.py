"""Test configuration: 8 simulated CPU devices, float64 references, strict dtype and rank promotion.

The device count must be set before any JAX operation, so this runs at import time.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def assert_trees_all_close(actual, expected, *, rtol=1e-7, atol=0.0, err_msg=""):
    """Compares two pytrees leaf by leaf in float64 NumPy (the one comparison helper of the test suite)."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def}"
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
                                   err_msg=err_msg)


@pytest.fixture
def num_devices():
    n = len(jax.devices())
    if n < 8:
        pytest.skip(f"needs 8 devices, have {n}")
    return n
