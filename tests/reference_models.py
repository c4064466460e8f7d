"""Hand-written (einsum) sections of `degenjax.models.Transformer`, independent of the Flax adapters.

Used as the reference that the linen/nnx sections and the Gram computations are checked against.
"""

import jax
import jax.numpy as jnp
import numpy as np


def hand_transformer_sections():
    """(embed, attn, mlp, unembed) sections taking the linen variables dict."""

    def embed(v, x):
        p = v["params"]["embed"]
        return x @ p["W_E"] + p["W_pos"][None, : x.shape[-2]]

    def attn(v, h):
        p = v["params"]["attn"]
        qkv = jnp.einsum("btd,dchk->btchk", h, p["qkv"]["kernel"])
        q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        s = jnp.einsum("bqhk,bphk->bhqp", q, k) / np.sqrt(q.shape[-1])
        t = h.shape[1]
        s = jnp.where(np.tril(np.ones((1, 1, t, t), bool)), s, -1e30)
        z = jnp.einsum("bhqp,bphk->bqhk", jax.nn.softmax(s, -1), val)
        return h + jnp.einsum("bqhk,hkd->bqd", z, p["out"]["kernel"])

    def mlp_block(v, h):
        p = v["params"]["mlp"]
        z = jax.nn.relu(h @ p["fc_in"]["kernel"] + p["fc_in"]["bias"][None, None])
        return h + z @ p["fc_out"]["kernel"] + p["fc_out"]["bias"][None, None]

    def unembed(v, h):
        return h[:, -1, :] @ v["params"]["unembed"]["W_U"]["kernel"]

    return (embed, attn, mlp_block, unembed)
