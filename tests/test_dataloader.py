"""torch DataLoader workers started by ``fastspawn.get_context()``.

Each behaviour DataLoader users rely on is checked with ``multiprocessing_context=`` set to
fastspawn's context, and, where it costs little (children that import torch take about a
second of CPU each under spawn), to ``multiprocessing.get_context("spawn")`` with the very
same assertions: the two must give the same items, the same worker info and the same
errors, word for word. Dataset classes live in ``_dataloader_workers`` (workers import them
by name). Every worker reports its pid through ``worker_init_fn``; each test ends by
checking those processes are gone.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import pickle
import re
import traceback
from typing import Any, Dict, Iterator, List, Tuple

import pytest

torch = pytest.importorskip("torch")

import _dataloader_workers as dw  # noqa: E402
from _faultkit import wait_gone  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import fastspawn  # noqa: E402

WAIT = 60  # seconds: a bound for what happens at once when all is well
GONE = 30  # seconds for a worker to be gone once its loader is done with it (DataLoader joins for 5 s, then terminates)
CONTEXTS = ["fastspawn", "spawn"]

pytestmark = [
    pytest.mark.timeout(240),
    # DataLoader's advice when num_workers exceeds the CPUs it sees (a 1-CPU runner).
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]


def get_ctx(name: str) -> Any:
    return fastspawn.get_context() if name == "fastspawn" else multiprocessing.get_context("spawn")


class Workers:
    """A worker_init_fn that reports each worker (pid, get_worker_info()) over a queue."""

    def __init__(self, ctx: Any) -> None:
        self.queue = ctx.Queue()
        self.init_fn = functools.partial(dw.init_worker, self.queue)
        self.reports: List[Dict[str, Any]] = []

    def collect(self, n: int) -> List[Dict[str, Any]]:
        """The next ``n`` reports (one per worker started), in worker-id order."""
        got = [self.queue.get(timeout=WAIT) for _ in range(n)]
        self.reports += got
        return sorted(got, key=lambda r: r["worker_id"])

    @property
    def pids(self) -> List[int]:
        return [r["pid"] for r in self.reports]


@pytest.fixture
def workers() -> Iterator[Any]:
    """Make a Workers for a context; at teardown, every reported worker must be gone."""
    made: List[Workers] = []

    def make(ctx: Any) -> Workers:
        made.append(Workers(ctx))
        return made[-1]

    yield make
    gc.collect()  # a loader or iterator kept alive by a traceback shuts its workers down here
    pids = [p for w in made for p in w.pids]
    for w in made:
        w.queue.close()
        w.queue.join_thread()
    assert wait_gone(pids, GONE) == [], "DataLoader workers still running after the test"


def rows(batches: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Collated batches of Items back into one dict per item (tensors to Python values)."""
    out = []
    for batch in batches:
        keys = [k for k in batch if k != "data"]
        for i in range(len(batch["index"])):
            out.append({k: batch[k][i].item() for k in keys})
    return out


def expected_items(n: int, batch_size: int, num_workers: int) -> List[Dict[str, int]]:
    """Items as DataLoader's in-order sampler hands them out: batch k to worker k % num_workers."""
    return [
        {"index": i, "square": i * i, "worker": (i // batch_size) % num_workers,
         "mark": 100 + (i // batch_size) % num_workers}
        for i in range(n)
    ]  # fmt: skip


def without_pids(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("pid", "is_shared")} for item in items]


def iterate_until_error(ctx: Any, workers: Any, dataset: Any, error: type) -> Tuple[List[int], str, List[Dict[str, Any]]]:
    """Iterate a 2-worker, batch-1 loader over ``dataset`` until it raises ``error``: the
    indices received before, the error's text, and the workers' reports."""
    w = workers(ctx)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=w.init_fn,
                        multiprocessing_context=ctx)  # fmt: skip
    got = []
    with pytest.raises(error) as info:
        for batch in loader:
            got.append(batch["index"].item())
    message = str(info.value)
    # The error's traceback holds the loader's iterator in a reference cycle: cleared, the
    # iterator goes at once and shuts its workers down as DataLoader does when all is well
    # (left to the cycle collector, DataLoader's shutdown waits 5 s per worker, spawn too).
    traceback.clear_frames(info.value.__traceback__)
    del info
    return got, message, w.collect(2)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", CONTEXTS)
def test_items_worker_info_and_worker_init_fn(name: str, workers: Any) -> None:
    """Not persistent: one epoch gives every item in order, made by the worker the sampler
    picked, whose worker_init_fn ran first and whose get_worker_info() describes it."""
    w = workers(get_ctx(name))
    loader = DataLoader(
        dw.Items(10), batch_size=2, num_workers=2, worker_init_fn=w.init_fn,
        multiprocessing_context=get_ctx(name),
    )  # fmt: skip
    items = rows(list(loader))
    reports = w.collect(2)

    assert without_pids(items) == expected_items(10, 2, 2)
    assert [(r["worker_id"], r["info_id"], r["num_workers"], r["dataset"]) for r in reports] == [
        (0, 0, 2, "Items"),
        (1, 1, 2, "Items"),
    ]
    assert reports[0]["seed_base"] == reports[1]["seed_base"]  # worker seed = base_seed + id
    by_worker = {r["worker_id"]: r["pid"] for r in reports}
    assert {item["pid"] for item in items} == set(by_worker.values())
    assert all(item["pid"] == by_worker[item["worker"]] for item in items)
    assert os.getpid() not in by_worker.values()
    # Not persistent: the epoch's end shut its workers down.
    assert wait_gone(w.pids, GONE) == []


def test_iterating_twice_starts_new_workers(workers: Any) -> None:
    ctx = fastspawn.get_context()
    w = workers(ctx)
    loader = DataLoader(dw.Items(6), batch_size=3, num_workers=2, worker_init_fn=w.init_fn,
                        multiprocessing_context=ctx)  # fmt: skip
    first = rows(list(loader))
    first_pids = {r["pid"] for r in w.collect(2)}
    assert wait_gone(first_pids, GONE) == []
    second = rows(list(loader))
    second_pids = {r["pid"] for r in w.collect(2)}

    assert without_pids(first) == without_pids(second) == expected_items(6, 3, 2)
    assert {item["pid"] for item in first} == first_pids
    assert {item["pid"] for item in second} == second_pids
    assert first_pids.isdisjoint(second_pids)


def test_persistent_workers_serve_every_epoch(workers: Any) -> None:
    """persistent_workers=True (and timeout= set): the same two workers serve three epochs,
    and they end when the loader goes away."""
    ctx = fastspawn.get_context()
    w = workers(ctx)
    loader = DataLoader(dw.Items(8), batch_size=2, num_workers=2, worker_init_fn=w.init_fn,
                        persistent_workers=True, timeout=WAIT, multiprocessing_context=ctx)  # fmt: skip
    epochs = [rows(list(loader)) for _ in range(3)]
    pids = {r["pid"] for r in w.collect(2)}

    for items in epochs:
        assert without_pids(items) == expected_items(8, 2, 2)
        assert {item["pid"] for item in items} == pids
    assert w.queue.empty()  # no worker was started after the first epoch's two
    del loader
    gc.collect()
    assert wait_gone(pids, GONE) == []


def test_large_tensors_come_back_in_shared_memory(workers: Any) -> None:
    """Batches of 4 MiB tensors collated in the workers arrive in shared memory, intact."""
    ctx = fastspawn.get_context()
    w = workers(ctx)
    loader = DataLoader(dw.Big(6), batch_size=2, num_workers=2, worker_init_fn=w.init_fn,
                        multiprocessing_context=ctx)  # fmt: skip
    batches = list(loader)
    w.collect(2)

    assert len(batches) == 3
    for k, batch in enumerate(batches):
        data = batch["data"]
        assert data.shape == (2, dw.Big.SIZE)
        assert data.is_shared()
        for j in range(2):
            assert bool((data[j] == float(2 * k + j)).all())


@pytest.mark.parametrize("name", CONTEXTS)
def test_tensor_shared_by_the_parent_is_written_by_workers(name: str, workers: Any) -> None:
    """A dataset holding a tensor moved to shared memory with share_memory_(): workers get
    the same memory (not a copy), so what they write, the parent sees."""
    ctx = get_ctx(name)
    w = workers(ctx)
    shared = torch.zeros(8).share_memory_()
    loader = DataLoader(dw.WriteShared(8, shared), batch_size=2, num_workers=2,
                        worker_init_fn=w.init_fn, multiprocessing_context=ctx)  # fmt: skip
    items = rows(list(loader))
    w.collect(2)

    assert without_pids(items) == expected_items(8, 2, 2)
    assert all(item["is_shared"] for item in items)
    assert shared.tolist() == [float(i + 1) for i in range(8)]


@pytest.mark.parametrize("name", CONTEXTS)
def test_worker_exception_is_reraised_by_dataloader(name: str, workers: Any) -> None:
    """A dataset raising in a worker: DataLoader re-raises the same type in the parent, with
    its own message naming the worker and the worker's traceback."""
    got, message, _ = iterate_until_error(get_ctx(name), workers, dw.Raises(8, bad=3), ValueError)

    assert got == [0, 1, 2]
    assert message.startswith("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback")
    assert message.rstrip().endswith("ValueError: item 3 is bad")
    assert 'in __getitem__\n    raise ValueError(f"item {i} is bad")' in message


# DataLoader raises its error from its SIGCHLD handler, wherever the main thread is: now and
# then inside multiprocessing's fd transfer of an earlier batch, between socket.fromfd() and
# the `with` that would close that socket (seen once in CI; either context can hit it). The socket is
# then closed by the garbage collector, with a ResourceWarning that is not ours to fix.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.parametrize("name", CONTEXTS)
def test_killed_worker_is_reported_by_dataloader(name: str, workers: Any) -> None:
    """A worker killed by a signal: DataLoader notices and raises its RuntimeError naming the pid."""
    got, message, reports = iterate_until_error(get_ctx(name), workers, dw.Dies(8, bad=3), RuntimeError)
    gc.collect()  # such a socket is closed here, under this test's warning filter

    assert got == [0, 1, 2][: len(got)]  # how many arrive before DataLoader notices depends on timing
    match = re.fullmatch(r"DataLoader worker \(pid\(s\) (\d+)\) exited unexpectedly", message)
    assert match, message
    assert int(match.group(1)) == reports[1]["pid"]  # index 3 went to worker 1


@pytest.mark.parametrize("name", CONTEXTS)
def test_timeout_raises_and_the_stalled_worker_is_ended(name: str, workers: Any) -> None:
    ctx = get_ctx(name)
    w = workers(ctx)
    loader = DataLoader(dw.Stalls(4, bad=0), batch_size=1, num_workers=2, worker_init_fn=w.init_fn,
                        timeout=1, multiprocessing_context=ctx)  # fmt: skip
    it = iter(loader)
    with pytest.raises(RuntimeError, match=r"^DataLoader timed out after 1 seconds$"):
        next(it)
    reports = w.collect(2)
    del it  # shuts its workers down: the stalled one is terminated after DataLoader's 5 s join
    gc.collect()
    assert wait_gone([r["pid"] for r in reports], GONE) == []


def test_closures_as_collate_fn_and_worker_init_fn(workers: Any) -> None:
    """What spawn cannot send (a lambda collate_fn, a closure worker_init_fn) works with
    fastspawn's context: such callables travel by value."""
    ctx = fastspawn.get_context()
    w = workers(ctx)
    offset = 1000
    report = w.init_fn

    def init(worker_id: int) -> None:
        report(worker_id)
        dw.MARK = offset + worker_id

    loader = DataLoader(dw.Items(4), batch_size=2, num_workers=2, worker_init_fn=init,
                        collate_fn=lambda batch: [(item["index"], item["mark"]) for item in batch],
                        multiprocessing_context=ctx)  # fmt: skip
    batches = list(loader)
    w.collect(2)
    assert batches == [[(0, 1000), (1, 1000)], [(2, 1001), (3, 1001)]]


def test_spawn_cannot_send_a_lambda_collate_fn() -> None:
    """The other side of the test above: the same loader on spawn fails to start its
    workers (the reason the fastspawn context sends such callables by value)."""
    loader = DataLoader(dw.Items(4), batch_size=2, num_workers=2,
                        collate_fn=lambda batch: batch, multiprocessing_context="spawn")  # fmt: skip
    with pytest.warns(UserWarning, match="Got pickle error"):
        with pytest.raises((AttributeError, pickle.PicklingError), match="lambda"):
            iter(loader)
