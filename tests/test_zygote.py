"""The warm zygote: children forked from a pristine pre-imported interpreter."""

import gc
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastspawn
from fastspawn import _api

import _zygote_workers as workers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _queue():
    return multiprocessing.get_context("spawn").SimpleQueue()


def _current_zygote():
    zygote = _api._zygotes.current
    assert zygote is not None, "no zygote is running"
    return zygote


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z" and not _is_my_child(pid)


def _is_my_child(pid):
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def _wait_gone(pids, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def _wait_dead(pid, seconds=20.0):
    """Whether ``pid`` exited (a zombie or gone) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                dead = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            dead = True
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.02)


@pytest.fixture
def fresh_zygote():
    """Each use starts from no zygote and leaves none behind."""
    _api._zygotes.shutdown()
    saved = list(_api._zygotes.preload)
    yield
    _api._zygotes.preload = saved
    _api._zygotes.shutdown()


def test_spawn_uses_zygote_and_children_are_the_callers(fresh_zygote):
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=3)
    zygote = _current_zygote()
    reports = sorted(q.get() for _ in range(3))
    assert [r[0] for r in reports] == [0, 1, 2]
    # clone(CLONE_PARENT): the caller is the parent, not the zygote.
    assert all(ppid == os.getpid() for _, _, ppid in reports)
    assert all(pid != zygote.pid for _, pid, _ in reports)
    # Reused across calls.
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    q.get()
    assert _current_zygote().pid == zygote.pid


def test_forkserver_uses_zygote(fresh_zygote):
    q = _queue()
    fastspawn.start_processes(workers.report_pid, args=(q,), nprocs=2, start_method="forkserver")
    assert _api._zygotes.current is not None
    assert sorted(r[0] for r in (q.get(), q.get())) == [0, 1]


def test_zygote_disabled_by_env_and_keyword(fresh_zygote, monkeypatch):
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1, zygote=False)
    q.get()
    assert _api._zygotes.current is None
    monkeypatch.setenv("FASTSPAWN_ZYGOTE", "0")
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    q.get()
    assert _api._zygotes.current is None


def test_warmup_starts_zygote(fresh_zygote):
    assert _api._zygotes.current is None
    fastspawn.warmup()
    pid = _current_zygote().pid
    assert not _gone(pid)
    fastspawn.spawn(workers.report_pid, args=(_queue(),), nprocs=1)
    assert _current_zygote().pid == pid


def test_request_carries_env_cwd_path_umask(fresh_zygote, monkeypatch, tmp_path):
    fastspawn.warmup()  # started before the changes below: children must see them anyway
    monkeypatch.setenv("FASTSPAWN_TEST_VALUE", "changed-after-warmup")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("/fastspawn-test-path-marker")
    old = os.umask(0o027)
    try:
        q = _queue()
        pid = _current_zygote().pid
        fastspawn.spawn(workers.report_context, args=(q,), nprocs=2)
    finally:
        os.umask(old)
    reports = [q.get() for _ in range(2)]
    for r in reports:
        assert r["env"] == "changed-after-warmup"
        assert r["cwd"] == str(tmp_path)
        assert r["path_marker"]
        assert r["umask"] == 0o027
    # sys.path changed, so the zygote was replaced; the new one is used.
    assert _current_zygote().pid != pid


def test_children_get_fresh_randomness(fresh_zygote):
    q = _queue()
    fastspawn.spawn(workers.report_context, args=(q,), nprocs=4)
    fastspawn.spawn(workers.report_context, args=(q,), nprocs=4)
    reports = [q.get() for _ in range(8)]
    assert len({r["random"] for r in reports}) == 8
    assert len({r["numpy"] for r in reports}) == 8


def test_children_get_fresh_torch_seed(fresh_zygote):
    pytest.importorskip("torch")
    fastspawn.preload(["torch"])
    q = _queue()
    fastspawn.spawn(workers.report_torch_random, args=(q,), nprocs=3)
    reports = [q.get() for _ in range(3)]
    assert len({seed for _, seed, _ in reports}) == 3
    assert len({value for _, _, value in reports}) == 3


def test_nested_spawn_through_zygote(fresh_zygote):
    q = multiprocessing.get_context("spawn").Queue()
    fastspawn.spawn(workers.nested, args=(q,), nprocs=1)
    items = [q.get(timeout=60) for _ in range(3)]
    nested = [i for i in items if i[0] == "nested"]
    leaves = sorted(i for i in items if i[0] != "nested")
    assert len(nested) == 1 and [leaf[0] for leaf in leaves] == [0, 1]
    _, middle_pid, pids = nested[0]
    # The grandchildren are the middle child's own children.
    assert sorted(pids) == sorted(leaf[1] for leaf in leaves)
    assert all(leaf[2] == middle_pid for leaf in leaves)


def test_zygote_killed_between_calls(fresh_zygote):
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    q.get()
    old = _current_zygote().pid
    os.kill(old, signal.SIGKILL)
    assert _wait_dead(old)
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=2)
    assert sorted(q.get()[0] for _ in range(2)) == [0, 1]
    assert _current_zygote().pid != old


def test_zygote_killed_mid_call(fresh_zygote, monkeypatch):
    monkeypatch.setenv("FASTSPAWN_TEST_CALLER", str(os.getpid()))
    import _zygote_killer

    fastspawn.preload(["json"])  # a new zygote, which sees the variable above
    fastspawn.warmup()
    before = set(_children())
    with pytest.raises(fastspawn.ZygoteError, match="died while starting 2 children"):
        fastspawn.spawn(_zygote_killer.work, nprocs=2)
    assert set(_children()) - before == set()
    # The next call starts a new zygote and works.
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    assert q.get()[0] == 0


def _children():
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(entry))
    return out


@pytest.mark.parametrize(
    "module, reason",
    [("_zygote_threads", "threads after its imports"), ("_zygote_fake_cuda", "CUDA was initialised")],
)
def test_unfit_zygote_falls_back_with_warning(fresh_zygote, module, reason):
    if module == "_zygote_fake_cuda":
        pytest.importorskip("torch")
    fastspawn.preload([module])
    q = _queue()
    with pytest.warns(RuntimeWarning, match=reason + ".*fresh interpreter"):
        fastspawn.spawn(workers.report_pid, args=(q,), nprocs=2)
    reports = [q.get() for _ in range(2)]
    assert sorted(r[0] for r in reports) == [0, 1]
    # A fresh interpreter per child: parent is the caller, and no fork of the zygote.
    assert all(ppid == os.getpid() for _, _, ppid in reports)
    # Warned once: the next call is silent (filterwarnings=error would fail it otherwise).
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    q.get()


def test_zygote_socket_is_unreachable(fresh_zygote):
    fastspawn.warmup()
    pid = _current_zygote().pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    assert inodes, "the zygote should hold its socketpair end"
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    for row in rows:
        if row[6] in inodes:
            assert len(row) == 7, f"zygote socket is bound to a name: {row[7]}"


def test_child_shares_zygote_memory(fresh_zygote):
    pytest.importorskip("torch")
    fastspawn.preload(["torch"])
    q = _queue()
    fastspawn.spawn(workers.memory, args=(q,), nprocs=1)
    _, rss, private = q.get()
    assert rss > 100_000  # kB: torch is mapped
    assert private < rss / 4, (rss, private)


DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import fastspawn

    def child(rank, path):
        import subprocess
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(path + f".{rank}", "w") as f:
            f.write(f"{os.getpid()} {grandchild.pid}")
        time.sleep(600)

    if __name__ == "__main__":
        ctx = fastspawn.spawn(child, args=(sys.argv[1],), nprocs=2, join=False)
        zygote = fastspawn._api._zygotes.current.pid
        with open(sys.argv[1] + ".zygote", "w") as f:
            f.write(str(zygote))
        ctx.join()
    """
)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_caller_sigkill_leaves_nothing(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    marker = str(tmp_path / "pids")
    proc = subprocess.Popen([sys.executable, str(script), marker])
    try:
        deadline = time.monotonic() + 60
        files = [marker + s for s in (".0", ".1", ".zygote")]
        while not all(_read(f) for f in files):
            assert time.monotonic() < deadline, "driver did not start its children"
            assert proc.poll() is None, "driver exited early"
            time.sleep(0.05)
        pids = [int(p) for f in files for p in _read(f).split()]
        assert len(pids) == 5
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


STALE_DRIVER = textwrap.dedent(
    """
    import os, sys
    import fastspawn

    def child(rank):
        pass

    if __name__ == "__main__":
        fastspawn.spawn(child, nprocs=1)
        first = fastspawn._api._zygotes.current.pid
        fastspawn.spawn(child, nprocs=1)
        same = fastspawn._api._zygotes.current.pid
        st = os.stat(__file__)
        os.utime(__file__, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        fastspawn.spawn(child, nprocs=1)
        after = fastspawn._api._zygotes.current.pid
        print(first == same, first != after)
    """
)


def test_stale_main_file_replaces_zygote(tmp_path):
    script = tmp_path / "stale.py"
    script.write_text(STALE_DRIVER)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


MAIN_GUARD_DRIVER = textwrap.dedent(
    """
    import os, sys
    import fastspawn

    print("main body ran in", os.getpid(), flush=True)

    def child(rank):
        os.write(1, f"child {rank} main name {sys.modules['__main__'].__name__}\\n".encode())

    if __name__ == "__main__":
        fastspawn.spawn(child, nprocs=2)
        fastspawn.spawn(child, nprocs=2)
    """
)


def test_main_module_imported_once_as_mp_main(tmp_path):
    script = tmp_path / "main_guard.py"
    script.write_text(MAIN_GUARD_DRIVER)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # Once in the caller, once in the zygote: never again per child.
    assert sum(line.startswith("main body ran") for line in lines) == 2
    assert sorted(line for line in lines if line.startswith("child")) == [
        "child 0 main name __mp_main__",
        "child 0 main name __mp_main__",
        "child 1 main name __mp_main__",
        "child 1 main name __mp_main__",
    ]


@pytest.mark.parametrize("zygote", [True, False])
def test_atexit_handlers_run_in_children_as_in_a_fresh_interpreter(fresh_zygote, tmp_path, zygote):
    base = str(tmp_path / "atexit")
    fastspawn.spawn(workers.register_atexit, args=(base,), nprocs=2, zygote=zygote)
    for rank in range(2):
        assert _read(f"{base}.{rank}") == "atexit ran"


def test_child_bootstrap_does_not_load_the_parent_side():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fastspawn._child; print('fastspawn._api' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.stdout.strip() == "False", out.stderr


def test_children_write_to_the_callers_current_stdout(fresh_zygote, tmp_path):
    fastspawn.warmup()  # its stdout is the original one
    out = tmp_path / "out.txt"
    saved = os.dup(1)
    try:
        with open(out, "w") as f:
            os.dup2(f.fileno(), 1)
        fastspawn.spawn(workers.print_rank, nprocs=2)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    text = _read(str(out))
    assert "rank-0" in text and "rank-1" in text, text


def test_zygote_child_only_has_the_fds_it_needs(fresh_zygote):
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        fastspawn.spawn(workers.report_open_fds, args=(writer,), nprocs=1)
        report = reader.recv()
    extra = {fd: target for fd, target in report["fds"].items() if fd > 2 and target != os.devnull}
    # Its control pipe (the parent sentinel), its result pipe, the resource tracker's
    # pipe and the connection it was given: nothing of the zygote's or its siblings'.
    assert report["sentinel"] in extra and report["conn"] in extra
    assert len(extra) == 4, extra
    assert not any(target.startswith("socket:") for target in extra.values()), extra


def test_context_changes_between_calls_reach_children(fresh_zygote, monkeypatch, tmp_path):
    # The context travels only when it changed since the zygote last took it on: each
    # change, and going back, must still reach the next call's children.
    q = _queue()

    def report():
        fastspawn.spawn(workers.report_context, args=(q,), nprocs=1)
        return q.get()

    monkeypatch.delenv("FASTSPAWN_TEST_VALUE", raising=False)
    first = report()
    assert first["env"] is None
    assert report()["env"] is None  # unchanged: nothing sent, same result
    monkeypatch.setenv("FASTSPAWN_TEST_VALUE", "one")
    assert report()["env"] == "one"
    monkeypatch.setenv("FASTSPAWN_TEST_VALUE", "two")
    assert report()["env"] == "two"
    monkeypatch.delenv("FASTSPAWN_TEST_VALUE")
    assert report()["env"] is None
    monkeypatch.chdir(tmp_path)
    assert report()["cwd"] == str(tmp_path)
    old = os.umask(0o077)
    try:
        assert report()["umask"] == 0o077
    finally:
        os.umask(old)
    assert report()["umask"] == old
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--fastspawn-test-arg"])
    fastspawn.spawn(workers.report_argv, args=(q,), nprocs=1)
    assert q.get()[-1] == "--fastspawn-test-arg"


def test_current_umask_reads_without_changing_it():
    from fastspawn import _core

    old = os.umask(0o023)
    try:
        assert _core.current_umask() == 0o023
        assert _core.current_umask() == 0o023
    finally:
        os.umask(old)


@pytest.mark.parametrize("zygote", [True, False])
def test_child_stdin_is_devnull_as_in_multiprocessing(fresh_zygote, zygote):
    q = _queue()
    fastspawn.spawn(workers.report_stdin, args=(q,), nprocs=1, zygote=zygote)
    report = q.get()
    assert report == {"read": "", "reads_from": os.devnull, "fd0_replaced": True, "original_closed": True}


def test_zygote_child_stdin_matches_a_multiprocessing_child(fresh_zygote):
    q = _queue()
    fastspawn.spawn(workers.report_stdin, args=(q,), nprocs=1)
    ours = q.get()
    proc = multiprocessing.get_context("spawn").Process(target=workers.report_stdin, args=(0, q))
    proc.start()
    theirs = q.get()
    proc.join()
    assert ours == theirs


def test_arguments_are_unpickled_in_each_child_unless_plain(fresh_zygote):
    # An argument with behaviour on unpickling is unpickled by each child, as spawn does;
    # only plain data and names may be loaded once in the zygote.
    q = _queue()
    fastspawn.spawn(workers.report_loaded_in, args=(q, workers.PidOnLoad()), nprocs=3)
    reports = sorted(q.get() for _ in range(3))
    assert [rank for rank, _, _ in reports] == [0, 1, 2]
    for _rank, pid, loaded_in in reports:
        assert loaded_in == pid


@pytest.mark.parametrize(
    "fn, args, plain",
    [
        (workers.report_pid, (), True),
        (workers.report_pid, (1, 2.5, "s", b"b", None, True, (1, [2, {3: frozenset({4})}])), True),
        (workers.report_pid, (workers.report_pid, workers.PidOnLoad, print, os.getpid), True),
        (print, (), True),
        (workers.report_pid, (workers.PidOnLoad(),), False),
        (lambda i: i, (), False),
        (workers.PidOnLoad().__setstate__, (), False),
        ("".join, (), False),
        (workers.report_pid, ([0] * 20_000,), False),  # too big to look through
        (workers.report_pid, (_queue(),), False),
    ],
)
def test_is_plain(fn, args, plain):
    from fastspawn import _payload

    assert _payload.is_plain(fn, args) is plain


def test_finalizers_made_in_the_zygote(fresh_zygote, monkeypatch, tmp_path):
    # Made by the zygote's imports: they fire in a child when what they watch dies there,
    # but are not run at a child's exit. The child's own exit finalizers do run.
    base = str(tmp_path / "fin")
    monkeypatch.setenv("FASTSPAWN_TEST_FINALIZER_BASE", base)
    monkeypatch.syspath_prepend(TESTS_DIR)
    fastspawn.preload(["_zygote_finalizers"])
    ctx = fastspawn.start_processes(workers.finalizers, args=(base,), nprocs=2, join=False)
    pids = ctx.pids()
    while not ctx.join():
        pass
    collected = _read(base + ".collected").splitlines()
    assert sorted(collected) == sorted(f"collected in {pid}" for pid in pids)
    for rank, pid in enumerate(pids):
        assert _read(f"{base}.own.{rank}") == f"own ran in {pid}\n"
    assert not os.path.exists(base + ".exit")


@pytest.mark.parametrize("nprocs", [2, 9, 17])
def test_every_rank_is_a_child_of_the_caller_leading_its_own_group(fresh_zygote, nprocs):
    # From 8 ranks on, a helper child forks half of them: they must look the same.
    q = _queue()
    ctx = fastspawn.start_processes(workers.report_group, args=(q,), nprocs=nprocs, join=False)
    reports = sorted(q.get() for _ in range(nprocs))
    while not ctx.join():
        pass
    assert [rank for rank, *_ in reports] == list(range(nprocs))
    assert [pid for _, pid, _, _ in reports] == ctx.pids()
    for _rank, pid, ppid, pgid in reports:
        assert ppid == os.getpid()
        assert pgid == pid


def test_a_fork_failing_mid_call_raises_and_leaves_nothing(fresh_zygote, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    fastspawn.preload(["_zygote_fork_fails"])
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)  # one child: no failure
    assert q.get()[0] == 0
    before = set(_children())
    with pytest.raises(fastspawn.ZygoteError, match="fork 2 of 3 failed"):
        fastspawn.spawn(workers.sleep_forever, args=(_queue(),), nprocs=3)
    assert _left_behind(before) == []  # the child it had forked was stopped
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    assert q.get()[0] == 0


# ------------------------------------------------------------------ faults (issue 10)
def _left_behind(before, seconds=10.0):
    """Children of this process (zombies included) not in ``before``, once they had
    ``seconds`` to go away."""
    deadline = time.monotonic() + seconds
    while True:
        extra = sorted(set(_children()) - set(before))
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def _describe(pids):
    """What each of ``pids`` is, for failure messages."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            state, cmd = "gone", ""
        out.append(f"{pid} {state} {cmd}")
    return "; ".join(out)


def _join_all(ctx, seconds=60.0):
    """Whether every rank of ``ctx`` exited successfully within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            return False
    return True


def _warm_start():
    """A zygote, and what the first call starts besides it (resource tracker) running."""
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)
    assert q.get()[0] == 0
    return _current_zygote()


def _works_again(nprocs=2):
    q = _queue()
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=nprocs)
    assert sorted(q.get()[0] for _ in range(nprocs)) == list(range(nprocs))


PIDS_CGROUP = "/sys/fs/cgroup/pids"


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def pids_cgroup():
    """A pids cgroup of our own (v1 controller), removed afterwards."""
    if not os.access(os.path.join(PIDS_CGROUP, "cgroup.procs"), os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 pids controller at {PIDS_CGROUP}")
    path = os.path.join(PIDS_CGROUP, f"fastspawn-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        _api._zygotes.shutdown()  # the zygote lives in it
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                try:
                    _write(os.path.join(PIDS_CGROUP, "cgroup.procs"), pid)
                except OSError:
                    pass  # gone meanwhile
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.mark.timeout(120)
def test_helper_fork_failing_raises_and_leaves_nothing(fresh_zygote, pids_cgroup, monkeypatch):
    # 8 ranks: the zygote forks ranks 0, 4 (its helper child), 1, 2, 3; the helper forks
    # 5, 6, 7. With room for the zygote and its 5 forks only, the helper's first fork
    # fails (EAGAIN); every child first waits until the cgroup is full (see the module).
    monkeypatch.syspath_prepend(TESTS_DIR)
    fastspawn.preload(["_zygote_fill_cgroup"])
    zygote = _warm_start()
    before = set(_children())
    _write(os.path.join(pids_cgroup, "cgroup.procs"), str(zygote.pid))
    _write(os.path.join(pids_cgroup, "pids.max"), "6")
    monkeypatch.setenv("FASTSPAWN_TEST_PIDS_CGROUP", pids_cgroup)
    with pytest.raises(fastspawn.ZygoteError, match="helper's fork 1 of 3 failed: Resource temporarily"):
        fastspawn.start_processes(workers.idle, nprocs=8, join=False)
    assert _left_behind(before) == []
    monkeypatch.delenv("FASTSPAWN_TEST_PIDS_CGROUP")
    _write(os.path.join(pids_cgroup, "pids.max"), "max")
    _works_again(8)
    assert _current_zygote().pid == zygote.pid  # it answered: no need for a new one


@pytest.mark.timeout(300)
def test_zygote_sigkilled_at_random_points_of_a_call(fresh_zygote):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    _warm_start()
    _api._zygotes.shutdown()
    before = set(_children())
    for trial in range(10):
        fastspawn.warmup()
        killer = threading.Timer(rng.uniform(0.0, 0.02), os.kill, (_current_zygote().pid, signal.SIGKILL))
        killer.start()
        try:
            ctx = fastspawn.start_processes(workers.exit_now, nprocs=16, join=False)
        except fastspawn.ZygoteError:
            pass
        else:
            assert _join_all(ctx), f"seed {seed} trial {trial}"
        finally:
            killer.join()
        _api._zygotes.shutdown()
        left = _left_behind(before)
        assert left == [], f"seed {seed} trial {trial}: {_describe(left)}"
    _works_again(16)


@pytest.mark.timeout(300)
def test_keyboard_interrupt_mid_request_leaves_nothing(fresh_zygote):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    armed = []

    def interrupt(signum, frame):
        if armed:
            armed.clear()
            raise KeyboardInterrupt

    _warm_start()
    _api._zygotes.shutdown()
    before = set(_children())
    previous = signal.signal(signal.SIGUSR2, interrupt)
    interrupted = 0
    try:
        for trial in range(12):
            fastspawn.warmup()
            ctx = None
            armed.append(True)
            timer = threading.Timer(rng.uniform(0.0, 0.02), signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR2))
            try:
                timer.start()
                try:
                    ctx = fastspawn.start_processes(workers.exit_now, nprocs=16, join=False)
                finally:
                    timer.join()  # the signal is sent: its handler runs in here at the latest
            except KeyboardInterrupt:
                interrupted += 1
            armed.clear()
            if ctx is not None:
                assert _join_all(ctx), f"seed {seed} trial {trial}"
            del ctx
            gc.collect()  # a run that was never returned stops its children when collected
            _api._zygotes.shutdown()
            left = _left_behind(before)
        assert left == [], f"seed {seed} trial {trial}: {_describe(left)}"
        assert interrupted, "no trial was interrupted"
    finally:
        signal.signal(signal.SIGUSR2, previous)
    _works_again(16)


BLOCKING_MAIN = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    import fastspawn

    if __name__ == "__mp_main__":
        time.sleep(600)  # the import of this module blocks in every worker, as a zygote's would

    def work(rank):
        pass

    if __name__ == "__main__":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            ctx = fastspawn.start_processes(work, nprocs=2, join=False)
            started = time.monotonic() - t0
            t0 = time.monotonic()
            joined = ctx.join(timeout=2)
            waited = time.monotonic() - t0
            # Same staleness key: no second zygote is tried (it would now be waited for
            # 600 s before giving up on it).
            os.environ["FASTSPAWN_ZYGOTE_TIMEOUT"] = "600"
            again = fastspawn.start_processes(work, nprocs=1, join=False)
        report = {
            "started": started, "joined": joined, "waited": waited,
            "zygote": fastspawn._api._zygotes.current is not None,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        }
        for context in (ctx, again):
            for p in context.processes:
                p.kill()
        print(json.dumps(report), flush=True)
    """
)


@pytest.mark.timeout(180)
def test_main_module_blocking_at_import_starts_fresh_interpreters(tmp_path):
    script = tmp_path / "blocking_main.py"
    script.write_text(BLOCKING_MAIN)
    line = BLOCKING_MAIN.splitlines().index(next(t for t in BLOCKING_MAIN.splitlines() if "time.sleep(600)" in t)) + 1
    env = dict(os.environ, FASTSPAWN_ZYGOTE_TIMEOUT="2", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    # start_processes returns once the zygote's start-up wait (2 s) is over and the ranks
    # run in fresh interpreters; join(timeout) honours its timeout, as torch's do.
    assert report["started"] < 30, report
    assert report["joined"] is False
    assert 1.9 <= report["waited"] < 30, report
    assert not report["zygote"]
    warned = [w for w in report["warnings"] if w.startswith("RuntimeWarning")]
    assert len(warned) == 1, report["warnings"]
    assert "did not finish starting within 2 s" in warned[0]
    assert f"its import is stuck at: {script}:{line} in <module>" in warned[0], warned[0]
    assert "fresh interpreter" in warned[0]


@pytest.mark.timeout(120)
def test_emfile_in_the_zygote_falls_back_and_leaves_nothing(fresh_zygote):
    zygote = _warm_start()
    before = set(_children()) - {zygote.pid}
    # Room for one more fd: the call's 2 pipes per rank, tracker and stdio cannot all arrive.
    held = {int(fd) for fd in os.listdir(f"/proc/{zygote.pid}/fd")}
    limit = [fd for fd in range(len(held) + 2) if fd not in held][1]  # its second free number
    resource.prlimit(zygote.pid, resource.RLIMIT_NOFILE, (limit, limit))
    q = _queue()
    with pytest.warns(RuntimeWarning, match="could not receive the call's [0-9]+ file descriptors"):
        fastspawn.spawn(workers.report_pid, args=(q,), nprocs=4)
    reports = sorted(q.get() for _ in range(4))
    assert [r[0] for r in reports] == [0, 1, 2, 3]
    assert _left_behind(before) == []  # the zygote too: retired and reaped
    _works_again()
    assert _current_zygote().pid != zygote.pid


def _cloexec(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return bool(flags & os.O_CLOEXEC)


@pytest.mark.timeout(60)
def test_every_fd_of_the_zygote_and_of_a_rank_is_close_on_exec(fresh_zygote):
    zygote = _warm_start()
    inheritable = [fd for fd in map(int, os.listdir(f"/proc/{zygote.pid}/fd")) if fd > 2 and not _cloexec(zygote.pid, fd)]
    assert inheritable == [], {fd: os.readlink(f"/proc/{zygote.pid}/fd/{fd}") for fd in inheritable}
    # What a request brings (the rank's pipes, the tracker's, a connection) arrives
    # close-on-exec too: a program the rank runs gets none of them.
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        fastspawn.spawn(workers.report_inheritable_fds, args=(writer,), nprocs=1)
        assert reader.recv() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zygote_dies", [False, True], ids=["zygote-replies", "zygote-dies-unanswered"])
def test_a_child_failing_before_it_announces_itself_is_still_supervised(fresh_zygote, monkeypatch, zygote_dies):
    monkeypatch.syspath_prepend(TESTS_DIR)
    fastspawn.preload(["_zygote_dies_unanswered" if zygote_dies else "_zygote_enter_fails"])
    _warm_start()  # one rank: nothing fails
    before = set(_children())
    # Rank 1 exits in enter_child without announcing itself. When the zygote replies, the
    # reply's pid makes it a rank like any other (its exit is seen and reaped). When the
    # zygote dies before replying, rank 0 is adopted from its announcement and stopped,
    # and rank 1 is found in the zygote's process group when the zygote is reaped, and
    # reaped too. Either way no unknown zombie of ours is left.
    if zygote_dies:
        with pytest.raises(fastspawn.ZygoteError):
            fastspawn.spawn(workers.exit_now, nprocs=2)
    else:
        with pytest.raises(fastspawn.ProcessExitedException) as failure:
            fastspawn.spawn(workers.exit_now, nprocs=2)
        assert (failure.value.error_index, failure.value.exit_code) == (1, 1)
    assert _left_behind(before) == [], _describe(_left_behind(before, 0))
    fastspawn.preload([])
    _works_again(1)


@pytest.mark.timeout(60)
def test_a_zygote_crashing_at_start_up_is_not_started_again(fresh_zygote, monkeypatch, tmp_path):
    log = tmp_path / "zygotes"
    monkeypatch.setenv("FASTSPAWN_TEST_CALLER", str(os.getpid()))
    monkeypatch.setenv("FASTSPAWN_TEST_CRASH_LOG", str(log))
    monkeypatch.syspath_prepend(TESTS_DIR)
    fastspawn.preload(["_zygote_crash_at_import"])
    q = _queue()
    with pytest.warns(RuntimeWarning, match=r"died while starting up \(exit code 3\).*fresh interpreter"):
        fastspawn.spawn(workers.report_pid, args=(q,), nprocs=2)
    reports = sorted(q.get() for _ in range(2))
    assert [r[0] for r in reports] == [0, 1] and all(ppid == os.getpid() for *_, ppid in reports)
    fastspawn.spawn(workers.report_pid, args=(q,), nprocs=1)  # silently fresh (warnings are errors)
    assert q.get()[0] == 0
    assert len(log.read_text().splitlines()) == 1  # one zygote tried for this preload list
