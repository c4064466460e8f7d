"""Walking a section's jaxpr for `degenjax._src.structure`: primitive classes, the value record (`Entry`) and
the interpreter loop (`run_jaxpr`), shared by the affine-elementwise reader (structure_reader.py) and the
softmax-attention reader (structure_attention.py)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore


ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
    "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round", "rsqrt",
    "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})
_INLINE = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
_OPAQUE_CALLS = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
AFFINE_UNARY = frozenset({"convert_element_type", "neg", "copy", "copy_p", "reduce_precision"})


class NotStructured(Exception):
    pass


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def add_offset(A0, other: Entry, name: str, out_shape: tuple):
    """The offset ``A0`` of ``y +- other`` where ``other`` is affine in the section input (kind "L")."""
    if tuple(other.val.shape) != out_shape:
        raise NotStructured
    add = -other.A if name == "sub" else other.A
    return add if A0 is None else A0 + add


def bind_eqn(eqn, invals):
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
        if not elementwise_eqn(eqn, ins, shape):
            return False
        for o in eqn.outvars:
            dep[o] = True
    return True


def elementwise_eqn(eqn, ins: list[bool], shape) -> bool:
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
    if name in ELEMENTWISE:
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


class Entry:
    """A value of the section with what is known about its dependence on ``h``.

    kind: "c" (constant), "h" (rows of h, selected), "L" (``h_s @ A + const``), "Z" (elementwise in the root value),
    "Y" (``post(z) @ V [+ h_s @ A0] + const``). ``nr`` is the number of row axes (leading) and ``sel`` the row
    selection ``((key, fn), ...)`` applied to ``h`` to get them.
    """

    __slots__ = ("val", "kind", "A", "root", "V", "A0", "sel", "vary", "nr")

    def __init__(self, val, kind, A=None, root=None, V=None, A0=None, sel=(), vary=None, nr=None):
        self.val, self.kind, self.A, self.root, self.V, self.A0, self.sel, self.vary, self.nr = (
            val, kind, A, root, V, A0, sel, vary, nr)


def sel_key(e: Entry):
    return tuple(k for k, _ in e.sel)


def row_selection(eqn, nr: int):
    """``(key, fn)`` when a slice/squeeze acts on row axes only (features untouched), `FEATURES` when it acts on
    feature axes only, else raises. ``fn`` applies the selection to any array with these rows and one feature axis."""
    name = eqn.primitive.name
    shape = tuple(eqn.invars[0].aval.shape)
    if name == "squeeze":
        dims = tuple(a % len(shape) for a in eqn.params["dimensions"])
        if all(a >= nr for a in dims):
            return FEATURES
        if any(a >= nr for a in dims):
            raise NotStructured
        return ((name, dims), lambda a: jax.lax.squeeze(a, dims))
    if name == "slice":
        st, lim, strd = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
        strd = (1,) * len(st) if strd is None else tuple(strd)
        rows_full = all(st[i] == 0 and lim[i] == shape[i] and strd[i] == 1 for i in range(nr))
        feats_full = all(st[i] == 0 and lim[i] == shape[i] and strd[i] == 1 for i in range(nr, len(shape)))
        if rows_full:
            return FEATURES
        if not feats_full:
            raise NotStructured
        st_r, lim_r, strd_r = tuple(st[:nr]), tuple(lim[:nr]), tuple(strd[:nr])
        return ((name, st_r, lim_r, strd_r),
                lambda a: jax.lax.slice(a, st_r + (0,), lim_r + (a.shape[-1],), strd_r + (1,)))
    raise NotStructured



FEATURES = object()  # marks a slice or squeeze of feature axes only (an affine operation, not a row selection)


def _live_eqns(jaxpr):
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(o in needed for o in eqn.outvars) or eqn.effects:
            live.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live[::-1]


def run_jaxpr(reader, jaxpr, consts, in_entries, trace: list):
    """Interprets ``jaxpr`` (inlining plain calls); ``trace`` collects ``(eqn, in entries, out entries)``."""
    env: dict[Any, Entry] = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = Entry(c, "c")
    for v, e in zip(jaxpr.invars, in_entries):
        env[v] = e

    def rd(v):
        if isinstance(v, jcore.Literal):
            return Entry(np.asarray(v.val, dtype=v.aval.dtype), "c", vary=set())
        return env[v]

    for eqn in _live_eqns(jaxpr):
        ins = [rd(v) for v in eqn.invars]
        name = eqn.primitive.name
        if (name in _INLINE and any(e.kind != "c" for e in ins)) or (
                name in _OPAQUE_CALLS and any(e.kind == "S" for e in ins)):
            inner, iconsts = _open(_inner_jaxpr(eqn))
            outs = run_jaxpr(reader, inner, iconsts, ins, trace)
        else:
            outs = reader.step(eqn, ins)
            trace.append((eqn, ins, outs))
        for o, e in zip(eqn.outvars, outs):
            env[o] = e
    return [rd(v) for v in jaxpr.outvars]
