"""``MultiProcessTestCase`` for distributed tests, with ranks forked from fastspawn's zygote.

A drop-in for ``torch.testing._internal.common_distributed.MultiProcessTestCase``: change
the import and nothing else::

    from fastspawn.testing import MultiProcessTestCase   # was: from torch.testing._internal...

    class AllReduceTest(MultiProcessTestCase):
        @property
        def world_size(self) -> int:
            return 2

        def setUp(self) -> None:
            super().setUp()
            self._spawn_processes()

        def test_all_reduce(self) -> None:   # runs in every rank; the parent joins them
            dist.init_process_group("gloo", init_method=f"file://{self.file_name}",
                                    rank=self.rank, world_size=self.world_size)
            ...

The same attributes and hooks as torch's (``world_size``, ``rank``, ``file_name``,
``processes``, ``_spawn_processes``/``_start_processes``, ``destroy_pg_upon_exit``,
``special_return_code_checks``, ``skip_return_code_checks``, ``join_or_run``), the
``TEST_SKIPS`` exit-code convention, ``TEST_ERROR_EXIT_CODE`` and the same error texts.
The differences:

- Ranks are forked from fastspawn's warm zygote, which imports the test module once: a test
  costs ``world_size`` forks instead of ``world_size`` interpreters importing torch.
- Every rank's exit code is checked (torch checks rank 0's): a rank that crashed or exited
  with an unexpected code fails the test, and stops the other ranks at once instead of
  letting them wait for it until the timeout; a rank killed by a fatal signal shows its
  Python stack.
- At the timeout the ranks still running get SIGTERM, which first writes the Python stack of
  all their threads into the failure message (whole, however big); a rank still alive
  ``kill_grace_period`` seconds later gets SIGKILL (torch sends SIGTERM only and never
  waits). Stopping is bounded: a rank that cannot die even by SIGKILL (frozen, stuck in
  the kernel) fails the test within ``timeout + kill_grace_period + _core.KILL_WAIT``
  seconds, named in the message, and is reaped by fastspawn whenever it finally exits.
- A skip inside a rank (``unittest.SkipTest``, or ``pytest.skip``) carries its reason to the
  parent, instead of torch's generic "look at subprocess log" message.

The class is built on first access: its base is torch's own test ``TestCase``
(``torch.testing._internal.common_utils.TestCase``: tensor-aware ``assertEqual`` and the
rest) when torch is installed, ``unittest.TestCase`` otherwise. Importing this module does
not import torch.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import unittest
import warnings
from functools import wraps
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

__all__ = [
    "DEFAULT_WORLD_SIZE",
    "MultiProcessTestCase",
    "TEST_ERROR_EXIT_CODE",
    "TEST_SKIPS",
    "TIMEOUT_DEFAULT",
    "TIMEOUT_OVERRIDE",
    "TestSkip",
    "get_timeout",
]

logger = logging.getLogger(__name__)

TYPE_CHECKING = False


class TestSkip(NamedTuple):
    """A skip reason a rank reports by exiting with ``exit_code``."""

    exit_code: int
    message: str


# The exit codes and reasons of torch's common_distributed.TEST_SKIPS: a rank that exits
# with one of these codes makes the test skip with that reason.
TEST_SKIPS: Dict[str, TestSkip] = {
    "backend_unavailable": TestSkip(72, "Skipped because distributed backend is not available."),
    "small_worldsize": TestSkip(73, "Skipped due to small world size."),
    "odd_worldsize": TestSkip(87, "Skipped due to odd world size."),
    "no_cuda": TestSkip(74, "CUDA is not available."),
    "multi-gpu-1": TestSkip(75, "Need at least 1 CUDA device"),
    "multi-gpu-2": TestSkip(77, "Need at least 2 CUDA devices"),
    "multi-gpu-3": TestSkip(80, "Need at least 3 CUDA devices"),
    "multi-gpu-4": TestSkip(81, "Need at least 4 CUDA devices"),
    "multi-gpu-5": TestSkip(82, "Need at least 5 CUDA devices"),
    "multi-gpu-6": TestSkip(83, "Need at least 6 CUDA devices"),
    "multi-gpu-7": TestSkip(84, "Need at least 7 CUDA devices"),
    "multi-gpu-8": TestSkip(85, "Need at least 8 CUDA devices"),
    "nccl": TestSkip(76, "c10d not compiled with NCCL support"),
    "skipIfRocm": TestSkip(78, "Test skipped for ROCm"),
    "no_peer_access": TestSkip(79, "Test skipped because no GPU peer access"),
    "generic": TestSkip(86, "Test skipped at subprocess level, look at subprocess log for skip reason"),
    "importerror": TestSkip(88, "Test skipped due to missing import"),
    "no_accelerator": TestSkip(89, "accelerator is not available."),
}

# Exit code of a rank whose test raised; its traceback goes to the parent.
TEST_ERROR_EXIT_CODE = 10

# torch's default world size for these tests.
DEFAULT_WORLD_SIZE = 4

# Seconds a test may run, overridable per test name (torch reads the same variable).
TIMEOUT_DEFAULT = int(os.getenv("DISTRIBUTED_TESTS_DEFAULT_TIMEOUT", "300"))
TIMEOUT_OVERRIDE: Dict[str, float] = {}

# The seed torch's test utilities give every rank when they are not loaded (their default).
_SEED = 1234


def get_timeout(test_id: str) -> float:
    """The timeout in seconds of the test ``test_id`` (``module.Class.test_name``)."""
    return TIMEOUT_OVERRIDE.get(test_id.split(".")[-1], TIMEOUT_DEFAULT)


def _skip_codes() -> Dict[int, Any]:
    """Exit code -> skip reason: ours, plus any entry added to torch's table if it is loaded."""
    codes = {skip.exit_code: skip for skip in TEST_SKIPS.values()}
    torch_distributed = sys.modules.get("torch.testing._internal.common_distributed")
    for skip in getattr(torch_distributed, "TEST_SKIPS", {}).values():
        codes.setdefault(skip.exit_code, skip)
    return codes


def _skip_exceptions() -> Tuple[Type[BaseException], ...]:
    """What a skip looks like inside a rank: unittest's, and pytest's when pytest is loaded."""
    outcomes = sys.modules.get("_pytest.outcomes")
    pytest_skip = getattr(outcomes, "Skipped", None)
    return (unittest.SkipTest,) if pytest_skip is None else (unittest.SkipTest, pytest_skip)


def _start_method_of(proc: Union[str, type]) -> str:
    """``_start_processes`` takes torch's argument, a Process class of a multiprocessing
    context (``get_context("fork").Process``), or simply the start method's name."""
    method = proc if isinstance(proc, str) else getattr(proc, "_start_method", None)
    if method not in ("spawn", "fork", "forkserver"):
        raise TypeError(
            "_start_processes takes a multiprocessing Process class (e.g. "
            "multiprocessing.get_context('spawn').Process) or a start method name "
            f"('spawn', 'fork', 'forkserver'); got {proc!r}"
        )
    return str(method)


# ------------------------------------------------------------- per-rank channels
class RankFile:
    """A rank's end of a :class:`RankFiles`: the fd the rank appends to.

    It travels with the call to the rank (pickled, the fd handed over by fastspawn) or is
    inherited by a forked rank; the rank closes the ends of the other ranks.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Tuple[Any, ...]:
        from multiprocessing import reduction

        return (_rank_file, (reduction.DupFd(self.fd),))

    def dump_stacks_on_signals(self) -> None:
        """In the rank: SIGTERM and fatal signals (SIGSEGV, SIGABRT, ...) first write every
        thread's Python stack here, then end the process as they would have (SIGTERM runs
        the handler the test installs over it, if any). Writing never blocks: the file is
        memory that grows, so the dump is whole however big (faulthandler's own limits:
        100 threads, 100 frames each)."""
        faulthandler.enable(file=self.fd, all_threads=True)
        faulthandler.register(signal.SIGTERM, file=self.fd, all_threads=True, chain=True)

    def connection(self) -> Connection:
        """In the rank: a write-only ``multiprocessing`` connection on this file (it owns
        the fd from now on); what is sent never waits for the parent to read."""
        fd, self.fd = self.fd, -1
        return Connection(fd, readable=False)

    def close(self) -> None:
        """Close the fd (a rank does it for the other ranks' ends)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _rank_file(fd: Any) -> RankFile:
    return RankFile(fd.detach())


class RankFiles:
    """One anonymous memory file (memfd) per rank, for what a rank reports outside its
    result: the stacks its faulthandler writes at SIGTERM or a fatal signal, the messages a
    test rank sends.

    Unlike a pipe, the file never fills: a rank never blocks writing to it (not while the
    parent waits, not during the stop's grace, not if nobody ever reads), so nothing it
    writes is truncated and no wait needs to drain it. The parent reads a rank's file
    whole at any time; what it holds is complete once the rank has exited or was stopped.
    """

    def __init__(self, nprocs: int, name: str) -> None:
        self._fds: List[int] = []
        try:
            for rank in range(nprocs):
                self._fds.append(os.memfd_create(f"fastspawn-{name}-{rank}", os.MFD_CLOEXEC))
        except BaseException:
            self.close()
            raise

    def for_ranks(self) -> List[RankFile]:
        """The ranks' ends, by rank (to pass to every rank, each keeping its own)."""
        return [RankFile(fd) for fd in self._fds]

    def read(self, rank: int) -> bytes:
        """Everything rank ``rank`` wrote so far (b"" once closed)."""
        fd = self._fds[rank] if rank < len(self._fds) else -1
        if fd < 0:
            return b""
        chunks: List[bytes] = []
        offset = 0
        while True:
            data = os.pread(fd, 1 << 20, offset)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            offset += len(data)

    def text(self, rank: int) -> str:
        """:meth:`read` as text (a stack dump)."""
        return self.read(rank).decode(errors="replace").strip()

    def reader(self, rank: int) -> Connection:
        """A read-only connection on rank ``rank``'s file, with its own read position
        (from the start): ``recv()`` gives what the rank sent through
        :meth:`RankFile.connection`, and EOFError past the last complete message."""
        fd = os.open(f"/proc/self/fd/{self._fds[rank]}", os.O_RDONLY | os.O_CLOEXEC)
        return Connection(fd, writable=False)

    def messages(self, rank: int) -> List[Any]:
        """Every complete message rank ``rank`` sent, in order."""
        if rank >= len(self._fds) or self._fds[rank] < 0:
            return []
        found = []
        with self.reader(rank) as connection:
            while True:
                try:
                    found.append(connection.recv())
                except (EOFError, OSError):
                    return found

    def close(self) -> None:
        """Free the files."""
        fds, self._fds = self._fds, [-1] * len(self._fds)
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def stop_ranks(run: Any, grace: float) -> Tuple[List[int], List[int]]:
    """Stop what still runs of ``run`` (a ``fastspawn._api._Run``) with fastspawn's one stop
    routine (``_Run.stop``): SIGTERM (a rank writes its stacks first), up to ``grace``
    seconds, SIGKILL, up to ``_core.KILL_WAIT`` seconds for the ranks to die.

    Returns ``(killed, unstoppable)``: the ranks that got SIGKILL, and those of them still
    running when it returned (frozen, stuck in the kernel: fastspawn's reaper collects
    them when they exit)."""
    killed: List[int] = run.stop(grace, signal.SIGTERM)
    return killed, [rank for rank in killed if rank in run.abandoned]


# ------------------------------------------------------------------------ rank side
def _prepare_rank() -> None:
    """What torch sets up in a rank before the test: identical seeds in every rank, and
    with torch loaded, C++ stack traces on errors and fatal signals."""
    torch_utils = sys.modules.get("torch.testing._internal.common_utils")
    if torch_utils is not None:
        torch_utils.set_rng_seed()
    else:
        random.seed(_SEED)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(_SEED)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.manual_seed(_SEED)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch._C._set_print_stack_traces_on_fatal_signal(True)
        os.environ["TORCH_SHOW_CPP_STACKTRACES"] = "1"


def _destroy_process_group() -> None:
    """Destroy the default process group the test left, if torch.distributed has one."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available():
        return
    try:
        distributed.destroy_process_group()
    except (AssertionError, ValueError):  # none left, or the test destroyed it already
        pass


class _RankEntry:
    """What each rank runs: ``test_class._run(rank, ...)`` with its own channels.

    Its ``__module__`` is the test class's module, because fastspawn's zygote imports the
    module of the function it starts: so the test module (and torch with it) is imported
    once in the zygote, and each rank is only a fork.
    """

    def __init__(self, test_class: Type[_MultiProcessTestCaseBase]) -> None:
        self.test_class = test_class
        self.__module__ = test_class.__module__

    def __call__(
        self,
        rank: int,
        test_name: str,
        file_name: str,
        messages: Sequence[RankFile],
        stacks: Sequence[RankFile],
        kwargs: Dict[str, Any],
    ) -> None:
        for other, (message_file, stack_file) in enumerate(zip(messages, stacks)):
            if other != rank:
                message_file.close()
                stack_file.close()
        stacks[rank].dump_stacks_on_signals()
        self.test_class._run(rank, test_name, file_name, messages[rank].connection(), **kwargs)


# ----------------------------------------------------------------------- the class
class _MultiProcessTestCaseBase(unittest.TestCase):
    """The logic of :class:`MultiProcessTestCase` (which adds torch's TestCase as a base)."""

    MAIN_PROCESS_RANK = -1
    TEST_ERROR_EXIT_CODE = TEST_ERROR_EXIT_CODE

    # Seconds a rank gets after SIGTERM (at the timeout, or left running at tearDown)
    # before SIGKILL.
    kill_grace_period: float = 3.0

    rank: int
    file_name: str
    processes: List[Any]
    pid_to_pipe: Dict[int, Any]
    special_return_code_checks: Dict[Any, int]
    skip_return_code_checks: List[Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from fastspawn import _prewarm

        _prewarm.class_defined(cls)  # the zygote warms up (and imports the class's module) meanwhile

    def _should_stop_test_suite(self) -> bool:
        return False  # one failing distributed test does not end the run

    @property
    def destroy_pg_upon_exit(self) -> bool:
        """Whether each rank destroys the default process group after the test passed."""
        return True

    @property
    def world_size(self) -> int:
        """How many ranks run each test."""
        return DEFAULT_WORLD_SIZE

    @property
    def is_master(self) -> bool:
        """True in rank 0."""
        return self.rank == 0

    def join_or_run(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """The test method as run: the parent joins the ranks, each rank runs ``fn``."""

        @wraps(fn)
        def wrapper(self: _MultiProcessTestCaseBase) -> None:
            if self.rank == self.MAIN_PROCESS_RANK:
                self._join_processes(fn)
            else:
                fn()

        return types.MethodType(wrapper, self)

    def __init__(self, method_name: str = "runTest", methodName: str = "runTest") -> None:
        if methodName != "runTest":  # unittest's keyword, and torch's positional name
            method_name = methodName
        super().__init__(method_name)
        try:
            fn = getattr(self, method_name)
        except AttributeError as exc:
            if methodName != "runTest":
                raise ValueError(f"no such test method in {self.__class__}: {methodName}") from exc
        else:
            setattr(self, method_name, self.join_or_run(fn))

    def setUp(self) -> None:
        super().setUp()
        self.special_return_code_checks = {}
        self.skip_return_code_checks = []
        self.processes = []
        self.rank = self.MAIN_PROCESS_RANK
        with tempfile.NamedTemporaryFile(delete=False) as f:
            self.file_name = f.name
        self.pid_to_pipe = {}
        self._ranks: Optional[Any] = None  # the run of the ranks (fastspawn._api._Run)
        self._message_files = RankFiles(0, "messages")
        self._stack_files = RankFiles(0, "stacks")
        self._exit_order: List[int] = []
        self._timed_out: List[int] = []
        self._unstoppable: List[int] = []

    def tearDown(self) -> None:
        try:
            super().tearDown()
        finally:
            self._stop_ranks()
            self._close_pipes()
            # A finished TestCase stays referenced until the end of the run: drop what
            # holds fds and processes (a rank that could not be stopped is then the
            # engine's to reap, see _api._Run.stop).
            self.processes = []
            self._ranks = None

    def _current_test_name(self) -> str:
        return self.id().split(".")[-1]

    # ------------------------------------------------------------------ parent: start
    def _spawn_processes(self) -> None:
        """Start ``world_size`` ranks (start method spawn, forked from the warm zygote)."""
        self._start_processes(multiprocessing.get_context("spawn").Process)

    def _start_processes(self, proc: Union[str, type]) -> None:
        """Start ``world_size`` ranks with the start method of ``proc`` (a Process class of
        a multiprocessing context, or a start method name), each running this test."""
        from . import _api

        method = _start_method_of(proc)
        self._stop_ranks(0.0)  # called twice in one test: the earlier ranks go first
        self._close_pipes()
        self.processes = []
        nprocs = int(self.world_size)
        self._message_files = RankFiles(nprocs, "messages")
        self._stack_files = RankFiles(nprocs, "stacks")
        context = _api.start_processes(
            _RankEntry(type(self)),
            args=(
                self._current_test_name(),
                self.file_name,
                self._message_files.for_ranks(),
                self._stack_files.for_ranks(),
                {"fake_pg": getattr(self, "fake_pg", False)},
            ),
            nprocs=nprocs,
            join=False,
            start_method=method,
        )
        assert context is not None
        self._ranks = context._run
        for rank, process in enumerate(context.processes):
            logger.info("Started process %s with pid %s", rank, process.pid)
            self.pid_to_pipe[process.pid] = self._message_files.reader(rank)
            self.processes.append(process)

    # --------------------------------------------------------------------- rank side
    @classmethod
    def _run(cls, rank: int, test_name: str, file_name: str, parent_pipe: Any, **kwargs: Any) -> None:
        """In a rank: build the test case for ``test_name`` and run it as ``rank``."""
        self = cls(test_name)
        self.rank = rank
        self.file_name = file_name
        self.run_test(test_name, parent_pipe)

    def run_test(self, test_name: str, parent_pipe: Any) -> None:
        """In a rank: run the test method; a skip exits with the generic skip code, an
        error sends the traceback to the parent and exits with TEST_ERROR_EXIT_CODE."""
        _prepare_rank()
        try:
            getattr(self, test_name)()
        except _skip_exceptions() as exc:
            logger.info(
                "Process %s skipping test %s for following reason: %s", self.rank, test_name, exc
            )
            parent_pipe.send(("skip", str(exc)))
            sys.exit(TEST_SKIPS["generic"].exit_code)
        except Exception:
            text = traceback.format_exc()
            logger.error(
                "Caught exception: \n%s exiting process %s with exit code: %s",
                text,
                self.rank,
                TEST_ERROR_EXIT_CODE,
            )
            parent_pipe.send(("error", text))
            sys.exit(TEST_ERROR_EXIT_CODE)
        finally:
            parent_pipe.close()
        if self.destroy_pg_upon_exit:
            _destroy_process_group()

    # ------------------------------------------------------------------- parent: join
    def _join_processes(self, fn: Callable[[], Any]) -> None:
        """In the parent: wait for the ranks (at most ``get_timeout``), then check them."""
        timeout = get_timeout(self.id())
        start_time = time.time()
        try:
            self._wait_for_ranks(fn, timeout)
            self._check_return_codes(fn, time.time() - start_time)
        except BaseException:
            self._stop_ranks(0.0)
            raise
        finally:
            self._close_pipes()

    def _aborts(self, fn: Callable[[], Any], exitcode: int) -> bool:
        """Whether a rank's exit means the others should not be waited for."""
        if exitcode == TEST_ERROR_EXIT_CODE:
            return True
        if fn in self.skip_return_code_checks:
            return False
        return exitcode not in (0, self.special_return_code_checks.get(fn, 0)) and exitcode not in _skip_codes()

    def _wait_for_ranks(self, fn: Callable[[], Any], timeout: float) -> None:
        """Until every rank exited, one exited in a way that ends the test (the others are
        stopped then), or the timeout (the ranks still running are stopped, their stacks
        logged as torch logs them)."""
        run = self._ranks
        if run is None:
            return
        deadline = time.monotonic() + timeout
        while len(self._exit_order) < len(self.processes):
            left = deadline - time.monotonic()
            if left <= 0:
                self._timed_out = [rank for rank, p in enumerate(self.processes) if p.exitcode is None]
                logger.error("Timing out after %s seconds and killing subprocesses.", timeout)
                self._stop_ranks()
                for rank in self._timed_out:
                    stacks = self._stack_files.text(rank)
                    if stacks:
                        logger.error("Process %s timed out with traceback: \n\n%s", rank, stacks)
                    else:
                        logger.error("Could not retrieve traceback for timed out process: %s", rank)
                return
            run.wait_any(left, len(self._exit_order))
            for rank in run.exit_order[len(self._exit_order) :]:
                self._exit_order.append(rank)
                exitcode = run.exitcodes[rank]
                if exitcode is not None and self._aborts(fn, exitcode):
                    logger.error(
                        "Process %s terminated with exit code %s, terminating remaining processes.",
                        rank,
                        exitcode,
                    )
                    self._stop_ranks()
                    return

    def _stop_ranks(self, grace: Optional[float] = None) -> None:
        """Stop the ranks still running (see :func:`stop_ranks`), SIGKILL to those alive
        ``grace`` seconds after SIGTERM (default ``kill_grace_period``)."""
        run = getattr(self, "_ranks", None)
        if run is None:
            return
        grace = self.kill_grace_period if grace is None else grace
        killed, unstoppable = stop_ranks(run, grace)
        for rank in killed:
            logger.warning(
                "Process %s (pid %s) did not exit within %s seconds of SIGTERM; it got SIGKILL",
                rank,
                self.processes[rank].pid,
                grace,
            )
        self._unstoppable += unstoppable

    def _close_pipes(self) -> None:
        for pipe in self.pid_to_pipe.values():
            pipe.close()
        self._message_files.close()
        self._stack_files.close()

    def _message(self, rank: int) -> Tuple[str, str]:
        """The last ("skip" or "error", text) message rank ``rank`` sent, if any."""
        messages = self._message_files.messages(rank)
        return messages[-1] if messages else ("", "")

    def _unstoppable_text(self) -> str:
        """What to add to a failure about ranks still running after the stop."""
        text = ""
        for rank in sorted(set(self._unstoppable)):
            text += (
                f"\n\n-- Process {rank} (pid {self.processes[rank].pid}) did not exit even after "
                "SIGKILL (frozen, or stuck in the kernel); fastspawn reaps it when it does"
            )
        return text

    def _check_return_codes(self, fn: Callable[[], Any], elapsed_time: float) -> None:
        """Raise for a rank that failed or timed out; skip when a rank exited with a skip
        code; fail when any rank's exit code is not the expected one (0 by default)."""
        if not self.processes:
            logger.warning("Note: no subprocesses were spawned, test was likely skipped.")
            return
        errored = [i for i, p in enumerate(self.processes) if p.exitcode == TEST_ERROR_EXIT_CODE]
        if errored:
            error = ""
            for i in errored:
                _, text = self._message(i)
                error += (
                    f"Process {i} exited with error code {TEST_ERROR_EXIT_CODE} "
                    f"and exception:\n{text}\n"
                )
            raise RuntimeError(error + self._unstoppable_text())
        timed_out = self._timed_out or [i for i, p in enumerate(self.processes) if p.exitcode is None]
        if timed_out:
            message = f"Process {timed_out[0]} terminated or timed out after {elapsed_time} seconds"
            for i in timed_out:
                stacks = self._stack_files.text(i) or "(no stack received)"
                message += f"\n\n-- Process {i} was running at the timeout, in:\n{stacks}"
            raise RuntimeError(message + self._unstoppable_text())
        if fn in self.skip_return_code_checks:
            return
        skips = _skip_codes()
        expected = self.special_return_code_checks.get(fn, 0)
        order = self._exit_order + [i for i in range(len(self.processes)) if i not in self._exit_order]
        for i in order:
            process = self.processes[i]
            if process.exitcode != expected and process.exitcode not in skips:
                msg = f"Expected exit code {expected} but got {process.exitcode} for pid: {process.pid} (process {i})"
                stacks = self._stack_files.text(i) if process.exitcode is not None and process.exitcode < 0 else ""
                if stacks:
                    msg += f"\n\n-- Process {i} was killed by signal {-process.exitcode}, in:\n{stacks}"
                self.assertEqual(process.exitcode, expected, msg=msg)
        for i, process in enumerate(self.processes):
            skip = skips.get(process.exitcode)
            if skip is not None and process.exitcode != expected:
                kind, reason = self._message(i)
                raise unittest.SkipTest(reason if kind == "skip" and reason else skip.message)


# ---------------------------------------------------------------- built on first use
_build_lock = threading.Lock()


def _test_case_base() -> type:
    """torch's TestCase when torch is installed, unittest's otherwise."""
    try:
        from torch.testing._internal.common_utils import TestCase
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":
            return unittest.TestCase
        warnings.warn(
            f"fastspawn.testing: torch's test utilities cannot be imported ({exc}); "
            "MultiProcessTestCase is based on unittest.TestCase",
            RuntimeWarning,
            stacklevel=3,
        )
        return unittest.TestCase
    return TestCase


def _build() -> type:
    base = _test_case_base()
    bases = (_MultiProcessTestCaseBase,) if base is unittest.TestCase else (_MultiProcessTestCaseBase, base)
    return type(
        "MultiProcessTestCase",
        bases,
        {
            "__module__": __name__,
            "__qualname__": "MultiProcessTestCase",
            "__doc__": "Each test runs in ``world_size`` ranks forked from fastspawn's zygote; "
            "the parent joins them (a drop-in for torch's MultiProcessTestCase).",
        },
    )


def __getattr__(name: str) -> Any:
    if name != "MultiProcessTestCase":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _build_lock:
        cls = globals().get(name)
        if cls is None:
            cls = globals()[name] = _build()
    return cls


if TYPE_CHECKING:

    class MultiProcessTestCase(_MultiProcessTestCaseBase):
        """Each test runs in ``world_size`` ranks; the parent joins them."""
