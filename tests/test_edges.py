"""Interaction edges, sparsity and ablations against float64 NumPy references, and the seed paper's experiments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from conftest import assert_trees_all_close
from test_basis import mlp_setup


def _dense_sections(acts):
    """Sections ``f_l(p, h) = act_l(h @ W_l + b_l)`` with acts[l] in {"relu", "linear"}."""
    def make(l, a):
        def f(p, h):
            z = h @ p[f"W{l}"] + p[f"b{l}"][None, :]
            return jax.nn.relu(z) if a == "relu" else z
        return f
    return dj.Sections(tuple(make(l, a) for l, a in enumerate(acts)))


def _np_forward(p, x, acts, start=0, h=None):
    """NumPy forward from node layer ``start`` (input ``h``); returns output, activations, per-example Jacobians."""
    h = x if h is None else h
    hs, jacs = [], []
    for l in range(start, len(acts)):
        hs.append(h)
        z = h @ p[f"W{l}"] + p[f"b{l}"][None, :]
        gate = (z > 0).astype(float) if acts[l] == "relu" else np.ones_like(z)
        jacs.append(gate[:, :, None] * p[f"W{l}"].T[None])
        h = np.maximum(z, 0) if acts[l] == "relu" else z
    return h, hs, jacs


def _np_edges(hs, jacs, C, Cp):
    """E^l_ij = mean_x (Jhat_x[i, j] h^_x[j])^2 with Jhat = C_{l+1}[:d]^T J C_l^+[:, :d]^T."""
    out = []
    for l in range(len(C) - 1):
        hh = np.concatenate([hs[l], np.ones((hs[l].shape[0], 1))], axis=1) @ C[l]
        Jh = np.einsum("ai,nab,jb->nij", C[l + 1][:-1], jacs[l], Cp[l][:, :-1])
        out.append(np.mean((Jh * hh[:, None, :]) ** 2, axis=0))
    return out


def _params(widths, seed, scale=1.0, bias=0.3):
    rng = np.random.default_rng(seed)
    return {**{f"W{l}": scale * rng.normal(size=(widths[l], widths[l + 1])) / np.sqrt(widths[l])
               for l in range(len(widths) - 1)},
            **{f"b{l}": bias * rng.normal(size=(widths[l + 1],)) for l in range(len(widths) - 1)}}


def _np_basis_arrays(b):
    return [np.asarray(c) for c in b.C], [np.asarray(c) for c in b.C_pinv]


@pytest.fixture(scope="module")
def relu_net():
    model, params, p, x = mlp_setup()  # the model of test_basis.py: its compiled steps are reused
    return model, params, p, x, ("relu", "relu", "linear")


@pytest.mark.parametrize("kind", ["lib", "pca", "random"])
def test_edges_match_numpy(relu_net, kind):
    model, params, p, x, acts = relu_net
    b = dj.interaction_basis(model, params, x, kind=kind, key=jax.random.key(1))
    C, Cp = _np_basis_arrays(b)
    _, hs, jacs = _np_forward(p, x, acts)
    ref = _np_edges(hs, jacs, C, Cp)
    for mode, structured in (("jvp", False), ("vjp", False), ("auto", True)):
        got = dj.interaction_edges(model, params, b, [x[:150], x[150:]], mode=mode, chunk_size=4,
                                   structured=structured)
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert_trees_all_close(got, ref, rtol=1e-9, atol=1e-14)
        np.testing.assert_array_equal(np.asarray(got[0][0]), 0.0)  # the constant output node has no inputs
    if kind == "lib":
        jitted = jax.jit(lambda q, xx: dj.interaction_edges(model, q, b, xx))(params, x)
        assert_trees_all_close(jitted, ref, rtol=1e-9, atol=1e-14)


def test_edge_sparsity_against_numpy():
    rng = np.random.default_rng(0)
    edges = [rng.exponential(size=(5, 7)) ** 3, rng.exponential(size=(4, 5)) ** 3]
    fr = (0.5, 0.9, 0.99, 1.0)
    got = dj.edge_sparsity(edges, fr)
    for l, e in enumerate(edges):
        w = np.sort(e[1:, 1:].ravel())[::-1]
        cum = np.cumsum(w) / w.sum()
        ref = [int(np.argmax(cum >= f - 1e-12)) + 1 for f in fr]
        np.testing.assert_array_equal(np.asarray(got.counts[l]), ref)
        assert int(got.num_edges[l]) == w.size
    jitted = jax.jit(lambda es: dj.edge_sparsity(es, fr).counts)([jnp.asarray(e) for e in edges])
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(got.counts))
    perm = [0] + list(range(6, 0, -1))  # permuting non-constant inputs leaves the counts unchanged
    stacked = jnp.stack([jnp.asarray(edges[0]), jnp.asarray(edges[0][:, perm])])
    vm = jax.vmap(lambda e: dj.edge_sparsity([e], fr).counts[0])(stacked)
    np.testing.assert_array_equal(np.asarray(vm), np.stack([np.asarray(got.counts[0])] * 2))
    with pytest.raises(ValueError, match="fractions"):
        dj.edge_sparsity(edges, (0.0,))


def _np_ablated(p, acts, C, Cp, x, layer, mask):
    """NumPy reference of `ablated_output`: output node i of layer+1 sees h^_layer * mask[i]."""
    _, hs, _ = _np_forward(p, x, acts)
    hh = np.concatenate([hs[layer], np.ones((x.shape[0], 1))], axis=1) @ C[layer]
    nxt = np.zeros((x.shape[0], mask.shape[0]))
    for i in range(mask.shape[0]):
        h_in = (hh * mask[i][None, :]) @ Cp[layer][:, :-1]
        out, _, _ = _np_forward(p, None, acts[: layer + 1], start=layer, h=h_in)
        nxt[:, i] = out @ C[layer + 1][:-1, i] + C[layer + 1][-1, i]
    out, _, _ = _np_forward(p, None, acts, start=layer + 1, h=nxt @ Cp[layer + 1][:, :-1])
    return out


def test_ablations_against_numpy(relu_net):
    model, params, p, x, acts = relu_net
    b = dj.interaction_basis(model, params, x)
    C, Cp = _np_basis_arrays(b)
    e = dj.interaction_edges(model, params, b, x)
    y_full = np.asarray(model.fns[2](params, model.fns[1](params, model.fns[0](params, x))))
    metric = lambda out: jnp.mean((out - y_full) ** 2)  # noqa: E731
    np_metric = lambda out: np.mean((out - y_full) ** 2)  # noqa: E731
    mask = (np.random.default_rng(0).uniform(size=np.asarray(e[0]).shape) > 0.5).astype(float)
    mask[:, 0] = 1.0
    got = dj.ablated_output(model, params, b, x, 0, jnp.asarray(mask), chunk_size=3)
    np.testing.assert_allclose(np.asarray(got), _np_ablated(p, acts, C, Cp, x, 0, mask), rtol=1e-10, atol=1e-12)
    tol = 1e-3
    res = dj.edges_required(model, params, b, e, x, metric, tol=tol)
    for r in res:
        l, k = r.layer, r.required
        w = np.asarray(e[l])[1:, 1:].ravel()
        order = np.argsort(-w, kind="stable")

        def np_dev(k, l=l, order=order):
            m = np.zeros(w.size)
            m[order[:k]] = 1
            full = np.ones(np.asarray(e[l]).shape)
            full[1:, 1:] = m.reshape(full[1:, 1:].shape)
            return abs(np_metric(_np_ablated(p, acts, C, Cp, x, l, full)) - r.metric_full)

        assert r.num_edges == w.size and 0 < k < w.size
        assert np_dev(k) <= tol < np_dev(k - 1)  # the bisection's answer is a boundary of the tolerance
    curves = dj.node_ablation_curves(model, params, b, x, metric, layers=[1])
    ns, vals = curves[0]
    hh = np.concatenate([np.asarray(x @ p["W0"] + p["b0"]).clip(0), np.ones((x.shape[0], 1))], axis=1) @ C[1]
    for n, v in zip(ns, vals):
        keep = np.zeros(C[1].shape[1])
        keep[0] = 1
        keep[1 + np.argsort(-np.asarray(b.Lambda[1][1:]), kind="stable")[:n]] = 1
        out, _, _ = _np_forward(p, None, acts, start=1, h=(hh * keep) @ Cp[1][:, :-1])
        np.testing.assert_allclose(v, np_metric(out), rtol=1e-9, atol=1e-15)
    assert vals[-1] < 1e-20 < vals[0]


# ---------------------------------------------------------------------------------------------------------------
# the seed paper's experiments


def test_experiment_deep_linear_lib_diagonalises():
    # (a) Deep linear network: in the LIB basis every hidden-to-hidden map is diagonal (DESIGN section 3: the map
    # A between consecutive LIB bases satisfies A A^T = I and A^T Lambda_l A = Lambda_{l+1}); PCA's is not.
    rng = np.random.default_rng(7)
    widths = (4, 5, 5, 5)
    p = _params(widths, seed=8, bias=0.0)
    x = rng.normal(size=(300, 4)) @ np.diag([1.5, 1.0, 0.6, 0.3]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0] + 0.2
    model = _dense_sections(("linear",) * 3)
    params = {k: jnp.asarray(v) for k, v in p.items()}
    off = {}
    for kind in ("lib", "pca"):
        b = dj.interaction_basis(model, params, x, kind=kind)
        e = dj.interaction_edges(model, params, b, x)
        for l in range(2):
            w = np.asarray(e[l])[1:, 1:]
            assert w.shape == (4, 4)
            off[kind, l] = (w.sum() - np.trace(w)) / w.sum()
            if kind == "lib":  # a linear section: sum E^l = sum Lambda^l, the constant node included
                np.testing.assert_allclose(float(jnp.sum(e[l])), float(jnp.sum(b.Lambda[l])), rtol=1e-9)
    assert off["lib", 0] < 1e-8 and off["lib", 1] < 1e-8
    assert off["pca", 1] > 1e-2


def _sync_net():
    """ReLU net whose first hidden layer has 4 groups of 2 synchronized neurons (pre-activations z and c z)."""
    rng = np.random.default_rng(11)
    base = rng.normal(size=(3, 4))
    scales = np.array([1.0, 2.5])
    W0 = np.concatenate([base[:, [g]] * scales[None, :] for g in range(4)], axis=1)  # (3, 8)
    p = {"W0": W0, "b0": np.zeros(8), "W1": rng.normal(size=(8, 6)) / 3, "b1": 0.2 * rng.normal(size=6),
         "W2": rng.normal(size=(6, 3)) / 2, "b2": np.zeros(3)}
    x = rng.normal(size=(400, 3))
    return _dense_sections(("relu", "relu", "linear")), {k: jnp.asarray(v) for k, v in p.items()}, x


def test_experiment_synchronized_neurons_sparser():
    # (b) LIB needs fewer edges for 90% of the weight than PCA and a random rotation, on every layer.
    model, params, x = _sync_net()
    counts = {}
    for kind in ("lib", "pca", "random"):
        b = dj.interaction_basis(model, params, x, kind=kind, key=jax.random.key(0))
        counts[kind] = np.asarray(dj.edge_sparsity(dj.interaction_edges(model, params, b, x), (0.9,)).counts[:, 0])
        if kind == "lib":
            assert b.dims[1] == 5  # 8 neurons, 4 synchronized pairs: rank 4 (+ constant)
    assert np.all(counts["lib"] < counts["pca"]) and np.all(counts["lib"] < counts["random"]), counts


def test_experiment_two_subnetworks_do_not_interact():
    # (c) Block-diagonal network on a product data set (every pair of sub-inputs), so the empirical
    # cross-covariances vanish exactly: no LIB edge crosses between the two sub-networks.
    rng = np.random.default_rng(12)
    xa, xb = rng.normal(size=(20, 3)) + 0.3, rng.normal(size=(18, 2)) - 0.2
    x = np.concatenate([np.repeat(xa, 18, axis=0), np.tile(xb, (20, 1))], axis=1)
    pa, pb = _params((3, 5, 4, 2), seed=13), _params((2, 4, 3, 2), seed=14)

    def blk(a, c):
        return np.block([[a, np.zeros((a.shape[0], c.shape[1]))], [np.zeros((c.shape[0], a.shape[1])), c]])

    p = {f"W{l}": blk(pa[f"W{l}"], pb[f"W{l}"]) for l in range(3)}
    p.update({f"b{l}": np.concatenate([pa[f"b{l}"], pb[f"b{l}"]]) for l in range(3)})
    model = _dense_sections(("relu", "relu", "linear"))
    params = {k: jnp.asarray(v) for k, v in p.items()}
    b = dj.interaction_basis(model, params, x)
    e = dj.interaction_edges(model, params, b, x)
    split = [3, 5, 4]  # features of sub-network A in node layers 0, 1, 2

    def side(l):
        C = np.abs(np.asarray(b.C[l])[:-1, 1:])
        a_mass, b_mass = C[: split[l]].sum(0), C[split[l]:].sum(0)
        assert np.all(np.minimum(a_mass, b_mass) < 1e-8 * np.maximum(a_mass, b_mass))  # each direction in one block
        return a_mass > b_mass

    for l in range(2):
        w = np.asarray(e[l])[1:, 1:]
        cross = side(l + 1)[:, None] != side(l)[None, :]
        assert cross.any() and w[cross].sum() < 1e-12 * w.sum()


def test_edges_bad_inputs(relu_net):
    model, params, _, x, _ = relu_net
    b = dj.interaction_basis(model, params, x, kind="pca")
    with pytest.raises(ValueError, match="mode"):
        dj.interaction_edges(model, params, b, x, mode="fwd")
    with pytest.raises(ValueError, match="Section 0"):
        dj.interaction_edges(model, params, b, np.ones((4, 3)))
    with pytest.raises(ValueError, match="W2"):
        dj.interaction_edges(model, dict(params, W2=params["W2"] * jnp.nan), b, x)
    with pytest.raises(ValueError, match="no edges"):
        dj.edges_required(model, params, b, [], x, lambda o: 0.0, layers=[2])


# ---------------------------------------------------------------------------------------------------------------
# small trained models (item 6 of the issue; the full-size table is in benchmarks/basis.py)


def _train(loss, params, steps, lr):
    import optax

    opt = optax.adam(lr)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[0][0]

    with jax.numpy_dtype_promotion("standard"):  # optax's step counter mixes int32 and float scalars
        return run(params)


def _sparsity_by_kind(model, params, x, kinds=("lib", "pca")):
    out = {}
    for kind in kinds:
        b = dj.interaction_basis(model, params, x, kind=kind, key=jax.random.key(0))
        e = dj.interaction_edges(model, params, b, x)
        out[kind] = (b, e, np.asarray(dj.edge_sparsity(e).counts))
    return out


def test_trained_digits_mlp():
    from sklearn.datasets import load_digits

    from degenjax import models

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    perm = np.random.default_rng(0).permutation(len(X))
    tr, te = perm[:1200], perm[1200:]
    module = models.MLP(features=(24, 24, 10), param_dtype=jnp.float64)
    v = module.init(jax.random.key(0), X[:2])
    xtr, ytr = jnp.asarray(X[tr]), jnp.asarray(y[tr])
    loss = lambda p: -jnp.mean(jnp.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(module.apply(p, xtr)), ytr[:, None], axis=1))
    v = _train(loss, v, 300, 1e-2)
    acc = lambda out: jnp.mean((jnp.argmax(out, -1) == jnp.asarray(y[te])).astype(jnp.float64))  # noqa: E731
    assert float(acc(module.apply(v, X[te]))) > 0.9
    model = models.mlp_sections(module, xtr)
    res = _sparsity_by_kind(model, v, xtr)
    b = res["lib"][0]
    assert b.dims[0] < 65 and int(b.num_dropped_gram[0]) >= 1  # constant pixels of the digits are dropped
    # LIB needs fewer edges than PCA for 90% of the weight, on every layer (random: benchmarks/basis.py)
    assert np.all(res["lib"][2][:, 1] < res["pca"][2][:, 1]), (res["lib"][2], res["pca"][2])
    req = dj.edges_required(model, v, b, res["lib"][1], X[te], acc, tol=1e-3, jit=True)
    for r in req:
        assert abs(r.metric_at_required - r.metric_full) <= 1e-3 and r.required < r.num_edges


def test_trained_modular_addition_transformer():
    from degenjax import models

    p = 11
    pairs = np.array([(a, b) for a in range(p) for b in range(p)])
    x = models.one_hot_pairs(p, pairs, dtype=jnp.float64)
    labels = jnp.asarray((pairs[:, 0] + pairs[:, 1]) % p)
    module = models.Transformer(vocab=p + 1, seq_len=3, d_model=16, num_heads=2, d_mlp=32, num_out=p,
                                param_dtype=jnp.float64)
    v = module.init(jax.random.key(1), x[:2])
    loss = lambda q: -jnp.mean(jnp.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(module.apply(q, x)), labels[:, None], axis=1))
    v = _train(loss, v, 150, 2e-2)
    acc = lambda out: jnp.mean((jnp.argmax(out, -1) == labels).astype(jnp.float64))  # noqa: E731
    assert float(acc(module.apply(v, x))) == 1.0
    model = models.transformer_sections(module, x)
    res = _sparsity_by_kind(model, v, x)
    b = res["lib"][0]
    # transform reproduces the logits from h^_0 = [x, 1] C_0 (LIB drops only directions the output ignores)
    hh0 = jnp.einsum("bsd,dk->bsk", x, b.C[0][:-1]) + b.C[0][-1][None, None, :]
    np.testing.assert_allclose(np.asarray(dj.forward(dj.transform(model, b), v, hh0)[0]),
                               np.asarray(module.apply(v, x)), rtol=1e-6, atol=1e-6)
    assert [e.shape for e in res["lib"][1]] == [(b.dims[l + 1], b.dims[l]) for l in range(3)]
    assert np.all(res["lib"][2][:, 1] < res["pca"][2][:, 1]), (res["lib"][2], res["pca"][2])


def test_typed_results_keep_dict_access():
    """EdgeSparsity / EdgesRequired are NamedTuples: attributes, _asdict() and (for old code) string keys agree."""
    sp = dj.edge_sparsity([np.array([[1.0, 1.0, 1.0], [1.0, 3.0, 1.0], [1.0, 0.0, 0.0]])], (0.5,))
    assert isinstance(sp, dj.EdgeSparsity) and sp._asdict()["counts"] is sp.counts and sp["counts"] is sp.counts
    # weights 3, 1, 0, 0: half of the total 4 needs the single largest edge
    assert np.asarray(sp.counts).tolist() == [[1]] and np.asarray(sp.num_edges).tolist() == [4]
    with pytest.raises(KeyError, match="no field 'count'"):
        sp["count"]
    row = dj.EdgesRequired(layer=0, required=3, num_edges=9, metric_full=1.0, metric_at_required=0.99)
    assert row["required"] == row.required == row[1] == 3
