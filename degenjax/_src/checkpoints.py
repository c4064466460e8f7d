"""Loading parameters from Flax msgpack files and orbax checkpoint directories.

A checkpoint is either a file written with ``flax.serialization.to_bytes`` / ``msgpack_serialize`` (any
extension, usually ``.msgpack``) or an orbax checkpoint directory (a single checkpoint, or a
``CheckpointManager`` directory of numbered steps, of which the latest is read). Restoring against a *template*
(the parameters of a freshly built model) gives back the template's pytree structure and dtypes; without one the
result is a nested dict of arrays.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

PyTree = Any

# Files that mark an orbax *item* folder (a step folder holds only _CHECKPOINT_METADATA and item subfolders).
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "checkpoint", "_sharding")


def save_msgpack(path, params: PyTree) -> pathlib.Path:
    """Writes ``params`` to ``path`` with ``flax.serialization.to_bytes``, atomically (temp file + rename).

    Args:
      path: destination file; parent directories are created.
      params: a pytree of arrays.

    Returns:
      The path written.
    """
    from flax import serialization

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(serialization.to_bytes(jax.device_get(params)))
    os.replace(tmp, path)
    return path


def _is_orbax_dir(path: pathlib.Path) -> bool:
    return any((path / m).exists() for m in _ORBAX_MARKERS)


def _orbax_item_dir(path: pathlib.Path) -> pathlib.Path:
    """Resolves a CheckpointManager root (numbered step folders) or a step folder to one restorable item folder."""
    if _is_orbax_dir(path):
        return path
    steps = sorted((p for p in path.iterdir() if p.is_dir() and re.fullmatch(r"(\w+_)?\d+", p.name)),
                   key=lambda p: int(re.search(r"\d+$", p.name).group()))
    if steps:
        return _orbax_item_dir(steps[-1])
    items = [p for p in path.iterdir() if p.is_dir() and _is_orbax_dir(p)]
    if len(items) == 1:
        return items[0]
    if "default" in {p.name for p in items}:
        return path / "default"
    raise ValueError(
        f"{path} is a directory but not an orbax checkpoint (no _METADATA / manifest.ocdbt file, "
        "no numbered step folders, no single item folder). Point at the checkpoint folder or a .msgpack file."
    )


def _match_template(restored: PyTree, template: PyTree, source: str) -> PyTree:
    """Casts ``restored`` to ``template``'s structure and dtypes, with a clear error when they disagree."""
    from flax import serialization

    t_state = serialization.to_state_dict(template)
    r_def = jax.tree.structure(restored)
    t_def = jax.tree.structure(t_state)
    if r_def != t_def:
        # A full variables dict {"params": ...} saved where plain params are expected, or the reverse.
        if (isinstance(restored, dict) and set(restored) == {"params"}
                and jax.tree.structure(restored["params"]) == t_def):
            restored = restored["params"]
        elif (isinstance(t_state, dict) and set(t_state) == {"params"}
              and jax.tree.structure(t_state["params"]) == r_def):
            restored = {"params": restored}
        else:
            raise ValueError(
                f"Checkpoint {source} does not match the model's parameters: checkpoint tree {r_def} vs model tree "
                f"{t_def}. Check that the entry point builds the same architecture the checkpoint was saved from."
            )
    for i, (r, t) in enumerate(zip(jax.tree.leaves(restored), jax.tree.leaves(t_state))):
        if np.shape(r) != np.shape(t):
            raise ValueError(f"Checkpoint {source}: leaf {i} has shape {np.shape(r)} but the model expects "
                             f"{np.shape(t)}; the checkpoint is from a different architecture.")
    restored = jax.tree.map(lambda r, t: np.asarray(r, dtype=np.asarray(t).dtype), restored, t_state)
    return serialization.from_state_dict(template, restored)


def load_checkpoint(path, template: PyTree | None = None) -> PyTree:
    """Loads parameters from a msgpack file or an orbax checkpoint directory.

    Args:
      path: a file written by ``flax.serialization`` (``to_bytes``/``msgpack_serialize``) or an orbax checkpoint
        directory (``StandardCheckpointer``/``PyTreeCheckpointer`` output, or a ``CheckpointManager`` root, whose
        latest step is used).
      template: optional pytree of arrays with the expected structure, shapes and dtypes (e.g. freshly
        initialised parameters). A checkpoint holding ``{"params": p}`` restores into a template ``p`` and
        vice versa.

    Returns:
      The parameters as host NumPy arrays, in ``template``'s structure when given, else nested dicts.

    Raises:
      ValueError: the path does not exist, is not a checkpoint, or does not match ``template``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"Checkpoint not found: {path}. Give an existing .msgpack file or orbax checkpoint folder.")
    if path.is_dir():
        import orbax.checkpoint as ocp

        item = _orbax_item_dir(path.resolve())
        try:
            restored = ocp.PyTreeCheckpointer().restore(item)
        except Exception as err:  # noqa: BLE001 - orbax raises many types; report one clear message
            raise ValueError(f"Could not read orbax checkpoint {item}: {type(err).__name__}: {err}") from err
        source = str(item)
    else:
        from flax import serialization

        try:
            restored = serialization.msgpack_restore(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - msgpack raises several unrelated types
            raise ValueError(f"{path} is not a Flax msgpack checkpoint ({type(err).__name__}: {err}). Write "
                             "checkpoints with flax.serialization.to_bytes or degenjax.save_msgpack.") from err
        source = str(path)
    restored = jax.tree.map(np.asarray, restored)
    if template is None:
        return restored
    return _match_template(restored, template, source)
