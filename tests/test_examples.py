"""The examples in examples/ run as the README shows them (``python examples/<name>.py``)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
pytestmark = pytest.mark.timeout(180)


def run_example(name, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_hello(tmp_path):
    lines = run_example("hello.py", tmp_path)
    assert [line.split(" ran in pid")[0] for line in lines[:4]] == [f"rank {r}/4" for r in range(4)]
    assert lines[4] == "rank 1 failed with ValueError('rank 1 gave up')"


def test_pool(tmp_path):
    squares, closure = run_example("pool.py", tmp_path)
    assert squares == "squares: [0, 1, 4, 9, 16, 25, 36, 49]"
    assert closure.startswith("closure ran in pid ") and closure.endswith("returned 101, exit code 0")
