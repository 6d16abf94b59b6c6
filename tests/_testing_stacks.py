"""A rank whose stack dump is big: threads blocked deep in recursion.

Copied as ``stacks.py`` into the inner suites of test_testing and test_plugin. Each line
of a faulthandler dump names the function, so a long name makes long lines.
"""

import threading

THREADS, DEPTH = 60, 90  # faulthandler shows at most 100 threads of 100 frames each


def descend_to_fill_a_stack_dump_with_long_lines(depth: int, ready: threading.Semaphore) -> None:
    if depth > 1:
        descend_to_fill_a_stack_dump_with_long_lines(depth - 1, ready)
    else:
        ready.release()
        threading.Event().wait()


def start_deep_threads() -> None:
    """Start THREADS daemon threads, each blocked DEPTH frames deep, and return once all
    are there: at SIGTERM this process dumps about 600 KiB of stacks."""
    ready = threading.Semaphore(0)
    for _ in range(THREADS):
        threading.Thread(
            target=descend_to_fill_a_stack_dump_with_long_lines, args=(DEPTH, ready), daemon=True
        ).start()
    for _ in range(THREADS):
        assert ready.acquire(timeout=60)
