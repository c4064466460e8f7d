"""degenjax: degeneracy in the loss landscape for mechanistic interpretability, in JAX."""

from degenjax._src.sections import Sections as Sections
from degenjax._src.sections import as_sections as as_sections
from degenjax._src.sections import forward as forward
from degenjax._src.sections import from_linen as from_linen
from degenjax._src.sections import from_nnx as from_nnx
from degenjax._src.sections import section_shapes as section_shapes

from degenjax import models as models

__version__ = "0.1.0"

__all__ = [
    "Sections",
    "as_sections",
    "forward",
    "from_linen",
    "from_nnx",
    "section_shapes",
    "models",
]
