"""The dense-plus-elementwise fast path: recognition from the jaxpr, and Grams/edges against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import degenjax as dj
from degenjax import models
from degenjax._src.structure import affine_elementwise
from conftest import assert_trees_all_close


def _params(dims, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"W": [jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype) for a, b in zip(dims[:-1], dims[1:])],
            "b": [jnp.asarray(0.3 * rng.normal(size=(b,)), dtype) for b in dims[1:]],
            "a": jnp.asarray(rng.uniform(0.05, 0.3, size=(dims[1],)), dtype)}


def _sections():
    """Three dense sections with different elementwise tails, acting on (batch, positions, d)."""
    def f0(p, h):  # per-unit leaky slope, scale, gelu: still elementwise in h @ W
        z = h @ p["W"][0] + p["b"][0][None, None, :]
        return 1.5 * jnp.where(z > 0, z, p["a"][None, None, :] * z) + jax.nn.gelu(z)

    def f1(p, h):
        return jax.nn.silu(jnp.matmul(h, p["W"][1]) - p["b"][1][None, None, :])

    def f2(p, h):
        return h @ p["W"][2]

    return dj.Sections((f0, f1, f2))


def test_recognises_dense_elementwise_sections():
    x = jnp.ones((4, 5), jnp.float32)
    mlp = models.MLP(features=(8, 8, 3))
    v = mlp.init(jax.random.key(0), x)
    for fold in (True, False):  # folded (bias-as-input) sections take the fast path too
        assert dj.structured_sections(models.mlp_sections(mlp, x, fold_bias=fold), v, x) == (True, True, True)
    gd, state = nnx.split(models.NnxMLP(5, (8, 8, 3), rngs=nnx.Rngs(0)))
    assert dj.structured_sections(models.nnx_mlp_sections(gd, 3, x), state, x) == (True, True, True)
    t = models.Transformer(vocab=6, seq_len=3, d_model=16, num_heads=2, d_mlp=32, num_out=5, use_bias=True)
    xt = models.one_hot_pairs(5, np.array([[1, 2], [3, 4]]))
    vt = t.init(jax.random.key(0), xt)
    # embed (one-hot @ W_E + positions), attention, the residual MLP block and the last-position read-out
    assert dj.structured_sections(models.transformer_sections(t, xt), vt, xt) == (True, True, True, True)
    W = jnp.ones((5, 5), jnp.float32)
    not_structured = [
        lambda p, h: jax.nn.softmax(h @ W, axis=-1),      # reduction over features
        lambda p, h: jnp.reshape(h @ W, (h.shape[0], 5, 1)),  # a second feature axis in the output
        lambda p, h: (W @ h.T).T,                          # h on the right of the product
        lambda p, h: jax.nn.relu(jax.nn.relu(h @ W) @ W),  # a nonlinearity after the second product
        lambda p, h: jnp.cumsum(h @ W, axis=-1),
        lambda p, h: jax.nn.relu(h @ W) * jax.nn.relu(h @ (2 * W)),  # two different pre-activations
    ]
    flags = [dj.structured_sections([f], None, x)[0] for f in not_structured]
    assert flags == [False] * len(not_structured)
    # affine parts around the elementwise one: pass-throughs, feature slices, no nonlinearity, a folded constant
    W = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5)))
    structured = [
        lambda p, h: h + jax.nn.relu(h @ W),
        lambda p, h: jax.nn.relu(h @ W) @ W + h @ W,
        lambda p, h: h[:, :2] @ W[:2],
        lambda p, h: h * 2.0,
        lambda p, h: jax.nn.gelu(0.5 * (h @ W)) * 3.0,
        lambda p, h: jnp.concatenate([jax.nn.relu(h[:, :-1] @ W[:4] + h[:, -1:] * W[0][None]), h[:, -1:]], -1),
    ]
    xx = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)))
    for f in structured:
        def parts(h, f=f):  # traced under jit: no op-by-op execution of the reader
            sp = affine_elementwise(f, None, h)
            assert sp is not None
            V = jnp.eye(sp.W.shape[1], dtype=h.dtype) if sp.V is None else sp.V
            return sp.W, sp.slope, V, (jnp.zeros((h.shape[1], V.shape[1]), h.dtype) if sp.A0 is None else sp.A0)

        W_, s_, V_, A0_ = (np.asarray(a) for a in jax.jit(parts)(xx))
        J = np.asarray(jax.jit(jax.vmap(jax.jacfwd(lambda e, f=f: f(None, e[None])[0])))(xx))  # (n, out, in)
        Jr = np.einsum("ik,nk,ko->noi", W_, s_, V_) + A0_.T[None]
        np.testing.assert_allclose(J, Jr, rtol=1e-12, atol=1e-14)


def test_split_matches_jacfwd():
    p = _params((7, 6, 5, 4), 0)
    model = _sections()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 2, 7)))
    h = x
    for l, f in enumerate(model.fns):
        split = affine_elementwise(f, p, h)
        assert split is not None, l
        J = jax.vmap(jax.vmap(jax.jacfwd(lambda e, f=f: f(p, e[None, None])[0, 0])))(h)  # (9, 2, d_out, d_in)
        expect = np.einsum("jk,npk->npkj", np.asarray(split.W), np.asarray(split.slope))
        np.testing.assert_allclose(np.asarray(J), expect, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(split.post(split.z)), np.asarray(f(p, h)), rtol=1e-14)
        h = f(p, h)
    # under jit and vmap with traced params and inputs
    slope = jax.jit(lambda q, hh: affine_elementwise(model.fns[0], q, hh).slope)(p, x)
    np.testing.assert_allclose(np.asarray(slope), np.asarray(affine_elementwise(model.fns[0], p, x).slope))
    per_ex = jax.vmap(lambda e: affine_elementwise(model.fns[0], p, e[None]).slope[0])(x)
    np.testing.assert_allclose(np.asarray(per_ex), np.asarray(slope), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grams_and_edges_match_float64_reference(dtype):
    p64 = _params((7, 6, 5, 4), 2)
    p = jax.tree.map(lambda a: a.astype(dtype), p64)
    model = _sections()
    x64 = np.random.default_rng(3).normal(size=(40, 3, 7))
    x = jnp.asarray(x64, dtype)
    batches = [x[:25], x[25:]]
    b = dj.interaction_basis(model, p, batches)
    C = [np.asarray(c, np.float64) for c in b.C]
    Ms, Es = _general_reference(model, p64, jnp.asarray(x64), C)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-7)
    for structured in (True, False):
        M = dj.jacobian_grams(model, p, batches, basis=b, structured=structured)
        scale = [np.abs(m).max() for m in Ms]
        assert_trees_all_close([m / s for m, s in zip(M, scale)], [m / s for m, s in zip(Ms, scale)], **tol)
        E = dj.interaction_edges(model, p, b, batches, structured=structured, jit=structured)
        scale = [np.abs(e).max() for e in Es]
        assert_trees_all_close([e / s for e, s in zip(E, scale)], [e / s for e, s in zip(Es, scale)], **tol)
    # inside the user's jit, with static dims
    E_jit = jax.jit(lambda q, xx: dj.interaction_edges(model, q, b, [xx[:25], xx[25:]]))(p, x)
    scale = [np.abs(e).max() for e in Es]
    assert_trees_all_close([e / s for e, s in zip(E_jit, scale)], [e / s for e, s in zip(Es, scale)], **tol)
    M_jit = jax.jit(lambda q, xx: dj.jacobian_gram(model, q, xx, 1, out_basis=b.C[2]))(p, x)
    np.testing.assert_allclose(np.asarray(M_jit, np.float64) / np.abs(Ms[1]).max(), Ms[1] / np.abs(Ms[1]).max(),
                               **tol)


def test_structured_sections_under_jit_and_sharded(num_devices):
    p = _params((7, 6, 5, 4), 4)
    model = _sections()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(16, 2, 7)))
    flags = jax.jit(lambda q, xx: jnp.asarray(dj.structured_sections(model, q, xx)))(p, x)
    assert np.asarray(flags).tolist() == [True, True, True]
    mesh = jax.make_mesh((8,), ("data",))
    got = dj.jacobian_grams(model, p, [x[:8], x[8:]], mesh=mesh, batch_axis="data")
    want = dj.jacobian_grams(model, p, [x[:8], x[8:]], structured=False)
    assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)


def _residual_model():
    """A residual MLP block on (batch, positions, d), a last-position read-out with tanh, and a linear head."""
    def f_res(p, h):
        a = jax.nn.silu(h @ p["W1"] + p["b1"][None, None, :])
        return h + (a @ p["V1"] + p["c1"][None, None, :])

    def f_sel(p, h):
        return jnp.tanh(h[:, -1, :] @ p["W2"] + p["b2"][None, :])

    def f_out(p, h):
        return h @ p["W3"]

    return dj.Sections((f_res, f_sel, f_out))


def _residual_params(dtype, seed=6):
    rng = np.random.default_rng(seed)
    shapes = {"W1": (6, 9), "b1": (9,), "V1": (9, 6), "c1": (6,), "W2": (6, 5), "b2": (5,), "W3": (5, 4)}
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0] if len(s) == 2 else 4.0), dtype)
            for k, s in shapes.items()}


def _general_reference(model, p, x, C):
    """M^l and edges from full per-example jacfwd Jacobians (all output and input positions), float64 NumPy."""
    acts, h = [], x
    for f in model.fns:
        acts.append(np.asarray(h))
        h = f(p, h)
    Ms, Es = [], []
    for l, f in enumerate(model.fns):
        a = acts[l]
        J = np.asarray(jax.vmap(jax.jacfwd(lambda e, f=f: f(p, e[None])[0]))(jnp.asarray(a)))
        n, d_in = a.shape[0], a.shape[-1]
        P_in = int(np.prod(a.shape[1:-1]))
        out_nd = J.ndim - a.ndim  # output axes per example (positions..., features)
        d_out = J.shape[out_nd]
        J = J.reshape(n, -1, d_out, P_in, d_in)  # (n, T_out, d_out, P_in, d_in)
        B = C[l + 1][:-1] if l + 1 < len(C) else np.eye(d_out)
        Jb = np.einsum("ntosj,ok->ntksj", J, B)
        Ms.append(np.einsum("ntksj,ntksi->ji", Jb, Jb) / (n * P_in))
        if l + 1 < len(C):
            hh = (np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1) @ C[l]).reshape(n, P_in, -1)
            Cp = np.linalg.pinv(C[l])[:, :-1]
            Jh = np.einsum("ntksj,mj->ntksm", Jb, Cp)
            g = np.einsum("ntksm,nsm->ntkm", Jh, hh)
            Es.append(np.einsum("ntkm,ntkm->km", g, g) / (n * P_in))
    return Ms, Es


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_residual_block_and_position_readout(dtype):
    model = _residual_model()
    p, p64 = _residual_params(dtype), _residual_params(np.float64)
    x64 = np.random.default_rng(7).normal(size=(30, 3, 6))
    x = jnp.asarray(x64, dtype)
    assert dj.structured_sections(model, p, x) == (True, True, True)
    split = affine_elementwise(model.fns[0], p, x)
    assert split.A0 is not None and split.V is not None
    assert affine_elementwise(model.fns[1], p, x).select(x).shape == (30, 6)
    batches = [x[:17], x[17:]]
    b = dj.interaction_basis(model, p, batches)
    C = [np.asarray(c, np.float64) for c in b.C]
    Ms, Es = _general_reference(model, p64, jnp.asarray(x64), C)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-7)
    norm = lambda ts, refs: ([t / np.abs(r).max() for t, r in zip(ts, refs)], [r / np.abs(r).max() for r in refs])
    for structured in (True, False):
        M = dj.jacobian_grams(model, p, batches, basis=b, structured=structured)
        assert_trees_all_close(*norm(M, Ms), **tol)
        E = dj.interaction_edges(model, p, b, batches, structured=structured)
        assert_trees_all_close(*norm(E, Es), **tol)
    # without an output basis (identity) the residual's cross terms are exercised with P = I
    M0 = dj.jacobian_gram(model, p, batches, 0)
    J = np.asarray(jax.vmap(jax.jacfwd(lambda e: model.fns[0](p64, e[None])[0]))(jnp.asarray(x64)))
    J = J.reshape(30, 3, 6, 3, 6)
    ref0 = np.einsum("ntosj,ntosi->ji", J, J) / 90
    np.testing.assert_allclose(np.asarray(M0, np.float64) / np.abs(ref0).max(), ref0 / np.abs(ref0).max(), **tol)


def test_residual_block_at_transformer_sizes():
    # d_model 128, d_mlp 512, 474 rows: sizes at which an earlier form of the residual cross term was miscompiled
    # by XLA:CPU under jit (jax 0.10.2); the jitted Gram must match per-example float64 Jacobians
    rng = np.random.default_rng(8)
    p = {"W1": jnp.asarray(rng.normal(size=(128, 512)) / 11.0), "b1": jnp.asarray(rng.normal(size=512)),
         "V1": jnp.asarray(rng.normal(size=(512, 128)) / 22.0), "c1": jnp.asarray(rng.normal(size=128))}

    def block(q, h):
        return h + jax.nn.relu(h @ q["W1"] + q["b1"][None, None, :]) @ q["V1"] + q["c1"][None, None, :]

    x = jnp.asarray(rng.normal(size=(158, 3, 128)))
    B = rng.normal(size=(129, 25))
    J = np.asarray(jax.vmap(jax.jacfwd(lambda e: block(p, e[None])[0]))(x)).reshape(158, 3, 128, 3, 128)
    Jb = np.einsum("ntosj,ok->ntksj", J, B[:128])
    ref = np.einsum("ntksj,ntksi->ji", Jb, Jb) / (158 * 3)
    for jit in (True, False):
        got = np.asarray(dj.jacobian_gram([block], p, x, 0, out_basis=B, jit=jit))
        np.testing.assert_allclose(got / np.abs(ref).max(), ref / np.abs(ref).max(), rtol=1e-10, atol=1e-12)
    assert dj.structured_sections([block], p, x) == (True,)
