"""Sections and Flax adapters: composed sections reproduce module.apply (linen == nnx == hand-written)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import degenjax as dj
from degenjax import models
from conftest import assert_trees_all_close
from reference_models import hand_transformer_sections


def _mlp_setup():
    module = models.MLP(features=(7, 6, 3), param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (11, 5))
    variables = module.init(jax.random.key(1), x)
    return module, variables, x


def _transformer_setup():
    module = models.Transformer(vocab=6, seq_len=3, d_model=8, num_heads=2, d_mlp=12, num_out=5,
                                param_dtype=jnp.float64)
    x = models.one_hot_pairs(5, jnp.array([[0, 1], [2, 3], [4, 4], [1, 0]]), dtype=jnp.float64)
    variables = module.init(jax.random.key(2), x)
    return module, variables, x


def _hand_mlp(variables):
    p = variables["params"]

    def dense(name):
        return lambda params, h: h @ params["params"][name]["kernel"] + params["params"][name]["bias"][None]

    dense_relu = lambda name: (lambda params, h: jax.nn.relu(dense(name)(params, h)))  # noqa: E731
    del p
    return dj.Sections((dense_relu("layers_0"), dense_relu("layers_1"), dense("layers_2")))


def test_forward_list_of_functions():
    fns = [lambda p, h: h * p, lambda p, h: h + p]
    out, acts = dj.forward(fns, 2.0, jnp.arange(3.0))
    assert_trees_all_close(out, np.arange(3.0) * 2 + 2)
    assert len(acts) == 2
    assert_trees_all_close(acts[1], np.arange(3.0) * 2)


@pytest.mark.parametrize("setup,sections,hand", [
    (_mlp_setup, models.mlp_sections, lambda v: _hand_mlp(v)),
    (_transformer_setup, models.transformer_sections, lambda v: dj.Sections(hand_transformer_sections())),
])
def test_linen_sections_reproduce_apply(setup, sections, hand):
    module, variables, x = setup()
    model = sections(module, x)
    expected = module.apply(variables, x)
    out, acts = dj.forward(model, variables, x)
    assert_trees_all_close(out, expected, rtol=1e-12)
    out_jit, acts_jit = jax.jit(dj.forward, static_argnums=0)(model, variables, x)
    assert_trees_all_close(out_jit, expected, rtol=1e-10, atol=1e-12)
    out_hand, acts_hand = dj.forward(hand(variables), variables, x)
    assert_trees_all_close(out_hand, expected, rtol=1e-10, atol=1e-12)
    assert_trees_all_close(acts, acts_hand, rtol=1e-10, atol=1e-12)
    assert acts[0] is x and len(acts) == len(model)


def test_nnx_matches_linen_mlp():
    module, variables, x = _mlp_setup()
    nmod = models.NnxMLP(5, (7, 6, 3), rngs=nnx.Rngs(0))
    state = models.nnx_state_from_linen(nmod, variables)
    graphdef, _ = nnx.split(nmod)
    model = models.nnx_mlp_sections(graphdef, 3, x)
    out, acts = jax.jit(dj.forward, static_argnums=0)(model, state, x)
    assert_trees_all_close(out, module.apply(variables, x), rtol=1e-10, atol=1e-12)
    _, acts_linen = dj.forward(models.mlp_sections(module, x), variables, x)
    assert_trees_all_close(acts, acts_linen, rtol=1e-10, atol=1e-12)


def test_nnx_matches_linen_transformer():
    module, variables, x = _transformer_setup()
    nmod = models.NnxTransformer(6, 3, 8, 2, 12, 5, rngs=nnx.Rngs(0))
    state = models.nnx_state_from_linen(nmod, variables)
    graphdef, _ = nnx.split(nmod)
    model = models.nnx_transformer_sections(graphdef, x)
    out, acts = dj.forward(model, state, x)
    assert_trees_all_close(out, module.apply(variables, x), rtol=1e-10, atol=1e-12)
    _, acts_linen = dj.forward(models.transformer_sections(module, x), variables, x)
    assert_trees_all_close(acts, acts_linen, rtol=1e-10, atol=1e-12)
    assert [a.shape for a in acts] == [(4, 3, 6), (4, 3, 8), (4, 3, 8), (4, 3, 8)]


def test_section_gradients_flow_through_split():
    # A section of a split module is differentiable in its input: compare with a finite difference.
    module, variables, x = _mlp_setup()
    model = models.mlp_sections(module, x)
    _, acts = dj.forward(model, variables, x)
    h = acts[1][:1]
    f = lambda h: jnp.sum(model[1](variables, h) ** 2)  # noqa: E731
    g = jax.grad(f)(h)
    e = np.zeros(h.shape)
    e[0, 2] = 1e-6
    fd = (f(h + e) - f(h - e)) / 2e-6
    np.testing.assert_allclose(float(g[0, 2]), float(fd), rtol=1e-6)


def test_bad_inputs():
    module, variables, x = _mlp_setup()
    model = models.mlp_sections(module, x)
    with pytest.raises(ValueError, match="Section 0"):
        dj.section_shapes(model, variables, jnp.ones((4, 9)))
    shapes = dj.section_shapes(model, variables, x)
    assert [s.shape for s in shapes] == [(11, 5), (11, 7), (11, 6), (11, 3)]
    with pytest.raises(ValueError, match="empty"):
        dj.Sections(())
    with pytest.raises(ValueError, match="not callable"):
        dj.Sections((1,))
    with pytest.raises(ValueError, match="never called"):
        dj.from_linen(module, ["nope"], x)[1](variables, jnp.ones((2, 7)))
