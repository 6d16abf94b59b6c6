"""Preloaded into the zygote by test_zygote.py: while FASTSPAWN_TEST_PIDS_CGROUP names a
pids cgroup, every child forked from the zygote first waits until that cgroup is full.
So the zygote's own forks all succeed before its helper child tries one, which fails."""

import os
import time


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _wait_until_full():
    cgroup = os.environ.get("FASTSPAWN_TEST_PIDS_CGROUP")
    if not cgroup:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        limit = _read(os.path.join(cgroup, "pids.max"))
        if limit == "max" or int(_read(os.path.join(cgroup, "pids.current"))) >= int(limit):
            return
        time.sleep(0.002)


os.register_at_fork(after_in_child=_wait_until_full)
