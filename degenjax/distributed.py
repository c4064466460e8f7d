"""Multi-process JAX (``jax.distributed``) for degenjax: start-up, a global mesh, and data sharded over processes.

Every process runs the same program. `initialize` starts ``jax.distributed`` (on SLURM, Open MPI and Cloud TPU pods
with no arguments). `estimate_llc_batched` and `degenjax.run_sweep` / ``degenjax sweep --distributed`` shard chains
over `global_mesh`; the Gram, basis and edges functions take batches built with `global_batch` from each process's
own rows and sum over all processes. `to_host` brings results to every process as NumPy arrays.
"""

from degenjax._src.distributed import global_batch as global_batch
from degenjax._src.distributed import global_mesh as global_mesh
from degenjax._src.distributed import initialize as initialize
from degenjax._src.distributed import is_multiprocess as is_multiprocess
from degenjax._src.distributed import replicate as replicate
from degenjax._src.distributed import to_host as to_host

__all__ = ["initialize", "is_multiprocess", "global_mesh", "global_batch", "replicate", "to_host"]
