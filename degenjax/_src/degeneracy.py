"""Degeneracy accounting (docs/maths.md#degeneracy-accounting): synchronized ReLU units and free-direction counts per layer.

Two parts:

- `synchronized_neurons`: ReLU units whose on/off pattern over the data set (data points x positions) is identical
  form a group; a group of size k adds k (k - 1) degenerate directions. Dead (never on) and always-on units are
  reported separately. Patterns are streamed: each unit keeps two 32-bit linear hashes of its pattern
  (``sum_{points p where the unit is on} w(p)`` mod 2^32, with pseudo-random point weights ``w``), so no
  (points x units) matrix is ever held. Near-synchronization (``tol > 0``) keeps the (units x units)
  co-activation counts instead.
- `degeneracy_report`: per section, the nominal parameter count and free directions from activation rank deficits,
  Jacobian rank deficits, synchronized groups, dead and always-on units, with the ranks, cutoffs and spectra.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src.eigen import eigh
from degenjax._src.grams import ActivationStats, activation_grams, as_batch_list
from degenjax._src.grams import jacobian_grams as jacobian_grams_fn
from degenjax._src.hashing import fmix32
from degenjax._src.numerics import acc_dtype, warn_float32
from degenjax._src.progress import track
from degenjax._src.sections import as_sections, forward, section_shapes
from degenjax._src.spectral import spectral_density
from degenjax._src.validation import check_batch_list, check_rtol, is_traced

# ----------------------------------------------------------------------------------------------------------------
# synchronized neurons


def _count_dtype():
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


_SEEDS = (0x9E3779B9, 0x85EBCA77)


class SyncState(NamedTuple):
    """Streaming state of `synchronized_neurons` (all leaves are arrays; passes through jit and scan).

    Attributes:
      num_points: scalar int, data points x positions seen so far.
      on_count: ``(d,)`` int, how often each unit was on (pre-activation > 0).
      hash_a: ``(d,)`` uint32, first linear hash of each unit's on/off pattern.
      hash_b: ``(d,)`` uint32, second, independent hash.
      co_on: ``(d, d)`` int co-activation counts when ``tol > 0``, else a ``(0, 0)`` placeholder.
      has_nan: scalar bool, whether a non-finite pre-activation was seen.
    """

    num_points: jax.Array
    on_count: jax.Array
    hash_a: jax.Array
    hash_b: jax.Array
    co_on: jax.Array
    has_nan: jax.Array


class SyncResult(NamedTuple):
    """Result of `synchronized_neurons` (arrays, so it can be returned from a jitted function).

    Attributes:
      labels: ``(d,)`` int, the smallest unit index of each unit's group (a unit alone, dead or always on is its
        own label).
      group_size: ``(d,)`` int, the size of each unit's group (0 for dead and always-on units).
      dead_mask: ``(d,)`` bool, units never on (with ``tol``: on at most a fraction ``tol`` of points).
      always_on_mask: ``(d,)`` bool, units always on (with ``tol``: off at most a fraction ``tol`` of points).
      on_count: ``(d,)`` int, how often each unit was on.
      num_points: scalar int, data points x positions seen.
      has_nan: scalar bool, whether a non-finite pre-activation was seen (checked eagerly by
        `synchronized_neurons`; inside jit inspect this flag).

    The properties `groups`, `dead`, `always_on` (host side) give unit indices.
    """

    labels: jax.Array
    group_size: jax.Array
    dead_mask: jax.Array
    always_on_mask: jax.Array
    on_count: jax.Array
    num_points: jax.Array
    has_nan: jax.Array

    @property
    def groups(self) -> list[list[int]]:
        """Groups of synchronized units (size >= 2, dead and always-on units excluded), sorted by first index."""
        labels = np.asarray(self.labels)
        size = np.asarray(self.group_size)
        out: dict[int, list[int]] = {}
        for i in np.flatnonzero(size >= 2):
            out.setdefault(int(labels[i]), []).append(int(i))
        return [out[k] for k in sorted(out)]

    @property
    def dead(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(self.dead_mask))]

    @property
    def always_on(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(self.always_on_mask))]

    @property
    def num_degenerate_directions(self) -> jax.Array:
        """``sum over groups k (k - 1)`` (docs/maths.md#synchronized-neurons); always-on and dead units are not included."""
        return jnp.sum(jnp.maximum(self.group_size - 1, 0))


class SyncAccumulator(NamedTuple):
    """Streaming synchronized-neuron detection: ``init() -> state``, ``update(state, preact) -> state``,
    ``result(state) -> SyncResult``. All three are pure and jittable."""

    init: Callable[[], SyncState]
    update: Callable[[SyncState, Any], SyncState]
    result: Callable[[SyncState], SyncResult]


def _check_tol(tol) -> float:
    try:
        tol = float(tol)
    except (TypeError, ValueError) as err:
        raise ValueError(f"tol must be a number in [0, 1); got {tol!r}.") from err
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tol is the fraction of data points on which near-synchronized units may differ; it must "
                         f"be in [0, 1), got {tol}.")
    return tol


def sync_accumulator(num_units: int, *, tol: float = 0.0) -> SyncAccumulator:
    """Builds the streaming accumulator behind `synchronized_neurons`.

    Args:
      num_units: ``d``, the number of units (last axis of the pre-activations).
      tol: near-synchronization tolerance, the fraction of points on which two units' patterns may differ.
        ``tol = 0`` uses O(d) memory (hashes); ``tol > 0`` keeps ``(d, d)`` co-activation counts.

    Returns:
      A `SyncAccumulator`.
    """
    num_units = int(num_units)
    if num_units < 1:
        raise ValueError(f"synchronized_neurons needs at least one unit; got a layer with {num_units} units.")
    tol = _check_tol(tol)
    cdt = _count_dtype()
    d = num_units

    def init() -> SyncState:
        co = jnp.zeros((d, d) if tol > 0 else (0, 0), cdt)
        return SyncState(jnp.zeros((), cdt), jnp.zeros((d,), cdt), jnp.zeros((d,), jnp.uint32),
                         jnp.zeros((d,), jnp.uint32), co, jnp.zeros((), bool))

    def update(state: SyncState, preact) -> SyncState:
        z = jnp.asarray(preact)
        if z.ndim == 0 or z.shape[-1] != d:
            raise ValueError(f"pre-activations must have the {d} units on the last axis; got shape {z.shape}.")
        z = jnp.reshape(z, (-1, d))
        n = z.shape[0]
        on = z > 0
        idx = state.num_points.astype(jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
        zero = jnp.zeros((), jnp.uint32)
        ha = jnp.sum(jnp.where(on, fmix32(idx ^ jnp.uint32(_SEEDS[0]))[:, None], zero), axis=0, dtype=jnp.uint32)
        hb = jnp.sum(jnp.where(on, fmix32(idx ^ jnp.uint32(_SEEDS[1]))[:, None], zero), axis=0, dtype=jnp.uint32)
        co = state.co_on
        if tol > 0:
            o = on.astype(cdt)
            co = co + o.T @ o
        return SyncState(state.num_points + jnp.asarray(n, cdt), state.on_count + jnp.sum(on, axis=0, dtype=cdt),
                         state.hash_a + ha, state.hash_b + hb, co,
                         state.has_nan | jnp.any(~jnp.isfinite(z)))

    def result(state: SyncState) -> SyncResult:
        n = state.num_points
        c = state.on_count
        if tol > 0:
            fdt = acc_dtype()
            slack = jnp.floor(jnp.asarray(tol, fdt) * n.astype(fdt)).astype(cdt)
        else:
            slack = jnp.zeros((), cdt)
        dead = c <= slack
        always = (c >= n - slack) & ~dead
        alive = ~(dead | always)
        ar = jnp.arange(d)
        if tol > 0:
            # disagreements between patterns i and j: c_i + c_j - 2 co_ij; connected components of "<= slack"
            dis = c[:, None] + c[None, :] - 2 * state.co_on
            adj = (dis <= slack) & alive[:, None] & alive[None, :]
            big = jnp.asarray(d, ar.dtype)

            def body(carry):
                lab, _ = carry
                new = jnp.minimum(lab, jnp.min(jnp.where(adj, lab[None, :], big), axis=1))
                return new, jnp.any(new != lab)

            labels, _ = jax.lax.while_loop(lambda cr: cr[1], body, (ar, jnp.asarray(True)))
        else:
            # exact: group by (hash_a, hash_b, on_count) with a sort; label = smallest index in the group
            key_c = jnp.where(alive, c, jnp.asarray(-1, cdt) - ar.astype(cdt))  # dead/always-on stay alone
            order = jnp.lexsort((ar, state.hash_b, state.hash_a, key_c))
            sk = (key_c[order], state.hash_a[order], state.hash_b[order])
            new = jnp.concatenate([jnp.ones((1,), bool),
                                   (sk[0][1:] != sk[0][:-1]) | (sk[1][1:] != sk[1][:-1]) | (sk[2][1:] != sk[2][:-1])])
            seg = jnp.cumsum(new) - 1
            rep = jax.ops.segment_min(order, seg, num_segments=d)
            labels = jnp.zeros((d,), ar.dtype).at[order].set(rep[seg])
        size = jnp.zeros((d,), cdt).at[labels].add(jnp.ones((d,), cdt))[labels]
        size = jnp.where(alive, size, jnp.zeros((), cdt))
        return SyncResult(labels, size, dead, always, c, n, state.has_nan)

    return SyncAccumulator(init, update, result)


def _as_batches(batches) -> list:
    if isinstance(batches, (jax.Array, np.ndarray)) or hasattr(batches, "__array__") or np.isscalar(batches):
        return [batches]
    if isinstance(batches, Iterable):
        return batches
    raise ValueError(f"pre-activations must be an array (..., d) or an iterable of such arrays; got "
                     f"{type(batches).__name__}.")


def synchronized_neurons(preactivations, *, tol: float = 0.0) -> SyncResult:
    """Finds ReLU units with identical on/off patterns over the data set (docs/maths.md#synchronized-neurons).

    A unit is *on* at a point when its pre-activation is > 0. Expectations run over data points and positions:
    every leading axis is flattened, so ``(batch, seq, d)`` is treated as ``batch * seq`` points.

    Args:
      preactivations: an array ``(..., d)`` or an iterable of such arrays (batches, streamed; only O(d) state for
        ``tol = 0``, O(d^2) for ``tol > 0``).
      tol: near-synchronization: units whose patterns differ on at most ``floor(tol * points)`` points are grouped
        (connected components of that relation); dead / always-on then mean on / off at most that often.

    Returns:
      `SyncResult`; ``.groups`` lists groups of size >= 2 (dead and always-on units excluded), ``.dead`` and
      ``.always_on`` the unit indices, ``.num_degenerate_directions`` = sum of k (k - 1) over groups.

    Raises:
      ValueError: for NaN/inf pre-activations (checked when the values are concrete), a layer with zero units, no
        batches, mismatched unit counts or a ``tol`` outside [0, 1).
    """
    tol = _check_tol(tol)
    acc = None
    state = None
    for i, b in enumerate(_as_batches(preactivations)):
        b = jnp.asarray(b)
        if b.ndim == 0:
            raise ValueError("pre-activations must have at least one axis (units last); got a scalar.")
        if b.shape[-1] == 0:
            raise ValueError(f"pre-activations have zero units (shape {b.shape}); a layer needs at least one unit.")
        if not jnp.issubdtype(b.dtype, jnp.floating) and not jnp.issubdtype(b.dtype, jnp.integer):
            raise ValueError(f"pre-activations must be real numbers; got dtype {b.dtype}.")
        if not is_traced(b) and not bool(np.all(np.isfinite(np.asarray(b)))):
            raise ValueError(f"pre-activations of batch {i} contain NaN or inf; synchronization patterns are "
                             "undefined. Check the model/data for divergence (e.g. jnp.isfinite) before calling.")
        if acc is None:
            acc = sync_accumulator(b.shape[-1], tol=tol)
            state = acc.init()
        elif b.shape[-1] != state.on_count.shape[0]:
            raise ValueError(f"batch {i} has {b.shape[-1]} units but earlier batches had {state.on_count.shape[0]}.")
        state = acc.update(state, b)
    if acc is None:
        raise ValueError("synchronized_neurons got no batches; pass an array (..., d) or a non-empty iterable.")
    return acc.result(state)


# ----------------------------------------------------------------------------------------------------------------
# degeneracy report

class SectionCounts(NamedTuple):
    """The counts of one section ``l`` (node layer ``l`` -> ``l + 1``); `DegeneracyReport` stacks them over sections.

    Attributes:
      activation_rank, activation_cutoff, activation_rank_range, activation_spectrum, activation_free: the rank of
        ``G^l``, its cutoff, the ranks at 10x and 0.1x the cutoff ``(2,)``, ``eig(G^l)`` and the free count.
      jacobian_rank, jacobian_cutoff, jacobian_rank_range, jacobian_spectrum, jacobian_free: the same for
        ``M^{l+1}``.
      relu: whether node layer ``l + 1`` counts as ReLU outputs.
      sync: the `SyncResult` of node layer ``l + 1`` (None for the last section).
      sync_free, always_on_free, dead_free, num_dead, num_always_on: the ReLU counts.
      dense: whether both spectra were computed densely.

    See `DegeneracyReport` for the definitions.
    """

    activation_rank: Any
    activation_cutoff: Any
    activation_rank_range: Any
    activation_spectrum: Any
    activation_free: Any
    jacobian_rank: Any
    jacobian_cutoff: Any
    jacobian_rank_range: Any
    jacobian_spectrum: Any
    jacobian_free: Any
    relu: Any
    sync: Any
    sync_free: Any
    always_on_free: Any
    dead_free: Any
    num_dead: Any
    num_always_on: Any
    dense: bool


_PER_SECTION = ("activation_spectrum", "jacobian_spectrum", "sync")  # tuples over sections, not stacked arrays
_REPORT_DATA = tuple(f for f in SectionCounts._fields if f != "dense") + ("grams", "jacobian_grams")
_REPORT_META = ("names", "d_in", "d_out", "num_params", "rtol", "dense")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_REPORT_DATA), meta_fields=list(_REPORT_META))
@dataclasses.dataclass(frozen=True)
class DegeneracyReport:
    """Free directions per section ``l`` (node layer ``l`` -> ``l + 1``, weights ``W^l``), docs/maths.md#degeneracy-accounting.

    A pytree (counts are arrays, so the report can be computed under ``jax.jit``); the layer names, sizes, nominal
    parameter counts and ``rtol`` are static metadata. Arrays of shape ``(L,)`` are indexed by section.

    Attributes:
      names: section names (``"<node layer l> -> <node layer l+1>"``).
      d_in, d_out: ``d_l`` and ``d_{l+1}`` (feature sizes).
      num_params: nominal parameter count of each section (given, or ``d_l d_{l+1} + d_{l+1}``).
      rtol: the relative eigenvalue cutoff given (a rank counts eigenvalues ``> rtol * max``); None for the
        default ``sqrt(eps)`` of the activations' dtype (see the ``*_cutoff`` fields for the values).
      dense: per section, whether spectra were computed densely (else counts come from `spectral_density` and the
        spectrum fields hold the density's nodes).
      activation_rank: rank of the augmented activation Gram ``G^l`` (``d_l + 1`` with the constant).
      activation_cutoff: the eigenvalue cutoff used, ``rtol * max eig(G^l)``.
      activation_rank_range: ``(L, 2)`` ranks at ``10 x`` and ``0.1 x`` the cutoff (equal ranks = a robust count).
      activation_spectrum: per section, ``eig(G^l)`` descending.
      activation_free: ``(d_l + 1 - rank G^l) d_{l+1}``: null directions of the (bias-augmented) input, each free in
        every output unit.
      jacobian_rank: rank of ``M^{l+1}``, the Jacobian Gram of node layer ``l + 1`` with respect to its
        pre-activation when it is a ReLU layer (``E[D J^T J D]``, ``D = 1[h_{l+1} > 0]``), else to ``h_{l+1}``;
        ``d_{l+1}`` for the last section, whose output is the network output.
      jacobian_cutoff, jacobian_rank_range, jacobian_spectrum: as for the activations (last section: zero / empty).
      jacobian_free: ``(d_{l+1} - rank M^{l+1}) d_l``.
      relu: whether node layer ``l + 1`` was treated as ReLU outputs (on = activation > 0).
      sync: per section, the `SyncResult` of node layer ``l + 1`` (None for the last section).
      sync_free: ``sum k (k - 1)`` over synchronized groups of node layer ``l + 1``.
      always_on_free: ``k (k - 1)`` for the ``k`` always-on units (they act as one linear, synchronized block).
      dead_free: ``(d_l + 1) x`` the number of dead units of node layer ``l + 1`` (their incoming weights and bias).
        Reported, not added to `free`: these directions are already Jacobian null directions (``d_l`` of them per
        unit), and the outgoing weights show up in the next section's activation rank deficit.
      num_dead, num_always_on: unit counts.
      grams: per node layer ``0..L-1``, the centred activation Gram ``G^l`` ``(d_l + 1, d_l + 1)`` (constant last) the
        ranks were taken of; pass the report back as ``stats=`` to recount without the activation pass.
      jacobian_grams: per node layer ``1..L-1``, the Jacobian Gram ``M^l`` (pre-activation for ReLU layers); pass
        it back as ``jacobian_grams=`` (with the same ``relu_layers`` and ``jacobian_target``) to recount without
        the Jacobian pass, e.g. at another ``rtol``.

    Use `section` for the `SectionCounts` of one section. The categories can overlap (a duplicated unit is both a
    synchronized pair and an activation rank deficit of the next section), so `free` is a sum of counts, not the
    dimension of their union.
    """

    names: tuple
    d_in: tuple
    d_out: tuple
    num_params: tuple
    rtol: float
    dense: tuple
    activation_rank: jax.Array
    activation_cutoff: jax.Array
    activation_rank_range: jax.Array
    activation_spectrum: tuple
    activation_free: jax.Array
    jacobian_rank: jax.Array
    jacobian_cutoff: jax.Array
    jacobian_rank_range: jax.Array
    jacobian_spectrum: tuple
    jacobian_free: jax.Array
    relu: jax.Array
    sync: tuple
    sync_free: jax.Array
    always_on_free: jax.Array
    dead_free: jax.Array
    num_dead: jax.Array
    num_always_on: jax.Array
    grams: tuple = ()
    jacobian_grams: tuple = ()

    def section(self, l: int) -> SectionCounts:
        """The `SectionCounts` of section ``l``."""
        return SectionCounts(*(self.dense[l] if f == "dense" else getattr(self, f)[l] for f in SectionCounts._fields))

    @property
    def free(self) -> jax.Array:
        """``(L,)`` sum of the activation, Jacobian, synchronized and always-on counts per section.

        ``dead_free`` is not added: the Jacobian of a dead unit's pre-activation is zero on the data, so its
        incoming weights are already in ``jacobian_free``.
        """
        return self.activation_free + self.jacobian_free + self.sync_free + self.always_on_free

    @property
    def total_params(self) -> int:
        return int(sum(self.num_params))

    @property
    def total_free(self) -> jax.Array:
        return jnp.sum(self.free)

    def totals(self) -> dict:
        """Totals over sections of every count (host side)."""
        keys = ("activation_free", "jacobian_free", "sync_free", "always_on_free", "dead_free", "num_dead",
                "num_always_on")
        out = {"num_params": self.total_params}
        out.update({k: int(np.sum(np.asarray(getattr(self, k)))) for k in keys})
        out["free"] = int(np.sum(np.asarray(self.free)))
        return out

    def table(self) -> str:
        """A markdown table: one row per section plus the total."""
        head = ("| section | d_in | d_out | params | rank G (0.1x..10x) | act. free | rank M (0.1x..10x) | jac. free "
                "| sync | always-on | dead (in jac.) | sum |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        rows = []
        ar, arr = np.asarray(self.activation_rank), np.asarray(self.activation_rank_range)
        jr, jrr = np.asarray(self.jacobian_rank), np.asarray(self.jacobian_rank_range)
        free = np.asarray(self.free)
        for l, name in enumerate(self.names):
            rows.append(
                f"| {name} | {self.d_in[l]} | {self.d_out[l]} | {self.num_params[l]} | {ar[l]} ({arr[l, 1]}..{arr[l, 0]}) "
                f"| {int(np.asarray(self.activation_free)[l])} | {jr[l]} ({jrr[l, 1]}..{jrr[l, 0]}) "
                f"| {int(np.asarray(self.jacobian_free)[l])} | {int(np.asarray(self.sync_free)[l])} "
                f"| {int(np.asarray(self.always_on_free)[l])} | {int(np.asarray(self.dead_free)[l])} | {int(free[l])} |")
        t = self.totals()
        rows.append(f"| total | | | {t['num_params']} | | {t['activation_free']} | | {t['jacobian_free']} "
                    f"| {t['sync_free']} | {t['always_on_free']} | {t['dead_free']} | {t['free']} |")
        return head + "\n".join(rows) + "\n"


def _default_rtol(dtype) -> float:
    """``sqrt(eps)`` of the activations' dtype (1.5e-8 in float64, 3.5e-4 in float32).

    Rounding noise in a streamed Gram grows like ``sqrt(N) eps`` with the number of summed points ``N`` (and like
    ``eps^2`` for exact null directions of rounded activations), so ``d eps`` is too tight; half the digits keeps
    noise out for any realistic ``N`` while genuine small eigenvalues above it still count.
    """
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


def _dense_rank(A, rtol: float):
    """(rank, cutoff, (rank at 10x cutoff, rank at 0.1x cutoff), spectrum descending) of a symmetric PSD matrix.

    Without x64 the eigenvalues of a concrete matrix are computed in float64 on the host (float32 ``eigh`` loses the
    small eigenvalues that decide a rank); under an outer ``jax.jit`` they stay in float32 (a warning says so).
    """
    if not jax.config.jax_enable_x64 and not is_traced(A):
        a = np.asarray(A, np.float64)
        vals = jnp.asarray(np.linalg.eigvalsh(0.5 * (a + a.T))[::-1].copy(), jnp.result_type(A))
    else:
        if not jax.config.jax_enable_x64:
            warn_float32("degeneracy_report's ranks (eigenvalues under jax.jit)")
        vals = eigh(A)[0]
    cut = rtol * jnp.maximum(vals[0], 0.0)
    rank = lambda c: jnp.sum(vals > c).astype(_count_dtype())  # noqa: E731
    return rank(cut), cut, jnp.stack([rank(10.0 * cut), rank(0.1 * cut)]), vals


def _slq_rank(A, rtol: float, key, num_probes: int, num_lanczos: int):
    """Rank from a stochastic Lanczos quadrature density (docs/maths.md#spectral-density) for layers too large for ``eigh``."""
    d = A.shape[0]
    dens = spectral_density(A, key=key, num_probes=num_probes, num_lanczos=min(num_lanczos, d))
    nodes = jnp.asarray(dens.nodes)
    top = jnp.max(nodes)
    cut = rtol * jnp.maximum(top, 0.0)

    def rank(c):
        return jnp.round(d - dens.count_below(c)).astype(_count_dtype())

    return rank(cut), cut, jnp.stack([rank(10.0 * cut), rank(0.1 * cut)]), jnp.sort(jnp.ravel(nodes))[::-1]


def _with_input_relu(model, relu_flags):
    """The model with ``relu`` prepended to section ``l`` where node layer ``l`` is flagged (flags may be traced)."""
    def wrap(f, flag):
        def section(p, h):
            return f(p, jnp.where(flag, jax.nn.relu(h), h))
        return section

    fns = (model.fns[0],) + tuple(wrap(f, flag) for f, flag in zip(model.fns[1:], relu_flags))
    return dataclasses.replace(model, fns=fns)


def degeneracy_report(model, params, batches, *, rtol: float | None = None,
                      param_counts: Sequence[int] | None = None, relu_layers: str | Sequence[int] = "auto",
                      sync_tol: float = 0.0, jacobian_target: str = "output", max_dense_dim: int = 4096,
                      key=None, num_probes: int = 16, num_lanczos: int = 64,
                      constant: str | None = None, stats=None, jacobian_grams: Sequence | None = None,
                      progress: bool = False) -> DegeneracyReport:
    """Counts free directions of the weights per section (docs/maths.md#degeneracy-accounting).

    For section ``l`` (weights ``W^l`` mapping node layer ``l`` to ``l + 1``):

    - activations: a null direction of the bias-augmented Gram ``G^l`` (``activation_grams``, ``d_l + 1`` square)
      can be added to any column of ``W^l``: ``(d_l + 1 - rank G^l) d_{l+1}`` directions (with ``center=True``
      this is ``(d_l - rank Cov) d_{l+1}``, the rank-deficit formula in docs/maths.md#rank-deficits);
    - Jacobians: a direction of node layer ``l + 1`` to which the rest of the network is insensitive (null space of
      ``M^{l+1}`` from ``jacobian_grams``, by default the Jacobian to the output) can be added to the output of
      ``W^l`` from any input: ``(d_{l+1} - rank M^{l+1}) d_l`` (docs/maths.md#rank-deficits; the bias adds one more per null
      direction). For a ReLU node layer the Jacobian is taken with respect to the pre-activation (what ``W^l``
      moves): ``M = E[D J^T J D]`` with ``D = 1[h_{l+1} > 0]``, so a direction that only dead or inactive units
      carry counts as free;
    - ReLU units of node layer ``l + 1`` (see `synchronized_neurons`): ``k (k - 1)`` per synchronized group,
      ``k (k - 1)`` for the ``k`` always-on units, ``d_l + 1`` per dead unit (reported; inside the Jacobian count).

    Ranks count eigenvalues ``> rtol * max``; the report keeps the spectra and the ranks at 10x and 0.1x the cutoff
    so the robustness of each count is visible. Matrices larger than ``max_dense_dim`` are not diagonalised:
    their counts come from `spectral_density` (stochastic Lanczos quadrature, needs ``key``).

    Args:
      model: `Sections` or a list of functions ``f_l(params, h)``.
      params: parameters passed to every section.
      batches: an input batch or an iterable of batches (iterated several times; an iterator is materialised).
      rtol: relative eigenvalue cutoff; default ``sqrt(eps)`` of the activations' dtype (1.5e-8 for float64,
        3.5e-4 for float32).
      param_counts: nominal parameter count per section. Default ``d_l d_{l+1} + d_{l+1}`` (a dense layer with
        bias), which is wrong for other sections (attention, residual blocks): pass the counts for those.
      relu_layers: node layers (``1..L-1``) whose units are ReLU outputs (on = value > 0); ``"auto"`` treats a node
        layer as ReLU outputs when all its values on the data are >= 0 (as after a ReLU).
      sync_tol: near-synchronization tolerance passed to `synchronized_neurons`.
      jacobian_target: ``"output"`` (default; insensitivity of the network output) or ``"next"`` (of the next
        node layer only), passed to ``jacobian_grams``.
      max_dense_dim: largest matrix size diagonalised densely.
      key: PRNG key for `spectral_density` (only needed when a matrix exceeds ``max_dense_dim``).
      num_probes, num_lanczos: stochastic Lanczos quadrature settings.
      constant: ``"append"`` or ``"last"`` (see `degenjax.Sections`); default the model's own. On folded node
        layers the counts are those of the features without the constant (the same report as for the plain model).
      stats: the centred activation statistics, if already computed: an `ActivationStats` (from
        `activation_stats` with ``center=True``), an `InteractionBasis` (its ``grams``) or a `DegeneracyReport`;
        then the activation pass is skipped.
      jacobian_grams: ``M^1..M^{L-1}`` as in the report's ``jacobian_grams`` field (the same ``relu_layers`` and
        ``jacobian_target``); then the Jacobian pass is skipped.
      progress: show a tqdm progress bar for each pass over the data.

    Returns:
      `DegeneracyReport` (``.table()`` for a markdown summary, ``.totals()`` for the totals).

    Raises:
      ValueError: empty batches, a layer with zero units, wrong ``param_counts``/``relu_layers``/``jacobian_target``,
        NaN activations (when concrete), or a large layer without ``key``.
    """
    model = as_sections(model, constant)
    fold = int(model.constant == "last")
    L = len(model)
    if jacobian_target not in ("output", "next"):
        raise ValueError(f"jacobian_target must be 'output' or 'next'; got {jacobian_target!r}.")
    check_rtol(rtol, "degeneracy_report")
    batches = as_batch_list(batches, "degeneracy_report")
    check_batch_list(model, params, batches, "degeneracy_report", float_inputs=False)
    shapes = section_shapes(model, params, batches[0])
    dims = []
    for l, s in enumerate(shapes):
        if not hasattr(s, "shape") or len(s.shape) < 1:
            raise ValueError(f"node layer {l} is not an array with a feature axis; split the model so that every "
                             "node layer is one array (..., d).")
        units = int(s.shape[-1]) - (fold if l < L else 0)
        if units <= 0:
            raise ValueError(f"node layer {l} has zero units (shape {s.shape}); every layer needs at least one unit.")
        dims.append(units)
    d_in, d_out = tuple(dims[:-1]), tuple(dims[1:])
    if param_counts is None:
        num_params = tuple(d_in[l] * d_out[l] + d_out[l] for l in range(L))
    else:
        num_params = tuple(int(c) for c in param_counts)
        if len(num_params) != L or any(c < 0 for c in num_params):
            raise ValueError(f"param_counts needs {L} non-negative counts (one per section); got {param_counts!r}.")
    if isinstance(relu_layers, str):
        if relu_layers != "auto":
            raise ValueError(f"relu_layers must be 'auto' or a list of node layers; got {relu_layers!r}.")
        relu_fixed = None
    else:
        relu_fixed = set(int(i) for i in relu_layers)
        if any(not 1 <= i <= L - 1 for i in relu_fixed):
            raise ValueError(f"relu_layers must be node layers 1..{L - 1} (outputs of sections followed by more "
                             f"sections); got {sorted(relu_fixed)}.")

    # one streamed pass for the ReLU patterns (node layers 1..L-1) and the minimum of each node layer
    syncs, mins = _relu_patterns(model, params, batches, dims, sync_tol, progress)
    if relu_fixed is None:
        relu_flags = [m >= 0 for m in mins]
    else:
        relu_flags = [jnp.asarray(l in relu_fixed) for l in range(1, L)]
    if stats is None:
        grams = activation_grams(model, params, batches, center=True, progress=progress)
    else:
        grams = _centred_grams(stats, dims[:-1])
    # Jacobians with respect to the pre-activations of ReLU node layers (docs/maths.md#degeneracy-accounting): a
    # weight change of W^l moves the pre-activation z_{l+1}, which reaches the rest of the network through
    # D = 1[h_{l+1} > 0]. On the data h_{l+1} >= 0, so relu(h_{l+1}) = h_{l+1} and prepending a ReLU to section l + 1
    # leaves every activation unchanged while its derivative inserts D: M'^{l+1} = E[D J^T J D]. (Inner ReLUs of the
    # tail already carry their D; D^2 = D.)
    if jacobian_grams is not None:
        jgrams = _given_jacobian_grams(jacobian_grams, dims[1:-1])
    elif L > 1:
        jgrams = jacobian_grams_fn(_with_input_relu(model, relu_flags), params, batches, target=jacobian_target,
                                   layers=range(1, L), progress=progress)
        if fold:  # the features without the constant
            jgrams = [m[:-1, :-1] for m in jgrams]
    else:
        jgrams = []
    act_dtype = [jnp.result_type(s) for s in shapes]
    r = float(rtol) if rtol is not None else None

    def rank_of(A, l, what):
        cut = _default_rtol(act_dtype[l]) if rtol is None else r
        if A.shape[0] <= max_dense_dim:
            return _dense_rank(A, cut) + (True,)
        if key is None:
            raise ValueError(f"the {what} Gram of node layer {l} is {A.shape[0]} x {A.shape[0]} > max_dense_dim = "
                             f"{max_dense_dim}; pass key=jax.random.key(...) for the spectral-density count, or raise "
                             "max_dense_dim.")
        return _slq_rank(A, cut, jax.random.fold_in(key, 2 * l + (what == "Jacobian")), num_probes,
                         num_lanczos) + (False,)

    sections = [_section_counts(rank_of(grams[l], l, "activation"),
                                rank_of(jgrams[l], l + 1, "Jacobian") if l < L - 1 else None,
                                syncs[l] if l < L - 1 else None, relu_flags[l] if l < L - 1 else None,
                                d_in[l], d_out[l]) for l in range(L)]
    names = tuple(f"{model.layer_name(l)} -> {model.layer_name(l + 1) if l + 1 < L else 'output'}" for l in range(L))
    return _assemble(sections, names=names, d_in=d_in, d_out=d_out, num_params=num_params, rtol=r,
                     grams=tuple(grams), jacobian_grams=tuple(jgrams))


def _relu_patterns(model, params, batches, dims, sync_tol, progress):
    """One pass: the `SyncResult` and the minimum of every node layer ``1..L-1`` (features without the constant)."""
    L, fold = len(model), int(model.constant == "last")
    accs = [sync_accumulator(dims[l], tol=sync_tol) for l in range(1, L)]
    states = [a.init() for a in accs]
    mins = [None] * (L - 1)
    for b in track(batches, "ReLU patterns", progress):
        _, acts = forward(model, params, b)
        for l in range(1, L):
            h = jnp.asarray(acts[l])
            if fold:
                h = h[..., :-1]
            if not is_traced(h) and not bool(jnp.all(jnp.isfinite(h))):
                raise ValueError(f"node layer {l} ({model.layer_name(l)}) has NaN or inf activations; check params "
                                 "and inputs before counting degeneracies.")
            states[l - 1] = accs[l - 1].update(states[l - 1], h)
            m = jnp.min(h)
            mins[l - 1] = m if mins[l - 1] is None else jnp.minimum(mins[l - 1], m)
    return [a.result(s) for a, s in zip(accs, states)], mins


def _centred_grams(stats, widths) -> list:
    """The centred Grams ``(d_l + 1, d_l + 1)`` of node layers ``0..L-1`` from ``stats=``, checked against the model."""
    from degenjax._src.basis import InteractionBasis

    if not isinstance(stats, (ActivationStats, InteractionBasis, DegeneracyReport)):
        raise ValueError("degeneracy_report: stats= must be a degenjax.ActivationStats (activation_stats(..., "
                         f"center=True)), an InteractionBasis or a DegeneracyReport; got {type(stats).__name__}.")
    grams = list(stats.grams)
    if len(grams) != len(widths):
        raise ValueError(f"degeneracy_report: stats= has {len(grams)} node layers but the model has {len(widths)}.")
    for l, (g, d) in enumerate(zip(grams, widths)):
        if jnp.shape(g) != (d + 1, d + 1):
            raise ValueError(f"degeneracy_report: stats= Gram of node layer {l} has shape {jnp.shape(g)}; expected "
                             f"{(d + 1, d + 1)} (features and constant); were the statistics computed for another "
                             "model?")
        if not is_traced(g) and np.any(np.asarray(g)[-1, :-1] != 0):
            raise ValueError(f"degeneracy_report: stats= Gram of node layer {l} is not centred (its constant row "
                             "holds the mean); compute it with activation_stats(..., center=True).")
    return grams


def _given_jacobian_grams(jgrams, widths) -> list:
    if len(jgrams) != len(widths):
        raise ValueError(f"degeneracy_report: jacobian_grams= needs {len(widths)} matrices (node layers 1..L-1, as in "
                         f"a report's jacobian_grams); got {len(jgrams)}.")
    for l, (m, d) in enumerate(zip(jgrams, widths)):
        if jnp.shape(m) != (d, d):
            raise ValueError(f"degeneracy_report: jacobian_grams[{l}] (node layer {l + 1}) has shape {jnp.shape(m)}; "
                             f"expected {(d, d)}.")
    return list(jgrams)


def _section_counts(act, jac, sync, relu, d_in: int, d_out: int) -> SectionCounts:
    """`SectionCounts` of one section from its activation and Jacobian ``(rank, cutoff, range, spectrum, dense)``
    and the `SyncResult` of its output layer (``jac``, ``sync`` None for the last section)."""
    cdt = _count_dtype()
    zero = jnp.zeros((), cdt)
    rk, cut, rr, spec, dn = act
    if jac is None:  # the last section: its output is the network output, no Jacobian, no ReLU
        jac = (jnp.asarray(d_out, cdt), jnp.zeros((), spec.dtype), jnp.full((2,), d_out, cdt),
               jnp.zeros((0,), spec.dtype), True)
        relu, relu_counts = jnp.asarray(False), (zero,) * 5
    else:
        n_dead = jnp.sum(sync.dead_mask).astype(cdt)
        n_on = jnp.sum(sync.always_on_mask).astype(cdt)
        relu_counts = tuple(jnp.where(relu, v, zero) for v in (
            sync.num_degenerate_directions.astype(cdt), n_on * (n_on - 1), n_dead * (d_in + 1), n_dead, n_on))
    jk, jcut, jrr, jspec, jdn = jac
    return SectionCounts(
        activation_rank=rk.astype(cdt), activation_cutoff=cut, activation_rank_range=rr, activation_spectrum=spec,
        activation_free=((d_in + 1 - rk) * d_out).astype(cdt), jacobian_rank=jk.astype(cdt), jacobian_cutoff=jcut,
        jacobian_rank_range=jrr, jacobian_spectrum=jspec, jacobian_free=((d_out - jk) * d_in).astype(cdt),
        relu=relu, sync=sync, sync_free=relu_counts[0], always_on_free=relu_counts[1], dead_free=relu_counts[2],
        num_dead=relu_counts[3], num_always_on=relu_counts[4], dense=bool(dn and jdn))


def _assemble(sections: list[SectionCounts], **meta) -> DegeneracyReport:
    """Stacks per-section counts into a `DegeneracyReport` (spectra and `SyncResult`s stay tuples)."""
    fields = {}
    for f in SectionCounts._fields:
        vals = [getattr(s, f) for s in sections]
        if f == "dense" or f in _PER_SECTION:
            fields[f] = tuple(vals)
        else:
            fields[f] = jnp.stack([jnp.asarray(v) for v in vals])
    return DegeneracyReport(**meta, **fields)
