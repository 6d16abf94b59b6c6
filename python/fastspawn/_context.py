"""A multiprocessing context whose processes fork from the warm zygote.

``fastspawn.get_context()`` is a drop-in for ``multiprocessing.get_context("spawn")``:
everything but ``Process`` is multiprocessing's own (queues, locks, pools, managers...),
built for the start method it reports, "spawn". Its ``Process.start()`` pickles the Process
object as spawn does and hands it to fastspawn's core (:func:`fastspawn._api.start_process_object`),
which forks the child from the warm zygote (or starts a fresh interpreter when the
zygote cannot serve, with the usual warning); the child runs the object's own
``_bootstrap``, as a spawned child does. The engine owns the child: its exit is seen
through a pidfd (the ``sentinel``), signals go through it, and a child that cannot be
reaped is left to the engine's reaper instead of being waited on forever.

This module is imported by every child that runs a Process of this context (it holds
their class): it imports only what multiprocessing already loaded, the parent-side
machinery lazily.
"""

from __future__ import annotations

import os
import signal
import threading
from multiprocessing import context as mp_context
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ._api import _Run

__all__ = ["FastspawnContext", "SpawnProcess", "get_context"]


class Popen:
    """What a :class:`SpawnProcess` holds once started: its one child, as multiprocessing's
    ``Popen`` objects present theirs (``pid``, ``sentinel``, ``returncode``, ``poll``,
    ``wait``, ``terminate``, ``kill``, ``close``). Every wait is the engine's."""

    method = "spawn"

    def __init__(self, process_obj: Any) -> None:
        from . import _api

        self.returncode: Optional[int] = None
        self._daemon = bool(process_obj.daemon)
        self._run: Optional["_Run"] = _api.start_process_object(process_obj)
        self.pid: int = int(self._run.group.pid(0))
        # Readable once the child has exited (a pidfd): what multiprocessing.connection.wait,
        # Pool and ProcessPoolExecutor watch.
        self.sentinel: int = int(self._run.group.sentinel(0))

    def _update(self) -> Optional[int]:
        run = self._run
        if self.returncode is None and run is not None:
            self.returncode = run.exitcodes[0]
        return self.returncode

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        """The exit code, or None while running; ``flag`` 0 waits for the exit."""
        run = self._run
        if self.returncode is None and run is not None:
            if flag & os.WNOHANG:
                run.poll()
            else:
                run.wait_rank(0, None)
        return self._update()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait up to ``timeout`` seconds (None: until it exits); the exit code or None."""
        run = self._run
        if self.returncode is None and run is not None:
            run.wait_rank(0, timeout)
        return self._update()

    def _send_signal(self, sig: int) -> None:
        run = self._run
        if self.returncode is None and run is not None:
            run.group.send_signal(0, sig)  # nothing once it has exited

    def terminate(self) -> None:
        """SIGTERM to the child (nothing if it has exited).

        At interpreter exit multiprocessing terminates each daemonic child, then joins
        it: there a daemonic child is stopped by fastspawn's one stop routine (SIGTERM, a
        grace, SIGKILL, the engine's reaper for what cannot be reaped), so that the
        join that follows never waits forever."""
        run = self._run
        if self._daemon and run is not None and self.returncode is None and getattr(mp_util, "_exiting", False):
            from ._api import _SHUTDOWN_GRACE

            run.stop(_SHUTDOWN_GRACE)
            self._update()
            return
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the child (nothing if it has exited)."""
        self._send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the child's descriptors (multiprocessing calls this once it has exited)."""
        self._update()
        self._run = None


class SpawnProcess(mp_process.BaseProcess):
    """``multiprocessing.Process`` of :class:`FastspawnContext`: started from the zygote."""

    _start_method = "spawn"  # in the child, multiprocessing's default becomes spawn, as in spawn's

    @staticmethod
    def _Popen(process_obj: Any) -> Popen:
        return Popen(process_obj)

    @staticmethod
    def _after_fork() -> None:
        # The child is as pristine as a spawned one: no parent state to refresh.
        pass


class FastspawnContext(mp_context.BaseContext):
    """``multiprocessing.get_context("spawn")``'s API, its processes forked from the warm
    zygote. Creating one starts warming the zygote in the background."""

    _name = "spawn"
    Process = SpawnProcess

    def __init__(self) -> None:
        _warm_zygote()


def _warm_zygote() -> None:
    """Start the zygote in the background (never blocks, never warns: the first start
    does), unless the zygote is off or this process is a child starting up."""
    from . import _prewarm

    if _prewarm.zygote_wanted():
        _prewarm.hint("module:__main__", _prewarm.nothing, ())


_lock = threading.Lock()
_context: Optional[FastspawnContext] = None


def get_context() -> FastspawnContext:
    """The multiprocessing context of fastspawn (one per process), for
    ``ProcessPoolExecutor(mp_context=...)``, ``DataLoader(multiprocessing_context=...)``,
    or directly: ``ctx.Process``, ``ctx.Pool``, ``ctx.Queue``... The first call starts
    warming the zygote in the background."""
    global _context
    with _lock:
        if _context is None:
            _context = FastspawnContext()
        return _context
