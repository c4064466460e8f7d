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
