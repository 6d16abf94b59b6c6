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

``MultiProcContinuousTest`` is the drop-in for torch's class of the same name: the ranks
and their process group are started once per class (at its first test) and run every test
of the class, each test's outcome sent back to the parent. Same attributes and hooks
(``world_size``, ``rank``, ``backend_str()``, ``device_type()``, ``opts()``, ``_init_pg``,
``timeout``, ``rdvz_file``, ``pg``, the ``TEST_SKIPS`` exit codes). Where torch skips the
rest of the class after a failure or a timeout, this one fails that test (at a timeout
with every rank's stack), stops the ranks and starts new ones for the next test; a rank
that dies fails the test it was running, the same way.

Both classes are built on first access: their base is torch's own test ``TestCase``
(``torch.testing._internal.common_utils.TestCase``: tensor-aware ``assertEqual`` and the
rest) when torch is installed, ``unittest.TestCase`` otherwise. Importing this module does
not import torch.
"""

from __future__ import annotations

import faulthandler
import inspect
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import unittest
import warnings
import weakref
from datetime import timedelta
from functools import wraps
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

__all__ = [
    "DEFAULT_WORLD_SIZE",
    "MultiProcContinuousTest",
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
    """The timeout in seconds of the test ``test_id`` (``module.Class.test_name``): its
    entry in our ``TIMEOUT_OVERRIDE``, else in torch's if torch's test utilities are
    loaded (a torch-style suite sets that one), else ``TIMEOUT_DEFAULT``."""
    name = test_id.split(".")[-1]
    if name in TIMEOUT_OVERRIDE:
        return TIMEOUT_OVERRIDE[name]
    torch_distributed = sys.modules.get("torch.testing._internal.common_distributed")
    overrides = getattr(torch_distributed, "TIMEOUT_OVERRIDE", {})
    return float(overrides.get(name, TIMEOUT_DEFAULT))


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
    _seed_rank()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch._C._set_print_stack_traces_on_fatal_signal(True)
        os.environ["TORCH_SHOW_CPP_STACKTRACES"] = "1"


def _seed_rank() -> None:
    """The same seeds in every rank: torch's test utilities' when they are loaded."""
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


def _destroy_process_group() -> None:
    """Destroy the default process group the test left, if torch.distributed has one."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available():
        return
    try:
        distributed.destroy_process_group()
    except (AssertionError, ValueError):  # none left, or the test destroyed it already
        pass


# ----------------------------------------------------- both classes' test methods
def _parent_or_rank(case: Any, fn: Callable[[], Any], in_parent: Callable[[], None]) -> Callable[[], Any]:
    """``fn`` as a test method of ``case``: in the parent (rank ``MAIN_PROCESS_RANK``)
    ``in_parent()`` runs instead (it waits for the ranks), in a rank ``fn`` itself."""

    @wraps(fn)
    def wrapper(self: Any) -> None:
        if self.rank == self.MAIN_PROCESS_RANK:
            in_parent()
        else:
            fn()

    return types.MethodType(wrapper, case)


def _test_method_name(method_name: str, methodName: str) -> str:
    """torch's classes take the test's name positionally (``method_name``) and as
    unittest's keyword (``methodName``)."""
    return methodName if methodName != "runTest" else method_name


def _wrap_test_method(
    case: unittest.TestCase, method_name: str, methodName: str, wrap: Callable[[Callable[[], Any]], Any]
) -> None:
    """Replace the test method ``method_name`` of ``case`` by ``wrap(method)``; a missing
    method is an error only when named explicitly (``methodName``)."""
    try:
        fn = getattr(case, method_name)
    except AttributeError as exc:
        if methodName != "runTest":
            raise ValueError(f"no such test method in {case.__class__}: {methodName}") from exc
    else:
        setattr(case, method_name, wrap(fn))


class _Entry:
    """What each rank of a test class runs (subclasses say what).

    Its ``__module__`` is the test class's module, because fastspawn's zygote imports the
    module of the function it starts: so the test module (and torch with it) is imported
    once in the zygote, and each rank is only a fork.
    """

    def __init__(self, test_class: Any) -> None:
        self.test_class = test_class
        self.__module__ = test_class.__module__

    @staticmethod
    def _keep_own(rank: int, channels: Sequence[Any], stacks: Sequence[RankFile]) -> None:
        """In rank ``rank``: close the other ranks' ends, and write stacks to its own
        file at SIGTERM and fatal signals."""
        for other, (channel, stack_file) in enumerate(zip(channels, stacks)):
            if other != rank:
                channel.close()
                stack_file.close()
        stacks[rank].dump_stacks_on_signals()


class _RankEntry(_Entry):
    """``test_class._run(rank, ...)`` (a MultiProcessTestCase test) with its own channels."""

    def __call__(
        self,
        rank: int,
        test_name: str,
        file_name: str,
        messages: Sequence[RankFile],
        stacks: Sequence[RankFile],
        kwargs: Dict[str, Any],
    ) -> None:
        self._keep_own(rank, messages, stacks)
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
        return _parent_or_rank(self, fn, lambda: self._join_processes(fn))

    def __init__(self, method_name: str = "runTest", methodName: str = "runTest") -> None:
        method_name = _test_method_name(method_name, methodName)
        super().__init__(method_name)
        _wrap_test_method(self, method_name, methodName, self.join_or_run)

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


# ------------------------------------------------------- ranks kept across a class
class _RankChannel:
    """A rank's end of its socket to the parent, with the two calls the rank's loop makes:
    ``get()`` the next test id (None: exit), ``put(result)``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get(self) -> Optional[str]:
        """The next test id the parent dispatched; None (also when the parent is gone)."""
        try:
            task: Optional[str] = self.connection.recv()
        except (EOFError, OSError):
            return None
        return task

    def put(self, result: Tuple[str, str, str]) -> None:
        """Send ``(test id, "ok" | "skip" | "error", text)`` to the parent."""
        self.connection.send(result)


class _ContinuousEntry(_Entry):
    """The ranks of a :class:`MultiProcContinuousTest` class: its ``_worker_loop`` over
    each rank's own channel."""

    def __call__(
        self,
        rank: int,
        world_size: int,
        rdvz_file: str,
        channels: Sequence[Connection],
        stacks: Sequence[RankFile],
    ) -> None:
        self._keep_own(rank, channels, stacks)
        queue = _RankChannel(channels[rank])
        self.test_class._worker_loop(rank, world_size, rdvz_file, queue, queue)


def _remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class _MultiProcContinuousTestBase(unittest.TestCase):
    """The logic of :class:`MultiProcContinuousTest` (which adds torch's TestCase as a base).

    Parent side, per class: ``world_size`` ranks started at the first test, each holding a
    socket to the parent (test ids down, one result per test up) and a memory file for its
    stacks. Rank side: ``_worker_loop`` creates the process group, then runs the tests it is
    sent until told to exit.
    """

    MAIN_PROCESS_RANK = -1
    # Ranks per class; -2: one per device of ``device_type()``. A property works too.
    world_size: int = -2
    # In a rank, its rank; -2 until set.
    rank: int = -2
    # The rendezvous file of the current ranks (a new one each time ranks start).
    rdvz_file: Optional[str] = None
    # The process group's timeout.
    timeout: timedelta = timedelta(seconds=120)
    # torch skips the rest of the class after a failure; fastspawn replaces the ranks
    # instead, and never sets it.
    poison_pill: bool = False
    # Seconds a rank gets after SIGTERM (at a test's timeout, or at tearDownClass) before
    # SIGKILL.
    kill_grace_period: float = 3.0
    # Seconds tearDownClass waits for the ranks to destroy their process group and exit.
    shutdown_timeout: float = 30.0

    pg: Any  # in a rank: the default process group, set by _init_pg
    processes: List[Any]
    _processes_spawned: bool = False
    _ranks: Optional[Any] = None  # the running ranks (fastspawn._api._Run)
    _channels: List[Connection] = []
    _stack_files: Optional[RankFiles] = None
    _rdvz_dir: Optional[str] = None  # where the rendezvous files go; removed at tearDownClass
    _rdvz_cleanup: Optional[Any] = None  # weakref.finalize removing it (at exit at the latest)
    _generation: int = 0

    # ------------------------------------------------------------ overridable hooks
    @classmethod
    def backend_str(cls) -> Optional[str]:
        """The process group's backend (e.g. "gloo", "nccl"); None lets torch choose."""
        return None

    @classmethod
    def device_type(cls) -> str:
        """The device the tests use: the current accelerator's type, else "cpu"."""
        try:
            import torch
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            return "cpu"  # without torch, a class whose _init_pg needs none still runs
        accelerator = torch.accelerator.current_accelerator()
        return "cpu" if accelerator is None else str(accelerator.type)

    @classmethod
    def opts(cls, high_priority_stream: bool = False) -> Any:
        """Backend options passed to ``init_process_group`` (``pg_options``); None here."""
        return None

    @classmethod
    def _init_pg(cls, rank: int, world_size: int, rdvz_file: Optional[str]) -> None:
        """In a rank, once per rank set: create the default process group on a FileStore
        at ``rdvz_file`` and keep it as ``cls.pg``."""
        from torch import distributed as c10d
        from torch._C._distributed_c10d import FileStore

        if rdvz_file is None:
            raise AssertionError("Expected rdvz_file to not be None")
        os.environ["LOCAL_RANK"] = str(rank)  # as torchrun would, for device meshes
        c10d.init_process_group(
            backend=cls.backend_str(),
            store=FileStore(rdvz_file, world_size),
            rank=rank,
            world_size=world_size,
            timeout=cls.timeout,
            pg_options=cls.opts(),
        )
        cls.pg = c10d.distributed_c10d._get_default_group()

    # ---------------------------------------------------------------- rank side
    @classmethod
    def _run_test_given_id(cls, test_id: str, **kwargs: Any) -> None:
        """In a rank: run the test ``test_id`` (``module.Class.test_name``) as this rank."""
        test_name = test_id.rsplit(".", 1)[-1]
        self = cls(test_name)
        self.rank = cls.rank
        self.world_size = cls.world_size
        method = getattr(self, test_name)
        _seed_rank()
        method(**kwargs)

    @classmethod
    def _skip_reason(cls, exc: BaseException) -> Optional[str]:
        """The skip ``exc`` means in a rank: a SystemExit with a TEST_SKIPS code, or a
        unittest/pytest skip; None for anything else."""
        if isinstance(exc, SystemExit):
            skip = _skip_codes().get(exc.code) if isinstance(exc.code, int) else None
            return None if skip is None else str(skip.message)
        if isinstance(exc, _skip_exceptions()):
            return str(exc)
        return None

    @classmethod
    def _worker_loop(
        cls, rank: int, world_size: int, rdvz_file: Optional[str], task_queue: Any, completion_queue: Any
    ) -> None:
        """In a rank: create the process group, then run each test id ``task_queue.get()``
        gives, and ``completion_queue.put`` its outcome, until it gives None."""
        if not 0 <= rank < world_size:
            raise AssertionError(f"Expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        cls.rank = rank
        cls.world_size = world_size
        init_skip: Optional[str] = None
        try:
            cls._init_pg(rank, world_size, rdvz_file)
        except SystemExit as exc:
            init_skip = cls._skip_reason(exc)
            if init_skip is None:
                raise
        logger.debug("Rank %s ready", rank)
        failed = False
        while True:
            test_id = task_queue.get()
            if test_id is None:
                break
            if init_skip is not None:
                completion_queue.put((test_id, "skip", init_skip))
                continue
            try:
                cls._run_test_given_id(test_id)
            except BaseException as exc:
                reason = cls._skip_reason(exc)
                if reason is not None:
                    logger.info("Process %s skipping test %s for following reason: %s", rank, test_id, reason)
                    completion_queue.put((test_id, "skip", reason))
                    continue
                failed = True
                completion_queue.put((test_id, "error", traceback.format_exc()))
            else:
                completion_queue.put((test_id, "ok", ""))
        logger.debug("Rank %s exiting", rank)
        if not failed:  # after a failure, a collective may still wait for this rank
            _destroy_process_group()

    # -------------------------------------------------------------- parent: ranks
    @classmethod
    def _get_world_size(cls, device_type: str) -> int:
        """``world_size`` (a class attribute or a property); -2 means one rank per device
        of ``device_type``, and the class is skipped when there is none."""
        declared = inspect.getattr_static(cls, "world_size", None)
        if isinstance(declared, property) and declared.fget is not None:
            world_size = int(declared.fget(object.__new__(cls)))
        else:
            world_size = int(cls.world_size)
        if world_size == -2:
            import torch

            world_size = int(torch.get_device_module(device_type).device_count())
            if world_size == 0:
                raise unittest.SkipTest(f"No {device_type} devices available")
        return world_size

    @classmethod
    def _resolve_device_type(cls) -> str:
        """``device_type``: a classmethod (the default), a property, a plain function or a
        string attribute (as ``instantiate_device_type_tests`` sets it)."""
        declared = cls.__dict__.get("device_type", cls.device_type)
        if isinstance(declared, classmethod):
            return str(declared.__func__(cls))
        if isinstance(declared, property) and declared.fget is not None:
            return str(declared.fget(cls))
        if callable(declared):
            return str(declared())
        return str(declared)

    @classmethod
    def _ensure_processes_spawned(cls) -> None:
        """Start the ranks if none are running (at the class's first test, and after a
        test that failed, timed out or lost a rank)."""
        run = cls._ranks
        if cls._processes_spawned and run is not None:
            run.poll()
            if not run.exit_order:
                return
            logger.warning(
                "Process %s of %s exited between tests (exit code %s); starting new ranks",
                run.exit_order[0],
                cls.__name__,
                run.exitcodes[run.exit_order[0]],
            )
            cls._stop_processes(0.0)
        device_type = cls._resolve_device_type()
        cls.world_size = cls._get_world_size(device_type)
        backend = cls.backend_str() if callable(cls.backend_str) else cls.backend_str
        if backend is not None:
            import torch.distributed as c10d

            available = {
                "nccl": c10d.is_nccl_available,
                "gloo": c10d.is_gloo_available,
                "mpi": c10d.is_mpi_available,
                "xccl": c10d.is_xccl_available,
            }.get(backend)
            if available is not None and not available():
                raise unittest.SkipTest(f"Backend '{backend}' is not available")
        logger.info("Testing class %s on %s %s", cls.__name__, cls.world_size, device_type)
        cls._spawn_processes(cls.world_size)
        cls._processes_spawned = True

    @classmethod
    def _spawn_processes(cls, world_size: int) -> None:
        """Start ``world_size`` ranks forked from the zygote, on a new rendezvous file."""
        from . import _api

        nprocs = int(world_size)
        if cls._rdvz_dir is None:
            cls._rdvz_dir = tempfile.mkdtemp(prefix="fastspawn-continuous-")
            cls._rdvz_cleanup = weakref.finalize(cls, _remove_directory, cls._rdvz_dir)
        cls._generation += 1
        cls.rdvz_file = os.path.join(cls._rdvz_dir, f"rendezvous-{cls._generation}")
        cls._close_stack_files()
        pairs = [multiprocessing.Pipe(duplex=True) for _ in range(nprocs)]
        cls._stack_files = RankFiles(nprocs, "stacks")
        try:
            context = _api.start_processes(
                _ContinuousEntry(cls),
                args=(nprocs, cls.rdvz_file, [rank_end for _, rank_end in pairs], cls._stack_files.for_ranks()),
                nprocs=nprocs,
                join=False,
                daemon=True,  # stopped at interpreter exit if tearDownClass never ran
                start_method="spawn",
            )
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            cls._stack_files.close()
            raise
        finally:
            for _, rank_end in pairs:
                rank_end.close()
        assert context is not None
        cls._ranks = context._run
        cls._channels = [ours for ours, _ in pairs]
        cls.processes = list(context.processes)
        for rank, process in enumerate(cls.processes):
            logger.debug("Started process %s with pid %s", rank, process.pid)

    @classmethod
    def _stop_processes(cls, grace: float) -> None:
        """Stop the ranks (see :func:`stop_ranks`) and free their channels; the next test
        starts new ones. The stacks file stays readable until the next start."""
        run, cls._ranks = cls._ranks, None
        cls._processes_spawned = False
        if run is not None:
            killed, unstoppable = stop_ranks(run, grace)
            for rank in killed if grace > 0 else ():
                logger.warning(
                    "Process %s of %s did not exit within %s seconds of SIGTERM; it got SIGKILL",
                    rank,
                    cls.__name__,
                    grace,
                )
            for rank in unstoppable:
                logger.warning("Process %s of %s could not be stopped; fastspawn reaps it when it exits", rank, cls.__name__)
        channels, cls._channels = cls._channels, []
        for channel in channels:
            channel.close()

    @classmethod
    def _close_stack_files(cls) -> None:
        stack_files, cls._stack_files = cls._stack_files, None
        if stack_files is not None:
            stack_files.close()

    @classmethod
    def setUpClass(cls) -> None:
        """The ranks start at the first test, not here (as torch's: a class whose tests
        are all skipped starts none)."""
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        """Tell the ranks to exit, wait at most ``shutdown_timeout`` seconds, stop those
        left, and remove the rendezvous directory."""
        try:
            run = cls._ranks
            if run is not None:
                for channel in cls._channels:
                    try:
                        channel.send(None)
                    except OSError:
                        pass  # that rank is gone already
                run.wait_all(cls.shutdown_timeout)
                cls._stop_processes(cls.kill_grace_period)
            cls._close_stack_files()
            cleanup, cls._rdvz_cleanup, cls._rdvz_dir = cls._rdvz_cleanup, None, None
            if cleanup is not None:
                cleanup()
        finally:
            logger.info("Class %s finished", cls.__name__)
            super().tearDownClass()

    # -------------------------------------------------------------- parent: tests
    def __init__(self, method_name: str = "runTest", methodName: str = "runTest") -> None:
        method_name = _test_method_name(method_name, methodName)
        super().__init__(method_name)
        _wrap_test_method(self, method_name, methodName, self._worker_run_main_wait)

    def setUp(self) -> None:
        """Start the ranks if needed, and send them this test."""
        super().setUp()
        cls = type(self)
        cls._ensure_processes_spawned()
        self.rank = self.MAIN_PROCESS_RANK
        for channel in cls._channels:
            try:
                channel.send(self.id())
            except OSError:
                pass  # that rank died: the test's wait reports it

    def _worker_run_main_wait(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """The test method as run: the parent waits for every rank's outcome of this test,
        each rank runs ``fn``."""
        return _parent_or_rank(self, fn, self._wait_for_ranks)

    def _wait_for_ranks(self) -> None:
        """In the parent: collect each rank's outcome of this test, at most ``get_timeout``
        seconds; raise the failure, skip or timeout. After a failure, a timeout or a rank's
        death, the ranks are stopped and the next test starts new ones."""
        cls = type(self)
        run = cls._ranks
        if run is None:
            raise RuntimeError(f"no ranks are running for {self.id()}")
        test_id = self.id()
        timeout = get_timeout(test_id)
        start = time.monotonic()
        outcomes: Dict[int, Tuple[str, str]] = {}
        closed: List[int] = []
        while True:
            for rank, channel in enumerate(cls._channels):
                if rank not in outcomes and rank not in closed:
                    try:
                        received = self._receive(channel, test_id)
                    except (EOFError, OSError):  # the rank is exiting: its exit follows
                        closed.append(rank)
                    else:
                        if received is not None:
                            outcomes[rank] = received
            errors = sorted(rank for rank, (kind, _) in outcomes.items() if kind == "error")
            run.poll()
            if run.exit_order:  # the cause, also of errors it made in other ranks
                self._fail_rank_death(run, test_id, outcomes, list(run.exit_order))
            left = start + timeout - time.monotonic()
            if closed and left > 0:  # a rank is exiting: wait for its exit, then report it
                run.wait_any(left, len(run.exit_order))
                continue
            if errors or len(outcomes) == len(cls._channels):
                break
            if left <= 0:
                self._fail_timeout(time.monotonic() - start, outcomes)
            watch = [c.fileno() for r, c in enumerate(cls._channels) if r not in outcomes and r not in closed]
            run.wait_any(left, len(run.exit_order), watch=watch)
        if errors:
            logger.warning(
                "Detected failure from Rank %s in: %s, starting new ranks for the rest of %s",
                errors[0],
                test_id,
                cls.__name__,
            )
            cls._stop_processes(0.0)
            # A rank that was exiting by itself meanwhile (its exit not seen yet, its death
            # maybe the cause of the error: a peer's collective fails) is that failure.
            dead = [rank for rank in run.exit_order if rank not in outcomes and run.exitcodes[rank] != -signal.SIGKILL]
            if dead:
                self._fail_rank_death(run, test_id, outcomes, dead)
            text = "".join(
                ("" if i == 0 else f"\n-- and in process {rank}:\n") + outcomes[rank][1]
                for i, rank in enumerate(errors)
            )
            raise RuntimeError(f"Exception in worker process:\n{text}")
        skips = [outcomes[rank][1] for rank in sorted(outcomes) if outcomes[rank][0] == "skip"]
        if skips:
            raise unittest.SkipTest(skips[0])

    @staticmethod
    def _receive(channel: Connection, test_id: str) -> Optional[Tuple[str, str]]:
        """What a rank sent about ``test_id`` so far, ``(kind, text)``, or None (without
        waiting); EOFError once the rank's end is closed. Outcomes of earlier tests whose
        wait never ran (a setUp override that raised after dispatching) are dropped."""
        while channel.poll(0):  # something is readable: a whole message is being sent
            sent_id, kind, text = channel.recv()
            if sent_id == test_id:
                return kind, text
        return None

    def _fail_rank_death(
        self, run: Any, test_id: str, outcomes: Dict[int, Tuple[str, str]], dead: List[int]
    ) -> None:
        """Ranks ``dead`` exited during the test: fail it (exit code, stack at a fatal
        signal, the rank's traceback if it raised), after stopping the others."""
        from . import _payload

        cls = type(self)
        stack_files = cls._stack_files
        cls._stop_processes(0.0)
        message = ""
        for rank in dead:
            code = run.exitcodes[rank]
            message += f"Process {rank} exited with code {code} during {test_id}"
            if isinstance(code, int) and code < 0:
                stacks = stack_files.text(rank) if stack_files is not None else ""
                message += f", killed by signal {-code}" + (f", in:\n{stacks}" if stacks else "")
            record = _payload.decode(run.outputs[rank])
            if record is not None and record.kind == "error" and record.traceback:
                message += f"\n{record.traceback}"
            message += "\n"
        for rank in sorted(set(range(len(run.exitcodes))) - set(dead)):
            kind, text = outcomes.get(rank, ("", ""))
            if kind == "error":
                message += f"Process {rank} failed meanwhile:\n{text}\n"
            else:
                message += f"Process {rank} {'had finished the test' if kind else 'was stopped'}\n"
        raise RuntimeError(message.rstrip("\n"))

    def _fail_timeout(self, elapsed: float, outcomes: Dict[int, Tuple[str, str]]) -> None:
        """The test's timeout passed: stop the ranks (SIGTERM first: each writes its
        stacks), fail with every rank's stack."""
        cls = type(self)
        nprocs = len(cls._channels)
        logger.error("Timing out after %s seconds and killing subprocesses.", elapsed)
        cls._stop_processes(cls.kill_grace_period)
        stack_files = cls._stack_files
        pending = [rank for rank in range(nprocs) if rank not in outcomes]
        message = f"Process {pending[0]} timed out after {elapsed:.1f}s running {self.id()}"
        for rank in range(nprocs):
            stacks = (stack_files.text(rank) if stack_files is not None else "") or "(no stack received)"
            state = "was running at the timeout" if rank in pending else "had finished the test"
            message += f"\n\n-- Process {rank} {state}, in:\n{stacks}"
        raise RuntimeError(message)


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
            "its test classes are based on unittest.TestCase",
            RuntimeWarning,
            stacklevel=3,
        )
        return unittest.TestCase
    return TestCase


# The classes built on first access: name -> (logic base, docstring).
_BUILT: Dict[str, Tuple[type, str]] = {
    "MultiProcessTestCase": (
        _MultiProcessTestCaseBase,
        "Each test runs in ``world_size`` ranks forked from fastspawn's zygote; "
        "the parent joins them (a drop-in for torch's MultiProcessTestCase).",
    ),
    "MultiProcContinuousTest": (
        _MultiProcContinuousTestBase,
        "The ranks and their process group are started once per class (forked from "
        "fastspawn's zygote) and run every test of the class; after a failure, a timeout or "
        "a rank's death they are replaced (a drop-in for torch's MultiProcContinuousTest).",
    ),
}


def _build(name: str) -> type:
    logic, doc = _BUILT[name]
    base = _test_case_base()
    bases = (logic,) if base is unittest.TestCase else (logic, base)
    return type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc})


def __getattr__(name: str) -> Any:
    if name not in _BUILT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _build_lock:
        cls = globals().get(name)
        if cls is None:
            cls = globals()[name] = _build(name)
    return cls


if TYPE_CHECKING:

    class MultiProcessTestCase(_MultiProcessTestCaseBase):
        """Each test runs in ``world_size`` ranks; the parent joins them."""

    class MultiProcContinuousTest(_MultiProcContinuousTestBase):
        """Ranks and process group started once per class; each test runs in every rank."""
