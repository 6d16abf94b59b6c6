"""fastspawn.get_context() against multiprocessing.get_context("spawn"), scenario by scenario.

Each scenario runs once with multiprocessing's spawn context and once with fastspawn's,
and what a user can observe (results, exit codes, exception types and messages, stderr
text) must be the same. fastspawn's side runs on both of its paths: children forked from
the warm zygote, and fresh interpreters (FASTSPAWN_ZYGOTE=0, the fallback). Child bodies
live in ``_context_workers``. The fastspawn-only tests at the end check what spawn cannot
show: where children come from, the background warm-up, children dying with their
parent, the exit of the interpreter.
"""

from __future__ import annotations

import inspect
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import _context_workers as w
import fastspawn
from _context_fixtures import WAIT, nothing_left_running  # noqa: F401 - autouse
from fastspawn import _api

pytestmark = pytest.mark.timeout(120)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=["zygote", "fresh"])
def path(request, monkeypatch):
    """fastspawn's two ways to start a child: forked from the zygote, or a fresh
    interpreter (the fallback). multiprocessing's side runs under the same environment."""
    if request.param == "fresh":
        monkeypatch.setenv("FASTSPAWN_ZYGOTE", "0")
    return request.param


def contexts():
    return {"spawn": multiprocessing.get_context("spawn"), "fastspawn": fastspawn.get_context()}


def both(scenario, *args):
    """``scenario(ctx, *args)`` with each context; what it returns must be equal."""
    seen = {name: scenario(ctx, *args) for name, ctx in contexts().items()}
    assert seen["fastspawn"] == seen["spawn"]
    return seen["spawn"]


def started(ctx, target, *args, **kwargs):
    process = ctx.Process(target=target, args=args, **kwargs)
    process.start()
    return process


def joined(process):
    process.join(WAIT)
    assert process.exitcode is not None, f"{process} did not exit within {WAIT} s"
    return process.exitcode


def _names(text):
    return re.sub(r"SpawnProcess-\d+", "SpawnProcess-N", text)


def _repr(process):
    return re.sub(r"=\d+", "=<pid>", _names(repr(process))).replace("exitcode=<pid>", "exitcode=N")


# ------------------------------------------------------------------------ the context
def test_context_has_spawns_api():
    ours, theirs = fastspawn.get_context(), multiprocessing.get_context("spawn")
    assert isinstance(ours, multiprocessing.context.BaseContext)
    assert isinstance(ours, fastspawn.FastspawnContext)
    assert fastspawn.get_context() is ours
    public = [name for name in dir(theirs) if not name.startswith("_")]
    assert public, "nothing to compare"
    for name in public:
        assert hasattr(ours, name), name
        mine, spawns = getattr(ours, name), getattr(theirs, name)
        if callable(spawns) and not isinstance(spawns, type):
            assert inspect.signature(mine) == inspect.signature(spawns), name
    assert ours.get_start_method() == theirs.get_start_method() == "spawn"
    assert ours.get_start_method(allow_none=True) == "spawn"
    assert ours.get_context() is ours
    assert ours.get_context("fork") is multiprocessing.get_context("fork")
    assert ours.cpu_count() == theirs.cpu_count()
    assert ours.Process is fastspawn.SpawnProcess
    assert ours.Process.__name__ == theirs.Process.__name__ == "SpawnProcess"
    assert issubclass(ours.Process, multiprocessing.process.BaseProcess)
    with pytest.raises(ValueError, match="cannot set start method of concrete context"):
        ours.set_start_method("fork")


# ------------------------------------------------------------------------ exit codes
EXITS = {
    "return": (w.return_value, ()),
    "exception": (w.raise_value_error, ()),
    "sys.exit(0)": (w.sys_exit, (0,)),
    "sys.exit(None)": (w.sys_exit, (None,)),
    "sys.exit(3)": (w.sys_exit, (3,)),
    "sys.exit(text)": (w.sys_exit, ("goodbye from the child",)),
    "os._exit(7)": (w.os_exit, (7,)),
    "SIGKILL": (w.kill_self, (signal.SIGKILL,)),
    "SIGTERM": (w.kill_self, (signal.SIGTERM,)),
    "SIGSEGV": (w.kill_self, (signal.SIGSEGV,)),
}


@pytest.mark.parametrize("case", sorted(EXITS))
def test_exit_code_and_stderr(case, path, capfd):
    target, args = EXITS[case]

    def scenario(ctx):
        capfd.readouterr()
        process = started(ctx, target, *args)
        code = joined(process)
        err = capfd.readouterr().err
        return {
            "exitcode": code,
            "stderr": _names(err),
            "repr": _repr(process),
            "alive": process.is_alive(),
        }

    seen = both(scenario)
    if case == "exception":
        assert seen["stderr"].startswith("Process SpawnProcess-N:\nTraceback (most recent call last):\n")
        assert seen["stderr"].endswith("ValueError: bad value 42\n")
    assert seen["exitcode"] == {"exception": 1, "sys.exit(3)": 3, "sys.exit(text)": 1, "os._exit(7)": 7,
                                "SIGKILL": -9, "SIGTERM": -15, "SIGSEGV": -11}.get(case, 0)


def test_terminate_and_kill(path):
    def scenario(ctx):
        out = []
        for method in ("terminate", "kill"):
            process = started(ctx, w.sleep_long)
            getattr(process, method)()
            out.append((joined(process), _repr(process)))
            getattr(process, method)()  # after the exit: nothing happens
        return out

    assert both(scenario)[0][0] == -signal.SIGTERM


# ------------------------------------------------------------------------ join, close, sentinel
def test_join_timeout_sentinel_and_close(path):
    def scenario(ctx):
        event = ctx.Event()
        process = started(ctx, w.wait_event, event)
        seen = {"join": process.join(0.05), "exitcode": process.exitcode, "alive": process.is_alive()}
        seen["sentinel_ready"] = multiprocessing.connection.wait([process.sentinel], timeout=0)
        seen["active"] = process in multiprocessing.active_children()
        with pytest.raises(ValueError) as running:
            process.close()
        seen["close_running"] = str(running.value)
        event.set()
        ready = multiprocessing.connection.wait([process.sentinel], timeout=WAIT)
        seen["sentinel_after"] = ready == [process.sentinel]
        seen["exit"] = joined(process)
        seen["active_after"] = process in multiprocessing.active_children()
        process.close()
        process.close()  # twice is fine
        for name in ("exitcode", "is_alive", "join", "terminate", "sentinel", "pid"):
            with pytest.raises(ValueError) as closed:
                attribute = getattr(process, name)
                if callable(attribute):
                    attribute()
            seen[f"closed_{name}"] = str(closed.value)
        seen["repr"] = _names(repr(process))
        return seen

    seen = both(scenario)
    assert seen["close_running"].startswith("Cannot close a process while it is still running")
    assert seen["sentinel_ready"] == [] and seen["sentinel_after"] is True


def test_close_releases_the_processs_descriptors(path):
    def scenario(ctx):
        def start_join_close():
            process = started(ctx, w.return_value)
            joined(process)
            process.close()

        start_join_close()  # what the first start sets up for good (resource tracker...)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            start_join_close()
        return len(os.listdir("/proc/self/fd")) - before

    assert both(scenario) == 0


def test_start_twice_and_before_start(path):
    def scenario(ctx):
        process = ctx.Process(target=w.return_value)
        seen = {"alive": process.is_alive(), "exitcode": process.exitcode, "pid": process.pid}
        with pytest.raises(ValueError) as no_sentinel:
            process.sentinel
        seen["sentinel"] = str(no_sentinel.value)
        with pytest.raises(AssertionError) as not_started:
            process.join()
        seen["join"] = str(not_started.value)
        process.start()
        with pytest.raises(AssertionError) as twice:
            process.start()
        seen["twice"] = str(twice.value)
        seen["exit"] = joined(process)
        return seen

    both(scenario)


# ------------------------------------------------------------------------ names, identity, parent
def test_names_identity_authkey_and_parent(path):
    def scenario(ctx):
        queue = ctx.SimpleQueue()
        out = []
        for kwargs in ({}, {"name": "custom-name", "daemon": True}):
            process = ctx.Process(target=w.report_identity, args=(queue,), **kwargs)
            if kwargs:
                process.authkey = b"a key of its own"
            process.start()
            report = queue.get()
            joined(process)
            assert report["name"] == process.name
            assert report["identity"] == process._identity
            assert report["parent_pid"] == report["ppid"] == os.getpid()
            assert report["authkey"] == bytes(process.authkey)
            report["name"] = _names(report["name"])
            report["identity"] = len(report["identity"])
            report["parent_pid"] = report["ppid"] = "<parent>"
            out.append(report)
        return out

    first, second = both(scenario)
    assert first["authkey"] == bytes(multiprocessing.current_process().authkey)
    assert first["process_class"] == "SpawnProcess" and first["daemon"] is False
    assert second["name"] == "custom-name" and second["daemon"] is True
    assert first["parent_alive"] is True and first["start_method"] == "spawn"
    assert first["stdin"] == ("/dev/null", False)


def test_process_subclass_with_its_own_run(path):
    def scenario(ctx):
        queue = ctx.Queue()
        kind = w.FastspawnSubclass if isinstance(ctx, fastspawn.FastspawnContext) else w.SpawnSubclass
        process = kind(queue)
        process.start()
        report = queue.get(timeout=WAIT)
        return report, joined(process)

    assert both(scenario) == (("run", True, True, True), 0)


def test_args_and_kwargs(path):
    def scenario(ctx):
        queue = ctx.Queue()
        process = ctx.Process(target=w.put_kwargs, args=(queue, 1, "two"), kwargs={"three": 3.0, "four": [4]})
        process.start()
        return queue.get(timeout=WAIT), joined(process)

    assert both(scenario) == (((1, "two"), [("four", [4]), ("three", 3.0)]), 0)


def test_daemonic_processes_cannot_have_children_others_can(path):
    def scenario(ctx):
        queue = ctx.Queue()
        out = []
        for daemon in (True, False):
            process = started(ctx, w.start_grandchild, queue, daemon=daemon)
            out.append((queue.get(timeout=WAIT), joined(process)))
        return out

    refused, allowed = both(scenario)
    assert refused == (("refused", "AssertionError", "daemonic processes are not allowed to have children"), 0)
    assert allowed == (("started", 0), 0)


# ------------------------------------------------------------------------ the caller's state
def test_child_sees_the_callers_current_env_cwd_path_argv(path, monkeypatch, tmp_path):
    def scenario(ctx):
        queue = ctx.Queue()
        process = started(ctx, w.report_context, queue, "FASTSPAWN_CONTEXT_PROBE")
        report = queue.get(timeout=WAIT)
        joined(process)
        return report

    fastspawn.get_context()  # a zygote warmed before the changes below must follow them
    monkeypatch.setenv("FASTSPAWN_CONTEXT_PROBE", "set after the context was made")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--an-argument"])
    seen = both(scenario)
    assert seen["env"] == "set after the context was made"
    assert seen["cwd"] == str(tmp_path)
    assert seen["sys_path"][0] == str(tmp_path)
    assert seen["argv"][-1] == "--an-argument"


def test_atexit_handlers_run_in_the_child(path, tmp_path):
    def scenario(ctx):
        marker = tmp_path / f"atexit-{type(ctx).__name__}"
        code = joined(started(ctx, w.register_atexit, str(marker)))
        return code, marker.read_text()

    assert both(scenario) == (0, "atexit ran")


# ------------------------------------------------------------------------ shared objects
def test_queue_flushed_at_child_exit(path):
    def scenario(ctx):
        queue = ctx.Queue()
        process = started(ctx, w.put_big_and_return, queue, 4 << 20)
        data = queue.get(timeout=WAIT)
        return len(data), joined(process)

    assert both(scenario) == (4 << 20, 0)


def test_pipe(path):
    def scenario(ctx):
        ours, theirs = ctx.Pipe()
        process = started(ctx, w.echo_doubled, theirs)
        theirs.close()
        ours.send([1, 2])
        assert ours.poll(WAIT)
        return ours.recv(), joined(process)

    assert both(scenario) == ([1, 2, 1, 2], 0)


def test_lock_value_array(path):
    def scenario(ctx):
        lock, value, array = ctx.Lock(), ctx.Value("i", 0), ctx.Array("d", 2)
        processes = [started(ctx, w.count_under_lock, lock, value, array, 200) for _ in range(2)]
        codes = [joined(p) for p in processes]
        return codes, value.value, list(array)

    assert both(scenario) == ([0, 0], 400, [600.0, 0.0])


def test_events_between_children(path):
    def scenario(ctx):
        first, second = ctx.Event(), ctx.Event()
        process = started(ctx, w.set_event_after, first, second)
        first.set()
        return second.wait(WAIT), joined(process)

    assert both(scenario) == (True, 0)


def test_joinable_queue(path):
    def scenario(ctx):
        tasks, results = ctx.JoinableQueue(), ctx.Queue()
        process = started(ctx, w.drain_joinable, tasks, results)
        for item in (1, 2, 3, None):
            tasks.put(item)
        tasks.join()
        return sorted(results.get(timeout=WAIT) for _ in range(3)), joined(process)

    assert both(scenario) == ([10, 20, 30], 0)


def test_manager(path):
    def scenario(ctx):
        with ctx.Manager() as manager:
            mapping, items = manager.dict(), manager.list()
            code = joined(started(ctx, w.fill_managed, mapping, items))
            return code, dict(mapping), list(items)

    assert both(scenario) == (0, {"pid_is_int": True}, ["from child"])


# ------------------------------------------------------------------------ what cannot be sent
@pytest.mark.parametrize("unpicklable", ["lock", "generator"])
def test_unpicklable_argument_fails_at_start_with_spawns_exception(path, unpicklable):
    def scenario(ctx):
        arg = threading.Lock() if unpicklable == "lock" else (i for i in range(3))
        process = ctx.Process(target=w.put, args=(None, arg))
        with pytest.raises(Exception) as raised:
            process.start()
        return type(raised.value), str(raised.value), process.exitcode, process.is_alive()

    seen = {name: scenario(ctx) for name, ctx in contexts().items()}
    ours, theirs = seen["fastspawn"], seen["spawn"]
    assert ours[0] is theirs[0]
    assert ours[1].startswith(theirs[1])
    assert ours[2:] == theirs[2:] == (None, False)


# ------------------------------------------------------------------------ fastspawn only
def test_closures_and_lambdas_as_targets(path):
    """spawn cannot send them; fastspawn sends them by value (everything else as spawn)."""
    ctx = fastspawn.get_context()
    queue = ctx.Queue()
    offset = 5

    def closure(q, x):
        q.put(x + offset)

    results = []
    for target in (closure, lambda q, x: q.put(x * 2)):
        process = started(ctx, target, queue, 10)
        results.append(queue.get(timeout=WAIT))
        assert joined(process) == 0
    assert results == [15, 20]
    with pytest.raises((AttributeError, pickle.PicklingError)):
        multiprocessing.get_context("spawn").Process(target=closure, args=(queue, 1)).start()


def test_children_fork_from_the_zygote_or_start_fresh(path):
    ctx = fastspawn.get_context()
    queue = ctx.SimpleQueue()
    process = started(ctx, w.report_zygote, queue)
    from_zygote = queue.get()
    joined(process)
    assert from_zygote is (path == "zygote")


def test_each_child_leads_its_own_process_group(path):
    """Unlike spawn's (documented): what a child starts is stopped with it, and a
    terminal's Ctrl-C reaches the parent only."""
    ctx = fastspawn.get_context()
    queue = ctx.Queue()
    process = started(ctx, w.report_process_group, queue)
    # asked in the child, once it runs: start() may return before the child has set its group
    pid, group = queue.get(timeout=WAIT)
    assert joined(process) == 0
    assert pid == process.pid == group != os.getpgid(0)


def test_child_of_a_context_does_not_load_the_parent_side():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fastspawn._context; print('fastspawn._api' in sys.modules)"],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert out.stdout.strip() == "False", out.stderr


WARM_DRIVER = textwrap.dedent(
    """
    import sys
    import fastspawn
    from fastspawn import _api, _prewarm

    ctx = fastspawn.get_context()          # returns at once; the zygote starts behind it
    assert _prewarm.wait(60), "the background warm-up did not finish"
    zygote = _api._zygotes.current
    assert zygote is not None and zygote.alive(), "no zygote was started"
    print("warm", zygote.pid)
    """
)


def test_getting_the_context_warms_the_zygote_in_the_background(tmp_path):
    script = tmp_path / "warm.py"
    script.write_text(WARM_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "FASTSPAWN_ZYGOTE"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("warm "), out.stdout


EXIT_DRIVER = textwrap.dedent(
    """
    import multiprocessing, signal, sys, time
    import fastspawn

    def linger(release):
        release.wait(60)  # set as the main module ends: the exit must wait for what follows
        print("non-daemon child done", flush=True)

    def square(x):
        return x * x

    def ignore_sigterm():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)

    if __name__ == "__main__":
        which, pids_file = sys.argv[1:3]
        ctx = fastspawn.get_context() if which == "fastspawn" else multiprocessing.get_context(which)
        daemon = ctx.Process(target=time.sleep, args=(300,), daemon=True)
        daemon.start()
        release = ctx.Event()
        other = ctx.Process(target=linger, args=(release,))
        other.start()
        pool = ctx.Pool(2)                      # neither closed nor joined
        print(pool.map(square, range(4)), flush=True)
        manager = ctx.Manager()                 # not shut down
        shared = manager.dict(a=1)
        pids = [daemon.pid, other.pid, manager._process.pid] + [p.pid for p in pool._pool]
        if "--stubborn" in sys.argv:
            stubborn = ctx.Process(target=ignore_sigterm, daemon=True)
            stubborn.start()
            pids.append(stubborn.pid)
        with open(pids_file, "w") as f:
            f.write(" ".join(map(str, pids)))
        print("main done", dict(shared), flush=True)
        release.set()
    """
)


def _run_exit_driver(tmp_path, which, *flags):
    script, pids = tmp_path / "exits.py", tmp_path / f"pids-{which}"
    script.write_text(EXIT_DRIVER)
    out = subprocess.run(
        [sys.executable, str(script), which, str(pids), *flags], capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
    left = [pid for pid in map(int, pids.read_text().split()) if os.path.exists(f"/proc/{pid}")]
    assert not left, f"children outlived the program: {left}"
    return out.stdout


def test_exit_ends_daemonic_children_pools_managers_and_waits_for_the_others(tmp_path):
    ours = _run_exit_driver(tmp_path, "fastspawn")
    assert ours.splitlines() == ["[0, 1, 4, 9]", "main done {'a': 1}", "non-daemon child done"], ours
    assert ours == _run_exit_driver(tmp_path, "spawn")


def test_exit_stops_a_daemonic_child_that_ignores_sigterm(tmp_path):
    """multiprocessing's exit step would join it forever: fastspawn's stop kills it."""
    ours = _run_exit_driver(tmp_path, "fastspawn", "--stubborn")
    assert ours.splitlines()[-1] == "non-daemon child done", ours


ORPHAN_DRIVER = textwrap.dedent(
    """
    import sys, time
    import fastspawn

    if __name__ == "__main__":
        ctx = fastspawn.get_context()
        child = ctx.Process(target=time.sleep, args=(300,))
        child.start()
        print(child.pid, flush=True)
        time.sleep(300)
    """
)


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_children_die_with_their_parent(tmp_path, zygote):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_DRIVER)
    env = dict(os.environ, FASTSPAWN_ZYGOTE=zygote)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(driver.stdout.readline())
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a process that is not ours: no fd to wait on
        assert not os.path.exists(f"/proc/{child}"), "the child outlived its parent"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(WAIT)
        driver.stdout.close()


def test_fallback_to_fresh_interpreters_warns_once(monkeypatch):
    monkeypatch.setattr(_api._zygotes, "warned", set())
    monkeypatch.setattr(_api._zygotes, "get", _unfit_zygote)
    ctx = fastspawn.get_context()
    queue = ctx.SimpleQueue()
    with pytest.warns(RuntimeWarning, match="starting each child in a fresh interpreter instead"):
        process = started(ctx, w.report_zygote, queue)
    assert queue.get() is False
    assert joined(process) == 0


def _unfit_zygote(preparation, background=False):
    _api._zygotes.fallback_warning(("test",), "the zygote is unfit for this test")
    return None
