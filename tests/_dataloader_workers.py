"""Datasets and worker hooks for test_dataloader.py.

They live in a module of their own so that DataLoader workers started by either context
(fastspawn's or multiprocessing's spawn) import them by name. Every dataset item carries
the pid of the worker that made it, so a test knows which processes must be gone at its end.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Dict, Optional

import torch
from torch.utils.data import Dataset, get_worker_info

# Set in each worker by ``init_worker``; stays None in the parent.
MARK: Optional[int] = None


def init_worker(queue: Any, worker_id: int) -> None:
    """worker_init_fn (bound to a queue with functools.partial): reports the worker's pid and
    what get_worker_info() says, and leaves a mark that the worker's items show."""
    global MARK
    info = get_worker_info()
    assert info is not None, "get_worker_info() is None in a worker"
    MARK = 100 + worker_id
    queue.put(
        {
            "worker_id": worker_id,
            "pid": os.getpid(),
            "info_id": info.id,
            "num_workers": info.num_workers,
            "seed_base": info.seed - info.id,
            "dataset": type(info.dataset).__name__,
        }
    )
    # put() hands the report to a feeder thread: wait until it is in the pipe, so that a
    # worker killed right after (test_killed_worker_...) has still delivered it.
    queue.close()
    queue.join_thread()


class Items(Dataset):  # type: ignore[type-arg]
    """``n`` small items: the index, its square, and who made it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        info = get_worker_info()
        return {
            "index": i,
            "square": i * i,
            "pid": os.getpid(),
            "worker": -1 if info is None else info.id,
            "mark": -1 if MARK is None else MARK,
        }


class Big(Items):
    """Items with a large tensor each (4 MiB of float32), filled with the index."""

    SIZE = 1 << 20

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = super().__getitem__(i)
        item["data"] = torch.full((self.SIZE,), float(i))
        return item


class WriteShared(Items):
    """Writes ``i + 1`` into slot ``i`` of a tensor the parent put in shared memory."""

    def __init__(self, n: int, shared: torch.Tensor) -> None:
        super().__init__(n)
        self.shared = shared

    def __getitem__(self, i: int) -> Dict[str, Any]:
        self.shared[i] = i + 1
        item = super().__getitem__(i)
        item["is_shared"] = self.shared.is_shared()
        return item


class Raises(Items):
    """Raises ValueError for index ``bad``."""

    def __init__(self, n: int, bad: int) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i == self.bad:
            raise ValueError(f"item {i} is bad")
        return super().__getitem__(i)


class Dies(Raises):
    """The worker asked for index ``bad`` kills itself with SIGKILL."""

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i == self.bad:
            os.kill(os.getpid(), signal.SIGKILL)
        return Items.__getitem__(self, i)


class Stalls(Raises):
    """Index ``bad`` takes a minute (longer than any DataLoader timeout a test sets)."""

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i == self.bad:
            time.sleep(60)
        return Items.__getitem__(self, i)
