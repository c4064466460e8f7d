"""Multi-process JAX (``jax.distributed``): start-up, global meshes, and moving host values between processes.

Every process of a multi-host job runs the same program. Arrays that span the devices of several processes are
*global*: a process holds only its own shards, so host-side NumPy can read an array only when it is fully
replicated (or fully addressable). The helpers here keep that rule in one place: values that every process holds
(the same on each) become replicated global arrays with `replicate`, results come back to every process's host with
`to_host`, decisions made by process 0 (which cells to run, a checkpoint it read, an error) reach the others with
`broadcast_json` and `broadcast_tree` (bitwise), and `check_same` fails with one clear message when processes that
should hold the same value (the data, the configuration) do not. See the multi-host page of the docs
(``docs/sharding.md``) for the launch on SLURM and TPU pods.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, num_cpu_devices: int | None = None,
               timeout: int = 300) -> None:
    """Starts ``jax.distributed`` (once per process, before any other JAX call).

    On SLURM, Open MPI and Cloud TPU pods every argument may be left out: JAX reads the job's environment
    (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...; the TPU metadata server). Elsewhere give
    ``coordinator_address`` (host:port of process 0, reachable from every process; or the environment variable
    ``JAX_COORDINATOR_ADDRESS``), ``num_processes`` and ``process_id``.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      num_cpu_devices: CPU only: the number of (simulated) CPU devices of this process (``jax_num_cpu_devices``).
        CPU collectives between processes use gloo.
      timeout: seconds to wait for every process to connect before failing.

    Raises:
      ValueError: JAX was already used in this process (``jax.distributed`` must start first), or the arguments are
        incomplete outside a cluster JAX recognises.
    """
    if jax.distributed.is_initialized():
        return
    try:  # a private JAX function: if it moves, jax.distributed.initialize's own error is the message
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    if started:
        raise ValueError("jax.distributed must be initialized before any other JAX call in the process (devices "
                         "were already created); start it first, e.g. `degenjax sweep --distributed ...`.")
    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout)
    except (ValueError, TypeError) as err:
        raise ValueError(f"jax.distributed.initialize failed: {err}. Outside SLURM, Open MPI and TPU pods give the "
                         "coordinator address (host:port of process 0), the number of processes and this "
                         "process's id.") from err


def is_multiprocess() -> bool:
    """True when this program runs in more than one process (``jax.process_count() > 1``)."""
    return jax.process_count() > 1


def spans_processes(mesh) -> bool:
    """True when ``mesh`` holds devices of more than one process."""
    return mesh is not None and len({d.process_index for d in np.asarray(mesh.devices).flat}) > 1


def global_mesh(axis: str = "chains", devices=None) -> Mesh:
    """A 1-D mesh over every device of every process (``jax.devices()``), axis type Auto."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (axis,), axis_types=(AxisType.Auto,))


def replicate(tree, mesh: Mesh):
    """Host values that every process holds (the same on each) as global arrays replicated over ``mesh``.

    Leaves that are already global arrays on other devices are left alone. Typed PRNG keys are not supported here
    (pass ``jax.random.key_data``).
    """
    sharding = NamedSharding(mesh, P())

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(leaf, tree)


def to_host(tree):
    """Every leaf as a NumPy array on every process: fully replicated (or addressable) arrays directly, sharded
    global arrays gathered from all processes first."""
    from jax.experimental import multihost_utils

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def _bucket(size: int) -> int:
    """Padded length of a broadcast payload (powers of two: few distinct programs to compile)."""
    return max(64, 1 << max(0, math.ceil(math.log2(max(size, 1)))))


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's ``payload`` on every process (bitwise; the others pass anything, e.g. None)."""
    if not is_multiprocess():
        return bytes(payload or b"")
    from jax.experimental import multihost_utils

    source = jax.process_index() == 0
    size = np.asarray([len(payload) if source else 0], np.int64)
    size = int(multihost_utils.broadcast_one_to_all(size)[0])
    buf = np.zeros((_bucket(size),), np.uint8)
    if source:
        buf[:size] = np.frombuffer(payload, np.uint8)
    # a sum with zeros from the other processes: exact for unsigned integers
    out = multihost_utils.broadcast_one_to_all(buf)
    return np.asarray(out, np.uint8)[:size].tobytes()


def broadcast_json(obj: Any = None) -> Any:
    """Process 0's JSON-serialisable ``obj`` on every process."""
    data = json.dumps(obj).encode() if jax.process_index() == 0 else None
    return json.loads(broadcast_bytes(data).decode())


def broadcast_tree(tree):
    """Process 0's pytree of arrays on every process, bitwise (the others pass a tree of the same structure,
    shapes and dtypes; its values are ignored)."""
    if not is_multiprocess():
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.ascontiguousarray(np.asarray(x)) for x in leaves]
    data = b"".join(a.tobytes() for a in arrays) if jax.process_index() == 0 else None
    raw = broadcast_bytes(data)
    out, start = [], 0
    for a in arrays:
        out.append(np.frombuffer(raw[start:start + a.nbytes], a.dtype).reshape(a.shape).copy())
        start += a.nbytes
    return jax.tree.unflatten(treedef, out)


def tree_digest(tree) -> str:
    """SHA-256 of a pytree's structure, shapes, dtypes and bytes (host values)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for x in leaves:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_same(digest: str, what: str) -> None:
    """Raises a ValueError on every process when ``digest`` (of ``what``) differs between processes."""
    if not is_multiprocess():
        return
    mine = digest.encode()
    first = broadcast_bytes(mine)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([first == mine], np.int32))
    bad = [i for i, ok in enumerate(np.asarray(flags).ravel()) if not ok]
    if bad:
        raise ValueError(f"{what} differs between processes (processes {bad} differ from process 0); every process "
                         "must run the same command on the same files and data.")


def global_batch(local_batch, mesh: Mesh, axis: str = "data"):
    """One global batch from each process's own shard: the leaves of ``local_batch`` (this process's rows, the same
    number on every process) become global arrays of all processes' rows, sharded over ``mesh`` axis ``axis``
    along their leading axis (process ``p``'s rows at ``p``'s place). Single-process: the batch sharded over the
    mesh.

    The rows per process must be divisible by the process's number of devices on ``axis``.
    """
    sharding = NamedSharding(mesh, P(axis))

    def leaf(x):
        a = np.asarray(x)
        if a.ndim == 0:
            raise ValueError("global_batch needs arrays with a leading batch axis; got a scalar leaf.")
        return jax.make_array_from_process_local_data(sharding, a)

    return jax.tree.map(leaf, local_batch)
