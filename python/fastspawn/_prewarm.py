"""Warming the zygote in the background, before the first call needs it.

A test suite's first test used to pay the zygote's start-up (an interpreter, then the test
module's imports: torch, about 2 s) after pytest had imported the same modules itself. Here
the zygote starts, and imports the test module, while pytest is still collecting (the
plugin hints each test module that needs ranks) or as soon as a
``fastspawn.testing`` test class is defined (``python -m unittest``): the first call then
finds the zygote ready.

Work runs in one short-lived background thread that drains a queue of hints and ends. It
never warns: a zygote that fails to start, or gets stuck importing, is given up as it
would be at the first call, and that call falls back to fresh interpreters with the one
usual ``RuntimeWarning``. Every wait is bounded by ``FASTSPAWN_ZYGOTE_TIMEOUT``.

This module imports only the standard library at import time (testing.py imports it for
each class definition; the zygote and its children never run its work).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

log = logging.getLogger(__name__)

# Set while a pytest session with fastspawn's plugin is configured: the plugin hints test
# modules itself (with assertion rewriting), so class definitions hint nothing.
plugin_sessions = 0

_lock = threading.Lock()
_queue: List[Tuple[Dict[str, Any], Callable[..., Any], Tuple[Any, ...]]] = []
_hinted: Set[str] = set()
_thread: Optional[threading.Thread] = None
_started: List[int] = []  # pids of the zygotes a hint started
# The classes class_defined was told of: their tests run in ranks (see pytest_plugin).
rank_classes: "weakref.WeakSet[type]" = weakref.WeakSet()


def _inside_fastspawn_child() -> bool:
    """True in the zygote, in a process it forked, or in a fresh interpreter spawned by
    multiprocessing or fastspawn: none of them starts a zygote of its own for a hint."""
    import sys

    # Not imported: not a zygote's process. Half imported (the early start imports it in
    # another thread): not one either, a zygote has it whole before anything runs.
    in_zygote_tree = getattr(sys.modules.get("fastspawn._zygote"), "in_zygote_tree", None)
    if in_zygote_tree is not None and in_zygote_tree():
        return True
    if getattr(sys.modules.get("fastspawn._child"), "in_fresh_child", False):
        return True  # a fastspawn child in a fresh interpreter, loading its call
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is None:
        return False
    # A multiprocessing child: once running (its parent is known), or while it unpickles
    # what it was sent (_inheriting), before that.
    return mp_process.parent_process() is not None or bool(getattr(mp_process.current_process(), "_inheriting", False))


def zygote_wanted() -> bool:
    """Whether a spawn would use the zygote here (FASTSPAWN_ZYGOTE is not 0)."""
    return os.environ.get("FASTSPAWN_ZYGOTE", "1") != "0" and not _inside_fastspawn_child()


def hint(key: str, fn: Callable[..., Any], args: Tuple[Any, ...]) -> bool:
    """Start the zygote in the background if it is not running, then have it run
    ``fn(*args)`` (which imports what the coming calls need). Once per ``key``; returns
    whether this call queued work."""
    global _thread
    from . import _payload

    with _lock:
        if key in _hinted:
            return False
        _hinted.add(key)
        # The zygote starts with this process's state of now (sys.path...), not the
        # state when the thread gets to it.
        _queue.append((_payload.preparation_data("fastspawn-zygote"), fn, args))
        if _thread is None:
            _thread = threading.Thread(target=_work, name="fastspawn-prewarm", daemon=True)
            _thread.start()
    return True


def _work() -> None:
    global _thread
    while True:
        with _lock:
            if not _queue:
                _thread = None
                return
            preparation, fn, args = _queue.pop(0)
        try:
            _prefetch(preparation, fn, args)
        except Exception:  # never out of this thread: the first call retries and reports
            log.debug("fastspawn: warming the zygote failed", exc_info=True)


def _prefetch(preparation: Dict[str, Any], fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
    from fastspawn import _api

    zygote = _api._zygotes.get(preparation, background=True)
    if zygote is None:
        return  # it could not start or is unfit: the first call warns
    if zygote.pid not in _started:
        _started.append(zygote.pid)
    error = zygote.prefetch(fn, args)
    if error is not None:
        log.debug("fastspawn: the zygote's early import failed (the first call retries): %s", error)
    else:
        log.debug("fastspawn: zygote pid %d warmed: %s%r", zygote.pid, getattr(fn, "__name__", fn), args)


def wait(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the queued work to end; whether it has."""
    with _lock:
        thread = _thread
    if thread is not None:
        thread.join(timeout)
        return not thread.is_alive()
    return True


def discard(timeout: float) -> None:
    """Nothing will need the zygote after all (no collected test uses ranks): drop the
    queued work and stop the zygote a hint started, if it is still the current one."""
    with _lock:
        _queue.clear()
    wait(timeout)
    if not _started:
        return
    from fastspawn import _api

    current = _api._zygotes.current
    if current is not None and current.pid in _started:
        _api._zygotes.shutdown()


def import_modules(modules: Sequence[str], path_entries: Sequence[str] = (), prepend: bool = True) -> None:
    """In the zygote: import ``modules``, ``sys.path`` first given ``path_entries`` as the
    caller will have it by then (each prepended, or appended, unless already there)."""
    import importlib
    import sys

    for entry in path_entries:
        if prepend and (not sys.path or sys.path[0] != entry):
            sys.path.insert(0, entry)
        elif not prepend and entry not in sys.path:
            sys.path.append(entry)
    for module in modules:
        importlib.import_module(module)


def class_defined(cls: type) -> None:
    """A subclass of a fastspawn.testing base class was defined: warm the zygote, and
    have it import the class's module, in the background. Nothing under pytest with the
    plugin (it hints test modules as it collects them), for fastspawn's own classes, in
    fastspawn's children, or when the zygote is off."""
    module = getattr(cls, "__module__", "") or ""
    rank_classes.add(cls)
    if plugin_sessions or module.partition(".")[0] == "fastspawn" or not zygote_wanted():
        return
    if module == "__main__":  # the zygote imports the main script as it starts
        hint("module:__main__", nothing, ())
    else:
        hint(f"module:{module}", import_modules, ([module],))


def nothing() -> None:
    """In the zygote: nothing (starting it was the point)."""
