"""The pytest plugin (fastspawn.pytest_plugin), driven through pytester: each test writes
a small test suite, runs pytest on it (in a subprocess where isolation matters) and checks
the outcome, the report, and what the ranks recorded."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _plugin_recorder import recorded, still_running
from _testing_freezer import freezer_cgroup  # noqa: F401  (a fixture)
from _testing_stacks import DEPTH, THREADS

pytest_plugins = ["pytester"]

# The inner suites import it as "recorder": ranks record facts as JSON files.
RECORDER = (Path(__file__).parent / "_plugin_recorder.py").read_text()
# ... and these as "stacks" (a big stack dump) and "freezer" (a rank that cannot die).
STACKS = (Path(__file__).parent / "_testing_stacks.py").read_text()
FREEZER = (Path(__file__).parent / "_testing_freezer.py").read_text()

# The inner sessions run as strictly as this project's own.
INNER_INI = """
[pytest]
filterwarnings =
    error
    ignore:Module already imported so cannot be rewritten. _editable_skbc_:pytest.PytestAssertRewriteWarning
"""

NOTHING_LEFT = '''

def test_zz_nothing_left_running():
    from recorder import recorded_pids, still_running
    pids = recorded_pids()
    assert pids
    assert still_running(pids) == []
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.Pytester:
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("RECORD_DIR", str(records))
    monkeypatch.setenv("COLUMNS", "300")  # summary lines unabridged
    pytester.makeini(INNER_INI)
    pytester.makepyfile(recorder=RECORDER)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--strict-markers", *args, timeout=120)


def line(path: Path, text: str) -> int:
    """The number of the first line of the file containing ``text``."""
    return next(i for i, content in enumerate(path.read_text().splitlines(), 1) if text in content)


# ------------------------------------------------------------------------- passing
PASSING = """
import os, subprocess, sys
import pytest
from recorder import record

IMPORTED_IN = os.getpid()  # the zygote's pid when the zygote imports this module

class Payload:
    def __init__(self, value):
        self.value = value

@pytest.fixture
def payload():
    return Payload(41)

@pytest.fixture
def pytest_pid():
    return os.getpid()

@pytest.mark.spawn(nprocs=3)
def test_env(rank, world_size, init_method, pytest_pid, payload, tmp_path):
    if rank == 2:  # left running when the test passes: it must not outlive the test
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        record("grandchild", pid=child.pid)
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    record(f"env-{rank}", env={k: os.environ[k] for k in names}, rank=rank,
           world_size=world_size, init_method=init_method, pid=os.getpid(),
           ppid=os.getppid(), pytest_pid=pytest_pid, imported_in=IMPORTED_IN,
           payload=payload.value, tmp_path=str(tmp_path))

@pytest.mark.parametrize("value", ["a", "b"])
@pytest.mark.spawn(nprocs=2)
def test_param(rank, value, init_method):
    record(f"param-{value}-{rank}", value=value, port=os.environ["MASTER_PORT"],
           init_method=init_method, imported_in=IMPORTED_IN, pid=os.getpid())

class TestClass:
    @pytest.mark.spawn(nprocs=2)
    def test_method(self, rank):
        record(f"method-{rank}", pid=os.getpid(), imported_in=IMPORTED_IN)

@pytest.mark.spawn(nprocs=2, start_method="fork")
def test_fork(rank, payload, pytest_pid):
    record(f"fork-{rank}", pid=os.getpid(), ppid=os.getppid(), pytest_pid=pytest_pid,
           payload=payload.value, module_from=IMPORTED_IN)

@pytest.mark.spawn(nprocs=2, start_method="forkserver")
def test_forkserver(rank, payload):
    record(f"forkserver-{rank}", pid=os.getpid(), payload=payload.value, module_from=IMPORTED_IN)
""" + NOTHING_LEFT


def test_ranks_get_env_fixtures_and_parameters(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_passing=PASSING)
    result = run(suite)
    result.assert_outcomes(passed=7)
    seen = recorded()
    env = [seen[f"env-{r}"] for r in range(3)]
    port = env[0]["env"]["MASTER_PORT"]
    for r, data in enumerate(env):
        assert data["rank"] == r
        assert data["world_size"] == 3
        assert data["env"] == {
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }
        assert data["payload"] == 41  # a fixture's value, pickled to every rank
        assert data["tmp_path"] == env[0]["tmp_path"]  # evaluated once, in pytest
        assert data["init_method"] == env[0]["init_method"]
        assert data["ppid"] == data["pytest_pid"]  # the ranks are pytest's children
    assert env[0]["init_method"].startswith("file://")
    assert [seen[f"param-{v}-{r}"]["value"] for v in "ab" for r in range(2)] == ["a", "a", "b", "b"]
    ports = {port, seen["param-a-0"]["port"], seen["param-b-0"]["port"]}
    assert len(ports) == 3 and seen["param-a-0"]["port"] == seen["param-a-1"]["port"]
    assert seen["param-a-0"]["init_method"] != seen["param-b-0"]["init_method"] != env[0]["init_method"]
    assert seen["method-0"] and seen["method-1"]
    # fork: forks of pytest itself; forkserver: forks of the zygote, as spawn.
    assert [seen[f"fork-{r}"]["module_from"] for r in range(2)] == [env[0]["pytest_pid"]] * 2
    assert all(seen[f"fork-{r}"]["ppid"] == env[0]["pytest_pid"] for r in range(2))
    assert [seen[f"forkserver-{r}"]["module_from"] for r in range(2)] == [env[0]["imported_in"]] * 2
    assert [seen[f"{m}-{r}"]["payload"] for m in ("fork", "forkserver") for r in range(2)] == [41] * 4
    # The test module was imported once, by the zygote (neither pytest nor a rank), and
    # every test's ranks were forked from it.
    ranks = [data for data in seen.values() if "imported_in" in data]
    imported_in = {data["imported_in"] for data in ranks}
    assert len(imported_in) == 1
    assert imported_in.isdisjoint({env[0]["pytest_pid"]} | {data["pid"] for data in ranks})


# ------------------------------------------------------------------------- failing
FAILING = """
import pytest

@pytest.mark.spawn(nprocs=2)
def test_one_rank_fails(rank):
    assert [0, rank, 2] == [0, 1, 2]

@pytest.mark.spawn(nprocs=3)
def test_two_ranks_fail(rank):
    doubled = rank * 2
    assert doubled == 2
"""


@pytest.mark.parametrize(
    "import_mode, zygote",
    [("prepend", "1"), ("importlib", "1"), ("prepend", "0")],
    ids=["prepend", "importlib", "fresh-interpreters"],
)
def test_failing_ranks_are_reported_with_assertion_explanations(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, import_mode: str, zygote: str
) -> None:
    # Ranks forked from the zygote (which imported the test module rewritten), or fresh
    # interpreters that import it themselves.
    monkeypatch.setenv("FASTSPAWN_ZYGOTE", zygote)
    suite.makepyfile(test_failing=FAILING)
    result = run(suite, f"--import-mode={import_mode}")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_one_rank_fails _*",
            "rank 0: AssertionError: assert [[]0, 0, 2[]] == [[]0, 1, 2[]]",
            "*- rank 0 of 2 (pid *) failed -*",
            "rank = 0",
            ">       assert [[]0, rank, 2[]] == [[]0, 1, 2[]]",
            "E       assert [[]0, 0, 2[]] == [[]0, 1, 2[]]",
            "E         At index 1 diff: 0 != 1",
            "test_failing.py:5: AssertionError",
            "*_ test_two_ranks_fail _*",
            "rank 0: AssertionError: assert 0 == 2; rank 2: AssertionError: assert 4 == 2",
            "*- rank 0 of 3 (pid *) failed -*",
            ">       assert doubled == 2",
            "E       assert 0 == 2",
            "*- rank 2 of 3 (pid *) failed -*",
            ">       assert doubled == 2",
            "E       assert 4 == 2",
            "*short test summary info*",
            "FAILED test_failing.py::test_one_rank_fails - rank 0: AssertionError: assert*",
            "FAILED test_failing.py::test_two_ranks_fail - rank 0: AssertionError: assert 0 == 2*",
        ]
    )
    assert "rank 1 of 2" not in result.stdout.str() and "rank 1 of 3" not in result.stdout.str()


# -------------------------------------------------------------------- skip, xfail
OUTCOMES = """
import pytest

@pytest.mark.spawn(nprocs=2)
def test_skipped(rank):
    pytest.skip("no GPUs here")

@pytest.mark.spawn(nprocs=2)
def test_imperative_xfail(rank):
    if rank == 1:
        pytest.xfail("rank 1 knows")

@pytest.mark.xfail(raises=ZeroDivisionError, reason="divides by zero", strict=True)
@pytest.mark.spawn(nprocs=2)
def test_xfail_marker(rank):
    1 / rank

@pytest.mark.xfail(raises=ZeroDivisionError, strict=True)
@pytest.mark.spawn(nprocs=2)
def test_xfail_marker_other_exception(rank):
    raise KeyError(rank)

@pytest.mark.xfail(reason="expected to fail", strict=True)
@pytest.mark.spawn(nprocs=2)
def test_xpass_strict(rank):
    pass

@pytest.mark.xfail(reason="expected to fail", strict=True)
def test_plain_xpass_strict():
    pass
"""


def test_skip_and_xfail_behave_as_in_a_plain_test(suite: pytest.Pytester) -> None:
    path = suite.makepyfile(test_outcomes=OUTCOMES)
    result = run(suite)
    result.assert_outcomes(skipped=1, xfailed=2, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            f"SKIPPED [[]1[]] test_outcomes.py:{line(path, 'pytest.skip(')}: no GPUs here",
            "XFAIL test_outcomes.py::test_imperative_xfail - rank 1: rank 1 knows",
            "XFAIL test_outcomes.py::test_xfail_marker - divides by zero",
            "FAILED test_outcomes.py::test_xfail_marker_other_exception - rank 0: KeyError: 0*",
        ]
    )
    # A strict xpass is summarised as this pytest summarises a plain one (pytest 9 adds
    # the reason to the line, pytest 8 does not).
    plain = "FAILED test_outcomes.py::test_plain_xpass_strict"
    summary = next(text for text in result.outlines if text.startswith(plain))
    assert summary.replace(plain, "FAILED test_outcomes.py::test_xpass_strict") in result.outlines


# ------------------------------------------------------------------------- timeout
TIMEOUT = """
import os, subprocess, sys, threading
import pytest
from recorder import record

def hang_in_rank_zero():
    threading.Event().wait()

def hang_in_rank_one():
    threading.Event().wait()

def helper_thread_waits(started):
    started.set()
    threading.Event().wait()

@pytest.mark.spawn(nprocs=2, timeout=1.5)
def test_hangs(rank):
    record(f"hang-{rank}", pid=os.getpid())
    if rank == 0:
        started = threading.Event()
        threading.Thread(target=helper_thread_waits, args=(started,), daemon=True).start()
        started.wait()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        record("grandchild", pid=child.pid)
        hang_in_rank_zero()
    hang_in_rank_one()

@pytest.mark.spawn(nprocs=2)
def test_default_timeout(rank):
    record(f"default-{rank}", pid=os.getpid())
    hang_in_rank_one()
""" + NOTHING_LEFT


def test_timeout_reports_every_rank_stack_and_kills_everything(suite: pytest.Pytester) -> None:
    path = suite.makepyfile(test_timeout=TIMEOUT)
    suite.makeini(INNER_INI + "spawn_timeout = 60\n")
    result = run(suite, "--spawn-timeout=1")  # the marker's timeout= wins over it
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_hangs _*",
            "spawn timeout: 2 of 2 rank(s) still running after 1.5 s; their stacks when it expired are below",
            "*- rank 0 of 2 (pid *) was stopped; its stack when the timeout expired -*",
            "Thread 0x*",
            "*in helper_thread_waits",
            "Current thread 0x*",
            f'  File "*test_timeout.py", line {line(path, "def hang_in_rank_zero") + 1} in hang_in_rank_zero',
            f'  File "*test_timeout.py", line {line(path, "        hang_in_rank_zero()")} in test_hangs',
            "*- rank 1 of 2 (pid *) was stopped; its stack when the timeout expired -*",
            f'  File "*test_timeout.py", line {line(path, "def hang_in_rank_one") + 1} in hang_in_rank_one',
            f'  File "*test_timeout.py", line {line(path, "    hang_in_rank_one()")} in test_hangs',
            "*_ test_default_timeout _*",
            "spawn timeout: 2 of 2 rank(s) still running after 1 s; *",
        ]
    )
    # The stack is the test's: the rank's bootstrap frames below it are cut.
    assert "_child.py" not in result.stdout.str()
    seen = recorded()
    assert still_running([data["pid"] for data in seen.values()]) == []  # the grandchild too


BIG_DUMP = """
import threading
import pytest
from stacks import start_deep_threads

@pytest.mark.spawn(nprocs=1, timeout=1)
def test_big_dump(rank):
    start_deep_threads()
    threading.Event().wait()
"""


def test_a_big_stack_dump_arrives_whole(suite: pytest.Pytester) -> None:
    # THREADS threads DEPTH frames deep: about 600 KiB of stacks at SIGTERM, all in the report,
    # down to the test's own frame in the main thread, which faulthandler writes last.
    suite.makepyfile(test_big_dump=BIG_DUMP, stacks=STACKS)
    result = run(suite)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert out.count("in descend_to_fill_a_stack_dump_with_long_lines") == THREADS * DEPTH
    assert out.rindex("in test_big_dump") > out.rindex("in descend_to_fill_a_stack_dump_with_long_lines")


# -------------------------------------------------------------- a rank that cannot die
# Rank 0 freezes rank 1 (cgroup freezer): at the timeout rank 1 neither dumps its stacks
# nor dies of SIGKILL. The fixture, in the pytest process, thaws it after the test.
FROZEN = """
import os, threading, time
import pytest
import freezer
from recorder import record, recorded

@pytest.fixture
def cgroup():
    joined_at = time.monotonic()
    yield os.environ["FREEZER_CGROUP"]
    joined = time.monotonic() - joined_at
    freezer.thaw(os.environ["FREEZER_CGROUP"])
    pid = recorded()["frozen"]["pid"]
    # Thawed, it dies of the pending SIGKILL; the engine's reaper reaps it.
    record("after", joined=joined, reaped=freezer.gone(pid))

@pytest.mark.spawn(nprocs=2, timeout=3)
def test_frozen_rank(rank, cgroup):
    record(f"rank-{rank}", pid=os.getpid())
    if rank == 0:
        deadline = time.monotonic() + 60
        while "rank-1" not in recorded():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pid = recorded()["rank-1"]["pid"]
        freezer.freeze(cgroup, pid)
        record("frozen", pid=pid)
    threading.Event().wait()
""" + NOTHING_LEFT


@pytest.mark.timeout(240)
def test_a_rank_that_cannot_die_fails_the_test_within_the_stop_bounds(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, freezer_cgroup: str
) -> None:
    from fastspawn import _core
    from fastspawn.pytest_plugin import _STOP_GRACE_SECONDS

    monkeypatch.setenv("FREEZER_CGROUP", freezer_cgroup)
    suite.makepyfile(test_frozen=FROZEN, freezer=FREEZER)
    bound = 3 + _STOP_GRACE_SECONDS + _core.KILL_WAIT
    # With an unbounded wait on the frozen rank the session never ends (this test's
    # fixture thaws it afterwards).
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--strict-markers", timeout=bound + 60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "spawn timeout: 2 of 2 rank(s) still running after 3 s; their stacks when it expired are below; "
            "rank(s) 1 did not exit even after SIGKILL (frozen, or stuck in the kernel)",
            "*- rank 1 of 2 (pid *) was stopped; its stack when the timeout expired -*",
            "It did not exit even after SIGKILL (frozen, or stuck in the kernel): left running, "
            "fastspawn reaps it when it exits.",
            "(the rank dumped no stack)",
        ]
    )
    seen = recorded()
    assert seen["frozen"]["pid"] == seen["rank-1"]["pid"]
    assert seen["after"]["joined"] < bound + 10  # the stop gave up on it within its bounds
    assert seen["after"]["reaped"]  # once thawed: no zombie, nothing left
    assert still_running([seen["rank-0"]["pid"], seen["rank-1"]["pid"]]) == []


# -------------------------------------------------------------------------- errors
ERRORS = """
import os, sys, threading
import pytest
from recorder import record

@pytest.fixture
def lock():
    return threading.Lock()

@pytest.mark.spawn(nprocs=2)
def test_unpicklable_fixture(lock):
    pass

@pytest.mark.spawn(nprocs=2)
def test_rank_exits(rank):
    record(f"exit-{rank}", pid=os.getpid())
    if rank == 1:
        print("rank 1 leaving", file=sys.stderr, flush=True)
        os._exit(3)

def wait_for_rank_one():
    threading.Event().wait()

@pytest.mark.spawn(nprocs=2)
def test_peer_waits_for_failed_rank(rank):
    record(f"peer-{rank}", pid=os.getpid())
    assert rank == 0, "rank 1 gives up"
    wait_for_rank_one()

@pytest.mark.spawn(nprocs=0)
def test_bad_marker():
    pass

def test_rank_without_marker(rank):
    pass

@pytest.fixture
def device(rank):
    return f"cuda:{rank}"

@pytest.mark.spawn(nprocs=2)
def test_fixture_depending_on_rank(device):
    pass
""" + NOTHING_LEFT


def test_errors_name_their_cause(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_errors=ERRORS)
    result = run(suite)
    result.assert_outcomes(failed=4, errors=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_peer_waits_for_failed_rank _*",
            "rank 1: AssertionError: rank 1 gives up",
            "*- rank 0 of 2 (pid *) was stopped; its stack 5 s after another rank ended -*",
            "*in wait_for_rank_one",
            "*- rank 1 of 2 (pid *) failed -*",
            "E       AssertionError: rank 1 gives up",
        ]
    )
    result.stdout.fnmatch_lines_random(
        [
            "fixture 'lock' cannot be pickled to the spawned processes (fixtures are evaluated "
            "once in the pytest process and sent to every rank): TypeError: cannot pickle "
            "'_thread.lock' object",
            "*- rank 1 of 2 (pid *) exited with code 3 without finishing the test -*",
            "rank 1 leaving",
            "FAILED test_errors.py::test_rank_exits - rank 1 exited with code 3",
            "*invalid @pytest.mark.spawn arguments: nprocs must be an int >= 1 (or a list of them), got 0",
            "*the 'rank' fixture needs the test to be marked @pytest.mark.spawn",
            "E       TypeError: the 'rank' fixture has a value only inside the spawned processes*",
        ]
    )


# ------------------------------------------------------------------- spawn fixture
SPAWN_FIXTURE = """
import os, threading
import pytest
import fastspawn
from recorder import record

def wait_forever(i):
    threading.Event().wait()

def check(i):
    assert i == 5

def test_left_running(spawn):
    context = spawn(wait_forever, nprocs=2, join=False)
    record("left-running", pids=context.pids())
    assert all(p.is_alive() for p in context.processes)

def test_join_raises_with_the_rewritten_assert(spawn):
    with pytest.raises(fastspawn.ProcessRaisedException, match=r"assert [01] == 5"):
        spawn(check, nprocs=2)
""" + NOTHING_LEFT


def test_spawn_fixture_stops_its_processes_at_teardown(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_spawn_fixture=SPAWN_FIXTURE)
    result = run(suite)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*fastspawn: stopping 2 process(es) still running at teardown*"])


# --------------------------------------------------------------------------- xdist
XDIST = """
import os, socket, time
import pytest
from recorder import record

IMPORTED_IN = os.getpid()

@pytest.fixture
def worker_pid():
    return os.getpid()

@pytest.mark.parametrize("i", range(6))
@pytest.mark.spawn(nprocs=2)
def test_rendezvous(rank, i, worker_pid):
    # What torch's TCPStore does with MASTER_PORT: rank 0 listens, the others connect.
    port = int(os.environ["MASTER_PORT"])
    if rank == 0:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            conn, _ = server.accept()
            conn.sendall(b"x")
            conn.close()
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert conn.recv(1) == b"x"
        conn.close()
    record(f"x-{i}-{rank}", port=port, ppid=os.getppid(), worker_pid=worker_pid,
           imported_in=IMPORTED_IN, pid=os.getpid())
"""


def test_xdist_workers_have_their_own_zygote_and_ports(suite: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    suite.makepyfile(test_xdist=XDIST)
    result = run(suite, "-n", "2")
    result.assert_outcomes(passed=6)
    seen = list(recorded().values())
    assert len({data["port"] for data in seen}) == 6  # one port per test, none shared
    workers = {data["worker_pid"] for data in seen}
    assert len(workers) == 2
    assert all(data["ppid"] == data["worker_pid"] for data in seen)
    zygotes = {(data["worker_pid"], data["imported_in"]) for data in seen}
    assert len(zygotes) == 2 and not workers & {z for _, z in zygotes}
    assert still_running([data["pid"] for data in seen]) == []


# --------------------------------------------------------------------------- torch
TORCH = """
import pytest
import torch
import torch.distributed as dist

def all_reduce_sum(rank):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()

@pytest.mark.spawn(nprocs=2)
def test_env_rendezvous(rank):
    dist.init_process_group("gloo")
    assert all_reduce_sum(rank) == 3.0

@pytest.mark.spawn(nprocs=2)
def test_file_rendezvous(rank, world_size, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    assert all_reduce_sum(rank) == 3.0
"""


def test_gloo_process_group_with_env_and_init_method(suite: pytest.Pytester) -> None:
    if importlib.util.find_spec("torch") is None:  # not imported here: see torch_multiprocessing
        pytest.skip("torch is not installed")
    suite.makepyfile(test_torch=TORCH)
    run(suite).assert_outcomes(passed=2)


# ------------------------------------------------------------- options, patching
def test_timeout_option_precedence(pytester: pytest.Pytester) -> None:
    from fastspawn.pytest_plugin import default_timeout

    pytester.makeini("[pytest]\nspawn_timeout = 7\n")
    assert default_timeout(pytester.parseconfig()) == 7.0
    assert default_timeout(pytester.parseconfig("--spawn-timeout=2.5")) == 2.5
    assert default_timeout(pytester.parseconfig("--spawn-timeout=0")) is None
    pytester.makeini("[pytest]\n")
    assert default_timeout(pytester.parseconfig()) is None


PATCHED = """
import fastspawn
import torch.multiprocessing

def test_torch_spawn_is_fastspawn():
    assert torch.multiprocessing.spawn is fastspawn.spawn
    assert torch.multiprocessing.start_processes is fastspawn.start_processes
"""


@pytest.fixture(scope="module")
def torch_multiprocessing() -> Any:
    # Imported before pytester's fixture notes sys.modules: it drops what a test
    # imported, and torch cannot be imported twice in a process.
    return pytest.importorskip("torch.multiprocessing")


@pytest.mark.parametrize("how", ["option", "ini"])
def test_patch_torch_for_the_session(torch_multiprocessing: Any, pytester: pytest.Pytester, how: str) -> None:
    torch_mp = torch_multiprocessing
    original = torch_mp.spawn
    pytester.makepyfile(test_patched=PATCHED)
    if how == "ini":
        pytester.makeini("[pytest]\nfastspawn_patch_torch = true\n")
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    else:
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--fastspawn-patch-torch")
    result.assert_outcomes(passed=1)
    assert torch_mp.spawn is original  # restored when the session ended


UNUSED = """
import os, sys

def test_nothing_loaded():
    assert "fastspawn.pytest_plugin" in sys.modules
    for name in ("fastspawn._api", "fastspawn._core", "fastspawn._pytest_rank", "torch"):
        assert name not in sys.modules, name
    assert "FASTSPAWN_PYTEST_SESSION" not in os.environ
"""


def test_unused_plugin_loads_nothing(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTSPAWN_PYTEST_SESSION", raising=False)
    pytester.makepyfile(test_unused=UNUSED)
    pytester.makeini(INNER_INI)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fastspawn.pytest_plugin; print(sorted(m for m in sys.modules if m.startswith(('fastspawn', 'torch'))))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "['fastspawn', 'fastspawn.pytest_plugin']"


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.spawn(nprocs=2, timeout=None, start_method='spawn', devices_per_rank=None): *"])


# ------------------------------------------------- early start, while pytest collects
EARLY_CONFTEST = """
import time
import pytest
from recorder import recorded

@pytest.fixture
def zygote_import(request):
    # Waits (bounded) until the zygote has imported the requesting test's module: the
    # early start does it during collection, with no spawn request. Started by the first
    # request instead, it would never happen before the test body runs.
    name = "zygote-" + request.module.__name__.rpartition(".")[2]
    deadline = time.monotonic() + 60
    while name not in recorded():
        if time.monotonic() > deadline:
            pytest.fail(f"the zygote did not import {request.module.__name__} before the test began")
        time.sleep(0.02)
    return recorded()[name]
"""

EARLY_MODULE = """
import os, sys
import pytest
from recorder import record
{extra}
IMPORTED_IN = os.getpid()
_zygote = sys.modules.get("fastspawn._zygote")
if _zygote is not None and _zygote.in_zygote_tree():  # imported by the zygote, not by a rank
    record("zygote-" + __name__.rpartition(".")[2], pid=os.getpid(), ppid=os.getppid(),
           loader=type(__loader__).__name__)

@pytest.mark.parametrize("i", range(2))
@pytest.mark.spawn(nprocs=2)
def test_ranks(rank, i, zygote_import):
    record(f"{{__name__}}-{{i}}-{{rank}}", imported_in=IMPORTED_IN, pid=os.getpid(), ppid=os.getppid())
    assert IMPORTED_IN == zygote_import["pid"]
"""


EARLY_FIXTURE = """
import os, sys
from recorder import record

IMPORTED_IN = os.getpid()
_zygote = sys.modules.get("fastspawn._zygote")
if _zygote is not None and _zygote.in_zygote_tree():
    record("zygote-test_fixture", pid=os.getpid(), ppid=os.getppid(), loader=type(__loader__).__name__)

def report(i):
    record(f"fixture-{i}", imported_in=IMPORTED_IN, pid=os.getpid(), ppid=os.getppid())

def test_workers(zygote_import, spawn):
    spawn(report, nprocs=2)
"""


def test_zygote_imports_marked_test_modules_while_pytest_collects(suite: pytest.Pytester) -> None:
    suite.makeconftest(EARLY_CONFTEST)
    suite.makepyfile(test_early=EARLY_MODULE.format(extra=""), test_fixture=EARLY_FIXTURE)
    sub = suite.mkdir("sub")
    # Found only through the sys.path entry pytest adds for sub/: the zygote adds it too.
    (sub / "helper_module.py").write_text("VALUE = 1\n")
    (sub / "test_later.py").write_text(EARLY_MODULE.format(extra="import helper_module"))
    result = run(suite, "-p", "no:randomly")
    result.assert_outcomes(passed=5)
    assert "fresh interpreter" not in result.stdout.str()
    seen = recorded()
    early, later, fixture = (seen[f"zygote-test_{name}"] for name in ("early", "later", "fixture"))
    # One zygote, a child of pytest, imported them all (its sys.path grew with pytest's and
    # it was not replaced), with pytest's assertion rewriting.
    assert early["pid"] == later["pid"] == fixture["pid"] != early["ppid"]
    assert early["loader"] == later["loader"] == fixture["loader"] == "_RewritingLoader"
    ranks = [data for name, data in seen.items() if not name.startswith("zygote-")]
    assert len(ranks) == 10
    for data in ranks:  # forks of that zygote, which had the module: never imported again
        assert data["imported_in"] == early["pid"] and data["ppid"] == early["ppid"]
    assert still_running([data["pid"] for data in ranks] + [early["pid"]]) == []


NO_RANKS = """
import os
import psutil
import pytest

TEXT = "a test module may mention pytest.mark.spawn without using it"

@pytest.mark.spawn(nprocs=2)
def test_deselected(rank):
    pass

def test_no_zygote():
    import sys
    api = sys.modules.get("fastspawn._api")
    assert api is None or api._zygotes.current is None
    assert os.environ.get("FASTSPAWN_PYTEST_SESSION") is None
    zygotes = [p for p in psutil.Process().children() if "fastspawn._zygote" in " ".join(p.cmdline())]
    assert zygotes == []
"""


def test_no_zygote_is_left_for_a_session_whose_tests_need_no_ranks(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_no_ranks=NO_RANKS)
    run(suite, "-k", "not deselected").assert_outcomes(passed=1, deselected=1)


STUCK = """
import os, sys, time
import pytest

_zygote = sys.modules.get("fastspawn._zygote")
if _zygote is not None and _zygote.in_zygote_tree():
    time.sleep(120)  # the early import gets stuck (the zygote is given up long before)

@pytest.mark.parametrize("i", range(2))
@pytest.mark.spawn(nprocs=2)
def test_in_fresh_interpreters(rank, i):
    pass
"""


def test_a_stuck_early_import_falls_back_with_one_warning(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTSPAWN_ZYGOTE_TIMEOUT", "3")
    path = suite.makepyfile(test_stuck=STUCK)
    result = run(suite)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert out.count("starting each child in a fresh interpreter instead") == 1, out
    result.stdout.fnmatch_lines(
        [f"*fastspawn: the zygote (pid *) did not finish importing within 3 s (FASTSPAWN_ZYGOTE_TIMEOUT); "
         f"its import is stuck at: *{path.name}:{line(path, 'time.sleep(120)')} in <module>*"]
    )


# ---------------------------------------------------------------- world-size lists
SIZES = """
import os
import pytest
from recorder import record

@pytest.mark.spawn(nprocs=[1, 3])
def test_sizes(rank, world_size):
    record(f"sizes-{world_size}-{rank}", env=os.environ["WORLD_SIZE"], pid=os.getpid())

@pytest.mark.parametrize("letter", ["a", "b"])
@pytest.mark.spawn(nprocs=[2, 1])
def test_composed(rank, world_size, letter):
    record(f"composed-{world_size}-{letter}-{rank}", pid=os.getpid())

@pytest.mark.spawn([2])
def test_positional(rank, world_size):
    record(f"positional-{world_size}-{rank}", pid=os.getpid())
"""


def test_a_list_of_sizes_runs_the_test_once_per_size(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_sizes=SIZES)
    result = run(suite, "-v")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines_random(
        [
            "*test_sizes.py::test_sizes[[]nprocs=1[]] PASSED*",
            "*test_sizes.py::test_sizes[[]nprocs=3[]] PASSED*",
            # the size's id comes first, then parametrize's
            "*test_sizes.py::test_composed[[]nprocs=2-a[]] PASSED*",
            "*test_sizes.py::test_composed[[]nprocs=1-b[]] PASSED*",
            "*test_sizes.py::test_positional[[]nprocs=2[]] PASSED*",
        ]
    )
    seen = recorded()
    expected = {"sizes-1-0", "sizes-3-0", "sizes-3-1", "sizes-3-2", "positional-2-0", "positional-2-1"}
    expected |= {f"composed-{n}-{x}-{r}" for n in (1, 2) for x in "ab" for r in range(n)}
    assert set(seen) == expected
    assert all(data["env"] == name.split("-")[1] for name, data in seen.items() if name.startswith("sizes-"))


BAD_SIZES = {
    "test_empty": "[]",
    "test_not_int": "[2, '4']",
    "test_zero": "(1, 0)",
}


def test_bad_sizes_fail_at_collection_naming_the_problem(suite: pytest.Pytester) -> None:
    for name, sizes in BAD_SIZES.items():
        suite.makepyfile(**{name: f"import pytest\n\n@pytest.mark.spawn(nprocs={sizes})\ndef test_x(rank):\n    pass\n"})
    suite.makepyfile(test_fine="def test_fine():\n    pass\n")
    result = run(suite, "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "ERROR test_empty.py - Failed: invalid @pytest.mark.spawn arguments: nprocs is an empty list: give at least one world size",
            "ERROR test_not_int.py - Failed: invalid @pytest.mark.spawn arguments: nprocs list must hold ints >= 1, got '4' in [[]2, '4'[]]",
            "ERROR test_zero.py - Failed: invalid @pytest.mark.spawn arguments: nprocs list must hold ints >= 1, got 0 in [[]1, 0[]]",
        ]
    )
    assert "During handling" not in result.stdout.str()


# ------------------------------------------------------------------ devices per rank
DEVICES = """
import os
import pytest
from recorder import record

def devices(name, rank):
    record(f"{name}-{rank}", cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank=os.environ["LOCAL_RANK"],
           worker=os.environ.get("PYTEST_XDIST_WORKER", ""), pid=os.getpid())

@pytest.mark.spawn(nprocs=2, devices_per_rank=1)
def test_one_each(rank):
    devices("one", rank)

@pytest.mark.spawn(nprocs=2, devices_per_rank=2)
def test_two_each(rank):
    devices("two", rank)

@pytest.mark.spawn(nprocs=3, devices_per_rank=2)
def test_too_few(rank):
    devices("too_few", rank)

@pytest.mark.spawn(nprocs=2)
def test_default(rank):
    devices("default", rank)

@pytest.mark.spawn(nprocs=2, devices_per_rank=0)
def test_none(rank):
    devices("none", rank)
"""


@pytest.mark.parametrize("ini", [None, 1])
def test_each_rank_gets_its_own_devices(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ini: Any) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # four (fake) devices
    if ini is not None:
        suite.makeini(INNER_INI + f"spawn_devices_per_rank = {ini}\n")
    suite.makepyfile(test_devices=DEVICES)
    result = run(suite)
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED [[]1[]] test_devices.py:*: needs 6 CUDA device(s) (nprocs=3 x devices_per_rank=2), 4 available"]
    )
    seen = recorded()
    assert [seen[f"one-{r}"]["cvd"] for r in range(2)] == ["0", "1"]
    assert [seen[f"two-{r}"]["cvd"] for r in range(2)] == ["0,1", "2,3"]
    assert [seen[f"default-{r}"]["cvd"] for r in range(2)] == (["0,1,2,3"] * 2 if ini is None else ["0", "1"])
    assert [seen[f"none-{r}"]["cvd"] for r in range(2)] == ["0,1,2,3"] * 2  # the marker wins over the ini
    assert all(data["local_rank"] == name.rpartition("-")[2] for name, data in seen.items())


XDIST_DEVICES = """
import os
import pytest
from recorder import record

@pytest.mark.parametrize("i", range(8))
@pytest.mark.spawn(nprocs=2, devices_per_rank=1)
def test_devices(rank, i):
    record(f"d-{i}-{rank}", cvd=os.environ["CUDA_VISIBLE_DEVICES"], worker=os.environ["PYTEST_XDIST_WORKER"],
           pid=os.getpid())

@pytest.mark.spawn(nprocs=3, devices_per_rank=1)
def test_too_few(rank):
    pass
"""


def test_xdist_workers_take_disjoint_devices(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    suite.makepyfile(test_xdist_devices=XDIST_DEVICES)
    result = run(suite, "-n", "2")
    result.assert_outcomes(passed=8, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED [[]1[]] test_xdist_devices.py:*: needs 3 CUDA device(s) (nprocs=3 x devices_per_rank=1), "
         "2 available to xdist worker gw? (of 2, sharing 4)"]
    )
    by_worker: dict = {}
    for data in recorded().values():
        by_worker.setdefault(data["worker"], set()).add(data["cvd"])
    assert by_worker == {"gw0": {"0", "1"}, "gw1": {"2", "3"}} or len(by_worker) == 1 and set(by_worker.values()) in (
        [{"0", "1"}], [{"2", "3"}]
    ), by_worker  # a worker that ran none of them is possible (xdist distributes)


# ------------------------------------------- early start for fastspawn.testing classes
UNITTEST_EARLY = """
import os, sys, time, unittest
from fastspawn.testing import MultiProcessTestCase
from recorder import record, recorded

IMPORTED_IN = os.getpid()
_zygote = sys.modules.get("fastspawn._zygote")
if _zygote is not None and _zygote.in_zygote_tree():  # imported by the zygote
    record("zygote-import", pid=os.getpid(), ppid=os.getppid())


class EarlyTest(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        # Bounded wait: the zygote imports this module when the class is defined, with
        # no request. Started by the first request instead, it never would before it.
        deadline = time.monotonic() + 60
        while "zygote-import" not in recorded():
            self.assertLess(time.monotonic(), deadline, "the zygote did not import the module early")
            time.sleep(0.02)
        self._spawn_processes()

    def test_a(self):
        record(f"a-{self.rank}", imported_in=IMPORTED_IN, pid=os.getpid(), ppid=os.getppid())

    def test_b(self):
        record(f"b-{self.rank}", imported_in=IMPORTED_IN, pid=os.getpid(), ppid=os.getppid())
"""


def test_a_testing_class_run_by_unittest_warms_the_zygote_when_defined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("RECORD_DIR", str(records))
    (tmp_path / "recorder.py").write_text(RECORDER)
    (tmp_path / "test_unittest_early.py").write_text(UNITTEST_EARLY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FASTSPAWN_"))}
    env.update(RECORD_DIR=str(records), PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "test_unittest_early"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "Ran 2 tests" in out.stderr and "fresh interpreter" not in out.stderr
    seen = recorded()
    zygote = seen.pop("zygote-import")
    assert sorted(seen) == ["a-0", "a-1", "b-0", "b-1"]
    for data in seen.values():  # forks of the zygote that imported the module early
        assert data["imported_in"] == zygote["pid"] and data["ppid"] == zygote["ppid"]
    assert still_running([zygote["pid"]] + [data["pid"] for data in seen.values()]) == []


def test_a_testing_class_collected_by_pytest_is_imported_by_the_zygote_meanwhile(suite: pytest.Pytester) -> None:
    suite.makeini(INNER_INI + "    ignore:Fail to import hypothesis:ImportWarning\n")  # torch's test utilities
    suite.makepyfile(test_unittest_early=UNITTEST_EARLY)
    run(suite).assert_outcomes(passed=2)
    seen = recorded()
    zygote = seen.pop("zygote-import")
    assert sorted(seen) == ["a-0", "a-1", "b-0", "b-1"]
    for data in seen.values():  # forks of the zygote that imported the module early
        assert data["imported_in"] == zygote["pid"] and data["ppid"] == zygote["ppid"]


KILLER = """
import os, sys
from recorder import record

_zygote = sys.modules.get("fastspawn._zygote")
if _zygote is not None and _zygote.in_zygote_tree():  # preloaded by a zygote: it dies starting
    record(f"zygote-start-{os.getpid()}", pid=os.getpid())
    os._exit(3)
"""


def test_a_zygote_that_dies_starting_early_is_not_started_again(suite: pytest.Pytester) -> None:
    suite.makeconftest("import fastspawn\nfastspawn.preload(['zygote_killer'])\n")
    suite.makepyfile(zygote_killer=KILLER)
    # In a directory of its own: pytest's import of it adds to sys.path after the early start.
    suite.mkdir("sub")
    (suite.path / "sub" / "test_killed.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(2))\n@pytest.mark.spawn(nprocs=2)\n"
        "def test_in_fresh_interpreters(rank, i):\n    pass\n"
    )
    result = run(suite)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert out.count("starting each child in a fresh interpreter instead") == 1, out
    result.stdout.fnmatch_lines(["*fastspawn: the zygote (pid *) died while starting up (exit code 3)*"])
    assert len(recorded()) == 1  # one zygote tried, during collection; the first test's call did not retry


def test_visible_devices_come_from_the_environment_or_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastspawn import pytest_plugin

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 1,GPU-5d1e,-1,2")  # CUDA stops at -1
    assert pytest_plugin.visible_devices() == ["3", "1", "GPU-5d1e"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pytest_plugin.visible_devices() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    for bus in ("0000:01:00.0", "0000:41:00.0", "0000:81:00.0"):
        (gpus / bus).mkdir()
    monkeypatch.setattr(pytest_plugin, "_GPUS_DIR", str(gpus))
    assert pytest_plugin.visible_devices() == ["0", "1", "2"]
    monkeypatch.setattr(pytest_plugin, "_GPUS_DIR", str(tmp_path / "no-driver"))
    assert pytest_plugin.visible_devices() == []


@pytest.mark.parametrize(
    "worker, count, share",
    [("gw0", "3", ["a", "b"]), ("gw1", "3", ["c"]), ("gw2", "3", ["d"]), ("", "", ["a", "b", "c", "d"])],
)
def test_xdist_workers_share_devices_in_contiguous_disjoint_parts(
    monkeypatch: pytest.MonkeyPatch, worker: str, count: str, share: Any
) -> None:
    from fastspawn import pytest_plugin

    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    assert pytest_plugin._worker_share(["a", "b", "c", "d"])[0] == share
