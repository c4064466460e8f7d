"""Recognising sections ``f(h) = [h_s +] phi(h_s @ W) [@ V + c]``, ``phi`` elementwise, for exact fast Jacobians.

Dense layers followed by an elementwise activation (any bias, scale or pointwise nonlinearity, per unit or per
example), optionally followed by an output projection ``V`` and a residual connection (a transformer's MLP block),
applied to every position or to selected positions ``h_s`` (e.g. a read-out at the last position), are the bulk of
MLPs and transformers outside attention. For them the per-row Jacobian factorises: with ``z = h_s @ W`` and
``s = phi'(z)`` (elementwise), ``J = [I +] W diag(s) V``, so

- the Jacobian Gram to target coordinates ``f(h) @ B`` is ``W [(Q Q^T) o E(s s^T)] W^T`` with ``Q = V B`` (plus
  cross terms in ``E(s)`` for a residual connection): one ``(d_k, d_k)`` Gram of ``s`` over the data instead of a
  ``(d_out, d_in)`` Jacobian per example;
- the gradient-times-activation edges (DESIGN section 3) are ``E_ij = E[ h^_j^2 (A0 + A diag(s) B)_ji^2 ]`` with
  ``A = C^+ W``, ``B = V C'`` and ``A0 = C^+ C'`` (residual only): one large matrix product per chunk of rows.

Both are exact (the same maths as the per-example Jacobian), not approximations. The structure is read from the
section's jaxpr: ``h`` may be cast, sliced or squeezed along position axes (never features), then enter one
``dot_general`` that contracts its last axis with a 2-D matrix not depending on ``h``; after it come elementwise
operations on arrays of that product's shape (constants may be scalars or broadcast arrays), optionally one more such
product with a constant matrix, constant (bias) additions, and the addition of ``h_s`` itself. Anything else
(attention, reshapes, reductions over features, several products of ``h``) takes the general ``vmap``-of-``vjp``/
``jvp`` path.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from degenjax._src.sections import as_sections

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
    "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round", "rsqrt",
    "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})
_CALLS = ("jit", "pjit", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "closed_call", "core_call",
          "remat", "checkpoint")


class AffineElementwise(NamedTuple):
    """``f(h) = [h_s +] post(h_s @ W) [@ V + c]`` with ``post`` elementwise and ``h_s = select(h)``.

    Attributes:
      W: ``(d_in, d_k)`` matrix contracted with the last axis of ``h_s``.
      z: ``h_s @ W``, shape ``h_s.shape[:-1] + (d_k,)``.
      post: the elementwise part, ``z -> post(z)``.
      slope: ``post'(z)`` elementwise, shape of ``z`` (the diagonal of its Jacobian).
      V: None, or the ``(d_k, d_out)`` output projection applied after ``post`` (plus a constant).
      skip: whether ``h_s`` itself is added to the output (a residual connection; then ``d_out = d_in``).
      select: the row selection ``h -> h_s`` (slices and squeezes of position axes; the identity for most
        sections), applicable to any array with ``h``'s leading axes (e.g. basis coordinates of ``h``).
    """

    W: jax.Array
    z: jax.Array
    post: Callable[[jax.Array], jax.Array]
    slope: jax.Array
    V: jax.Array | None = None
    skip: bool = False
    select: Callable[[jax.Array], jax.Array] = lambda a: a


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
            return j.jaxpr if hasattr(j, "jaxpr") else j
    return None


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
    if name in _CALLS:
        inner = _inner_jaxpr(eqn)
        if inner is None:
            return False
        n_extra = len(inner.invars) - len(ins)
        if n_extra < 0:
            return False
        return _elementwise_call(inner, [False] * n_extra + ins, shape)
    return False


def _broadcasts(s, shape) -> bool:
    """A constant of shape ``s`` that broadcasts to ``shape`` without moving axes (size-1 axes, same rank)."""
    return len(s) == len(shape) and all(a in (1, b) for a, b in zip(s, shape))


def _live_eqns(jaxpr):
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(o in needed for o in eqn.outvars) or eqn.effects:
            live.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live[::-1]


def _dot_last(eqn) -> bool:
    """``dot_general(x, M)`` contracting the last axis of ``x`` with axis 0 of a 2-D ``M``, no batch axes."""
    if eqn.invars[1].aval.ndim != 2 or eqn.params.get("out_sharding"):
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return tuple(lc) == (eqn.invars[0].aval.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb


def _selection_step(eqn, d: int):
    """A row selection on ``h`` (positions, never features) as a function of any array with ``h``'s leading axes."""
    name = eqn.primitive.name
    if name == "convert_element_type":
        return None
    if name == "squeeze":
        dims = tuple(eqn.params["dimensions"])
        nd = eqn.invars[0].aval.ndim
        if any(a % nd == nd - 1 for a in dims):
            raise _NotStructured
        return lambda a: jax.lax.squeeze(a, dims)
    if name == "slice":
        start, limit, strides = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
        if start[-1] != 0 or limit[-1] != d or (strides is not None and strides[-1] != 1):
            raise _NotStructured
        return lambda a: jax.lax.slice(a, tuple(start[:-1]) + (0,), tuple(limit[:-1]) + (a.shape[-1],),
                                       None if strides is None else tuple(strides))
    raise _NotStructured


def _split(f, params, h) -> AffineElementwise:
    closed = jax.make_jaxpr(f)(params, h)
    jaxpr = closed.jaxpr
    p_leaves = jax.tree.leaves(params)
    if len(jaxpr.invars) != len(p_leaves) + 1:
        raise _NotStructured
    d = h.shape[-1]
    env: dict[Any, Any] = {}
    # kinds: "c" does not depend on h; "h" rows of h (cast, positions selected); "z" elementwise in z = h_sel @ W;
    # "y" = a @ V + const with a a "z" value; "r" = "y" + h_sel (a residual connection)
    kind: dict[Any, str] = {}
    select: dict[Any, tuple] = {}  # "h" var -> the selection steps from the input
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v], kind[v] = c, "c"
    for v, a in zip(jaxpr.invars, p_leaves + [h]):
        env[v], kind[v] = a, "c"
    kind[jaxpr.invars[-1]] = "h"
    select[jaxpr.invars[-1]] = ()
    z_var = W = h_sel = a_var = V = None
    skip = False
    post_eqns = []
    for eqn in _live_eqns(jaxpr):
        ins = ["c" if isinstance(v, jcore.Literal) else kind[v] for v in eqn.invars]
        name = eqn.primitive.name
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if all(k == "c" for k in ins):
            k_out = "c"
        elif ins == ["h"] and name in ("convert_element_type", "squeeze", "slice") and z_var is None:
            step = _selection_step(eqn, d)
            select[eqn.outvars[0]] = select[eqn.invars[0]] + (() if step is None else (step,))
            k_out = "h"
        elif name == "dot_general" and ins == ["h", "c"] and z_var is None and _dot_last(eqn):
            z_var, W, h_sel = eqn.outvars[0], _read(env, eqn.invars[1]), eqn.invars[0]
            k_out = "z"
        elif name == "dot_general" and ins == ["z", "c"] and V is None and _dot_last(eqn):
            a_var, V = eqn.invars[0], _read(env, eqn.invars[1])
            k_out = "y"
        elif set(ins) <= {"z", "c"}:
            if not _elementwise_eqn(eqn, [k == "z" for k in ins], z_var.aval.shape):
                raise _NotStructured
            post_eqns.append(eqn)
            k_out = "z"
        elif name in ("add", "sub") and len(ins) == 2 and set(ins) in ({"y", "c"}, {"r", "c"}):
            # a constant (bias) added to the linear output; "c - y" would flip the sign of V: not accepted
            k_lin, const = (ins[0], eqn.invars[1]) if ins[0] != "c" else (ins[1], eqn.invars[0])
            if (name == "sub" and ins[0] == "c") or not (const.aval.shape == () or _broadcasts(
                    tuple(const.aval.shape), shape)) or tuple(eqn.invars[ins.index(k_lin)].aval.shape) != shape:
                raise _NotStructured
            k_out = k_lin
        elif name == "add" and sorted(ins) == ["h", "y"] and not skip:
            if eqn.invars[ins.index("h")] is not h_sel or eqn.invars[0].aval.shape != eqn.invars[1].aval.shape:
                raise _NotStructured
            skip, k_out = True, "r"
        else:
            raise _NotStructured
        out = _bind(eqn, [_read(env, v) for v in eqn.invars])
        for o, val in zip(eqn.outvars, out):
            env[o], kind[o] = val, k_out
    if z_var is None or len(jaxpr.outvars) != 1:
        raise _NotStructured
    out_var = jaxpr.outvars[0]
    if isinstance(out_var, jcore.Literal) or kind[out_var] not in ("z", "y", "r"):
        raise _NotStructured
    if kind[out_var] == "z" and tuple(out_var.aval.shape) != tuple(z_var.aval.shape):
        raise _NotStructured
    if V is not None and kind[out_var] == "z":
        raise _NotStructured
    tail_var = a_var if V is not None else out_var
    consts = {v: val for v, val in env.items() if kind[v] == "c"}

    def post(z):
        e = dict(consts)
        e[z_var] = z
        for eqn in post_eqns:
            for o, val in zip(eqn.outvars, _bind(eqn, [_read(e, v) for v in eqn.invars])):
                e[o] = val
        return e[tail_var]

    steps = select[h_sel]

    def rows(a):
        for step in steps:
            a = step(a)
        return a

    z = env[z_var]
    _, slope = jax.jvp(post, (z,), (jnp.ones_like(z),))
    return AffineElementwise(W=W, z=z, post=post, slope=slope, V=V, skip=skip, select=rows)


def affine_elementwise(f, params, h) -> AffineElementwise | None:
    """The factorisation ``f(params, h) = [h_s +] post(h_s @ W) [@ V + c]`` (module docstring), or None.

    Works on concrete and traced ``params``/``h`` (inside ``jax.jit``, ``vmap`` or ``shard_map``); the decision
    depends only on the section's jaxpr, never on values.

    Args:
      f: a section ``f(params, h)``.
      params: its params.
      h: an input batch ``(batch, [positions...,] d_in)``; a single array.

    Returns:
      `AffineElementwise` (``W``, ``z = h_s @ W``, ``post``, ``slope = post'(z)``, ``V``, ``skip``, ``select``), or
      None when the section is not of that form.
    """
    if not isinstance(h, jax.Array) or h.ndim < 1 or not jnp.issubdtype(h.dtype, jnp.floating):
        return None
    try:
        return _split(f, params, h)
    except _NotStructured:
        return None
    except (TypeError, ValueError, NotImplementedError, KeyError, AttributeError):
        # a section this reader does not understand (an unusual primitive or parameter): use the general path
        return None


def structured_sections(model, params, x) -> tuple[bool, ...]:
    """Which sections take the exact factorised fast path in Jacobian Grams and edges (module docstring).

    Args:
      model: `Sections` (or a list of functions).
      params: the model's params.
      x: an input batch.

    Returns:
      One bool per section: True where the section is ``[h_s +] phi(h_s @ W) [@ V + c]``, ``phi`` elementwise.
    """
    model = as_sections(model)
    flags = []
    h = x
    for f in model.fns:
        flags.append(affine_elementwise(f, params, h) is not None)
        h = f(params, h)
    return tuple(flags)
