"""Reading softmax attention from a section's jaxpr (the attention part of the reader of
`degenjax._src.structure`): the scores ``q . k`` of two affine values, row-wise maps of them over key positions
(softmax with scale and masks), the weighted values and their output projection."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from degenjax._src.structure_jaxpr import add_offset, ELEMENTWISE, bind_eqn, Entry, NotStructured


class AttentionReading:
    """The attention methods of the reader (mixed into `structure_reader._Reader`)."""

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
            return [Entry(bind_eqn(eqn, [e.val])[0], "LT", root=base, V=tuple(perm[i] for i in p), sel=e.sel,
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
        raise NotStructured

    @staticmethod
    def _base(e):
        """``(base L entry, permutation)`` of an affine value or a transposed one."""
        if e.kind == "L":
            return e, tuple(range(e.val.ndim))
        return e.root, e.V

    def att_scores(self, eqn, ins, att):
        if "q" in att:
            raise NotStructured  # one scores product per section
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        (X, px), (Y, py) = self._base(ins[0]), self._base(ins[1])
        if X.nr != 2 or Y.nr != 2 or X.sel or Y.sel:
            raise NotStructured
        cx, cy = [px[a] for a in lc], [py[a] for a in rc]
        bx, by = [px[a] for a in lb], [py[a] for a in rb]
        fx = [px[a] for a in range(ins[0].val.ndim) if a not in lc and a not in lb]
        fy = [py[a] for a in range(ins[1].val.ndim) if a not in rc and a not in rb]
        if fx != [1] or fy != [1] or any(a < 2 for a in cx + cy):
            raise NotStructured
        tags, qh, kh = [], [], []
        for x_, y_ in zip(bx, by):
            if x_ == 0 and y_ == 0:
                tags.append("b")
            elif x_ >= 2 and y_ >= 2:
                tags.append(("h", len(qh)))
                qh.append(x_)
                kh.append(y_)
            else:
                raise NotStructured
        if tags.count("b") != 1:
            raise NotStructured
        tags += ["tq", "tk"]
        att.update(q=X, k=Y, q_heads=qh, k_heads=kh, q_contract=cx, k_contract=cy)
        out = Entry(bind_eqn(eqn, [e.val for e in ins])[0], "S", V=tuple(tags), sel=(), nr=None)
        att["S_root"] = out
        return [out]

    def att_rowwise(self, eqn, ins, out_shape, att):
        """Row-wise operations on scores (over key positions): elementwise ops, reductions over "tk" and their
        broadcasts back; the result must stay a function of each (batch, head, query) row of the scores."""
        name = eqn.primitive.name
        S = [e for e in ins if e.kind == "S"]
        if any(e.kind not in ("S", "c") for e in ins):
            raise NotStructured
        tags0 = S[0].V
        if name in ELEMENTWISE or name == "stop_gradient":
            full = [e.V for e in S if "tk" in e.V]
            base = full[0] if full else tags0
            for e in S:
                t = e.V
                if len(t) != len(base) or any(a != b and {a, b} != {"tk", "tk1"} for a, b in zip(t, base)):
                    raise NotStructured
            for e in ins:
                if e.kind == "c" and e.val.ndim not in (0, len(out_shape)):
                    raise NotStructured
            tags = base
            if "tk" in base and out_shape[base.index("tk")] != ins[[e.kind for e in ins].index("S")].val.shape[
                    base.index("tk")] and False:
                raise NotStructured
        elif name in ("reduce_max", "reduce_sum", "reduce_min") and len(ins) == 1:
            axes = tuple(eqn.params["axes"])
            if len(axes) != 1 or tags0[axes[0]] not in ("tk", "tk1"):
                raise NotStructured
            tags = tuple(t for i, t in enumerate(tags0) if i != axes[0])
        elif name == "broadcast_in_dim" and len(ins) == 1:
            dims = tuple(eqn.params["broadcast_dimensions"])
            if "tk" in tags0 or "tk1" in tags0 or len(out_shape) != len(tags0) + 1:
                raise NotStructured
            new = [i for i in range(len(out_shape)) if i not in dims]
            if list(dims) != sorted(dims) or len(new) != 1:
                raise NotStructured
            tags = list(tags0)
            T = att["S_root"].val.shape[att["S_root"].V.index("tk")]
            tags.insert(new[0], "tk" if out_shape[new[0]] == T else "tk1")
            if out_shape[new[0]] not in (1, T):
                raise NotStructured
            tags = tuple(tags)
        elif name in ("convert_element_type", "reduce_precision", "copy", "copy_p"):
            tags = tags0
        else:
            raise NotStructured
        vals = bind_eqn(eqn, [e.val for e in ins])
        return [Entry(v, "S", V=tags) for v in vals]

    def att_values(self, eqn, ins, att):
        """``dot_general`` of the weights P (an S value) and the values v (affine), in either order."""
        if "v" in att or "q" not in att:
            raise NotStructured
        pi = 0 if ins[0].kind == "S" else 1
        Pe, Ve = ins[pi], ins[1 - pi]
        (V, pv) = self._base(Ve)
        if V.nr != 2 or V.sel:
            raise NotStructured
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        pc, vc, pb, vb = (lc, rc, lb, rb) if pi == 0 else (rc, lc, rb, lb)
        tags = Pe.V
        if "tk" not in tags or [tags[a] for a in pc] != ["tk"] or [pv[a] for a in vc] != [1]:
            raise NotStructured
        batch_tags, vh = [], {}
        for a, b_ in zip(pb, vb):
            t, vax = tags[a], pv[b_]
            if t == "b" and vax == 0:
                batch_tags.append("b")
            elif isinstance(t, tuple) and t[0] == "h" and vax >= 2:
                vh[t[1]] = vax
                batch_tags.append(t)
            else:
                raise NotStructured
        if sorted(vh) != list(range(len(att["q_heads"]))) or "b" not in batch_tags:
            raise NotStructured
        fp = [a for a in range(len(tags)) if a not in pc and a not in pb]
        if [tags[a] for a in fp] != ["tq"]:
            raise NotStructured
        fv = [pv[a] for a in range(Ve.val.ndim) if a not in vc and a not in vb]
        if any(a < 2 for a in fv):
            raise NotStructured
        vtags = [("v", j) for j in range(len(fv))]
        out_tags = batch_tags + (["tq"] + vtags if pi == 0 else vtags + ["tq"])
        att.update(v=V, v_heads=[vh[i] for i in range(len(vh))], v_free=fv, P=Pe)
        return [Entry(bind_eqn(eqn, [e.val for e in ins])[0], "ZA", V=tuple(out_tags))]

    def att_za(self, eqn, ins, out_shape, att):
        name = eqn.primitive.name
        kinds = [e.kind for e in ins]
        z = ins[kinds.index("ZA")]
        tags = z.V
        if name in ("convert_element_type", "copy", "copy_p") and len(ins) == 1:
            return [Entry(bind_eqn(eqn, [z.val])[0], "ZA", V=tags)]
        if name == "transpose" and len(ins) == 1:
            p = tuple(eqn.params["permutation"])
            return [Entry(bind_eqn(eqn, [z.val])[0], "ZA", V=tuple(tags[i] for i in p))]
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
                    raise NotStructured
                new_tags.append(group[0] if len(group) == 1 else ("m", tuple(group)))
            if i != len(old):
                raise NotStructured
            for t in new_tags:
                if isinstance(t, tuple) and t[0] == "m" and any(g in ("b", "tq") for g in t[1]):
                    raise NotStructured
            return [Entry(bind_eqn(eqn, [z.val])[0], "ZA", V=tuple(new_tags))]
        if name == "dot_general" and kinds == ["ZA", "c"]:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            if lb or rb:
                raise NotStructured
            free = [tags[a] for a in range(len(tags)) if a not in lc]
            if free != ["b", "tq"]:
                raise NotStructured
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
                raise NotStructured
            perm = [order_tags.index(t) for t in want + outs]
            Wx = jnp.transpose(Wx, perm)
            H = int(np.prod([self._tag_size(("h", i), att) for i in range(nh)])) if nh else 1
            dv = int(np.prod([self._tag_size(("v", j), att) for j in range(nv)]))
            WO = jnp.reshape(Wx, (H, dv, Wx.shape[-1]))
            del sizes, split_shape, shape
            v = bind_eqn(eqn, [e.val for e in ins])[0]
            return [Entry(v, "YA", V=WO, A0=None)]
        raise NotStructured

    @staticmethod
    def _tag_size(t, att):
        if t[0] == "h":
            q = att["q"]
            return q.val.shape[att["q_heads"][t[1]]]
        if t[0] == "v":
            return att["v"].val.shape[att["v_free"][t[1]]]
        raise NotStructured

    def att_ya(self, eqn, ins, out_shape, att):
        name = eqn.primitive.name
        ins = [self.as_L(e) if e.kind == "h" else e for e in ins]
        kinds = [e.kind for e in ins]
        y = ins[kinds.index("YA")]
        if kinds.count("YA") != 1 or any(k not in ("YA", "L", "c") for k in kinds):
            raise NotStructured
        for e in ins:
            if e.kind == "L" and (e.nr != 2 or e.sel or e.A.ndim != 2):
                raise NotStructured
        if name in ("convert_element_type", "copy", "copy_p") and len(ins) == 1:
            return [Entry(bind_eqn(eqn, [y.val])[0], "YA", V=y.V, A0=y.A0)]
        if name in ("add", "sub", "add_any") and len(ins) == 2:
            if tuple(y.val.shape) != out_shape or (name == "sub" and kinds[1] == "YA"):
                raise NotStructured
            o = ins[1 - kinds.index("YA")]
            A0 = y.A0
            if o.kind == "L":
                A0 = add_offset(A0, o, name, out_shape)
            return [Entry(bind_eqn(eqn, [e.val for e in ins])[0], "YA", V=y.V, A0=A0)]
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
            return [Entry(bind_eqn(eqn, [e.val for e in ins])[0], "YA", V=jnp.concatenate(Ws, axis=2),
                           A0=jnp.concatenate(As, axis=1))]
        raise NotStructured

