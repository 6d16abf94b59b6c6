"""Fixtures shared by test_context.py and test_context_pools.py."""

from __future__ import annotations

import multiprocessing

import pytest

WAIT = 60  # seconds: a bound for what happens "at once"; never reached when all is well


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Every test ends (and joins) the processes it started: any still running at its end
    fails it, and is killed."""
    yield
    left = multiprocessing.active_children()
    for process in left:
        process.kill()
        process.join(WAIT)
    assert not left, f"processes left running: {left}"
