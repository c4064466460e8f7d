"""The abstract interpreter of `degenjax._src.structure`: affine values, the elementwise part and what follows it
(the attention part is mixed in from structure_attention.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.numerics import HIGHEST
from degenjax._src.structure_attention import AttentionReading
from degenjax._src.structure_jaxpr import (
    add_offset,
    AFFINE_UNARY,
    ELEMENTWISE,
    FEATURES,
    bind_eqn,
    elementwise_eqn,
    Entry,
    NotStructured,
    row_selection,
    sel_key,
)


class Reader(AttentionReading):
    """Interprets a section's jaxpr on its input (see the module docstring)."""

    def __init__(self, h):
        self.h = h
        self.d = h.shape[-1]
        self.z_root = None  # the Entry whose value is the pre-activation z
        self.y_seen = False

    # -- helpers ---------------------------------------------------------------------------------------------

    def as_L(self, e: Entry) -> Entry:
        if e.kind == "L":
            return e
        if e.kind != "h":
            raise NotStructured
        return Entry(e.val, "L", A=jnp.eye(self.d, dtype=e.val.dtype), root=None, sel=e.sel, nr=e.nr)

    def same_rows(self, ins) -> Entry:
        """The one non-constant entry's selection (all non-constant inputs must share it)."""
        keys = {sel_key(e) for e in ins if e.kind != "c"}
        if len(keys) != 1:
            raise NotStructured
        return next(e for e in ins if e.kind != "c")

    @staticmethod
    def row_free(e: Entry, full_rank: int, nr: int) -> bool:
        """Whether a constant does not vary along the row axes of an affine value of rank ``full_rank``."""
        s = tuple(np.shape(e.val))
        if len(s) < full_rank:
            s = (1,) * (full_rank - len(s)) + s
        vary = e.vary if e.vary is not None else {i for i, n in enumerate(s) if n > 1}
        return not any(i < nr and s[i] > 1 for i in vary)

    @staticmethod
    def feat_const(e: Entry, full_rank: int, nr: int):
        """A row-free constant restricted to one row: shape ``(1,) + feature shape`` to multiply ``A`` with."""
        v = jnp.asarray(e.val)
        if v.ndim < full_rank:
            v = jnp.reshape(v, (1,) * (full_rank - v.ndim) + v.shape)
        return v[(0,) * nr][None]

    # -- one equation ------------------------------------------------------------------------------------------

    def step(self, eqn, ins: list[Entry]) -> list[Entry]:
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if all(k == "c" for k in kinds):
            vals = bind_eqn(eqn, [e.val for e in ins])
            vary = self.const_vary(eqn, ins)
            return [Entry(v, "c", vary=vary) for v in vals]
        # row selections (positions only) of h or an affine value
        if len(ins) == 1 and kinds[0] in ("h", "L") and name in ("squeeze", "slice"):
            e = ins[0]
            s = row_selection(eqn, e.nr)
            if s is not FEATURES:
                key, fn = s
                nr = e.nr - (len(key[1]) if key[0] == "squeeze" else 0)
                val = bind_eqn(eqn, [e.val])[0]
                return [Entry(val, e.kind, A=e.A, root=None, sel=e.sel + ((key, fn),), nr=nr)]
        if kinds == ["h"] and name == "convert_element_type":
            e = ins[0]
            return [Entry(bind_eqn(eqn, [e.val])[0], "h", sel=e.sel, nr=e.nr)]
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
        raise NotStructured

    def const_vary(self, eqn, ins):
        """Axes along which a constant may vary (for broadcasts of smaller constants)."""
        name = eqn.primitive.name
        if name == "broadcast_in_dim":
            src = ins[0]
            s = tuple(np.shape(src.val))
            dims = tuple(eqn.params["broadcast_dimensions"])
            src_vary = src.vary if src.vary is not None else {i for i, n in enumerate(s) if n > 1}
            return {dims[i] for i in src_vary}
        if name in ELEMENTWISE and len(eqn.outvars) == 1:
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
            v = bind_eqn(eqn, [e.val for e in ins])[0]
            if tuple(v.shape[:nr]) != rows:
                raise NotStructured
            return [Entry(v, "L", A=A, root=eroot, sel=L0.sel, nr=nr)]

        if name in AFFINE_UNARY and len(ins) == 1:
            A = -L0.A if name == "neg" else L0.A
            if name == "convert_element_type":
                A = A.astype(eqn.params["new_dtype"]) if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating) else A
            return new(A, self.eroot(L0))
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            if any(e.kind == "L" and tuple(e.val.shape[:nr]) != tuple(out_shape[:nr]) for e in ins):
                raise NotStructured
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
                raise NotStructured
            A = jax.lax.dot_general(L0.A, ins[1].val.astype(L0.A.dtype),
                                    ((tuple(a - nr + 1 for a in lc), tuple(rc)), ((), ())), precision=HIGHEST)
            return new(A, None)
        if name == "dot_general":
            return None
        if name == "broadcast_in_dim" and kinds[0] == "L":
            dims = tuple(eqn.params["broadcast_dimensions"])
            if dims[:nr] != tuple(range(nr)) or tuple(out_shape[:nr]) != rows:
                raise NotStructured
            shape = (self.d,) + tuple(out_shape[nr:])
            A = jax.lax.broadcast_in_dim(L0.A, shape, (0,) + tuple(a - nr + 1 for a in dims[nr:]))
            return new(A, None)
        if name == "reshape" and kinds[0] == "L":
            if eqn.params.get("dimensions") is not None or tuple(out_shape[:nr]) != rows:
                raise NotStructured
            return new(jnp.reshape(L0.A, (self.d,) + tuple(out_shape[nr:])), None)
        if name == "squeeze" and kinds == ["L"]:
            dims = tuple(a % L0.val.ndim for a in eqn.params["dimensions"])
            if any(a < nr for a in dims):
                raise NotStructured
            return new(jax.lax.squeeze(L0.A, tuple(a - nr + 1 for a in dims)), None)
        if name == "slice" and kinds == ["L"]:
            st, lim, strd = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
            strd = (1,) * len(st) if strd is None else strd
            if any(st[i] != 0 or lim[i] != rows[i] or strd[i] != 1 for i in range(nr)):
                raise NotStructured
            A = jax.lax.slice(L0.A, (0,) + tuple(st[nr:]), (self.d,) + tuple(lim[nr:]), (1,) + tuple(strd[nr:]))
            return new(A, None)
        if name == "transpose" and kinds == ["L"]:
            perm = tuple(eqn.params["permutation"])
            if perm[:nr] != tuple(range(nr)):
                raise NotStructured
            return new(jnp.transpose(L0.A, (0,) + tuple(p - nr + 1 for p in perm[nr:])), None)
        if name == "reduce_sum" and kinds == ["L"]:
            axes = tuple(eqn.params["axes"])
            if any(a < nr for a in axes):
                raise NotStructured
            return new(jnp.sum(L0.A, axis=tuple(a - nr + 1 for a in axes)), None)
        if name == "concatenate":
            dim = eqn.params["dimension"]
            if dim < nr:
                raise NotStructured
            parts = []
            for e in ins:
                if tuple(e.val.shape[:nr]) != rows and e.kind == "L":
                    raise NotStructured
                parts.append(e.A if e.kind == "L" else jnp.zeros((self.d,) + tuple(e.val.shape[nr:]), L0.A.dtype))
            return new(jnp.concatenate(parts, axis=dim - nr + 1), None)
        return None

    def bcast(self, A, out_shape, nr):
        """``A`` broadcast to the feature shape of ``out_shape`` (size-1 feature axes expanded)."""
        shape = (self.d,) + tuple(out_shape[nr:])
        if tuple(A.shape) == shape:
            return A
        if A.ndim != len(shape):
            raise NotStructured
        return jnp.broadcast_to(A, shape)

    def eroot(self, e: Entry):
        """The affine value that ``e`` is an elementwise-affine function of (itself if none)."""
        return e.root if e.root is not None else e

    # -- the elementwise part --------------------------------------------------------------------------------------

    def in_root_family(self, ins) -> bool:
        return any(e.kind == "L" and self.eroot(e) is self.z_root for e in ins)

    def start_z(self, eqn, ins, out_shape) -> bool:
        shape = out_shape
        if not elementwise_eqn(eqn, [e.kind != "c" for e in ins], shape):
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
        if out_shape != shape or not elementwise_eqn(eqn, dep, shape):
            return None
        vals = bind_eqn(eqn, [e.val for e in ins])
        r = self.z_root
        return [Entry(v, "Z", sel=r.sel, nr=r.nr) for v in vals]

    # -- after the elementwise part ---------------------------------------------------------------------------------

    def as_Y(self, e: Entry) -> Entry:
        if e.kind == "Y":
            return e
        if e.kind == "Z":
            return Entry(e.val, "Y", V=None, A0=None, root=e, sel=e.sel, nr=e.nr)
        raise NotStructured

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
                raise NotStructured
            V = ins[1].val
            if V.ndim != 2:
                raise NotStructured
            self.y_seen = True
            v = bind_eqn(eqn, [e.val for e in ins])[0]
            return [Entry(v, "Y", V=V, A0=None, root=z, sel=z.sel, nr=nr)]
        if name == "convert_element_type" and kinds in (["Y"], ["Z"]):
            e = self.as_Y(ins[0])
            return [Entry(bind_eqn(eqn, [ins[0].val])[0], "Y", V=e.V, A0=e.A0, root=e.root, sel=e.sel, nr=nr)]
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            ks = [e.kind for e in ins2]
            yi = [i for i, k in enumerate(ks) if k in ("Y", "Z")]
            if len(yi) != 1 or tuple(ins2[yi[0]].val.shape) != out_shape:
                raise NotStructured
            y = self.as_Y(ins2[yi[0]])
            o = ins2[1 - yi[0]]
            if name == "sub" and yi[0] == 1:
                raise NotStructured  # c - post(z) V: a flipped sign of V; rare, not supported
            A0 = y.A0
            if o.kind == "L":
                A0 = add_offset(A0, o, name, out_shape)
            elif o.kind != "c":
                raise NotStructured
            v = bind_eqn(eqn, [e.val for e in ins])[0]
            return [Entry(v, "Y", V=y.V, A0=A0, root=y.root, sel=y.sel, nr=nr)]
        if name == "concatenate":
            dim = eqn.params["dimension"]
            if dim != len(out_shape) - 1 or len(out_shape) != nr + 1:
                raise NotStructured
            ys = [e for e in ins2 if e.kind in ("Y", "Z")]
            if len(ys) != 1:
                raise NotStructured
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
                        raise NotStructured
                    Vs.append(jnp.zeros((k, w), dt))
                    As.append(e.A.astype(dt))
                    any_A = True
                elif e.kind == "c":
                    Vs.append(jnp.zeros((k, w), dt))
                    As.append(jnp.zeros((self.d, w), dt))
                else:
                    raise NotStructured
            v = bind_eqn(eqn, [e.val for e in ins])[0]
            return [Entry(v, "Y", V=jnp.concatenate(Vs, axis=1), A0=jnp.concatenate(As, axis=1) if any_A else None,
                           root=y.root, sel=y.sel, nr=nr)]
        raise NotStructured
