"""Interaction basis and transform against float64 NumPy references (DESIGN.md section 3).

References: a NumPy re-derivation of the basis from closed-form Jacobians of hand-written sections (ReLU MLP; a
position-mixing tanh layer), and invariants checked directly on the data with NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from conftest import assert_trees_all_close

RELU_MLP = (5, 7, 6, 4)  # widths d_0..d_3; node layers 0..2, output 4


def _mlp_params(widths, seed=0):
    rng = np.random.default_rng(seed)
    p = {}
    for l in range(len(widths) - 1):
        p[f"W{l}"] = rng.normal(size=(widths[l], widths[l + 1])) / np.sqrt(widths[l])
        p[f"b{l}"] = 0.3 * rng.normal(size=(widths[l + 1],))
    return p


def _mlp_sections(num, relu=True):
    def make(l, act):
        def f(p, h):
            z = h @ p[f"W{l}"] + p[f"b{l}"][None, :]
            return jax.nn.relu(z) if act else z
        return f
    return dj.Sections(tuple(make(l, relu and l < num - 1) for l in range(num)))


def _np_mlp_forward(p, x, num, relu=True):
    acts, jacs, h = [], [], x
    for l in range(num):
        acts.append(h)
        z = h @ p[f"W{l}"] + p[f"b{l}"][None, :]
        act = relu and l < num - 1
        gate = (z > 0).astype(float) if act else np.ones_like(z)
        jacs.append(gate[:, :, None] * p[f"W{l}"].T[None])  # (N, d_{l+1}, d_l)
        h = np.maximum(z, 0) if act else z
    return h, acts, jacs


def _np_basis(acts, jacs, kind, rtol=None):
    """NumPy float64 re-derivation of DESIGN section 3 from per-example Jacobians ``jacs[l]`` (N, d_{l+1}, d_l)."""
    L = len(acts)
    out = [None] * L
    C_next = None
    for l in reversed(range(L)):
        h = acts[l]
        n, d = h.shape
        mu = h.mean(0)
        cov = (h - mu).T @ (h - mu) / n
        D, U = np.linalg.eigh(cov)
        D, U = D[::-1], U[:, ::-1]
        tol = (d + 1) * np.finfo(float).eps if rtol is None else rtol
        k = int(np.sum(D > tol * D[0]))
        Uk, Dk = U[:, :k], D[:k]
        if kind == "pca":
            R, Rp, lam, lam0 = Uk, Uk.T, Dk, 1.0
        else:
            if kind == "lib":
                J = jacs[l] if l == L - 1 else np.einsum("nod,ok->nkd", jacs[l], C_next[:-1])
            else:  # global: chain rule to the output
                J = jacs[l]
                for m in range(l + 1, L):
                    J = np.einsum("nab,nbc->nac", jacs[m], J)
            M = np.einsum("nkd,nke->de", J, J) / n
            S = Uk * np.sqrt(Dk)[None, :]
            Lam, V = np.linalg.eigh(S.T @ M @ S)
            Lam, V = Lam[::-1], V[:, ::-1]
            m_ = int(np.sum(Lam > tol * Lam[0]))
            lam, Vm = Lam[:m_], V[:, :m_]
            R = Uk / np.sqrt(Dk)[None, :] @ Vm * np.sqrt(lam)[None, :]
            Rp = (Vm.T / np.sqrt(lam)[:, None]) @ (np.sqrt(Dk)[:, None] * Uk.T)
            lam0 = mu @ M @ mu
        C = np.zeros((d + 1, R.shape[1] + 1))
        C[d, 0] = np.sqrt(lam0)
        C[:d, 1:] = R
        C[d, 1:] = -mu @ R
        Cp = np.zeros((R.shape[1] + 1, d + 1))
        Cp[0, :d], Cp[0, d] = mu / np.sqrt(lam0), 1 / np.sqrt(lam0)
        Cp[1:, :d] = Rp
        out[l] = (C, Cp, np.concatenate([[lam0], lam]))
        C_next = C
    return out


def _align_signs(C, C_ref):
    """Flips columns of C to match C_ref (eigenvectors are defined up to sign)."""
    s = np.sign(np.sum(np.asarray(C) * C_ref, axis=0))
    return np.asarray(C) * s[None, :]


def _hat(h, C):
    return np.concatenate([h, np.ones((h.shape[0], 1))], axis=1) @ C


MODEL = _mlp_sections(3)  # one Sections object shared by both test files, so compiled steps are reused


def mlp_setup():
    p = _mlp_params(RELU_MLP)
    x = np.random.default_rng(1).normal(size=(300, RELU_MLP[0])) + 0.5
    return MODEL, {k: jnp.asarray(v) for k, v in p.items()}, p, x


@pytest.fixture(scope="module")
def mlp():
    return mlp_setup()


@pytest.mark.parametrize("kind", ["lib", "global", "pca"])
def test_basis_matches_numpy_reference(mlp, kind):
    model, params, p, x = mlp
    b = dj.interaction_basis(model, params, [x[:150], x[150:]], kind=kind)
    _, acts, jacs = _np_mlp_forward(p, x, 3)
    ref = _np_basis(acts, jacs, kind)
    for l, (C, Cp, lam) in enumerate(ref):
        assert b.C[l].shape == C.shape and b.dims[l] == C.shape[1]
        assert_trees_all_close(b.Lambda[l], lam, rtol=1e-8, atol=1e-12)
        assert_trees_all_close(_align_signs(b.C[l], C), C, rtol=1e-6, atol=1e-9)
        assert_trees_all_close(b.mean[l], acts[l].mean(0), rtol=1e-10, atol=1e-12)
        s = np.sign(np.sum(np.asarray(b.C[l]) * C, axis=0))
        assert_trees_all_close(np.asarray(b.C_pinv[l]) * s[:, None], Cp, rtol=1e-6, atol=1e-9)
    # the full spectra and drop counts are recorded: layer 2 (6 features) -> 4 outputs keeps 4 directions
    assert int(b.num_dropped_gram[0]) == 0
    if kind != "pca":
        assert b.interaction_spectrum[2].shape == (6,) and int(b.num_dropped_interaction[2]) == 2


@pytest.mark.parametrize("kind", ["lib", "global", "pca", "random"])
def test_invariants_on_data(mlp, kind):
    model, params, p, x = mlp
    b = dj.interaction_basis(model, params, x, kind=kind, key=jax.random.key(0))
    out, acts, _ = _np_mlp_forward(p, x, 3)
    for l in range(3):
        C, Cp, lam = (np.asarray(a) for a in (b.C[l], b.C_pinv[l], b.Lambda[l]))
        np.testing.assert_allclose(Cp @ C, np.eye(C.shape[1]), atol=1e-10)
        hh = _hat(acts[l], C)
        second = hh.T @ hh / hh.shape[0]
        if kind == "random":  # a rotation of PCA: Lambda is the diagonal, the off-diagonal need not vanish
            np.testing.assert_allclose(np.diag(second), lam, rtol=1e-9)
        else:
            np.testing.assert_allclose(second, np.diag(lam), atol=1e-9 * lam.max())
        e = np.zeros(C.shape[0])
        e[-1] = 1.0
        np.testing.assert_allclose(C[:, 0], np.sqrt(lam[0]) * e, atol=1e-12)
    # transform reproduces the outputs (nothing is truncated in layers 0 and 1 for pca; lib drops only
    # directions the output does not see, so outputs still match)
    tm = dj.transform(model, b)
    hh0 = jnp.asarray(_hat(x, np.asarray(b.C[0])))
    got, hat_acts = jax.jit(dj.forward, static_argnums=0)(tm, params, hh0)
    np.testing.assert_allclose(np.asarray(got), out, rtol=1e-9, atol=1e-10)
    for l in range(1, 3):
        np.testing.assert_allclose(np.asarray(hat_acts[l]), _hat(acts[l], np.asarray(b.C[l])), rtol=1e-8,
                                   atol=1e-9)


def test_rotation_of_hidden_layer_leaves_lambda_and_edges(mlp):
    # h_1 -> h_1 Q with W_1 -> Q^T W_1 is the same function; LIB must not notice (PCA-like bases also would not,
    # but the raw-neuron edges would). Compare Lambda and edges.
    model, params, p, x = mlp
    Q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(7, 7)))
    rot = [lambda p_, h: jax.nn.relu(h @ p_["W0"] + p_["b0"][None, :]) @ p_["Q"],
           lambda p_, h: jax.nn.relu(h @ p_["Q"].T @ p_["W1"] + p_["b1"][None, :]),
           lambda p_, h: h @ p_["W2"] + p_["b2"][None, :]]
    params_r = dict(params, Q=jnp.asarray(Q))
    b1 = dj.interaction_basis(model, params, x)
    b2 = dj.interaction_basis(rot, params_r, x)
    for l in range(3):
        assert_trees_all_close(b2.Lambda[l], np.asarray(b1.Lambda[l]), rtol=1e-8, atol=1e-12)
    e1 = dj.interaction_edges(model, params, b1, x)
    e2 = dj.interaction_edges(rot, params_r, b2, x)
    for a, c in zip(e2, e1):
        assert_trees_all_close(a, np.asarray(c), rtol=1e-6, atol=1e-10 * float(np.max(c)))


def _pos_model(P=3, d0=4, d1=5, d2=3, seed=0):
    rng = np.random.default_rng(seed)
    p = {"A": np.tril(rng.uniform(0.2, 1.0, (P, P))), "W0": rng.normal(size=(d0, d1)) / 2,
         "W1": rng.normal(size=(P, d1, d2)) / 2}

    def f0(q, h):  # (B, P, d0) -> (B, P, d1), mixing positions causally
        return jnp.tanh(jnp.einsum("ts,bsd,da->bta", q["A"], h, q["W0"]))

    def f1(q, h):  # (B, P, d1) -> (B, d2), position-dependent read-out
        return jnp.einsum("bsa,sai->bi", h, q["W1"])

    def np_jacobians(x):  # per-example J[(t,i),(s,b)] of each section, as (N, P_out, d_out, P_in, d_in)
        o = np.tanh(np.einsum("ts,nsd,da->nta", p["A"], x, p["W0"]))
        J0 = np.einsum("nta,ts,ba->ntasb", 1 - o**2, p["A"], p["W0"])
        J1 = np.broadcast_to(np.einsum("sai->isa", p["W1"])[None, None], (x.shape[0], 1) + (d2, P, d1))
        return [x, o], [J0, J1]

    return dj.Sections((f0, f1)), {k: jnp.asarray(v) for k, v in p.items()}, np_jacobians


def _np_positions_lib(acts, jacs):
    """LIB with positions: expectations over data and positions, J summed as in DESIGN section 2."""
    out, C_next = [None, None], None
    for l in (1, 0):
        h = acts[l]
        n, P, d = h.shape
        hf = h.reshape(-1, d)
        mu = hf.mean(0)
        cov = (hf - mu).T @ (hf - mu) / (n * P)
        D, U = np.linalg.eigh(cov)
        D, U = D[::-1], U[:, ::-1]
        J = jacs[l] if C_next is None else np.einsum("ntasb,ak->ntksb", jacs[l], C_next[:-1])
        M = np.einsum("ntksb,ntksc->bc", J, J) / (n * P)
        S = U * np.sqrt(D)[None, :]
        Lam, V = np.linalg.eigh(S.T @ M @ S)
        Lam, V = Lam[::-1], V[:, ::-1]
        m = int(np.sum(Lam > (d + 1) * np.finfo(float).eps * Lam[0]))
        R = U / np.sqrt(D)[None, :] @ V[:, :m] * np.sqrt(Lam[:m])[None, :]
        C = np.zeros((d + 1, m + 1))
        C[d, 0] = np.sqrt(mu @ M @ mu)
        C[:d, 1:], C[d, 1:] = R, -mu @ R
        out[l] = (C, np.concatenate([[mu @ M @ mu], Lam[:m]]))
        C_next = C
    return out


def test_positions_axis_basis_and_edges():
    model, params, np_jac = _pos_model()
    x = np.random.default_rng(3).normal(size=(64, 3, 4)) + 0.2
    acts, jacs = np_jac(x)
    ref = _np_positions_lib(acts, jacs)
    b = dj.interaction_basis(model, params, [x[:32], x[32:]])
    for l in range(2):
        assert_trees_all_close(b.Lambda[l], ref[l][1], rtol=1e-8)
        assert_trees_all_close(_align_signs(b.C[l], ref[l][0]), ref[l][0], rtol=1e-6, atol=1e-9)
    # edges: (1/(N P_0)) sum_x sum_t (sum_s Jhat_{(t,i),(s,j)} h^_{s,j})^2
    C0, C1, Cp0 = (np.asarray(a) for a in (b.C[0], b.C[1], b.C_pinv[0]))
    hh = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=-1) @ C0
    Jhat = np.einsum("ntasb,ai,jb->ntisj", jacs[0], C1[:-1], Cp0[:, :-1])
    ref_e = np.einsum("ntij->ij", np.einsum("ntisj,nsj->ntij", Jhat, hh) ** 2) / (x.shape[0] * x.shape[1])
    for mode in ("jvp", "vjp"):
        e = dj.interaction_edges(model, params, b, [x[:32], x[32:]], mode=mode, chunk_size=3)
        assert len(e) == 1
        assert_trees_all_close(e[0], ref_e, rtol=1e-8, atol=1e-14)


def test_jit_and_static_dims(mlp):
    model, params, _, x = mlp
    eager = dj.interaction_basis(model, params, x)
    dims = tuple(d - 1 for d in eager.dims)
    jitted = jax.jit(lambda q, xx: dj.interaction_basis(model, q, xx, dims=dims))(params, x)
    for l in range(3):
        assert_trees_all_close(jitted.Lambda[l], np.asarray(eager.Lambda[l]), rtol=1e-8, atol=1e-13)
        assert_trees_all_close(_align_signs(jitted.C[l], np.asarray(eager.C[l])), np.asarray(eager.C[l]),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="static dims"):
        jax.jit(lambda q: dj.interaction_basis(model, q, x).Lambda)(params)
    # transform under jit and vmap over examples equals the batched call
    tm = dj.transform(model, eager)
    hh = jnp.asarray(_hat(x, np.asarray(eager.C[0])))
    batched = dj.forward(tm, params, hh)[0]
    per_ex = jax.jit(jax.vmap(lambda r: dj.forward(tm, params, r[None])[0][0]))(hh)
    assert_trees_all_close(per_ex, np.asarray(batched), rtol=1e-12, atol=1e-12)


def test_bad_inputs(mlp):
    model, params, _, x = mlp
    with pytest.raises(ValueError, match="kind"):
        dj.interaction_basis(model, params, x, kind="ica")
    with pytest.raises(ValueError, match="key"):
        dj.interaction_basis(model, params, x, kind="random")
    bad = dict(params, W1=params["W1"].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="W1"):
        dj.interaction_basis(model, bad, x)
    dead = dict(params, W0=jnp.zeros_like(params["W0"]))  # layer 1 = relu(b0): constant
    with pytest.raises(ValueError, match="node layer 1.*rank 0"):
        dj.interaction_basis(model, dead, x)
    b = dj.interaction_basis(model, params, x, kind="pca")
    other = _mlp_sections(3)
    other_params = {k: jnp.asarray(v) for k, v in _mlp_params((5, 9, 6, 4)).items()}
    with pytest.raises(ValueError, match="node layer 1.*another model"):
        dj.interaction_edges(other, other_params, b, x)
    with pytest.raises(ValueError, match="3 node layers"):
        dj.transform(dj.Sections(model.fns[:2]), b)
    with pytest.raises(ValueError, match="expects"):
        dj.forward(dj.transform(model, b), params, jnp.ones((2, 3)))


def test_layer_basis_is_a_named_tuple_with_closed_form_pca():
    """PCA of cov = diag(3, 2, 0): the zero direction is dropped, Lambda = (1, 3, 2) (constant first)."""
    lb = dj.layer_basis(np.diag([3.0, 2.0, 0.0]), np.zeros(3), None, kind="pca")
    assert isinstance(lb, dj.LayerBasis) and len(lb) == 7
    C, C_pinv, *_ = lb  # still unpacks like the former 7-tuple
    np.testing.assert_allclose(np.asarray(lb.Lambda), [1.0, 3.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(lb.gram_spectrum), [3.0, 2.0, 0.0], atol=1e-12)
    assert int(lb.num_dropped_gram) == 1 and C.shape == (4, 3) and C_pinv.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(C_pinv @ C), np.eye(3), atol=1e-12)
