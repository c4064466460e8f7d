"""Recognising sections with exact, cheap Jacobians from their jaxpr: affine-elementwise sections and attention.

**Affine-elementwise sections** ``f(h) = post(h_s @ W) [@ V] [+ h_s @ A0] + c``, ``post`` elementwise and ``h_s`` the
rows of ``h`` (all positions, or selected ones, e.g. a read-out at the last position): dense layers followed by an
elementwise activation (any bias, scale or pointwise nonlinearity, per unit or per example), optionally an output
projection ``V`` and a linear pass-through ``A0`` (a residual connection, or a folded constant carried to the next
node layer). These are the bulk of MLPs and transformers outside attention. Per row the Jacobian factorises,
``J = A0 + W diag(s) V`` with ``s = post'(z)``, ``z = h_s @ W``, so

- the Jacobian Gram to target coordinates ``f(h) @ B`` is ``W [(Q Q^T) o E(s s^T)] W^T`` plus cross terms with
  ``P = A0 B`` (``Q = V B``): one ``(d_k, d_k)`` Gram of ``s`` over the data instead of a Jacobian per example;
- the gradient-times-activation edges (arXiv 2405.10928, section 2) are ``E_ij = E[ h^_j^2 (A0' + A diag(s) B')_ji^2 ]``
  with ``A = C^+ W``, ``B' = V C'`` and ``A0' = C^+ A0 C'``: one large matrix product per chunk of rows.

How it is read: the section's jaxpr is interpreted abstractly. Values affine in the rows of ``h`` ("L") carry their
matrix ``A`` (``value = h_s @ A + const``) through feature-axis operations: products with constant matrices, slices,
reshapes, transposes and broadcasts of feature axes, concatenation, sums, scaling by row-independent constants, and
additions; ``h`` may first be cast, sliced or squeezed along position axes (never features). An elementwise
nonlinearity of one such value ``z`` starts the elementwise part; after it may come one product with a constant
matrix, then additions of affine values and constants and concatenation with them along features. Folded sections
(bias-as-input, the constant last: ``(h, c) -> (h + relu(h W + c b) V + c b', c)``) are of this form. Anything else
(reductions over features, several nonlinear products of ``h``) takes the general ``vmap``-of-``vjp``/``jvp`` path,
except softmax attention below.

**Softmax attention** (`attention_structure`): ``out_t = h_t A0 + sum_heads sum_s P_ts v_s W_O + c`` with
``q = h W_Q``, ``k = h W_K``, ``v = h W_V`` (affine, per head), ``P_t. = g(q_t . k_.)`` a row-wise map of the
scores over key positions (softmax with scale and masks), and the weighted values projected back by ``W_O``. Its
exact Jacobian per pair of positions is ``J_ts = d_ts A0 + sum_h [P_ts W_V + d_ts W_Q K_t + (W_K q_t) g_ts^T] W_O``
with ``K_t = sum_{r, r'} k_{r'} G_t[r, r'] v_r^T`` and ``g_ts = sum_r G_t[r, s] v_r``, ``G_t`` the Jacobian of
the row map (for softmax ``G_t[r, r'] = P_tr (d_rr' - P_tr')``).

Code: this module holds the factorisations and the public functions; the jaxpr walk is in structure_jaxpr.py, the
interpreter of affine values and the elementwise part in structure_reader.py, its attention part in
structure_attention.py. The Jacobian Grams and edges of the two kinds of section are computed from these
factorisations in grams.py / edges.py (affine-elementwise) and attention.py (attention).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.sections import as_sections, node_input
from degenjax._src.structure_jaxpr import bind_eqn, Entry, NotStructured, run_jaxpr, sel_key
from degenjax._src.structure_reader import Reader
from degenjax._src.validation import is_traced


class AffineElementwise(NamedTuple):
    """``f(h) = post(h_s @ W) [@ V] [+ h_s @ A0] + c`` with ``post`` elementwise and ``h_s = select(h)``.

    Attributes:
      W: ``(d_in, d_k)`` matrix contracted with the last axis of ``h_s``.
      z: ``h_s @ W``, shape ``h_s.shape[:-1] + (d_k,)``.
      post: the elementwise part, ``z -> post(z)``.
      slope: ``post'(z)`` elementwise, shape of ``z`` (the diagonal of its Jacobian).
      V: None (``post(z)`` is the output, ``d_out = d_k``), or the ``(d_k, d_out)`` output projection.
      A0: None, or the ``(d_in, d_out)`` linear pass-through (a residual connection, a carried constant).
      select: the row selection ``h -> h_s`` (slices and squeezes of position axes; the identity for most
        sections), applicable to any array with ``h``'s leading axes (e.g. basis coordinates of ``h``).
    """

    W: jax.Array
    z: jax.Array
    post: Callable[[jax.Array], jax.Array]
    slope: jax.Array
    V: jax.Array | None = None
    A0: jax.Array | None = None
    select: Callable[[jax.Array], jax.Array] = lambda a: a
    linear: bool = False  # ``post`` is the identity (an affine section): ``slope`` is all ones

    @property
    def skip(self) -> bool:
        """Whether there is a linear pass-through ``A0``."""
        return self.A0 is not None

    @property
    def d_out(self) -> int:
        return self.W.shape[1] if self.V is None else self.V.shape[1]


def _read(f, params, h):
    """Runs the structure reader over the jaxpr of ``f(params, h)``: ``(reader, outputs, trace of equations)``."""
    closed = jax.make_jaxpr(f)(params, h)
    jaxpr = closed.jaxpr
    p_leaves = jax.tree.leaves(params)
    if len(jaxpr.invars) != len(p_leaves) + 1:
        raise NotStructured
    reader = Reader(h)
    ins = [Entry(a, "c") for a in p_leaves] + [Entry(h, "h", nr=h.ndim - 1)]
    trace: list = []
    outs = run_jaxpr(reader, jaxpr, list(closed.consts), ins, trace)
    return reader, outs, trace


def _split(f, params, h) -> AffineElementwise:
    reader, outs, trace = _read(f, params, h)
    if len(outs) != 1:
        raise NotStructured
    out = outs[0]
    if out.kind == "h":
        out = reader.as_L(out)
    nr = out.nr
    if nr is None or out.kind not in ("L", "Z", "Y") or out.val.ndim != nr + 1:
        raise NotStructured
    if reader.z_root is not None and sel_key(reader.z_root) != sel_key(out):
        raise NotStructured
    select = _rows(tuple(fn for _, fn in out.sel))
    if out.kind == "L":  # an affine section: post = identity
        if out.A.ndim != 2:
            raise NotStructured
        z = out.val
        return AffineElementwise(W=out.A, z=z, post=lambda a: a, slope=jnp.ones_like(z), V=None, A0=None,
                                 select=select, linear=True)
    root = reader.z_root
    if root is None or root.A is None or root.A.ndim != 2:
        raise NotStructured
    if out.kind == "Z":
        V, A0, tail = None, None, out
    else:
        V, A0, tail = out.V, out.A0, out.root
    if tail is None or tail.kind != "Z":
        raise NotStructured
    # the elementwise part, replayed from z: steps with elementwise outputs, or affine values elementwise in z
    steps = [(eqn, ins_e, outs_e) for eqn, ins_e, outs_e in trace
             if all(o.kind == "Z" for o in outs_e)
             or all(o.kind == "L" and o is not root and reader.eroot(o) is root for o in outs_e)]

    def post(zz):
        vals = {id(root): zz}
        for eqn, ins_e, outs_e in steps:
            args = [vals[id(e)] if id(e) in vals else e.val for e in ins_e]
            for e, r in zip(outs_e, bind_eqn(eqn, args)):
                vals[id(e)] = r
        return vals[id(tail)]

    z = root.val
    _, slope = jax.jvp(post, (z,), (jnp.ones_like(z),))
    return AffineElementwise(W=root.A, z=z, post=post, slope=slope, V=V, A0=A0, select=select)


class AttentionStructure(NamedTuple):
    """``out_t = h_t A0 + sum_h sum_s P^h_ts v^h_s W_O^h + const`` (module docstring), per example.

    Shapes: ``d`` input features, ``H`` heads, ``T`` positions, ``dh``/``dv`` query-key/value features per head.

    Attributes:
      WQ, WK: ``(d, H, dh)``: ``q = h WQ + const``, ``k = h WK + const``.
      WV: ``(d, H, dv)``.
      WO: ``(H, dv, d_out)``.
      A0: None or ``(d, d_out)``, the linear pass-through (residual connection, carried constant).
      q, k: ``(B, T, H, dh)``; v: ``(B, T, H, dv)`` (biases included).
      P: ``(B, H, T, T)``, the attention weights ``P[b, h, t, s]``.
      G: ``(B, H, T, T, T)``: ``G[b, h, t, r, r'] = dP[b, h, t, r] / dS[b, h, t, r']`` (the row map's Jacobian over
        the scores ``S = q . k``).
    """

    WQ: jax.Array
    WK: jax.Array
    WV: jax.Array
    WO: jax.Array
    A0: jax.Array | None
    q: jax.Array
    k: jax.Array
    v: jax.Array
    P: jax.Array
    G: jax.Array

    @property
    def d_out(self) -> int:
        return self.WO.shape[-1]


def _canon(e: Entry, heads, rest):
    """``(value (B, T, H, n), A (d, H, n))`` of an affine value with head axes ``heads`` and feature axes ``rest``."""
    B, T = e.val.shape[:2]
    vperm = (0, 1) + tuple(heads) + tuple(rest)
    H = int(np.prod([e.val.shape[a] for a in heads])) if heads else 1
    n = int(np.prod([e.val.shape[a] for a in rest]))
    val = jnp.reshape(jnp.transpose(e.val, vperm), (B, T, H, n))
    A = jnp.reshape(jnp.transpose(e.A, (0,) + tuple(a - 1 for a in heads) + tuple(a - 1 for a in rest)),
                    (e.A.shape[0], H, n))
    return val, A


def _attention_split(f, params, h) -> AttentionStructure:
    if h.ndim != 3:
        raise NotStructured
    reader, outs, trace = _read(f, params, h)
    att = getattr(reader, "att", {})
    if len(outs) != 1 or outs[0].kind != "YA" or "v" not in att or reader.z_root is not None:
        raise NotStructured
    out = outs[0]
    q, WQ = _canon(att["q"], att["q_heads"], att["q_contract"])
    k, WK = _canon(att["k"], att["k_heads"], att["k_contract"])
    v, WV = _canon(att["v"], att["v_heads"], att["v_free"])
    root, Pe = att["S_root"], att["P"]
    steps = [(eqn, i_, o_) for eqn, i_, o_ in trace if all(o.kind == "S" for o in o_) and o_[0] is not root]

    def rowmap(S):
        vals = {id(root): S}
        for eqn, ins_e, outs_e in steps:
            args = [vals[id(e)] if id(e) in vals else e.val for e in ins_e]
            for e, r in zip(outs_e, bind_eqn(eqn, args)):
                vals[id(e)] = r
        return vals[id(Pe)]

    rt, pt = root.V, Pe.V
    nh = len(att["q_heads"])

    def canon_s(a, tags):
        perm = [tags.index("b")] + [tags.index(("h", i)) for i in range(nh)] + [tags.index("tq"), tags.index("tk")]
        a = jnp.transpose(a, perm)
        return jnp.reshape(a, (a.shape[0], -1) + a.shape[-2:])

    S = root.val
    T = S.shape[rt.index("tk")]
    ax = rt.index("tk")

    def direction(r):
        e = jnp.reshape(jax.nn.one_hot(r, T, dtype=S.dtype), (1,) * ax + (T,) + (1,) * (S.ndim - ax - 1))
        return jnp.broadcast_to(e, S.shape)

    P = canon_s(Pe.val, pt)
    dP = jax.vmap(lambda r: jax.jvp(rowmap, (S,), (direction(r),))[1])(jnp.arange(T))  # (T, S-shape in P tags)
    G = jnp.moveaxis(jax.vmap(lambda a: canon_s(a, pt))(dP), 0, -1)  # (B, H, T, T, T)
    return AttentionStructure(WQ=WQ, WK=WK, WV=WV, WO=out.V, A0=out.A0, q=q, k=k, v=v, P=P, G=G)


def attention_structure(f, params, h) -> AttentionStructure | None:
    """The softmax-attention factorisation of a section (module docstring), or None.

    Args:
      f: a section ``f(params, h)``.
      params: its params.
      h: an input batch ``(batch, positions, d_in)``.

    Returns:
      `AttentionStructure`, or None when the section is not of that form.
    """
    if not isinstance(h, jax.Array) or h.ndim != 3 or not jnp.issubdtype(h.dtype, jnp.floating):
        return None
    try:
        return _attention_split(f, params, h)
    except NotStructured:
        return None
    except (TypeError, ValueError, NotImplementedError, KeyError, AttributeError, IndexError):
        return None


def _rows(steps):
    def rows(a):
        for s in steps:
            a = s(a)
        return a

    return rows


def affine_elementwise(f, params, h) -> AffineElementwise | None:
    """The factorisation ``f(params, h) = post(h_s @ W) [@ V] [+ h_s @ A0] + c`` (module docstring), or None.

    Works on concrete and traced ``params``/``h`` (inside ``jax.jit``, ``vmap`` or ``shard_map``); the decision
    depends only on the section's jaxpr, never on values.

    Args:
      f: a section ``f(params, h)``.
      params: its params.
      h: an input batch ``(batch, [positions...,] d_in)``; a single array.

    Returns:
      `AffineElementwise` (``W``, ``z = h_s @ W``, ``post``, ``slope = post'(z)``, ``V``, ``A0``, ``select``), or
      None when the section is not of that form.
    """
    if not isinstance(h, jax.Array) or h.ndim < 1 or not jnp.issubdtype(h.dtype, jnp.floating):
        return None
    try:
        return _split(f, params, h)
    except NotStructured:
        return None
    except (TypeError, ValueError, NotImplementedError, KeyError, AttributeError, IndexError):
        # a section this reader does not understand (an unusual primitive or parameter): use the general path
        return None


def structured_sections(model, params, x) -> tuple[bool, ...]:
    """Which sections take an exact structured fast path in Jacobian Grams and edges (module docstring).

    Args:
      model: `Sections` (or a list of functions).
      params: the model's params.
      x: an input batch.

    Returns:
      One bool per section: True where the section is affine-elementwise (``post(h_s W) [V] [+ h_s A0]``) or
      softmax attention.
    """
    model = as_sections(model)
    flags = []

    def trace(p, xx):  # traced abstractly (jax.eval_shape): the decision depends only on the jaxprs, not on values
        h = node_input(model, xx)
        for f in model.fns:
            flags.append(affine_elementwise(f, p, h) is not None or attention_structure(f, p, h) is not None)
            h = f(p, h)
        return h

    if is_traced((params, x)):
        trace(params, x)
    else:
        jax.eval_shape(trace, params, x)
    return tuple(flags)
