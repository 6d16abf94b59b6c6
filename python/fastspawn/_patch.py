"""Make torch's spawn machinery fastspawn's, for code that calls torch's directly.

``patch_torch()`` replaces ``spawn``, ``start_processes``, ``ProcessContext``,
``SpawnContext`` and the exception classes in ``torch.multiprocessing`` and
``torch.multiprocessing.spawn`` (where torch defines them) with fastspawn's, so that a
library calling ``torch.multiprocessing.spawn(...)`` starts its workers through fastspawn.
``unpatch_torch()`` puts torch's own objects back. Code that bound one of these names
before the patch (``from torch.multiprocessing import spawn``) keeps torch's.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType, TracebackType
from typing import Dict, Optional, Tuple, Type

__all__ = ["TorchPatch", "patch_torch", "unpatch_torch"]

log = logging.getLogger(__name__)

# The names patched, where torch has them (torch.multiprocessing re-exports most of
# what torch.multiprocessing.spawn defines).
_NAMES = (
    "spawn",
    "start_processes",
    "ProcessContext",
    "SpawnContext",
    "ProcessException",
    "ProcessRaisedException",
    "ProcessExitedException",
)
_MODULES = ("torch.multiprocessing.spawn", "torch.multiprocessing")

_lock = threading.RLock()
# (module name, attribute) -> torch's object, while the patch is on.
_saved: Optional[Dict[Tuple[str, str], object]] = None


def _torch_modules() -> Dict[str, ModuleType]:
    try:
        return {name: importlib.import_module(name) for name in _MODULES}
    except ImportError as exc:
        raise ImportError(f"fastspawn.patch_torch() needs torch, which cannot be imported: {exc}") from exc


def _ours() -> Dict[str, object]:
    from . import _api, _errors

    ours: Dict[str, object] = {name: getattr(_errors, name) for name in _errors.__all__}
    ours.update({name: getattr(_api, name) for name in _NAMES if name not in ours})
    return ours


def _install() -> bool:
    """Patch torch unless already patched; True if this call did it."""
    global _saved
    with _lock:
        if _saved is not None:
            return False
        modules = _torch_modules()
        ours = _ours()
        saved: Dict[Tuple[str, str], object] = {}
        for module_name, module in modules.items():
            for name in _NAMES:
                if name in vars(module):
                    saved[(module_name, name)] = vars(module)[name]
        for (module_name, name) in saved:
            setattr(modules[module_name], name, ours[name])
        _saved = saved
        log.debug("fastspawn: torch.multiprocessing's spawn now runs on fastspawn")
        return True


def unpatch_torch() -> None:
    """Put torch's own spawn, start_processes, ProcessContext and exception classes back.

    Does nothing when torch is not patched. A name that someone else replaced after the
    patch is left as they set it.
    """
    global _saved
    with _lock:
        if _saved is None:
            return
        saved, _saved = _saved, None
        ours = _ours()
        for (module_name, name), original in saved.items():
            module = importlib.import_module(module_name)
            if vars(module).get(name) is ours[name]:
                setattr(module, name, original)
            else:
                log.debug("fastspawn: %s.%s was replaced by someone else; left as is", module_name, name)


class TorchPatch:
    """The handle :func:`patch_torch` returns; as a context manager, leaving the ``with``
    block restores the state before it (torch stays patched if it already was)."""

    def __init__(self, installed: bool) -> None:
        self.installed = installed

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.installed:
            self.installed = False
            unpatch_torch()


def patch_torch() -> TorchPatch:
    """Make ``torch.multiprocessing``'s spawn machinery fastspawn's.

    ``torch.multiprocessing.spawn``, ``start_processes``, ``ProcessContext``,
    ``SpawnContext``, ``ProcessException``, ``ProcessRaisedException`` and
    ``ProcessExitedException`` (in ``torch.multiprocessing`` and in the module
    ``torch.multiprocessing.spawn``) become fastspawn's. Calling it again while patched
    does nothing. Works as a plain call (undo with :func:`unpatch_torch`) and as a
    context manager::

        with fastspawn.patch_torch():
            library_that_calls_torch_spawn()

    Raises ImportError when torch is not installed.
    """
    return TorchPatch(_install())


def patch_from_environment() -> None:
    """``FASTSPAWN_PATCH_TORCH=1`` at ``import fastspawn``: patch if torch is installed."""
    try:
        _install()
    except ImportError as exc:
        log.debug("fastspawn: FASTSPAWN_PATCH_TORCH=1 but %s", exc)
