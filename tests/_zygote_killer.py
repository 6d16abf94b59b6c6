"""Kills the process importing it unless it is the test process itself (its pid is in
FASTSPAWN_TEST_CALLER). Imported as a fn's module, it takes the zygote down mid-request."""

import os
import signal

if os.getpid() != int(os.environ.get("FASTSPAWN_TEST_CALLER", os.getpid())):
    os.kill(os.getpid(), signal.SIGKILL)


def work(rank):
    pass
