"""Networks as sequences of pure sections (DESIGN.md section 1).

A model is a sequence of functions ``f_l(params, h_l) -> h_{l+1}``; node layer ``l`` is the *input* of section
``l`` and ``h_L`` is the output. Adapters build sections from Flax linen and nnx modules by splitting them at named
submodules: node layer ``l >= 1`` is the input of the ``l``-th named submodule.
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
    """

    fns: tuple[Section, ...]
    names: tuple[str, ...] | None = None

    def __post_init__(self):
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


def as_sections(model) -> Sections:
    """Normalises a model given as `Sections` or a sequence of section functions."""
    if isinstance(model, Sections):
        return model
    if callable(model):
        return Sections((model,))
    if isinstance(model, Sequence):
        return Sections(tuple(model))
    raise ValueError(
        f"Expected a degenjax.Sections or a list of functions f(params, h); got {type(model).__name__}. "
        "Build one with degenjax.from_linen / degenjax.from_nnx."
    )


def forward(model, params, x) -> tuple[jax.Array, list[jax.Array]]:
    """Runs the sections in order.

    Args:
      model: `Sections` or a list of functions ``f_l(params, h)``.
      params: parameters passed unchanged to every section.
      x: the input batch ``h_0``, shape ``(batch, ..., d_0)``.

    Returns:
      ``(out, acts)`` with ``out = h_L`` and ``acts = [h_0, ..., h_{L-1}]`` (the node layers).
    """
    model = as_sections(model)
    acts = []
    h = x
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


def from_linen(module, split_at: Sequence[str], example_input, *, method: str | None = None,
               apply_kwargs: dict | None = None) -> Sections:
    """Splits a linen module into sections at named submodules.

    Node layer 0 is the module input; node layer ``l >= 1`` is the input of submodule ``split_at[l-1]`` (a
    ``/``-separated scope path such as ``"block/mlp"``); the last section ends at the module output. Sections
    take the full variables dict (``{"params": ...}``) as ``params``.

    Sections after the first re-run the module from a zero input of the shape of ``example_input`` and replace
    the split submodule's input by ``h``; under ``jax.jit`` the unused prefix is removed by dead-code elimination.

    Args:
      module: a ``flax.linen.Module``.
      split_at: scope paths of the submodules whose inputs are node layers, in call order.
      example_input: an input batch (array or pytree with a leading batch axis) fixing shapes and dtypes.
      method: optional method name to apply instead of ``__call__``.
      apply_kwargs: extra keyword arguments for ``module.apply`` (e.g. ``{"train": False}``).

    Returns:
      `Sections` with ``len(split_at) + 1`` sections.
    """
    import flax.linen as nn

    split_at = tuple(split_at)
    if len(set(split_at)) != len(split_at):
        raise ValueError(f"split_at has repeated names: {split_at}; each submodule can start one node layer.")
    apply_kwargs = dict(apply_kwargs or {})
    bounds = (None,) + split_at + (None,)

    def make(start: str | None, stop: str | None) -> Section:
        def section(variables, h):
            seen = {"start": start is None, "stop": False}

            def interceptor(next_fun, args, kwargs, context):
                if context.method_name == "__call__":
                    path = _linen_path(context.module)
                    if stop is not None and path == stop and seen["start"]:
                        raise _Exit(args[0])
                    if start is not None and path == start and not seen["start"]:
                        seen["start"] = True
                        return next_fun(h, *args[1:], **kwargs)
                return next_fun(*args, **kwargs)

            x = h if start is None else _zeros_like_input(example_input, _leading_dim(h))
            kw = dict(apply_kwargs)
            if method is not None:
                kw["method"] = method
            with nn.intercept_methods(interceptor):
                try:
                    out = module.apply(variables, x, **kw)
                except _Exit as e:
                    return e.value
            if not seen["start"]:
                raise ValueError(f"from_linen: submodule {start!r} was never called; check split_at against the "
                                 "module's scope paths (e.g. 'Dense_0' or 'block/mlp').")
            if stop is not None:
                raise ValueError(f"from_linen: submodule {stop!r} was never called; check split_at.")
            return out

        section.__name__ = f"linen_section_{start or 'input'}_to_{stop or 'output'}"
        return section

    fns = tuple(make(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return Sections(fns, names=("input",) + split_at)


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


def from_nnx(graphdef, split_at: Sequence[str], example_input, *, method: str | None = None) -> Sections:
    """Splits an nnx module into sections at named submodules.

    Use with ``graphdef, state = nnx.split(model)``; the sections take ``state`` as ``params``. Node layer
    ``l >= 1`` is the input of submodule ``split_at[l-1]`` (a ``.``-separated attribute path, e.g. ``"blocks.0"``).
    Each section merges a fresh copy of the module, so the user's module is never modified.

    Args:
      graphdef: the ``GraphDef`` from ``nnx.split`` (an ``nnx.Module`` is accepted and split here).
      split_at: attribute paths of the submodules whose inputs are node layers, in call order.
      example_input: an input batch fixing shapes and dtypes for the later sections.
      method: optional method name to call instead of ``__call__``.

    Returns:
      `Sections` with ``len(split_at) + 1`` sections.
    """
    from flax import nnx

    if isinstance(graphdef, nnx.Module):
        graphdef, _ = nnx.split(graphdef)
    split_at = tuple(split_at)
    bounds = (None,) + split_at + (None,)

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

    def make(start: str | None, stop: str | None) -> Section:
        def section(state, h):
            model = nnx.merge(graphdef, state)
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
                return e.value
            if stop is not None:
                raise ValueError(f"from_nnx: submodule {stop!r} was never called; check split_at.")
            return out

        section.__name__ = f"nnx_section_{start or 'input'}_to_{stop or 'output'}"
        return section

    fns = tuple(make(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return Sections(fns, names=("input",) + split_at)
