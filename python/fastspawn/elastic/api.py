"""Process contexts, log specs and results of :func:`fastspawn.elastic.start_processes`.

Same names, fields, file layout and messages as
``torch.distributed.elastic.multiprocessing.api``, on fastspawn's engine. Where they differ
(on purpose), the docstrings say so.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from enum import IntFlag
from types import FrameType
from typing import Any, Callable, Dict, List, Optional, Set, TextIO, Tuple, Union

from .. import _api, _core
from .._elastic_child import RankCall
from . import _output
from .errors import ProcessFailure

__all__ = [
    "DefaultLogsSpecs",
    "SignalException",
    "Std",
    "to_map",
    "RunProcsResult",
    "PContext",
    "MultiprocessContext",
    "SubprocessContext",
    "LogsDest",
    "LogsSpecs",
]

logger = logging.getLogger(__name__)

# Set (as True) on the log records about single ranks: one per failed rank, one per rank
# sent a closing signal. A launcher that reports failures its own way filters on it.
RANK_REPORT = "fastspawn_rank_report"


class SignalException(Exception):
    """Raised in the launching process by the handler :meth:`PContext.start` installs when
    it receives a termination signal (``sigval``). Catch it and ``close(e.sigval)``."""

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval


def _terminate_process_handler(signum: int, frame: Optional[FrameType]) -> None:
    sigval = signal.Signals(signum)
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)


def _validate_full_rank(d: Dict[int, Any], nprocs: int, what: str) -> None:
    actual, expected = set(d.keys()), set(range(nprocs))
    if actual != expected:
        raise RuntimeError(f"{what}, local rank mapping mismatch, expected: {expected}, actual: {actual}")


# Local ranks of any width (torch's patterns take one digit, so rank 10 cannot be addressed).
_VALUE_REGEX = r"^[0123]$"
_MAPPING_REGEX = r"^(\d+:[0123],)*(\d+:[0123])$"


class Std(IntFlag):
    """Which standard streams: NONE, OUT (stdout), ERR (stderr), ALL (both)."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR

    @classmethod
    def from_str(cls, vm: str) -> Union["Std", Dict[int, "Std"]]:
        """Parse ``"3"`` (one value for every rank) or ``"0:3,1:0,10:1"`` (per local rank).

        ``from_str("1") -> Std.OUT``; ``from_str("0:3,12:2") -> {0: Std.ALL, 12: Std.ERR}``.
        Anything else raises ValueError. Unlike torch, ranks may have several digits.
        """
        if re.match(_VALUE_REGEX, vm):
            return cls(int(vm))
        if re.match(_MAPPING_REGEX, vm):
            mapping: Dict[int, Std] = {}
            for item in vm.split(","):
                rank, value = item.split(":")
                mapping[int(rank)] = cls(int(value))
            return mapping
        raise ValueError(f"{vm} does not match: <{_VALUE_REGEX}> or <{_MAPPING_REGEX}>")


def to_map(val_or_map: Union[Std, Dict[int, Std]], local_world_size: int) -> Dict[int, Std]:
    """One ``Std`` per local rank: a single value applies to all, a mapping's missing
    ranks get ``Std.NONE``. ``to_map({1: Std.OUT}, 2) -> {0: Std.NONE, 1: Std.OUT}``."""
    if isinstance(val_or_map, int):  # a Std (or torch's Std, an IntFlag as well)
        return dict.fromkeys(range(local_world_size), Std(int(val_or_map)))
    return {rank: val_or_map.get(rank, Std.NONE) for rank in range(local_world_size)}


@dataclass
class LogsDest:
    """Per local rank, the paths of each log ("" = console), plus the filtered logs."""

    stdouts: Dict[int, str] = field(default_factory=dict)
    stderrs: Dict[int, str] = field(default_factory=dict)
    tee_stdouts: Dict[int, str] = field(default_factory=dict)
    tee_stderrs: Dict[int, str] = field(default_factory=dict)
    error_files: Dict[int, str] = field(default_factory=dict)
    filtered_stdout: str = field(default_factory=str)
    filtered_stderr: str = field(default_factory=str)


class LogsSpecs(abc.ABC):
    """Where the workers' logs go.

    Args:
        log_dir: base directory of the logs.
        redirects: streams written to files instead of the console: one ``Std`` for every
            rank, or a mapping by local rank.
        tee: streams written to files *and* the console (prefixed by rank), same forms.
        local_ranks_filter: if given, only these local ranks' output reaches the console.
    """

    def __init__(
        self,
        log_dir: Optional[str] = None,
        redirects: Union[Std, Dict[int, Std]] = Std.NONE,
        tee: Union[Std, Dict[int, Std]] = Std.NONE,
        local_ranks_filter: Optional[Set[int]] = None,
    ) -> None:
        self._root_log_dir = log_dir
        self._redirects = redirects
        self._tee = tee
        self._local_ranks_filter = local_ranks_filter

    @abc.abstractmethod
    def reify(self, envs: Dict[int, Dict[str, str]]) -> LogsDest:
        """The log destinations of each local rank, given the ranks' environments (which it
        may update, e.g. with ``TORCHELASTIC_ERROR_FILE``)."""

    @property
    @abc.abstractmethod
    def root_log_dir(self) -> str:
        """The base directory of the logs."""


def _remove_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a fork that inherited the finalizer
        shutil.rmtree(path, ignore_errors=True)


class DefaultLogsSpecs(LogsSpecs):
    """Logs under ``<log_dir>/<run_id>_<random>/attempt_<restart>/<local_rank>/``:
    ``stdout.log``, ``stderr.log``, ``error.json`` (and ``filtered_std{out,err}.log`` in the
    attempt directory). ``log_dir`` is created if missing; ``os.devnull`` means no files.

    Without ``log_dir`` a temporary directory is used, as in torch; unlike torch it is
    removed once this object and every context and result made with it are gone (at the
    latest when the interpreter exits). A ``log_dir`` you name is never removed.
    """

    def __init__(
        self,
        log_dir: Optional[str] = None,
        redirects: Union[Std, Dict[int, Std]] = Std.NONE,
        tee: Union[Std, Dict[int, Std]] = Std.NONE,
        local_ranks_filter: Optional[Set[int]] = None,
    ) -> None:
        self._cleanup: Optional[weakref.finalize[[str, int], DefaultLogsSpecs]] = None
        if log_dir != os.devnull:
            if not log_dir:
                log_dir = tempfile.mkdtemp(prefix="torchelastic_")
                self._cleanup = weakref.finalize(self, _remove_tree, log_dir, os.getpid())
            elif not os.path.exists(log_dir):
                os.makedirs(log_dir, exist_ok=True)
            elif os.path.isfile(log_dir):
                raise NotADirectoryError(f"log_dir: {log_dir} is a file")
        super().__init__(log_dir, redirects, tee, local_ranks_filter)
        self._run_log_dir: Optional[str] = None

    @property
    def root_log_dir(self) -> str:
        """The base directory (the temporary one when none was given)."""
        return str(self._root_log_dir)

    def _make_log_dir(self, log_dir: Optional[str], rdzv_run_id: str) -> str:
        base = log_dir or tempfile.mkdtemp(prefix="torchelastic_")
        os.makedirs(base, exist_ok=True)
        run_dir = tempfile.mkdtemp(prefix=f"{rdzv_run_id}_", dir=base)
        logger.info("log directory set to: %s", run_dir)
        return run_dir

    def reify(self, envs: Dict[int, Dict[str, str]]) -> LogsDest:
        """Create this attempt's directories (emptying an earlier attempt of the same number)
        and set ``TORCHELASTIC_ERROR_FILE`` in each rank's ``envs``. The run id and attempt
        come from ``TORCHELASTIC_RUN_ID`` / ``TORCHELASTIC_RESTART_COUNT`` of rank 0
        (default ``test_run_id`` / ``0``)."""
        nprocs = len(envs)
        if nprocs == 0:
            logger.warning("Empty envs map provided when defining logging destinations.")
        first = envs[0] if nprocs > 0 else {}
        run_id = first.get("TORCHELASTIC_RUN_ID", "test_run_id")
        restart_count = first.get("TORCHELASTIC_RESTART_COUNT", "0")

        discard = self._root_log_dir == os.devnull
        if discard:
            attempt_dir = os.devnull
        else:
            if not self._run_log_dir:
                self._run_log_dir = self._make_log_dir(self._root_log_dir, run_id)
            attempt_dir = os.path.join(self._run_log_dir, f"attempt_{restart_count}")
            shutil.rmtree(attempt_dir, ignore_errors=True)
            os.makedirs(attempt_dir)

        redirects = to_map(self._redirects, nprocs)
        tees = to_map(self._tee, nprocs)
        for rank, tee in tees.items():  # a teed stream is written to its file as well
            redirects[rank] = redirects[rank] | tee

        stdouts = dict.fromkeys(range(nprocs), "")
        stderrs = dict.fromkeys(range(nprocs), "")
        tee_stdouts: Dict[int, str] = {}
        tee_stderrs: Dict[int, str] = {}
        error_files: Dict[int, str] = {}
        for rank in range(nprocs):
            if discard:
                tee_stdouts[rank] = tee_stderrs[rank] = error_files[rank] = os.devnull
                envs[rank]["TORCHELASTIC_ERROR_FILE"] = ""
                continue
            rank_dir = os.path.join(attempt_dir, str(rank))
            os.mkdir(rank_dir)
            if redirects[rank] & Std.OUT:
                stdouts[rank] = os.path.join(rank_dir, "stdout.log")
            if redirects[rank] & Std.ERR:
                stderrs[rank] = os.path.join(rank_dir, "stderr.log")
            if tees[rank] & Std.OUT:
                tee_stdouts[rank] = stdouts[rank]
            if tees[rank] & Std.ERR:
                tee_stderrs[rank] = stderrs[rank]
            if self._local_ranks_filter and rank not in self._local_ranks_filter:
                # kept out of the console: teed streams only go to their file, the others nowhere
                tee_stdouts.pop(rank, None)
                tee_stderrs.pop(rank, None)
                stdouts[rank] = stdouts[rank] or os.devnull
                stderrs[rank] = stderrs[rank] or os.devnull
            error_files[rank] = os.path.join(rank_dir, "error.json")
            logger.info("Setting worker%s reply file to: %s", rank, error_files[rank])
            envs[rank]["TORCHELASTIC_ERROR_FILE"] = error_files[rank]

        return LogsDest(
            stdouts,
            stderrs,
            tee_stdouts,
            tee_stderrs,
            error_files,
            os.path.join(attempt_dir, "filtered_stdout.log"),
            os.path.join(attempt_dir, "filtered_stderr.log"),
        )

    def __repr__(self) -> str:
        return (
            f"DefaultLogsSpecs(root_log_dir={self._root_log_dir}, redirects={self._redirects}, "
            f"tee={self._tee}, local_ranks_filter={self._local_ranks_filter})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DefaultLogsSpecs):
            return False
        return (
            self._root_log_dir == other._root_log_dir
            and self._redirects == other._redirects
            and self._tee == other._tee
            and self._local_ranks_filter == other._local_ranks_filter
        )

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value


@dataclass
class RunProcsResult:
    """Outcome of a run, every field by local rank: ``return_values`` (functions: what each
    returned; binaries: None each; empty on failure), ``failures``, and the ``stdouts`` /
    ``stderrs`` log paths ("" = console)."""

    return_values: Dict[int, Any] = field(default_factory=dict)
    failures: Dict[int, ProcessFailure] = field(default_factory=dict)
    stdouts: Dict[int, str] = field(default_factory=dict)
    stderrs: Dict[int, str] = field(default_factory=dict)

    def is_failed(self) -> bool:
        """Whether any process failed."""
        return len(self.failures) > 0


_SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        logger.warning(
            "Failed to register signal handlers since torchelastic is running on a child thread. "
            "This could lead to orphaned worker processes if the torchrun is terminated."
        )
        return
    for sig_name in os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", _SIGNALS_TO_HANDLE).split(","):
        try:
            signal.signal(getattr(signal, sig_name.strip()), _terminate_process_handler)
            logger.info("Registered signal handler for %s", sig_name)
        except (AttributeError, ValueError, RuntimeError):
            logger.warning("Failed to register signal handler for %s", sig_name, exc_info=True)


class PContext(abc.ABC):
    """The processes of one :func:`~fastspawn.elastic.start_processes` call.

    ``name``, ``entrypoint``, ``args``, ``envs``, ``nprocs``, and per local rank ``stdouts``,
    ``stderrs`` (log paths, "" = console) and ``error_files``. :meth:`start` launches,
    :meth:`wait` waits for the outcome, :meth:`close` stops what is still running.

    Differences from torch (on purpose): ``wait`` returns as soon as the outcome is known
    instead of polling every ``period`` seconds; ``failures`` names every rank that failed
    by itself, and never a rank that was terminated because another one failed; teed output
    reaches the console in whole lines; each rank's ``envs`` is in place before its
    interpreter runs anything; the log directory of a temporary ``DefaultLogsSpecs`` is
    removed once unused.
    """

    def __init__(
        self,
        name: str,
        entrypoint: Union[Callable[..., Any], str],
        args: Dict[int, Tuple[Any, ...]],
        envs: Dict[int, Dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: Optional[Dict[int, str]] = None,
        duplicate_stdout_filters: Optional[List[str]] = None,
        duplicate_stderr_filters: Optional[List[str]] = None,
        *,
        numa_options: None = None,
    ) -> None:
        if numa_options is not None:
            raise ValueError("fastspawn.elastic does not support numa_options (NUMA binding); pass numa_options=None")
        self.name = name
        nprocs = len(args)
        logs_dest = logs_specs.reify(envs)
        _validate_full_rank(logs_dest.stdouts, nprocs, "stdouts")
        _validate_full_rank(logs_dest.stderrs, nprocs, "stderrs")
        self.entrypoint = entrypoint
        self.args = args
        self.envs = envs
        self.stdouts = logs_dest.stdouts
        self.stderrs = logs_dest.stderrs
        self.error_files = logs_dest.error_files
        self.nprocs = nprocs
        self._logs_specs = logs_specs  # keeps a temporary log directory alive
        self.filtered_stdout: Optional[TextIO] = None
        self.filtered_stderr: Optional[TextIO] = None
        if duplicate_stdout_filters:
            self.filtered_stdout = open(logs_dest.filtered_stdout, mode="w", errors="replace", buffering=1)  # noqa: SIM115
        if duplicate_stderr_filters:
            self.filtered_stderr = open(logs_dest.filtered_stderr, mode="w", errors="replace", buffering=1)  # noqa: SIM115
        headers = {rank: f"[{name}{rank}]:" for rank in range(nprocs)}
        headers.update(log_line_prefixes or {})
        self._streams = _output.RankStreams(
            name,
            (self.stdouts, self.stderrs),
            (list(logs_dest.tee_stdouts), list(logs_dest.tee_stderrs)),
            headers,
            (sys.stdout, sys.stderr),
            (
                _output.LineFilter(self.filtered_stdout, duplicate_stdout_filters or [])
                if self.filtered_stdout is not None
                else None,
                _output.LineFilter(self.filtered_stderr, duplicate_stderr_filters or [])
                if self.filtered_stderr is not None
                else None,
            ),
        )
        self._pc: Optional[_api.ProcessContext] = None
        self._started = False
        self._result: Optional[RunProcsResult] = None
        self._signalled: Set[int] = set()  # ranks close() sent a signal to
        # Ranks signalled by the cleanup after another rank's failure: their exit is ours.
        self._collateral: Set[int] = set()

    # ------------------------------------------------------------------ starting
    def start(self) -> None:
        """Start the processes. In the main thread, first installs handlers that raise
        :class:`SignalException` for the signals in ``TORCHELASTIC_SIGNALS_TO_HANDLE``
        (default SIGTERM, SIGINT, SIGHUP, SIGQUIT), as torch does."""
        _install_signal_handlers()
        self._start()

    def _start(self) -> None:
        if self._started:
            raise ValueError(self._twice_message)
        self._started = True
        if self.nprocs == 0:
            return
        stdio = self._streams.open(self.nprocs)
        try:
            self._pc = self._launch(stdio)
        except BaseException:
            self._streams.close()
            raise
        run = self._pc._run
        assert run is not None  # nprocs > 0
        self._streams.launched(run.group)

    _twice_message = "The process context already initialized. Most likely the start method got called twice."

    @abc.abstractmethod
    def _launch(self, stdio: List[_output.StdioPair]) -> _api.ProcessContext:
        """Start the ranks on the engine, with these stdout/stderr fds."""

    # ------------------------------------------------------------------ waiting
    def _poll(self) -> Optional[RunProcsResult]:
        """The outcome if known (all succeeded, or some failed and the rest were stopped),
        else None. Never blocks on running processes."""
        if self._result is not None:
            return self._result
        if not self._started:
            raise AssertionError("the processes were not started")
        pc = self._pc
        if pc is None:  # no processes at all
            result = RunProcsResult(return_values={}, stdouts=self.stdouts, stderrs=self.stderrs)
        else:
            run = pc._run
            assert run is not None
            run.poll()
            codes = run.exitcodes
            if any(codes[rank] not in (None, 0) for rank in run.exit_order):
                before = set(self._signalled)
                self.close()
                self._collateral = self._signalled - before
                result = self._failed_result(run)
            elif all(code == 0 for code in codes):
                result = RunProcsResult(
                    return_values=self._return_values(pc), stdouts=self.stdouts, stderrs=self.stderrs
                )
                self.close()
            else:
                return None
        result._logs_specs = self._logs_specs  # type: ignore[attr-defined]  # keeps the logs
        self._result = result
        return result

    def _failed_result(self, run: Any) -> RunProcsResult:
        failures: Dict[int, ProcessFailure] = {}
        for rank in run.exit_order:
            code = run.exitcodes[rank]
            if code == 0 or rank in self._collateral:
                continue
            failure = ProcessFailure(
                local_rank=rank,
                pid=int(run.group.pid(rank)),
                exitcode=code,
                error_file=self.error_files.get(rank, ""),
            )
            self._log_failure(failure)
            failures[rank] = failure
        return RunProcsResult(failures=failures, stdouts=self.stdouts, stderrs=self.stderrs)

    @abc.abstractmethod
    def _log_failure(self, failure: ProcessFailure) -> None:
        """Log one failed rank."""

    @abc.abstractmethod
    def _return_values(self, pc: _api.ProcessContext) -> Dict[int, Any]:
        """Every rank's return value, after all succeeded."""

    def wait(self, timeout: float = -1, period: float = 1) -> Optional[RunProcsResult]:
        """Wait up to ``timeout`` seconds (< 0: no limit, 0: just check) for the outcome:
        a :class:`RunProcsResult` once every rank succeeded or any failed (the others are
        then stopped), None if still running at the timeout.

        Returns as soon as the outcome is known (it waits on the processes' exits, not in
        ``period`` steps; ``period`` is accepted for compatibility). A handled signal
        interrupts the wait with :class:`SignalException`: catch it and ``close(e.sigval)``.
        """
        if timeout == 0:
            return self._poll()
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            result = self._poll()
            if result is not None:
                return result
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            assert self._pc is not None and self._pc._run is not None
            self._pc._run.wait_any(left)

    @abc.abstractmethod
    def pids(self) -> Dict[int, int]:
        """The processes' pids by local rank."""

    # ------------------------------------------------------------------ closing
    def close(self, death_sig: Optional[signal.Signals] = None, timeout: float = 30) -> None:
        """Stop every process still running and release the logs.

        ``death_sig`` (default SIGTERM) first, then SIGKILL to those still alive after
        ``timeout`` seconds, then at most ``fastspawn._core.KILL_WAIT`` seconds more for
        them to die: close returns within ``timeout + KILL_WAIT`` seconds (plus the time to
        write out teed output). A process that does not even die of SIGKILL (stuck in the
        kernel) is logged and left to fastspawn's reaper. Unlike torch, a program's
        ``death_sig`` reaches the program itself; what it started in its process group
        gets SIGKILL once it has exited. Teed output written before is on the console when
        close returns.
        """
        self._close(death_sig=signal.Signals(death_sig or signal.SIGTERM), timeout=timeout)
        self._streams.close()
        for filtered in (self.filtered_stdout, self.filtered_stderr):
            if filtered is not None:
                filtered.close()

    # Log text when sending the death signal.
    _closing_message = "Closing process %s via signal %s"

    def _close(self, death_sig: signal.Signals, timeout: float = 30) -> None:
        pc = self._pc
        if pc is None:
            return
        run = pc._run
        assert run is not None
        run.poll()
        for rank, code in enumerate(run.exitcodes):
            if code is None:
                logger.warning(
                    self._closing_message, run.group.pid(rank), death_sig.name, extra={RANK_REPORT: True}
                )
                self._signalled.add(rank)
        killed = run.stop(max(0.0, timeout), death_sig)
        for rank in killed:
            logger.warning(
                "Unable to shutdown process %s via %s, forcefully exiting via %s",
                run.group.pid(rank),
                death_sig,
                signal.SIGKILL,
            )
        for rank in killed:
            if rank in run.abandoned:
                logger.error(
                    "Process %s did not exit after %s within %ss; abandoning and continuing teardown."
                    " Worker may be in uninterruptible kernel sleep (e.g. wedged on GPU/NIC);"
                    " host may need to be recycled.",
                    run.group.pid(rank),
                    signal.SIGKILL.name,
                    _core.KILL_WAIT,
                )


class _Ranks(PContext):
    """The constructor shared by the two contexts (torch's argument order)."""

    def __init__(
        self,
        name: str,
        entrypoint: Union[Callable[..., Any], str],
        args: Dict[int, Tuple[Any, ...]],
        envs: Dict[int, Dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: Optional[Dict[int, str]] = None,
        numa_options: None = None,
        duplicate_stdout_filters: Optional[List[str]] = None,
        duplicate_stderr_filters: Optional[List[str]] = None,
    ) -> None:
        super().__init__(
            name, entrypoint, args, envs, logs_specs, log_line_prefixes,
            duplicate_stdout_filters, duplicate_stderr_filters, numa_options=numa_options,
        )


class MultiprocessContext(_Ranks):
    """Ranks running a function: ``record(entrypoint)(*args[local_rank])`` in each child,
    started by fastspawn (warm zygote for ``spawn``/``forkserver``, or ``fork``); return
    values come back over the engine's result pipe."""

    def __init__(
        self,
        name: str,
        entrypoint: Callable[..., Any],
        args: Dict[int, Tuple[Any, ...]],
        envs: Dict[int, Dict[str, str]],
        start_method: str,
        logs_specs: LogsSpecs,
        *options: Any,
        **keywords: Any,
    ) -> None:
        """The arguments of :class:`SubprocessContext`, with ``start_method`` before
        ``logs_specs`` (as in torch)."""
        super().__init__(name, entrypoint, args, envs, logs_specs, *options, **keywords)
        self.start_method = start_method

    def _launch(self, stdio: List[_output.StdioPair]) -> _api.ProcessContext:
        assert callable(self.entrypoint)
        return _api.launch(
            RankCall(self.entrypoint, self.args),
            nprocs=self.nprocs,
            start_method=self.start_method,
            envs=[self.envs[rank] for rank in range(self.nprocs)],
            stdio=stdio,
            return_values=True,
        )

    def _return_values(self, pc: _api.ProcessContext) -> Dict[int, Any]:
        return {rank: pc.return_value(rank) for rank in range(self.nprocs)}

    def _log_failure(self, failure: ProcessFailure) -> None:
        assert self._pc is not None
        trace = self._pc.error_traceback(failure.local_rank)
        logger.error(
            "failed (exitcode: %s) local_rank: %s (pid: %s) of fn: %s (start_method: %s)%s",
            failure.exitcode,
            failure.local_rank,
            failure.pid,
            getattr(self.entrypoint, "__qualname__", repr(self.entrypoint)),
            self.start_method,
            f"\n{trace}" if trace else "",
            extra={RANK_REPORT: True},
        )

    def pids(self) -> Dict[int, int]:
        """The processes' pids by local rank."""
        if self._pc is None:
            raise AssertionError("the processes were not started")
        return dict(enumerate(self._pc.pids()))


class SubprocessContext(_Ranks):
    """Ranks running a program: ``entrypoint`` with ``args[local_rank]`` (each made a str),
    the caller's environment updated with ``envs[local_rank]``, each rank leading its own
    process group (signals from :meth:`close` reach the whole group)."""

    _twice_message = "The subprocess handlers already initialized. Most likely the start method got called twice."
    _closing_message = "Sending process %s closing signal %s"

    def _launch(self, stdio: List[_output.StdioPair]) -> _api.ProcessContext:
        argvs = [[str(self.entrypoint), *(str(a) for a in self.args[rank])] for rank in range(self.nprocs)]
        envs = [{**os.environ, **self.envs[rank]} for rank in range(self.nprocs)]
        return _api.launch_programs(argvs, envs, stdio=stdio)

    def _return_values(self, pc: _api.ProcessContext) -> Dict[int, Any]:
        return dict.fromkeys(range(self.nprocs))

    def _log_failure(self, failure: ProcessFailure) -> None:
        logger.error(
            "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s",
            failure.exitcode,
            failure.local_rank,
            failure.pid,
            self.entrypoint,
            extra={RANK_REPORT: True},
        )

    def pids(self) -> Dict[int, int]:
        """The processes' pids by local rank (empty before start)."""
        return {} if self._pc is None else dict(enumerate(self._pc.pids()))
