"""Integer hashing shared by the streaming pattern hashes (degeneracy) and the minibatch order (llc)."""

import jax
import jax.numpy as jnp


def fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a well-mixed bijection of uint32 (wrapping arithmetic), uint32 in and out."""
    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> jnp.uint32(13))
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> jnp.uint32(16))
