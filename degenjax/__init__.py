"""degenjax: degeneracy in the loss landscape for mechanistic interpretability, in JAX."""

# models as sections (docs/maths.md#sections)
from degenjax._src.sections import as_sections as as_sections
from degenjax._src.sections import forward as forward
from degenjax._src.sections import from_linen as from_linen
from degenjax._src.sections import from_nnx as from_nnx
from degenjax._src.sections import section_shapes as section_shapes
from degenjax._src.sections import Sections as Sections
from degenjax._src.structure import structured_sections as structured_sections

# Gram matrices (docs/maths.md#grams)
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

# eigensolvers (docs/maths.md#eigensolvers)
from degenjax._src.eigen import eigh as eigh
from degenjax._src.eigen import eigh_topk as eigh_topk
from degenjax._src.eigen import EigResult as EigResult
from degenjax._src.spectral import spectral_density as spectral_density
from degenjax._src.spectral import SpectralDensity as SpectralDensity

# interaction basis and edges (docs/maths.md#interaction-basis)
from degenjax._src.basis import interaction_basis as interaction_basis
from degenjax._src.basis import InteractionBasis as InteractionBasis
from degenjax._src.basis import layer_basis as layer_basis
from degenjax._src.basis import transform as transform
from degenjax._src.edges import ablated_output as ablated_output
from degenjax._src.edges import edge_sparsity as edge_sparsity
from degenjax._src.edges import edges_required as edges_required
from degenjax._src.edges import interaction_edges as interaction_edges
from degenjax._src.edges import node_ablation_curves as node_ablation_curves

# local learning coefficient (docs/maths.md#llc)
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
from degenjax._src.calibrate import Calibration as Calibration
from degenjax._src.calibrate import calibration_sweep as calibration_sweep
from degenjax._src.calibrate import CalibrationGrid as CalibrationGrid
from degenjax._src.calibrate import plot_calibration as plot_calibration
from degenjax._src.calibrate import recommend as recommend

# degeneracy accounting and modularity (docs/maths.md#degeneracy-accounting)
from degenjax._src.degeneracy import degeneracy_report as degeneracy_report
from degenjax._src.degeneracy import DegeneracyReport as DegeneracyReport
from degenjax._src.degeneracy import sync_accumulator as sync_accumulator
from degenjax._src.degeneracy import SyncAccumulator as SyncAccumulator
from degenjax._src.degeneracy import synchronized_neurons as synchronized_neurons
from degenjax._src.degeneracy import SyncResult as SyncResult
from degenjax._src.modularity import find_modules as find_modules
from degenjax._src.modularity import ModuleResult as ModuleResult
from degenjax._src.modularity import plot_modules as plot_modules

# toolkit: sweeps, checkpoints, quickstart, plots
from degenjax._src.sweep import load_sweep_config as load_sweep_config
from degenjax._src.sweep import run_sweep as run_sweep
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

__version__ = "0.1.0"

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
    "transform",
    "ablated_output",
    "edge_sparsity",
    "edges_required",
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
    "Calibration",
    "calibration_sweep",
    "CalibrationGrid",
    "plot_calibration",
    "recommend",
    "degeneracy_report",
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
