"""Child-side functions of tests/test_launch.py (standard library only: cheap to import)."""

import os
import sys


def report_env(i, key):
    """Print one line on stdout and one on stderr; return what the rank saw."""
    value = os.environ.get(key)
    print(f"out {i} {key}={value}", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
    return {"rank": i, key: value}


def return_lambda(i):
    return lambda: i


def fail_on(i, bad_rank):
    if i == bad_rank:
        raise KeyError(f"rank {i} is the bad one")
    return i * 10


def _env_at_load(key):
    return EnvAtLoad(os.environ.get(key))


class EnvAtLoad:
    """Records, when unpickled in the child, the value an env var had at that moment."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_env_at_load, ("FASTSPAWN_TEST_RANK_VAR",))


def value_at_load(i, probe):
    return probe.value
