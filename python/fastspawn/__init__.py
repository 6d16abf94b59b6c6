"""fastspawn: start worker processes fast. A drop-in for torch.multiprocessing.spawn.

    import fastspawn
    fastspawn.spawn(fn, args=(world_size,), nprocs=4)   # fn(i, *args) in 4 processes
"""

from ._api import (
    ENV_VAR_PARALLEL_START,
    ProcessContext,
    SpawnContext,
    SpawnedProcess,
    preload,
    spawn,
    start_processes,
    warmup,
)
from ._zygote import ZygoteError
from ._errors import ProcessException, ProcessExitedException, ProcessRaisedException

__version__ = "0.1.0"

__all__ = [
    "ENV_VAR_PARALLEL_START",
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "SpawnContext",
    "SpawnedProcess",
    "ZygoteError",
    "__version__",
    "preload",
    "spawn",
    "start_processes",
    "warmup",
]
