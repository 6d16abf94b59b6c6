"""A process that cannot die, for tests: the cgroup v1 freezer.

A frozen process does not run, so it neither handles SIGTERM nor dies of SIGKILL until it
is thawed (the kill stays pending). The outer tests (test_testing, test_plugin) create a
cgroup with the ``freezer_cgroup`` fixture, which thaws and removes it in its teardown
whatever happened; the inner suites they run get this file as ``freezer.py`` and freeze
a rank with :func:`freeze`.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Iterator, Optional

import pytest

ROOT = "/sys/fs/cgroup/freezer"


def unavailable() -> Optional[str]:
    """Why the freezer cannot be used here, or None."""
    if not os.path.isfile(os.path.join(ROOT, "cgroup.procs")):
        return f"no cgroup v1 freezer controller at {ROOT}"
    if not os.access(ROOT, os.W_OK):
        return f"{ROOT} is not writable (not root?)"
    return None


def _write(cgroup: str, name: str, text: str) -> None:
    with open(os.path.join(cgroup, name), "w") as f:
        f.write(text)


def _read(cgroup: str, name: str) -> str:
    with open(os.path.join(cgroup, name)) as f:
        return f.read().strip()


def freeze(cgroup: str, pid: int, deadline: float = 30.0) -> None:
    """Move ``pid`` into ``cgroup`` and freeze it; returns once the kernel says FROZEN."""
    _write(cgroup, "cgroup.procs", str(pid))
    _write(cgroup, "freezer.state", "FROZEN")
    stop = time.monotonic() + deadline
    while _read(cgroup, "freezer.state") != "FROZEN":
        assert time.monotonic() < stop, f"{cgroup} did not freeze"
        time.sleep(0.01)


def thaw(cgroup: str) -> None:
    """Let what is frozen in ``cgroup`` run again (a pending SIGKILL then ends it)."""
    if os.path.isdir(cgroup):
        _write(cgroup, "freezer.state", "THAWED")


def gone(pid: int, deadline: float = 10.0) -> bool:
    """Whether ``pid`` has disappeared (exited and reaped: not even a zombie) within
    ``deadline`` seconds."""
    stop = time.monotonic() + deadline
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() >= stop:
            return False
        time.sleep(0.01)
    return True


def remove(cgroup: str, deadline: float = 10.0) -> None:
    """Thaw ``cgroup``, move what is still in it back to the root, and remove it."""
    if not os.path.isdir(cgroup):
        return
    thaw(cgroup)
    stop = time.monotonic() + deadline
    while True:
        for pid in _read(cgroup, "cgroup.procs").split():
            try:
                _write(ROOT, "cgroup.procs", pid)
            except OSError:
                pass  # exited meanwhile
        try:
            os.rmdir(cgroup)
            return
        except OSError:
            if time.monotonic() >= stop:
                raise
            time.sleep(0.01)


@pytest.fixture
def freezer_cgroup() -> Iterator[str]:
    """A fresh freezer cgroup, thawed and removed afterwards (skips without a freezer)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    cgroup = os.path.join(ROOT, f"fastspawn-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(cgroup)
    try:
        yield cgroup
    finally:
        remove(cgroup)
