"""Run the same scenarios through torch.multiprocessing and fastspawn, compare what users see.

Compared: exception class, message (pids, addresses and the library's own wrapper frame
normalised), error_index, exit_code, signal_name, warnings (category, text, attributed
file), log records (level, text with pids normalised), join() results, and what the
children reported. Child bodies live in ``_workers``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as torch_mp  # noqa: E402

import _workers as w  # noqa: E402
import fastspawn  # noqa: E402

METHODS = ["spawn", "fork", "forkserver"]
LIBRARIES = {
    "torch": (torch_mp, "torch.multiprocessing.spawn"),
    "fastspawn": (fastspawn, "fastspawn._api"),
}

# The one frame that necessarily differs: the library's wrapper that calls fn(i, *args).
_WRAPPER_FRAME = re.compile(
    r'  File "[^"\n]*(?:torch/multiprocessing/spawn\.py|fastspawn/_child\.py)", line \d+, in \w+\n'
)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _normalise(text, pids):
    for pid in sorted({p for p in pids if isinstance(p, int) and p > 0}, key=lambda p: -len(str(p))):
        text = re.sub(rf"\b{pid}\b", "<pid>", text)
    text = re.sub(r"0x[0-9a-fA-F]+", "0x<addr>", text)
    return _WRAPPER_FRAME.sub('  File "<wrapper>", line <n>, in <wrapper>\n', text)


def observe(library, scenario, method):
    """Run ``scenario(api, method, seen)`` against one library; return what a user sees."""
    api, logger_name = LIBRARIES[library]
    logger = logging.getLogger(logger_name)
    handler = _Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    seen = {"pids": [], "result": None}
    outcome = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                seen["result"] = scenario(api, method, seen)
            except Exception as exc:  # noqa: BLE001 - the point is to look at it
                pids = seen["pids"] + [getattr(exc, "error_pid", None)]
                assert isinstance(getattr(exc, "error_pid", None), int)
                assert exc.error_pid not in (0, os.getpid())
                outcome["exception"] = {
                    "class": type(exc).__name__,
                    "mro": [c.__name__ for c in type(exc).__mro__[:-2]],
                    "str": _normalise(str(exc), pids),
                    "error_index": exc.error_index,
                    "exit_code": getattr(exc, "exit_code", "<none>"),
                    "signal_name": getattr(exc, "signal_name", "<none>"),
                }
                seen["pids"].append(exc.error_pid)
            else:
                outcome["exception"] = None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    outcome["result"] = seen["result"]
    outcome["warnings"] = [
        (wm.category.__name__, str(wm.message), wm.filename == __file__) for wm in caught
    ]
    outcome["logs"] = [
        (r.levelname, _normalise(r.getMessage(), list(seen["pids"]) + [a for a in (r.args or ()) if isinstance(a, int)]))
        for r in handler.records
    ]
    return outcome


def compare(scenario, method):
    ours = observe("fastspawn", scenario, method)
    theirs = observe("torch", scenario, method)
    assert ours == theirs
    return theirs


# --------------------------------------------------------------------------- scenarios
def _success(api, method, seen):
    queue = multiprocessing.get_context(method).SimpleQueue()
    returned = api.start_processes(w.put_rank, (queue,), nprocs=2, start_method=method)
    return {"returned": returned, "ranks": sorted(queue.get() for _ in range(2))}


def _raise_in_rank_1(api, method, seen):
    api.start_processes(w.raise_in_rank_others_sleep, (1,), nprocs=2, start_method=method)


def _exit_code_123(api, method, seen):
    api.start_processes(w.exit_in_rank, (0, 123, "sys.exit"), nprocs=2, start_method=method)


def _sigabrt(api, method, seen):
    api.start_processes(w.abort_in_rank, (0,), nprocs=2, start_method=method)


def _join_timeout_on_sleeping_child(api, method, seen):
    ctx = api.start_processes(w.sleep_forever, (), nprocs=1, join=False, start_method=method)
    seen["pids"].extend(ctx.pids())
    first = ctx.join(timeout=0.01)
    alive = ctx.processes[0].is_alive()
    ctx.processes[0].terminate()
    ctx.processes[0].join()
    seen["result"] = {
        "first_join": first,
        "alive_after_first_join": alive,
        "exitcode": ctx.processes[0].exitcode,
    }
    ctx.join()  # raises: the child was terminated
    return seen["result"]


def _peer_ignores_sigterm(api, method, seen):
    """Rank 0 fails while rank 1 ignores SIGTERM: SIGTERM, the grace, then SIGKILL."""
    ready = multiprocessing.get_context(method).Event()
    ctx = api.start_processes(w.fail_while_peer_resists_sigterm, (ready, "ignore"), nprocs=2, join=False,
                              start_method=method)
    seen["pids"].extend(ctx.pids())
    try:
        ctx.join(grace_period=0.2)
    finally:
        seen["result"] = {"exitcodes": [p.exitcode for p in ctx.processes]}
    return seen["result"]


def _join_again_after_a_failure(api, method, seen):
    """After join() raised, later joins report the remaining failures, then True."""
    ctx = api.start_processes(w.raise_in_rank_others_sleep, (1,), nprocs=2, join=False, start_method=method)
    seen["pids"].extend(ctx.pids())
    answers = []
    for _ in range(3):
        try:
            answers.append(ctx.join())
        except Exception as exc:  # noqa: BLE001
            answers.append((type(exc).__name__, exc.error_index, getattr(exc, "signal_name", "<none>")))
    return {"answers": answers, "exitcodes": [p.exitcode for p in ctx.processes]}


def _spawn_with_fork_start_method(api, method, seen):
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    returned = api.spawn(w.report_name, (queue,), nprocs=2, start_method="fork")
    names = sorted(re.sub(r"\d+", "<n>", queue.get()) for _ in range(2))
    return {"returned": returned, "names": names}


def _parallel_start(api, method, seen):
    old = os.environ.get("TORCH_MP_PARALLEL_START")
    os.environ["TORCH_MP_PARALLEL_START"] = "1"
    try:
        return _success(api, method, seen)
    finally:
        if old is None:
            del os.environ["TORCH_MP_PARALLEL_START"]
        else:
            os.environ["TORCH_MP_PARALLEL_START"] = old


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", METHODS)
def test_success(method):
    seen = compare(_success, method)
    assert seen["exception"] is None
    assert seen["result"] == {"returned": None, "ranks": [0, 1]}
    assert seen["warnings"] == [] and seen["logs"] == []


@pytest.mark.parametrize("method", METHODS)
def test_raising_rank_1(method):
    seen = compare(_raise_in_rank_1, method)
    exc = seen["exception"]
    assert exc["class"] == "ProcessRaisedException" and exc["error_index"] == 1
    assert exc["str"].startswith("\n\n-- Process 1 terminated with the following error:\nTraceback")
    assert exc["str"].endswith("\nValueError: legitimate exception from process 1\n")
    assert seen["logs"] == [("WARNING", "Terminating process <pid> via signal SIGTERM")]


@pytest.mark.parametrize("method", METHODS)
def test_exit_code_123(method):
    seen = compare(_exit_code_123, method)
    exc = seen["exception"]
    assert exc["class"] == "ProcessExitedException"
    assert exc["str"] == "process 0 terminated with exit code 123"
    assert (exc["error_index"], exc["exit_code"], exc["signal_name"]) == (0, 123, None)
    assert seen["logs"] == [("WARNING", "Terminating process <pid> via signal SIGTERM")]


@pytest.mark.parametrize("method", METHODS)
def test_sigabrt(method):
    seen = compare(_sigabrt, method)
    exc = seen["exception"]
    assert exc["class"] == "ProcessExitedException"
    assert exc["str"] == "process 0 terminated with signal SIGABRT"
    assert (exc["error_index"], exc["exit_code"], exc["signal_name"]) == (0, -6, "SIGABRT")
    assert seen["logs"] == [("WARNING", "Terminating process <pid> via signal SIGTERM")]


@pytest.mark.parametrize("method", METHODS)
def test_join_again_after_a_failure(method):
    seen = compare(_join_again_after_a_failure, method)
    assert seen["exception"] is None
    assert seen["result"] == {
        "answers": [
            ("ProcessRaisedException", 1, "<none>"),
            ("ProcessExitedException", 0, "SIGTERM"),
            True,
        ],
        "exitcodes": [-15, 1],
    }
    assert seen["logs"] == [("WARNING", "Terminating process <pid> via signal SIGTERM")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_shut_down_logs_sigterm_then_sigkill_as_torch(method):
    """The stop after a failure logs exactly torch's records, SIGKILL one included."""
    seen = compare(_peer_ignores_sigterm, method)
    assert seen["exception"]["str"] == "process 0 terminated with exit code 1"
    assert seen["result"] == {"exitcodes": [1, -9]}
    assert seen["logs"] == [
        ("WARNING", "Terminating process <pid> via signal SIGTERM"),
        ("WARNING", "Unable to shutdown process <pid> via SIGTERM , forcefully exiting via SIGKILL"),
    ]


def test_spawn_start_method_fork_warning():
    seen = compare(_spawn_with_fork_start_method, "spawn")
    assert seen["exception"] is None
    assert seen["result"] == {"returned": None, "names": ["SpawnProcess-<n>", "SpawnProcess-<n>"]}
    assert seen["warnings"] == [
        (
            "FutureWarning",
            "This method only supports start_method=spawn (got: fork).\n"
            "To use a different start_method use:\n\t\t"
            " torch.multiprocessing.start_processes(...)",
            True,
        )
    ]


@pytest.mark.parametrize("method", METHODS)
def test_join_false_then_join_timeout_on_sleeping_child(method):
    seen = compare(_join_timeout_on_sleeping_child, method)
    assert seen["result"] == {"first_join": False, "alive_after_first_join": True, "exitcode": -15}
    exc = seen["exception"]
    assert exc["class"] == "ProcessExitedException"
    assert exc["str"] == "process 0 terminated with signal SIGTERM"
    assert (exc["error_index"], exc["exit_code"], exc["signal_name"]) == (0, -15, "SIGTERM")
    assert seen["logs"] == []


def test_parallel_start_forkserver():
    seen = compare(_parallel_start, "forkserver")
    assert seen["exception"] is None
    assert seen["result"] == {"returned": None, "ranks": [0, 1]}
    assert seen["logs"] == [("INFO", "Starting processes in parallel.")]


def test_exception_classes_mirror_torch():
    torch_spawn = sys.modules["torch.multiprocessing.spawn"]
    for name in ("ProcessException", "ProcessRaisedException", "ProcessExitedException"):
        ours, theirs = getattr(fastspawn, name), getattr(torch_spawn, name)
        assert [c.__name__ for c in ours.__mro__] == [c.__name__ for c in theirs.__mro__]
        assert ours.__slots__ == theirs.__slots__
