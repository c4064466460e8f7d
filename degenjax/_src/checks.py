"""Input checks of the LLC estimator and its samplers: one clear ``ValueError`` per bad input, before sampling.

Every check here runs on the host before anything is compiled. Values that are traced (inside the caller's
``jax.jit``) cannot be inspected; those checks are skipped and the shape checks (which need no values) still run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.validation import check_finite_params, is_traced


def leaf_name(path) -> str:
    """``jax.tree_util.keystr`` of a leaf path, ``<root>`` for a bare array."""
    return jax.tree_util.keystr(path) or "<root>"


def num_data(data) -> int:
    """The common leading axis ``n`` of every array in ``data``.

    Raises:
      ValueError: if ``data`` has no arrays, a scalar leaf, or leaves whose leading axes differ.
    """
    leaves, _ = jax.tree.flatten_with_path(data)
    if not leaves:
        raise ValueError("data has no arrays; pass a pytree of arrays with a leading axis of n data points.")
    sizes = {}
    for path, x in leaves:
        if jnp.ndim(x) == 0:
            raise ValueError(f"data leaf {leaf_name(path)} is a scalar; every leaf needs a leading axis of n data "
                             "points.")
        sizes[leaf_name(path)] = jnp.shape(x)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data leaves have different leading axes {sizes}; every array in data must have the same "
                         "number n of data points along axis 0.")
    return int(next(iter(sizes.values())))


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_step_size(step_size) -> None:
    """A positive finite scalar (not checked when traced)."""
    if is_traced(step_size):
        return
    if isinstance(step_size, str):
        raise ValueError(f"step_size must be a positive finite scalar or 'auto'; got {step_size!r}.")
    value = np.asarray(step_size)
    if value.ndim != 0 or not np.isfinite(value) or value <= 0:
        raise ValueError(f"step_size must be a positive finite scalar; got {step_size!r}. Typical SGLD step sizes "
                         "for the LLC are 1e-6 to 1e-3; step_size='auto' chooses one by measurement.")


def check_params(params) -> None:
    """Non-empty, floating-point and finite parameters.

    Raises:
      ValueError: naming the first integer (or boolean) leaf, or the first leaf with NaN or inf.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params has no arrays; pass the parameters w* as a pytree of arrays.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"params leaf {leaf_name(path)} has dtype {dtype}; SGLD moves every parameter by "
                             "Gaussian noise, so every leaf must be floating point (cast it, e.g. x.astype(float), "
                             "or keep integer constants out of params, e.g. in the loss function's closure).")
    check_finite_params(params, "lambda^ is measured at a trained, finite w*")


def check_data(data) -> None:
    """NaN or inf anywhere in ``data`` is an error naming the leaf and the first bad row (skipped when traced).

    The check runs on the host (NumPy): it also runs for concrete data closed over by the caller's ``jax.jit``.
    """
    if is_traced(data):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        finite = np.isfinite(np.asarray(leaf))
        if finite.all():
            continue
        bad = ~finite.reshape(np.shape(leaf)[0], -1)
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"data leaf {leaf_name(path)} has NaN or inf in row {int(rows[0])} ({rows.size} bad row"
                         f"{'s' if rows.size != 1 else ''} of {bad.shape[0]}); remove or fix those rows before "
                         "estimating the LLC (a minibatch containing them would make the loss non-finite).")


def check_loss_fn(loss_fn: Callable, params, data, batch_size: int) -> None:
    """``loss_fn(params, batch)`` must return a floating-point scalar (checked on shapes only, nothing runs)."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(params, batch); got {type(loss_fn).__name__}.")
    probe = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + jnp.shape(x)[1:], jnp.result_type(x)), data)
    out = jax.eval_shape(loss_fn, params, probe)
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != () or not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        got = jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", out)
        raise ValueError(f"loss_fn(params, batch) must return a floating-point scalar (the MEAN loss over the "
                         f"batch); it returned {got} for a batch of {batch_size}. Reduce it, e.g. with jnp.mean.")


def check_rng_key(rng_key, name: str = "rng_key") -> None:
    """A single PRNG key: a typed key array of shape ``()`` (``jax.random.key``) or a legacy ``uint32[2]``
    (``jax.random.PRNGKey``). Shapes and dtypes only, so it runs under ``jax.jit`` too.

    Raises:
      ValueError: for anything else (an int seed, a batch of keys, an array of another shape or dtype).
    """
    shape, dtype = getattr(rng_key, "shape", None), getattr(rng_key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        raise ValueError(f"{name} must be a single PRNG key; got a key array of shape {shape}. Pass one key, e.g. "
                        f"jax.random.key(0) or keys[0].")
    if dtype is not None and shape == (2,) and dtype == jnp.uint32:
        return
    got = (f"{type(rng_key).__name__} {rng_key!r}" if shape is None else f"an array of dtype {dtype} and shape "
           f"{shape}")
    raise ValueError(f"{name} must be a PRNG key; got {got}. Pass jax.random.key(seed), e.g. "
                    f"jax.random.key({rng_key if isinstance(rng_key, int) else 0}).")


def check_init_loss(init_loss) -> None:
    """A non-finite ``L_n(w*)`` is an error (skipped when traced)."""
    if is_traced(init_loss):
        return
    value = float(np.asarray(init_loss))
    if not math.isfinite(value):
        raise ValueError(f"the loss at params on the full data, L_n(w*), is {value}; lambda^ needs a finite loss at "
                         "a trained minimum. Check the loss function (e.g. log(0)) and the parameters.")


def check_eval_batch_size(eval_batch_size) -> int | None:
    """None or a positive integer."""
    if eval_batch_size is None:
        return None
    return check_positive_int("eval_batch_size", eval_batch_size)


def default_nbeta(n: int) -> float:
    """``n / log n``: beta = 1 / log n, the temperature at which lambda^ is consistent (Watanabe's WBIC; arXiv
    2405.10927 section 2)."""
    if n < 2:
        raise ValueError(f"nbeta=None needs n >= 2 data points (n / log n); got n={n}. Pass nbeta explicitly.")
    return n / math.log(n)


def check_inputs(params, data, *, step_size, batch_size, loss_fn: Callable | None = None) -> int:
    """Validates the common inputs of `estimate_llc` and `SGLDKernel`; returns ``n``.

    Checks, in order: the data's leading axes, ``batch_size``, ``step_size``, the parameters (floating point and
    finite), the data (finite, naming the leaf and row) and, when ``loss_fn`` is given, that it returns a scalar.
    """
    n = num_data(data)
    batch_size = check_positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data set (n={n}); use batch_size <= n.")
    if not (isinstance(step_size, str) and step_size == "auto"):
        check_step_size(step_size)
    check_params(params)
    check_data(data)
    if loss_fn is not None:
        check_loss_fn(loss_fn, params, data, batch_size)
    return n
