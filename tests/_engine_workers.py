"""Child-side functions of tests/test_engine.py.

Children started with "spawn"/"forkserver" import this module by name, so it must stay
cheap to import: standard library only, and heavier modules imported inside functions.
"""

import os
import signal
import sys
import time

# Long enough to never end during a test; the tests always end these processes.
FOREVER = 600.0


def noop(i, *args):
    pass


def exit_with(i, code):
    sys.exit(code)


def report_ids(i, queue):
    """Report (rank, pid, pgid, sid) and exit."""
    queue.put((i, os.getpid(), os.getpgid(0), os.getsid(0)))


def raise_value_error(i, message):
    raise ValueError(message)


# A "gate" is the read end of multiprocessing.Pipe(duplex=False): children block in
# gate.poll(None) until the parent sends a byte. Unlike multiprocessing.Event, opening
# it cannot hang in the parent when a waiting child was killed (Condition.notify_all
# waits for sleepers to wake up).
def wait_gate(gate):
    gate.poll(None)


def ready_then_wait(i, ready, gate):
    """Say we started, then block until the gate opens; exit 0."""
    ready.put((i, os.getpid()))
    wait_gate(gate)


def ready_then_answer(i, ready, gate, answers):
    """Say we started, block until the gate opens, then answer and exit 0."""
    ready.put((i, os.getpid()))
    wait_gate(gate)
    answers.put((i, os.getpid(), os.getppid()))


def rank0_raises_others_wait(i, ready, gate, message):
    """Rank 0 raises once rank 1 is running; rank 1 blocks on the gate (nprocs == 2)."""
    if i == 0:
        ready.get()
        raise ValueError(message)
    ready.put((i, os.getpid()))
    wait_gate(gate)


def ready_then_sleep(i, ready, ignore=()):
    """Say we started, then sleep; ``ignore`` lists signal numbers to ignore first."""
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    ready.put((i, os.getpid()))
    time.sleep(FOREVER)


def pid_file_then_sleep(i, directory, ignore=()):
    """Write our pid to DIRECTORY/<rank>.pid (atomically), then sleep."""
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    _write_atomic(os.path.join(directory, f"{i}.pid"), str(os.getpid()))
    time.sleep(FOREVER)


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _start_grandchild():
    import subprocess

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def grandchild_then(i, queue, then):
    """Start a grandchild (it stays in our process group), report (rank, pid, its pid).

    Then ``then`` == "raise": fail (exit code 1); anything else: sleep.
    """
    grandchild = _start_grandchild()
    queue.put((i, os.getpid(), grandchild.pid))
    if then == "raise":
        raise RuntimeError(f"rank {i} fails on purpose")
    time.sleep(FOREVER)


def failing_sibling(i, queue, gate):
    """Rank 0 starts a grandchild and sleeps; rank 1 raises when the gate opens."""
    if i == 0:
        grandchild = _start_grandchild()
        queue.put((i, os.getpid(), grandchild.pid))
        time.sleep(FOREVER)
    wait_gate(gate)
    raise RuntimeError("rank 1 fails on purpose")


def nested_grandchild(i, ready):
    ready.put(os.getpid())
    time.sleep(FOREVER)


def nested_parent(i, pids_queue, start_method, sig):
    """Start 2 grandchildren with fastspawn (join=False), report them, kill ourselves."""
    import multiprocessing

    import fastspawn

    ready = multiprocessing.get_context(start_method).Queue()
    context = fastspawn.start_processes(
        nested_grandchild, args=(ready,), nprocs=2, join=False, start_method=start_method
    )
    pids_queue.put(context.pids())
    pids_queue.close()
    pids_queue.join_thread()  # flushed before we kill ourselves
    for _ in range(2):
        ready.get()
    os.kill(os.getpid(), sig)
    time.sleep(FOREVER)  # SIGTERM/SIGKILL end us before this returns


def big_message(rank, size):
    """A deterministic ``size``-character string, different per rank, with end markers."""
    head = f"<BEGIN rank={rank}>"
    tail = f"<END rank={rank}>"
    body_len = size - len(head) - len(tail)
    unit = "".join(chr(ord("a") + (rank + k) % 26) for k in range(26)) + "0123456789"
    body = (unit * (body_len // len(unit) + 1))[:body_len]
    return head + body + tail


def raise_big(i, size):
    raise RuntimeError(big_message(i, size))


def report_fds(i, conn):
    """Send the fds open in this process, and the ones the engine says it gave us."""
    from multiprocessing import parent_process, resource_tracker

    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    open_fds = []
    for fd in listed:
        try:
            os.fstat(fd)  # the descriptor listdir used is closed by now
        except OSError:
            continue
        open_fds.append(fd)
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")[:-1]
    control_fd, result_fd, owner = (int(a) for a in cmdline[-3:])
    parent = parent_process()
    links = {}
    for fd in open_fds:
        try:
            links[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    conn.send(
        {
            "open": sorted(set(open_fds)),
            "links": links,
            # multiprocessing's bootstrap replaced sys.stdin by a fresh /dev/null file
            "stdin": sys.stdin.fileno() if sys.stdin is not None else None,
            "control": control_fd,
            "result": result_fd,
            "owner": owner,
            "sentinel": None if parent is None else parent.sentinel,
            "tracker": resource_tracker._resource_tracker._fd,
            "conn": conn.fileno(),
        }
    )
    conn.close()


def marker_after_gate(i, ready, gate, directory):
    """Say we started, block on the gate, then write DIRECTORY/<rank>.done and exit 0."""
    ready.put((i, os.getpid()))
    wait_gate(gate)
    _write_atomic(os.path.join(directory, f"{i}.done"), "done")


def signal_own_group(i):
    """SIGTERM to the whole process group this child leads (itself immune)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgrp(), signal.SIGTERM)
