"""What the plugin's inner test suites (tests/test_plugin.py) record, and the check that
no process outlived its test. Copied into each inner suite as ``recorder.py``; the outer
tests import it too."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Iterable, List

import psutil


def record(name: str, **data: Any) -> None:
    """Write ``data`` as RECORD_DIR/<name>.json (atomically)."""
    path = os.path.join(os.environ["RECORD_DIR"], name + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def recorded() -> Dict[str, Any]:
    """Everything recorded so far, by name."""
    out = {}
    for path in glob.glob(os.path.join(os.environ["RECORD_DIR"], "*.json")):
        with open(path) as f:
            out[os.path.basename(path)[: -len(".json")]] = json.load(f)
    return out


def recorded_pids() -> List[int]:
    """The pids in the records (fields "pid" and "pids")."""
    pids: List[int] = []
    for data in recorded().values():
        pids += [data["pid"]] if "pid" in data else []
        pids += data.get("pids", [])
    return pids


def still_running(pids: Iterable[int]) -> List[int]:
    """Those of ``pids`` that still run (zombies do not) after up to 10 s."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    running = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return running
