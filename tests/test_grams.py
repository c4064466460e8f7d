"""Activation and Jacobian Grams against independent references (float64 NumPy, closed forms, per-example jacfwd).

Compile time dominates on CPU, so tests share models and batch shapes (the drivers' compiled step is reused).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import degenjax as dj
from degenjax import models
from conftest import assert_trees_all_close
from reference_models import hand_transformer_sections

# ------------------------------------------------------------------------------------------------------------------
# Shared models and NumPy references


@pytest.fixture(scope="module")
def mlp():
    module = models.MLP(features=(7, 6, 3), param_dtype=jnp.float64)
    x = jnp.asarray(0.5 + np.random.default_rng(0).normal(size=(40, 5)))
    variables = jax.jit(module.init)(jax.random.key(1), x)
    return module, variables, x, models.mlp_sections(module, x, fold_bias=False)


def _hand_mlp():
    """The MLP as hand-written sections on ``variables["params"]`` (small programs: cheap to compile)."""
    dense = lambda i: (lambda v, h: h @ v[f"layers_{i}"]["kernel"] + v[f"layers_{i}"]["bias"][None, :])  # noqa: E731
    return dj.Sections((lambda v, h: jax.nn.relu(dense(0)(v, h)), lambda v, h: jax.nn.relu(dense(1)(v, h)),
                        dense(2)))


HAND_MLP = _hand_mlp()


def _np_mlp(variables, x):
    """NumPy forward of the MLP: node layers, pre-activations and weights (independent of degenjax)."""
    p = variables["params"]
    W = [np.asarray(p[f"layers_{i}"]["kernel"]) for i in range(3)]
    b = [np.asarray(p[f"layers_{i}"]["bias"]) for i in range(3)]
    h = [np.asarray(x, np.float64)]
    z = []
    for i in range(3):
        z.append(h[-1] @ W[i] + b[i])
        if i < 2:
            h.append(np.maximum(z[-1], 0.0))
    return h, z, W


def _np_gram(a, center):
    """Reference G^l in float64: the constant coordinate last, expectations over all leading axes."""
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    ht = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    mu = ht.mean(0)
    if center:
        mu[-1] = 0.0
    else:
        mu[:] = 0.0
    return (ht - mu).T @ (ht - mu) / a.shape[0]


def _np_mlp_jacobians(variables, x):
    """Closed-form per-example section Jacobians J_l[n] = d h_{l+1} / d h_l, shape (N, d_{l+1}, d_l)."""
    h, z, W = _np_mlp(variables, x)
    jac = []
    for i in range(3):
        gate = (z[i] > 0).astype(np.float64) if i < 2 else np.ones_like(z[i])
        jac.append(gate[:, :, None] * W[i].T[None])
    return jac


def _np_jtj(J, basis=None):
    """(1/N) sum_n J_n^T B B^T J_n for J of shape (N, d_out, d_in)."""
    if basis is not None:
        J = np.einsum("ok,nod->nkd", basis, J)
    return np.einsum("nod,noe->de", J, J) / J.shape[0]


@pytest.fixture(scope="module")
def transformer():
    module = models.Transformer(vocab=6, seq_len=3, d_model=8, num_heads=2, d_mlp=12, num_out=5,
                                param_dtype=jnp.float64)
    pairs = np.array([(a, b) for a in range(5) for b in range(5)])[:24]
    x = models.one_hot_pairs(5, pairs, dtype=jnp.float64)
    variables = jax.jit(module.init)(jax.random.key(2), x)
    model = models.transformer_sections(module, x, fold_bias=False)
    _, acts = jax.jit(dj.forward, static_argnums=0)(model, variables, x)
    return module, variables, x, model, acts


# ------------------------------------------------------------------------------------------------------------------
# Activation Grams


@pytest.mark.parametrize("center", [True, False])
def test_activation_grams_match_numpy(mlp, center):
    module, variables, x, model = mlp
    h, _, _ = _np_mlp(variables, x)
    stats = dj.activation_stats(model, variables, [x[:20], x[20:]], center=center)
    assert_trees_all_close(list(stats.grams), [_np_gram(a, center) for a in h], rtol=1e-12, atol=1e-13)
    assert_trees_all_close(list(stats.means), [a.mean(0) for a in h], rtol=1e-12, atol=1e-13)
    assert [float(c) for c in stats.counts] == [40.0] * 3
    assert [g.shape for g in stats.grams] == [(6, 6), (8, 8), (7, 7)]


def test_activation_grams_positions_transformer(transformer):
    module, variables, x, model, acts = transformer
    assert acts[1].shape == (24, 3, 8)  # positions axis: 24 * 3 samples per node layer
    batches = (x[i:i + 8] for i in range(0, 24, 8))  # a one-shot generator
    grams = dj.activation_grams(model, variables, batches)
    assert_trees_all_close(grams, [_np_gram(a, True) for a in acts], rtol=1e-11, atol=1e-12)


def test_accumulator_in_user_scan_jit_and_vmap():
    # Two independent streams with positions and a large mean, folded into the user's own lax.scan under jit.
    hs = 3.0 + jax.random.normal(jax.random.key(3), (2, 5, 6, 2, 4))  # (streams, steps, batch, positions, d)
    acc = dj.gram_accumulator(center=True)
    acc_raw = dj.gram_accumulator(center=False)

    @jax.jit
    def run(hs):
        def one_stream(h):
            state = acc.init(jax.ShapeDtypeStruct(h.shape[1:], h.dtype))
            state, _ = jax.lax.scan(lambda s, b: (acc.update(s, b), None), state, h)
            return acc.finalize(state), acc_raw.finalize(state)

        return jax.vmap(one_stream)(hs)

    centred, raw = run(hs)
    for s in range(2):
        a = np.asarray(hs[s]).reshape(-1, 4)
        assert_trees_all_close(centred.gram[s], _np_gram(a, True), rtol=1e-12, atol=1e-13)
        assert_trees_all_close(raw.gram[s], _np_gram(a, False), rtol=1e-12, atol=1e-13)
        assert_trees_all_close(centred.mean[s], a.mean(0), rtol=1e-12)
        assert float(centred.count[s]) == 60.0
    assert isinstance(acc.init(4), dj.GramState)


def test_float32_compensated_million_samples():
    # 1e6 float32 samples with mean 10 (so raw moments are ~100x the covariance): the float32 accumulator
    # (pairwise within a batch, Neumaier across batches, sums about a shift) must match float64 NumPy to 1e-5.
    # (Plain float32 raw moments, S2/n - m m^T summed batch by batch, miss by 3.6e-4 on these data.)
    d, n_batches, b = 12, 10, 100_000
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    batches = [(10.0 + rng.normal(size=(b, d)) @ mix).astype(np.float32) for _ in range(n_batches)]
    identity = [lambda p, h: h]
    data = np.concatenate(batches).astype(np.float64)
    for center in (True, False):
        stats = dj.activation_stats(identity, None, batches, center=center, accum_dtype=jnp.float32)
        g = stats.grams[0]
        assert g.dtype == jnp.float32
        ref = _np_gram(data, center)
        rel = np.max(np.abs(np.asarray(g, np.float64) - ref)) / np.max(np.abs(ref))
        assert rel < 1e-5, (center, rel)
        assert float(stats.counts[0]) == 1e6


def test_grams_linen_nnx_hand_sections_agree(mlp):
    module, variables, x, model = mlp
    nmod = models.NnxMLP(5, (7, 6, 3), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    state = models.nnx_state_from_linen(nmod, variables)
    graphdef, _ = nnx.split(nmod)
    nnx_model = models.nnx_mlp_sections(graphdef, 3, x, fold_bias=False)
    p = variables["params"]
    hand = HAND_MLP
    batches = [x[:20], x[20:]]
    g_linen = dj.activation_grams(model, variables, batches)
    g_nnx = dj.activation_grams(nnx_model, state, batches)
    g_hand = dj.activation_grams(hand, p, batches)
    assert_trees_all_close(g_nnx, g_linen, rtol=1e-12, atol=1e-13)
    assert_trees_all_close(g_hand, g_linen, rtol=1e-12, atol=1e-13)
    # Jacobian Grams: linen and hand-written sections are checked against the closed form in the tests below;
    # the nnx sections here (one layer, to keep compile time down).
    m_nnx = dj.jacobian_gram(nnx_model, state, batches, 1)
    assert_trees_all_close(m_nnx, _np_jtj(_np_mlp_jacobians(variables, x)[1]), rtol=1e-11, atol=1e-13)
    # folded sections (the default): the same Grams of the features; a last feature that is not 1 is refused
    folded = models.mlp_sections(module, x)
    assert_trees_all_close(dj.activation_grams(folded, variables, batches), g_linen, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="last feature is not 1"):
        dj.activation_grams(HAND_MLP, p, batches, constant="last")


# ------------------------------------------------------------------------------------------------------------------
# Jacobian Grams


def test_jacobian_grams_mlp_closed_form(mlp):
    module, variables, x, model = mlp
    J = _np_mlp_jacobians(variables, x)
    batches = [x[:20], x[20:]]
    rng = np.random.default_rng(1)
    # basis[l] for node layer l; basis[2] has d + 1 rows (constant coordinate last, ignored by the derivative).
    basis = [rng.normal(size=(5, 5)), rng.normal(size=(7, 4)), rng.normal(size=(7, 6))]
    out_basis = rng.normal(size=(3, 2))

    expect = [_np_jtj(J[0], basis[1]), _np_jtj(J[1], basis[2][:6]), _np_jtj(J[2], out_basis)]
    for structured in (True, False):  # dense + ReLU sections: factorised W (B B^T o S) W^T, and per-example vjp/jvp
        got = dj.jacobian_grams(model, variables, batches, structured=structured)
        assert_trees_all_close(got, [_np_jtj(j) for j in J], rtol=1e-11, atol=1e-13)
        got = dj.jacobian_grams(model, variables, batches, basis=basis, output_basis=out_basis, structured=structured)
        assert_trees_all_close(got, expect, rtol=1e-11, atol=1e-13)

    class FakeBasis:  # anything with a .C tuple, like an InteractionBasis
        C = tuple(basis)

    got_c = dj.jacobian_grams(model, variables, batches, basis=FakeBasis(), output_basis=out_basis)
    assert_trees_all_close(got_c, expect, rtol=1e-12, atol=1e-14)

    # Global variant: Jacobian of the output (chain of closed-form Jacobians), in an output basis.
    to_out = [np.einsum("nab,nbc,ncd->nad", J[2], J[1], J[0]), np.einsum("nab,nbc->nac", J[2], J[1]), J[2]]
    got = dj.jacobian_grams(model, variables, batches, target="output", output_basis=out_basis)
    assert_trees_all_close(got, [_np_jtj(j, out_basis) for j in to_out], rtol=1e-11, atol=1e-13)

    # The per-layer entry point, with a small chunk that does not divide the batch (padding is masked).
    m1 = dj.jacobian_gram(model, variables, batches, 1, out_basis=basis[2], chunk_size=3)
    assert_trees_all_close(m1, expect[1], rtol=1e-11, atol=1e-13)


def _jacfwd_reference(fns, variables, acts, bases_next, basis_out):
    """M^l for both targets from per-example jax.jacfwd of the hand-written sections.

    Section Jacobians J_l (N, T_out, d_out, T_in, d_in) come from jacfwd; the Jacobian to the output is their
    chain product (NumPy einsum over positions and features), and M sums J^T J over input positions.
    """
    jac = jax.jit(lambda v, acts: [jax.vmap(jax.jacfwd(lambda h, f=f: f(v, h[None])[0]))(a)
                                   for f, a in zip(fns, acts)])
    Js = [np.asarray(J) for J in jac(variables, acts)]
    Js[-1] = Js[-1][:, None]  # the unembedding output has no positions axis: give it one of size 1

    def gram(J, B):
        J = np.einsum("ntosj,ok->ntksj", J, B)
        return np.einsum("ntksj,ntksi->ji", J, J) / (J.shape[0] * J.shape[3])

    nxt = [gram(J, B) for J, B in zip(Js, bases_next)]
    out, chain = [], Js[-1]
    for l in reversed(range(len(Js))):
        if l < len(Js) - 1:
            chain = np.einsum("ntosj,nsjpi->ntopi", chain, Js[l])
        out.insert(0, gram(chain, basis_out))
    return {"next": nxt, "output": out}


def test_jacobian_grams_transformer_positions(transformer):
    # Attention mixes positions and the unembedding reads the last position only (the section changes P).
    module, variables, x, model, acts = transformer
    rng = np.random.default_rng(2)
    dims = [6, 8, 8, 8]
    basis = [rng.normal(size=(d + 1, 5)) for d in dims]  # (d + 1, k) with the constant row last
    out_basis = rng.normal(size=(5, 4))
    batches = [x[:12], x[12:]]
    expect = _jacfwd_reference(hand_transformer_sections(), variables, acts, [b[:-1] for b in basis[1:]] + [out_basis],
                               out_basis)
    got = dj.jacobian_grams(model, variables, batches, basis=basis, output_basis=out_basis)
    assert [m.shape for m in got] == [(d, d) for d in dims]
    assert_trees_all_close(got, expect["next"], rtol=1e-9, atol=1e-12)
    got = dj.jacobian_grams(model, variables, batches, target="output", output_basis=out_basis)
    assert_trees_all_close(got, expect["output"], rtol=1e-9, atol=1e-12)


def test_hutchinson_within_standard_errors(mlp):
    # K independent estimates (num_sources=2 each, vmapped over keys under jit): their mean must lie within
    # 3 standard errors (from the spread of the K estimates) of the exact closed form for the trace, and within
    # 4 SE elementwise (49 entries: P(|z| > 4) * 49 < 0.4% under normality).
    module, variables, x, model = mlp
    J = _np_mlp_jacobians(variables, x)
    exact = _np_jtj(J[1])
    keys = jax.random.split(jax.random.key(4), 64)
    p = variables["params"]
    est = jax.jit(jax.vmap(lambda k: dj.jacobian_gram(HAND_MLP, p, x, 1, num_sources=2, key=k)))(keys)
    est = np.asarray(est)
    mean = est.mean(0)
    se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
    tr = np.trace(est, axis1=1, axis2=2)
    assert abs(tr.mean() - np.trace(exact)) <= 3 * tr.std(ddof=1) / np.sqrt(len(tr))
    assert np.all(np.abs(mean - exact) <= 4 * se + 1e-12)
    assert np.any(se > 0)  # really random, not exact by accident


# ------------------------------------------------------------------------------------------------------------------
# Data parallel, jit


def test_sharded_equals_unsharded(mlp, num_devices):
    module, variables, x, _ = mlp
    model, p = HAND_MLP, variables["params"]
    mesh = jax.make_mesh((8,), ("data",))
    x = x[:32]
    h, _, _ = _np_mlp(variables, x)
    J = _np_mlp_jacobians(variables, x)
    batches = [x[:16], x[16:]]  # 2 data points per device and batch
    g = dj.activation_grams(model, p, batches, mesh=mesh)
    assert_trees_all_close(g, [_np_gram(a, True) for a in h], rtol=1e-12, atol=1e-13)
    for structured in (True, False):
        m = dj.jacobian_grams(model, p, batches, mesh=mesh, batch_axis="data", structured=structured)
        assert_trees_all_close(m, [_np_jtj(j) for j in J], rtol=1e-11, atol=1e-13)
    # Unsharded runs of the same code path agree to rounding (the psum only reorders the sums).
    assert_trees_all_close(g, dj.activation_grams(model, p, batches), rtol=1e-12, atol=1e-13)
    # Pre-sharded batches without mesh=: picked up from the arrays' NamedSharding.
    sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
    assert_trees_all_close(dj.activation_grams(model, p, sharded), g, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="not divisible"):
        dj.activation_grams(model, p, x[:12], mesh=mesh)


def test_public_functions_under_jit(mlp):
    module, variables, x, model = mlp
    h, _, _ = _np_mlp(variables, x)
    J = _np_mlp_jacobians(variables, x)

    @jax.jit
    def all_grams(p, x):
        return (dj.activation_grams(HAND_MLP, p, x), list(dj.activation_stats(HAND_MLP, p, x).means),
                dj.jacobian_grams(HAND_MLP, p, x), dj.jacobian_gram(HAND_MLP, p, x, 0, target="output"))

    g, mu, m, m0 = all_grams(variables["params"], x)
    assert_trees_all_close(g, [_np_gram(a, True) for a in h], rtol=1e-12, atol=1e-13)
    assert_trees_all_close(mu, [a.mean(0) for a in h], rtol=1e-12, atol=1e-13)
    assert_trees_all_close(m, [_np_jtj(j) for j in J], rtol=1e-11, atol=1e-13)
    assert_trees_all_close(m0, _np_jtj(np.einsum("nab,nbc,ncd->nad", J[2], J[1], J[0])), rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs(mlp):
    module, variables, x, model = mlp
    with pytest.raises(ValueError, match="Section 0"):
        dj.activation_grams(model, variables, [jnp.ones((4, 9))])
    with pytest.raises(ValueError, match="empty"):
        dj.activation_grams(model, variables, [])
    with pytest.raises(ValueError, match="empty"):
        dj.jacobian_grams(model, variables, iter([]))
    with pytest.raises(ValueError, match="dtype"):
        dj.activation_grams(model, variables, [x[:20], x[20:].astype(jnp.float32)])
    bad = x[20:].at[3, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"node layer 0 \(input\).*batch 1"):
        dj.activation_grams(model, variables, [x[:20], bad])
    with pytest.raises(ValueError, match=r"node layer 0 \(input\).*batch 1"):
        dj.jacobian_grams(model, variables, [x[:20], bad])
    # Non-finite only from layer 1 on: log of negative inputs.
    logmodel = [lambda p, h: jnp.log(h), lambda p, h: h * p]
    with pytest.raises(ValueError, match=r"node layer 1 \(layer 1\).*batch 0"):
        dj.activation_grams(logmodel, 2.0, -jnp.ones((3, 2)))
    # An identity model accepts any feature size, so a later batch's size is checked against batch 0.
    with pytest.raises(ValueError, match="features, but batch 0 gave"):
        dj.activation_grams([lambda p, h: h], None, [jnp.ones((3, 2)), jnp.ones((3, 4))])
    with pytest.raises(ValueError, match="expected"):
        dj.jacobian_gram(model, variables, x, 0, out_basis=np.ones((5, 2)))
    with pytest.raises(ValueError, match="9 matrices|3 node layers"):
        dj.jacobian_grams(model, variables, x, basis=[np.eye(5)] * 9)
    with pytest.raises(ValueError, match="target"):
        dj.jacobian_grams(model, variables, x, target="prev")
    with pytest.raises(ValueError, match="basis=None"):
        dj.jacobian_grams(model, variables, x, target="output", basis=[None] * 3)
    with pytest.raises(ValueError, match="key"):
        dj.jacobian_gram(model, variables, x, 0, num_sources=3)
    with pytest.raises(ValueError, match="out of range"):
        dj.jacobian_gram(model, variables, x, 3)
    with pytest.raises(ValueError, match="iterable"):
        dj.activation_grams(model, variables, 3.0)
    with pytest.raises(ValueError, match="floating-point"):
        dj.jacobian_grams([lambda p, h: h.astype(jnp.float64)], None, jnp.ones((3, 2), jnp.int32))
