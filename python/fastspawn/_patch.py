"""Make torch's process-starting machinery fastspawn's, for code that calls torch's directly.

``patch_torch()`` replaces, where torch defines or binds them:

- ``spawn``, ``start_processes``, ``ProcessContext``, ``SpawnContext`` and the exception
  classes in ``torch.multiprocessing`` and ``torch.multiprocessing.spawn`` with fastspawn's,
  so that a library calling ``torch.multiprocessing.spawn(...)`` starts its workers through
  fastspawn;
- ``start_processes`` in ``torch.distributed.elastic.multiprocessing`` and in the modules
  that bind it at import (``torch.distributed.elastic.agent.server.local_elastic_agent``,
  ``torch.backends.xeon.run_cpu``) with :func:`fastspawn.elastic.start_processes`, so that
  ``LocalElasticAgent`` (``torchrun``, ``elastic_launch``, accelerate's
  ``notebook_launcher``) starts its workers through :mod:`fastspawn.elastic` (except with
  ``numa_options``: fastspawn does no NUMA binding, torch's own starts those).

The patched functions behave as torch's, except that they also take what torch's refuse
to pickle: lambdas, closures, functions and classes defined in functions (sent by value,
see ``fastspawn._payload.dumps_call``). Unpatched, torch is left as it is.

A module of that list imported while the patch is on is patched as its import completes
(an import hook on ``sys.meta_path``), so the patch never imports the elastic modules
itself. ``unpatch_torch()`` puts torch's own objects back and removes the hook. Code that
bound one of these names before the patch (``from torch.multiprocessing import spawn``)
keeps torch's; code that bound one while the patch was on keeps fastspawn's.

``FASTSPAWN_PATCH_TORCH=1`` in the environment turns the patch on at interpreter start
(through the ``fastspawn_patch_torch.pth`` file installed with the package), without
importing torch: torch is patched when the program imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import logging
import sys
import threading
from importlib.machinery import ModuleSpec
from types import ModuleType, TracebackType
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

__all__ = ["TorchPatch", "patch_torch", "unpatch_torch"]

log = logging.getLogger(__name__)

# The names patched in torch.multiprocessing (re-exported there from its spawn module).
_NAMES = (
    "spawn",
    "start_processes",
    "ProcessContext",
    "SpawnContext",
    "ProcessException",
    "ProcessRaisedException",
    "ProcessExitedException",
)
_SPAWN = "spawn"  # the group of torch.multiprocessing's names
_ELASTIC = "elastic"  # the group of torch.distributed.elastic.multiprocessing.start_processes

# Module -> (group, names patched there where the module has them).
_TARGETS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "torch.multiprocessing.spawn": (_SPAWN, _NAMES),
    "torch.multiprocessing": (_SPAWN, _NAMES),
    "torch.distributed.elastic.multiprocessing": (_ELASTIC, ("start_processes",)),
    "torch.distributed.elastic.agent.server.local_elastic_agent": (_ELASTIC, ("start_processes",)),
    "torch.backends.xeon.run_cpu": (_ELASTIC, ("start_processes",)),
}

_lock = threading.RLock()
# (module name, attribute) -> torch's object, while the patch is on.
_saved: Optional[Dict[Tuple[str, str], object]] = None
# (group, attribute) -> torch's object, as first seen: what a module that bound our
# object at its import (from an already patched module) gets back at unpatch.
_originals: Dict[Tuple[str, str], object] = {}


def _elastic_start_processes(*args: Any, **kwargs: Any) -> Any:
    """torch's ``torch.distributed.elastic.multiprocessing.start_processes`` while patched
    (same arguments): :func:`fastspawn.elastic.start_processes`, except with
    ``numa_options`` (NUMA binding, which fastspawn does not do), where torch's own starts
    the workers."""
    from . import elastic

    start: Any = elastic.start_processes
    if inspect.signature(start).bind(*args, **kwargs).arguments.get("numa_options") is not None:
        log.info("fastspawn: numa_options given; torch's start_processes starts the workers")
        start = _originals[(_ELASTIC, "start_processes")]
    return start(*args, **kwargs)


def _ours(group: str) -> Dict[str, object]:
    if group == _ELASTIC:
        return {"start_processes": _elastic_start_processes}
    from . import _api, _errors

    ours: Dict[str, object] = {name: getattr(_errors, name) for name in _errors.__all__}
    ours.update({name: getattr(_api, name) for name in _NAMES if name not in ours})
    return ours


def _patch_module(module: ModuleType) -> None:
    """Replace torch's names in this (already executed) target module; the lock is held."""
    assert _saved is not None
    group, names = _TARGETS[module.__name__]
    ours = _ours(group)
    for name in names:
        if name not in vars(module) or (module.__name__, name) in _saved:
            continue
        current = vars(module)[name]
        if current is ours[name]:  # bound from a module patched before this one loaded
            original = _originals.get((group, name))
            if original is None:
                continue
        else:
            original = current
            _originals.setdefault((group, name), current)
        _saved[(module.__name__, name)] = original
        setattr(module, name, ours[name])


class _PatchingLoader(importlib.abc.Loader):
    """A target module's own loader, followed by the patch once the module has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            if _saved is None or _TARGETS.get(module.__name__) is None:
                return
            try:
                _patch_module(module)
            except Exception:  # never fail torch's import because of the patch
                log.warning("fastspawn: could not patch %s", module.__name__, exc_info=True)
                return
        log.debug("fastspawn: patched %s at its import", module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds a not yet imported target module with the other finders and wraps its loader."""

    def find_spec(
        self,
        fullname: str,
        path: Optional[Sequence[Union[bytes, str]]],
        target: Optional[ModuleType] = None,
    ) -> Optional[ModuleSpec]:
        if fullname not in _TARGETS:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec: Optional[ModuleSpec] = find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
        return None


_hook = _ImportHook()


def _install(import_torch: bool = True) -> bool:
    """Patch torch unless already patched; True if this call did it.

    Patches the target modules already imported and hooks the imports of the others.
    ``import_torch``: import ``torch.multiprocessing`` first (ImportError without torch).
    """
    global _saved
    with _lock:
        if _saved is not None:
            return False
        if import_torch:
            try:
                importlib.import_module("torch.multiprocessing")
            except ImportError as exc:
                raise ImportError(f"fastspawn.patch_torch() needs torch, which cannot be imported: {exc}") from exc
        _saved = {}
        try:
            for name in _TARGETS:  # in order: a defining module before those binding from it
                module = sys.modules.get(name)
                if module is not None:
                    _patch_module(module)
        except BaseException:
            _restore()
            raise
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)
        log.debug("fastspawn: torch's spawn and elastic start_processes now run on fastspawn")
        return True


def _restore() -> None:
    """Put back what the patch replaced; the lock is held."""
    global _saved
    saved, _saved = _saved or {}, None
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    for (module_name, name), original in saved.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        if vars(module).get(name) is _ours(_TARGETS[module_name][0])[name]:
            setattr(module, name, original)
        else:
            log.debug("fastspawn: %s.%s was replaced by someone else; left as is", module_name, name)


def unpatch_torch() -> None:
    """Put torch's own objects back (those :func:`patch_torch` lists) and stop patching
    modules at their import.

    Does nothing when torch is not patched. A name that someone else replaced after the
    patch is left as they set it.
    """
    with _lock:
        if _saved is not None:
            _restore()


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
    """Make torch's process-starting machinery fastspawn's.

    ``torch.multiprocessing.spawn``, ``start_processes``, ``ProcessContext``,
    ``SpawnContext``, ``ProcessException``, ``ProcessRaisedException`` and
    ``ProcessExitedException`` (in ``torch.multiprocessing`` and in the module
    ``torch.multiprocessing.spawn``) become fastspawn's, and
    ``torch.distributed.elastic.multiprocessing.start_processes`` (there and where torch
    binds it: ``LocalElasticAgent``'s module, ``torch.backends.xeon.run_cpu``) becomes
    :func:`fastspawn.elastic.start_processes` (torch's own when given ``numa_options``,
    which fastspawn does not support). Elastic modules imported later are patched
    as they load. Calling it again while patched does nothing. Works as a plain call (undo
    with :func:`unpatch_torch`) and as a context manager::

        with fastspawn.patch_torch():
            library_that_calls_torch_spawn()

    Raises ImportError when torch is not installed.
    """
    return TorchPatch(_install())


def patch_from_environment() -> None:
    """``FASTSPAWN_PATCH_TORCH=1``: patch torch now if it is imported, else when it is
    (never importing it here; without torch installed nothing happens)."""
    _install(import_torch=False)
