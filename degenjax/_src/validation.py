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


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def check_seed(seed, name: str = "seed") -> int:
    """Returns ``seed`` as an int; a ValueError unless it is an integer that `jax.random.key` accepts (int64 range).

    Args:
      seed: the user's seed.
      name: how the seed is called where the user wrote it (e.g. ``"--seed"``).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {seed!r}.")
    if not SEED_MIN <= int(seed) <= SEED_MAX:
        raise ValueError(f"{name} = {seed} is outside the 64-bit range jax.random.key accepts; use an integer "
                         f"between {SEED_MIN} and {SEED_MAX} (e.g. seed % 2**63).")
    return int(seed)


def check_writable(path, *, folder: bool, what: str = "output") -> None:
    """Checks, before any computation, that ``path`` can be written, without creating anything.

    A folder may exist already or be creatable (its first existing ancestor is a writable folder); a file's folder
    likewise, and an existing file must be a regular file. Writability is probed by creating and removing a
    temporary file in the nearest existing folder (``os.access`` says yes to root even on read-only mounts).

    Args:
      path: the output path.
      folder: whether ``path`` is a folder (else a file).
      what: how the path is called in the message (e.g. ``"--out"``).

    Raises:
      ValueError: naming the path and why it cannot be written.
    """
    import os
    import pathlib
    import tempfile

    path = pathlib.Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ValueError(f"{what} {path} exists and is not a folder; give a folder path.")
        if not folder and path.is_dir():
            raise ValueError(f"{what} {path} is a folder; give a file path.")
    probe = path if (folder and path.is_dir()) else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {probe} is a file, not a folder.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".degenjax-write-probe-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable ({err.strerror or err} in {probe}); choose another "
                         "location.") from err
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable; choose another file.")


# ---------------------------------------------------------------------------------------------------------------
# arguments of the Gram / basis / edge functions


def _rows(batch):
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        return None  # not a batch with a leading axis: left to the callee's checks
    return int(np.shape(leaves[0])[0])


def _check_rows(batch, i: int, fn: str) -> None:
    if _rows(batch) == 0:
        raise ValueError(f"{fn}: batch {i} has no rows (leading axis of size 0); an empty batch has no "
                         "activations to average. Drop empty batches (e.g. the last slice of a data set).")
    for leaf in jax.tree.leaves(batch):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and np.issubdtype(np.dtype(dtype), np.complexfloating):
            raise ValueError(f"{fn}: batch {i} is complex ({dtype}); node layers must be real. Pass real inputs "
                             "(e.g. split a complex input into real and imaginary features).")


class CheckedBatches:
    """A re-iterable view of an iterable of batches that checks each batch as it is produced.

    Iterating it iterates the underlying iterable afresh (so a list or a data loader can be passed over several
    times); an underlying iterator (e.g. a generator) that produces nothing raises a ValueError saying that it
    may have been consumed already, instead of a misleading "empty" result.
    """

    def __init__(self, batches, fn: str):
        self._batches, self._fn = batches, fn

    def __iter__(self):
        one_shot = iter(self._batches) is self._batches
        count = 0
        for i, batch in enumerate(self._batches):
            _check_rows(batch, i, self._fn)
            count += 1
            yield batch
        if count == 0 and one_shot:
            raise ValueError(f"{self._fn}: `batches` is empty: an iterator (e.g. a generator) that produced no "
                             "batch, probably consumed already by an earlier call. An iterator can be used once; "
                             "pass a list of batches, or call the generator function again for each call.")


def check_batches(batches, fn: str):
    """Entry check of a ``batches`` argument: no batch without rows, and a clear message for a spent iterator.

    A single array or dict (one batch) and a list or tuple are checked at once; any other iterable is wrapped in
    `CheckedBatches` and checked as it is consumed, so a generator is never consumed before it is used.

    Args:
      batches: an array or pytree (one batch), or an iterable of batches.
      fn: the public function's name, for messages.

    Returns:
      ``batches`` itself, or a `CheckedBatches` wrapping it.
    """
    from collections.abc import Iterable, Mapping

    if isinstance(batches, (jax.Array, np.ndarray, Mapping)):
        _check_rows(batches, 0, fn)
        return batches
    if isinstance(batches, (list, tuple)):
        for i, b in enumerate(batches):
            _check_rows(b, i, fn)
        return batches
    if isinstance(batches, (str, bytes, CheckedBatches)) or not isinstance(batches, Iterable):
        return batches  # not an iterable of batches (the callee says so), or checked already
    return CheckedBatches(batches, fn)


def check_rtol(rtol, fn: str, name: str = "rtol") -> None:
    """A relative eigenvalue cutoff (scalar or one per layer) must be finite and in [0, 1); None is the default.

    ``rtol >= 1`` would drop every direction (nothing is above the largest eigenvalue) and ``rtol < 0`` would keep
    numerically zero and negative eigenvalues, whose inverse square roots are noise.
    """
    if rtol is None or is_traced(rtol):
        return
    values = list(rtol) if isinstance(rtol, (list, tuple)) else [rtol]
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating, np.ndarray, jax.Array)) \
                or np.ndim(v) != 0:
            raise ValueError(f"{fn}: {name} must be a number (or one per node layer); got {v!r}.")
        if not (np.isfinite(float(v)) and 0.0 <= float(v) < 1.0):
            raise ValueError(f"{fn}: {name}={float(v)!r} is not a relative cutoff in [0, 1): eigenvalues below "
                             f"{name} x the largest are dropped, so {name} >= 1 drops everything and {name} < 0 "
                             "keeps numerical zeros. Typical values: 1e-12 (float64) to 1e-6 (float32).")


def check_dims(dims, widths, fn: str) -> None:
    """``dims[l]`` (kept non-constant directions of node layer ``l``) must be an integer in ``[1, widths[l]]``."""
    if dims is None:
        return
    for l, (k, w) in enumerate(zip(dims, widths)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"{fn}: dims[{l}] must be an integer (a number of basis directions); got {k!r}.")
        if not 1 <= int(k) <= int(w):
            raise ValueError(f"{fn}: dims[{l}] = {k} but node layer {l} has {w} non-constant directions; use "
                             f"1 <= dims[{l}] <= {w}.")


def check_positive_int(value, name: str, fn: str) -> int:
    """``value`` as an int, or a ValueError unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer; got {value!r}.")
    return int(value)


def check_batch_list(model, params, batches: list, fn: str, *, float_inputs: bool) -> None:
    """Checks a materialised list of batches against the model before any work: one structure and dtype for all
    batches, the same feature size at every node layer (the Gram functions' streaming checks), and, for
    functions that differentiate with respect to the node layers (``float_inputs``), floating-point node layers."""
    from degenjax._src.grams import BatchChecker

    checker = BatchChecker(model, params, fn, tuple(range(len(model))))
    shapes = None
    for i, batch in enumerate(batches):
        shapes = checker.check(i, batch)
    if float_inputs and shapes is not None:
        for l, s in enumerate(shapes):
            dtype = getattr(s, "dtype", None)
            if dtype is not None and not np.issubdtype(np.dtype(dtype), np.floating):
                raise ValueError(f"{fn}: node layer {l} ({model.layer_name(l)}) has dtype {dtype}; edges "
                                 "differentiate with respect to it, so it must be floating point. Cast the inputs "
                                 "(e.g. x.astype(jnp.float32)) or start the sections after an embedding.")


def check_finite_nonnegative(arrays, what: str, fn: str) -> None:
    """Each array of ``arrays`` (concrete ones; traced ones are skipped) must be finite and >= 0."""
    for l, a in enumerate(arrays):
        if is_traced(a):
            continue
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.number) and a.size and not (np.all(np.isfinite(a)) and np.min(a) >= 0):
            raise ValueError(f"{fn}: {what}[{l}] has NaN, inf or negative entries; {what} are sums of squares. "
                             "Check how they were computed (e.g. a NaN in the data).")
