"""degenjax: degeneracy in the loss landscape for mechanistic interpretability, in JAX.

The public names load on first use (PEP 562 module ``__getattr__``): ``import degenjax`` and ``degenjax --help`` do
not import JAX, ``degenjax.estimate_llc`` or ``from degenjax import estimate_llc`` imports the module that defines
it. Type checkers and IDEs see the explicit imports of the ``TYPE_CHECKING`` block below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

try:  # the installed distribution's version (pyproject.toml), also when degenjax is not imported from a checkout
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("degenjax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it (each group is a section of docs/maths.md)
_LAZY = {
    # models as sections (docs/maths.md#sections)
    "as_sections": "degenjax._src.sections",
    "forward": "degenjax._src.sections",
    "from_linen": "degenjax._src.sections",
    "from_nnx": "degenjax._src.sections",
    "section_shapes": "degenjax._src.sections",
    "Sections": "degenjax._src.sections",
    "structured_sections": "degenjax._src.structure",
    # Gram matrices (docs/maths.md#grams)
    "activation_grams": "degenjax._src.grams",
    "activation_stats": "degenjax._src.grams",
    "ActivationStats": "degenjax._src.grams",
    "gram_accumulator": "degenjax._src.grams",
    "GramAccumulator": "degenjax._src.grams",
    "GramState": "degenjax._src.grams",
    "GramStats": "degenjax._src.grams",
    "GramSums": "degenjax._src.grams",
    "jacobian_gram": "degenjax._src.grams",
    "jacobian_grams": "degenjax._src.grams",
    # eigensolvers (docs/maths.md#eigensolvers)
    "eigh": "degenjax._src.eigen",
    "eigh_topk": "degenjax._src.eigen",
    "EigResult": "degenjax._src.eigen",
    "spectral_density": "degenjax._src.spectral",
    "SpectralDensity": "degenjax._src.spectral",
    # interaction basis and edges (docs/maths.md#interaction-basis)
    "interaction_basis": "degenjax._src.basis",
    "InteractionBasis": "degenjax._src.basis",
    "layer_basis": "degenjax._src.basis",
    "LayerBasis": "degenjax._src.basis",
    "transform": "degenjax._src.basis",
    "ablated_output": "degenjax._src.edges",
    "edge_sparsity": "degenjax._src.edges",
    "EdgeSparsity": "degenjax._src.edges",
    "edges_required": "degenjax._src.edges",
    "EdgesRequired": "degenjax._src.edges",
    "interaction_edges": "degenjax._src.edges",
    "node_ablation_curves": "degenjax._src.edges",
    # local learning coefficient (docs/maths.md#llc)
    "rmsprop_sgld": "degenjax._src.sgld",
    "RMSPropSGLDState": "degenjax._src.sgld",
    "sgld": "degenjax._src.sgld",
    "SGLDState": "degenjax._src.sgld",
    "SGMCMCAlgorithm": "degenjax._src.sgld",
    "SGMCMCInfo": "degenjax._src.sgld",
    "sgnht": "degenjax._src.sgld",
    "SGNHTState": "degenjax._src.sgld",
    "SGLDKernel": "degenjax._src.numpyro_kernel",
    "SGLDKernelState": "degenjax._src.numpyro_kernel",
    "convergence": "degenjax._src.diagnostics",
    "Convergence": "degenjax._src.diagnostics",
    "behavioral_loss": "degenjax._src.llc",
    "effective_parameter_count": "degenjax._src.llc",
    "estimate_llc": "degenjax._src.llc",
    "estimate_llc_batched": "degenjax._src.cells",
    "cells_per_group_for_memory": "degenjax._src.cells",
    "bitwise_compiler_options": "degenjax._src.cells",
    "LLCDivergenceError": "degenjax._src.llc",
    "LLCResult": "degenjax._src.llc",
    "MetricsState": "degenjax._src.llc",
    "parameter_mask": "degenjax._src.llc",
    "restrict_data": "degenjax._src.llc",
    "llc_recipe": "degenjax._src.recipe",
    "LLCRecipe": "degenjax._src.recipe",
    "llc_record": "degenjax._src.records",
    "save_traces": "degenjax._src.records",
    "trace_table": "degenjax._src.records",
    "calibrate": "degenjax._src.calibrate",
    "CalibrationRow": "degenjax._src.calibrate",
    "CalibrationCell": "degenjax._src.calibrate",
    "Calibration": "degenjax._src.calibrate",
    "calibration_sweep": "degenjax._src.calibrate",
    "CalibrationGrid": "degenjax._src.calibrate",
    "plot_calibration": "degenjax._src.plots",
    "recommend": "degenjax._src.calibrate",
    # degeneracy accounting and modularity (docs/maths.md#degeneracy-accounting)
    "degeneracy_report": "degenjax._src.degeneracy",
    "SectionCounts": "degenjax._src.degeneracy",
    "DegeneracyReport": "degenjax._src.degeneracy",
    "sync_accumulator": "degenjax._src.degeneracy",
    "SyncAccumulator": "degenjax._src.degeneracy",
    "synchronized_neurons": "degenjax._src.degeneracy",
    "SyncResult": "degenjax._src.degeneracy",
    "find_modules": "degenjax._src.modularity",
    "ModuleResult": "degenjax._src.modularity",
    "plot_modules": "degenjax._src.plots",
    # toolkit: sweeps, checkpoints, quickstart, plots
    "load_sweep_config": "degenjax._src.sweep",
    "run_sweep": "degenjax._src.sweep",
    "enable_compilation_cache": "degenjax._src.compilecache",
    "SweepConfig": "degenjax._src.sweep",
    "load_checkpoint": "degenjax._src.checkpoints",
    "save_msgpack": "degenjax._src.checkpoints",
    "QuickstartConfig": "degenjax._src.quickstart",
    "run_quickstart": "degenjax._src.quickstart",
    "plot_calibration_heatmap": "degenjax._src.plots",
    "plot_interaction_graph": "degenjax._src.plots",
    "plot_llc_vs_checkpoint": "degenjax._src.plots",
    "plot_loss_traces": "degenjax._src.plots",
    "plot_sparsity": "degenjax._src.plots",
    "plot_spectra": "degenjax._src.plots",
    "models": "degenjax.models",  # submodule
    "theory": "degenjax.theory",  # submodule
    "distributed": "degenjax.distributed",  # submodule
}

if TYPE_CHECKING:
    from degenjax._src.sections import as_sections as as_sections
    from degenjax._src.sections import forward as forward
    from degenjax._src.sections import from_linen as from_linen
    from degenjax._src.sections import from_nnx as from_nnx
    from degenjax._src.sections import section_shapes as section_shapes
    from degenjax._src.sections import Sections as Sections
    from degenjax._src.structure import structured_sections as structured_sections
    from degenjax._src.grams import activation_grams as activation_grams
    from degenjax._src.grams import activation_stats as activation_stats
    from degenjax._src.grams import ActivationStats as ActivationStats
    from degenjax._src.grams import gram_accumulator as gram_accumulator
    from degenjax._src.grams import GramAccumulator as GramAccumulator
    from degenjax._src.grams import GramState as GramState
    from degenjax._src.grams import GramStats as GramStats
    from degenjax._src.grams import GramSums as GramSums
    from degenjax._src.grams import jacobian_gram as jacobian_gram
    from degenjax._src.grams import jacobian_grams as jacobian_grams
    from degenjax._src.eigen import eigh as eigh
    from degenjax._src.eigen import eigh_topk as eigh_topk
    from degenjax._src.eigen import EigResult as EigResult
    from degenjax._src.spectral import spectral_density as spectral_density
    from degenjax._src.spectral import SpectralDensity as SpectralDensity
    from degenjax._src.basis import interaction_basis as interaction_basis
    from degenjax._src.basis import InteractionBasis as InteractionBasis
    from degenjax._src.basis import layer_basis as layer_basis
    from degenjax._src.basis import LayerBasis as LayerBasis
    from degenjax._src.basis import transform as transform
    from degenjax._src.edges import ablated_output as ablated_output
    from degenjax._src.edges import edge_sparsity as edge_sparsity
    from degenjax._src.edges import EdgeSparsity as EdgeSparsity
    from degenjax._src.edges import edges_required as edges_required
    from degenjax._src.edges import EdgesRequired as EdgesRequired
    from degenjax._src.edges import interaction_edges as interaction_edges
    from degenjax._src.edges import node_ablation_curves as node_ablation_curves
    from degenjax._src.sgld import rmsprop_sgld as rmsprop_sgld
    from degenjax._src.sgld import RMSPropSGLDState as RMSPropSGLDState
    from degenjax._src.sgld import sgld as sgld
    from degenjax._src.sgld import SGLDState as SGLDState
    from degenjax._src.sgld import SGMCMCAlgorithm as SGMCMCAlgorithm
    from degenjax._src.sgld import SGMCMCInfo as SGMCMCInfo
    from degenjax._src.sgld import sgnht as sgnht
    from degenjax._src.sgld import SGNHTState as SGNHTState
    from degenjax._src.numpyro_kernel import SGLDKernel as SGLDKernel
    from degenjax._src.numpyro_kernel import SGLDKernelState as SGLDKernelState
    from degenjax._src.diagnostics import convergence as convergence
    from degenjax._src.diagnostics import Convergence as Convergence
    from degenjax._src.llc import behavioral_loss as behavioral_loss
    from degenjax._src.llc import effective_parameter_count as effective_parameter_count
    from degenjax._src.llc import estimate_llc as estimate_llc
    from degenjax._src.cells import estimate_llc_batched as estimate_llc_batched
    from degenjax._src.cells import cells_per_group_for_memory as cells_per_group_for_memory
    from degenjax._src.cells import bitwise_compiler_options as bitwise_compiler_options
    from degenjax._src.llc import LLCDivergenceError as LLCDivergenceError
    from degenjax._src.llc import LLCResult as LLCResult
    from degenjax._src.llc import MetricsState as MetricsState
    from degenjax._src.llc import parameter_mask as parameter_mask
    from degenjax._src.llc import restrict_data as restrict_data
    from degenjax._src.recipe import llc_recipe as llc_recipe
    from degenjax._src.recipe import LLCRecipe as LLCRecipe
    from degenjax._src.records import llc_record as llc_record
    from degenjax._src.records import save_traces as save_traces
    from degenjax._src.records import trace_table as trace_table
    from degenjax._src.calibrate import calibrate as calibrate
    from degenjax._src.calibrate import CalibrationRow as CalibrationRow
    from degenjax._src.calibrate import CalibrationCell as CalibrationCell
    from degenjax._src.calibrate import Calibration as Calibration
    from degenjax._src.calibrate import calibration_sweep as calibration_sweep
    from degenjax._src.calibrate import CalibrationGrid as CalibrationGrid
    from degenjax._src.plots import plot_calibration as plot_calibration
    from degenjax._src.calibrate import recommend as recommend
    from degenjax._src.degeneracy import degeneracy_report as degeneracy_report
    from degenjax._src.degeneracy import SectionCounts as SectionCounts
    from degenjax._src.degeneracy import DegeneracyReport as DegeneracyReport
    from degenjax._src.degeneracy import sync_accumulator as sync_accumulator
    from degenjax._src.degeneracy import SyncAccumulator as SyncAccumulator
    from degenjax._src.degeneracy import synchronized_neurons as synchronized_neurons
    from degenjax._src.degeneracy import SyncResult as SyncResult
    from degenjax._src.modularity import find_modules as find_modules
    from degenjax._src.modularity import ModuleResult as ModuleResult
    from degenjax._src.plots import plot_modules as plot_modules
    from degenjax._src.sweep import load_sweep_config as load_sweep_config
    from degenjax._src.sweep import run_sweep as run_sweep
    from degenjax._src.compilecache import enable_compilation_cache as enable_compilation_cache
    from degenjax._src.sweep import SweepConfig as SweepConfig
    from degenjax._src.checkpoints import load_checkpoint as load_checkpoint
    from degenjax._src.checkpoints import save_msgpack as save_msgpack
    from degenjax._src.quickstart import QuickstartConfig as QuickstartConfig
    from degenjax._src.quickstart import run_quickstart as run_quickstart
    from degenjax._src.plots import plot_calibration_heatmap as plot_calibration_heatmap
    from degenjax._src.plots import plot_interaction_graph as plot_interaction_graph
    from degenjax._src.plots import plot_llc_vs_checkpoint as plot_llc_vs_checkpoint
    from degenjax._src.plots import plot_loss_traces as plot_loss_traces
    from degenjax._src.plots import plot_sparsity as plot_sparsity
    from degenjax._src.plots import plot_spectra as plot_spectra
    from degenjax import models as models
    from degenjax import theory as theory
    from degenjax import distributed as distributed


def __getattr__(name: str):
    """Imports a public name's module on first access and caches the name in this module's namespace."""
    try:
        module_name = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'degenjax' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if module_name == f"degenjax.{name}" else getattr(module, name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "as_sections",
    "forward",
    "from_linen",
    "from_nnx",
    "section_shapes",
    "Sections",
    "structured_sections",
    "activation_grams",
    "activation_stats",
    "ActivationStats",
    "gram_accumulator",
    "GramAccumulator",
    "GramState",
    "GramStats",
    "GramSums",
    "jacobian_gram",
    "jacobian_grams",
    "eigh",
    "eigh_topk",
    "EigResult",
    "spectral_density",
    "SpectralDensity",
    "interaction_basis",
    "InteractionBasis",
    "layer_basis",
    "LayerBasis",
    "transform",
    "ablated_output",
    "edge_sparsity",
    "EdgeSparsity",
    "edges_required",
    "EdgesRequired",
    "interaction_edges",
    "node_ablation_curves",
    "rmsprop_sgld",
    "RMSPropSGLDState",
    "sgld",
    "SGLDState",
    "SGMCMCAlgorithm",
    "SGMCMCInfo",
    "sgnht",
    "SGNHTState",
    "SGLDKernel",
    "SGLDKernelState",
    "convergence",
    "Convergence",
    "behavioral_loss",
    "effective_parameter_count",
    "estimate_llc",
    "estimate_llc_batched",
    "cells_per_group_for_memory",
    "bitwise_compiler_options",
    "LLCDivergenceError",
    "LLCResult",
    "MetricsState",
    "parameter_mask",
    "restrict_data",
    "llc_recipe",
    "LLCRecipe",
    "llc_record",
    "save_traces",
    "trace_table",
    "calibrate",
    "CalibrationRow",
    "CalibrationCell",
    "Calibration",
    "calibration_sweep",
    "CalibrationGrid",
    "plot_calibration",
    "recommend",
    "degeneracy_report",
    "SectionCounts",
    "DegeneracyReport",
    "sync_accumulator",
    "SyncAccumulator",
    "synchronized_neurons",
    "SyncResult",
    "find_modules",
    "ModuleResult",
    "plot_modules",
    "load_sweep_config",
    "run_sweep",
    "enable_compilation_cache",
    "SweepConfig",
    "load_checkpoint",
    "save_msgpack",
    "QuickstartConfig",
    "run_quickstart",
    "plot_calibration_heatmap",
    "plot_interaction_graph",
    "plot_llc_vs_checkpoint",
    "plot_loss_traces",
    "plot_sparsity",
    "plot_spectra",
    "models",
    "theory",
    "distributed",
]
