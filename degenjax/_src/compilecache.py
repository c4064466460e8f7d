"""JAX's persistent compilation cache, set up for degenjax's programs.

A first call of `interaction_basis` or `estimate_llc` in a fresh process spends much of its time compiling (e.g. about
1.9 of the 4.9 s of the p = 113 transformer's LIB + edges on a 2-core CPU, `benchmarks/basis.py`). With the cache on,
the compiled programs are written to a folder and a later process with the same shapes (the same model and data sizes
again, a resumed sweep) loads them instead: that call took 3.7 s there. The CLI's ``--compile-cache`` (or
``DEGENJAX_COMPILE_CACHE``) calls this function.
"""

from __future__ import annotations

import os
import pathlib

from degenjax._src.validation import check_writable

# JAX's default keeps only programs that took >= 1 s to compile; most of degenjax's take 0.05-1 s
_MIN_COMPILE_SECONDS = 0.05


def enable_compilation_cache(path=None, *, min_compile_seconds: float = _MIN_COMPILE_SECONDS) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache in ``path`` for this process.

    Call it once, before the first computation. Programs are keyed by their code, shapes, dtypes, devices and the
    JAX/XLA versions, so a stale entry is never used; the folder may be shared by several processes.

    Args:
      path: folder for the cache (created if missing); default ``$DEGENJAX_COMPILE_CACHE``, else
        ``$XDG_CACHE_HOME/degenjax/jax`` (``~/.cache/degenjax/jax``).
      min_compile_seconds: programs that compiled faster than this are not written (JAX's default is 1 s).

    Returns:
      The cache folder.

    Raises:
      ValueError: when ``path`` cannot be written or ``min_compile_seconds`` is negative.
    """
    import jax

    if isinstance(min_compile_seconds, bool) or not isinstance(min_compile_seconds, (int, float)) or not (
            min_compile_seconds >= 0):
        raise ValueError(f"enable_compilation_cache: min_compile_seconds must be a number >= 0, got "
                         f"{min_compile_seconds!r}.")
    if path is None:
        path = os.environ.get("DEGENJAX_COMPILE_CACHE") or pathlib.Path(
            os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "degenjax" / "jax"
    path = pathlib.Path(path).expanduser()
    check_writable(path, folder=True, what="the compilation cache folder")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
