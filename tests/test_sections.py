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


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("setup,sections,hand", [
    (_mlp_setup, models.mlp_sections, lambda v: _hand_mlp(v)),
    (_transformer_setup, models.transformer_sections, lambda v: dj.Sections(hand_transformer_sections())),
])
def test_linen_sections_reproduce_apply(setup, sections, hand, fold):
    module, variables, x = setup()
    model = sections(module, x, fold_bias=fold)
    assert model.constant == ("last" if fold else "append") and model.fold_input == fold
    expected = module.apply(variables, x)
    out, acts = dj.forward(model, variables, x)
    assert_trees_all_close(out, expected, rtol=1e-12)
    out_jit, acts_jit = jax.jit(dj.forward, static_argnums=0)(model, variables, x)
    assert_trees_all_close(out_jit, expected, rtol=1e-10, atol=1e-12)
    out_hand, acts_hand = dj.forward(hand(variables), variables, x)
    assert_trees_all_close(out_hand, expected, rtol=1e-10, atol=1e-12)
    if fold:  # folded node layers: the features, then the constant 1
        assert_trees_all_close([a[..., :-1] for a in acts], acts_hand, rtol=1e-10, atol=1e-12)
        assert all(np.all(np.asarray(a[..., -1]) == 1.0) for a in acts)
    else:
        assert_trees_all_close(acts, acts_hand, rtol=1e-10, atol=1e-12)
        assert acts[0] is x
    assert len(acts) == len(model)


@pytest.mark.parametrize("adapter", ["linen", "nnx"])
def test_folded_sections_tie_biases_to_the_constant(adapter):
    # d f_l / d c (the constant input) is the bias path: for h_{l+1} = relu(h W + c b), gate * b, and the next
    # constant is the input constant (derivative 1); NumPy reference from the parameters
    module, variables, x = _mlp_setup()
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), variables)  # non-zero biases
    if adapter == "linen":
        model = models.mlp_sections(module, x)
        params = variables
    else:
        nmod = models.NnxMLP(5, (7, 6, 3), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        params = models.nnx_state_from_linen(nmod, variables)
        model = models.nnx_mlp_sections(nnx.split(nmod)[0], 3, x)
    _, acts = dj.forward(model, params, x)
    p = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in variables["params"].items()}
    h = np.asarray(x, np.float64)
    for l in range(3):
        W, b = p[f"layers_{l}"]["kernel"], p[f"layers_{l}"]["bias"]
        z = h @ W + b
        gate = (z > 0).astype(float) if l < 2 else np.ones_like(z)
        dc = jax.jit(jax.vmap(jax.jacfwd(lambda f, l=l: model.fns[l](params, f[None])[0])))(acts[l])[..., -1]
        expect = gate * b[None]
        if l < 2:  # the folded output carries the constant: d c_out / d c_in = 1
            expect = np.concatenate([expect, np.ones((h.shape[0], 1))], axis=1)
        np.testing.assert_allclose(np.asarray(dc), expect, rtol=1e-12, atol=1e-12)
        h = np.maximum(z, 0) if l < 2 else z


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
    assert [a.shape for a in acts] == [(4, 3, 7), (4, 3, 9), (4, 3, 9), (4, 3, 9)]  # folded: the constant last


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
    assert [s.shape for s in shapes] == [(11, 6), (11, 8), (11, 7), (11, 3)]  # folded node layers, raw output
    with pytest.raises(ValueError, match="empty"):
        dj.Sections(())
    with pytest.raises(ValueError, match="not callable"):
        dj.Sections((1,))
    with pytest.raises(ValueError, match="never called"):
        dj.from_linen(module, ["nope"], x)[1](variables, jnp.ones((2, 7)))
    with pytest.raises(ValueError, match="constant must be"):
        dj.Sections((lambda p, h: h,), constant="first")
    with pytest.raises(ValueError, match="fold_input"):
        dj.Sections((lambda p, h: h,), fold_input=True)
    with pytest.raises(ValueError, match="floating-point"):
        dj.forward(model, variables, jnp.ones((3, 5), jnp.int32))
