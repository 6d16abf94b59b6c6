"""Child bodies for test_context.py and test_context_pools.py (children import them by name).

Every body that waits does so on an Event or a bounded sleep the test ends itself; none
sleeps to make a test pass.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time

import fastspawn

LONG = 300  # seconds: a child that must outlive the test's checks; the test always ends it


def return_value():
    return 42


def raise_value_error():
    raise ValueError("bad value 42")


def sys_exit(code):
    sys.exit(code)


def os_exit(code):
    sys.stdout.flush()
    os._exit(code)


def kill_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(LONG)  # never reached: the signal ends the process


def sleep_long():
    time.sleep(LONG)


def wait_event(event):
    event.wait(LONG)


def report_process_group(queue):
    queue.put((os.getpid(), os.getpgid(0)))


def put(queue, value):
    queue.put(value)


def put_kwargs(queue, *args, **kwargs):
    queue.put((args, sorted(kwargs.items())))


def put_big_and_return(queue, size):
    # The feeder thread is still sending when the target returns: the child's exit
    # step (multiprocessing's) must flush it, as in a spawned child.
    queue.put(b"x" * size)


def echo_doubled(conn):
    conn.send(conn.recv() * 2)
    conn.close()


def count_under_lock(lock, value, array, times):
    for _ in range(times):
        with lock:
            value.value += 1
            array[0] += 1.5


def set_event_after(wait_for, to_set):
    wait_for.wait(LONG)
    to_set.set()


def fill_managed(mapping, items):
    mapping["pid_is_int"] = isinstance(os.getpid(), int)
    items.append("from child")


def drain_joinable(queue, out):
    while True:
        item = queue.get(timeout=LONG)
        if item is None:
            queue.task_done()
            return
        out.put(item * 10)
        queue.task_done()


def report_identity(queue):
    me = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    queue.put(
        {
            "name": me.name,
            "identity": me._identity,
            "daemon": me.daemon,
            "authkey": bytes(me.authkey),
            "process_class": type(me).__name__,
            "parent_name": parent.name if parent is not None else None,
            "parent_pid": parent.pid if parent is not None else None,
            "parent_alive": parent.is_alive() if parent is not None else None,
            "ppid": os.getppid(),
            "start_method": multiprocessing.get_start_method(),
            "main_name": sys.modules["__main__"].__name__,
            "stdin": (os.readlink(f"/proc/self/fd/{sys.stdin.fileno()}"), sys.stdin.closed),
        }
    )


def report_context(queue, variable):
    queue.put(
        {
            "env": os.environ.get(variable),
            "cwd": os.getcwd(),
            "sys_path": list(sys.path),
            "argv": list(sys.argv),
        }
    )


def start_grandchild(queue):
    """Start a child of this process's own kind (a daemonic one must refuse)."""
    kind = type(multiprocessing.current_process())
    try:
        child = kind(target=return_value)
        child.start()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(("refused", type(exc).__name__, str(exc)))
        return
    child.join(LONG)
    queue.put(("started", child.exitcode))


def register_atexit(path):
    atexit.register(_write, path, "atexit ran")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def report_zygote(queue):
    zygote = sys.modules.get("fastspawn._zygote")
    queue.put(bool(zygote is not None and zygote.in_zygote_tree()))


class _Reporting:
    """A Process subclass overriding run() (a common pattern), for both contexts."""

    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def run(self):
        me = multiprocessing.current_process()
        self.queue.put(("run", me is self, isinstance(me, _Reporting), self.name == me.name))


class SpawnSubclass(_Reporting, multiprocessing.context.SpawnProcess):
    pass


class FastspawnSubclass(_Reporting, fastspawn.SpawnProcess):
    pass


# ----------------------------------------------------------------------- pools
def square(x):
    return x * x


def pid_of_task(_=None):
    return os.getpid()


def raise_key_error(x):
    raise KeyError(x)


def die_by_sigkill(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


_initialised = None


def initialise(value):
    global _initialised
    _initialised = value


def initialised(_=None):
    return _initialised


def fail_to_initialise():
    raise RuntimeError("initializer failed")


def block_on(event):
    event.wait(LONG)
    return "unblocked"
