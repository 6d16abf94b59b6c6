"""fastspawn._api.launch / launch_programs: the engine under launchers (elastic, CLI,
pytest plugin). Per-rank environment in place before the call is loaded, per-rank stdio,
return values through the result pipe, and foreign programs with an exact environment.
"""

from __future__ import annotations

import os
import sys

import psutil
import pytest

import _launch_workers as w
from fastspawn import ProcessRaisedException, _api

methods = pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
KEY = "FASTSPAWN_TEST_RANK_VAR"


def join_all(ctx) -> None:
    while not ctx.join():
        pass


def children() -> set:
    """Our direct children (the zygote and multiprocessing's helpers among them)."""
    return {c.pid for c in psutil.Process().children()}


@methods
def test_rank_env_stdio_and_return_values(method, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    files = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(3)]
    try:
        ctx = _api.launch(
            w.report_env, (KEY,), 3, start_method=method,
            envs=[{KEY: f"value-{i}"} for i in range(3)],
            stdio=[(o.fileno(), e.fileno()) for o, e in files],
            return_values=True,
        )
    finally:
        for o, e in files:
            o.close()
            e.close()
    join_all(ctx)
    assert [ctx.return_value(i) for i in range(3)] == [{"rank": i, KEY: f"value-{i}"} for i in range(3)]
    for i in range(3):
        assert (tmp_path / f"out{i}").read_text() == f"out {i} {KEY}=value-{i}\n"
        assert (tmp_path / f"err{i}").read_text() == f"err {i}\n"
    assert KEY not in os.environ  # the caller's environment is untouched


@methods
def test_rank_env_is_set_before_the_call_is_unpickled(method, monkeypatch):
    monkeypatch.setenv(KEY, "caller")
    ctx = _api.launch(
        w.value_at_load, (w.EnvAtLoad(None),), 2, start_method=method,
        envs=[{KEY: "rank0"}, {KEY: "rank1"}], return_values=True,
    )
    join_all(ctx)
    if method == "fork":  # nothing is unpickled in a fork: the object is the caller's
        assert [ctx.return_value(i) for i in range(2)] == [None, None]
    else:
        assert [ctx.return_value(i) for i in range(2)] == ["rank0", "rank1"]


def test_stdio_may_swap_the_callers_own_streams(capfd):
    ctx = _api.launch(w.report_env, (KEY,), 1, stdio=[(2, 1)])
    join_all(ctx)
    out, err = capfd.readouterr()
    assert out == "err 0\n"
    assert err.startswith(f"out 0 {KEY}=")


@methods
def test_unpicklable_return_value_fails_the_rank_with_a_clear_error(method):
    ctx = _api.launch(w.return_lambda, (), 1, start_method=method, return_values=True)
    with pytest.raises(ProcessRaisedException, match="while pickling the return value, a 'function'"):
        join_all(ctx)
    with pytest.raises(LookupError, match="process 0 has not returned a value"):
        ctx.return_value(0)


def test_return_values_of_a_failed_run_and_tracebacks():
    ctx = _api.launch(w.fail_on, (1,), 2, return_values=True)
    ctx._run.wait_all(None)
    assert ctx.return_value(0) == 0
    with pytest.raises(LookupError):
        ctx.return_value(1)
    assert ctx.error_traceback(0) is None
    assert "KeyError: 'rank 1 is the bad one'" in ctx.error_traceback(1)
    with pytest.raises(IndexError):
        ctx.return_value(2)


def test_return_values_are_only_sent_when_asked():
    ctx = _api.launch(w.fail_on, (5,), 1)
    join_all(ctx)
    with pytest.raises(LookupError):
        ctx.return_value(0)


@pytest.mark.parametrize("bad", [{"envs": [{}]}, {"stdio": [(None, None)] * 3}])
def test_per_rank_lists_must_match_nprocs(bad):
    before = children()
    with pytest.raises(ValueError, match=r"must have one entry per process \(2\), got"):
        _api.launch(w.report_env, (KEY,), 2, **bad)
    assert children() == before


def test_programs_get_exactly_their_environment_and_stdio(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSPAWN_ONLY_IN_CALLER", "1")
    outs = [open(tmp_path / f"p{i}", "w") for i in range(2)]
    try:
        ctx = _api.launch_programs(
            [["sh", "-c", f'echo "$A ${{FASTSPAWN_ONLY_IN_CALLER:-unset}}"; exit {i}'] for i in range(2)],
            [{"A": f"a{i}", "PATH": os.environ["PATH"]} for i in range(2)],
            stdio=[(o.fileno(), None) for o in outs],
        )
    finally:
        for o in outs:
            o.close()
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [0, 1]
    assert [(tmp_path / f"p{i}").read_text() for i in range(2)] == ["a0 unset\n", "a1 unset\n"]
    assert all(pid > 0 for pid in ctx.pids())


def test_program_names_are_looked_up_in_the_ranks_path(tmp_path):
    tool = tmp_path / "fastspawn-test-tool"
    tool.write_text("#!/bin/sh\nexit 7\n")
    tool.chmod(0o755)
    ctx = _api.launch_programs([["fastspawn-test-tool"]], [{"PATH": str(tmp_path)}])
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [7]


def test_a_program_that_cannot_run_starts_nothing(tmp_path):
    before = children()
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError, match="fastspawn-no-such-program"):
        _api.launch_programs([["true"], ["fastspawn-no-such-program"]], [dict(os.environ)] * 2)
    with pytest.raises(PermissionError):
        _api.launch_programs([[str(script)]], [{}])
    with pytest.raises(ValueError, match="non-empty argv"):
        _api.launch_programs([[]], [{}])
    assert children() == before


def test_programs_lead_their_own_process_group():
    ctx = _api.launch_programs([[sys.executable, "-c", "import os; os._exit(os.getpgid(0) == os.getpid())"]], [dict(os.environ)])
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [1]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_dead_resource_tracker_is_restarted_for_the_next_call(reaped):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    tracker = resource_tracker._resource_tracker
    old_pid = tracker._pid
    os.kill(old_pid, 9)
    if reaped:
        os.waitpid(old_pid, 0)
    else:
        os.waitid(os.P_PID, old_pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        assert psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    with pytest.warns(UserWarning, match="resource_tracker: process died unexpectedly"):
        ctx = _api.launch(w.fail_on, (5,), 1, return_values=True)
    join_all(ctx)
    assert ctx.return_value(0) == 0
    assert tracker._pid not in (None, old_pid)


# ---- issue 10: ranks as pristine as a fresh interpreter, programs die with their launcher ----

import errno
import json
import platform
import signal
import subprocess
import textwrap
import time

from fastspawn import _core

_GET_ROBUST_LIST = {"x86_64": 274, "aarch64": 100}.get(platform.machine())
_EOWNERDEAD = 130 if platform.machine() in ("x86_64", "aarch64") else None


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return libc


def _shared_mutex(libc, path):
    """The address of a 64-byte shared mapping of `path` (a pthread_mutex_t fits)."""
    import mmap

    fd = os.open(path, os.O_RDWR)
    try:
        addr = libc.mmap(None, 64, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    assert addr not in (None, 2**64 - 1)
    return addr


def _die_holding_a_robust_mutex(i, path):
    """In a rank: what the kernel knows of its robust-futex list, then lock a robust,
    process-shared mutex in `path`.<rank> and exit holding it."""
    import ctypes

    libc = _libc()
    head = ctypes.c_void_p()
    length = ctypes.c_size_t()
    rc = libc.syscall(_GET_ROBUST_LIST, ctypes.c_int(0), ctypes.byref(head), ctypes.byref(length))
    reason = _core.zygote_fork_check()  # before the lock: a held robust mutex is a reason
    mutex = _shared_mutex(libc, f"{path}.{i}")
    attr = ctypes.create_string_buffer(64)
    libc.pthread_mutexattr_init(attr)
    libc.pthread_mutexattr_setpshared(attr, 1)
    libc.pthread_mutexattr_setrobust(attr, 1)
    assert libc.pthread_mutex_init(ctypes.c_void_p(mutex), attr) == 0
    assert libc.pthread_mutex_lock(ctypes.c_void_p(mutex)) == 0
    return rc, head.value or 0, reason


@pytest.mark.timeout(60)
@pytest.mark.skipif(_GET_ROBUST_LIST is None, reason="syscall numbers known for x86-64 and AArch64 only")
@pytest.mark.parametrize("nprocs", [2, 9], ids=["zygote-forks", "helper-forks-too"])
@methods
def test_a_rank_dying_with_a_robust_mutex_leaves_it_owner_dead(method, nprocs, tmp_path):
    """The robust-futex list is registered and glibc's cached thread id is the rank's own
    (the kernel marks a dead owner's mutex only when the tid stored in it is the dying
    thread's): a peer then gets EOWNERDEAD instead of blocking for ever."""
    import ctypes

    path = tmp_path / "mutex"
    for i in range(nprocs):
        (tmp_path / f"mutex.{i}").write_bytes(bytes(64))
    ctx = _api.launch(_die_holding_a_robust_mutex, (str(path),), nprocs, start_method=method, return_values=True)
    join_all(ctx)
    libc = _libc()
    for rank in range(nprocs):
        rc, head, reason = ctx.return_value(rank)
        assert rc == 0 and head != 0, f"rank {rank}: no robust-futex list registered"
        assert reason is None, f"rank {rank}: {reason}"
        deadline = (ctypes.c_long * 2)(int(time.time()) + 2, 0)  # CLOCK_REALTIME, 2 s on
        mutex = ctypes.c_void_p(_shared_mutex(libc, f"{path}.{rank}"))
        assert libc.pthread_mutex_timedlock(mutex, deadline) == _EOWNERDEAD, f"rank {rank}"
        libc.pthread_mutex_consistent(mutex)  # ours now: leave this process's list empty
        assert libc.pthread_mutex_unlock(mutex) == 0


@pytest.mark.timeout(10)
def test_this_interpreter_passes_the_zygote_fork_check():
    assert _core.zygote_fork_check() is None


# A launcher in a subprocess: starts programs that each leave a background child in
# their process group, prints what it started, then waits to be killed (or exits).
_DRIVER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from fastspawn import _api, _core
    from test_launch import _group_members, _live as running

    def members(pgid):
        return sorted(_group_members({pgid}))

    mode = sys.argv[1]
    started = []
    def start():
        argv = ["sh", "-c", "exit 0" if mode == "exit" else "sleep 300 & sleep 300; wait"]
        started.append(_api.launch_programs([argv] * 2, [dict(os.environ)] * 2))
    if mode == "thread":  # the launching thread ends long before the launcher dies
        t = threading.Thread(target=start)
        t.start()
        t.join()
    else:
        start()
    ctx = started[0]
    pids = ctx.pids()
    if mode == "restart":  # someone kills the guardian: the next start makes a new one
        first = _core.guardian_pid()
        os.kill(first, 9)
        while running(first):
            time.sleep(0.01)
        start()
        assert _core.guardian_pid() not in (0, first)
        pids += started[1].pids()
    if mode == "exit":  # normal use: the programs end, the context is joined, we exit
        while not ctx.join():
            pass
    while mode != "exit" and any(len(members(p)) < 3 for p in pids):  # sh, its two sleeps
        time.sleep(0.01)
    child = 0
    if mode == "fork":  # a fork child of the launcher outlives it
        child = os.fork()
        if child == 0:
            time.sleep(300)
            os._exit(0)
    print(json.dumps({"pids": pids, "members": [members(p) for p in pids],
                      "guardian": _core.guardian_pid(), "child": child}), flush=True)
    if mode == "exit":
        sys.exit(0)
    time.sleep(300)
    """
)


def _live(pid):
    """Whether pid runs (a zombie has finished running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _group_members(pgids):
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in pgids and fields[0] != "Z":
                found.add(int(name))
    return found


def _wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _start_driver(mode):
    """Runs _DRIVER; returns it and what it printed (killed if it prints nothing in 30 s)."""
    import select

    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, mode], stdout=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        line = proc.stdout.readline() if ready else b""
    finally:
        proc.stdout.close()
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail("the driver printed nothing: it died or hung before starting its programs")
    return proc, json.loads(line)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["main", "thread", "fork", "restart"])
def test_programs_and_their_groups_die_with_a_sigkilled_launcher(mode):
    proc, info = _start_driver(mode)
    pgids = set(info["pids"])
    try:
        assert all(len(m) == 3 for m in info["members"])
        assert all(_live(p) for p in info["pids"])  # the launching thread's end killed nothing
        proc.kill()
        proc.wait()
        assert _wait_until(lambda: not _group_members(pgids), 5.0), (
            f"still running after the launcher's SIGKILL: {sorted(_group_members(pgids))}")
        assert _wait_until(lambda: not _live(info["guardian"]), 5.0)
    finally:
        for pid in _group_members(pgids) | ({info["child"]} if info["child"] else set()):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_the_guardian_leaves_nothing_after_a_normal_exit():
    proc, info = _start_driver("exit")
    try:
        assert proc.wait(timeout=30) == 0
        assert info["guardian"] > 0
        assert _wait_until(lambda: not _live(info["guardian"]) and not _group_members(set(info["pids"])), 5.0)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(30)
def test_the_guardian_is_never_our_child_to_reap():
    before = children()
    ctx = _api.launch_programs([["true"], ["sh", "-c", "exit 3"]], [dict(os.environ)] * 2)
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [0, 3]
    guardian = _core.guardian_pid()
    assert guardian > 0 and _live(guardian)
    assert guardian not in children()
    assert children() == before  # the intermediate was reaped; no zombie
    assert all(p.status() != psutil.STATUS_ZOMBIE for p in psutil.Process().children())


_FD_COUNT = "import os; print(len(os.listdir('/proc/self/fd')))"


def _fd_count_of_a_program(close_fds):
    out = subprocess.run([sys.executable, "-c", _FD_COUNT], close_fds=close_fds, capture_output=True, text=True)
    return int(out.stdout)


@pytest.mark.timeout(30)
def test_programs_inherit_only_stdio(tmp_path):
    r, w_ = os.pipe()
    os.set_inheritable(r, True)  # an inheritable fd of the launcher must not leak either
    out = open(tmp_path / "count", "w")
    try:
        ctx = _api.launch_programs([[sys.executable, "-c", _FD_COUNT]], [dict(os.environ)],
                                   stdio=[(out.fileno(), None)])
    finally:
        out.close()
        os.close(r)
        os.close(w_)
    ctx._run.wait_all(None)
    assert int((tmp_path / "count").read_text()) == _fd_count_of_a_program(close_fds=True)


@pytest.mark.timeout(30)
def test_enter_child_makes_only_stdio_inheritable():
    def check():  # in a fork child: enter_child also moves it to a group of its own
        r, w_ = os.pipe()  # close-on-exec, as every engine and zygote fd
        try:
            _core.enter_child(w_, [(r, 5)], [])
        except OSError as e:
            refused = e.errno == errno.EBADF
        else:
            return 1
        _core.enter_child(w_, [(r, 1)], [])
        ok = refused and os.get_inheritable(1) and not os.get_inheritable(r) and not os.get_inheritable(w_)
        return 0 if ok and os.read(r, 4) == os.getpid().to_bytes(4, sys.byteorder) else 2

    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = check()
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
