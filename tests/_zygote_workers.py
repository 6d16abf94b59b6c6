"""Child functions for test_zygote.py (imported by children: keep it light)."""

import os
import random
import sys
import time


def report_context(rank, queue):
    import numpy

    mask = os.umask(0)
    os.umask(mask)
    queue.put(
        {
            "rank": rank,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "env": os.environ.get("FASTSPAWN_TEST_VALUE"),
            "cwd": os.getcwd(),
            "path_marker": "/fastspawn-test-path-marker" in sys.path,
            "umask": mask,
            "random": random.random(),
            "numpy": float(numpy.random.rand()),
        }
    )


def report_torch_random(rank, queue):
    import torch

    queue.put((rank, torch.initial_seed(), float(torch.rand(1))))


def report_pid(rank, queue):
    queue.put((rank, os.getpid(), os.getppid()))


def nested(rank, queue):
    import fastspawn

    ctx = fastspawn.start_processes(report_pid, args=(queue,), nprocs=2, join=False)
    queue.put(("nested", os.getpid(), ctx.pids()))
    while not ctx.join():
        pass


def memory(rank, queue):
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    queue.put((rank, fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]))


def sleep_forever(rank, ready):
    ready.put(os.getpid())
    time.sleep(600)


def register_atexit(rank, path):
    import atexit

    def write():
        with open(f"{path}.{rank}", "w") as f:
            f.write("atexit ran")

    atexit.register(write)


def print_rank(rank):
    print(f"rank-{rank}", flush=True)


def report_open_fds(rank, conn):
    from multiprocessing import parent_process

    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the one listdir used
    conn.send({"fds": fds, "sentinel": parent_process()._sentinel, "conn": conn.fileno()})
