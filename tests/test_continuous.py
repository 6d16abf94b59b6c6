"""fastspawn.testing.MultiProcContinuousTest: torch's class with the ranks forked from the
zygote. A torch-style class runs unchanged with only its import switched, with torch's
outcomes, except where torch gives up on the rest of the class after a failure ("poison
pill"): fastspawn reports that test and replaces the ranks, so the next tests run. A
timeout shows every rank's stack, a rank's death fails its test, and nothing is left behind.

Each scenario is a test module written to a temporary directory and run by a separate
pytest or unittest process (the ranks are processes); outcomes come from the JUnit report.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from _no_torch import env_without_torch
from test_testing import pid_gone, run_pytest

pytestmark = pytest.mark.timeout(600)

TORCH_BASE = "from torch.testing._internal.common_distributed import MultiProcContinuousTest"
FASTSPAWN_BASE = "from fastspawn.testing import MultiProcContinuousTest"

# What a class needs to run gloo on CPU (in both modules below).
GLOO_ON_CPU = """
    @classmethod
    def backend_str(cls):
        return "gloo"

    @classmethod
    def device_type(cls):
        return "cpu"
"""

# A torch-style class body: only the line BASE_IMPORT differs between the two copies run.
# The module logs the pid of every process that imports it.
TORCH_STYLE = """
import os
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import TEST_SKIPS

BASE_IMPORT

with open(os.environ["IMPORT_LOG"], "a") as log:
    log.write(f"{__name__} {os.getpid()}\\n")


class Collectives(MultiProcContinuousTest):
    world_size = 2

GLOO_ON_CPU
    def test_a_all_reduce(self):
        tensor = torch.ones(4) * (self.rank + 1)
        dist.all_reduce(tensor)
        self.assertEqual(tensor, torch.full((4,), 3.0))
        self.assertEqual((self.world_size, dist.get_world_size()), (2, 2))
        self.assertIs(dist.distributed_c10d._get_default_group(), type(self).pg)

    def test_b_skip_exit_code(self):
        sys.exit(TEST_SKIPS["small_worldsize"].exit_code)

    def test_c_fails_in_rank_1(self):
        if self.rank == 1:
            self.assertEqual(self.rank + 4, 2)

    def test_d_after_the_failure(self):
        tensor = torch.ones(2) * (self.rank + 1)
        dist.all_reduce(tensor)
        self.assertEqual(tensor, torch.full((2,), 3.0))


class SkipInInit(MultiProcContinuousTest):
    world_size = 2

    @classmethod
    def _init_pg(cls, rank, world_size, rdvz_file):
        sys.exit(TEST_SKIPS["no_cuda"].exit_code)

    def test_one(self):
        pass

    def test_two(self):
        pass
""".replace("\nGLOO_ON_CPU\n", GLOO_ON_CPU + "\n")


def write_torch_style(directory: Path, name: str, base: str) -> Path:
    """The torch-style module ``name`` with ``base`` for its import, alone in its directory."""
    (directory / name).mkdir()
    (directory / name / f"{name}.py").write_text(TORCH_STYLE.replace("BASE_IMPORT", base))
    return directory / name


def importers(import_log: Path) -> Dict[str, Set[str]]:
    found: Dict[str, Set[str]] = {}
    for line in import_log.read_text().splitlines():
        module, pid = line.split()
        found.setdefault(module, set()).add(pid)
    return found


def test_torch_style_class_has_torchs_outcomes_with_only_the_import_switched(tmp_path):
    pytest.importorskip("torch")
    import_log = tmp_path / "imports.log"
    outcomes: Dict[str, Tuple[str, str]] = {}
    # One pytest each: a spawn by either (multiprocessing's own included) fixes the default
    # start method, which changes how torch's class starts its ranks (fork, not spawn).
    for name, base in (("test_torch_base", TORCH_BASE), ("test_fastspawn_base", FASTSPAWN_BASE)):
        outcomes.update(run_pytest(write_torch_style(tmp_path, name, base), {"IMPORT_LOG": str(import_log)}))

    tests = [
        "test_a_all_reduce",
        "test_b_skip_exit_code",
        "test_c_fails_in_rank_1",
        "test_one",
        "test_two",
    ]
    for test in tests:
        torch_outcome, torch_text = outcomes[f"test_torch_base::{test}"]
        ours, our_text = outcomes[f"test_fastspawn_base::{test}"]
        assert ours == torch_outcome, (test, our_text, torch_text)
    for module in ("test_torch_base", "test_fastspawn_base"):
        assert outcomes[f"{module}::test_a_all_reduce"][0] == "passed"
        outcome, text = outcomes[f"{module}::test_b_skip_exit_code"]
        assert outcome == "skipped" and "Skipped due to small world size." in text
        outcome, text = outcomes[f"{module}::test_c_fails_in_rank_1"]
        assert outcome == "failed"
        assert "Exception in worker process:" in text
        assert "Expected 2 but got 5." in text  # rank 1's own assertion, by torch's TestCase
        for test in ("test_one", "test_two"):
            outcome, text = outcomes[f"{module}::{test}"]
            assert outcome == "skipped" and "CUDA is not available." in text

    # The poison pill, the one difference: after test_c failed, torch skips the rest of the
    # class; fastspawn replaced the ranks (and their process group), and test_d ran.
    outcome, text = outcomes["test_torch_base::test_d_after_the_failure"]
    assert outcome == "skipped" and "Previous test failed" in text
    assert outcomes["test_fastspawn_base::test_d_after_the_failure"][0] == "passed"

    # fastspawn's ranks are forks of the zygote: the module was imported by the pytest
    # process and the zygote only, though ranks were started three times (twice for the
    # first class). torch imports it in 2 fresh interpreters per class.
    found = importers(import_log)
    assert len(found["test_fastspawn_base"]) == 2
    assert len(found["test_torch_base"]) == 1 + 2 * 2


def test_unittest_runs_the_class(tmp_path):
    pytest.importorskip("torch")
    directory = write_torch_style(tmp_path, "test_fastspawn_base", FASTSPAWN_BASE)
    result = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "test_fastspawn_base"],
        cwd=directory,
        env={**os.environ, "IMPORT_LOG": str(tmp_path / "imports.log")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stderr  # unittest's -v lines, the ranks' log records among them
    assert "test_a_all_reduce (test_fastspawn_base.Collectives.test_a_all_reduce) ... ok" in report
    assert "skipped 'Skipped due to small world size.'" in report
    assert "ERROR: test_c_fails_in_rank_1 (test_fastspawn_base.Collectives.test_c_fails_in_rank_1)" in report
    assert "Expected 2 but got 5." in report
    assert "test_d_after_the_failure (test_fastspawn_base.Collectives.test_d_after_the_failure) ... ok" in report
    assert report.count("skipped 'CUDA is not available.'") == 2
    assert "FAILED (errors=1, skipped=3)" in report
    assert "Ran 6 tests" in result.stderr


# Scenarios fastspawn handles where torch gives up on the class. Every process that runs a
# test logs its pid (RANK_LOG), to check that none is left at the end.
BEHAVIOURS = """
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from torch.testing._internal.common_distributed import TIMEOUT_OVERRIDE

from fastspawn.testing import MultiProcContinuousTest

TIMEOUT_OVERRIDE["test_a_hangs"] = 2  # torch's table, as a torch-style suite sets it


def log_pid():
    with open(os.environ["RANK_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")


def hang_here_in_rank_1():
    threading.Event().wait()


def crash_here():
    os.kill(os.getpid(), signal.SIGSEGV)


class Gloo(MultiProcContinuousTest):
    world_size = 2
    kill_grace_period = 2.0

GLOO_ON_CPU
    def all_reduce_works(self):
        log_pid()
        tensor = torch.ones(2) * (self.rank + 1)
        dist.all_reduce(tensor)
        self.assertEqual(tensor, torch.full((2,), 3.0))


class Timeout(Gloo):
    def test_a_hangs(self):
        log_pid()
        if self.rank == 1:
            hang_here_in_rank_1()
        dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 here

    def test_b_next(self):
        self.all_reduce_works()


class RankDeath(Gloo):
    def test_a_exit(self):
        log_pid()
        if self.rank == 1:
            os._exit(3)
        dist.all_reduce(torch.ones(1))

    def test_b_fatal_signal(self):
        log_pid()
        if self.rank == 0:
            crash_here()
        dist.all_reduce(torch.ones(1))

    def test_c_next(self):
        self.all_reduce_works()


class HugeFailure(Gloo):
    def test_huge_failure(self):
        # A traceback far over a socket's buffer: the rank blocks sending it, the parent
        # reads it whole.
        if self.rank == 1:
            raise AssertionError("start " + "x" * (4 << 20) + " end")


class WorldSizeProperty(Gloo):
    @property
    def world_size(self):
        return 3

    def test_world_size(self):
        log_pid()
        self.assertEqual((self.world_size, dist.get_world_size()), (3, 3))
        self.all_reduce_works_for_3()

    def all_reduce_works_for_3(self):
        tensor = torch.ones(1) * self.rank
        dist.all_reduce(tensor)
        self.assertEqual(tensor.item(), 3.0)


class KeptAcrossTests(Gloo):
    def test_a_first(self):
        log_pid()
        type(self).first = (os.getpid(), dist.distributed_c10d._get_default_group())
        self.all_reduce_works()

    def test_b_second(self):
        # The same rank process, with the same process group, as in test_a_first.
        self.assertEqual(type(self).first, (os.getpid(), dist.distributed_c10d._get_default_group()))
        self.assertIs(type(self).pg, type(self).first[1])
        self.all_reduce_works()


class SkipInATest(Gloo):
    def test_skip(self):
        log_pid()
        self.skipTest(f"not in rank {self.rank}")

    def test_next(self):
        self.all_reduce_works()


class InitRaises(Gloo):
    @classmethod
    def _init_pg(cls, rank, world_size, rdvz_file):
        log_pid()
        raise ValueError(f"no store for rank {rank}")

    def test_one(self):
        pass

    def test_two(self):
        pass
""".replace("\nGLOO_ON_CPU\n", GLOO_ON_CPU + "\n")


@pytest.fixture(scope="module")
def behaviours(tmp_path_factory):
    """BEHAVIOURS run once, with its own TMPDIR: (outcomes, rank pids, TMPDIR)."""
    pytest.importorskip("torch")
    directory = tmp_path_factory.mktemp("continuous")
    (directory / "test_behaviours.py").write_text(BEHAVIOURS)
    rank_log = directory / "ranks.log"
    tmpdir = directory / "tmp"
    tmpdir.mkdir()
    outcomes = run_pytest(directory, {"RANK_LOG": str(rank_log), "TMPDIR": str(tmpdir)})
    pids = [int(pid) for pid in rank_log.read_text().split()]
    return outcomes, pids, tmpdir


def outcome(behaviours, test: str) -> Tuple[str, str]:
    return behaviours[0][f"test_behaviours::{test}"]


def test_timeout_shows_every_ranks_stack_then_the_next_test_passes(behaviours):
    result, text = outcome(behaviours, "test_a_hangs")
    assert result == "failed"
    assert "timed out after" in text
    rank_0, rank_1 = text.rsplit("-- Process 0 was running at the timeout, in:", 1)[1].split(
        "-- Process 1 was running at the timeout, in:"
    )
    assert "test_a_hangs" in rank_0 and "hang_here_in_rank_1" not in rank_0
    assert "hang_here_in_rank_1" in rank_1
    assert outcome(behaviours, "test_b_next")[0] == "passed"


def test_a_rank_dying_fails_its_test_then_the_next_test_passes(behaviours):
    result, text = outcome(behaviours, "test_a_exit")
    assert result == "failed"
    assert "Process 1 exited with code 3 during test_behaviours.RankDeath.test_a_exit" in text
    # Rank 0 waited in all_reduce: stopped, or failed by the peer's death (gloo's error).
    assert "Process 0 was stopped" in text or "Process 0 failed meanwhile:" in text
    result, text = outcome(behaviours, "test_b_fatal_signal")
    assert result == "failed"
    assert f"Process 0 exited with code -{int(__import__('signal').SIGSEGV)}" in text
    assert "killed by signal 11, in:" in text and "crash_here" in text
    assert outcome(behaviours, "test_c_next")[0] == "passed"


def test_a_huge_failure_arrives_whole(behaviours):
    result, text = outcome(behaviours, "test_huge_failure")
    assert result == "failed"
    assert "AssertionError: start " + "x" * (4 << 20) + " end" in text


def test_world_size_as_a_property(behaviours):
    result, text = outcome(behaviours, "test_world_size")
    assert result == "passed", text


def test_the_ranks_and_their_process_group_are_kept_across_tests(behaviours):
    for test in ("test_a_first", "test_b_second"):
        result, text = outcome(behaviours, test)
        assert result == "passed", text


def test_a_skip_in_a_test_skips_it_with_its_reason(behaviours):
    # torch reports unittest.SkipTest raised in a rank as a failure of the test.
    result, text = outcome(behaviours, "test_skip")
    assert result == "skipped" and "not in rank 0" in text
    assert outcome(behaviours, "test_next")[0] == "passed"


def test_an_error_in_init_fails_each_test_with_the_ranks_traceback(behaviours):
    for test in ("test_one", "test_two"):
        result, text = outcome(behaviours, test)
        assert result == "failed"
        assert "ValueError: no store for rank" in text


def test_nothing_is_left_behind(behaviours):
    _, pids, tmpdir = behaviours
    assert len(set(pids)) >= 2 * 7 + 3  # every start of ranks logged
    assert [pid for pid in pids if not pid_gone(pid)] == []
    assert left_in(tmpdir) == []  # the rendezvous directories are gone


def left_in(tmpdir: Path) -> List[str]:
    """What is left in ``tmpdir`` besides the cache directory that importing torch's
    common_distributed creates (torch's, whichever class is used)."""
    return [name for name in os.listdir(tmpdir) if not name.startswith("torchinductor_")]


# Exit paths where tearDownClass does not stop the ranks: the interpreter exits without
# running it; a rank does not exit when told to (an exit handler that never returns).
LEFT_RUNNING = """
import atexit
import os
import sys
import threading
import unittest

from fastspawn.testing import MultiProcContinuousTest


def log_pid():
    with open(os.environ["RANK_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")


class Ranks(MultiProcContinuousTest):
    world_size = 2
    shutdown_timeout = 1.0
    kill_grace_period = 1.0

    @classmethod
    def _init_pg(cls, rank, world_size, rdvz_file):
        with open(rdvz_file + f".{rank}", "w"):
            pass  # something in the rendezvous directory

    def test_log(self):
        log_pid()
        assert "torch" not in sys.modules

    def test_keeps_running(self):
        log_pid()
        atexit.register(threading.Event().wait)  # the rank's exit never ends


if __name__ == "__main__":
    test = sys.argv[1]
    if test == "no_teardown":
        result = unittest.TestResult()
        Ranks("test_log").run(result)  # a bare run: no setUpClass/tearDownClass
        assert result.wasSuccessful(), result.errors + result.failures
    else:
        suite = unittest.defaultTestLoader.loadTestsFromName("Ranks.test_keeps_running", sys.modules["__main__"])
        result = unittest.TextTestRunner().run(suite)
        assert result.wasSuccessful()
    print("done", flush=True)
"""


@pytest.mark.parametrize("scenario", ["no_teardown", "rank_ignores_exit"])
def test_ranks_and_files_are_gone_however_the_class_ends(tmp_path, scenario):
    # Run without torch (the class is then a unittest.TestCase): on every Python.
    (tmp_path / "left_running.py").write_text(LEFT_RUNNING)
    rank_log = tmp_path / "ranks.log"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = subprocess.run(
        [sys.executable, "left_running.py", scenario],
        cwd=tmp_path,
        env={**env_without_torch(tmp_path), "RANK_LOG": str(rank_log), "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    pids = [int(pid) for pid in rank_log.read_text().split()]
    assert len(pids) == 2
    assert [pid for pid in pids if not pid_gone(pid)] == []
    assert os.listdir(tmpdir) == []
