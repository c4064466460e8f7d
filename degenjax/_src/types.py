"""Type aliases shared by the modules (documentation for readers and type checkers; nothing is checked at runtime).

Conventions (docs/api.md): functions take `jax.typing.ArrayLike` and return `jax.Array`; a PRNG key is the explicit
first argument of anything random; states are NamedTuples of arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.typing import ArrayLike

Array = jax.Array
"""A JAX array (what functions return)."""

ArrayTree = Any
"""A pytree whose leaves are arrays: parameters, a data set (leaves share the leading data axis), a batch."""

PRNGKey = jax.Array
"""A typed PRNG key from ``jax.random.key`` (or a raw ``uint32[2]`` key)."""

Batches = Any
"""One input batch (an array or a pytree of arrays with a leading batch axis) or an iterable of such batches."""

LossFn = Callable[[ArrayTree, ArrayTree], Any]
"""``loss_fn(params, batch) -> scalar`` mean loss over the batch."""

Section = Callable[[ArrayTree, jax.Array], jax.Array]
"""``f_l(params, h_l) -> h_{l+1}``: one section of a network between node layers."""

__all__ = ["Array", "ArrayLike", "ArrayTree", "Batches", "LossFn", "PRNGKey", "Section", "getitem_by_field"]


def getitem_by_field(self, key):
    """``row["name"]`` as well as ``row[0]`` for a result NamedTuple (assign as its ``__getitem__``).

    Results that used to be dicts (`degenjax.edge_sparsity`, `degenjax.edges_required`, the calibration tables) are
    NamedTuples now; string keys keep old code working while attribute access (``row.name``) is the documented form.
    """
    if isinstance(key, str):
        if key not in self._fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are {self._fields}.")
        return getattr(self, key)
    return tuple.__getitem__(self, key)
