"""fastspawn: start worker processes fast. A drop-in for torch.multiprocessing.spawn.

    import fastspawn
    fastspawn.spawn(fn, args=(world_size,), nprocs=4)   # fn(i, *args) in 4 processes
    ProcessPoolExecutor(mp_context=fastspawn.get_context())  # any pool, on the zygote

The public names are loaded on first use, so that a child's bootstrap (which imports
``fastspawn._child``) does not pay for the parent-side machinery.
"""

from importlib import import_module
TYPE_CHECKING = False

__version__ = "0.1.0"

_EXPORTS = {
    "ENV_VAR_PARALLEL_START": "._api",
    "FastspawnContext": "._context",
    "SpawnProcess": "._context",
    "get_context": "._context",
    "ProcessContext": "._api",
    "SpawnContext": "._api",
    "SpawnedProcess": "._api",
    "preload": "._api",
    "spawn": "._api",
    "start_processes": "._api",
    "warmup": "._api",
    "run": "._run",
    "ProcessException": "._errors",
    "ProcessExitedException": "._errors",
    "ProcessRaisedException": "._errors",
    "UnknownExitStatus": "._errors",
    "ZygoteError": "._zygote",
    "patch_torch": "._patch",
    "unpatch_torch": "._patch",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> "object":
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastspawn' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def _patch_torch_if_asked() -> None:
    # FASTSPAWN_PATCH_TORCH=1: torch's spawn and elastic start_processes become fastspawn's,
    # now if torch is imported, else as it is imported (never importing it here). The
    # fastspawn_patch_torch.pth file imports fastspawn at interpreter start when it is set.
    from os import environ

    if environ.get("FASTSPAWN_PATCH_TORCH") == "1":
        import_module("._patch", __name__).patch_from_environment()


_patch_torch_if_asked()


if TYPE_CHECKING:  # "x as x": exported names for type checkers (strict: no implicit re-export)
    from ._api import (
        ENV_VAR_PARALLEL_START as ENV_VAR_PARALLEL_START,
        ProcessContext as ProcessContext,
        SpawnContext as SpawnContext,
        SpawnedProcess as SpawnedProcess,
        preload as preload,
        spawn as spawn,
        start_processes as start_processes,
        warmup as warmup,
    )
    from ._run import run as run
    from ._context import (
        FastspawnContext as FastspawnContext,
        SpawnProcess as SpawnProcess,
        get_context as get_context,
    )
    from ._errors import (
        ProcessException as ProcessException,
        ProcessExitedException as ProcessExitedException,
        ProcessRaisedException as ProcessRaisedException,
        UnknownExitStatus as UnknownExitStatus,
    )
    from ._patch import patch_torch as patch_torch, unpatch_torch as unpatch_torch
    from ._zygote import ZygoteError as ZygoteError
