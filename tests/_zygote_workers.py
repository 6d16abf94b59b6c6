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


def register_atexit(rank, path, queue=None):
    """Register an atexit handler that writes ``{path}.{rank}``; put ``rank`` on ``queue``
    (a multiprocessing queue sends it from a feeder thread, flushed as the child ends)."""
    import atexit

    def write():
        with open(f"{path}.{rank}", "w") as f:
            f.write("atexit ran")

    atexit.register(write)
    if queue is not None:
        queue.put(rank)


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


def report_stdin(rank, queue):
    queue.put(
        {
            "read": sys.stdin.read(),
            "reads_from": os.readlink(f"/proc/self/fd/{sys.stdin.fileno()}"),
            "fd0_replaced": sys.stdin.fileno() != 0,
            "original_closed": sys.__stdin__.closed if sys.__stdin__ is not None else None,
        }
    )


class PidOnLoad:
    """Records, when unpickled, the pid of the process that unpickled it."""

    def __init__(self):
        self.loaded_in = None

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.loaded_in = os.getpid()


def report_loaded_in(rank, queue, probe):
    queue.put((rank, os.getpid(), probe.loaded_in))


def finalizers(rank, base):
    """Drops the object behind the zygote's "collect" finalizer (it must fire here) and
    registers an exit finalizer of its own (it must run at exit)."""
    import weakref

    import _zygote_finalizers

    del _zygote_finalizers.collected_here
    import gc

    gc.collect()
    weakref.finalize(report_loaded_in, _write, f"{base}.own.{rank}", "own ran")


def _write(path, text):
    with open(path, "a") as f:
        f.write(f"{text} in {os.getpid()}\n")


def report_argv(rank, queue):
    queue.put(list(sys.argv))


def report_group(rank, queue):
    queue.put((rank, os.getpid(), os.getppid(), os.getpgid(0)))


def exit_now(rank):
    pass


def idle(rank):
    time.sleep(600)


def report_inheritable_fds(rank, conn):
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    conn.send(sorted(fd for fd in fds if fd > 2 and _is_open(fd) and os.get_inheritable(fd)))


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
