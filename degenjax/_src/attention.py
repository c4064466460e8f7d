"""Exact Jacobian Grams and interaction edges of softmax-attention sections from their structure.

A section recognised by `degenjax._src.structure.attention_structure` has, per example, the Jacobian (row
convention, ``dout_t = sum_s dh_s J_ts``)

    J_ts = d_ts A0 + sum_h [ P_ts WV + d_ts WQ K_t + (WK q_t) g_ts^T ] WO,

with per head ``g_ts = sum_r G_t[r, s] v_r`` and ``K_t = sum_u k_u g_tu^T`` (structure.py). With a target basis
``B`` and ``Om = WO B``, ``Y_ts = Om^T g_ts`` (per head), every term of ``J_ts B`` is a fixed matrix (``A0 B``,
``WV``, ``WQ``, ``WK``) times a small coefficient, so the Gram ``M = sum_{x,t,s} (J_ts B)(J_ts B)^T`` is
``Lam Core Lam^T`` with ``Lam = [WV | WQ | WK]`` plus the ``A0 B`` terms; ``Core`` is accumulated from
per-example tensors of size ``H T^2 k`` (never a ``(T d_out) x (T d_in)`` Jacobian per example). The edges
``E_ij = sum_{x,t} (sum_s (C^+ J_ts C')_{ji} h^_sj)^2`` use the same pieces with ``C^+`` on the left. Both are the
same maths as the per-example path (tests/test_lib_reference.py checks them against a float64 NumPy reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from degenjax._src.numerics import HIGHEST
from degenjax._src.structure import AttentionStructure

_CHUNK_ELEMENTS = 1 << 22  # elements of the largest per-chunk intermediate
_FORCE_YY = None  # tests: force one of the two equivalent orderings of the query-key terms


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST)


def _diag_ts(a, t_axis: int, s_axis: int):
    """The ``t = s`` diagonal of ``a`` along two axes, placed at ``t_axis`` (the ``s`` axis removed)."""
    d = jnp.diagonal(a, axis1=t_axis, axis2=s_axis)  # diagonal axis last
    return jnp.moveaxis(d, -1, t_axis)


def _chunks(n: int, per_example: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, per_example)))


def _scan_chunks(fn, arrays, n: int, c: int, zero):
    """``sum over chunks of fn(*chunk)``: equal chunks of about ``c`` examples (the last padded with zeros, which add
    nothing to any sum here), one compiled body under ``lax.scan`` (no scan for a single chunk)."""
    m = -(-n // c)
    c = -(-n // m)
    pad = m * c - n
    if pad:
        arrays = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in arrays)
    if m == 1:
        return jax.tree.map(jnp.add, zero, fn(*arrays))
    xs = tuple(jnp.reshape(a, (m, c) + a.shape[1:]) for a in arrays)
    total, _ = jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, fn(*x)), None), zero, xs)
    return total


def attention_jtj(att: AttentionStructure, out_basis, accum_dtype):
    """``sum_{x,t,s} (J_ts B)(J_ts B)^T`` (shape ``(d, d)``) for one batch of an attention section."""
    dt = accum_dtype
    cdt = att.q.dtype
    B = None if out_basis is None else out_basis.astype(cdt)
    WO = att.WO.astype(cdt)
    Om = WO if B is None else _ein("heo,oi->hei", WO, B)  # (H, dv, k)
    H, dv, kk = Om.shape
    n, T = att.q.shape[:2]
    dh = att.q.shape[-1]
    A0B = None
    if att.A0 is not None:
        A0B = att.A0.astype(cdt) if B is None else jnp.matmul(att.A0.astype(cdt), B, precision=HIGHEST)
    use_yy = _FORCE_YY if _FORCE_YY is not None else H * T ** 3 * kk <= T * (H * dh) ** 2 * kk // 4  # cheaper to form all products Y.Y for short T

    def chunk(q, k, v, P, G):
        g = _ein("nhtrs,nrhe->nhtse", G, v)  # (n, H, T, T, dv)
        Y = _ein("nhtse,hei->nhtsi", g, Om)  # (n, H, T, T, k)
        Ptt = _diag_ts(P, 2, 3)  # (n, H, T)
        Ytt = _diag_ts(Y, 2, 3)  # (n, H, T, k)
        out = {
            "sP": jnp.sum(Ptt, axis=(0, 2)),
            "PP": _ein("nhts,ngts->hg", P, P),
            "OQ": _ein("nhtui,nuha->iha", Y, k),
            "OK": _ein("nhti,ntha->iha", Ytt, q),
            # two steps each, in this order: the weights first (a contraction over 3 positions), then one GEMM per
            # head over (examples x positions); einsum's own path for the three operands is several times slower
            "VQ": _ein("nhgui,nugb->higb", _ein("nht,ngtui->nhgui", Ptt, Y), k),
            "VK": _ein("nhgti,ntgb->higb", _ein("nhts,ngtsi->nhgti", P, Y), q),
        }
        if use_yy:
            YY = _ein("nhtui,ngtwi->nhtugw", Y, Y)  # (n, H, T, T, H, T)
            out["QQ"] = _ein("nuha,nhtugw,nwgb->hagb", k, YY, k)
            YYt = jnp.diagonal(YY, axis1=2, axis2=5)  # (n, H, T(u), H, T(t)): u free, w = t
            out["QK"] = _ein("nuha,nhugt,ntgb->hagb", k, YYt, q)
            YYs = jnp.diagonal(YY, axis1=3, axis2=5)  # (n, H, T(t), H, T(s)): u = w = s
            out["KK"] = _ein("ntha,nhtgs,ntgb->hagb", q, YYs, q)
        else:
            KY = _ein("nuha,nhtui->nthai", k, Y)  # (n, T, H, dh, k): the query coefficients
            out["QQ"] = _ein("nthai,ntgbi->hagb", KY, KY)
            out["QK"] = _ein("nthai,ngti,ntgb->hagb", KY, Ytt, q)
            YYd = _ein("nhtsi,ngtsi->nthg", Y, Y)
            out["KK"] = _ein("ntha,nthg,ntgb->hagb", q, YYd, q)
        return jax.tree.map(lambda a: a.astype(dt), out)

    per_ex = H * T * T * (T + dv + kk) + (H * T * H * T * T if use_yy else T * H * dh * kk)
    c = _chunks(n, per_ex)
    zero = {"sP": jnp.zeros((H,), dt), "PP": jnp.zeros((H, H), dt), "OQ": jnp.zeros((kk, H, dh), dt),
            "OK": jnp.zeros((kk, H, dh), dt), "VQ": jnp.zeros((H, kk, H, dh), dt),
            "VK": jnp.zeros((H, kk, H, dh), dt), "QQ": jnp.zeros((H, dh, H, dh), dt),
            "QK": jnp.zeros((H, dh, H, dh), dt), "KK": jnp.zeros((H, dh, H, dh), dt)}
    acc = _scan_chunks(chunk, (att.q, att.k, att.v, att.P, att.G), n, c, zero)

    Om_ = Om.astype(dt)
    OmOm = _ein("hei,gfi->hegf", Om_, Om_)
    C_VV = OmOm * acc["PP"][:, None, :, None]
    C_VQ = _ein("hei,higb->hegb", Om_, acc["VQ"])
    C_VK = _ein("hei,higb->hegb", Om_, acc["VK"])
    HV, HD = H * dv, H * dh
    core = jnp.block([
        [jnp.reshape(C_VV, (HV, HV)), jnp.reshape(C_VQ, (HV, HD)), jnp.reshape(C_VK, (HV, HD))],
        [jnp.reshape(C_VQ, (HV, HD)).T, jnp.reshape(acc["QQ"], (HD, HD)), jnp.reshape(acc["QK"], (HD, HD))],
        [jnp.reshape(C_VK, (HV, HD)).T, jnp.reshape(acc["QK"], (HD, HD)).T, jnp.reshape(acc["KK"], (HD, HD))],
    ])
    d = att.WQ.shape[0]
    Lam = jnp.concatenate([jnp.reshape(att.WV.astype(dt), (d, HV)), jnp.reshape(att.WQ.astype(dt), (d, HD)),
                           jnp.reshape(att.WK.astype(dt), (d, HD))], axis=1)
    M = jnp.matmul(jnp.matmul(Lam, core, precision=HIGHEST), Lam.T, precision=HIGHEST)
    if A0B is not None:
        A0B_ = A0B.astype(dt)
        X0 = jnp.concatenate([
            jnp.reshape(_ein("di,hei->dhe", A0B_, Om_) * acc["sP"][None, :, None], (d, HV)),
            jnp.reshape(_ein("di,iha->dha", A0B_, acc["OQ"]), (d, HD)),
            jnp.reshape(_ein("di,iha->dha", A0B_, acc["OK"]), (d, HD))], axis=1)
        cross = jnp.matmul(X0, Lam.T, precision=HIGHEST)
        M = M + cross + cross.T + jnp.asarray(n * T, dt) * jnp.matmul(A0B_, A0B_.T, precision=HIGHEST)
    return M


def attention_edges(att: AttentionStructure, hh, Cp, C_next, accum_dtype):
    """Unnormalised edge sums ``sum_{x,t} (sum_s (C^+ J_ts C')_{ji} h^_sj)^2``, shape ``(d^_{l+1}, d^_l)``.

    Args:
      att: the section's structure on this batch.
      hh: ``(B, T, d^_l)`` basis coordinates of the node layer.
      Cp: ``C^{l+}`` (its first ``d`` columns, the section's input features, are used).
      C_next: the next layer's basis (its first ``d_out`` rows) or None for the raw output.
      accum_dtype: accumulation dtype.
    """
    dt = accum_dtype
    cdt = att.q.dtype
    d = att.WQ.shape[0]
    d_out = att.d_out
    Cin = Cp[:, :d].astype(cdt)  # (d^_l, d)
    Bn = jnp.eye(d_out, dtype=cdt) if C_next is None else C_next[:d_out].astype(cdt)
    Om = _ein("heo,oi->hei", att.WO.astype(cdt), Bn)  # (H, dv, d^')
    aV = _ein("jd,dhe->jhe", Cin, att.WV.astype(cdt))
    aQ = _ein("jd,dha->jha", Cin, att.WQ.astype(cdt))
    aK = _ein("jd,dha->jha", Cin, att.WK.astype(cdt))
    A0p = None if att.A0 is None else jnp.matmul(jnp.matmul(Cin, att.A0.astype(cdt), precision=HIGHEST), Bn,
                                                  precision=HIGHEST)
    H, dv, dn = Om.shape
    n, T, dj = hh.shape

    AVO_all = _ein("jhe,hei->hji", aV, Om)  # (H, d^_l, d^'): the value path's coefficient per head
    if A0p is not None:
        AVO_all = jnp.concatenate([AVO_all, A0p[None]], axis=0)
    Hw = AVO_all.shape[0]

    # U = U1 + V per example and position, with U1 = c Y (query and key paths) and V_ji = sum_h w_hj AVO_hji (values
    # and pass-through). sum (U1 + V)^2 = sum U1^2 + 2 sum_h AVO_h o Z_h + sum_hg AVO_h o AVO_g o W2_hg, with
    # Z_h = sum_{x,t} w_h U1 and W2_hg = sum_{x,t} w_h w_g (per j): no (x, t, j, h, i) product is formed, and Z is a
    # GEMM over the long (x, t) axis. Every term is a sum of products of the same float64 numbers; the three parts
    # can cancel only where an edge is far below the others of its row (relative error ~ eps x the parts / E_ji).
    def chunk(q, k, v, P, G, h):
        h = h.astype(cdt)
        g = _ein("nhtrs,nrhe->nhtse", G, v)  # (n, H, T, T, dv)
        Y = _ein("nhtse,hei->nhtsi", g, Om)  # (n, H, T, T, d^'): the key-weight derivatives projected to the target
        w = _ein("nhts,nsj->nhtj", P, h)  # attention-weighted input coordinates
        aQk = _ein("jha,nuha->nhju", aQ, k)  # (n, H, d^_l, T)
        aKq = _ein("jha,ntha->nhtj", aK, q)  # (n, H, T, d^_l)
        # query and key paths together: coefficients c[n, t, j, (h, u)] on Y[n, (h, u), t, :], one small GEMM per
        # (example, position); no (n, H, T, d^_l, dv) tensor
        c = h[:, :, :, None, None] * jnp.transpose(aQk, (0, 2, 1, 3))[:, None] + (
            jnp.transpose(aKq, (0, 2, 3, 1))[..., None] * jnp.transpose(h, (0, 2, 1))[:, None, :, None, :])
        if A0p is not None:  # the pass-through as one more "head" with weights h and coefficient A0'
            w = jnp.concatenate([w, h[:, None]], axis=1)
        U1 = _ein("ntjhu,nhtui->ntji", c, Y)
        return {"UU": _ein("ntji,ntji->ji", U1, U1).astype(dt), "Z": _ein("nhtj,ntji->hji", w, U1).astype(dt),
                "W2": _ein("nhtj,ngtj->jhg", w, w).astype(dt)}

    c = _chunks(n, H * T * T * (dv + dn) + T * dj * (H * T + 2 * dn))
    zero = {"UU": jnp.zeros((dj, dn), dt), "Z": jnp.zeros((Hw, dj, dn), dt), "W2": jnp.zeros((dj, Hw, Hw), dt)}
    acc = _scan_chunks(chunk, (att.q, att.k, att.v, att.P, att.G, hh), n, c, zero)
    AVO = AVO_all.astype(dt)
    E = (acc["UU"] + 2.0 * jnp.sum(AVO * acc["Z"], axis=0)
         + _ein("hji,gji,jhg->ji", AVO, AVO, acc["W2"]))
    return jnp.maximum(E, 0.0).T  # a sum of squares: rounding of the three parts may not make it negative
