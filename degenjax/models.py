"""Models with their sections: small linen/nnx MLPs and transformers (quickstart, tests), and GPT-2 (Hugging Face
weights)."""

from degenjax._src.gpt2 import GPT2 as GPT2
from degenjax._src.gpt2 import GPT2Config as GPT2Config
from degenjax._src.gpt2 import gpt2_embed as gpt2_embed
from degenjax._src.gpt2 import gpt2_sections as gpt2_sections
from degenjax._src.gpt2 import load_gpt2_weights as load_gpt2_weights
from degenjax._src.gpt2 import read_safetensors as read_safetensors
from degenjax._src.models import MLP as MLP
from degenjax._src.models import NnxMLP as NnxMLP
from degenjax._src.models import NnxTransformer as NnxTransformer
from degenjax._src.models import Transformer as Transformer
from degenjax._src.models import mlp_sections as mlp_sections
from degenjax._src.models import nnx_mlp_sections as nnx_mlp_sections
from degenjax._src.models import nnx_state_from_linen as nnx_state_from_linen
from degenjax._src.models import nnx_transformer_sections as nnx_transformer_sections
from degenjax._src.models import one_hot_pairs as one_hot_pairs
from degenjax._src.models import transformer_sections as transformer_sections

__all__ = [
    "GPT2", "GPT2Config", "gpt2_embed", "gpt2_sections", "load_gpt2_weights", "read_safetensors",
    "MLP", "NnxMLP", "NnxTransformer", "Transformer", "mlp_sections", "nnx_mlp_sections",
    "nnx_state_from_linen", "nnx_transformer_sections", "one_hot_pairs", "transformer_sections",
]
