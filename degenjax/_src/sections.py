"""Networks as sequences of pure sections (arXiv 2405.10928, section 2).

A model is a sequence of functions ``f_l(params, h_l) -> h_{l+1}``; node layer ``l`` is the *input* of section
``l`` and ``h_L`` is the output. Adapters build sections from Flax linen and nnx modules by splitting them at named
submodules: node layer ``l >= 1`` is the input of the ``l``-th named submodule.

The constant (bias) direction. Each node layer carries a constant coordinate ``1`` (the bias direction of the LIB
paper). Two conventions:

- ``constant="last"`` (folded, the LIB paper's and ApolloResearch rib's convention): the sections are written on
  *folded* node layers ``f = (h, c)`` whose last feature is the constant ``c = 1``; every bias of a section is
  multiplied by the constant of its input (``x W + b`` becomes ``(x, c) [W; b]``) and each section returns its next
  node layer with the constant last (the last section returns the raw output). The constant is then an input like
  any other: Jacobians differentiate it, and the constant node has interaction edges (bias contributions).
  `from_linen`, `from_nnx` and `degenjax.models` fold the biases of Flax models for you.
- ``constant="append"``: plain sections on ``h``; the library appends the constant itself, which then has no
  derivative (no bias is tied to it). This is the folded convention for a model without biases on the constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Section = Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Sections:
    """A network as a tuple of pure sections ``f_l(params, h) -> h_next``.

    Attributes:
      fns: the sections, applied in order.
      names: optional human-readable names of the node layers (the inputs of the sections).
      constant: ``"append"`` (plain sections on ``h``; the library appends the constant coordinate) or ``"last"``
        (sections written on folded node layers ``(h, 1)``, the constant last; see the module docstring).
      fold_input: with ``constant="last"``, whether the batches are raw inputs to which `forward` appends the
        constant (True for the Flax adapters) or already folded node layers (False).
    """

    fns: tuple[Section, ...]
    names: tuple[str, ...] | None = None
    constant: str = "append"
    fold_input: bool = False

    def __post_init__(self):
        if self.constant not in ("append", "last"):
            raise ValueError(f"Sections: constant must be 'append' or 'last'; got {self.constant!r}.")
        if self.fold_input and self.constant != "last":
            raise ValueError("Sections: fold_input=True needs constant='last' (folded node layers).")
        fns = tuple(self.fns)
        if not fns:
            raise ValueError("Sections needs at least one section function; got an empty sequence.")
        for i, f in enumerate(fns):
            if not callable(f):
                raise ValueError(f"Section {i} is not callable (got {type(f).__name__}); pass functions f(params, h).")
        object.__setattr__(self, "fns", fns)
        if self.names is not None:
            names = tuple(str(n) for n in self.names)
            if len(names) != len(fns):
                raise ValueError(f"Sections got {len(names)} names for {len(fns)} sections; pass one name per node layer.")
            object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return len(self.fns)

    def __getitem__(self, i):
        return self.fns[i]

    def __iter__(self):
        return iter(self.fns)

    def layer_name(self, l: int) -> str:
        """Name of node layer ``l`` (the input of section ``l``)."""
        return self.names[l] if self.names is not None else f"layer {l}"


def as_sections(model, constant: str | None = None) -> Sections:
    """Normalises a model given as `Sections` or a sequence of section functions.

    Args:
      model: `Sections`, a section function, or a sequence of them.
      constant: None keeps the model's own convention (``"append"`` for plain functions); ``"append"`` or
        ``"last"`` sets it (see the module docstring).
    """
    if constant is not None and constant not in ("append", "last"):
        raise ValueError(f"constant must be None, 'append' or 'last'; got {constant!r}.")
    if isinstance(model, Sections):
        if constant is None or constant == model.constant:
            return model
        return dataclasses.replace(model, constant=constant, fold_input=model.fold_input and constant == "last")
    if callable(model):
        return Sections((model,), constant=constant or "append")
    if isinstance(model, Sequence):
        return Sections(tuple(model), constant=constant or "append")
    raise ValueError(
        f"Expected a degenjax.Sections or a list of functions f(params, h); got {type(model).__name__}. "
        "Build one with degenjax.from_linen / degenjax.from_nnx."
    )


def append_constant(x):
    """``(x, 1)``: a trailing constant feature appended to an array ``(..., d)`` (a folded node layer)."""
    if not isinstance(x, (jax.Array, jax.core.Tracer)) and not hasattr(x, "shape"):
        raise ValueError(f"folding the input needs one array (..., d); got {type(x).__name__}. Pass folded "
                         "batches with Sections(..., fold_input=False), or build the sections with fold_bias=False.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"folding the input appends a constant feature 1, which needs a floating-point input; got "
                         f"dtype {x.dtype}. Cast the batches (e.g. one-hot tokens as float).")
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def node_input(model: Sections, x):
    """Node layer 0 for a model input ``x`` (the input with the constant appended when ``model.fold_input``)."""
    return append_constant(x) if model.fold_input else x


def forward(model, params, x) -> tuple[jax.Array, list[jax.Array]]:
    """Runs the sections in order.

    Args:
      model: `Sections` or a list of functions ``f_l(params, h)``.
      params: parameters passed unchanged to every section.
      x: the input batch, shape ``(batch, ..., d_0)``: ``h_0`` itself, or the raw input for a model with
        ``fold_input=True`` (then ``h_0 = (x, 1)``).

    Returns:
      ``(out, acts)`` with ``out = h_L`` and ``acts = [h_0, ..., h_{L-1}]`` (the node layers).
    """
    model = as_sections(model)
    acts = []
    h = node_input(model, x)
    for f in model.fns:
        acts.append(h)
        h = f(params, h)
    return h, acts


def section_shapes(model, params, x) -> list[jax.ShapeDtypeStruct]:
    """Shapes of ``[h_0, ..., h_L]`` for an input like ``x``, without computing anything.

    Raises:
      ValueError: naming the section that rejected its input (e.g. a feature size that does not match).
    """
    model = as_sections(model)
    h = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)
    if model.fold_input:
        h = jax.eval_shape(lambda a: node_input(model, a), h)
    shapes = [h]
    for l, f in enumerate(model.fns):
        try:
            h = jax.eval_shape(f, params, h)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            got = jax.tree.map(lambda s: tuple(s.shape), h)
            raise ValueError(
                f"Section {l} ({model.layer_name(l)}) failed on an input of shape {got}: {err}. "
                "Check that the batch's trailing (feature) axes match what the model expects."
            ) from err
        shapes.append(h)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# Flax adapters


class _Exit(Exception):
    """Carries the input of the submodule where a section ends."""

    def __init__(self, value):
        super().__init__("section exit")
        self.value = value


def _zeros_like_input(example, batch: int):
    return jax.tree.map(lambda a: jnp.zeros((batch,) + tuple(jnp.shape(a)[1:]), jnp.result_type(a)), example)


def _leading_dim(h) -> int:
    return jax.tree.leaves(h)[0].shape[0]


def _linen_path(module) -> str | None:
    scope = getattr(module, "scope", None)
    return None if scope is None else "/".join(scope.path)


def _fold_output(y, bias, c):
    """``y + (c - 1) b``: the value of ``y`` (``c = 1`` on the data) with the bias ``b`` tied to the constant ``c``.

    ``c`` has shape ``rows + (1,)``; the bias is tied where ``y = rows + bias.shape`` (a bias added per row, as in
    Dense, DenseGeneral, Conv, LayerNorm); anywhere else ``y`` is returned unchanged (that bias stays untied).
    """
    if bias is None or c is None or not hasattr(y, "shape") or not jnp.issubdtype(jnp.result_type(y), jnp.floating):
        return y
    b = jnp.asarray(bias)
    k = b.ndim
    if k == 0 or y.ndim < k or tuple(y.shape[y.ndim - k:]) != tuple(b.shape) or tuple(y.shape[:y.ndim - k]) != tuple(
            c.shape[:-1]):
        return y
    rows = tuple(c.shape[:-1])
    cb = jnp.reshape(c - jnp.ones((), c.dtype), rows + (1,) * k).astype(y.dtype)
    return y + cb * jnp.reshape(b.astype(y.dtype), (1,) * len(rows) + tuple(b.shape))


def _folded_output(out, c, l, name):
    """``(out, c)``: the next folded node layer, the constant carried over from the section input."""
    if not hasattr(out, "shape") or tuple(out.shape[:-1]) != tuple(c.shape[:-1]):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"fold_bias: section {l} ({name}) maps positions {tuple(c.shape[:-1])} to an output of shape "
                         f"{got}; the constant can only be carried to a node layer with the same leading (batch, "
                         "position) axes. Split the model elsewhere, write folded sections by hand "
                         "(Sections(..., constant='last')), or use fold_bias=False.")
    return jnp.concatenate([out, c.astype(out.dtype)], axis=-1)


def from_linen(module, split_at: Sequence[str], example_input, *, method: str | None = None,
               apply_kwargs: dict | None = None, fold_bias: bool = True) -> Sections:
    """Splits a linen module into sections at named submodules.

    Node layer 0 is the module input; node layer ``l >= 1`` is the input of submodule ``split_at[l-1]`` (a
    ``/``-separated scope path such as ``"block/mlp"``); the last section ends at the module output. Sections
    take the full variables dict (``{"params": ...}``) as ``params``.

    With ``fold_bias=True`` (the default; arXiv 2405.10928, section 2) the node layers are folded: ``h_l`` ends
    with a constant feature 1, and every parameter named ``bias`` of a submodule that runs inside a section is
    multiplied by the constant of its rows, so Jacobians and edges see the biases through the constant direction.
    The sections then take folded inputs and return folded node layers (the last section the raw output); the
    returned `Sections` has ``constant="last"`` and ``fold_input=True``, so batches are raw inputs (a single
    floating-point array) and `degenjax.forward` appends the constant. Biases added to rows other than the
    section input's (e.g. after a position read-out) are not tied. With ``fold_bias=False`` the sections work on
    ``h`` and the library appends a constant without derivative (``constant="append"``).

    Sections after the first re-run the module from a zero input of the shape of ``example_input`` and replace
    the split submodule's input by ``h``; under ``jax.jit`` the unused prefix is removed by dead-code elimination.

    Args:
      module: a ``flax.linen.Module``.
      split_at: scope paths of the submodules whose inputs are node layers, in call order.
      example_input: an input batch (array or pytree with a leading batch axis) fixing shapes and dtypes.
      method: optional method name to apply instead of ``__call__``.
      apply_kwargs: extra keyword arguments for ``module.apply`` (e.g. ``{"train": False}``).
      fold_bias: fold the biases into a constant input coordinate (see above).

    Returns:
      `Sections` with ``len(split_at) + 1`` sections.
    """
    import flax.linen as nn

    split_at = tuple(split_at)
    if len(set(split_at)) != len(split_at):
        raise ValueError(f"split_at has repeated names: {split_at}; each submodule can start one node layer.")
    apply_kwargs = dict(apply_kwargs or {})
    bounds = (None,) + split_at + (None,)
    names = ("input",) + split_at

    def make(l: int, start: str | None, stop: str | None) -> Section:
        def section(variables, h):
            c = None
            if fold_bias:
                c = h[..., -1:]
                h = h[..., :-1]
            seen = {"start": start is None, "stop": False}

            def fold(y, ctx):
                if c is None or not seen["start"] or not ctx.module.has_variable("params", "bias"):
                    return y
                return _fold_output(y, ctx.module.get_variable("params", "bias"), c)

            def interceptor(next_fun, args, kwargs, context):
                if context.method_name == "__call__":
                    path = _linen_path(context.module)
                    if stop is not None and path == stop and seen["start"]:
                        raise _Exit(args[0])
                    if start is not None and path == start and not seen["start"]:
                        seen["start"] = True
                        return fold(next_fun(h, *args[1:], **kwargs), context)
                    return fold(next_fun(*args, **kwargs), context)
                return next_fun(*args, **kwargs)

            x = h if start is None else _zeros_like_input(example_input, _leading_dim(h))
            kw = dict(apply_kwargs)
            if method is not None:
                kw["method"] = method
            with nn.intercept_methods(interceptor):
                try:
                    out = module.apply(variables, x, **kw)
                except _Exit as e:
                    return e.value if c is None else _folded_output(e.value, c, l, names[l])
            if not seen["start"]:
                raise ValueError(f"from_linen: submodule {start!r} was never called; check split_at against the "
                                 "module's scope paths (e.g. 'Dense_0' or 'block/mlp').")
            if stop is not None:
                raise ValueError(f"from_linen: submodule {stop!r} was never called; check split_at.")
            return out

        section.__name__ = f"linen_section_{start or 'input'}_to_{stop or 'output'}"
        return section

    fns = tuple(make(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return Sections(fns, names=names, constant="last" if fold_bias else "append", fold_input=bool(fold_bias))


def _nnx_get(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _nnx_set(obj, path: str, value):
    *parents, last = path.split(".")
    parent = _nnx_get(obj, ".".join(parents)) if parents else obj
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def _nnx_bias(module):
    from flax import nnx

    b = getattr(module, "bias", None)
    return b[...] if isinstance(b, nnx.Variable) and b.get_value() is not None else None


def from_nnx(graphdef, split_at: Sequence[str], example_input, *, method: str | None = None,
             fold_bias: bool = True) -> Sections:
    """Splits an nnx module into sections at named submodules.

    Use with ``graphdef, state = nnx.split(model)``; the sections take ``state`` as ``params``. Node layer
    ``l >= 1`` is the input of submodule ``split_at[l-1]`` (a ``.``-separated attribute path, e.g. ``"blocks.0"``).
    Each section merges a fresh copy of the module, so the user's module is never modified. ``fold_bias`` works
    as in `from_linen`: every submodule with a ``bias`` parameter has it multiplied by the constant of its rows.

    Args:
      graphdef: the ``GraphDef`` from ``nnx.split`` (an ``nnx.Module`` is accepted and split here).
      split_at: attribute paths of the submodules whose inputs are node layers, in call order.
      example_input: an input batch fixing shapes and dtypes for the later sections.
      method: optional method name to call instead of ``__call__``.
      fold_bias: fold the biases into a constant input coordinate (default; see `from_linen`).

    Returns:
      `Sections` with ``len(split_at) + 1`` sections.
    """
    from flax import nnx

    if isinstance(graphdef, nnx.Module):
        graphdef, _ = nnx.split(graphdef)
    split_at = tuple(split_at)
    bounds = (None,) + split_at + (None,)
    names = ("input",) + split_at

    class _Hook(nnx.Module):
        """Stands in for a submodule: feeds it the section input (start) or ends the section (stop)."""

        def __init__(self, inner, mode, get_input):
            self.inner = inner
            self.mode = mode
            self.get_input = get_input  # a closure, so no array is stored as a module attribute

        def __call__(self, v, *args, **kwargs):
            if self.mode == "stop":
                raise _Exit(v)
            return self.inner(self.get_input(), *args, **kwargs)

    class _Fold(nnx.Module):
        """Stands in for a submodule with a bias: ties that bias to the constant of the section input."""

        def __init__(self, inner, get_c):
            self.inner = inner
            self.get_c = get_c

        def __call__(self, *args, **kwargs):
            return _fold_output(self.inner(*args, **kwargs), _nnx_bias(self.inner), self.get_c())

    def make(l: int, start: str | None, stop: str | None) -> Section:
        def section(state, h):
            model = nnx.merge(graphdef, state)
            c = None
            if fold_bias:
                c = h[..., -1:]
                h = h[..., :-1]
                get_c = lambda: c  # noqa: E731
                found = [(".".join(str(k) for k in path), m) for path, m in nnx.iter_modules(model)
                         if path and _nnx_bias(m) is not None]
                for path, m in sorted(found, key=lambda pm: -len(pm[0].split("."))):  # deepest first
                    _nnx_set(model, path, _Fold(m, get_c))
            get_input = lambda: h  # noqa: E731
            try:
                if start is not None:
                    _nnx_set(model, start, _Hook(_nnx_get(model, start), "start", get_input))
                if stop is not None:
                    _nnx_set(model, stop, _Hook(_nnx_get(model, stop), "stop", get_input))
            except (AttributeError, IndexError, KeyError) as err:
                raise ValueError(f"from_nnx: no submodule at {start if stop is None else stop!r} ({err}); "
                                 "use '.'-separated attribute paths such as 'mlp' or 'blocks.0'.") from err
            x = h if start is None else _zeros_like_input(example_input, _leading_dim(h))
            fn = model if method is None else getattr(model, method)
            try:
                out = fn(x)
            except _Exit as e:
                return e.value if c is None else _folded_output(e.value, c, l, names[l])
            if stop is not None:
                raise ValueError(f"from_nnx: submodule {stop!r} was never called; check split_at.")
            if c is not None and start is None and _nnx_bias(model) is not None:
                out = _fold_output(out, _nnx_bias(model), c)
            return out

        section.__name__ = f"nnx_section_{start or 'input'}_to_{stop or 'output'}"
        return section

    fns = tuple(make(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return Sections(fns, names=names, constant="last" if fold_bias else "append", fold_input=bool(fold_bias))
