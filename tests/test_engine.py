"""Engine-level behaviour of fastspawn: process lifetime, cleanup, leaks, signals.

These tests look at what the engine promises beyond the torch API: no process outlives
its owner, nothing is left behind (processes, zombies, fds, temp files), results of
any size come back, Ctrl-C ends everything, and the thread-watcher fallback behaves
like the pidfd path. Child functions live in ``_engine_workers`` (cheap to import).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from multiprocessing import resource_tracker

import psutil
import pytest

import _engine_workers as w
import fastspawn
from fastspawn import ProcessExitedException, ProcessRaisedException, _core

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

ALL_METHODS = ["spawn", "fork", "forkserver"]
methods = pytest.mark.parametrize("method", ALL_METHODS)
exec_methods = pytest.mark.parametrize("method", ["spawn", "forkserver"])
watch_modes = pytest.mark.parametrize("watch", ["pidfd", "thread"])

# Bounded waits. They only matter when something is broken; a passing run never waits
# for them to expire.
GONE_DEADLINE = 20.0  # for an external process to disappear
REPORT_TIMEOUT = 60.0  # for a child's report on a queue / a driver's line of output


# --------------------------------------------------------------------------- helpers
def children_now() -> set:
    """Pids of our direct children, zombies included."""
    return {c.pid for c in psutil.Process().children()}


def open_fds() -> set:
    """The fds open in this process (without the one used to list them)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # listdir's own descriptor, closed by now
        fds.add(fd)
    return fds


def is_gone(proc: psutil.Process) -> bool:
    """True once ``proc`` has ended: no such process, or a zombie someone else must reap.

    A zombie that is *our* child is not gone: we failed to reap it.
    """
    try:
        if not proc.is_running():  # also False if the pid was reused
            return True
        if proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid():
            return True
    except psutil.NoSuchProcess:
        return True
    return False


def wait_gone(procs, deadline: float = GONE_DEADLINE) -> list:
    """Polls until every process in ``procs`` is gone; returns those still there."""
    end = time.monotonic() + deadline
    left = list(procs)
    while left:
        left = [p for p in left if not is_gone(p)]
        if not left or time.monotonic() > end:
            break
        time.sleep(0.05)
    return left


def describe(procs) -> list:
    out = []
    for p in procs:
        try:
            out.append((p.pid, p.status(), p.ppid(), p.cmdline()))
        except psutil.Error as exc:
            out.append((p.pid, repr(exc)))
    return out


def assert_all_gone(procs, deadline: float = GONE_DEADLINE) -> None:
    left = wait_gone(procs, deadline)
    assert not left, f"still alive after {deadline} s: {describe(left)}"


def as_procs(pids) -> list:
    """psutil handles for ``pids`` (an already vanished pid gets a dead stand-in)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass  # already gone: nothing to wait for
    return procs


def assert_reaped(pids) -> None:
    """None of ``pids`` is our child any more (neither running nor a zombie)."""
    ours = children_now()
    leftover = sorted(set(pids) & ours)
    assert not leftover, f"still our children (zombies or running): {describe(as_procs(leftover))}"
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def get_n(q, n: int, timeout: float = REPORT_TIMEOUT) -> list:
    """``n`` items from a multiprocessing queue, with one overall deadline."""
    end = time.monotonic() + timeout
    return [q.get(timeout=max(0.0, end - time.monotonic())) for _ in range(n)]


def join_all(ctx) -> None:
    while not ctx.join():
        pass


def wait_blocked_in_epoll(task_dir: str, deadline: float = REPORT_TIMEOUT, alive=lambda: True, wchan="epoll") -> None:
    """Polls /proc/.../task/TID/wchan until that thread sleeps in epoll_wait (or in ``wchan``)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end and alive():
        try:
            with open(os.path.join(task_dir, "wchan")) as f:
                if wchan in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{task_dir} never blocked in {wchan}")


class Gate:
    """What children wait on (see ``_engine_workers.wait_gate``); ``open()`` releases them."""

    def __init__(self) -> None:
        self.reader, self.writer = multiprocessing.Pipe(duplex=False)

    def open(self) -> None:
        self.writer.send_bytes(b"go")


def watch_env(monkeypatch, watch: str) -> None:
    if watch == "thread":
        monkeypatch.setenv("FASTSPAWN_PIDFD", "0")
    else:
        monkeypatch.delenv("FASTSPAWN_PIDFD", raising=False)


def watch_mode(ctx) -> str:
    return ctx.processes[0]._run.group.watch_mode


@pytest.fixture
def tracker():
    """multiprocessing's resource tracker is one of our children once any test used it.

    Start it up front so that it does not show up as a "new child" in a test.
    """
    resource_tracker.ensure_running()


@pytest.fixture
def cleanup():
    """Processes (psutil handles or Drivers) a test registers; killed at teardown if left."""
    registered = []
    yield registered
    # Leftover children and grandchildren first, then the drivers.
    for item in sorted(registered, key=lambda item: isinstance(item, Driver)):
        try:
            if isinstance(item, Driver):
                item.close()
            elif not is_gone(item):
                item.kill()
        except (psutil.Error, OSError):
            pass


class Driver:
    """A Python script run as a subprocess.

    Its stdout and stderr go to files (not pipes: children that wrongly outlive the
    driver would hold a pipe open); ``line()`` waits for the next complete stdout line.
    """

    PRELUDE = textwrap.dedent(
        """\
        import json, os, signal, sys
        sys.path.insert(0, {tests_dir!r})
        # Python ignores Ctrl-C if started with SIGINT ignored (e.g. as a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        """
    )

    def __init__(self, tmp_path, body: str, *args) -> None:
        script = tmp_path / "driver.py"
        # Guarded: spawn children import the main script again as __mp_main__.
        script.write_text(
            self.PRELUDE.format(tests_dir=TESTS_DIR)
            + "if __name__ == '__main__':\n"
            + textwrap.indent(textwrap.dedent(body), "    ")
        )
        self.stdout_path = tmp_path / "driver.stdout"
        self.stderr_path = tmp_path / "driver.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=out, stderr=err)
        self._consumed = 0  # bytes of stdout already returned by line()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _next_line(self):
        data = self.stdout_path.read_bytes()[self._consumed :]
        end = data.find(b"\n")
        if end < 0:
            return None
        self._consumed += end + 1
        return data[: end + 1].decode()

    def line(self, timeout: float = REPORT_TIMEOUT) -> str:
        """The next line the driver prints (polls its stdout file until the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            text = self._next_line()
            if text is not None:
                return text
            if exited:
                raise AssertionError(
                    f"driver ended (code {self.proc.returncode}) early; stderr:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"driver printed nothing within {timeout} s; stderr:\n{self.stderr()}")
            time.sleep(0.01)

    def wait(self, timeout: float = REPORT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"driver still running after {timeout} s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rest_of_stdout(self) -> list:
        """The lines not returned by line() yet (call once the driver has exited)."""
        lines = []
        while True:
            text = self._next_line()
            if text is None:
                return lines
            lines.append(text)

    def close(self) -> None:
        """Kill the driver if still running, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ------------------------------------------------- 1. the parent dies: nothing survives
DRIVER_HOLD = """
import multiprocessing
import fastspawn
import _engine_workers as w
method = sys.argv[1]
reports = multiprocessing.get_context(method).Queue()
ctx = fastspawn.start_processes(
    w.grandchild_then, args=(reports, "sleep"), nprocs=2, join=False, start_method=method
)
print(json.dumps([reports.get(timeout=60) for _ in range(2)]), flush=True)
while not ctx.join():
    pass
"""


@methods
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_parent_death_leaves_no_descendants(tmp_path, cleanup, method, sig):
    driver = Driver(tmp_path, DRIVER_HOLD, method)
    cleanup.append(driver)
    reports = json.loads(driver.line())
    children = as_procs(r[1] for r in reports)
    grandchildren = as_procs(r[2] for r in reports)
    cleanup.extend(children + grandchildren)
    assert len(children) == len(grandchildren) == 2
    for _rank, child, grandchild in reports:
        assert os.getpgid(child) == child
        assert os.getpgid(grandchild) == child  # the grandchild is in its parent's group

    os.kill(driver.pid, sig)
    assert driver.wait() == -sig
    assert_all_gone(children + grandchildren)


# -------------------------------------------- 2. the thread that spawned exits first
@methods
@pytest.mark.parametrize("thread_waits_for_children", [False, True], ids=["thread-exits-at-once", "thread-waits-ready"])
def test_children_survive_the_exit_of_the_spawning_thread(method, thread_waits_for_children):
    mp = multiprocessing.get_context(method)
    ready, answers, gate = mp.Queue(), mp.Queue(), Gate()
    holder: dict = {}

    def starter():
        try:
            holder["tid"] = threading.get_native_id()
            holder["ctx"] = fastspawn.start_processes(
                w.ready_then_answer,
                args=(ready, gate.reader, answers),
                nprocs=2,
                join=False,
                start_method=method,
            )
            if thread_waits_for_children:  # the parent-death handler is armed by now
                holder["ready"] = get_n(ready, 2)
        except BaseException as exc:  # reported by the main thread
            holder["error"] = exc

    thread = threading.Thread(target=starter)
    thread.start()
    thread.join()
    assert "error" not in holder, holder["error"]
    ctx = holder.pop("ctx")
    pids = ctx.pids()
    # The kernel sends PR_SET_PDEATHSIG while it releases the thread, before its
    # /proc/self/task entry goes away: once it has, the signal has been sent.
    task_dir = f"/proc/self/task/{holder['tid']}"
    end = time.monotonic() + GONE_DEADLINE
    while os.path.exists(task_dir) and time.monotonic() < end:
        time.sleep(0.01)
    assert not os.path.exists(task_dir)

    ready_reports = holder.get("ready") or get_n(ready, 2)
    assert sorted(pid for _, pid in ready_reports) == sorted(pids)
    gate.open()
    join_all(ctx)  # raises ProcessExitedException if the thread's exit killed them
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    answered = sorted(get_n(answers, 2))  # they answered after the thread was gone
    assert [(rank, pid) for rank, pid, _ in answered] == list(enumerate(pids))
    assert all(ppid == os.getpid() for _, _, ppid in answered)
    assert_reaped(pids)


# ------------------------------------ 3. a child with its own children kills itself
@methods
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_nested_children_die_with_their_parent(cleanup, method, sig):
    pids_queue = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(
        w.nested_parent, args=(pids_queue, method, sig), nprocs=1, join=False, start_method=method
    )
    grandchildren = as_procs(pids_queue.get(timeout=REPORT_TIMEOUT))
    cleanup.extend(grandchildren)
    with pytest.raises(ProcessExitedException) as info:
        join_all(ctx)
    assert info.value.exit_code == -sig
    assert info.value.signal_name == signal.Signals(sig).name
    assert_all_gone(grandchildren)
    assert_reaped(ctx.pids())


# ------------------------------------------------------------------ 4. no zombies
@methods
@watch_modes
def test_no_zombie_after_join_returns(monkeypatch, tracker, method, watch):
    watch_env(monkeypatch, watch)
    before = children_now()
    ctx = fastspawn.start_processes(w.noop, nprocs=3, join=False, start_method=method)
    assert watch_mode(ctx) == watch
    pids = ctx.pids()
    join_all(ctx)
    assert [p.exitcode for p in ctx.processes] == [0, 0, 0]
    assert_reaped(pids)
    assert not children_now() - before


@methods
def test_no_zombie_after_join_raises(tracker, method):
    before = children_now()
    mp = multiprocessing.get_context(method)
    ready, gate = mp.Queue(), Gate()
    ctx = fastspawn.start_processes(
        w.rank0_raises_others_wait, args=(ready, gate.reader, "boom"), nprocs=2, join=False, start_method=method
    )
    pids = ctx.pids()
    with pytest.raises(ProcessRaisedException, match="boom"):
        join_all(ctx)
    assert [p.exitcode for p in ctx.processes] == [1, -signal.SIGTERM]
    assert_reaped(pids)
    assert not children_now() - before


@methods
@pytest.mark.parametrize("ignore", [(), (signal.SIGTERM,)], ids=["plain", "ignores-SIGTERM"])
def test_collected_context_warns_and_reaps(tracker, method, ignore):
    before = children_now()
    ready = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(
        w.ready_then_sleep, args=(ready, ignore), nprocs=2, join=False, start_method=method
    )
    pids = ctx.pids()
    get_n(ready, 2)
    with pytest.warns(ResourceWarning, match="garbage collected"):
        del ctx
        gc.collect()
    assert_reaped(pids)
    assert not children_now() - before


DRIVER_AT_EXIT = """
import atexit

def last():
    # Registered before fastspawn is imported, so it runs after fastspawn's exit hook.
    reaped = []
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
            reaped.append(False)
        except ChildProcessError:
            reaped.append(True)
    done = [os.path.exists(os.path.join(directory, f"{i}.done")) for i in range(2)]
    print(json.dumps({"reaped": reaped, "done": done}), flush=True)

atexit.register(last)
import multiprocessing
import fastspawn
import _engine_workers as w
method, directory, daemon = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
pids = []
mp = multiprocessing.get_context(method)
ready = mp.Queue()
gate, gate_writer = multiprocessing.Pipe(duplex=False)
ctx = fastspawn.start_processes(
    w.marker_after_gate, args=(ready, gate, directory), nprocs=2, join=False,
    daemon=daemon, start_method=method,
)
pids.extend(pid for _, pid in (ready.get(timeout=60) for _ in range(2)))
print(json.dumps(pids), flush=True)
if not daemon:
    # Runs first at exit (after this, fastspawn's hook must wait for the children).
    atexit.register(gate_writer.send_bytes, b"go")
"""


@methods
@pytest.mark.parametrize("daemon", [False, True], ids=["non-daemon", "daemon"])
def test_interpreter_exit(tmp_path, cleanup, method, daemon):
    markers = tmp_path / "markers"
    markers.mkdir()
    driver = Driver(tmp_path, DRIVER_AT_EXIT, method, markers, int(daemon))
    cleanup.append(driver)
    children = as_procs(json.loads(driver.line()))
    cleanup.extend(children)
    report = json.loads(driver.line())
    assert driver.wait() == 0, driver.stderr()
    assert report["reaped"] == [True, True]
    if daemon:  # terminated at exit, never released
        assert report["done"] == [False, False]
        assert sorted(os.listdir(markers)) == []
    else:  # joined at exit: they finished before the driver's last exit hook
        assert report["done"] == [True, True]
        assert sorted(os.listdir(markers)) == ["0.done", "1.done"]
    assert_all_gone(children)


# ------------------------------------------------------- 5. no fd / temp-file leak
def test_no_fd_or_tempfile_leak_after_200_starts(tmp_path, monkeypatch, tracker):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # children inherit it
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(private_tmp)
    gc.collect()  # fds of earlier tests' garbage must not close during this one
    fds_before = open_fds()
    children_before = children_now()

    for k in range(180):
        if k % 20 == 19:  # the failure path too
            with pytest.raises(ProcessRaisedException, match="leak check"):
                fastspawn.start_processes(w.raise_value_error, args=("leak check",), nprocs=1, start_method="fork")
        else:
            fastspawn.start_processes(w.noop, nprocs=1 + k % 2, start_method="fork")
    for k in range(20):
        if k == 10:
            with pytest.raises(ProcessExitedException):
                fastspawn.start_processes(w.exit_with, args=(3,), nprocs=1, start_method="spawn")
        else:
            fastspawn.start_processes(w.noop, nprocs=1, start_method="spawn")

    gc.collect()
    assert open_fds() == fds_before
    assert not children_now() - children_before
    assert os.listdir(private_tmp) == []


def test_no_fd_leak_with_thread_watchers(monkeypatch, tracker):
    """FASTSPAWN_PIDFD=0: each child has a watcher thread holding an fd until it ends."""
    watch_env(monkeypatch, "thread")
    gc.collect()
    fds_before = open_fds()
    threads_before = set(os.listdir("/proc/self/task"))
    for k in range(40):
        fastspawn.start_processes(w.noop, nprocs=2, start_method="fork")
    for k in range(5):
        fastspawn.start_processes(w.noop, nprocs=1, start_method="spawn")
    with pytest.raises(ProcessRaisedException, match="leak check"):
        fastspawn.start_processes(w.raise_value_error, args=("leak check",), nprocs=2, start_method="fork")
    # The watcher threads end on their own once their child has exited.
    end = time.monotonic() + GONE_DEADLINE
    while set(os.listdir("/proc/self/task")) - threads_before and time.monotonic() < end:
        time.sleep(0.01)
    assert not set(os.listdir("/proc/self/task")) - threads_before, "watcher threads left"
    gc.collect()
    assert open_fds() == fds_before


@pytest.mark.parametrize("method", ["forkserver"])  # the fresh-interpreter path (conftest.py)
def test_exec_child_only_has_the_fds_it_needs(method):
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        ctx = fastspawn.start_processes(w.report_fds, args=(writer,), nprocs=1, join=False, start_method=method)
        assert reader.poll(REPORT_TIMEOUT)
        report = reader.recv()
        join_all(ctx)
        assert report["owner"] == os.getpid()
        assert report["sentinel"] == report["control"]
        assert report["conn"] == writer.fileno()  # passed at the same number
        needed = {report["control"], report["result"], report["tracker"], report["conn"]}
        assert len(needed) == 4
        own = {0, 1, 2}
        if report["stdin"] is not None and report["links"].get(report["stdin"]) == os.devnull:
            own.add(report["stdin"])  # multiprocessing's bootstrap reopens stdin itself
        assert set(report["open"]) - own == needed, report["links"]


# ----------------------------------------------------------- 6. huge tracebacks
BIG = 10 * 1024 * 1024


@methods
@watch_modes
@pytest.mark.parametrize("nprocs", [1, 4])
def test_huge_exception_message_arrives_whole(monkeypatch, method, watch, nprocs):
    watch_env(monkeypatch, watch)
    with pytest.raises(ProcessRaisedException) as info:
        fastspawn.start_processes(w.raise_big, args=(BIG,), nprocs=nprocs, start_method=method)
    err = info.value
    assert 0 <= err.error_index < nprocs
    expected = w.big_message(err.error_index, BIG)
    assert expected in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert str(err.__cause__) == expected


# ------------------------------------------------------------------- 7. Ctrl-C
DRIVER_CTRL_C = """
import multiprocessing
import psutil
import fastspawn
import _engine_workers as w
from multiprocessing import resource_tracker
method, directory = sys.argv[1], sys.argv[2]
ignore = tuple(int(s) for s in sys.argv[3].split(",") if s)
try:
    fastspawn.start_processes(w.pid_file_then_sleep, args=(directory, ignore), nprocs=2, start_method=method)
    print("returned", flush=True)
except KeyboardInterrupt:
    # What is still our child when Ctrl-C comes out of start_processes (not the tracker,
    # nor the zygote, which lives until exit)?
    zygote = fastspawn._api._zygotes.current
    helpers = {resource_tracker._resource_tracker._pid, zygote.pid if zygote else None}
    kids = {c.pid for c in psutil.Process().children()} - helpers
    print(json.dumps({"left": sorted(kids)}), flush=True)
    raise
"""


@pytest.mark.parametrize(
    "method,ignore",
    [
        ("spawn", ()),
        ("fork", ()),
        ("forkserver", ()),
        ("spawn", (signal.SIGINT,)),
        ("spawn", (signal.SIGINT, signal.SIGTERM)),
    ],
    ids=["spawn", "fork", "forkserver", "spawn-ignores-SIGINT", "spawn-ignores-SIGINT-SIGTERM"],
)
def test_ctrl_c_during_join(tmp_path, cleanup, method, ignore):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    driver = Driver(tmp_path, DRIVER_CTRL_C, method, pid_dir, ",".join(str(int(s)) for s in ignore))
    cleanup.append(driver)
    alive = lambda: driver.proc.poll() is None  # noqa: E731
    # Ready = both children wrote their pid, and the driver sleeps in the engine's wait.
    end = time.monotonic() + REPORT_TIMEOUT
    while len([n for n in os.listdir(pid_dir) if n.endswith(".pid")]) < 2:
        assert alive(), driver.stderr()
        assert time.monotonic() < end, "children never reported"
        time.sleep(0.01)
    children = as_procs(int((pid_dir / f"{i}.pid").read_text()) for i in range(2))
    cleanup.extend(children)
    wait_blocked_in_epoll(f"/proc/{driver.pid}/task/{driver.pid}", alive=alive)

    os.kill(driver.pid, signal.SIGINT)
    code = driver.wait()
    stderr = driver.stderr()
    assert code != 0
    assert "KeyboardInterrupt" in stderr
    out = driver.rest_of_stdout()
    assert out == ['{"left": []}\n'], (out, stderr)
    assert_all_gone(children)


# ------------------------------------------- 8. bad input: raise before starting
BAD_ARGUMENTS = [
    pytest.param(dict(fn=w.noop, nprocs=-1), ValueError, "nprocs", id="nprocs=-1"),
    pytest.param(dict(fn=w.noop, nprocs=1.5), TypeError, "nprocs", id="nprocs=1.5"),
    pytest.param(dict(fn=w.noop, nprocs="2"), TypeError, "nprocs", id="nprocs='2'"),
    pytest.param(dict(fn=42, nprocs=1), TypeError, "callable", id="fn=42"),
]


@pytest.fixture
def nothing_left(tmp_path, monkeypatch, tracker):
    """Asserts at teardown that the test left no process, fd or temp file."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    gc.collect()  # fds of earlier tests' garbage must not close during this one
    fds, children = open_fds(), children_now()
    yield
    gc.collect()
    assert not children_now() - children
    assert open_fds() == fds
    assert os.listdir(private_tmp) == []


@methods
@pytest.mark.parametrize("kwargs,error,words", BAD_ARGUMENTS)
def test_bad_arguments_raise_before_start(nothing_left, method, kwargs, error, words):
    with pytest.raises(error, match=words):
        fastspawn.start_processes(join=False, start_method=method, **kwargs)


def test_unknown_start_method(nothing_left):
    with pytest.raises(ValueError, match="start_method"):
        fastspawn.start_processes(w.noop, nprocs=1, start_method="thread")


@exec_methods
def test_unpicklable_function_is_named(nothing_left, method):
    # Lambdas and local functions go by value (tests/test_closures.py); one that holds
    # something that cannot pickle at all still fails, naming the function.
    lock = threading.Lock()

    def local_fn(i):
        return lock

    for fn in (lambda i: lock, local_fn):
        with pytest.raises(TypeError) as info:
            fastspawn.start_processes(fn, nprocs=2, join=False, start_method=method)
        assert fn.__qualname__ in str(info.value)


@exec_methods
def test_unpicklable_argument_is_named(nothing_left, method):
    with pytest.raises((pickle.PicklingError, TypeError)) as info:
        fastspawn.start_processes(w.noop, args=(1, threading.Lock()), nprocs=2, join=False, start_method=method)
    assert "args[1]" in str(info.value)


# --------------------------------- 9. the thread watcher behaves like the pidfd one
@methods
@watch_modes
def test_watch_mode_success(monkeypatch, method, watch):
    watch_env(monkeypatch, watch)
    ctx = fastspawn.start_processes(w.noop, nprocs=2, join=False, start_method=method)
    assert watch_mode(ctx) == watch
    join_all(ctx)
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    assert_reaped(ctx.pids())


@methods
@watch_modes
def test_watch_mode_failure(monkeypatch, method, watch):
    watch_env(monkeypatch, watch)
    mp = multiprocessing.get_context(method)
    ready, gate = mp.Queue(), Gate()
    ctx = fastspawn.start_processes(
        w.rank0_raises_others_wait, args=(ready, gate.reader, "boom-42"), nprocs=2, join=False, start_method=method
    )
    assert watch_mode(ctx) == watch
    with pytest.raises(ProcessRaisedException, match="boom-42") as info:
        join_all(ctx)
    assert info.value.error_index == 0
    assert info.value.error_pid == ctx.pids()[0]
    assert isinstance(info.value.__cause__, ValueError)
    assert [p.exitcode for p in ctx.processes] == [1, -signal.SIGTERM]
    assert_reaped(ctx.pids())


@methods
@watch_modes
def test_watch_mode_exit_code(monkeypatch, method, watch):
    watch_env(monkeypatch, watch)
    ctx = fastspawn.start_processes(w.exit_with, args=(3,), nprocs=1, join=False, start_method=method)
    assert watch_mode(ctx) == watch
    with pytest.raises(ProcessExitedException, match="exit code 3") as info:
        join_all(ctx)
    assert info.value.exit_code == 3
    assert_reaped(ctx.pids())


@methods
@watch_modes
def test_watch_mode_kill(monkeypatch, method, watch):
    watch_env(monkeypatch, watch)
    ready = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(w.ready_then_sleep, args=(ready,), nprocs=2, join=False, start_method=method)
    assert watch_mode(ctx) == watch
    get_n(ready, 2)
    ctx.processes[1].kill()
    with pytest.raises(ProcessExitedException, match="SIGKILL") as info:
        join_all(ctx)
    assert info.value.error_index == 1
    assert info.value.exit_code == -signal.SIGKILL
    assert info.value.signal_name == "SIGKILL"
    assert [p.exitcode for p in ctx.processes] == [-signal.SIGTERM, -signal.SIGKILL]
    assert_reaped(ctx.pids())


def test_default_watch_mode_is_pidfd(monkeypatch):
    monkeypatch.delenv("FASTSPAWN_PIDFD", raising=False)
    assert _core.pidfd_supported()
    ctx = fastspawn.start_processes(w.noop, nprocs=1, join=False, start_method="fork")
    assert watch_mode(ctx) == "pidfd"
    join_all(ctx)


# ----------------------------------------------- 10. join wakes up on the exit event
@methods
@watch_modes
@pytest.mark.parametrize("nprocs", [1, 2])
def test_join_timeout_then_wakes_on_exit(monkeypatch, method, watch, nprocs):
    watch_env(monkeypatch, watch)
    mp = multiprocessing.get_context(method)
    ready, gate = mp.Queue(), Gate()
    ctx = fastspawn.start_processes(
        w.ready_then_wait, args=(ready, gate.reader), nprocs=nprocs, join=False, start_method=method
    )
    get_n(ready, nprocs)
    assert ctx.join(timeout=0.05) is False
    assert ctx.join(timeout=0) is False
    assert all(p.is_alive() for p in ctx.processes)
    assert multiprocessing.connection.wait(list(ctx.sentinels), timeout=0) == []

    # Release the children only once this thread sleeps in join(timeout=None).
    main_task = f"/proc/self/task/{threading.get_native_id()}"
    releaser_error: list = []

    def releaser():
        try:
            wait_blocked_in_epoll(main_task)
        except BaseException as exc:
            releaser_error.append(exc)
        finally:
            gate.open()  # never leave join() waiting forever

    thread = threading.Thread(target=releaser)
    thread.start()
    try:
        join_all(ctx)
    finally:
        thread.join()
    assert not releaser_error, releaser_error
    assert [p.exitcode for p in ctx.processes] == [0] * nprocs
    assert_reaped(ctx.pids())


# ------------------------------------------------------------ 11. the engine itself
WAIT_FOR_CONTROL_EOF = "import os, sys; os.read(int(sys.argv[1]), 1)"

ECHO_DIGEST = """\
import hashlib, os, sys
size = int(sys.argv[1])  # then the engine's CONTROL_FD RESULT_FD OWNER_PID
control, result = int(sys.argv[-3]), int(sys.argv[-2])
data = b""
while len(data) < size:
    chunk = os.read(control, size - len(data))
    if not chunk:
        break
    data += chunk
os.write(result, b"%d " % len(data) + hashlib.sha256(data).hexdigest().encode())
"""


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_group_sentinel_readable_exactly_after_exit(tracker, use_pidfd):
    before = children_now()
    group = _core.Group(1, use_pidfd)
    assert group.watch_mode == ("pidfd" if use_pidfd else "thread")
    group.start_exec(0, sys.executable, [sys.executable, "-c", WAIT_FOR_CONTROL_EOF], [], [])
    pid = group.pid(0)
    sentinel = group.sentinel(0)
    assert pid in children_now()
    assert group.running(0)
    assert select.select([sentinel], [], [], 0)[0] == []
    assert group.wait(0.0, True) == []  # the exit log is empty

    assert group.send_signal(0, signal.SIGTERM) is True
    assert select.select([sentinel], [], [], REPORT_TIMEOUT)[0] == [sentinel]
    exits = group.wait(None, True)
    assert exits == [(0, pid, -signal.SIGTERM, b"")]
    assert select.select([sentinel], [], [], 0)[0] == [sentinel]  # still, after the reap
    assert not group.running(0)
    assert group.send_signal(0, signal.SIGTERM) is False
    assert group.send_signal(0, signal.SIGKILL, True) is False
    assert group.wait(0.0, True) == exits  # the log, for any number of readers
    assert group.wait(0.0, True, 1) == []  # nothing after the first entry
    assert_reaped([pid])
    assert not children_now() - before


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
@pytest.mark.parametrize("size", [11, 3 * 1024 * 1024 + 7], ids=["small", "3MB"])
def test_group_input_and_result(tracker, use_pidfd, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    chunks = [_core.Chunk(data[: size // 3]), _core.Chunk(data[size // 3 :])]
    group = _core.Group(1, use_pidfd)
    group.start_exec(0, sys.executable, [sys.executable, "-c", ECHO_DIGEST, str(size)], [], chunks)
    pid = group.pid(0)
    exits = group.wait(None, True)
    expected = b"%d " % size + hashlib.sha256(data).hexdigest().encode()
    assert exits == [(0, pid, 0, expected)]
    assert_reaped([pid])


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_group_exec_missing_program(tracker, use_pidfd, tmp_path):
    group = _core.Group(2, use_pidfd)
    missing = str(tmp_path / "no-such-program")
    gc.collect()
    before, fds = children_now(), open_fds()
    with pytest.raises(FileNotFoundError):
        group.start_exec(0, missing, [missing], [], [])
    assert group.pid(0) == -1
    assert not group.running(0)
    assert group.send_signal(0, signal.SIGTERM) is False
    assert group.wait(0.0, True) == []
    assert not children_now() - before
    assert open_fds() == fds


# --------------------------------------------------------- 12. process groups
@methods
def test_each_child_leads_its_own_process_group(method):
    reports = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(w.report_ids, args=(reports,), nprocs=3, join=False, start_method=method)
    got = sorted(get_n(reports, 3))
    join_all(ctx)
    pids = ctx.pids()
    assert [rank for rank, *_ in got] == [0, 1, 2]
    for rank, pid, pgid, sid in got:
        assert pid == pids[rank]
        assert pgid == pid
        assert sid == os.getsid(0)  # a new group, not a new session
    assert os.getpgid(0) not in pids


@methods
def test_a_child_signalling_its_own_group_at_once_hits_no_sibling(method):
    # Zygote children fork their siblings (a tree): none may still sit in the group of
    # the one that forked it when that one starts running user code.
    for _ in range(5):
        fastspawn.start_processes(w.signal_own_group, nprocs=8, start_method=method)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_failure_shutdown_kills_grandchild_of_the_failed_child(cleanup, method):
    reports = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(
        w.grandchild_then, args=(reports, "raise"), nprocs=1, join=False, start_method=method
    )
    _rank, child, grandchild = reports.get(timeout=REPORT_TIMEOUT)
    grandchildren = as_procs([grandchild])
    cleanup.extend(grandchildren)
    with pytest.raises(ProcessRaisedException, match="fails on purpose"):
        join_all(ctx)
    assert_all_gone(grandchildren)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_failure_shutdown_kills_grandchild_of_a_terminated_sibling(cleanup, method):
    mp = multiprocessing.get_context(method)
    reports, gate = mp.Queue(), Gate()
    ctx = fastspawn.start_processes(w.failing_sibling, args=(reports, gate.reader), nprocs=2, join=False, start_method=method)
    _rank, child, grandchild = reports.get(timeout=REPORT_TIMEOUT)
    grandchildren = as_procs([grandchild])
    cleanup.extend(grandchildren)
    assert os.getpgid(grandchild) == child
    gate.open()
    with pytest.raises(ProcessRaisedException, match="rank 1 fails on purpose"):
        join_all(ctx)
    assert ctx.processes[0].exitcode == -signal.SIGTERM
    assert_all_gone(grandchildren)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_collected_context_kills_grandchildren(cleanup, method):
    reports = multiprocessing.get_context(method).Queue()
    ctx = fastspawn.start_processes(
        w.grandchild_then, args=(reports, "sleep"), nprocs=2, join=False, start_method=method
    )
    got = get_n(reports, 2)
    grandchildren = as_procs(g for _, _, g in got)
    cleanup.extend(grandchildren)
    with pytest.warns(ResourceWarning, match="garbage collected"):
        del ctx
        gc.collect()
    assert_all_gone(grandchildren)


# ------------------------------------- 13. stop, the reaper, external reapers, watch
# What the engine promises about ending children: stop() is bounded even when a child
# cannot die, reports what it could not reap and leaves it to the engine's reaper;
# destroying a group never blocks; children reaped by someone else get exit code None
# and their pid / process group is never signalled again; wait() also watches fds.

# A child that has a pipe (fd in argv[1]) to say it is ready: it ignores SIGTERM first.
IGNORE_TERM_THEN_WAIT = """\
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(int(sys.argv[1]), b"r")
os.read(int(sys.argv[-3]), 1)  # the control pipe: EOF when the group goes away
"""

# Forks a grandchild that stays in the child's process group, reports its pid, exits 0.
GRANDCHILD_THEN_EXIT = """\
import os, sys, time
result = int(sys.argv[-2])
pid = os.fork()
if pid == 0:
    os.close(result)
    time.sleep(600)
    os._exit(0)
os.write(result, b"%d" % pid)
"""

STOP_MARGIN = 10.0  # beyond stop's own bounds, for a loaded machine


def bounded_call(fn, limit: float):
    """``fn()`` in a thread; fails unless it returns within ``limit`` s (then its result).

    A thread, so that a broken (unbounded) call fails this test instead of hanging it;
    the test's teardown then releases what the call waits for.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_until(predicate, what: str, deadline: float = GONE_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.02)


def reaped_by_anyone(pid: int) -> bool:
    """``pid`` is neither running nor a zombie of ours (never reaps it here)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def start_ready_child(group, rank: int, script: str = IGNORE_TERM_THEN_WAIT) -> int:
    """Starts ``script`` as ``rank`` with a ready pipe; returns once it said so."""
    r, w = os.pipe()
    try:
        group.start_exec(rank, sys.executable, [sys.executable, "-c", script, str(w)], [w], [])
        os.close(w)
        w = -1
        assert select.select([r], [], [], REPORT_TIMEOUT)[0] == [r], "the child never said it is ready"
        assert os.read(r, 1) == b"r"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return group.pid(rank)


class Freezer:
    """A freezer cgroup (v1) of our own: a child put in it and frozen cannot die."""

    ROOT = "/sys/fs/cgroup/freezer"

    def __init__(self) -> None:
        self.path = os.path.join(self.ROOT, f"fastspawn-test-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(text)

    def state(self) -> str:
        with open(os.path.join(self.path, "freezer.state")) as f:
            return f.read().strip()

    def freeze(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))
        self._write("freezer.state", "FROZEN")
        wait_until(lambda: self.state() == "FROZEN", "the cgroup froze")

    def thaw(self) -> None:
        self._write("freezer.state", "THAWED")

    def members(self) -> list:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]

    def remove(self) -> None:
        self.thaw()
        for pid in self.members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not self.members(), "the cgroup emptied")
        os.rmdir(self.path)


@pytest.fixture
def freezer():
    if not os.path.isdir(Freezer.ROOT) or not os.access(Freezer.ROOT, os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 freezer controller at {Freezer.ROOT}")
    f = Freezer()
    try:
        yield f
    finally:
        f.remove()


@pytest.fixture
def sigchld_ignored():
    """SIGCHLD set to SIG_IGN (the kernel then reaps every child itself); restored after."""
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, old)


def test_kill_wait_is_exported():
    assert _core.KILL_WAIT == 5.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_stop_reports_what_it_killed(tracker, use_pidfd):
    group = _core.Group(3, use_pidfd)
    assert group.stop(0.0) == ([], [])  # nothing started: nothing to do
    polite = start_ready_child(group, 0, IGNORE_TERM_THEN_WAIT.replace("signal.SIG_IGN", "signal.SIG_DFL"))
    stubborn = start_ready_child(group, 1)
    killed, unreaped = group.stop(2.0)  # the old call shape: grace only
    assert (killed, unreaped) == ([1], [])
    assert sorted(group.wait(0.0, True)) == [(0, polite, -signal.SIGTERM, b""), (1, stubborn, -signal.SIGKILL, b"")]
    assert not group.running(0) and not group.running(1)
    assert group.stop(0.0) == ([], [])  # idempotent
    for kill_wait in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="kill_wait"):
            group.stop(0.0, kill_wait=kill_wait)
    assert_reaped([polite, stubborn])


@pytest.mark.timeout(60)
def test_stop_signal_and_grace(tracker):
    group = _core.Group(2, True)
    a = start_ready_child(group, 0)
    b = start_ready_child(group, 1, IGNORE_TERM_THEN_WAIT.replace("SIGTERM, signal.SIG_IGN", "SIGTERM, signal.SIG_DFL"))
    # signal=SIGUSR2: the one that ignores SIGTERM dies of it within the grace.
    killed, unreaped = group.stop(REPORT_TIMEOUT, signal.SIGUSR2, 1.0)
    assert (killed, unreaped) == ([], [])
    assert sorted(group.wait(0.0, True)) == [(0, a, -signal.SIGUSR2, b""), (1, b, -signal.SIGUSR2, b"")]
    group = _core.Group(1, True)
    c = start_ready_child(group, 0)
    # signal=0: no polite signal, no grace; straight to SIGKILL.
    assert bounded_call(lambda: group.stop(REPORT_TIMEOUT, 0), REPORT_TIMEOUT / 2) == ([0], [])
    assert group.wait(0.0, True) == [(0, c, -signal.SIGKILL, b"")]
    assert_reaped([a, b, c])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_stop_is_bounded_when_a_child_cannot_die(tracker, freezer, use_pidfd):
    group = _core.Group(2, use_pidfd)
    frozen = start_ready_child(group, 0)
    other = start_ready_child(group, 1)
    freezer.freeze(frozen)
    grace, kill_wait = 0.5, 3.0  # long enough for the other one to die of SIGKILL
    started = time.monotonic()
    killed, unreaped = bounded_call(lambda: group.stop(grace, kill_wait=kill_wait), grace + 2 * kill_wait + STOP_MARGIN)
    assert time.monotonic() - started >= grace + kill_wait  # it did wait for both
    assert killed == [0, 1]
    assert [(rank, pid) for rank, pid, _ in unreaped] == [(0, frozen)]
    state = unreaped[0][2]
    assert re.fullmatch(r"[A-Za-z] \(.+\)", state), state
    # The exit log is complete: the frozen one ended for the group, status unknown.
    assert sorted(group.wait(0.0, True)) == [(0, frozen, None, b""), (1, other, -signal.SIGKILL, b"")]
    assert not group.running(0)
    assert group.send_signal(0, signal.SIGKILL) is False  # the group gave it up
    assert _core.child_running(frozen)  # still there, still ours
    freezer.thaw()
    # The engine's reaper reaps it once it can die: no zombie is left.
    wait_until(lambda: reaped_by_anyone(frozen), f"the reaper reaped {frozen}")
    assert not os.path.exists(f"/proc/{frozen}")
    assert_reaped([frozen, other])


DRIVER_DELETE_GROUP = """
import gc, time
from fastspawn import _core
group = _core.Group(1, sys.argv[1] == "pidfd")
group.start_exec(0, sys.executable, [sys.executable, "-c", "import os, sys; os.read(int(sys.argv[-3]), 1)"], [], [])
pid = group.pid(0)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
print(pid, flush=True)
signal.sigwait({signal.SIGUSR1})  # the test has frozen the child
del group
gc.collect()
print("deleted", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        print("reaped", flush=True)
        break
    time.sleep(0.02)
else:
    print("not reaped", flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("watch", ["pidfd", "thread"])
def test_deleting_a_group_never_blocks(tmp_path, cleanup, freezer, watch):
    driver = Driver(tmp_path, DRIVER_DELETE_GROUP, watch)
    cleanup.append(driver)
    child = int(driver.line())
    cleanup.extend(as_procs([child]))
    freezer.freeze(child)
    os.kill(driver.pid, signal.SIGUSR1)
    # The destructor SIGKILLs the frozen child and hands it to the reaper: no wait.
    assert driver.line(timeout=20.0) == "deleted\n"
    freezer.thaw()
    assert driver.line() == "reaped\n"
    assert driver.wait() == 0


@pytest.mark.timeout(60)
def test_deleted_group_kills_its_children_and_the_reaper_reaps_them(tracker):
    group = _core.Group(2, True)
    pids = [start_ready_child(group, rank) for rank in range(2)]
    del group
    gc.collect()
    for pid in pids:
        wait_until(lambda: reaped_by_anyone(pid), f"the reaper reaped {pid}")
    assert_reaped(pids)


@pytest.mark.timeout(60)
def test_the_reaper_works_in_a_fork_child(tracker):
    # The parent's reaper exists (and its thread runs) before the fork.
    group = _core.Group(1, True)
    parent_child = start_ready_child(group, 0)
    del group
    wait_until(lambda: reaped_by_anyone(parent_child), "the reaper reaped the parent's child")
    pid = os.fork()
    if pid == 0:  # the fork child: its own reaper (a thread is not copied by fork)
        code = 1
        try:
            g = _core.Group(1, True)
            g.start_exec(0, sys.executable, [sys.executable, "-c", WAIT_FOR_CONTROL_EOF], [], [])
            mine = g.pid(0)
            del g
            end = time.monotonic() + GONE_DEADLINE
            while time.monotonic() < end and not reaped_by_anyone(mine):
                time.sleep(0.02)
            code = 0 if reaped_by_anyone(mine) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
@pytest.mark.parametrize("reaper", ["sigchld-ignored", "waitpid"])
def test_a_child_reaped_elsewhere_has_unknown_exit_code(request, cleanup, use_pidfd, reaper):
    if reaper == "sigchld-ignored":
        request.getfixturevalue("sigchld_ignored")
    group = _core.Group(1, use_pidfd)
    group.start_exec(0, sys.executable, [sys.executable, "-c", GRANDCHILD_THEN_EXIT], [], [])
    pid = group.pid(0)
    if reaper == "waitpid":
        # Someone's waitpid reaps it first (a waitpid(-1) loop would do the same).
        assert os.waitpid(pid, 0) == (pid, 0)
    [(rank, got_pid, code, output)] = group.wait(REPORT_TIMEOUT, True)
    grandchild = int(output)
    cleanup.extend(as_procs([grandchild]))
    assert (rank, got_pid, code) == (0, pid, None)  # unknown: never 255
    assert group.send_signal(0, signal.SIGTERM, True) is False
    assert group.stop(0.0) == ([], [])
    # Its process group was never signalled (the pid may be anyone's now): the
    # grandchild in that group does not end (a SIGKILLed one would within the second).
    pidfd = os.pidfd_open(grandchild)
    try:
        assert select.select([pidfd], [], [], 1.0)[0] == [], "the child's process group was killed"
    finally:
        os.close(pidfd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_stop_under_an_ignored_sigchld(sigchld_ignored, use_pidfd):
    group = _core.Group(1, use_pidfd)
    pid = start_ready_child(group, 0)
    assert group.stop(0.0, kill_wait=REPORT_TIMEOUT) == ([0], [])
    # The kernel reaped it, not us: the status is unknown.
    assert group.wait(0.0, True) == [(0, pid, None, b"")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_wait_returns_when_a_watched_fd_is_ready(tracker, use_pidfd):
    group = _core.Group(1, use_pidfd)
    pid = start_ready_child(group, 0)
    r, w = os.pipe()
    idle_r, idle_w = os.pipe()
    try:
        # Readable: returns at once (no timeout: a missed fd would hang to the marker).
        os.write(w, b"x")
        assert group.wait(None, False, 0, watch=[idle_r, r]) == []
        assert group.running(0)
        assert os.read(r, 1) == b"x"
        # Written while the wait blocks.
        main = threading.get_native_id()
        writer = threading.Thread(
            target=lambda: (wait_blocked_in_epoll(f"/proc/self/task/{main}", wchan="poll"), os.write(w, b"y"))
        )
        writer.start()
        assert group.wait(None, True, 0, watch=[r]) == []
        writer.join()
        assert os.read(r, 1) == b"y"
        # Hung up.
        os.close(w)
        w = -1
        assert group.wait(None, False, 0, watch=[r]) == []
        # Not ready: the timeout; a closed fd: EBADF; and exits still end the wait.
        assert group.wait(0.05, False, 0, watch=[idle_r]) == []
        bad = os.dup(idle_r)
        os.close(bad)
        with pytest.raises(OSError) as info:
            group.wait(None, False, 0, watch=[bad])
        assert info.value.errno == errno.EBADF
        other = []
        waiter = threading.Thread(target=lambda: other.append(group.wait(None, True)))  # no watch
        waiter.start()
        assert group.send_signal(0, signal.SIGKILL)
        expected = [(0, pid, -signal.SIGKILL, b"")]
        assert group.wait(None, False, 0, watch=[idle_r]) == expected
        waiter.join(REPORT_TIMEOUT)
        assert other == [expected]
    finally:
        for fd in (r, w, idle_r, idle_w):
            if fd >= 0:
                os.close(fd)
    assert_reaped([pid])


class Interrupted(Exception):
    pass


FOREVER_GRACE = 600.0


@pytest.mark.timeout(60)
def test_stop_interrupted_by_a_signal_still_kills_and_reaps(tracker):
    group = _core.Group(1, True)
    pid = start_ready_child(group, 0)  # ignores SIGTERM: only the kill ends it

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident
    main_tid = threading.get_native_id()

    def interrupt() -> None:
        wait_blocked_in_epoll(f"/proc/self/task/{main_tid}")  # inside the grace wait
        signal.pthread_kill(main, signal.SIGUSR1)

    sender = threading.Thread(target=interrupt)
    try:
        sender.start()
        with pytest.raises(Interrupted):
            group.stop(FOREVER_GRACE)  # only the interruption can end the grace early
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, old)
    assert not group.running(0)
    assert group.wait(0.0, True) == [(0, pid, -signal.SIGKILL, b"")]
    assert_reaped([pid])


# A child started elsewhere (posix_spawn here, the zygote in real use), given the
# group's channels as fds 50 (control) and 51 (result), and a ready pipe as fd 52.
ELSEWHERE = """\
import os, struct, sys
if sys.argv[1] == "announce":
    os.write(51, struct.pack("=i", os.getpid()))
os.write(52, b"r")
os.close(52)
if sys.argv[2] == "wait":
    os.read(50, 1)
os.write(51, b"hello")
"""


def spawn_elsewhere(group, rank: int, announce: bool, wait: bool) -> int:
    """Starts ELSEWHERE for ``rank``; returns its pid once it has (or has not) announced itself."""
    control, result = group.open_channels(rank)
    ready_r, ready_w = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", ELSEWHERE, "announce" if announce else "quiet", "wait" if wait else "go"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, control, 50),
                (os.POSIX_SPAWN_DUP2, result, 51),
                (os.POSIX_SPAWN_DUP2, ready_w, 52),
            ],
        )
        os.close(ready_w)
        ready_w = -1
        assert select.select([ready_r], [], [], REPORT_TIMEOUT)[0] == [ready_r], "never ready"
        assert os.read(ready_r, 1) == b"r"
        return pid
    finally:
        for fd in (control, result, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
@pytest.mark.parametrize("announce", [True, False], ids=["announces", "quiet"])
def test_adopt_pid(tracker, use_pidfd, announce):
    group = _core.Group(2, use_pidfd)
    pid = spawn_elsewhere(group, 0, announce, wait=False)
    assert group.adopt_pid(0, pid) is True
    assert group.pid(0) == pid
    assert group.adopt_pid(0, pid) is True  # already watched under that pid
    # The announcement, when it comes, is not output.
    assert group.wait(REPORT_TIMEOUT, True) == [(0, pid, 0, b"hello")]
    assert_reaped([pid])


def pending_rank():
    """A group whose rank 0 has channels (the child's ends closed) and no child yet;
    and the fds open before the channels were made."""
    group = _core.Group(1, True)
    gc.collect()
    fds = open_fds()
    control, result = group.open_channels(0)
    os.close(control)
    os.close(result)
    return group, fds


@pytest.mark.timeout(60)
def test_adopt_pid_refuses_what_is_not_our_child(tracker):
    group, fds = pending_rank()
    assert group.adopt_pid(0, os.getppid()) is False
    assert group.pid(0) == -1 and not group.running(0)
    assert open_fds() == fds  # the rank's pipes are closed
    assert group.adopt(0.0) == [] and group.wait(0.0, True) == []


@pytest.mark.timeout(60)
def test_adopt_pid_of_a_child_reaped_elsewhere(tracker):
    group = _core.Group(1, True)
    pid = spawn_elsewhere(group, 0, announce=True, wait=False)
    assert os.waitpid(pid, 0) == (pid, 0)  # someone else reaped it
    assert group.adopt_pid(0, pid) is True
    assert group.wait(REPORT_TIMEOUT, True) == [(0, pid, None, b"hello")]


@pytest.mark.timeout(60)
def test_drop_pending_closes_the_pipes(tracker):
    group, fds = pending_rank()
    group.drop_pending(0)
    assert open_fds() == fds
    assert group.adopt(0.0) == [] and group.wait(0.0, True) == []
    group.drop_pending(0)  # nothing pending: nothing happens


@pytest.mark.timeout(60)
def test_stop_adopts_pending_ranks_first(tracker):
    group = _core.Group(2, True)
    pid = spawn_elsewhere(group, 0, announce=True, wait=True)  # announces, then blocks
    quiet = spawn_elsewhere(group, 1, announce=False, wait=True)  # never announces
    assert group.adopt_pid(1, quiet) is True
    assert group.stop(0.0) == ([0, 1], [])
    assert sorted(group.wait(0.0, True)) == [(0, pid, -signal.SIGKILL, b""), (1, quiet, -signal.SIGKILL, b"")]
    assert_reaped([pid, quiet])


@pytest.mark.timeout(60)
def test_child_running_never_reaps(tracker):
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"], os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
        assert _core.child_running(pid)
    finally:
        os.close(r)
        os.close(w)  # EOF: it exits
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # until it is a zombie
    assert not _core.child_running(pid)
    assert os.waitpid(pid, os.WNOHANG) == (pid, 0)  # still ours to reap
    assert not _core.child_running(pid)
    assert not _core.child_running(os.getpid())
    assert not _core.child_running(os.getppid())


DRIVER_ZYGOTE_FORK = """
import struct
from fastspawn import _core
r, w = os.pipe()
forks = _core.zygote_fork_many(os.getppid(), [(w, [], []), (w, [], [])], pids=True)
if forks[0] >= 0:  # a child (clone(CLONE_PARENT): a child of the test process)
    os._exit(0 if forks[1:] == (0, 0, []) else 3)
os.close(w)
data = b""
while len(data) < 8:
    chunk = os.read(r, 8 - len(data))
    if not chunk:
        break
    data += chunk
announced = sorted(struct.unpack("=%di" % (len(data) // 4), data))
print(json.dumps({"forks": [forks[0], forks[1], forks[2], list(forks[3])], "announced": announced}), flush=True)
"""


@pytest.mark.timeout(60)
def test_zygote_fork_many_reports_the_pids_it_forked(tmp_path, cleanup):
    driver = Driver(tmp_path, DRIVER_ZYGOTE_FORK)
    cleanup.append(driver)
    report = json.loads(driver.line())
    assert driver.wait() == 0
    index, forked, error, pids = report["forks"]
    assert (index, forked, error) == (-1, 2, 0)
    assert sorted(pids) == report["announced"]
    for pid in pids:  # ours: forked with CLONE_PARENT from our child
        assert os.waitpid(pid, 0) == (pid, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "thread"])
def test_a_child_that_cannot_be_watched_is_killed_and_reaped(tracker, use_pidfd):
    import resource

    group = _core.Group(1, use_pidfd)
    gc.collect()
    before = children_now()
    used = open_fds()
    free = [fd for fd in range(3, 4096) if fd not in used][:4]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the child's two pipes, none for its pidfd (or eventfd): attach fails
    # after the child exists; the engine kills it and its reaper (a thread here: no
    # pidfd can be opened either) reaps it. Nothing blocks, nothing is left.
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1] + 1, hard))
    try:
        with pytest.raises(OSError) as info:
            group.start_exec(0, sys.executable, [sys.executable, "-c", WAIT_FOR_CONTROL_EOF], [], [])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.errno == errno.EMFILE
    assert ("eventfd" if not use_pidfd else "pidfd_open") in str(info.value)  # after the exec
    assert group.pid(0) == -1 and not group.running(0)
    assert group.wait(0.0, True) == []
    wait_until(lambda: not children_now() - before, "the child was reaped")
    assert open_fds() == used
