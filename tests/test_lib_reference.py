"""The one-call LIB path against a float64 NumPy implementation of the LIB paper's formulas (arXiv 2405.10928).

The model is a small folded transformer (biases tied to the constant input coordinate, ApolloResearch rib's way:
b_O carried by the attention-weighted constant) with attention, an MLP block and a last-position read-out, three
positions. The reference is written from the maths, independently of degenjax: a NumPy forward, exact Jacobians by
the complex step (``Im f(x + i eps) / eps``), and the basis by the steps ``C = Y U D^{-1/2} V Lambda^{1/2}`` with
``Lambda_0 = M~_00``, the next layer's full ``C`` as the Jacobian's target, and edges (gradient x activation, summed
over input positions, squared, summed over output positions), including the last node layer -> raw output edges.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from conftest import assert_trees_all_close

N, T, D, H, DH, DM, DOUT = 48, 3, 6, 2, 3, 10, 4  # examples, positions, d_model, heads, head dim, d_mlp, outputs


def _params(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(size=s)  # noqa: E731
    WQ, WK, WV, WO = r(D, H, DH) / 2, r(D, H, DH) / 2, r(D, H, DH) / 2, r(H, DH, D) / 2
    bQ, bK, bV, bO = r(H, DH) / 3, r(H, DH) / 3, r(H, DH) / 3, r(D) / 3
    # folded matrices: a row for the constant; V gets one more value feature carrying the constant
    WQf = np.concatenate([WQ, bQ[None]], 0)  # (D + 1, H, DH)
    WKf = np.concatenate([WK, bK[None]], 0)
    WVf = np.zeros((D + 1, H, DH + 1))
    WVf[:D, :, :DH], WVf[D, :, :DH], WVf[D, :, DH] = WV, bV, 1.0
    WOf = np.concatenate([WO, np.broadcast_to(bO / H, (H, 1, D))], 1)  # (H, DH + 1, D): b_O by the weighted constant
    Win, bin_, Wout, bout = r(D, DM) / 2, r(DM) / 3, r(DM, D) / 3, r(D) / 3
    Winf = np.concatenate([Win, bin_[None]], 0)  # (D + 1, DM)
    WU, bU = r(D, DOUT) / 2, r(DOUT) / 3
    WUf = np.concatenate([WU, bU[None]], 0)
    return {"WQ": WQf, "WK": WKf, "WV": WVf, "WO": WOf, "Win": Winf, "Wout": Wout, "bout": bout, "WU": WUf}


# -- the model as degenjax sections (JAX) ---------------------------------------------------------------------------


def _attn(p, f):
    q = jnp.einsum("btd,dhe->bthe", f, p["WQ"])
    k = jnp.einsum("btd,dhe->bthe", f, p["WK"])
    v = jnp.einsum("btd,dhe->bthe", f, p["WV"])
    s = jnp.einsum("bthe,bshe->bhts", q, k) / np.sqrt(DH)
    s = jnp.where(np.tril(np.ones((T, T), bool))[None, None], s, -1e30)
    z = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, axis=-1), v)
    out = f[..., :D] + jnp.einsum("bthe,heo->bto", z, p["WO"])
    return jnp.concatenate([out, f[..., D:]], axis=-1)


def _mlp(p, f):
    a = jax.nn.relu(f @ p["Win"])
    out = f[..., :D] + a @ p["Wout"] + f[..., D:] * p["bout"][None, None, :]
    return jnp.concatenate([out, f[..., D:]], axis=-1)


def _unembed(p, f):
    return f[:, -1, :] @ p["WU"]


MODEL = dj.Sections((_attn, _mlp, _unembed), constant="last")


# -- the same model in NumPy (complex-safe: the complex step needs analytic operations) --------------------------


def _np_sections(p):
    def attn(f):
        q = np.einsum("btd,dhe->bthe", f, p["WQ"])
        k = np.einsum("btd,dhe->bthe", f, p["WK"])
        v = np.einsum("btd,dhe->bthe", f, p["WV"])
        s = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(DH)
        mask = np.tril(np.ones((T, T)))[None, None]
        e = np.exp(s - np.max(s.real, axis=-1, keepdims=True)) * mask
        a = e / np.sum(e, axis=-1, keepdims=True)
        z = np.einsum("bhts,bshe->bthe", a, v)
        out = f[..., :D] + np.einsum("bthe,heo->bto", z, p["WO"])
        return np.concatenate([out, f[..., D:]], axis=-1)

    def mlp(f):
        pre = f @ p["Win"]
        a = np.where(pre.real > 0, pre, 0.0)
        out = f[..., :D] + a @ p["Wout"] + f[..., D:] * p["bout"][None, None, :]
        return np.concatenate([out, f[..., D:]], axis=-1)

    def unembed(f):
        return f[:, -1, :] @ p["WU"]

    return [attn, mlp, unembed]


def _complex_step_jacobian(g, f):
    """``J[n, (outputs), s, a] = d g(f)[n, outputs] / d f[n, s, a]``, exact to rounding (complex step)."""
    eps = 1e-30
    cols = []
    for s in range(f.shape[1]):
        for a in range(f.shape[2]):
            fc = f.astype(complex)
            fc[:, s, a] += 1j * eps
            cols.append(np.imag(g(fc)) / eps)
    J = np.stack(cols, axis=-1)  # (n, outputs..., T * d)
    return J.reshape(J.shape[:-1] + (f.shape[1], f.shape[2]))


def _np_lib(fs, x):
    """The LIB of every node layer and the edges, from the formulas (module docstring)."""
    acts = [x]
    for g in fs[:-1]:
        acts.append(np.real(g(acts[-1])))
    jac = [_complex_step_jacobian(g, a) for g, a in zip(fs, acts)]
    jac[-1] = jac[-1][:, None]  # the read-out has no positions axis: one output position
    L = len(fs)
    C, Cp, lam = [None] * L, [None] * L, [None] * L
    for l in reversed(range(L)):
        f = acts[l].reshape(-1, D + 1)  # folded rows; the last feature is the constant
        P = acts[l].shape[1]
        d = f.shape[1] - 1
        mu = f[:, :d].mean(0)
        Y = np.eye(d + 1)
        Y[d, :d] = -mu  # f Y = (h - mu, 1)
        fy = f @ Y
        G = fy.T @ fy / f.shape[0]  # = blockdiag(Cov, 1)
        Dc, Uc = np.linalg.eigh(G[:d, :d])
        Dc, Uc = Dc[::-1], Uc[:, ::-1]
        keep = Dc > (d + 1) * np.finfo(float).eps * Dc[0]
        Dc, Uc = Dc[keep], Uc[:, keep]
        U = np.zeros((d + 1, 1 + Dc.size))  # the constant direction first
        U[d, 0] = 1.0
        U[:d, 1:] = Uc
        Dt = np.concatenate([[1.0], Dc])
        R = Y @ U / np.sqrt(Dt)[None, :]
        Rp = (np.sqrt(Dt)[:, None] * U.T) @ np.linalg.inv(Y)
        J = jac[l]  # (n, T_out, d_out, T_in, d + 1)
        target = np.eye(J.shape[2]) if l == L - 1 else C[l + 1]  # the next layer's full C (constant row included)
        Jt = np.einsum("ntosa,ok->ntksa", J, target)
        M = np.einsum("ntksa,ntksb->ab", Jt, Jt) / (J.shape[0] * P)
        Mt = Rp @ M @ Rp.T
        lam_rest, V_sub = np.linalg.eigh(Mt[1:, 1:])
        lam_rest, V_sub = lam_rest[::-1], V_sub[:, ::-1]
        m = int(np.sum(lam_rest > (d + 1) * np.finfo(float).eps * lam_rest[0]))
        V = np.zeros((Mt.shape[0], m + 1))
        V[0, 0] = 1.0
        V[1:, 1:] = V_sub[:, :m]
        Lam = np.concatenate([[Mt[0, 0]], lam_rest[:m]])
        C[l] = R @ V * np.sqrt(Lam)[None, :]
        Cp[l] = (V.T / np.sqrt(Lam)[:, None]) @ Rp
        lam[l] = Lam
    edges = []
    for l in range(L):
        hh = acts[l] @ C[l]  # (n, P, d^_l)
        J = jac[l]
        target = np.eye(J.shape[2]) if l == L - 1 else C[l + 1]
        Jh = np.einsum("ja,ntosa,oi->ntisj", Cp[l], J, target)  # d h^_{l+1,(t,i)} / d h^_{l,(s,j)}
        e = np.einsum("ntisj,nsj->ntij", Jh, hh)
        edges.append(np.einsum("ntij,ntij->ij", e, e) / (x.shape[0] * acts[l].shape[1]))
    return acts, C, lam, edges


@pytest.fixture(scope="module")
def reference():
    p = _params()
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(N, T, D)) + 0.3, np.ones((N, T, 1))], axis=-1)
    return p, x, _np_lib(_np_sections(p), x)


def test_lib_and_edges_match_numpy_reference(reference):
    p, x, (acts, C_ref, lam_ref, edges_ref) = reference
    params = jax.tree.map(jnp.asarray, p)
    assert dj.structured_sections(MODEL, params, jnp.asarray(x)) == (True, True, True)  # attention included
    batches = [jnp.asarray(x[:32]), jnp.asarray(x[32:])]
    b = dj.interaction_basis(MODEL, params, batches)
    e = dj.interaction_edges(MODEL, params, b, batches, output=True)
    for l in range(3):
        assert b.dims[l] == C_ref[l].shape[1]
        assert_trees_all_close(b.Lambda[l], lam_ref[l], rtol=1e-9)
        fc, fc_ref = np.asarray(acts[l] @ np.asarray(b.C[l])), acts[l] @ C_ref[l]
        sign = np.sign(np.sum(fc * fc_ref, axis=(0, 1)))  # eigenvectors are defined up to sign
        np.testing.assert_allclose(fc * sign, fc_ref, rtol=1e-9, atol=1e-9 * np.abs(fc_ref).max())
        assert e[l].shape == edges_ref[l].shape
        np.testing.assert_allclose(np.asarray(e[l]), edges_ref[l], rtol=1e-9, atol=1e-9 * edges_ref[l].max())
    # the constant node has edges: the next constant is the current one, so E[0, 0] = Lambda_0 of the next layer
    for l in range(2):
        np.testing.assert_allclose(float(e[l][0, 0]), lam_ref[l + 1][0], rtol=1e-9)
    # teacher-forced with the reference's bases as targets, reusing the activation statistics (stats=)
    forced = dj.InteractionBasis.from_matrices(C_ref)
    b2 = dj.interaction_basis(MODEL, params, batches, targets=forced, stats=b)
    for l in range(3):
        assert_trees_all_close(b2.Lambda[l], lam_ref[l], rtol=1e-9)
