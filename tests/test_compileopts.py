"""The interaction-basis programs are compiled with degenjax's XLA options at top level, and without them inside a
caller's ``jax.jit`` (where JAX refuses compiler options), with concrete or traced arguments; each way gives the
float64 NumPy numbers."""

import jax
import jax.numpy as jnp
import numpy as np

import degenjax as dj
from degenjax._src import compileopts


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5))
    w = rng.normal(size=(5, 4)) / np.sqrt(5)
    model = dj.Sections([lambda p, h: jnp.tanh(h @ p["w"]), lambda p, h: h @ p["v"]])
    params = {"w": jnp.asarray(w), "v": jnp.asarray(rng.normal(size=(4, 3)))}
    h1 = np.tanh(x @ w)
    return model, params, jnp.asarray(x), h1


def _np_cov(a):
    c = a - a.mean(0)
    return c.T @ c / len(a)


def test_options_probe():
    assert compileopts.options_supported((("no_such_xla_option_for_degenjax", True),)) is False
    assert isinstance(compileopts.options_supported(tuple(compileopts.LIB_COMPILER_OPTIONS.items())), bool)


def test_top_level_nested_concrete_and_traced_agree_with_numpy():
    model, params, x, h1 = _problem()
    want = _np_cov(h1)

    def stats(p, xx):
        return dj.activation_stats(model, p, [xx]).grams[1][:-1, :-1]

    top = stats(params, x)  # top level: compiled with the options
    nested_concrete = jax.jit(lambda: stats(params, x))()  # concrete closed-over arrays inside a caller's jit
    nested_traced = jax.jit(stats)(params, x)
    for got in (top, nested_concrete, nested_traced):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
