"""GPT-2 in Flax (linen), Hugging Face weights, and its folded sections for the interaction basis.

`GPT2` follows the architecture of Radford et al. (2019) as in Hugging Face's ``GPT2LMHeadModel``: token and
position embeddings, pre-LayerNorm blocks (causal multi-head attention, then an MLP with the tanh GELU), a final
LayerNorm and an unembedding tied to the token embedding. `load_gpt2_weights` reads a Hugging Face checkpoint (a
``.safetensors`` file, parsed here without extra dependencies; a torch ``state_dict``; or a ``pytorch_model.bin``,
which needs torch) into `GPT2` params.

`gpt2_sections` splits it for the LIB (arXiv 2405.10928) at the residual stream: node layers are the residual
stream before each block, after each block's attention, and the input of the unembedding (after the final
LayerNorm), each folded (the constant last, every bias and LayerNorm shift tied to the constant of its position).
Their input is `gpt2_embed` of the token ids.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.sections import Sections


class GPT2Config(NamedTuple):
    """Hyperparameters (Hugging Face names): vocabulary, context, width, layers, heads, LayerNorm epsilon."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd


def gelu_new(x):
    """GPT-2's GELU (the tanh approximation): ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, scale, bias, eps, c=None):
    """LayerNorm over the last axis; with ``c`` (the constant, ``(..., 1)``) the shift is tied to it: ``bias * c``."""
    m = jnp.mean(x, axis=-1, keepdims=True)
    v = jnp.mean((x - m) ** 2, axis=-1, keepdims=True)
    y = (x - m) / jnp.sqrt(v + eps) * _lift(scale, x.ndim)
    return y + (_lift(bias, x.ndim) if c is None else c * _lift(bias, x.ndim))


def _lift(a, ndim):
    return jnp.reshape(a, (1,) * (ndim - a.ndim) + a.shape)


def _causal_self_attention(x, p, n_head, c=None):
    """Multi-head causal self-attention of ``x`` ``(B, T, d)``; ``p`` holds ``c_attn`` and ``c_proj``."""
    B, T, d = x.shape
    dh = d // n_head
    bias = lambda b: _lift(b, 3) if c is None else c * _lift(b, 3)  # noqa: E731
    qkv = x @ p["c_attn"]["kernel"] + bias(p["c_attn"]["bias"])
    q, k, v = (jnp.reshape(qkv[..., i * d:(i + 1) * d], (B, T, n_head, dh)) for i in range(3))
    s = jnp.einsum("bthe,bshe->bhts", q, k) / jnp.sqrt(jnp.asarray(dh, x.dtype))
    mask = jnp.tril(jnp.ones((T, T), bool))
    s = jnp.where(mask[None, None], s, jnp.asarray(jnp.finfo(s.dtype).min, s.dtype))
    z = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, axis=-1), v)
    return jnp.reshape(z, (B, T, d)) @ p["c_proj"]["kernel"] + bias(p["c_proj"]["bias"])


def _mlp(x, p, c=None):
    bias = lambda b: _lift(b, 3) if c is None else c * _lift(b, 3)  # noqa: E731
    return gelu_new(x @ p["c_fc"]["kernel"] + bias(p["c_fc"]["bias"])) @ p["c_proj"]["kernel"] + bias(
        p["c_proj"]["bias"])


class GPT2(nn.Module):
    """GPT-2 language model: token ids ``(B, T)`` -> logits ``(B, T, vocab_size)`` (Hugging Face's layout).

    Params: ``wte``/``wpe`` (``embedding``), ``h_{i}`` with ``ln_1``, ``attn`` (``c_attn``, ``c_proj``), ``ln_2``,
    ``mlp`` (``c_fc``, ``c_proj``), and ``ln_f``; dense kernels are ``(in, out)`` like Hugging Face's Conv1D weights.
    """

    config: GPT2Config = GPT2Config()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        cfg, pd = self.config, self.param_dtype
        d = cfg.n_embd
        init = nn.initializers.normal(0.02)
        wte = self.param("wte", init, (cfg.vocab_size, d), pd)
        wpe = self.param("wpe", init, (cfg.n_positions, d), pd)
        h = embed_tokens(wte, wpe, ids)
        params = []
        for i in range(cfg.n_layer):
            params.append(_Block(cfg, pd, name=f"h_{i}"))
        for blk in params:
            h = blk(h)
        ln = _LN(cfg.layer_norm_epsilon, pd, name="ln_f")(h)
        return ln @ wte.T


def embed_tokens(wte, wpe, ids):
    """``wte[ids] + wpe[:T]``: the residual stream before the first block, ``(B, T, d)``."""
    T = ids.shape[-1]
    return jnp.take(wte, ids, axis=0) + _lift(wpe[:T], ids.ndim + 1)


class _LN(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        return _layer_norm(x, scale, bias, self.eps)


class _Dense(nn.Module):
    features: int
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return x @ k + _lift(b, x.ndim)


class _Block(nn.Module):
    config: GPT2Config
    param_dtype: Any

    @nn.compact
    def __call__(self, h):
        cfg, pd = self.config, self.param_dtype
        d = cfg.n_embd
        x = _LN(cfg.layer_norm_epsilon, pd, name="ln_1")(h)
        attn = _AttnParams(d, pd, name="attn")()
        h = h + _causal_self_attention(x, attn, cfg.n_head)
        x = _LN(cfg.layer_norm_epsilon, pd, name="ln_2")(h)
        mlp = _MLPParams(d, cfg.d_mlp, pd, name="mlp")()
        return h + _mlp(x, mlp)


class _AttnParams(nn.Module):
    d: int
    param_dtype: Any

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(0.02)
        return {"c_attn": {"kernel": self.param("c_attn_kernel", init, (self.d, 3 * self.d), self.param_dtype),
                           "bias": self.param("c_attn_bias", nn.initializers.zeros, (3 * self.d,), self.param_dtype)},
                "c_proj": {"kernel": self.param("c_proj_kernel", init, (self.d, self.d), self.param_dtype),
                           "bias": self.param("c_proj_bias", nn.initializers.zeros, (self.d,), self.param_dtype)}}


class _MLPParams(nn.Module):
    d: int
    d_mlp: int
    param_dtype: Any

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(0.02)
        return {"c_fc": {"kernel": self.param("c_fc_kernel", init, (self.d, self.d_mlp), self.param_dtype),
                         "bias": self.param("c_fc_bias", nn.initializers.zeros, (self.d_mlp,), self.param_dtype)},
                "c_proj": {"kernel": self.param("c_proj_kernel", init, (self.d_mlp, self.d), self.param_dtype),
                           "bias": self.param("c_proj_bias", nn.initializers.zeros, (self.d,), self.param_dtype)}}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face weights


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as NumPy arrays (format: an 8-byte little-endian header length, a JSON
    header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data).

    Raises:
      ValueError: a file that is not in that format (with the reason), or an unsupported dtype (bfloat16: convert
        the checkpoint to float32 first).
    """
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file.")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n}).")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {err}).") from err
        data = fh.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt}, which this reader does not support; save the "
                             "checkpoint in float32 (e.g. model.float().save_pretrained(...)).")
        start, stop = info["data_offsets"]
        a = np.frombuffer(data[start:stop], dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<"))
        out[name] = a.reshape(info["shape"]).astype(_ST_DTYPES[dt])
    return out


def _as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor (torch is not imported here)
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def load_gpt2_weights(source, config: GPT2Config | None = None, dtype=None) -> tuple[GPT2Config, dict]:
    """GPT-2 params for `GPT2` from a Hugging Face checkpoint.

    Args:
      source: a path to ``model.safetensors`` or ``pytorch_model.bin`` (the latter needs torch), a directory holding
        one of them, or a state dict ``{name: tensor or array}`` (``GPT2LMHeadModel.state_dict()``); names may carry
        the ``transformer.`` prefix.
      config: the architecture; default inferred from the weights (``n_head`` cannot be inferred: it defaults to
        ``n_embd // 64``, GPT-2's head size; pass ``config`` for other models).
      dtype: cast the params (e.g. ``jnp.float64``); default the checkpoint's dtype.

    Returns:
      ``(config, variables)`` with ``variables = {"params": ...}`` for ``GPT2(config).apply``.

    Raises:
      ValueError: a missing file or tensor (naming it), or shapes that do not match ``config``.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            for name in ("model.safetensors", "pytorch_model.bin"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise ValueError(f"{source}: no model.safetensors or pytorch_model.bin in this directory.")
        if not os.path.exists(path):
            raise ValueError(f"{source}: no such file.")
        if path.endswith(".safetensors"):
            state = read_safetensors(path)
        else:
            try:
                import torch
            except ImportError as err:
                raise ValueError(f"{path}: reading a torch checkpoint needs torch (pip install degenjax[bench]); "
                                 "or convert it to safetensors.") from err
            state = torch.load(path, map_location="cpu", weights_only=True)
    elif isinstance(source, dict):
        state = source
    else:
        raise ValueError(f"source must be a path or a state dict; got {type(source).__name__}.")
    sd = {}
    for k, v in state.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        sd[k] = _as_numpy(v)

    def get(name):
        if name not in sd:
            raise ValueError(f"GPT-2 checkpoint has no tensor {name!r}; is this a GPT-2 (GPT2LMHeadModel) checkpoint?")
        a = sd[name]
        return a if dtype is None else a.astype(np.dtype(dtype))

    wte, wpe = get("wte.weight"), get("wpe.weight")
    n_layer = 0
    while f"h.{n_layer}.ln_1.weight" in sd:
        n_layer += 1
    inferred = GPT2Config(vocab_size=wte.shape[0], n_positions=wpe.shape[0], n_embd=wte.shape[1], n_layer=n_layer,
                          n_head=max(1, wte.shape[1] // 64))
    config = inferred if config is None else config
    for f in ("vocab_size", "n_positions", "n_embd", "n_layer"):
        if getattr(config, f) != getattr(inferred, f):
            raise ValueError(f"config.{f} = {getattr(config, f)} but the checkpoint has {getattr(inferred, f)}.")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd = {config.n_embd} is not divisible by n_head = {config.n_head}.")
    if "lm_head.weight" in sd and not np.array_equal(sd["lm_head.weight"], sd["wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight: GPT2 ties the unembedding to the token embedding.")
    ln = lambda n: {"scale": get(f"{n}.weight"), "bias": get(f"{n}.bias")}  # noqa: E731
    dense = lambda n: (get(f"{n}.weight"), get(f"{n}.bias"))  # noqa: E731
    params = {"wte": wte, "wpe": wpe, "ln_f": ln("ln_f")}
    for i in range(n_layer):
        ca, cp = dense(f"h.{i}.attn.c_attn"), dense(f"h.{i}.attn.c_proj")
        fc, mp = dense(f"h.{i}.mlp.c_fc"), dense(f"h.{i}.mlp.c_proj")
        params[f"h_{i}"] = {
            "ln_1": ln(f"h.{i}.ln_1"), "ln_2": ln(f"h.{i}.ln_2"),
            "attn": {"c_attn_kernel": ca[0], "c_attn_bias": ca[1], "c_proj_kernel": cp[0], "c_proj_bias": cp[1]},
            "mlp": {"c_fc_kernel": fc[0], "c_fc_bias": fc[1], "c_proj_kernel": mp[0], "c_proj_bias": mp[1]},
        }
    return config, {"params": jax.tree.map(jnp.asarray, params)}


# ---------------------------------------------------------------------------------------------------------------
# sections


def _block_params(p, i):
    b = p[f"h_{i}"]
    attn = {"c_attn": {"kernel": b["attn"]["c_attn_kernel"], "bias": b["attn"]["c_attn_bias"]},
            "c_proj": {"kernel": b["attn"]["c_proj_kernel"], "bias": b["attn"]["c_proj_bias"]}}
    mlp = {"c_fc": {"kernel": b["mlp"]["c_fc_kernel"], "bias": b["mlp"]["c_fc_bias"]},
           "c_proj": {"kernel": b["mlp"]["c_proj_kernel"], "bias": b["mlp"]["c_proj_bias"]}}
    return b["ln_1"], attn, b["ln_2"], mlp


def gpt2_embed(variables, ids) -> jax.Array:
    """The first node layer of `gpt2_sections`: ``(wte[ids] + wpe, 1)``, shape ``(B, T, n_embd + 1)``."""
    p = variables["params"]
    h = embed_tokens(p["wte"], p["wpe"], jnp.asarray(ids))
    return jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)


def gpt2_sections(config: GPT2Config) -> Sections:
    """Folded sections of `GPT2` between its residual-stream node layers (module docstring).

    Node layers (``2 n_layer + 1``, each ``(B, T, n_embd + 1)``, the constant last): ``resid_pre.i`` (before block
    ``i``), ``resid_mid.i`` (after its attention), and ``unembed`` (the final LayerNorm's output, the input of the
    unembedding). Sections take ``variables`` (``{"params": ...}``); the last returns the logits ``(B, T, vocab)``.
    Batches are `gpt2_embed` outputs. Biases and LayerNorm shifts are multiplied by the constant of their position.
    """
    cfg = config
    d, eps = cfg.n_embd, cfg.layer_norm_epsilon

    def attn(i):
        def f(v, x):
            ln1, a, _, _ = _block_params(v["params"], i)
            h, c = x[..., :d], x[..., d:]
            out = h + _causal_self_attention(_layer_norm(h, ln1["scale"], ln1["bias"], eps, c), a, cfg.n_head, c)
            return jnp.concatenate([out, c], axis=-1)
        f.__name__ = f"gpt2_attn_{i}"
        return f

    def mlp(i):
        def f(v, x):
            _, _, ln2, m = _block_params(v["params"], i)
            h, c = x[..., :d], x[..., d:]
            out = h + _mlp(_layer_norm(h, ln2["scale"], ln2["bias"], eps, c), m, c)
            if i == cfg.n_layer - 1:  # the last block ends at the unembedding's input: after the final LayerNorm
                lnf = v["params"]["ln_f"]
                out = _layer_norm(out, lnf["scale"], lnf["bias"], eps, c)
            return jnp.concatenate([out, c], axis=-1)
        f.__name__ = f"gpt2_mlp_{i}"
        return f

    def unembed(v, x):
        return x[..., :d] @ v["params"]["wte"].T

    fns, names = [], []
    for i in range(cfg.n_layer):
        fns += [attn(i), mlp(i)]
        names += [f"resid_pre.{i}", f"resid_mid.{i}"]
    return Sections(tuple(fns) + (unembed,), names=tuple(names) + ("unembed",), constant="last")
