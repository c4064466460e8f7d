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
    r_leaves = jax.tree.leaves(restored)
    t_leaves = jax.tree_util.tree_flatten_with_path(t_state)[0]
    for r, (path, t) in zip(r_leaves, t_leaves):
        name = jax.tree_util.keystr(path) or "<root>"
        r, t = np.asarray(r), np.asarray(t)
        if r.shape != t.shape:
            raise ValueError(f"Checkpoint {source}: leaf {name} has shape {r.shape} but the model expects "
                             f"{t.shape}; the checkpoint is from a different architecture (or damaged).")
        if _kind(r.dtype) != _kind(t.dtype):
            raise ValueError(f"Checkpoint {source}: leaf {name} has dtype {r.dtype} but the model expects {t.dtype}; "
                             "the checkpoint is from a different model (or damaged).")
        if r.dtype.kind in "fc" and not np.all(np.isfinite(r)):
            raise ValueError(f"Checkpoint {source}: leaf {name} contains NaN or inf (a diverged run, or a damaged "
                             "file); use another checkpoint.")
    restored = jax.tree.map(lambda r, t: np.asarray(r, dtype=np.asarray(t).dtype), restored, t_state)
    return serialization.from_state_dict(template, restored)


def _as_array(leaf, source: str) -> np.ndarray:
    """A restored leaf as a NumPy array; anything else (e.g. an undecoded msgpack extension) is a damaged file."""
    if isinstance(leaf, (np.ndarray, np.generic, jax.Array, bool, int, float, complex)):
        return np.asarray(leaf)
    raise ValueError(f"Checkpoint {source} holds a {type(leaf).__name__} where an array was expected; the file is "
                     "damaged or was not written by flax.serialization / degenjax.save_msgpack.")


def _kind(dtype) -> str:
    """``"float"`` (real or complex floating point), ``"int"`` (signed/unsigned), ``"bool"`` or the NumPy kind."""
    k = np.dtype(dtype).kind
    return {"f": "float", "c": "float", "i": "int", "u": "int", "b": "bool"}.get(k, k)


def checkpoint_digest(path) -> str:
    """SHA-256 (hex) of a checkpoint's content: a file's bytes, or every file of an orbax item folder.

    For an orbax ``CheckpointManager`` root the digest is that of the step `load_checkpoint` reads (the latest), so
    a new step changes it. Sweeps use the digest to tell a retrained checkpoint from the one whose results they
    hold, whatever its file name.

    Raises:
      ValueError: the path does not exist or cannot be read.
    """
    import hashlib

    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"Checkpoint not found: {path}. Give an existing .msgpack file or orbax checkpoint folder.")
    h = hashlib.sha256()
    try:
        if path.is_dir():
            item = _orbax_item_dir(path.resolve())
            files = sorted(p for p in item.rglob("*") if p.is_file())
            for f in files:
                h.update(str(f.relative_to(item)).encode() + b"\0")
                _hash_file(h, f)
        else:
            _hash_file(h, path)
    except OSError as err:
        raise ValueError(f"Cannot read checkpoint {path}: {err.strerror or err}.") from err
    return h.hexdigest()


def _hash_file(h, path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0")


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

    With a template, every leaf is checked against it: the same shape, the same kind of dtype (a float leaf may be
    stored in another float precision and is cast; an integer leaf stored as float is an error) and, for floating
    point leaves, finite values. These catch most damaged files (a changed byte in msgpack's type, length or shape
    fields); a changed byte inside an array's raw data is not detectable (the format has no checksum).

    Raises:
      ValueError: the path does not exist, is not a checkpoint, does not match ``template`` (naming the leaf), or
        holds NaN/inf.
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
            raw = path.read_bytes()
        except OSError as err:
            raise ValueError(f"Cannot read checkpoint {path}: {err.strerror or err}.") from err
        try:
            restored = serialization.msgpack_restore(raw)
        except Exception as err:  # noqa: BLE001 - msgpack raises several unrelated types
            raise ValueError(f"{path} is not a Flax msgpack checkpoint ({type(err).__name__}: {err}). Write "
                             "checkpoints with flax.serialization.to_bytes or degenjax.save_msgpack.") from err
        source = str(path)
    restored = jax.tree.map(lambda leaf: _as_array(leaf, source), restored)
    if template is None:
        return restored
    return _match_template(restored, template, source)
