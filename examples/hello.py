"""Four workers, each reporting its rank; then a failing worker surfacing in the parent."""

import multiprocessing
import os

import fastspawn


def work(rank: int, world_size: int, results) -> None:
    results.put(f"rank {rank}/{world_size} ran in pid {os.getpid()}")


def fail(rank: int) -> None:
    if rank == 1:
        raise ValueError(f"rank {rank} gave up")


if __name__ == "__main__":
    results = multiprocessing.get_context("spawn").SimpleQueue()
    fastspawn.spawn(work, args=(4, results), nprocs=4)
    for line in sorted(results.get() for _ in range(4)):
        print(line)

    try:
        fastspawn.spawn(fail, nprocs=2)
    except fastspawn.ProcessRaisedException as exc:
        print(f"rank {exc.error_index} failed with {exc.__cause__!r}")
