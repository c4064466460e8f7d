"""XLA compiler options for degenjax's own compiled programs, checked once against the installed XLA.

The interaction-basis programs (activation and Jacobian Grams, edges) are many small fusions around a few large
matrix products. On CPU, XLA's MLIR fusion emitters take about 1.5x as long to compile them as its elemental IR
emitters and run them no faster (p = 113 modular-addition transformer in the reference convention, float64, its
five programs on one core: 3.7 -> 2.5 s of compilation, 5.3 -> 5.0 s of running; the whole first call 8.9 -> 7.5 s
on one core, and with the host-side eigendecompositions 6.0 -> 4.9 s on two, benchmarks/RESULTS.md; a GPT-2 block:
first call 7.6 -> 6.2 s, its compiled call 2.5% slower). ``lib_jit`` compiles them with the elemental emitters
wherever the installed XLA has that option (it is a CPU option: other backends ignore it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from degenjax._src.validation import is_traced

LIB_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=None)
def options_supported(items: tuple) -> bool:
    """Whether this XLA accepts the compiler options ``dict(items)`` (one tiny compile per process and options)."""
    try:
        jax.jit(lambda x: jnp.sum(x), compiler_options=dict(items)).lower(
            jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option ("No such compile option"): keep its defaults
        return False
    return True


class _LibJit:
    """``jax.jit(fn, **kwargs)``, compiled with `LIB_COMPILER_OPTIONS` where supported when called at top level
    (JAX accepts compiler options only there: inside a caller's ``jax.jit`` the plain ``jax.jit`` is used, and the
    caller's program decides)."""

    def __init__(self, fn: Callable, kwargs: dict):
        self._fn, self._kwargs = fn, kwargs
        self._plain = jax.jit(fn, **kwargs)
        self._top = None
        functools.update_wrapper(self, fn)

    def _get(self, args, kwargs):
        if is_traced((args, kwargs)):
            return self._plain
        if self._top is None:
            ok = options_supported(tuple(LIB_COMPILER_OPTIONS.items()))
            self._top = jax.jit(self._fn, compiler_options=LIB_COMPILER_OPTIONS, **self._kwargs) if ok else self._plain
        return self._top

    def __call__(self, *args, **kwargs):
        fn = self._get(args, kwargs)
        try:
            return fn(*args, **kwargs)
        except ValueError as e:  # concrete arguments inside a caller's trace: options are refused there
            if fn is self._plain or "compiler_options" not in str(e):
                raise
            return self._plain(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get(args, kwargs).lower(*args, **kwargs)


def lib_jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit(fn, **kwargs)`` for the interaction-basis programs (module docstring)."""
    return _LibJit(fn, kwargs)
