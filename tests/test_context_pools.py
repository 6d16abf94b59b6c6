"""Process pools on fastspawn.get_context(): concurrent.futures.ProcessPoolExecutor and
multiprocessing's Pool (``ctx.Pool``), on both of fastspawn's paths (zygote and fresh
interpreters). Each test leaves no worker running: checked after it, by pid."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import _context_workers as w
import fastspawn
from _context_fixtures import WAIT, nothing_left_running  # noqa: F401 - autouse

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["zygote", "fresh"])
def ctx(request, monkeypatch):
    if request.param == "fresh":
        monkeypatch.setenv("FASTSPAWN_ZYGOTE", "0")
    return fastspawn.get_context()


def _all_ended(processes):
    """Whether every worker has exited and been reaped (its exit code is known)."""
    return bool(processes) and all(process.exitcode is not None for process in processes)


# ------------------------------------------------------------------------ ProcessPoolExecutor
def test_executor_results_and_exceptions(ctx):
    with ProcessPoolExecutor(max_workers=3, mp_context=ctx) as executor:
        assert list(executor.map(w.square, range(20))) == [x * x for x in range(20)]
        assert list(executor.map(w.square, range(10), chunksize=4)) == [x * x for x in range(10)]
        future = executor.submit(w.raise_key_error, "missing")
        with pytest.raises(KeyError) as raised:
            future.result(WAIT)
        assert raised.value.args == ("missing",)
        assert "raise KeyError(x)" in str(raised.value.__cause__)  # the worker's traceback
        pids = {executor.submit(w.pid_of_task).result(WAIT) for _ in range(6)}
        assert os.getpid() not in pids and 1 <= len(pids) <= 3
        workers = list(executor._processes.values())
    assert _all_ended(workers)


def test_executor_initializer(ctx):
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=w.initialise, initargs=("ready",)) as executor:
        assert list(executor.map(w.initialised, range(4))) == ["ready"] * 4


def test_executor_failing_initializer_breaks_the_pool(ctx):
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=w.fail_to_initialise) as executor:
        with pytest.raises(BrokenProcessPool):
            executor.submit(w.square, 2).result(WAIT)


def test_executor_worker_killed_breaks_the_pool(ctx):
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as executor:
        assert executor.submit(w.square, 3).result(WAIT) == 9
        workers = list(executor._processes.values())
        with pytest.raises(BrokenProcessPool, match="terminated abruptly"):
            executor.submit(w.die_by_sigkill).result(WAIT)
        with pytest.raises(BrokenProcessPool):
            executor.submit(w.square, 1)
    assert _all_ended(workers)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in Python 3.11")
def test_executor_max_tasks_per_child(ctx):
    # One task at a time: Python 3.11's executor can hang when a map outruns the worker
    # replacement (CPython gh-115634), with spawn's context as with this one.
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, max_tasks_per_child=2) as executor:
        pids = [executor.submit(w.pid_of_task).result(WAIT) for _ in range(8)]
    served = {pid: pids.count(pid) for pid in pids}
    assert max(served.values()) <= 2 and len(served) >= 4, served


def test_executor_accepts_max_tasks_per_child_as_for_spawn():
    if sys.version_info < (3, 11):
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    # The executor refuses it for "fork" contexts only: ours reports "spawn".
    ProcessPoolExecutor(max_workers=1, mp_context=fastspawn.get_context(), max_tasks_per_child=1).shutdown()
    with pytest.raises(ValueError):
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=1)


# ------------------------------------------------------------------------ multiprocessing.Pool
def test_pool_map_imap_apply(ctx):
    with ctx.Pool(3) as pool:
        assert pool.map(w.square, range(10)) == [x * x for x in range(10)]
        assert list(pool.imap(w.square, range(5))) == [0, 1, 4, 9, 16]
        assert sorted(pool.imap_unordered(w.square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        assert pool.apply_async(w.square, (7,)).get(WAIT) == 49
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        workers = list(pool._pool)
        pool.close()
        pool.join()
    assert _all_ended(workers)


def test_pool_failing_task(ctx):
    with ctx.Pool(2) as pool:
        with pytest.raises(KeyError) as raised:
            pool.apply(w.raise_key_error, ("nope",))
        assert raised.value.args == ("nope",)
        assert "raise KeyError(x)" in str(raised.value.__cause__)
        result = pool.map_async(w.raise_key_error, [1])
        with pytest.raises(KeyError):
            result.get(WAIT)
        assert pool.apply(w.square, (5,)) == 25  # the pool still works


def test_pool_initializer_and_maxtasksperchild(ctx):
    with ctx.Pool(2, initializer=w.initialise, initargs=("set up",), maxtasksperchild=1) as pool:
        assert pool.map(w.initialised, range(4), chunksize=1) == ["set up"] * 4
        pids = pool.map(w.pid_of_task, range(6), chunksize=1)
    assert len(set(pids)) == 6, pids  # one task per worker: every task had a new one


def test_pool_terminate_stops_busy_workers(ctx):
    pool = ctx.Pool(2)
    try:
        manager = ctx.Manager()  # Events reach pool tasks as proxies
        try:
            blocker = manager.Event()
            pending = [pool.apply_async(w.block_on, (blocker,)) for _ in range(2)]
            workers = list(pool._pool)
            pool.terminate()
            pool.join()
            assert not any(result.ready() and result.successful() for result in pending)
        finally:
            manager.shutdown()
    finally:
        pool.terminate()
    assert _all_ended(workers)
