import time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import warnings; warnings.simplefilter("ignore")
from degenjax._src.llc import estimate_llc

def dln(widths, rank, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, widths[0]))
    A = rng.normal(size=(widths[0], rank)); B = rng.normal(size=(rank, widths[-1]))
    Y = X @ A @ B
    Ws = []
    L = len(widths) - 1
    U, s, Vt = np.linalg.svd(A @ B)
    # product of L factors: first gets U sqrt-ish, middle identity-on-rank, last gets S Vt
    for l in range(L):
        W = np.zeros((widths[l], widths[l+1]))
        if l == 0: W[:, :rank] = U[:, :rank] * s[:rank] ** (1/L)
        elif l == L-1: W[:rank] = (s[:rank] ** (1/L))[:, None] * Vt[:rank]
        else: W[:rank, :rank] = np.diag(s[:rank] ** (1/L))
        Ws.append(jnp.asarray(W))
    prod = Ws[0]
    for W in Ws[1:]: prod = prod @ W
    assert np.allclose(prod, A @ B)
    return (jnp.asarray(X), jnp.asarray(Y)), tuple(Ws)

def loss(ws, b):
    x, y = b
    h = x
    for w in ws: h = h @ w
    return jnp.mean(jnp.sum((h - y) ** 2, axis=1))

def linreg(d, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)); y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return (jnp.asarray(X), jnp.asarray(y)), jnp.asarray(np.linalg.lstsq(X, y, rcond=None)[0])
def lrloss(w, b):
    x, y = b
    return jnp.mean((x @ w - y) ** 2)

runs = []
for (w, r, true) in [((4,4,4), 2, 7.5), ((5,3,4), 1, 7.0), ((3,3,3,3), 1, 4.0)]:
    for n in [10000, 2000]:
        for eps, g in [(3e-5, 10.0), (1e-5, 10.0), (3e-5, 3.0)]:
            for ch, dr in [(4, 3000), (4, 8000)]:
                runs.append((w, r, true, n, eps, g, ch, dr, dln(w, r, n), loss))
for d in [4]:
    for n in [2000, 10000]:
        for eps in [1e-4, 3e-4]:
            for ch, dr in [(4, 2000), (4, 5000)]:
                runs.append(("lin", d, d/2, n, eps, 1.0, ch, dr, linreg(d, n), lrloss))
for (w, r, true, n, eps, g, ch, dr, (data, params), lf) in runs:
    t = time.time()
    try:
        res = estimate_llc(jax.random.key(0), lf, params, data, num_chains=ch, num_draws=dr, step_size=eps,
                           batch_size=100, localization=g, num_burnin=500, mala_every=10)
    except Exception as e:
        print(w, n, eps, g, 'ERR', str(e)[:80]); continue
    pc = np.asarray(res.llc_per_chain)
    se = pc.std(ddof=1) / np.sqrt(ch)
    tr = np.asarray(res.loss_trace); ess = float(res.ess)
    se2 = float(res.nbeta) * tr.std() / np.sqrt(ess)
    print(w, r, true, n, eps, g, ch, dr, f"llc={float(res.llc_mean):.3f} se={se:.3f} se_ess={se2:.3f} rel={float(res.llc_mean)/true-1:+.3f} mala={float(res.mala_acceptance):.3f} ess={ess:.0f} t={time.time()-t:.1f}", flush=True)
