"""spawn, start_processes and ProcessContext with torch.multiprocessing's semantics."""

from __future__ import annotations

import atexit
import errno
import logging
import multiprocessing
import operator
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from multiprocessing import resource_tracker
from multiprocessing import spawn as mp_spawn
from multiprocessing.util import _flush_std_streams as flush_std_streams  # type: ignore[attr-defined]
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Set, Tuple

from . import _child, _core, _payload, _prewarm, _zygote
from ._errors import UNKNOWN_STATUS_TEXT, ProcessExitedException, ProcessRaisedException, UnknownExitStatus

__all__ = ["ENV_VAR_PARALLEL_START", "ProcessContext", "SpawnContext", "start_processes", "spawn"]

ENV_VAR_PARALLEL_START = "TORCH_MP_PARALLEL_START"

log = logging.getLogger(__name__)

START_METHODS = ("spawn", "fork", "forkserver")


def _warn_of_fork_with_threads(pid: int, forks: int) -> None:
    """From Python 3.12 on, ``os.fork()`` in a process that has more than one thread warns
    (DeprecationWarning, once per fork): so does start method fork, as multiprocessing's.
    As with ``os.fork()``, the warning never raises: one that filters make an error is
    dropped."""
    if sys.version_info < (3, 12):
        return
    if _zygote._thread_count() > 1:  # every thread, native ones too
        for _ in range(forks):
            try:
                warnings.warn(
                    f"This process (pid={pid}) is multi-threaded, use of fork() may lead to deadlocks in the child.",
                    DeprecationWarning,
                    stacklevel=1,
                )
            except DeprecationWarning:
                pass


# Seconds a child gets to exit after SIGINT (Ctrl-C during join) or SIGTERM (a context
# collected while running, interpreter exit with daemon children) before SIGKILL.
_SHUTDOWN_GRACE = 3.0


def _use_pidfd() -> bool:
    return os.environ.get("FASTSPAWN_PIDFD", "1") != "0"


# ------------------------------------------------------------------------ the zygote
class _Zygotes:
    """This process's zygote: started on first use, replaced when stale or dead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: Optional[_zygote.Zygote] = None
        self.preload: List[str] = []
        self.warned: Set[Tuple[Any, str]] = set()
        self.failed_early: Optional[Tuple[Tuple[Any, ...], str]] = None  # a background start's key, why

    def get(self, preparation: Dict[str, Any], background: bool = False) -> Optional[_zygote.Zygote]:
        """The zygote for a call with ``preparation``, started or replaced as needed; None
        to start fresh interpreters instead (warned once). ``background``: for
        fastspawn._prewarm, which never warns (the first call does), and whose zygote
        follows the caller's ``sys.path`` as it grows (see _zygote.still_serves)."""
        warn = not background
        if not background:
            # What is being warmed in the background (test modules) comes first: the
            # call then finds it imported. Bounded: each of its waits on the zygote is.
            _prewarm.wait(2 * _zygote.zygote_timeout())
        key = _zygote.staleness_key(preparation, self.preload)
        with self.lock:
            zygote = self.current
            serves = zygote is not None and _zygote.still_serves(zygote.key, key, zygote.follows_path)
            if zygote is not None and serves and _zygote.given_up_reason(zygote.key) is not None:
                # Stuck in a background import (fastspawn._prewarm): as if stuck starting.
                if warn:
                    self.fallback_warning(zygote.key, str(_zygote.given_up_reason(zygote.key)))
                return None
            if zygote is not None and (not serves or not zygote.alive()):
                log.debug("fastspawn: replacing zygote pid %d (stale or gone)", zygote.pid)
                self.current = None
                zygote.close()
                zygote = None
            if zygote is None and self.failed_early is not None and _zygote.still_serves(self.failed_early[0], key, True):
                if warn:  # the background start failed: as if this call's had (no retry)
                    self.fallback_warning(*self.failed_early)
                return None
            if zygote is None:
                try:
                    zygote = _zygote.Zygote(key, preparation, self.preload, _use_pidfd())
                    zygote.follows_path = background
                except _zygote.ZygoteError as exc:
                    reason = str(exc).replace("fastspawn: ", "")
                    if background:
                        self.failed_early = (key, reason)
                    else:
                        self.fallback_warning(key, reason)
                    return None
                self.current = zygote
            if not warn:
                return zygote if zygote.unfit is None else None
            while zygote.notices:
                warnings.warn(zygote.notices.pop(0), RuntimeWarning, stacklevel=3)
            if zygote.unfit is not None:
                self.fallback_warning(zygote.key, zygote.unfit)
                return None
            return zygote

    def fallback_warning(self, key: Any, reason: str) -> None:
        if (key, reason) in self.warned:
            return
        self.warned.add((key, reason))
        warnings.warn(
            f"fastspawn: {reason}; starting each child in a fresh interpreter instead",
            RuntimeWarning,
            stacklevel=6,
        )

    def shutdown(self) -> None:
        with self.lock:
            zygote, self.current = self.current, None
        if zygote is not None:
            zygote.close()

    def after_fork_in_child(self) -> None:
        zygote, self.current = self.current, None
        self.lock = threading.Lock()
        if zygote is not None:
            zygote.forget_after_fork()


_zygotes = _Zygotes()
atexit.register(_zygotes.shutdown)  # runs after _at_exit below (atexit is last-in, first-out)
os.register_at_fork(after_in_child=_zygotes.after_fork_in_child)


def _zygote_wanted(start_method: str, zygote: Optional[bool]) -> bool:
    if start_method == "fork":
        return False
    if zygote is not None:
        return bool(zygote)
    return os.environ.get("FASTSPAWN_ZYGOTE", "1") != "0"


def preload(modules: Sequence[str]) -> None:
    """Modules the zygote imports at start, besides the main module and each ``fn``'s.

    Changing the list makes the current zygote stale: the next call starts a new one.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload takes module names (str), got {name!r}")
    _zygotes.preload = names


def warmup() -> None:
    """Start the zygote now (it otherwise starts on the first spawn)."""
    _zygotes.get(_payload.preparation_data("fastspawn-zygote"))


class _Run:
    """Parent-side state of one call: the engine group and what its children reported.

    The engine keeps one log of exits that every waiting thread sees, so a join in one
    thread is never starved by ``is_alive()`` in another; only absorbing it takes a lock.
    """

    def __init__(self, nprocs: int, daemon: bool) -> None:
        self.group = _core.Group(nprocs, _use_pidfd())
        self.daemon = daemon
        self.exitcodes: List[Optional[int]] = [None] * nprocs
        self.outputs: List[bytes] = [b""] * nprocs
        self.exit_order: List[int] = []
        self.abandoned: Set[int] = set()  # ranks a stop handed to the engine's reaper
        self._absorbing = threading.Lock()
        self._finalizer = weakref.finalize(self, _collect_group, self.group)
        self._finalizer.atexit = False  # our own exit hook decides (see _at_exit)
        _live_runs.add(self)

    def _absorb(self, exits: List[Any]) -> None:
        with self._absorbing:
            for rank, _pid, code, output in exits:
                if self.exitcodes[rank] is None:
                    if code is None and rank in self.abandoned:  # SIGKILLed, reaper's now
                        code = -signal.SIGKILL
                    elif code is None:  # reaped by someone else: the rank's own word, if any
                        code = _payload.exit_status(output)
                        if code is None:
                            code = UnknownExitStatus()
                    self.exitcodes[rank] = code
                    self.outputs[rank] = output
                    self.exit_order.append(rank)

    def poll(self) -> None:
        self._absorb(self.group.wait(0.0, False, len(self.exit_order)))

    def wait_any(self, timeout: Optional[float], known: Optional[int] = None, watch: Sequence[int] = ()) -> None:
        """Until more than ``known`` children (default: those seen so far) have exited,
        one of the fds in ``watch`` is readable (or hung up), or the timeout. Exits seen
        by another thread meanwhile count too."""
        if known is None:
            known = len(self.exit_order)
        self._absorb(self.group.wait(timeout, False, known, watch=list(watch)))

    def wait_all(self, timeout: Optional[float]) -> None:
        self._absorb(self.group.wait(timeout, True, len(self.exit_order)))

    def wait_rank(self, rank: int, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while self.exitcodes[rank] is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.wait_any(left)
            if left == 0.0:
                break

    def stop(self, grace: float, signal: int = signal.SIGTERM) -> List[int]:
        """Stop every child still running; return the ranks that had to get SIGKILL.

        The one stop routine of fastspawn (every front end calls it): ``signal`` to each live
        child, up to ``grace`` seconds for them to exit, SIGKILL to each one left (and to its
        process group), then up to ``_core.KILL_WAIT`` seconds for them to die. So it
        returns within ``grace + KILL_WAIT`` seconds (plus at most one second for children
        still starting elsewhere), whatever the children do. A child that is still not
        reaped then (stuck in the kernel, frozen) is logged (one WARNING naming its pid and
        state) and left to the engine's reaper, which reaps it whenever it exits; its exit
        code reads -SIGKILL (what it dies of: it never runs user code again). A Ctrl-C
        during the grace cuts it short: the SIGKILL step still runs, then the
        KeyboardInterrupt propagates. ``grace`` 0 (or ``signal`` 0) kills at once.
        """
        try:
            killed, unreaped = _stop_group(self.group, grace, signal)
            self.abandoned.update(unreaped)
            return killed
        finally:
            self.poll()

    def interrupt(self) -> None:
        """Ctrl-C in the parent: children get SIGINT as from a terminal, then
        ``_SHUTDOWN_GRACE`` seconds to exit before SIGKILL (see :meth:`stop`)."""
        self.stop(_SHUTDOWN_GRACE, signal.SIGINT)

    def running(self) -> int:
        return sum(1 for rank in range(self.group.size) if self.group.running(rank))


def _stop_group(group: Any, grace: float, sig: int = signal.SIGTERM) -> Tuple[List[int], List[int]]:
    """:meth:`_Run.stop` on a bare engine group (also for one whose run is gone): returns
    the ranks that got SIGKILL and those handed to the engine's reaper."""
    killed, unreaped = group.stop(grace, sig)
    for rank, pid, state in unreaped:
        log.warning(
            "fastspawn: process %d (rank %d) did not exit after SIGKILL (state %s); "
            "it will be reaped when it exits",
            pid,
            rank,
            state,
        )
    return [int(rank) for rank in killed], [int(rank) for rank, _pid, _state in unreaped]


def _collect_group(group: Any) -> None:
    """Finalizer of a run nobody references any more: end and reap its children."""
    running = sum(1 for rank in range(group.size) if group.running(rank))
    if running:
        warnings.warn(
            f"fastspawn: a ProcessContext with {running} running process(es) was garbage "
            "collected; terminating them",
            ResourceWarning,
            stacklevel=2,
        )
    _stop_group(group, _SHUTDOWN_GRACE)


_live_runs: "weakref.WeakSet[_Run]" = weakref.WeakSet()


def _at_exit() -> None:
    """At interpreter exit, as multiprocessing does: daemonic children are stopped (SIGTERM,
    ``_SHUTDOWN_GRACE`` s, SIGKILL; see :meth:`_Run.stop` for the bound), the others
    joined for as long as they run. A Ctrl-C (or any exception) while joining stops every
    run left, as a Ctrl-C in ``join()`` does (SIGINT first), and propagates."""
    runs = list(_live_runs)
    for index, run in enumerate(runs):
        try:
            if run.daemon:
                run.stop(_SHUTDOWN_GRACE)
            else:
                run.wait_all(None)
        except BaseException:
            grace = _SHUTDOWN_GRACE
            for left in runs[index:]:
                try:
                    left.stop(grace, signal.SIGINT)
                except BaseException:  # another Ctrl-C: kill the rest at once
                    grace = 0.0
            raise


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_live_runs.clear)  # a fork's children are not its own


class SpawnedProcess:
    """One child, with the parts of ``multiprocessing.Process`` users touch."""

    def __init__(self, run: _Run, rank: int, name: str, daemon: bool) -> None:
        self._run = run
        self._rank = rank
        self._name = name
        self._daemon = daemon

    @property
    def name(self) -> str:
        """Same naming as multiprocessing (e.g. ``SpawnProcess-1``)."""
        return self._name

    @property
    def daemon(self) -> bool:
        """The daemon flag given to start_processes."""
        return self._daemon

    @property
    def pid(self) -> int:
        """The child's process id."""
        return int(self._run.group.pid(self._rank))

    ident = pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the child has exited."""
        return int(self._run.group.sentinel(self._rank))

    @property
    def exitcode(self) -> Optional[int]:
        """None while running; the exit status; or -N when killed by signal N."""
        if self._run.exitcodes[self._rank] is None:
            self._run.poll()
        return self._run.exitcodes[self._rank]

    def is_alive(self) -> bool:
        """Whether the child is still running."""
        return self.exitcode is None

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the child exits, or ``timeout`` seconds."""
        self._run.wait_rank(self._rank, timeout)

    def terminate(self) -> None:
        """Send SIGTERM (nothing if it has already exited)."""
        self._run.group.send_signal(self._rank, signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL (nothing if it has already exited)."""
        self._run.group.send_signal(self._rank, signal.SIGKILL)

    def __repr__(self) -> str:
        code = self._run.exitcodes[self._rank]
        status = "started" if code is None else f"stopped exitcode={code}"
        daemon = " daemon" if self._daemon else ""
        return f"<{type(self).__name__} name={self._name!r} pid={self.pid} {status}{daemon}>"


class ProcessContext:
    """The processes of one start_processes call; ``join`` waits for and checks them."""

    def __init__(self, processes: Sequence[SpawnedProcess], error_files: Sequence[Any]) -> None:
        self.error_files = list(error_files)
        self.processes = list(processes)
        self.sentinels: Dict[int, int] = {p.sentinel: i for i, p in enumerate(self.processes)}
        self._unjoined = set(range(len(self.processes)))
        self._run: Optional[_Run] = self.processes[0]._run if self.processes else None

    def pids(self) -> List[int]:
        """The children's pids, by rank."""
        return [int(p.pid) for p in self.processes]

    def return_value(self, index: int) -> Any:
        """What ``fn`` returned in child ``index`` (started with ``return_values``).

        Raises LookupError when that child has not returned a value (still running,
        failed, or not asked to send one), RuntimeError naming the child and the error
        when its value cannot be unpickled here.
        """
        record = self._record(index)
        if record is not None and record.kind == "unreadable":
            raise RuntimeError(
                f"the return value of process {index} could not be unpickled in the parent: {record.traceback}"
            ) from record.exception
        if record is None or record.kind != "return":
            raise LookupError(f"process {index} has not returned a value")
        return record.value

    def error_traceback(self, index: int) -> Optional[str]:
        """The traceback text of the exception that ended child ``index``, if any."""
        record = self._record(index)
        return record.traceback if record is not None and record.kind == "error" else None

    def _record(self, index: int) -> Optional[_payload.Record]:
        run = self._run
        if run is None or not 0 <= index < len(self.processes):
            raise IndexError(f"no process {index} in this context")
        if run.exitcodes[index] is None:
            run.poll()
        return _payload.decode(run.outputs[index]) if run.exitcodes[index] is not None else None

    def _forget(self, index: int) -> None:
        self._unjoined.discard(index)
        for sentinel, i in list(self.sentinels.items()):
            if i == index:
                del self.sentinels[sentinel]

    def join(self, timeout: Optional[float] = None, grace_period: Optional[float] = None) -> bool:
        """Wait for children to exit; raise if one failed.

        Returns True once every child has exited successfully, False if ``timeout``
        passed first. When a child fails, the others get ``grace_period`` seconds to
        exit, then SIGTERM, then (after another grace period, 30 s by default) SIGKILL,
        and the failure is raised as ProcessRaisedException or ProcessExitedException.
        That stop is bounded (:meth:`_Run.stop`): a child that cannot die even of SIGKILL
        (frozen, stuck in the kernel) delays the raise by at most ``_core.KILL_WAIT``
        seconds, is logged, and is reaped by the engine whenever it exits. A Ctrl-C
        while waiting sends the children SIGINT, stops them the same way, and propagates.
        A child whose exit status someone else collected (SIGCHLD ignored) is judged by
        the exit record it wrote; without one its exit code is an
        :class:`~fastspawn.UnknownExitStatus` and it counts as failed.
        """
        if not self._unjoined:
            return True
        run = self._run
        assert run is not None
        if timeout is not None and timeout < 0:
            timeout = 0.0  # as multiprocessing.connection.wait treats it
        try:
            known = len(run.exit_order)
            if not any(run.exitcodes[i] is not None for i in self._unjoined):
                run.wait_any(timeout, known)
        except BaseException:
            run.interrupt()
            raise

        error_index = None
        for index in run.exit_order:
            if index not in self._unjoined:
                continue
            self._forget(index)
            if run.exitcodes[index] != 0:
                error_index = index
                break
        if error_index is None:
            return not self._unjoined

        try:
            self._shut_down(run, grace_period)
        except BaseException:
            run.interrupt()
            raise
        self._raise_failure(run, error_index)

    def _shut_down(self, run: _Run, grace_period: Optional[float]) -> None:
        """After a child failed: ``grace_period`` s for the others to end by themselves,
        then :meth:`_Run.stop` with SIGTERM and a grace of ``grace_period`` (30 s by
        default), logging what torch logs. Bounded: ``2 * grace_period + KILL_WAIT``."""
        run.group.begin_stop()  # what the children started goes with them
        if grace_period is not None:
            run.wait_all(grace_period)
        for process in self.processes:
            if process.is_alive():
                log.warning("Terminating process %s via signal SIGTERM", process.pid)
        for rank in run.stop(30 if grace_period is None else grace_period):
            log.warning(
                "Unable to shutdown process %s via SIGTERM , forcefully exiting via SIGKILL",
                self.processes[rank].pid,
            )

    def _raise_failure(self, run: _Run, error_index: int) -> NoReturn:
        pid = self.processes[error_index].pid
        record = self._record(error_index)
        if record is not None and record.kind == "error":
            msg = f"\n\n-- Process {error_index:d} terminated with the following error:\n"
            msg += record.traceback
            raise ProcessRaisedException(msg, error_index, pid) from record.exception
        exitcode = run.exitcodes[error_index]
        assert exitcode is not None
        if isinstance(exitcode, UnknownExitStatus):
            raise ProcessExitedException(
                f"process {error_index:d} ended, but {UNKNOWN_STATUS_TEXT}",
                error_index=error_index,
                error_pid=pid,
                exit_code=exitcode,
            )
        if exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"<Unknown signal {-exitcode}>"
            raise ProcessExitedException(
                f"process {error_index:d} terminated with signal {name}",
                error_index=error_index,
                error_pid=pid,
                exit_code=exitcode,
                signal_name=name,
            )
        raise ProcessExitedException(
            f"process {error_index:d} terminated with exit code {exitcode:d}",
            error_index=error_index,
            error_pid=pid,
            exit_code=exitcode,
        )


class SpawnContext(ProcessContext):
    """Old name of :class:`ProcessContext` (warns, as torch does)."""

    def __init__(self, processes: Sequence[SpawnedProcess], error_files: Sequence[Any]) -> None:
        warnings.warn("SpawnContext is renamed to ProcessContext since 1.4 release.", stacklevel=2)
        super().__init__(processes, error_files)


def _check_arguments(fn: Any, args: Any, nprocs: Any, start_method: Any) -> int:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__!r} object: {fn!r}")
    try:
        count = operator.index(nprocs)
    except TypeError:
        raise TypeError(f"nprocs must be an int, got {type(nprocs).__name__!r}: {nprocs!r}") from None
    if isinstance(nprocs, bool):
        raise TypeError(f"nprocs must be an int, got bool: {nprocs!r}")
    if count < 0:
        raise ValueError(f"nprocs must be >= 0, got {count}")
    if start_method not in START_METHODS:
        raise ValueError(
            f"start_method must be one of {', '.join(map(repr, START_METHODS))}; got {start_method!r}"
        )
    try:
        iter(args)
    except TypeError:
        raise TypeError(f"args must be a tuple, got {type(args).__name__!r}: {args!r}") from None
    return count


def _environment(overlay: Optional[Mapping[str, str]]) -> Optional[List[bytes]]:
    """A child's whole environment for execve: the caller's with ``overlay`` laid over."""
    if not overlay:
        return None
    env = {**os.environ, **overlay}
    return _env_entries(env)


def _env_entries(env: Mapping[str, str]) -> List[bytes]:
    """``env`` as execve wants it: ``b"KEY=value"`` items."""
    return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]


class _Stdio:
    """Per-rank stdout/stderr fds, as ``(fd, target)`` pairs. A source that is itself one
    of fds 0..2 is first duplicated, so that no redirection undoes another."""

    def __init__(self, stdio: Optional[Sequence[Tuple[Optional[int], Optional[int]]]], nprocs: int) -> None:
        self.owned: List[int] = []
        self.pairs: List[List[Tuple[int, int]]] = [[] for _ in range(nprocs)]
        if stdio is None:
            return
        try:
            for rank, streams in enumerate(stdio):
                for fd, target in zip(streams, (1, 2)):
                    if fd is None:
                        continue
                    if fd < 3:
                        fd = os.dup(fd)
                        self.owned.append(fd)
                    self.pairs[rank].append((fd, target))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned = []


def _check_per_rank(name: str, values: Optional[Sequence[Any]], nprocs: int) -> None:
    if values is not None and len(values) != nprocs:
        raise ValueError(f"{name} must have one entry per process ({nprocs}), got {len(values)}")


def _start_fresh(
    specs: Sequence[_child.ChildSpec],
    daemon: bool,
    payload: bytes,
    pass_fds: List[int],
    preparation: Dict[str, Any],
    tracker_fd: Optional[int],
    envs: Optional[Sequence[Mapping[str, str]]],
    stdio: _Stdio,
) -> _Run:
    """One fresh interpreter per child, each receiving the call over its control pipe."""
    shared = [
        _core.Chunk(_payload.frame(_payload.dumps_preparation(preparation))),
        _core.Chunk(_payload.frame(payload)),
    ]
    argv = [mp_spawn.get_executable(), *subprocess._args_from_interpreter_flags(), "-c", _child.BOOTSTRAP]  # type: ignore[attr-defined]
    run = _Run(len(specs), daemon)
    try:
        for spec in specs:
            spec = spec._replace(tracker_fd=tracker_fd, fds=tuple(pass_fds))
            head = _core.Chunk(_payload.frame(pickle.dumps(tuple(spec), pickle.HIGHEST_PROTOCOL)))
            fds = pass_fds + ([tracker_fd] if tracker_fd is not None else [])
            run.group.start_exec(
                spec.rank, argv[0], argv, fds, [head, *shared],
                env=_environment(envs[spec.rank] if envs else None),
                redirects=stdio.pairs[spec.rank],
            )
    except BaseException:
        run.stop(0.0)
        raise
    return run


def launch(
    fn: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    nprocs: int = 1,
    *,
    start_method: str = "spawn",
    daemon: bool = False,
    zygote: Optional[bool] = None,
    envs: Optional[Sequence[Mapping[str, str]]] = None,
    stdio: Optional[Sequence[Tuple[Optional[int], Optional[int]]]] = None,
    return_values: bool = False,
) -> "ProcessContext":
    """Start ``fn(i, *args)`` in ``nprocs`` children and return their context (no join).

    The engine under start_processes, for launchers: ``envs[i]`` is laid over the caller's
    environment for rank i before the child loads anything; ``stdio[i]`` is a
    ``(stdout_fd, stderr_fd)`` pair of the caller's fds (or None) that become rank i's
    fds 1 and 2; with ``return_values``, :meth:`ProcessContext.return_value` gives what
    ``fn`` returned in each rank, and a rank that ends by KeyboardInterrupt owes one: it
    reports the traceback and dies by SIGINT (a failure), where torch's children end
    quietly with exit code 0 (as they still do without ``return_values``).
    """
    if start_method is None:  # as multiprocessing.get_context(None): the default method
        start_method = multiprocessing.get_start_method()
    count = _check_arguments(fn, args, nprocs, start_method)
    _check_per_rank("envs", envs, count)
    _check_per_rank("stdio", stdio, count)
    if multiprocessing.current_process()._config.get("daemon"):  # type: ignore[attr-defined]
        raise AssertionError("daemonic processes are not allowed to have children")
    rank_stdio = _Stdio(stdio, count)
    try:
        return _launch(
            fn, tuple(args), count, bool(daemon), start_method, _zygote_wanted(start_method, zygote),
            envs, rank_stdio, return_values,
        )
    finally:
        rank_stdio.close()


def launch_programs(
    argvs: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str]],
    *,
    stdio: Optional[Sequence[Tuple[Optional[int], Optional[int]]]] = None,
) -> "ProcessContext":
    """Start one program per rank: ``argvs[i]`` with exactly the environment ``envs[i]``.

    A program name without a slash is looked up in that environment's PATH. Raises
    FileNotFoundError or PermissionError, with nothing left running, when one cannot be
    executed. Each child leads its own process group; the returned context watches them
    like any other (exit codes, signals, ``join``).
    """
    count = len(argvs)
    _check_per_rank("envs", envs, count)
    _check_per_rank("stdio", stdio, count)
    resolved: List[str] = []
    for argv in argvs:
        if not argv:
            raise ValueError("each program needs a non-empty argv")
        resolved.append(_resolve_program(str(argv[0]), envs[len(resolved)]))
    flush_std_streams()
    rank_stdio = _Stdio(stdio, count)
    run = _Run(count, daemon=False)
    try:
        for rank, argv in enumerate(argvs):
            run.group.start_exec(
                rank, resolved[rank], [str(a) for a in argv], [], [],
                protocol=False, env=_env_entries(envs[rank]), redirects=rank_stdio.pairs[rank],
            )
    except BaseException:
        run.stop(0.0)
        raise
    finally:
        rank_stdio.close()
    processes = [SpawnedProcess(run, i, f"Program-{i}", False) for i in range(count)]
    return ProcessContext(processes, [None] * count)


def _resolve_program(name: str, env: Mapping[str, str]) -> str:
    if os.sep in name:
        found: Optional[str] = name
    else:
        found = shutil.which(name, path=env.get("PATH", os.environ.get("PATH", os.defpath)))
    if found is None or not os.path.exists(found):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    return found


def _tracker_fd() -> int:
    """multiprocessing's resource tracker fd for the children, started if need be.

    ``resource_tracker.getfd()`` probes the tracker by writing to it, which wakes that
    process on every call; when the tracker is our own child, asking the engine whether
    it is still running is enough (it never reaps it: multiprocessing does).
    """
    tracker = resource_tracker._resource_tracker
    fd, pid = tracker._fd, tracker._pid  # type: ignore[attr-defined]
    if fd is not None and pid is not None and _core.child_running(pid):
        return int(fd)
    started = resource_tracker.getfd()
    if started is None:  # getfd() starts the tracker or raises
        raise RuntimeError("multiprocessing's resource tracker did not start")
    return started


def _process_names(start_method: str, count: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """The names and identities multiprocessing would give ``count`` new processes of
    ``start_method`` (e.g. ``SpawnProcess-3``, ``(3,)``), drawn from its own counter, as
    torch's children get them."""
    kind = type(multiprocessing.get_context(start_method)).Process.__name__  # type: ignore[attr-defined]
    base = multiprocessing.current_process()._identity
    counter = multiprocessing.process._process_counter  # type: ignore[attr-defined]
    names = []
    for _ in range(count):
        identity = (*base, next(counter))
        names.append((f"{kind}-{':'.join(map(str, identity))}", identity))
    return names


def _launch(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    nprocs: int,
    daemon: bool,
    start_method: str,
    use_zygote: bool,
    envs: Optional[Sequence[Mapping[str, str]]] = None,
    stdio: Optional[_Stdio] = None,
    return_values: bool = False,
) -> ProcessContext:
    stdio = stdio if stdio is not None else _Stdio(None, nprocs)
    flush_std_streams()  # as multiprocessing does before starting a child
    me = multiprocessing.current_process()
    parent_pid = os.getpid()
    specs = [
        _child.ChildSpec(
            rank=i,
            name=name,
            identity=identity,
            daemon=daemon,
            start_method=start_method,
            parent_pid=parent_pid,
            parent_name=me.name,
            tracker_fd=None,
            return_value=return_values,
        )
        for i, (name, identity) in enumerate(_process_names(start_method, nprocs))
    ]
    run: Optional[_Run] = None
    try:  # whatever is started is stopped if anything fails (Ctrl-C included) before we return
        if start_method == "fork":
            _prewarm.wait(2 * _zygote.zygote_timeout())  # its thread ends: not forked mid-import
            _warn_of_fork_with_threads(parent_pid, nprocs)
            run = _Run(nprocs, daemon)
            for spec in specs:
                pid, control_fd, result_fd = run.group.start_fork(spec.rank)
                if pid == 0:
                    rank = spec.rank

                    def load() -> _child.Call:
                        _child.enter_rank(envs[rank] if envs else None, stdio.pairs[rank])
                        return fn, args

                    _child.run_forked(spec, load, control_fd, result_fd)
        else:
            plain = _payload.is_plain(fn, args)
            payload, pass_fds = _payload.dumps_call(fn, args, plain)
            run = _start_children(specs, daemon, payload, pass_fds, _modules_of(fn), use_zygote, plain, envs, stdio)
        log.debug("fastspawn: %d %s children, watched via %s", nprocs, start_method, run.group.watch_mode)
        processes = [SpawnedProcess(run, i, spec.name, daemon) for i, spec in enumerate(specs)]
        return ProcessContext(processes, [None] * nprocs)
    except BaseException:
        if run is not None:
            run.stop(0.0)
        raise


def _modules_of(*objects: Any) -> List[str]:
    """The modules the zygote imports before it forks children that load ``objects``
    (their ``__module__``s, leaving out the main module, which it imported at start)."""
    modules: List[str] = []
    for obj in objects:
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module != "__main__" and module not in modules:
            modules.append(module)
    return modules


def _start_children(
    specs: Sequence[_child.ChildSpec],
    daemon: bool,
    payload: bytes,
    pass_fds: List[int],
    modules: Sequence[str],
    use_zygote: bool,
    plain: bool = False,
    envs: Optional[Sequence[Mapping[str, str]]] = None,
    stdio: Optional[_Stdio] = None,
) -> _Run:
    """Start one pristine child per spec, each running the pickled call ``payload``:
    forked from the warm zygote (which imports ``modules`` first) when ``use_zygote`` and
    it can, else one fresh interpreter each (warned once, see
    :meth:`_Zygotes.fallback_warning`). The one place that picks, for every front end.
    Nothing is left running if it raises."""
    nprocs = len(specs)
    stdio = stdio if stdio is not None else _Stdio(None, nprocs)
    preparation = _payload.preparation_data(specs[0].name if specs else "SpawnProcess")
    tracker_fd = _tracker_fd() if nprocs else None
    run: Optional[_Run] = None
    try:
        if nprocs and use_zygote:
            zygote = _zygotes.get(preparation)
            if zygote is not None:
                run = _Run(nprocs, daemon)
                reason = zygote.spawn(
                    run.group, specs, payload, pass_fds, tracker_fd, modules, os.getpid(),
                    envs, stdio.pairs, plain=plain,
                )
                if reason is not None:
                    _zygotes.fallback_warning(zygote.key, reason)
                    run = None
        if run is None:
            run = _start_fresh(specs, daemon, payload, pass_fds, preparation, tracker_fd, envs, stdio)
        return run
    except BaseException:
        if run is not None:
            run.stop(0.0)
        raise


def start_process_object(process: Any) -> _Run:
    """Start one child that runs the multiprocessing Process object ``process`` as a
    spawned child runs it (its own ``_bootstrap``), forked from the warm zygote or in a
    fresh interpreter (:func:`_start_children`). ``process`` is pickled as spawn pickles
    it, so its arguments' fds (Queues, Pipes) reach the child."""
    flush_std_streams()  # as multiprocessing does before starting a child
    spec = _child.ChildSpec(
        rank=0,
        name=process.name,
        identity=tuple(process._identity),
        daemon=bool(process.daemon),
        start_method="spawn",
        parent_pid=process._parent_pid,
        parent_name=process._parent_name,
        tracker_fd=None,
        process_object=True,
    )
    payload, pass_fds = _payload.dumps_call(process, ())
    # the target's module, and the one of the Process object's class (fastspawn._context)
    modules = _modules_of(getattr(process, "_target", None), type(process))
    run = _start_children([spec], spec.daemon, payload, pass_fds, modules, _zygote_wanted("spawn", None))
    # Ended at exit by multiprocessing's own exit step, in its order (pools and managers
    # are finalized first, then daemonic children are terminated, then all joined), not
    # by _at_exit: see fastspawn._context.Popen.terminate.
    _live_runs.discard(run)
    return run


def start_processes(
    fn: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
    *,
    zygote: Optional[bool] = None,
) -> Optional[ProcessContext]:
    """Run ``fn(i, *args)`` in ``nprocs`` processes, ``i`` being the rank 0..nprocs-1.

    Same contract as ``torch.multiprocessing.start_processes``: with ``join=True``,
    returns None once all children exited successfully and raises
    ProcessRaisedException / ProcessExitedException as soon as one fails (the others are
    terminated); with ``join=False``, returns the :class:`ProcessContext`.
    ``start_method`` "spawn" and "forkserver" give children that are pristine like a fresh
    interpreter's (the caller's ``__main__`` body never ran in them), forked from the warm
    zygote unless ``zygote=False`` or ``FASTSPAWN_ZYGOTE=0`` asks for one fresh interpreter
    per child; "fork" forks the caller.
    """
    if start_method == "forkserver" and os.environ.get(ENV_VAR_PARALLEL_START, "0") == "1":
        _check_arguments(fn, args, nprocs, start_method)
        log.info("Starting processes in parallel.")
    context = launch(fn, args, nprocs, start_method=start_method, daemon=daemon, zygote=zygote)
    if not join:
        return context
    while not context.join():
        pass
    return None


def spawn(
    fn: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
    *,
    zygote: Optional[bool] = None,
) -> Optional[ProcessContext]:
    """Run ``fn(i, *args)`` in ``nprocs`` fresh processes (start method spawn).

    Same contract as ``torch.multiprocessing.spawn``. Any other ``start_method`` gives a
    FutureWarning and is ignored; use :func:`start_processes` for fork.
    """
    if start_method != "spawn":
        msg = (
            f"This method only supports start_method=spawn (got: {start_method}).\n"
            "To use a different start_method use:\n\t\t"
            " torch.multiprocessing.start_processes(...)"
        )
        warnings.warn(msg, FutureWarning, stacklevel=2)
    return start_processes(fn, args, nprocs, join, daemon, start_method="spawn", zygote=zygote)
