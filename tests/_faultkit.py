"""Shared by test_faults.py and its driver scripts: finding the processes a fault test
started (and what is left of them), bounded waits, result files, cgroup v1 controllers.

Every process a fault test starts carries the test's tag in its environment
(FASTSPAWN_FAULT_TAG); /proc/PID/environ shows the environment a process was exec'ed
with, which a fork (a zygote's rank included) and every descendant inherit, so the tag
finds the test's processes wherever they went: reparented to init, in another group, or
started by a rank. A zombie has no environ: it is found through its parent.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Dict, Iterable, List, NamedTuple, Optional, Set

TAG_VAR = "FASTSPAWN_FAULT_TAG"
CGROUP_ROOT = "/sys/fs/cgroup"


class Stat(NamedTuple):
    """The fields of /proc/PID/stat these tests use."""

    state: str
    ppid: int
    pgid: int
    start: int  # start time in clock ticks since boot: (pid, start) names one process
    session: int = 0


def stat(pid: int) -> Optional[Stat]:
    """The process's stat, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return Stat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]), int(fields[3]))


def all_pids() -> List[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def describe(pid: int) -> str:
    st = stat(pid)
    if st is None:
        return f"{pid} (gone)"
    return f"{pid} state={st.state} ppid={st.ppid} pgid={st.pgid} cmd={cmdline(pid)!r}"


def has_tag(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TAG_VAR}={tag}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def tagged(tag: str) -> Set[int]:
    """Live (non-zombie) processes carrying ``tag`` in their environment."""
    me = os.getpid()
    return {pid for pid in all_pids() if pid != me and has_tag(pid, tag)}


def children(ppid: int) -> List[int]:
    """Children of ``ppid``, zombies included."""
    out = []
    for pid in all_pids():
        st = stat(pid)
        if st is not None and st.ppid == ppid:
            out.append(pid)
    return out


def lingering(pid: int) -> bool:
    """Whether ``pid`` is still there in a way that counts against the test: alive, or a
    zombie that its (living, non-init) parent has not reaped. An orphan's zombie belongs
    to init, which reaps it in its own time."""
    st = stat(pid)
    if st is None:
        return False
    return not (st.state == "Z" and st.ppid in (0, 1))


def wait_until(predicate, seconds: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def scan_until_empty(scan, seconds: float, confirm: float = 0.1) -> List[int]:
    """Poll ``scan`` (a /proc scan for leftovers) until it finds nothing twice in a row,
    ``confirm`` s apart (a process caught mid-exec can hide from one scan), or until
    ``seconds`` pass; what the last scan found."""
    deadline = time.monotonic() + seconds
    while True:
        found = scan()
        if not found:
            time.sleep(confirm)
            found = scan()
            if not found:
                return []
        if time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


def wait_gone(pids: Iterable[int], seconds: float) -> List[int]:
    """Poll until none of ``pids`` lingers or ``seconds`` pass; those that still do."""
    pids = list(pids)
    wait_until(lambda: not any(lingering(p) for p in pids), seconds)
    return [p for p in pids if lingering(p)]


# ------------------------------------------------------------------------ driver side
def leftovers(keep: Iterable[int] = ()) -> List[int]:
    """In a driver: what of its own is still there, apart from ``keep`` (its zygote, its
    resource tracker): its children, zombies included (it is alive and must reap them),
    and every live process carrying its tag (grandchildren, orphans)."""
    me = os.getpid()
    keep = set(keep) | {me}
    found = set(children(me))
    tag = os.environ.get(TAG_VAR)
    if tag:
        found |= tagged(tag)
    return sorted(p for p in found - keep if lingering(p))


def write_json(path: str, data: Dict) -> None:
    """Atomically (the reader polls for the file)."""
    write_text(path, json.dumps(data))


def write_text(path: str, text: str) -> None:
    """Atomically (the reader polls for the file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def wait_file(path: str, seconds: float) -> bool:
    return wait_until(lambda: os.path.exists(path), seconds)


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def kill_quietly(pid: int, start: Optional[int] = None) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``start``."""
    st = stat(pid)
    if st is None or (start is not None and st.start != start):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------- cgroups v1
def controller(name: str) -> Optional[str]:
    """The mount of cgroup v1 controller ``name`` if it is there and writable, else None."""
    path = os.path.join(CGROUP_ROOT, name)
    if not os.path.isfile(os.path.join(path, "cgroup.procs")) or not os.access(path, os.W_OK):
        return None
    return path


class Cgroup:
    """A cgroup of its own under a v1 controller; ``remove()`` empties and removes it."""

    def __init__(self, name: str) -> None:
        root = controller(name)
        if root is None:
            raise RuntimeError(f"cgroup v1 controller {name!r} is not mounted writable at {CGROUP_ROOT}/{name}")
        self.root = root
        self.path = os.path.join(root, f"fastspawn-fault-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.path)

    def write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def add(self, pid: int) -> None:
        self.write("cgroup.procs", str(pid))

    def procs(self) -> List[int]:
        try:
            return [int(line) for line in self.read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def remove(self, seconds: float = 10.0) -> None:
        """Kill what is left inside (the caller thawed a freezer first), then rmdir."""
        if not os.path.isdir(self.path):
            return
        for pid in self.procs():
            kill_quietly(pid)
        wait_until(lambda: not self.procs(), seconds)
        for pid in self.procs():  # still there (a zombie whose parent lives): move it out
            try:
                with open(os.path.join(self.root, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError:
                pass
        wait_until(lambda: _rmdir(self.path), seconds)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
