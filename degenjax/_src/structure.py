"""Recognising sections of the form ``f(h) = phi(h @ W)`` with ``phi`` elementwise, for exact fast Jacobian paths.

Dense layers followed by an elementwise activation (any bias, scale or pointwise nonlinearity, per unit or per
example) are the bulk of MLPs. For them the per-example Jacobian factorises: with ``z = h @ W`` and
``s = phi'(z)`` (elementwise), ``d f_k / d h_j = W_{jk} s_k``, so

- the Jacobian Gram to target coordinates ``f(h) @ B`` is ``M = W [(B B^T) o E(s s^T)] W^T`` (``o`` the Hadamard
  product): one ``(d_k, d_k)`` Gram of ``s`` over the data instead of a ``(d_out, d_in)`` Jacobian per example;
- the gradient-times-activation edges (DESIGN section 3) are ``E_ij = E[ h^_j^2 (sum_k A_jk s_k B_ki)^2 ]`` with
  ``A = C^+ W``: one large matrix product per chunk of examples.

Both are exact (the same maths as the per-example Jacobian), not approximations. The structure is read from the
section's jaxpr: ``h`` may only enter one ``dot_general`` that contracts its last axis with a 2-D matrix that does
not depend on ``h``; every operation after it must be elementwise on arrays of that product's shape (constants may
be scalars or arrays of the same shape). Anything else (residual connections, attention, reshapes, reductions over
features) falls back to the general ``vmap``-of-``vjp``/``jvp`` path.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

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
    """``f(h) = post(h @ W)`` with ``post`` elementwise.

    Attributes:
      W: ``(d_in, d_k)`` matrix contracted with the last axis of ``h``.
      z: ``h @ W``, shape ``h.shape[:-1] + (d_k,)``.
      post: the elementwise rest of the section, ``z -> f(h)``.
      slope: ``post'(z)`` elementwise, shape of ``z`` (the diagonal of its Jacobian).
    """

    W: jax.Array
    z: jax.Array
    post: Callable[[jax.Array], jax.Array]
    slope: jax.Array


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
    if any(tuple(o.aval.shape) != tuple(shape) for o in eqn.outvars):
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


def _split(f, params, h) -> AffineElementwise:
    closed = jax.make_jaxpr(f)(params, h)
    jaxpr = closed.jaxpr
    p_leaves = jax.tree.leaves(params)
    if len(jaxpr.invars) != len(p_leaves) + 1:
        raise _NotStructured
    env: dict[Any, Any] = {}
    kind: dict[Any, str] = {}  # "c": does not depend on h; "h": h (maybe cast); "z": elementwise function of h @ W
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v], kind[v] = c, "c"
    for v, a in zip(jaxpr.invars, p_leaves + [h]):
        env[v], kind[v] = a, "c"
    kind[jaxpr.invars[-1]] = "h"
    z_var, W, post_eqns = None, None, []
    for eqn in _live_eqns(jaxpr):
        ins = ["c" if isinstance(v, jcore.Literal) else kind[v] for v in eqn.invars]
        name = eqn.primitive.name
        if all(k == "c" for k in ins):
            out, k_out = _bind(eqn, [_read(env, v) for v in eqn.invars]), "c"
        elif "h" in ins:
            if name == "convert_element_type" and ins == ["h"]:
                k_out = "h"
            elif (name == "dot_general" and z_var is None and ins == ["h", "c"]
                  and eqn.invars[1].aval.ndim == 2 and not eqn.params.get("out_sharding")):
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                if tuple(lc) != (eqn.invars[0].aval.ndim - 1,) or tuple(rc) != (0,) or lb or rb:
                    raise _NotStructured
                k_out = "z"
            else:
                raise _NotStructured
            out = _bind(eqn, [_read(env, v) for v in eqn.invars])
            if k_out == "z":
                z_var, W = eqn.outvars[0], _read(env, eqn.invars[1])
        else:  # z-dependent, no h: must be elementwise on z's shape
            if z_var is None or not _elementwise_eqn(eqn, [k == "z" for k in ins], z_var.aval.shape):
                raise _NotStructured
            post_eqns.append(eqn)
            out, k_out = _bind(eqn, [_read(env, v) for v in eqn.invars]), "z"
        for o, val in zip(eqn.outvars, out):
            env[o], kind[o] = val, k_out
    if z_var is None or len(jaxpr.outvars) != 1:
        raise _NotStructured
    out_var = jaxpr.outvars[0]
    if isinstance(out_var, jcore.Literal) or kind[out_var] != "z" or tuple(out_var.aval.shape) != tuple(
            z_var.aval.shape):
        raise _NotStructured
    consts = {v: val for v, val in env.items() if kind[v] == "c"}

    def post(z):
        e = dict(consts)
        e[z_var] = z
        for eqn in post_eqns:
            for o, val in zip(eqn.outvars, _bind(eqn, [_read(e, v) for v in eqn.invars])):
                e[o] = val
        return e[out_var]

    z = env[z_var]
    _, slope = jax.jvp(post, (z,), (jnp.ones_like(z),))
    return AffineElementwise(W=W, z=z, post=post, slope=slope)


def affine_elementwise(f, params, h) -> AffineElementwise | None:
    """``f(params, h) = post(h @ W)`` with ``post`` elementwise, or None when the section is not of that form.

    Works on concrete and traced ``params``/``h`` (inside ``jax.jit``, ``vmap`` or ``shard_map``); the decision
    depends only on the section's jaxpr, never on values.

    Args:
      f: a section ``f(params, h)``.
      params: its params.
      h: an input batch ``(batch, [positions...,] d_in)``; a single array.

    Returns:
      `AffineElementwise` (``W``, ``z = h @ W``, ``post``, ``slope = post'(z)``), or None.
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
    """Which sections take the exact dense-plus-elementwise fast path in Jacobian Grams and edges.

    Args:
      model: `Sections` (or a list of functions).
      params: the model's params.
      x: an input batch.

    Returns:
      One bool per section: True where the section is ``phi(h @ W)`` with ``phi`` elementwise.
    """
    from degenjax._src.sections import as_sections  # noqa: PLC0415 - avoid an import cycle

    model = as_sections(model)
    flags = []
    h = x
    for f in model.fns:
        flags.append(affine_elementwise(f, params, h) is not None)
        h = f(params, h)
    return tuple(flags)
