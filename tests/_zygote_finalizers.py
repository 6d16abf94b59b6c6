"""Preloaded into the zygote by test_zygote.py: finalizers made at import time."""

import os
import weakref


class _Thing:
    pass


_BASE = os.environ["FASTSPAWN_TEST_FINALIZER_BASE"]


def _write(path, text):
    with open(path, "a") as f:
        f.write(f"{text} in {os.getpid()}\n")


kept = _Thing()  # lives as long as the process: its finalizer would run only at exit
weakref.finalize(kept, _write, _BASE + ".exit", "inherited exit finalizer ran")
collected_here = _Thing()  # a child drops it: its finalizer must fire there
weakref.finalize(collected_here, _write, _BASE + ".collected", "collected")
