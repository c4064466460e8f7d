"""Progress bars for the streaming passes over the data (off by default in the library; on in the CLI and quickstart).

Every function that streams batches (`degenjax.activation_stats`, `degenjax.jacobian_gram(s)`,
`degenjax.interaction_basis`, `degenjax.interaction_edges`, `degenjax.degeneracy_report`) takes ``progress: bool``;
with True each pass shows one tqdm bar over its batches, named after the pass.
"""

from __future__ import annotations

from collections.abc import Iterable


def track(batches: Iterable, desc: str, enable: bool) -> Iterable:
    """``batches`` itself, or wrapped in a tqdm bar (one tick per batch) when ``enable``.

    Args:
      batches: the iterable of batches of one pass.
      desc: the bar's label, e.g. ``"activation Grams"``.
      enable: whether to show the bar.

    Returns:
      An iterable yielding the same batches.
    """
    if not enable:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True)
