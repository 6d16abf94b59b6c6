"""fastspawn.testing.MultiProcessTestCase: a torch-style test class runs unchanged on it
(same outcomes as on torch's class), and where it differs from torch it is on purpose:
every rank's exit code counts, skip reasons travel, a timeout shows the ranks' stacks and
ends them with SIGKILL if SIGTERM is not enough.

Each scenario is a test module written to a temporary directory and run by a separate
pytest (ranks are processes; the outcome of each test is read from its JUnit XML report).
"""

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from _no_torch import env_without_torch
from _testing_freezer import freezer_cgroup  # noqa: F401  (a fixture)
from _testing_stacks import DEPTH, THREADS

# A torch-style distributed test class, as found in torch's own test suite; only the
# line BASE_IMPORT differs between the two copies that are run. The module logs the pid
# of every process that imports it, to count how many interpreters paid for the import.
TORCH_STYLE = """
import os
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import TEST_SKIPS

BASE_IMPORT

with open(os.environ["IMPORT_LOG"], "a") as log:
    log.write(f"{__name__} {os.getpid()}\\n")


class AllReduceTest(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _init_pg(self):
        dist.init_process_group(
            "gloo",
            init_method=f"file://{self.file_name}",
            rank=self.rank,
            world_size=self.world_size,
        )

    def test_all_reduce(self):
        self._init_pg()
        tensor = torch.ones(4) * (self.rank + 1)
        dist.all_reduce(tensor)
        self.assertEqual(tensor, torch.full((4,), 3.0))

    def test_skip_exit_code(self):
        sys.exit(TEST_SKIPS["small_worldsize"].exit_code)

    def test_failing_rank(self):
        self._init_pg()
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        if self.rank == 1:
            self.assertEqual(tensor.item(), 5.0)
"""

# Helpers the inner suites import: a big stack dump, a rank that cannot die.
STACKS = (Path(__file__).parent / "_testing_stacks.py").read_text()
FREEZER = (Path(__file__).parent / "_testing_freezer.py").read_text()

TORCH_BASE = "from torch.testing._internal.common_distributed import MultiProcessTestCase"
FASTSPAWN_BASE = "from fastspawn.testing import MultiProcessTestCase"

# What only fastspawn's class does, in a module that needs no torch (it is run with
# torch hidden). Ranks append a JSON line per run to RANK_LOG.
# Two ranks started in setUp, as most classes of the inner suites below.
TWO_SPAWNED_RANKS = """\
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()
"""

BEHAVIOURS = """
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import threading
import time
import unittest

import fastspawn.testing
from fastspawn.testing import TEST_SKIPS, MultiProcessTestCase
from stacks import start_deep_threads

fastspawn.testing.TIMEOUT_OVERRIDE["test_timeout"] = 1
fastspawn.testing.TIMEOUT_OVERRIDE["test_big_stack_dump"] = 1


def log(test, **facts):
    facts.update(test=test, pid=os.getpid(), torch="torch" in sys.modules,
                 pytest="_pytest.main" in sys.modules)
    with open(os.environ["RANK_LOG"], "a") as f:
        f.write(json.dumps(facts) + "\\n")


def hang_here():
    threading.Event().wait()


def crash_here():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), signal.SIGSEGV)


def wait_for(path, deadline=60.0):
    stop = time.monotonic() + deadline
    while not os.path.exists(path):
        assert time.monotonic() < stop, f"{path} never appeared"
        time.sleep(0.01)


class Ranks(MultiProcessTestCase):
    kill_grace_period = 1.0

    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        if self._testMethodName == "test_expected_exit_code":
            self.special_return_code_checks[self.test_expected_exit_code.__wrapped__] = 7
        self._spawn_processes()

    def test_pass(self):
        log("pass", rank=self.rank, world_size=self.world_size, random=random.random(),
            file=os.path.exists(self.file_name), master=self.is_master)

    def test_rank1_exits_3(self):
        log("exit3", rank=self.rank)
        if self.rank == 1:
            sys.exit(3)
        hang_here()

    def test_rank1_crashes(self):
        log("crash", rank=self.rank)
        if self.rank == 1:
            crash_here()
        hang_here()

    def test_rank1_skip_code(self):
        if self.rank == 1:
            sys.exit(TEST_SKIPS["multi-gpu-2"].exit_code)

    def test_skip_reason(self):
        raise unittest.SkipTest("no widgets in this rank")

    def test_errors_in_both(self):
        # Rank 0's error stops rank 1 with SIGTERM, which rank 1 turns into its own error.
        ready = f"{self.file_name}.ready"
        if self.rank == 1:
            def broke(signum, frame):
                raise ValueError("rank 1 broke")
            signal.signal(signal.SIGTERM, broke)
            open(ready, "w").close()
            hang_here()
        wait_for(ready)
        raise ValueError("rank 0 broke")

    def test_expected_exit_code(self):
        sys.exit(7)

    def test_timeout(self):
        log("timeout", rank=self.rank)
        if self.rank == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        hang_here()

    def test_big_stack_dump(self):
        # Rank 0's stacks at the timeout: far over a pipe's 64 KiB.
        if self.rank == 0:
            start_deep_threads()
        log("bigdump", rank=self.rank)
        hang_here()


class ForkedRanks(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._start_processes(multiprocessing.get_context("fork").Process)

    def test_forked(self):
        log("fork", rank=self.rank)


class EntryFails(MultiProcessTestCase):
TWO_SPAWNED_RANKS

    @classmethod
    def _run(cls, rank, test_name, file_name, parent_pipe, **kwargs):
        if rank == 1:  # outside the test body, which reports its own errors
            raise LookupError("rank 1 failed before its test")
        super()._run(rank, test_name, file_name, parent_pipe, **kwargs)

    def test_entry_fails(self):
        pass


class UnknownStart(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        self._start_processes("threads")

    def test_never_runs(self):
        pass
""".replace("TWO_SPAWNED_RANKS\n", TWO_SPAWNED_RANKS)


def run_pytest(
    directory: Path, env: Optional[Dict[str, str]] = None, timeout: float = 300
) -> Dict[str, Tuple[str, str]]:
    """Run pytest on ``directory`` (killed after ``timeout`` s: TimeoutExpired); test name
    -> (outcome, message and details)."""
    report = directory / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", str(directory)],
        cwd=directory,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or "") + "\n" + (child.text or "")
        module = case.get("classname", "").split(".")[0]
        outcomes[f"{module}::{case.get('name')}"] = (outcome, text)
    return outcomes


def read_log(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


FRESH_RANKS = """
import json
import os

from fastspawn import _child, _prewarm
from fastspawn.testing import MultiProcContinuousTest, MultiProcessTestCase


def log(kind, rank):
    with open(os.environ["RANK_LOG"], "a") as f:
        facts = {"kind": kind, "rank": rank, "fresh": _child.in_fresh_child, "hinted": sorted(_prewarm._hinted)}
        f.write(json.dumps(facts) + "\\n")


class PerTest(MultiProcessTestCase):
TWO_SPAWNED_RANKS

    def test_per_test(self):
        log("per-test", self.rank)


class PerClass(MultiProcContinuousTest):
    world_size = 2

    @classmethod
    def _init_pg(cls, rank, world_size, rdvz_file):
        pass

    def test_per_class(self):
        log("per-class", self.rank)
""".replace("TWO_SPAWNED_RANKS\n", TWO_SPAWNED_RANKS)


def test_ranks_in_fresh_interpreters_when_the_zygote_is_given_up(tmp_path):
    """The zygote is unfit (a preloaded module leaves a thread running): each rank is a
    fresh interpreter that imports the test module, defining the classes again; that must
    not start a zygote of its own (it did: a rank started one, or failed with exit code 1
    when multiprocessing refused a process start during its bootstrap)."""
    (tmp_path / "test_fresh.py").write_text(FRESH_RANKS)
    (tmp_path / "threads_here.py").write_text(
        "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    )
    (tmp_path / "conftest.py").write_text("import fastspawn\nfastspawn.preload(['threads_here'])\n")
    rank_log = tmp_path / "ranks.log"
    outcomes = run_pytest(tmp_path, {"RANK_LOG": str(rank_log)})
    assert outcomes == {"test_fresh::test_per_test": ("passed", ""), "test_fresh::test_per_class": ("passed", "")}
    seen = sorted((r["kind"], r["rank"], r["fresh"], tuple(r["hinted"])) for r in read_log(rank_log))
    assert seen == [("per-class", 0, True, ()), ("per-class", 1, True, ()), ("per-test", 0, True, ()), ("per-test", 1, True, ())]


def test_torch_style_class_runs_unchanged_with_only_the_import_switched(tmp_path):
    pytest.importorskip("torch")
    for name, base in (("test_torch_base", TORCH_BASE), ("test_fastspawn_base", FASTSPAWN_BASE)):
        (tmp_path / f"{name}.py").write_text(TORCH_STYLE.replace("BASE_IMPORT", base))
    import_log = tmp_path / "imports.log"

    outcomes = run_pytest(tmp_path, {"IMPORT_LOG": str(import_log)})

    for test in ("test_all_reduce", "test_skip_exit_code", "test_failing_rank"):
        torch_outcome, torch_text = outcomes[f"test_torch_base::{test}"]
        ours, our_text = outcomes[f"test_fastspawn_base::{test}"]
        assert ours == torch_outcome, (test, our_text, torch_text)
    assert outcomes["test_fastspawn_base::test_all_reduce"][0] == "passed"
    for module in ("test_torch_base", "test_fastspawn_base"):
        outcome, text = outcomes[f"{module}::test_skip_exit_code"]
        assert outcome == "skipped" and "Skipped due to small world size." in text
        outcome, text = outcomes[f"{module}::test_failing_rank"]
        assert outcome == "failed"
        assert "Process 1 exited with error code 10 and exception:" in text
        assert "Process 0 exited" not in text
        assert "Expected 5.0 but got 2.0." in text  # the rank's own assertion, by torch's TestCase
    # The rank ran fastspawn's side of the class, and torch's did not.
    assert "fastspawn/testing.py" in outcomes["test_fastspawn_base::test_failing_rank"][1]
    assert "fastspawn/testing.py" not in outcomes["test_torch_base::test_failing_rank"][1]

    # torch imports the test module (and torch) in 2 fresh interpreters per test; fastspawn
    # in the pytest process and its zygote only: each rank is a fork.
    importers: Dict[str, set] = {}
    for line in import_log.read_text().splitlines():
        module, pid = line.split()
        importers.setdefault(module, set()).add(pid)
    assert len(importers["test_fastspawn_base"]) == 2
    assert len(importers["test_torch_base"]) == 1 + 2 * 3


@pytest.fixture(scope="module")
def behaviours(tmp_path_factory):
    """The BEHAVIOURS module run once, with torch hidden: (outcomes, rank log)."""
    directory = tmp_path_factory.mktemp("behaviours")
    (directory / "test_behaviours.py").write_text(BEHAVIOURS)
    (directory / "stacks.py").write_text(STACKS)
    rank_log = directory / "ranks.log"
    outcomes = run_pytest(directory, {**env_without_torch(directory), "RANK_LOG": str(rank_log)})
    return outcomes, read_log(rank_log)


def outcome(behaviours, test: str) -> Tuple[str, str]:
    return behaviours[0][f"test_behaviours::{test}"]


def ranks_of(behaviours, test: str) -> List[Dict]:
    return sorted((r for r in behaviours[1] if r["test"] == test), key=lambda r: r["rank"])


def test_ranks_get_their_rank_the_shared_file_and_the_same_seed(behaviours):
    assert outcome(behaviours, "test_pass")[0] == "passed"
    ranks = ranks_of(behaviours, "pass")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["master"] for r in ranks] == [True, False]
    assert all(r["world_size"] == 2 and r["file"] for r in ranks)
    assert ranks[0]["random"] == ranks[1]["random"]  # seeded alike, as torch's ranks are
    # Forked from the zygote: no torch (hidden here), nothing of the pytest process.
    assert not any(r["torch"] or r["pytest"] for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]


def test_every_rank_exit_code_counts_and_a_crash_stops_the_others(behaviours):
    # torch checks rank 0's code only: rank 0 would wait forever (until the timeout).
    result, text = outcome(behaviours, "test_rank1_exits_3")
    assert result == "failed"
    assert "Expected exit code 0 but got 3 for pid:" in text and "(process 1)" in text
    assert all(pid_gone(r["pid"]) for r in ranks_of(behaviours, "exit3"))


def test_a_rank_failing_outside_the_test_body_shows_its_traceback(behaviours):
    result, text = outcome(behaviours, "test_entry_fails")
    assert result == "failed"
    assert "Expected exit code 0 but got 1" in text and "(process 1)" in text
    assert "LookupError: rank 1 failed before its test" in text, text


def test_a_rank_killed_by_a_signal_shows_its_stack(behaviours):
    result, text = outcome(behaviours, "test_rank1_crashes")
    assert result == "failed"
    assert "Expected exit code 0 but got -11 for pid:" in text and "(process 1)" in text
    assert "-- Process 1 was killed by signal 11, in:" in text and "in crash_here" in text
    assert all(pid_gone(r["pid"]) for r in ranks_of(behaviours, "crash"))


def test_a_skip_code_in_any_rank_skips(behaviours):
    result, text = outcome(behaviours, "test_rank1_skip_code")
    assert result == "skipped" and "Need at least 2 CUDA devices" in text


def test_a_skip_in_a_rank_carries_its_reason(behaviours):
    result, text = outcome(behaviours, "test_skip_reason")
    assert result == "skipped" and "no widgets in this rank" in text


def test_errors_of_all_ranks_are_reported(behaviours):
    result, text = outcome(behaviours, "test_errors_in_both")
    assert result == "failed"
    for rank in (0, 1):
        assert f"Process {rank} exited with error code 10 and exception:" in text
        assert f"ValueError: rank {rank} broke" in text


def test_special_return_code_checks(behaviours):
    assert outcome(behaviours, "test_expected_exit_code")[0] == "passed"


def test_timeout_shows_the_stacks_and_kills_what_ignores_sigterm(behaviours):
    result, text = outcome(behaviours, "test_timeout")
    assert result == "failed"
    assert "Process 0 terminated or timed out after" in text
    assert "-- Process 0 was running at the timeout, in:" in text
    assert "in hang_here" in text  # rank 0's Python stack at the timeout
    ranks = ranks_of(behaviours, "timeout")
    assert len(ranks) == 2 and all(pid_gone(r["pid"]) for r in ranks)  # rank 1 needed SIGKILL


def test_a_big_stack_dump_arrives_whole(behaviours):
    # THREADS threads DEPTH frames deep: about 600 KiB of stacks from rank 0 at SIGTERM, all of it
    # in the failure, down to the main thread's stack, which faulthandler writes last.
    result, text = outcome(behaviours, "test_big_stack_dump")
    assert result == "failed"
    assert len(ranks_of(behaviours, "bigdump")) == 2
    # (the report's message attribute holds the failure's beginning; its body, all of it)
    rank0 = text.split("-- Process 0 was running at the timeout, in:")[-1].split("-- Process 1 was running")[0]
    assert len(rank0) > 4 * 65536
    assert rank0.count("in descend_to_fill_a_stack_dump_with_long_lines") == THREADS * DEPTH
    assert "in hang_here" in rank0 and "in test_big_stack_dump" in rank0


def test_start_processes_with_a_fork_context(behaviours):
    assert outcome(behaviours, "test_forked")[0] == "passed"
    ranks = ranks_of(behaviours, "fork")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["pytest"] for r in ranks)  # forks of the pytest process itself


def test_start_processes_rejects_what_is_not_a_start_method(behaviours):
    result, text = outcome(behaviours, "test_never_runs")
    assert result in ("failed", "error")
    assert "_start_processes takes a multiprocessing Process class" in text and "'threads'" in text


# A rank that cannot die: rank 1 is frozen (cgroup freezer) right after the start, so it
# neither dumps its stacks at SIGTERM nor dies of SIGKILL until it is thawed.
FROZEN = """
import json
import os
import threading
import time

import fastspawn.testing
import freezer
from fastspawn.testing import MultiProcessTestCase

fastspawn.testing.TIMEOUT_OVERRIDE["test_frozen_rank"] = 1


class Frozen(MultiProcessTestCase):
    kill_grace_period = 1.0
    world_size = 2  # a plain attribute does as well as torch-style properties

    def setUp(self):
        super().setUp()
        self._spawn_processes()
        self.frozen_pid = self.processes[1].pid
        freezer.freeze(os.environ["FREEZER_CGROUP"], self.frozen_pid)
        self.joined_at = time.monotonic()

    def tearDown(self):
        joined = time.monotonic() - self.joined_at  # the test: joining the ranks
        try:
            super().tearDown()
        finally:
            freezer.thaw(os.environ["FREEZER_CGROUP"])
            # Thawed, it dies of the pending SIGKILL; the engine's reaper reaps it.
            reaped = freezer.gone(self.frozen_pid)
            with open(os.environ["REPORT"], "w") as f:
                json.dump({"pid": self.frozen_pid, "joined": joined, "reaped": reaped}, f)

    def test_frozen_rank(self):
        threading.Event().wait()
"""


@pytest.mark.timeout(240)
def test_a_rank_that_cannot_die_fails_the_test_within_the_stop_bounds(tmp_path, freezer_cgroup):
    from fastspawn import _core

    (tmp_path / "test_frozen.py").write_text(FROZEN)
    (tmp_path / "freezer.py").write_text(FREEZER)
    report = tmp_path / "report.json"
    env = {**env_without_torch(tmp_path), "FREEZER_CGROUP": freezer_cgroup, "REPORT": str(report)}
    timeout, grace = 1.0, 1.0
    bound = timeout + grace + _core.KILL_WAIT
    # The whole run (interpreter start, the zygote, tearDown, exit) fits well in it; with
    # an unbounded wait on the frozen rank it never ends (the fixture thaws it then).
    outcomes = run_pytest(tmp_path, env, timeout=bound + 60)

    result, text = outcomes["test_frozen::test_frozen_rank"]
    assert result == "failed"
    facts = json.loads(report.read_text())
    assert "Process 0 terminated or timed out after" in text
    assert f"-- Process 1 (pid {facts['pid']}) did not exit even after SIGKILL (frozen, or stuck in the kernel)" in text
    assert facts["joined"] < bound + 10  # the stop gave up on it within its bounds
    assert facts["reaped"]  # once thawed: no zombie, nothing left
    assert pid_gone(facts["pid"])


def test_importing_it_does_not_import_torch():
    code = "import sys, fastspawn.testing as t; print(t.TEST_SKIPS['generic'].exit_code, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["86", "False"]


def test_skip_table_and_constants_match_torch():
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import json
        from torch.testing._internal import common_distributed as theirs
        import fastspawn.testing as ours
        print(json.dumps([
            {k: list(v) for k, v in theirs.TEST_SKIPS.items()},
            {k: list(v) for k, v in ours.TEST_SKIPS.items()},
            [theirs.MultiProcessTestCase.TEST_ERROR_EXIT_CODE, theirs.MultiProcessTestCase.MAIN_PROCESS_RANK,
             theirs.DEFAULT_WORLD_SIZE, theirs.TIMEOUT_DEFAULT],
            [ours.MultiProcessTestCase.TEST_ERROR_EXIT_CODE, ours.MultiProcessTestCase.MAIN_PROCESS_RANK,
             ours.DEFAULT_WORLD_SIZE, ours.TIMEOUT_DEFAULT],
            [f"{c.__module__}.{c.__qualname__}" for c in ours.MultiProcessTestCase.__mro__],
        ]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    their_skips, our_skips, their_constants, our_constants, mro = json.loads(out.splitlines()[-1])
    assert our_skips == their_skips
    assert our_constants == their_constants
    assert "torch.testing._internal.common_utils.TestCase" in mro  # tensor-aware assertEqual
