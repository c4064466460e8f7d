"""Reference models (linen and nnx) with their sections: the quickstart's defaults and the test models."""

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
    "MLP", "NnxMLP", "NnxTransformer", "Transformer", "mlp_sections", "nnx_mlp_sections",
    "nnx_state_from_linen", "nnx_transformer_sections", "one_hot_pairs", "transformer_sections",
]
