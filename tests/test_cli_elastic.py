"""Elastic jobs of several "nodes" on one machine: separate agent processes (``fastspawn``,
and ``torchrun`` as the differential reference) on loopback with distinct ``--local-addr``,
joined by torch's c10d rendezvous over a TCPStore this test serves (so no node's exit takes
the store away). Scenarios: a node that joins late, a rank failure that restarts every
node's ranks, a node SIGKILLed from a 1:3 job, two jobs kept apart by their run ids.

Every node runs in its own session and is killed (process group) at teardown; every wait
has a deadline."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from _cli_wait import wait_for_pids

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

pytestmark = pytest.mark.timeout(240)

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "_cli_elastic.py")
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "fastspawn": [str(BIN / "fastspawn")] if (BIN / "fastspawn").exists() else [sys.executable, "-m", "fastspawn"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}
WAIT = 120.0  # seconds any one step may take on a loaded 2-core machine
# torch 2.13's c10d rendezvous shares its TCPStore with the workers by default, and then a node
# that joins a running job waits forever for the store's address (rank 0 writes it only in its
# first round: dynamic_rendezvous.py, next_rendezvous). torchrun hangs alike; torch's switch
# turns the sharing off. Used where nodes join after a first round, and where one node's rank
# fails: with the shared store the workers meet under a key prefix named after their
# TORCHELASTIC_RESTART_COUNT, and a node restarted because another re-rendezvoused keeps its
# count (as torch's agent does) while the failed node's count went up, so they never meet.
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class Node:
    """One agent process (a "node"), its output lines collected as they come."""

    def __init__(self, launcher, args, local_addr, env):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SLURM_", "TORCHELASTIC_"))}, **env}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([*LAUNCHERS[launcher], "--local-addr", local_addr, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.lines = queue.Queue()
        self.records = []
        self.stderr = []
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self, stream, is_stdout):
        for line in stream:
            if not is_stdout:
                self.stderr.append(line)
                continue
            start = line.find("{")
            if start >= 0:
                self.lines.put({**json.loads(line[start:]), "prefix": line[:start]})

    def wait_for(self, predicate, timeout=WAIT):
        """The first record (from now on, kept in ``records``) satisfying ``predicate``."""
        for record in self.records:
            if predicate(record):
                return record
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such record in {timeout}s; stderr:\n{''.join(self.stderr)[-3000:]}")
            try:
                record = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.records.append(record)
            if predicate(record):
                return record

    def finish(self, timeout=WAIT):
        """Exit status, once the process ended and its output was read."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node still running; stderr:\n{''.join(self.stderr)[-3000:]}") from None
        for thread in self._threads:
            thread.join(WAIT)
        while not self.lines.empty():
            self.records.append(self.lines.get())
        return code

    def kill(self):
        """The node dies: the agent and every process under it (torchrun's workers run in
        sessions of their own, so the agent's process group is not enough)."""
        victims = [self.proc.pid, *descendants(self.proc.pid)]
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(WAIT)


def descendants(pid):
    """Pids of the processes under ``pid`` (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def cluster(tmp_path_factory):
    """Start nodes against one c10d rendezvous store served here; kill them all at the end.
    Their TMPDIR is the test's (torchrun leaves its temporary log directories behind)."""
    tmpdir = str(tmp_path_factory.mktemp("nodes"))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=WAIT))
    nodes = []

    def start(launcher, nnodes, run_id, local_addr, *extra, nproc=2, max_restarts=0, script_args=(), env=None,
              conf="", script=WORKER):
        args = ["--nproc-per-node", str(nproc), "--nnodes", nnodes, "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", run_id,
                "--rdzv-conf", "is_host=0,join_timeout=120,last_call_timeout=1" + conf,
                "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", *extra,
                script, *script_args]
        node = Node(launcher, args, local_addr, {"TMPDIR": tmpdir, **(env or {})})
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()
        for stream in (node.proc.stdout, node.proc.stderr):
            stream.close()
    del store


def done(records):
    return {r["rank"]: r for r in records if r["event"] == "done"}


@pytest.mark.parametrize("launcher", ["fastspawn", "torchrun"])
def test_a_node_that_joins_late_restarts_the_group_without_using_a_restart(cluster, launcher):
    first = cluster(launcher, "1:2", "late", "127.0.0.1", script_args=["--until-world", "4"], env=NO_SHARED_STORE)
    ready = first.wait_for(lambda r: r["event"] == "ready")
    assert ready["world"] == 2  # alone at first: min 1 node
    second = cluster(launcher, "1:2", "late", "127.0.0.2", script_args=["--until-world", "4"], env=NO_SHARED_STORE)
    assert first.finish() == 0 and second.finish() == 0
    ranks = {**done(first.records), **done(second.records)}
    assert sorted(ranks) == [0, 1, 2, 3]
    assert all(r["world"] == 4 and r["restart"] == 0 for r in ranks.values())  # no restart consumed
    assert {r["group_rank"] for r in ranks.values()} == {0, 1}
    if launcher == "fastspawn":  # fastspawn's output: every line whole, prefixed with its global rank
        assert all(r["prefix"] == f"[{r['rank']}]:" for r in first.records + second.records)


@pytest.mark.parametrize("launcher", ["fastspawn", "torchrun"])
def test_a_rank_failure_restarts_every_nodes_ranks(cluster, launcher):
    script = ["--fail-rank", "3", "--until-restart", "1"]
    nodes = [cluster(launcher, "2", "fail", f"127.0.0.{i + 1}", max_restarts=1, script_args=script,
                     env=NO_SHARED_STORE) for i in range(2)]
    assert [node.finish() for node in nodes] == [0, 0]
    ranks = {}
    for node in nodes:
        ranks.update(done(node.records))
        # every node's ranks ran twice: the first round (rank 3 failed) and the restarted one
        assert len([r for r in node.records if r["event"] == "ready"]) == 4
    assert sorted(ranks) == [0, 1, 2, 3] and all(r["world"] == 4 for r in ranks.values())
    failed = next(n for n in nodes if any(r["rank"] == 3 and r["restart"] == 0 for r in n.records))
    assert {r["restart"] for r in done(failed.records).values()} == {1}  # rank 3's node used its restart


def test_a_failure_beyond_max_restarts_is_reported_as_fastspawn_does(cluster):
    node = cluster("fastspawn", "1", "fails", "127.0.0.1", max_restarts=1,
                   script_args=["--fail-rank", "1", "--fail-always"])
    assert node.finish() == 3  # the failed rank's exit status
    stderr = "".join(node.stderr)
    assert "restarting the 2 local ranks" in stderr
    summary = stderr[stderr.index("====="):]
    assert f"{WORKER} FAILED" in summary and "rank      : 1 (local_rank: 1)" in summary
    assert "exitcode  : 3" in summary and "rank      : 0" not in summary  # rank 0 was stopped, not failed


@pytest.mark.parametrize("launcher", ["fastspawn", "torchrun"])
def test_a_killed_node_leaves_the_others_going(cluster, launcher):
    script = ["--until-restart", "1"]
    nodes = [cluster(launcher, "1:3", "kill", f"127.0.0.{i + 1}", max_restarts=1, script_args=script,
                     env=NO_SHARED_STORE, conf=",keep_alive_interval=1,keep_alive_max_attempt=2")
             for i in range(3)]
    for node in nodes:
        node.wait_for(lambda r: r["event"] == "ready" and r["world"] == 6)
    nodes[2].kill()
    assert nodes[0].finish() == 0 and nodes[1].finish() == 0
    ranks = {**done(nodes[0].records), **done(nodes[1].records)}
    assert sorted(ranks) == [0, 1, 2, 3] and all(r["world"] == 4 for r in ranks.values())
    # a node whose ranks failed (their peers died) used its restart; one that saw the others
    # re-rendezvous first restarted without using one (torch's agent semantics)
    assert max(r["restart"] for r in ranks.values()) == 1


def test_two_jobs_on_one_store_are_kept_apart_by_run_id(cluster):
    jobs = {run_id: [cluster("fastspawn", "2", run_id, f"127.0.0.{i + 1}") for i in range(2)]
            for run_id in ("job-a", "job-b")}
    for run_id, nodes in jobs.items():
        assert [node.finish() for node in nodes] == [0, 0]
        ranks = {**done(nodes[0].records), **done(nodes[1].records)}
        assert sorted(ranks) == [0, 1, 2, 3]
        assert {r["run_id"] for r in ranks.values()} == {run_id} and all(r["world"] == 4 for r in ranks.values())


def test_ctrl_c_stops_an_elastic_node(cluster, tmp_path):
    node = cluster("fastspawn", "1", "ctrl-c", "127.0.0.1", "--shutdown-timeout", "1",
                   script=str(HERE / "_cli_script.py"), script_args=["hang", str(tmp_path)])
    pids = wait_for_pids(tmp_path, 2, node.proc, WAIT)
    node.proc.send_signal(signal.SIGINT)
    assert node.finish() == 128 + signal.SIGINT
    for pid in pids:  # rank 0 ignored SIGTERM: it got SIGKILL after the grace period
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
