"""degenjax: degeneracy in the loss landscape for mechanistic interpretability, in JAX."""

from degenjax._src.sections import Sections as Sections
from degenjax._src.sections import as_sections as as_sections
from degenjax._src.sections import forward as forward
from degenjax._src.sections import from_linen as from_linen
from degenjax._src.sections import from_nnx as from_nnx
from degenjax._src.sections import section_shapes as section_shapes
from degenjax._src.grams import ActivationStats as ActivationStats
from degenjax._src.grams import GramAccumulator as GramAccumulator
from degenjax._src.grams import GramState as GramState
from degenjax._src.grams import GramStats as GramStats
from degenjax._src.grams import GramSums as GramSums
from degenjax._src.grams import activation_grams as activation_grams
from degenjax._src.grams import activation_stats as activation_stats
from degenjax._src.grams import gram_accumulator as gram_accumulator
from degenjax._src.grams import jacobian_gram as jacobian_gram
from degenjax._src.grams import jacobian_grams as jacobian_grams
from degenjax._src.degeneracy import DegeneracyReport as DegeneracyReport
from degenjax._src.degeneracy import SyncAccumulator as SyncAccumulator
from degenjax._src.degeneracy import SyncResult as SyncResult
from degenjax._src.degeneracy import degeneracy_report as degeneracy_report
from degenjax._src.degeneracy import sync_accumulator as sync_accumulator
from degenjax._src.degeneracy import synchronized_neurons as synchronized_neurons
from degenjax._src.modularity import ModuleResult as ModuleResult
from degenjax._src.modularity import find_modules as find_modules
from degenjax._src.modularity import plot_modules as plot_modules
from degenjax._src.eigen import eigh as eigh
from degenjax._src.eigen import eigh_topk as eigh_topk
from degenjax._src.eigen import EigResult as EigResult
from degenjax._src.spectral import spectral_density as spectral_density
from degenjax._src.spectral import SpectralDensity as SpectralDensity

from degenjax import models as models
from degenjax import theory as theory

__version__ = "0.1.0"

__all__ = [
    "eigh",
    "eigh_topk",
    "EigResult",
    "spectral_density",
    "SpectralDensity",
    "Sections",
    "as_sections",
    "forward",
    "from_linen",
    "from_nnx",
    "section_shapes",
    "ActivationStats",
    "GramAccumulator",
    "GramState",
    "GramStats",
    "GramSums",
    "activation_grams",
    "activation_stats",
    "gram_accumulator",
    "jacobian_gram",
    "jacobian_grams",
    "DegeneracyReport",
    "SyncAccumulator",
    "SyncResult",
    "degeneracy_report",
    "sync_accumulator",
    "synchronized_neurons",
    "ModuleResult",
    "find_modules",
    "plot_modules",
    "models",
    "theory",
]
