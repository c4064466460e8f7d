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
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from degenjax._src.sections import as_sections, node_input
from degenjax._src.validation import is_traced

_HIGHEST = jax.lax.Precision.HIGHEST

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
    "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round", "rsqrt",
    "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})
_INLINE = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
_OPAQUE_CALLS = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_AFFINE_UNARY = frozenset({"convert_element_type", "neg", "copy", "copy_p", "reduce_precision"})


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


class _NotStructured(Exception):
    pass


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _inner_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            return j
    return None


def _open(j):
    """``(jaxpr, consts)`` of a ClosedJaxpr or a Jaxpr."""
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr, list(j.consts)
    return j, []


def _elementwise_call(jaxpr, z_in: list[bool], shape) -> bool:
    """Whether a sub-jaxpr maps its ``z``-dependent inputs to outputs elementwise (all of shape ``shape``)."""
    dep = {v: z for v, z in zip(jaxpr.invars, z_in)}
    for v in jaxpr.constvars:
        dep[v] = False
    for eqn in jaxpr.eqns:
        ins = [False if isinstance(v, jcore.Literal) else dep[v] for v in eqn.invars]
        if not any(ins):
            for o in eqn.outvars:
                dep[o] = False
            continue
        if not _elementwise_eqn(eqn, ins, shape):
            return False
        for o in eqn.outvars:
            dep[o] = True
    return True


def _elementwise_eqn(eqn, ins: list[bool], shape) -> bool:
    """An equation with some ``z``-dependent inputs is elementwise on arrays of ``shape``."""
    shape = tuple(shape)
    for v, z in zip(eqn.invars, ins):
        s = tuple(v.aval.shape)
        if s == shape or (not z and (s == () or _broadcasts(s, shape))):
            continue
        return False
    if any(tuple(o.aval.shape) != shape for o in eqn.outvars):
        return False
    name = eqn.primitive.name
    if name in _ELEMENTWISE:
        return True
    if name in _INLINE + _OPAQUE_CALLS:
        inner = _inner_jaxpr(eqn)
        if inner is None:
            return False
        inner, _ = _open(inner)
        n_extra = len(inner.invars) - len(ins)
        if n_extra < 0:
            return False
        return _elementwise_call(inner, [False] * n_extra + ins, shape)
    return False


def _broadcasts(s, shape) -> bool:
    """A constant of shape ``s`` that broadcasts to ``shape`` without moving axes (size-1 axes, same rank)."""
    return len(s) == len(shape) and all(a in (1, b) for a, b in zip(s, shape))


# ---------------------------------------------------------------------------------------------------------------
# the abstract interpreter


class _Entry:
    """A value of the section with what is known about its dependence on ``h``.

    kind: "c" (constant), "h" (rows of h, selected), "L" (``h_s @ A + const``), "Z" (elementwise in the root value),
    "Y" (``post(z) @ V [+ h_s @ A0] + const``). ``nr`` is the number of row axes (leading) and ``sel`` the row
    selection ``((key, fn), ...)`` applied to ``h`` to get them.
    """

    __slots__ = ("val", "kind", "A", "root", "V", "A0", "sel", "vary", "nr")

    def __init__(self, val, kind, A=None, root=None, V=None, A0=None, sel=(), vary=None, nr=None):
        self.val, self.kind, self.A, self.root, self.V, self.A0, self.sel, self.vary, self.nr = (
            val, kind, A, root, V, A0, sel, vary, nr)


def _sel_key(e: _Entry):
    return tuple(k for k, _ in e.sel)


def _row_selection(eqn, nr: int):
    """``(key, fn)`` when a slice/squeeze acts on row axes only (features untouched), `_FEATURES` when it acts on
    feature axes only, else raises. ``fn`` applies the selection to any array with these rows and one feature axis."""
    name = eqn.primitive.name
    shape = tuple(eqn.invars[0].aval.shape)
    if name == "squeeze":
        dims = tuple(a % len(shape) for a in eqn.params["dimensions"])
        if all(a >= nr for a in dims):
            return _FEATURES
        if any(a >= nr for a in dims):
            raise _NotStructured
        return ((name, dims), lambda a: jax.lax.squeeze(a, dims))
    if name == "slice":
        st, lim, strd = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
        strd = (1,) * len(st) if strd is None else tuple(strd)
        rows_full = all(st[i] == 0 and lim[i] == shape[i] and strd[i] == 1 for i in range(nr))
        feats_full = all(st[i] == 0 and lim[i] == shape[i] and strd[i] == 1 for i in range(nr, len(shape)))
        if rows_full:
            return _FEATURES
        if not feats_full:
            raise _NotStructured
        st_r, lim_r, strd_r = tuple(st[:nr]), tuple(lim[:nr]), tuple(strd[:nr])
        return ((name, st_r, lim_r, strd_r),
                lambda a: jax.lax.slice(a, st_r + (0,), lim_r + (a.shape[-1],), strd_r + (1,)))
    raise _NotStructured


class _Reader:
    """Interprets a section's jaxpr on its input (see the module docstring)."""

    def __init__(self, h):
        self.h = h
        self.d = h.shape[-1]
        self.z_root = None  # the _Entry whose value is the pre-activation z
        self.y_seen = False

    # -- helpers ---------------------------------------------------------------------------------------------

    def as_L(self, e: _Entry) -> _Entry:
        if e.kind == "L":
            return e
        if e.kind != "h":
            raise _NotStructured
        return _Entry(e.val, "L", A=jnp.eye(self.d, dtype=e.val.dtype), root=None, sel=e.sel, nr=e.nr)

    def same_rows(self, ins) -> _Entry:
        """The one non-constant entry's selection (all non-constant inputs must share it)."""
        keys = {_sel_key(e) for e in ins if e.kind != "c"}
        if len(keys) != 1:
            raise _NotStructured
        return next(e for e in ins if e.kind != "c")

    @staticmethod
    def row_free(e: _Entry, full_rank: int, nr: int) -> bool:
        """Whether a constant does not vary along the row axes of an affine value of rank ``full_rank``."""
        s = tuple(np.shape(e.val))
        if len(s) < full_rank:
            s = (1,) * (full_rank - len(s)) + s
        vary = e.vary if e.vary is not None else {i for i, n in enumerate(s) if n > 1}
        return not any(i < nr and s[i] > 1 for i in vary)

    @staticmethod
    def feat_const(e: _Entry, full_rank: int, nr: int):
        """A row-free constant restricted to one row: shape ``(1,) + feature shape`` to multiply ``A`` with."""
        v = jnp.asarray(e.val)
        if v.ndim < full_rank:
            v = jnp.reshape(v, (1,) * (full_rank - v.ndim) + v.shape)
        return v[(0,) * nr][None]

    # -- one equation ------------------------------------------------------------------------------------------

    def step(self, eqn, ins: list[_Entry]) -> list[_Entry]:
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if all(k == "c" for k in kinds):
            vals = _bind(eqn, [e.val for e in ins])
            vary = self.const_vary(eqn, ins)
            return [_Entry(v, "c", vary=vary) for v in vals]
        # row selections (positions only) of h or an affine value
        if len(ins) == 1 and kinds[0] in ("h", "L") and name in ("squeeze", "slice"):
            e = ins[0]
            s = _row_selection(eqn, e.nr)
            if s is not _FEATURES:
                key, fn = s
                nr = e.nr - (len(key[1]) if key[0] == "squeeze" else 0)
                val = _bind(eqn, [e.val])[0]
                return [_Entry(val, e.kind, A=e.A, root=None, sel=e.sel + ((key, fn),), nr=nr)]
        if kinds == ["h"] and name == "convert_element_type":
            e = ins[0]
            return [_Entry(_bind(eqn, [e.val])[0], "h", sel=e.sel, nr=e.nr)]
        if any(k in ("S", "ZA", "YA", "LT") for k in kinds) or (
                name == "dot_general" and len(ins) == 2 and all(k in ("L", "h") for k in kinds)) or (
                name == "transpose" and kinds[0] in ("L", "h") and tuple(eqn.params["permutation"])[:ins[0].nr]
                != tuple(range(ins[0].nr))):
            return self.step_attention(eqn, [self.as_L(e) if e.kind == "h" else e for e in ins], out_shape)
        if any(k == "Z" for k in kinds) or (self.z_root is not None and self.in_root_family(ins)):
            out = self.step_z(eqn, ins, out_shape)
            if out is not None:
                return out
        if any(k in ("Y", "Z") for k in kinds):
            return self.step_y(eqn, ins, out_shape)
        ins = [self.as_L(e) if e.kind == "h" else e for e in ins]
        kinds = [e.kind for e in ins]
        if set(kinds) <= {"L", "c"}:
            self.same_rows(ins)
            out = self.step_affine(eqn, ins, out_shape)
            if out is not None:
                return out
            # a nonlinear elementwise function of one affine value starts the elementwise part
            if self.z_root is None and self.start_z(eqn, ins, out_shape):
                return self.step_z(eqn, ins, out_shape)
        raise _NotStructured

    def const_vary(self, eqn, ins):
        """Axes along which a constant may vary (for broadcasts of smaller constants)."""
        name = eqn.primitive.name
        if name == "broadcast_in_dim":
            src = ins[0]
            s = tuple(np.shape(src.val))
            dims = tuple(eqn.params["broadcast_dimensions"])
            src_vary = src.vary if src.vary is not None else {i for i, n in enumerate(s) if n > 1}
            return {dims[i] for i in src_vary}
        if name in _ELEMENTWISE and len(eqn.outvars) == 1:
            shape = tuple(eqn.outvars[0].aval.shape)
            out = set()
            for e in ins:
                s = tuple(np.shape(e.val))
                if s == ():
                    continue
                if len(s) != len(shape) or e.vary is None:
                    return None
                out |= {i for i in e.vary if s[i] > 1}
            return out
        return None

    # -- affine values -------------------------------------------------------------------------------------------

    def step_affine(self, eqn, ins, out_shape):
        """Propagates ``A`` through a linear feature operation; None when the operation is not one."""
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        li = [i for i, k in enumerate(kinds) if k == "L"]
        L0 = ins[li[0]]
        nr = L0.nr
        rows = tuple(L0.val.shape[:nr])

        def new(A, eroot=None):
            v = _bind(eqn, [e.val for e in ins])[0]
            if tuple(v.shape[:nr]) != rows:
                raise _NotStructured
            return [_Entry(v, "L", A=A, root=eroot, sel=L0.sel, nr=nr)]

        if name in _AFFINE_UNARY and len(ins) == 1:
            A = -L0.A if name == "neg" else L0.A
            if name == "convert_element_type":
                A = A.astype(eqn.params["new_dtype"]) if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating) else A
            return new(A, self.eroot(L0))
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            if any(e.kind == "L" and tuple(e.val.shape[:nr]) != tuple(out_shape[:nr]) for e in ins):
                raise _NotStructured
            if kinds == ["L", "L"]:
                A1, A2 = (self.bcast(e.A, out_shape, nr) for e in ins)
                return new(A1 + A2 if name != "sub" else A1 - A2, None)
            same = tuple(L0.val.shape) == out_shape
            A = self.bcast(L0.A, out_shape, nr)
            sign = -1.0 if (name == "sub" and kinds[1] == "L") else 1.0
            return new(A if sign > 0 else -A, self.eroot(L0) if same else None)
        if name in ("mul", "div") and len(ins) == 2 and len(li) == 1:
            c = ins[1 - li[0]]
            if name == "div" and li[0] != 0:
                return None
            if tuple(L0.val.shape[:nr]) != tuple(out_shape[:nr]) or not self.row_free(c, len(out_shape), nr):
                return None
            f = self.feat_const(c, len(out_shape), nr).astype(L0.A.dtype)
            A = self.bcast(L0.A, out_shape, nr)
            A = A * f if name == "mul" else A / f
            return new(A, self.eroot(L0) if tuple(L0.val.shape) == out_shape else None)
        if name == "dot_general" and kinds == ["L", "c"]:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            if lb or rb or any(a < nr for a in lc):
                raise _NotStructured
            A = jax.lax.dot_general(L0.A, ins[1].val.astype(L0.A.dtype),
                                    ((tuple(a - nr + 1 for a in lc), tuple(rc)), ((), ())), precision=_HIGHEST)
            return new(A, None)
        if name == "dot_general":
            return None
        if name == "broadcast_in_dim" and kinds[0] == "L":
            dims = tuple(eqn.params["broadcast_dimensions"])
            if dims[:nr] != tuple(range(nr)) or tuple(out_shape[:nr]) != rows:
                raise _NotStructured
            shape = (self.d,) + tuple(out_shape[nr:])
            A = jax.lax.broadcast_in_dim(L0.A, shape, (0,) + tuple(a - nr + 1 for a in dims[nr:]))
            return new(A, None)
        if name == "reshape" and kinds[0] == "L":
            if eqn.params.get("dimensions") is not None or tuple(out_shape[:nr]) != rows:
                raise _NotStructured
            return new(jnp.reshape(L0.A, (self.d,) + tuple(out_shape[nr:])), None)
        if name == "squeeze" and kinds == ["L"]:
            dims = tuple(a % L0.val.ndim for a in eqn.params["dimensions"])
            if any(a < nr for a in dims):
                raise _NotStructured
            return new(jax.lax.squeeze(L0.A, tuple(a - nr + 1 for a in dims)), None)
        if name == "slice" and kinds == ["L"]:
            st, lim, strd = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
            strd = (1,) * len(st) if strd is None else strd
            if any(st[i] != 0 or lim[i] != rows[i] or strd[i] != 1 for i in range(nr)):
                raise _NotStructured
            A = jax.lax.slice(L0.A, (0,) + tuple(st[nr:]), (self.d,) + tuple(lim[nr:]), (1,) + tuple(strd[nr:]))
            return new(A, None)
        if name == "transpose" and kinds == ["L"]:
            perm = tuple(eqn.params["permutation"])
            if perm[:nr] != tuple(range(nr)):
                raise _NotStructured
            return new(jnp.transpose(L0.A, (0,) + tuple(p - nr + 1 for p in perm[nr:])), None)
        if name == "reduce_sum" and kinds == ["L"]:
            axes = tuple(eqn.params["axes"])
            if any(a < nr for a in axes):
                raise _NotStructured
            return new(jnp.sum(L0.A, axis=tuple(a - nr + 1 for a in axes)), None)
        if name == "concatenate":
            dim = eqn.params["dimension"]
            if dim < nr:
                raise _NotStructured
            parts = []
            for e in ins:
                if tuple(e.val.shape[:nr]) != rows and e.kind == "L":
                    raise _NotStructured
                parts.append(e.A if e.kind == "L" else jnp.zeros((self.d,) + tuple(e.val.shape[nr:]), L0.A.dtype))
            return new(jnp.concatenate(parts, axis=dim - nr + 1), None)
        return None

    def bcast(self, A, out_shape, nr):
        """``A`` broadcast to the feature shape of ``out_shape`` (size-1 feature axes expanded)."""
        shape = (self.d,) + tuple(out_shape[nr:])
        if tuple(A.shape) == shape:
            return A
        if A.ndim != len(shape):
            raise _NotStructured
        return jnp.broadcast_to(A, shape)

    def eroot(self, e: _Entry):
        """The affine value that ``e`` is an elementwise-affine function of (itself if none)."""
        return e.root if e.root is not None else e

    # -- the elementwise part --------------------------------------------------------------------------------------

    def in_root_family(self, ins) -> bool:
        return any(e.kind == "L" and self.eroot(e) is self.z_root for e in ins)

    def start_z(self, eqn, ins, out_shape) -> bool:
        shape = out_shape
        if not _elementwise_eqn(eqn, [e.kind != "c" for e in ins], shape):
            return False
        roots = {id(self.eroot(e)) for e in ins if e.kind == "L"}
        if len(roots) != 1:
            return False
        root = next(self.eroot(e) for e in ins if e.kind == "L")
        if tuple(root.val.shape) != out_shape or len(out_shape) != root.nr + 1:
            return False
        self.z_root = root
        return True

    def step_z(self, eqn, ins, out_shape):
        """An elementwise operation on values of the root's family (Z, or affine values elementwise in the root)."""
        shape = tuple(self.z_root.val.shape)
        dep = []
        for e in ins:
            if e.kind == "Z":
                dep.append(True)
            elif e.kind == "L" and self.eroot(e) is self.z_root:
                dep.append(True)
            elif e.kind == "c":
                dep.append(False)
            else:
                return None
        if out_shape != shape or not _elementwise_eqn(eqn, dep, shape):
            return None
        vals = _bind(eqn, [e.val for e in ins])
        r = self.z_root
        return [_Entry(v, "Z", sel=r.sel, nr=r.nr) for v in vals]

    # -- after the elementwise part ---------------------------------------------------------------------------------

    def as_Y(self, e: _Entry) -> _Entry:
        if e.kind == "Y":
            return e
        if e.kind == "Z":
            return _Entry(e.val, "Y", V=None, A0=None, root=e, sel=e.sel, nr=e.nr)
        raise _NotStructured

    def step_y(self, eqn, ins, out_shape):
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        ins2 = [self.as_L(e) if e.kind == "h" else e for e in ins]
        ref = self.same_rows(ins2)
        nr = ref.nr
        if name == "dot_general" and kinds == ["Z", "c"]:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            z = ins[0]
            if lb or rb or tuple(lc) != (z.val.ndim - 1,) or self.y_seen or z.val.ndim != nr + 1:
                raise _NotStructured
            V = ins[1].val
            if V.ndim != 2:
                raise _NotStructured
            self.y_seen = True
            v = _bind(eqn, [e.val for e in ins])[0]
            return [_Entry(v, "Y", V=V, A0=None, root=z, sel=z.sel, nr=nr)]
        if name == "convert_element_type" and kinds in (["Y"], ["Z"]):
            e = self.as_Y(ins[0])
            return [_Entry(_bind(eqn, [ins[0].val])[0], "Y", V=e.V, A0=e.A0, root=e.root, sel=e.sel, nr=nr)]
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            ks = [e.kind for e in ins2]
            yi = [i for i, k in enumerate(ks) if k in ("Y", "Z")]
            if len(yi) != 1 or tuple(ins2[yi[0]].val.shape) != out_shape:
                raise _NotStructured
            y = self.as_Y(ins2[yi[0]])
            o = ins2[1 - yi[0]]
            if name == "sub" and yi[0] == 1:
                raise _NotStructured  # c - post(z) V: a flipped sign of V; rare, not supported
            A0 = y.A0
            if o.kind == "L":
                if tuple(o.val.shape) != out_shape:
                    raise _NotStructured
                add = -o.A if name == "sub" else o.A
                A0 = add if A0 is None else A0 + add
            elif o.kind != "c":
                raise _NotStructured
            v = _bind(eqn, [e.val for e in ins])[0]
            return [_Entry(v, "Y", V=y.V, A0=A0, root=y.root, sel=y.sel, nr=nr)]
        if name == "concatenate":
            dim = eqn.params["dimension"]
            if dim != len(out_shape) - 1 or len(out_shape) != nr + 1:
                raise _NotStructured
            ys = [e for e in ins2 if e.kind in ("Y", "Z")]
            if len(ys) != 1:
                raise _NotStructured
            y = self.as_Y(ys[0])
            k = self.z_root.val.shape[-1]
            dt = ys[0].val.dtype
            Vy = jnp.eye(k, dtype=dt) if y.V is None else y.V
            Vs, As = [], []
            any_A = False
            for e in ins2:
                w = e.val.shape[-1]
                if e is ys[0]:
                    Vs.append(Vy)
                    As.append(y.A0 if y.A0 is not None else jnp.zeros((self.d, w), dt))
                    any_A |= y.A0 is not None
                elif e.kind == "L":
                    if e.A.ndim != 2:
                        raise _NotStructured
                    Vs.append(jnp.zeros((k, w), dt))
                    As.append(e.A.astype(dt))
                    any_A = True
                elif e.kind == "c":
                    Vs.append(jnp.zeros((k, w), dt))
                    As.append(jnp.zeros((self.d, w), dt))
                else:
                    raise _NotStructured
            v = _bind(eqn, [e.val for e in ins])[0]
            return [_Entry(v, "Y", V=jnp.concatenate(Vs, axis=1), A0=jnp.concatenate(As, axis=1) if any_A else None,
                           root=y.root, sel=y.sel, nr=nr)]
        raise _NotStructured


    # -- softmax attention -----------------------------------------------------------------------------------------
    # S-family values (scores and row-wise functions of them) carry ``tags``: one per axis, "b" (the batch row),
    # ("h", i) (head i), "tq" (query position), "tk" (key position, full), "tk1" (a size-1 key axis); reductions
    # over "tk" drop it. ZA values (the weighted values) carry tags "b", ("h", i), "tq", ("v", j); merged axes are
    # tuples of tags. YA values are ``ZA @ W_O [+ h A0] + const`` with rows ("b", "tq").

    def step_attention(self, eqn, ins, out_shape):
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        att = self.__dict__.setdefault("att", {})
        if name == "transpose" and kinds in (["L"], ["LT"]):
            e = ins[0]
            base, perm = (e, tuple(range(e.val.ndim))) if e.kind == "L" else (e.root, e.V)
            p = tuple(eqn.params["permutation"])
            return [_Entry(_bind(eqn, [e.val])[0], "LT", root=base, V=tuple(perm[i] for i in p), sel=e.sel,
                           nr=e.nr)]
        if name == "dot_general" and set(kinds) <= {"L", "LT"} and len(ins) == 2:
            return self.att_scores(eqn, ins, att)
        if name == "dot_general" and len(ins) == 2 and sorted(kinds) in (["L", "S"], ["LT", "S"]):
            return self.att_values(eqn, ins, att)
        if any(k == "S" for k in kinds):
            return self.att_rowwise(eqn, ins, out_shape, att)
        if any(k == "ZA" for k in kinds):
            return self.att_za(eqn, ins, out_shape, att)
        if any(k == "YA" for k in kinds):
            return self.att_ya(eqn, ins, out_shape, att)
        raise _NotStructured

    @staticmethod
    def _base(e):
        """``(base L entry, permutation)`` of an affine value or a transposed one."""
        if e.kind == "L":
            return e, tuple(range(e.val.ndim))
        return e.root, e.V

    def att_scores(self, eqn, ins, att):
        if "q" in att:
            raise _NotStructured  # one scores product per section
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        (X, px), (Y, py) = self._base(ins[0]), self._base(ins[1])
        if X.nr != 2 or Y.nr != 2 or X.sel or Y.sel:
            raise _NotStructured
        cx, cy = [px[a] for a in lc], [py[a] for a in rc]
        bx, by = [px[a] for a in lb], [py[a] for a in rb]
        fx = [px[a] for a in range(ins[0].val.ndim) if a not in lc and a not in lb]
        fy = [py[a] for a in range(ins[1].val.ndim) if a not in rc and a not in rb]
        if fx != [1] or fy != [1] or any(a < 2 for a in cx + cy):
            raise _NotStructured
        tags, qh, kh = [], [], []
        for x_, y_ in zip(bx, by):
            if x_ == 0 and y_ == 0:
                tags.append("b")
            elif x_ >= 2 and y_ >= 2:
                tags.append(("h", len(qh)))
                qh.append(x_)
                kh.append(y_)
            else:
                raise _NotStructured
        if tags.count("b") != 1:
            raise _NotStructured
        tags += ["tq", "tk"]
        att.update(q=X, k=Y, q_heads=qh, k_heads=kh, q_contract=cx, k_contract=cy)
        out = _Entry(_bind(eqn, [e.val for e in ins])[0], "S", V=tuple(tags), sel=(), nr=None)
        att["S_root"] = out
        return [out]

    def att_rowwise(self, eqn, ins, out_shape, att):
        """Row-wise operations on scores (over key positions): elementwise ops, reductions over "tk" and their
        broadcasts back; the result must stay a function of each (batch, head, query) row of the scores."""
        name = eqn.primitive.name
        S = [e for e in ins if e.kind == "S"]
        if any(e.kind not in ("S", "c") for e in ins):
            raise _NotStructured
        tags0 = S[0].V
        val = None
        if name in _ELEMENTWISE or name == "stop_gradient":
            full = [e.V for e in S if "tk" in e.V]
            base = full[0] if full else tags0
            for e in S:
                t = e.V
                if len(t) != len(base) or any(a != b and {a, b} != {"tk", "tk1"} for a, b in zip(t, base)):
                    raise _NotStructured
            for e in ins:
                if e.kind == "c" and e.val.ndim not in (0, len(out_shape)):
                    raise _NotStructured
            tags = base
            if "tk" in base and out_shape[base.index("tk")] != ins[[e.kind for e in ins].index("S")].val.shape[
                    base.index("tk")] and False:
                raise _NotStructured
        elif name in ("reduce_max", "reduce_sum", "reduce_min") and len(ins) == 1:
            axes = tuple(eqn.params["axes"])
            if len(axes) != 1 or tags0[axes[0]] not in ("tk", "tk1"):
                raise _NotStructured
            tags = tuple(t for i, t in enumerate(tags0) if i != axes[0])
        elif name == "broadcast_in_dim" and len(ins) == 1:
            dims = tuple(eqn.params["broadcast_dimensions"])
            if "tk" in tags0 or "tk1" in tags0 or len(out_shape) != len(tags0) + 1:
                raise _NotStructured
            new = [i for i in range(len(out_shape)) if i not in dims]
            if list(dims) != sorted(dims) or len(new) != 1:
                raise _NotStructured
            tags = list(tags0)
            T = att["S_root"].val.shape[att["S_root"].V.index("tk")]
            tags.insert(new[0], "tk" if out_shape[new[0]] == T else "tk1")
            if out_shape[new[0]] not in (1, T):
                raise _NotStructured
            tags = tuple(tags)
        elif name in ("convert_element_type", "reduce_precision", "copy", "copy_p"):
            tags = tags0
        else:
            raise _NotStructured
        vals = _bind(eqn, [e.val for e in ins])
        return [_Entry(v, "S", V=tags) for v in vals]

    def att_values(self, eqn, ins, att):
        """``dot_general`` of the weights P (an S value) and the values v (affine), in either order."""
        if "v" in att or "q" not in att:
            raise _NotStructured
        pi = 0 if ins[0].kind == "S" else 1
        Pe, Ve = ins[pi], ins[1 - pi]
        (V, pv) = self._base(Ve)
        if V.nr != 2 or V.sel:
            raise _NotStructured
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        pc, vc, pb, vb = (lc, rc, lb, rb) if pi == 0 else (rc, lc, rb, lb)
        tags = Pe.V
        if "tk" not in tags or [tags[a] for a in pc] != ["tk"] or [pv[a] for a in vc] != [1]:
            raise _NotStructured
        batch_tags, vh = [], {}
        for a, b_ in zip(pb, vb):
            t, vax = tags[a], pv[b_]
            if t == "b" and vax == 0:
                batch_tags.append("b")
            elif isinstance(t, tuple) and t[0] == "h" and vax >= 2:
                vh[t[1]] = vax
                batch_tags.append(t)
            else:
                raise _NotStructured
        if sorted(vh) != list(range(len(att["q_heads"]))) or "b" not in batch_tags:
            raise _NotStructured
        fp = [a for a in range(len(tags)) if a not in pc and a not in pb]
        if [tags[a] for a in fp] != ["tq"]:
            raise _NotStructured
        fv = [pv[a] for a in range(Ve.val.ndim) if a not in vc and a not in vb]
        if any(a < 2 for a in fv):
            raise _NotStructured
        vtags = [("v", j) for j in range(len(fv))]
        out_tags = batch_tags + (["tq"] + vtags if pi == 0 else vtags + ["tq"])
        att.update(v=V, v_heads=[vh[i] for i in range(len(vh))], v_free=fv, P=Pe)
        return [_Entry(_bind(eqn, [e.val for e in ins])[0], "ZA", V=tuple(out_tags))]

    def att_za(self, eqn, ins, out_shape, att):
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        z = ins[kinds.index("ZA")]
        tags = z.V
        if name in ("convert_element_type", "copy", "copy_p") and len(ins) == 1:
            return [_Entry(_bind(eqn, [z.val])[0], "ZA", V=tags)]
        if name == "transpose" and len(ins) == 1:
            p = tuple(eqn.params["permutation"])
            return [_Entry(_bind(eqn, [z.val])[0], "ZA", V=tuple(tags[i] for i in p))]
        if name == "reshape" and len(ins) == 1 and eqn.params.get("dimensions") is None:
            # merging adjacent trailing axes (e.g. heads and head features) into one
            old = list(z.val.shape)
            new_tags, i = [], 0
            for n in out_shape:
                group, size = [], 1
                while i < len(old) and (size < n or (n == 1 and not group)):
                    group.append(tags[i])
                    size *= old[i]
                    i += 1
                if size != n:
                    raise _NotStructured
                new_tags.append(group[0] if len(group) == 1 else ("m", tuple(group)))
            if i != len(old):
                raise _NotStructured
            for t in new_tags:
                if isinstance(t, tuple) and t[0] == "m" and any(g in ("b", "tq") for g in t[1]):
                    raise _NotStructured
            return [_Entry(_bind(eqn, [z.val])[0], "ZA", V=tuple(new_tags))]
        if name == "dot_general" and kinds == ["ZA", "c"]:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            if lb or rb:
                raise _NotStructured
            free = [tags[a] for a in range(len(tags)) if a not in lc]
            if free != ["b", "tq"]:
                raise _NotStructured
            W = ins[1].val
            # expand merged axes of W into their constituents, then order (heads..., values..., out...)
            ax_tags, shape = [], []
            Wx = W
            sizes = dict(zip(tags, z.val.shape))
            split_shape = []
            for a, r in zip(lc, rc):
                t = tags[a]
                parts = list(t[1]) if isinstance(t, tuple) and t[0] == "m" else [t]
                ax_tags.append(parts)
            # reshape W so each contracted axis is split into its parts
            new_shape = []
            order_tags = []
            rc_set = list(rc)
            for i, n in enumerate(W.shape):
                if i in rc_set:
                    parts = ax_tags[rc_set.index(i)]
                    if len(parts) == 1:
                        new_shape.append(n)
                    else:
                        lens = [self._tag_size(p_, att) for p_ in parts]
                        new_shape += lens
                    order_tags += parts
                else:
                    new_shape.append(n)
                    order_tags.append(("o", i))
            Wx = jnp.reshape(W, new_shape)
            nh, nv = len(att["q_heads"]), len(att["v_free"])
            want = [("h", i) for i in range(nh)] + [("v", j) for j in range(nv)]
            outs = [t for t in order_tags if t[0] == "o"]
            if sorted(map(str, [t for t in order_tags if t[0] != "o"])) != sorted(map(str, want)) or len(outs) != 1:
                raise _NotStructured
            perm = [order_tags.index(t) for t in want + outs]
            Wx = jnp.transpose(Wx, perm)
            H = int(np.prod([self._tag_size(("h", i), att) for i in range(nh)])) if nh else 1
            dv = int(np.prod([self._tag_size(("v", j), att) for j in range(nv)]))
            WO = jnp.reshape(Wx, (H, dv, Wx.shape[-1]))
            del sizes, split_shape, shape
            v = _bind(eqn, [e.val for e in ins])[0]
            return [_Entry(v, "YA", V=WO, A0=None)]
        raise _NotStructured

    @staticmethod
    def _tag_size(t, att):
        if t[0] == "h":
            q = att["q"]
            return q.val.shape[att["q_heads"][t[1]]]
        if t[0] == "v":
            return att["v"].val.shape[att["v_free"][t[1]]]
        raise _NotStructured

    def att_ya(self, eqn, ins, out_shape, att):
        name = eqn.primitive.name
        ins = [self.as_L(e) if e.kind == "h" else e for e in ins]
        kinds = [e.kind for e in ins]
        y = ins[kinds.index("YA")]
        if kinds.count("YA") != 1 or any(k not in ("YA", "L", "c") for k in kinds):
            raise _NotStructured
        for e in ins:
            if e.kind == "L" and (e.nr != 2 or e.sel or e.A.ndim != 2):
                raise _NotStructured
        if name in ("convert_element_type", "copy", "copy_p") and len(ins) == 1:
            return [_Entry(_bind(eqn, [y.val])[0], "YA", V=y.V, A0=y.A0)]
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            if tuple(y.val.shape) != out_shape or (name == "sub" and kinds[1] == "YA"):
                raise _NotStructured
            o = ins[1 - kinds.index("YA")]
            A0 = y.A0
            if o.kind == "L":
                if tuple(o.val.shape) != out_shape:
                    raise _NotStructured
                add = -o.A if name == "sub" else o.A
                A0 = add if A0 is None else A0 + add
            return [_Entry(_bind(eqn, [e.val for e in ins])[0], "YA", V=y.V, A0=A0)]
        if name == "concatenate" and eqn.params["dimension"] == len(out_shape) - 1 and len(out_shape) == 3:
            WO = y.V
            Ws, As = [], []
            for e in ins:
                w = e.val.shape[-1]
                if e is y:
                    Ws.append(WO)
                    As.append(y.A0 if y.A0 is not None else jnp.zeros((self.d, w), WO.dtype))
                else:
                    Ws.append(jnp.zeros(WO.shape[:2] + (w,), WO.dtype))
                    As.append(e.A.astype(WO.dtype) if e.kind == "L" else jnp.zeros((self.d, w), WO.dtype))
            return [_Entry(_bind(eqn, [e.val for e in ins])[0], "YA", V=jnp.concatenate(Ws, axis=2),
                           A0=jnp.concatenate(As, axis=1))]
        raise _NotStructured


_FEATURES = object()  # marks a slice or squeeze of feature axes only (an affine operation, not a row selection)


def _live_eqns(jaxpr):
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(o in needed for o in eqn.outvars) or eqn.effects:
            live.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live[::-1]


def _run(reader: _Reader, jaxpr, consts, in_entries, trace: list):
    """Interprets ``jaxpr`` (inlining plain calls); ``trace`` collects ``(eqn, in entries, out entries)``."""
    env: dict[Any, _Entry] = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = _Entry(c, "c")
    for v, e in zip(jaxpr.invars, in_entries):
        env[v] = e

    def rd(v):
        if isinstance(v, jcore.Literal):
            return _Entry(np.asarray(v.val, dtype=v.aval.dtype), "c", vary=set())
        return env[v]

    for eqn in _live_eqns(jaxpr):
        ins = [rd(v) for v in eqn.invars]
        name = eqn.primitive.name
        if (name in _INLINE and any(e.kind != "c" for e in ins)) or (
                name in _OPAQUE_CALLS and any(e.kind == "S" for e in ins)):
            inner, iconsts = _open(_inner_jaxpr(eqn))
            outs = _run(reader, inner, iconsts, ins, trace)
        else:
            outs = reader.step(eqn, ins)
            trace.append((eqn, ins, outs))
        for o, e in zip(eqn.outvars, outs):
            env[o] = e
    return [rd(v) for v in jaxpr.outvars]


def _split(f, params, h) -> AffineElementwise:
    closed = jax.make_jaxpr(f)(params, h)
    jaxpr = closed.jaxpr
    p_leaves = jax.tree.leaves(params)
    if len(jaxpr.invars) != len(p_leaves) + 1:
        raise _NotStructured
    reader = _Reader(h)
    ins = [_Entry(a, "c") for a in p_leaves] + [_Entry(h, "h", nr=h.ndim - 1)]
    trace: list = []
    outs = _run(reader, jaxpr, list(closed.consts), ins, trace)
    if len(outs) != 1:
        raise _NotStructured
    out = outs[0]
    if out.kind == "h":
        out = reader.as_L(out)
    nr = out.nr
    if nr is None or out.kind not in ("L", "Z", "Y") or out.val.ndim != nr + 1:
        raise _NotStructured
    if reader.z_root is not None and _sel_key(reader.z_root) != _sel_key(out):
        raise _NotStructured
    select = _rows(tuple(fn for _, fn in out.sel))
    if out.kind == "L":  # an affine section: post = identity
        if out.A.ndim != 2:
            raise _NotStructured
        z = out.val
        return AffineElementwise(W=out.A, z=z, post=lambda a: a, slope=jnp.ones_like(z), V=None, A0=None,
                                 select=select, linear=True)
    root = reader.z_root
    if root is None or root.A is None or root.A.ndim != 2:
        raise _NotStructured
    if out.kind == "Z":
        V, A0, tail = None, None, out
    else:
        V, A0, tail = out.V, out.A0, out.root
    if tail is None or tail.kind != "Z":
        raise _NotStructured
    # the elementwise part, replayed from z: steps with elementwise outputs, or affine values elementwise in z
    steps = [(eqn, ins_e, outs_e) for eqn, ins_e, outs_e in trace
             if all(o.kind == "Z" for o in outs_e)
             or all(o.kind == "L" and o is not root and reader.eroot(o) is root for o in outs_e)]

    def post(zz):
        vals = {id(root): zz}
        for eqn, ins_e, outs_e in steps:
            args = [vals[id(e)] if id(e) in vals else e.val for e in ins_e]
            for e, r in zip(outs_e, _bind(eqn, args)):
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


def _canon(e: _Entry, heads, rest):
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
        raise _NotStructured
    closed = jax.make_jaxpr(f)(params, h)
    jaxpr = closed.jaxpr
    p_leaves = jax.tree.leaves(params)
    if len(jaxpr.invars) != len(p_leaves) + 1:
        raise _NotStructured
    reader = _Reader(h)
    ins = [_Entry(a, "c") for a in p_leaves] + [_Entry(h, "h", nr=h.ndim - 1)]
    trace: list = []
    outs = _run(reader, jaxpr, list(closed.consts), ins, trace)
    att = getattr(reader, "att", {})
    if len(outs) != 1 or outs[0].kind != "YA" or "v" not in att or reader.z_root is not None:
        raise _NotStructured
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
            for e, r in zip(outs_e, _bind(eqn, args)):
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
    except _NotStructured:
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
    except _NotStructured:
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
