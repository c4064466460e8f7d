"""GPT-2 in Flax against a float64 NumPy forward written from the architecture, Hugging Face weight loading, and
(where torch and transformers are installed) against transformers' GPT2LMHeadModel."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from degenjax import models

CFG = models.GPT2Config(vocab_size=37, n_positions=12, n_embd=16, n_layer=2, n_head=4)


def _hf_state(cfg, seed=0):
    """A random GPT-2 checkpoint with Hugging Face's names and layouts (NumPy, float64)."""
    rng = np.random.default_rng(seed)
    d, m = cfg.n_embd, 4 * cfg.n_embd
    r = lambda *s: 0.2 * rng.normal(size=s)  # noqa: E731
    sd = {"transformer.wte.weight": r(cfg.vocab_size, d), "transformer.wpe.weight": r(cfg.n_positions, d),
          "transformer.ln_f.weight": 1 + r(d), "transformer.ln_f.bias": r(d)}
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        sd.update({pre + "ln_1.weight": 1 + r(d), pre + "ln_1.bias": r(d), pre + "ln_2.weight": 1 + r(d),
                   pre + "ln_2.bias": r(d), pre + "attn.c_attn.weight": r(d, 3 * d), pre + "attn.c_attn.bias": r(3 * d),
                   pre + "attn.c_proj.weight": r(d, d), pre + "attn.c_proj.bias": r(d),
                   pre + "mlp.c_fc.weight": r(d, m), pre + "mlp.c_fc.bias": r(m), pre + "mlp.c_proj.weight": r(m, d),
                   pre + "mlp.c_proj.bias": r(d)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _np_gpt2(sd, cfg, ids):
    """GPT-2 logits in float64 NumPy from the architecture (pre-LayerNorm blocks, causal softmax attention, tanh
    GELU, tied unembedding)."""
    g = lambda n: sd["transformer." + n]  # noqa: E731
    d, H = cfg.n_embd, cfg.n_head
    dh = d // H

    def ln(x, n):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + cfg.layer_norm_epsilon) * g(n + ".weight") + g(n + ".bias")

    B, T = ids.shape
    h = g("wte.weight")[ids] + g("wpe.weight")[:T][None]
    for i in range(cfg.n_layer):
        x = ln(h, f"h.{i}.ln_1")
        qkv = x @ g(f"h.{i}.attn.c_attn.weight") + g(f"h.{i}.attn.c_attn.bias")
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(B, T, H, dh) for j in range(3))
        s = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(dh)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        z = np.einsum("bhts,bshe->bthe", a, v).reshape(B, T, d)
        h = h + z @ g(f"h.{i}.attn.c_proj.weight") + g(f"h.{i}.attn.c_proj.bias")
        x = ln(h, f"h.{i}.ln_2") @ g(f"h.{i}.mlp.c_fc.weight") + g(f"h.{i}.mlp.c_fc.bias")
        x = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        h = h + x @ g(f"h.{i}.mlp.c_proj.weight") + g(f"h.{i}.mlp.c_proj.bias")
    return ln(h, "ln_f") @ g("wte.weight").T


def _write_safetensors(path, tensors):
    """A safetensors file written from the format's description (header length, JSON header, raw data)."""
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a, np.float64).tobytes()
        header[k] = {"dtype": "F64", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_gpt2_matches_numpy_forward_and_loads_weights(tmp_path):
    sd = _hf_state(CFG)
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(3, 7))
    ref = _np_gpt2(sd, CFG, ids)
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, sd)
    cfg, v = models.load_gpt2_weights(str(tmp_path), config=CFG)  # the directory: finds model.safetensors
    cfg2, v2 = models.load_gpt2_weights(sd, config=CFG)
    assert cfg == cfg2 == CFG
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), v, v2)
    logits = jax.jit(models.GPT2(CFG, param_dtype=jnp.float64).apply)(v, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-10, atol=1e-12)
    # the folded sections compose to the same logits; node layers end with the constant
    model = models.gpt2_sections(CFG)
    out, acts = dj.forward(model, v, models.gpt2_embed(v, ids))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-12)
    assert len(acts) == 2 * CFG.n_layer + 1 and all(np.all(np.asarray(a[..., -1]) == 1) for a in acts)
    assert model.names[-1] == "unembed" and dj.structured_sections(model, v, acts[0])[-1]
    with pytest.raises(ValueError, match="no tensor 'h.1.ln_2.weight'"):
        models.load_gpt2_weights({k: a for k, a in sd.items() if "h.1.ln_2.weight" not in k})
    with pytest.raises(ValueError, match="n_layer"):
        models.load_gpt2_weights(sd, config=CFG._replace(n_layer=3))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a safetensors file"):
        models.load_gpt2_weights(str(bad))


def test_gpt2_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.n_positions, n_embd=CFG.n_embd,
                                     n_layer=CFG.n_layer, n_head=CFG.n_head)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, size=(2, 9))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    cfg, v = models.load_gpt2_weights(hf.state_dict(), config=CFG)
    got = models.GPT2(cfg).apply(v, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    out, _ = dj.forward(models.gpt2_sections(cfg), v, models.gpt2_embed(v, ids))
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5)
