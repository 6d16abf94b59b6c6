"""Entrypoints for tests/test_elastic.py (importable by children of both libraries)."""

import os
import signal
import sys
import threading

ENV = "ELASTIC_TEST_VAR"


def hello(tag, value=None):
    """One line on stdout and one on stderr; returns ``value`` and the rank's env var."""
    print(f"out {tag}", flush=True)
    print(f"err {tag}", file=sys.stderr, flush=True)
    return {"value": value, "env": os.environ.get(ENV)}


def fail(message):
    raise ValueError(message)


def exit_with(code):
    sys.stdout.flush()
    os._exit(code)


def kill_self(signum):
    os.kill(os.getpid(), signum)


def wait_forever():
    threading.Event().wait()


def wait_for(event):
    """Blocks until ``event`` (a multiprocessing Event) is set; returns the pid."""
    event.wait()
    return os.getpid()


def unpicklable():
    return threading.Lock()


def big(size):
    return b"x" * size


def fragments(tag, count):
    """``count`` lines, each written in three pieces with a flush after each piece."""
    for i in range(count):
        for piece in (f"{tag} line ", f"{i:04d} ", "end\n"):
            sys.stdout.write(piece)
            sys.stdout.flush()


def probe_env(probe):
    """``probe`` is a _elastic_envprobe.Probe: what the env was when its module loaded."""
    return probe.seen()


def ignore_term_then_wait(ready):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    wait_forever()


def _ready_path():
    # Ranks of both libraries are children of the test process: one flag file per run.
    return f"/tmp/fastspawn-elastic-ready-{os.getppid()}"


def ready_then_wait():
    """Say "I am running" (a file), then wait to be stopped."""
    with open(_ready_path(), "w"):
        pass
    wait_forever()


def fail_once_peer_ready(message, deadline=60.0):
    """Raise ValueError(message), but only once the peer runs ``ready_then_wait``: the
    peer is then inside its entrypoint when it is stopped, whatever the scheduling."""
    import time

    path = _ready_path()
    end = time.monotonic() + deadline
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.005)
    os.unlink(path)
    raise ValueError(message)


def act(name, *args):
    """Run the worker named ``name`` (so one entrypoint can do something else per rank)."""
    return globals()[name](*args)


# fn(i, *args) workers for fastspawn.run
def env_of(rank):
    return os.environ.get(ENV)


def fail_rank(rank, message):
    if rank == 1:
        raise ValueError(message)


def exit_rank(rank, code):
    exit_with(code)


def interrupted():
    """Ends by KeyboardInterrupt, as from a Ctrl-C."""
    raise KeyboardInterrupt
