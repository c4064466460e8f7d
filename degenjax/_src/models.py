"""Small reference models in linen and nnx, with their sections (used by tests, notebooks and the quickstart).

- `MLP` / `NnxMLP`: dense layers ``layers_0 .. layers_{k-1}`` with ReLU between them. Node layers are the inputs
  of the dense layers.
- `Transformer` / `NnxTransformer`: one-hot tokens ``(batch, seq, vocab)`` -> ``embed`` (token + position) ->
  ``attn`` (residual causal multi-head attention) -> ``mlp`` (residual ReLU MLP) -> ``unembed`` (logits read at the
  last position). Node layers: the one-hot input and the residual stream before ``attn``, ``mlp`` and ``unembed``,
  each with a positions axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import nnx

from degenjax._src.sections import Sections, from_linen, from_nnx


# ---------------------------------------------------------------------------------------------------------------
# linen


class MLP(nn.Module):
    """ReLU MLP; ``features[-1]`` is the output size. Submodules ``layers_0 .. layers_{k-1}``."""

    features: Sequence[int]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            if i > 0:
                x = nn.relu(x)
            x = nn.Dense(f, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
        return x


class _Embed(nn.Module):
    d_model: int
    seq_len: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        w = self.param("W_E", nn.initializers.normal(1.0 / x.shape[-1] ** 0.5), (x.shape[-1], self.d_model),
                       self.param_dtype)
        pos = self.param("W_pos", nn.initializers.normal(0.02), (self.seq_len, self.d_model), self.param_dtype)
        return x @ w + _lift(pos[: x.shape[-2]], x.ndim)


def _lift(a, ndim):
    """Adds leading unit axes to ``a`` up to ``ndim`` (explicit broadcasting; tests forbid rank promotion)."""
    return jnp.reshape(a, (1,) * (ndim - a.ndim) + a.shape)


def _causal_attention(q, k, v):
    """q, k, v: (batch, seq, heads, d_head) -> (batch, seq, heads, d_head)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(mask, scores, jnp.asarray(-1e30, scores.dtype))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


class _Attention(nn.Module):
    num_heads: int
    param_dtype: jnp.dtype
    use_bias: bool = False

    @nn.compact
    def __call__(self, h):
        d = h.shape[-1]
        dh = d // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, dh), use_bias=self.use_bias, param_dtype=self.param_dtype,
                              name="qkv")(h)
        z = _causal_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :])
        return h + nn.DenseGeneral(d, axis=(-2, -1), use_bias=self.use_bias, param_dtype=self.param_dtype,
                                   name="out")(z)


class _MLPBlock(nn.Module):
    d_mlp: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h):
        z = nn.relu(nn.Dense(self.d_mlp, param_dtype=self.param_dtype, name="fc_in")(h))
        return h + nn.Dense(h.shape[-1], param_dtype=self.param_dtype, name="fc_out")(z)


class _Unembed(nn.Module):
    num_out: int
    param_dtype: jnp.dtype
    use_bias: bool = False

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.num_out, use_bias=self.use_bias, param_dtype=self.param_dtype, name="W_U")(h[..., -1, :])


class Transformer(nn.Module):
    """One-layer attention-plus-MLP transformer on one-hot inputs ``(batch, seq, vocab)`` -> logits ``(batch, out)``."""

    vocab: int
    seq_len: int
    d_model: int = 32
    num_heads: int = 4
    d_mlp: int = 64
    num_out: int | None = None
    param_dtype: jnp.dtype = jnp.float32
    use_bias: bool = False  # biases in attention (b_Q, b_K, b_V, b_O) and the unembedding (b_U), as rib's model

    @nn.compact
    def __call__(self, x):
        pd = self.param_dtype
        h = _Embed(self.d_model, self.seq_len, pd, name="embed")(x)
        h = _Attention(self.num_heads, pd, self.use_bias, name="attn")(h)
        h = _MLPBlock(self.d_mlp, pd, name="mlp")(h)
        return _Unembed(self.num_out or self.vocab, pd, self.use_bias, name="unembed")(h)


def mlp_sections(module: MLP, example_input, *, fold_bias: bool = True) -> Sections:
    """Sections of a linen `MLP`, one per dense layer (biases folded into the constant unless ``fold_bias=False``;
    see `degenjax.from_linen`)."""
    return from_linen(module, [f"layers_{i}" for i in range(1, len(module.features))], example_input,
                      fold_bias=fold_bias)


def transformer_sections(module: Transformer, example_input, *, fold_bias: bool = True) -> Sections:
    """Sections of a linen `Transformer`: embed | attn | mlp | unembed (biases folded unless ``fold_bias=False``).

    Folded, each bias is tied to the constant of the position where it is added; the position embedding is not a
    bias (it is not tied)."""
    return from_linen(module, ["attn", "mlp", "unembed"], example_input, fold_bias=fold_bias)


# ---------------------------------------------------------------------------------------------------------------
# nnx (same parameter shapes; `nnx_state_from_linen` copies linen parameters over)


class NnxMLP(nnx.Module):
    def __init__(self, d_in: int, features: Sequence[int], *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.num_layers = len(features)
        sizes = (d_in,) + tuple(features)
        for i in range(len(features)):
            setattr(self, f"layers_{i}", nnx.Linear(sizes[i], sizes[i + 1], param_dtype=param_dtype, rngs=rngs))

    def __call__(self, x):
        for i in range(self.num_layers):
            if i > 0:
                x = nnx.relu(x)
            x = getattr(self, f"layers_{i}")(x)
        return x


class _NnxEmbed(nnx.Module):
    def __init__(self, vocab, seq_len, d_model, *, rngs, param_dtype):
        self.W_E = nnx.Param(jax.random.normal(rngs.params(), (vocab, d_model), param_dtype) / vocab**0.5)
        self.W_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model), param_dtype))

    def __call__(self, x):
        return x @ self.W_E[...] + _lift(self.W_pos[...][: x.shape[-2]], x.ndim)


class _NnxAttention(nnx.Module):
    def __init__(self, d_model, num_heads, *, rngs, param_dtype):
        self.num_heads = num_heads
        dh = d_model // num_heads
        self.qkv = nnx.LinearGeneral(d_model, (3, num_heads, dh), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.LinearGeneral((num_heads, dh), d_model, axis=(-2, -1), use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h):
        qkv = self.qkv(h)
        z = _causal_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :])
        return h + self.out(z)


class _NnxMLPBlock(nnx.Module):
    def __init__(self, d_model, d_mlp, *, rngs, param_dtype):
        self.fc_in = nnx.Linear(d_model, d_mlp, param_dtype=param_dtype, rngs=rngs)
        self.fc_out = nnx.Linear(d_mlp, d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h):
        return h + self.fc_out(nnx.relu(self.fc_in(h)))


class _NnxUnembed(nnx.Module):
    def __init__(self, d_model, num_out, *, rngs, param_dtype):
        self.W_U = nnx.Linear(d_model, num_out, use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h):
        return self.W_U(h[..., -1, :])


class NnxTransformer(nnx.Module):
    def __init__(self, vocab, seq_len, d_model=32, num_heads=4, d_mlp=64, num_out=None, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.embed = _NnxEmbed(vocab, seq_len, d_model, param_dtype=param_dtype, rngs=rngs)
        self.attn = _NnxAttention(d_model, num_heads, param_dtype=param_dtype, rngs=rngs)
        self.mlp = _NnxMLPBlock(d_model, d_mlp, param_dtype=param_dtype, rngs=rngs)
        self.unembed = _NnxUnembed(d_model, num_out or vocab, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.unembed(self.mlp(self.attn(self.embed(x))))


def nnx_mlp_sections(graphdef, num_layers: int, example_input, *, fold_bias: bool = True) -> Sections:
    """Sections of an `NnxMLP` (``graphdef`` from ``nnx.split``), one per dense layer."""
    return from_nnx(graphdef, [f"layers_{i}" for i in range(1, num_layers)], example_input, fold_bias=fold_bias)


def nnx_transformer_sections(graphdef, example_input, *, fold_bias: bool = True) -> Sections:
    """Sections of an `NnxTransformer`: embed | attn | mlp | unembed."""
    return from_nnx(graphdef, ["attn", "mlp", "unembed"], example_input, fold_bias=fold_bias)


def nnx_state_from_linen(module: nnx.Module, variables) -> nnx.State:
    """Copies linen `MLP`/`Transformer` parameters into the matching nnx module; returns its new state.

    The nnx attribute paths mirror the linen scope names, with ``kernel``/``bias`` and ``W_E``/``W_pos``
    leaves; both pytrees are flattened with their paths and matched by name.
    """
    graphdef, state = nnx.split(module)
    flat_linen = {
        tuple(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    }
    pure = nnx.to_pure_dict(state)

    def fill(tree, prefix=()):
        out = {}
        for k, v in tree.items():
            key = prefix + (str(k),)
            if isinstance(v, dict):
                out[k] = fill(v, key)
            else:
                if key not in flat_linen:
                    raise ValueError(f"nnx_state_from_linen: no linen parameter for {'/'.join(key)}")
                out[k] = jnp.reshape(flat_linen[key], jnp.shape(v))  # keeps the linen dtype
        return out

    nnx.replace_by_pure_dict(state, fill(pure))
    return state


def one_hot_pairs(p: int, pairs, dtype=jnp.float32) -> jax.Array:
    """Encodes integer pairs ``(a, b)`` as one-hot sequences ``[a, b, =]`` of shape ``(n, 3, p + 1)``."""
    pairs = jnp.asarray(pairs)
    seq = jnp.concatenate([pairs, jnp.full((pairs.shape[0], 1), p, pairs.dtype)], axis=1)
    return jax.nn.one_hot(seq, p + 1, dtype=dtype)
