"""Child-process entry points for the fastspawn test suite.

Spawned children import this module by name (``_workers``), so it must stay light:
only the standard library at module level. Functions that need torch import it inside.
Every function takes the rank as its first argument, as spawn/start_processes call it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

# Long enough that a child "still running" is never mistaken for one that finished:
# such children are always terminated by the test (or by the join that fails).
LONG_SLEEP = 600.0


# --------------------------------------------------------------------------- helpers
def _sleep_forever() -> None:
    while True:
        time.sleep(LONG_SLEEP)


def _no_core_dump() -> None:
    """Make a fatal signal quiet: no core file and no faulthandler dump."""
    import faulthandler
    import resource

    faulthandler.disable()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


# --------------------------------------------------------------------------- exceptions
class CustomError(Exception):
    """An ordinary exception class with several args; pickles by reference to this module."""


class UnpicklableError(Exception):
    """Raising works, pickling refuses."""

    def __reduce__(self):
        raise TypeError("UnpicklableError instances refuse to be pickled")


class UnloadableError(Exception):
    """Pickles fine, but unpickling fails: __init__ needs two arguments, args holds one."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


class FailsToUnpickle:
    """An argument that pickles in the parent and raises while being unpickled in a child."""

    def __reduce__(self):
        return (_refuse_to_load, ("argument refuses to load in the child",))


def _refuse_to_load(message):
    raise RuntimeError(message)


# --------------------------------------------------------------------------- basic bodies
def noop(i):
    pass


def touch_file(i, directory):
    with open(os.path.join(directory, f"rank{i}"), "w") as fh:
        fh.write(str(os.getpid()))


def put_rank(i, queue):
    queue.put(i)


def raise_in_rank(i, bad_rank):
    if i == bad_rank:
        raise ValueError(f"legitimate exception from process {i}")


def raise_in_rank_others_sleep(i, bad_rank):
    if i == bad_rank:
        raise ValueError(f"legitimate exception from process {i}")
    _sleep_forever()


def raise_value_error(i):
    raise ValueError(f"legitimate exception from process {i}")


def raise_custom(i):
    raise CustomError("custom failure", i, {"rank": i})


def raise_unpicklable(i):
    raise UnpicklableError(f"cannot cross a pipe (rank {i})")


def raise_unloadable(i):
    raise UnloadableError("rank", i)


def abort_in_rank(i, bad_rank):
    if i == bad_rank:
        _no_core_dump()
        os.abort()
    _sleep_forever()


def exit_in_rank(i, bad_rank, code, how):
    if i == bad_rank:
        if how == "sys.exit":
            sys.exit(code)
        os._exit(code)
    _sleep_forever()


def raise_keyboard_interrupt(i, queue):
    queue.put(i)
    raise KeyboardInterrupt


def raise_system_exit(i, code):
    raise SystemExit(code)


def sleep_forever(i):
    _sleep_forever()


def wait_event(i, event):
    if not event.wait(LONG_SLEEP):
        raise RuntimeError("event was never set")


def report_ready_then_sleep(i, queue):
    queue.put((i, os.getpid()))
    _sleep_forever()


def report_ready_synchronously_then_sleep(i, simple_queue):
    """Like report_ready_then_sleep, but the report is written before put() returns and
    no helper thread or lock is left behind: a KeyboardInterrupt any time after the
    parent has read it cannot wedge the child's exit (an mp.Queue feeder could)."""
    simple_queue.put((i, os.getpid()))
    _sleep_forever()


def succeed_then_fail(i, reader, writer):
    """Rank 0 returns at once; rank 1 raises only once rank 0 has exited.

    Every process holding ``writer`` closes it (rank 0 by exiting, the parent right after
    starting the children), so EOF on ``reader`` in rank 1 means rank 0 is gone."""
    if i == 0:
        return
    writer.close()
    try:
        reader.recv()
    except EOFError:
        pass
    raise ValueError(f"legitimate exception from process {i}")


def fail_when_told(i, go):
    """Rank 0 exits with code 1 once ``go`` is set; the others run until terminated."""
    if i == 0:
        if not go.wait(LONG_SLEEP):
            raise RuntimeError("never told to fail")
        os._exit(1)
    _sleep_forever()


def report_environment(i, queue, name):
    queue.put((i, os.environ.get(name), os.getcwd()))


def print_something(i):
    # One write per line: print() writes the text and the newline separately, and two
    # ranks printing at once could then interleave within a line.
    sys.stdout.write(f"stdout of rank {i}\n")
    sys.stdout.flush()
    sys.stderr.write(f"stderr of rank {i}\n")
    sys.stderr.flush()


def raise_big(i, size):
    raise ValueError("x" * size)


def report_payload(i, payload, queue):
    import hashlib

    queue.put((i, len(payload), hashlib.sha256(payload).hexdigest()))


def wait_event_then_put(i, event, queue):
    if not event.wait(LONG_SLEEP):
        raise RuntimeError("event was never set")
    queue.put(i)


def _grandchild(queue, rank):
    queue.put(("grandchild", rank, multiprocessing.current_process().name))


def start_grandchild(i, method, queue):
    """A child that starts a multiprocessing child of its own (as DataLoader workers do)."""
    p = multiprocessing.get_context(method).Process(target=_grandchild, args=(queue, i))
    p.start()
    p.join()
    me = multiprocessing.current_process()
    queue.put(("child", i, me.name, p.name, p.exitcode))


def try_to_start_children(i, queue):
    """Report what happens when this child starts children of its own, both ways."""
    import fastspawn

    outcomes = []
    for how in ("multiprocessing", "fastspawn"):
        try:
            if how == "multiprocessing":
                p = multiprocessing.get_context("spawn").Process(target=noop, args=(0,))
                p.start()
                p.join()
            else:
                fastspawn.start_processes(noop, nprocs=1, start_method="spawn")
            outcomes.append((how, "started"))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcomes.append((how, f"{type(exc).__name__}: {exc}"))
    queue.put(outcomes)


def report_identity(i, queue):
    current = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    queue.put(
        {
            "rank": i,
            "parent_alive": None if parent is None else parent.is_alive(),
            "pid": os.getpid(),
            "name": current.name,
            "daemon": current.daemon,
            "parent_pid": None if parent is None else parent.pid,
            "parent_name": None if parent is None else parent.name,
        }
    )


# --------------------------------------------------------------------------- grace period
def _slow_sigterm_handler(signum, frame):
    time.sleep(0.3)  # a slow but cooperative shutdown
    os._exit(0)


def fail_while_peer_resists_sigterm(i, peer_ready, mode):
    """Rank 0 exits with code 1 once rank 1 is set up; rank 1 resists SIGTERM per ``mode``.

    mode "ignore": rank 1 ignores SIGTERM (only SIGKILL ends it).
    mode "slow": rank 1 handles SIGTERM, takes a moment, then exits 0.
    mode "cooperate": rank 1 returns (exit 0) right after letting rank 0 fail.
    """
    if i == 0:
        if not peer_ready.wait(LONG_SLEEP):
            raise RuntimeError("peer never got ready")
        os._exit(1)
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif mode == "slow":
        signal.signal(signal.SIGTERM, _slow_sigterm_handler)
    peer_ready.set()
    if mode == "cooperate":
        return  # finishes on its own; the parent's grace period lets it
    _sleep_forever()


# --------------------------------------------------------------------------- mp objects
def use_queue(i, q):
    q.put(("queue", i))


def use_simple_queue(i, q):
    q.put(("simple", i))


def use_event(i, events):
    events[i].set()


def use_lock(i, lock, counter, rounds):
    for _ in range(rounds):
        with lock:
            value = counter.value
            counter.value = value + 1


def use_barrier(i, barrier, q):
    index = barrier.wait(timeout=60)  # returns only when every rank arrived
    q.put(index)


def use_value(i, value):
    with value.get_lock():
        value.value += 10 ** i


def use_array(i, array):
    array[i] = (i + 1) * 11


def use_pipe(i, connections):
    connections[i].send(("pipe", i, os.getpid()))
    connections[i].close()


def use_manager_queue(i, proxy):
    proxy.put(("manager", i))


# --------------------------------------------------------------------------- torch
def fill_shared_tensor(i, tensor):
    import torch  # noqa: F401  (children that unpickle a tensor need torch anyway)

    tensor[i] = float(i + 1) * 2.5
    tensor[tensor.numel() - 1 - i] += 1


def report_name(i, queue):
    queue.put(multiprocessing.current_process().name)


# --------------------------------------------------------------------------- issue 10
def interrupt_in_rank(i, bad_rank):
    """Rank ``bad_rank`` ends by KeyboardInterrupt (as from a Ctrl-C); the others return i."""
    if i == bad_rank:
        raise KeyboardInterrupt
    return i


class _ValueThatWontLoad:
    """A return value that pickles in the child and raises while unpickled in the parent."""

    def __reduce__(self):
        return (_refuse_to_load, ("return value refuses to load in the parent",))


def return_unloadable_in_rank(i, bad_rank):
    return _ValueThatWontLoad() if i == bad_rank else i


def exit_abruptly_in_rank(i, bad_rank, code):
    """Rank ``bad_rank`` leaves by os._exit (no record of any kind); the others return."""
    if i == bad_rank:
        os._exit(code)


def fds_of_a_subprocess(i):
    """The fds a program run by this rank with close_fds=False starts with (its listing's
    own fd included)."""
    import subprocess

    code = "import os; print(' '.join(sorted(os.listdir('/proc/self/fd'), key=int)))"
    done = subprocess.run([sys.executable, "-c", code], close_fds=False, capture_output=True, text=True, check=True)
    return done.stdout.split()


def fds_of_os_system(i, path):
    """Same through os.system (a shell, then ls): written to ``path``."""
    return os.system(f"ls /proc/self/fd > {path}.{i}")


def mark_when_interrupted(i, directory):
    """Say "ready" (a file), sleep until a KeyboardInterrupt, then leave a file named
    after this pid."""
    try:
        with open(os.path.join(directory, f"ready-{os.getpid()}"), "w"):
            pass
        _sleep_forever()
    except KeyboardInterrupt:
        with open(os.path.join(directory, str(os.getpid())), "w"):
            pass


# --------------------------------------------------------------------------- test side
class Freezer:
    """A freezer cgroup (v1) of its own: ``freeze(pid)`` makes a process unable to run, or
    die, even of SIGKILL, until ``thaw()`` (always call it: ``with Freezer() as f``)."""

    ROOT = "/sys/fs/cgroup/freezer"

    @classmethod
    def missing(cls):
        """Why this machine cannot freeze processes, or None."""
        if not os.path.isfile(os.path.join(cls.ROOT, "cgroup.procs")):
            return f"no freezer cgroup controller at {cls.ROOT}"
        if not os.access(cls.ROOT, os.W_OK):
            return f"{cls.ROOT} is not writable"
        return None

    def __enter__(self):
        self.path = os.path.join(self.ROOT, f"fastspawn-layers-test-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        return self

    def _write(self, name, text):
        with open(os.path.join(self.path, name), "w") as fh:
            fh.write(text)

    def _state(self):
        with open(os.path.join(self.path, "freezer.state")) as fh:
            return fh.read().strip()

    def freeze(self, pid, deadline=60.0):
        self._write("cgroup.procs", str(pid))
        self._write("freezer.state", "FROZEN")
        end = time.monotonic() + deadline
        while self._state() != "FROZEN":
            if time.monotonic() > end:
                raise TimeoutError(f"{self.path} did not freeze")
            time.sleep(0.01)

    def thaw(self):
        self._write("freezer.state", "THAWED")

    def __exit__(self, *exc_info):
        self.thaw()
        end = time.monotonic() + 60.0
        while True:  # the thawed processes die of their pending SIGKILL (or move out)
            with open(os.path.join(self.path, "cgroup.procs")) as fh:
                pids = fh.read().split()
            for pid in pids:
                try:
                    with open(os.path.join(self.ROOT, "cgroup.procs"), "w") as fh:
                        fh.write(pid)
                except OSError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)

