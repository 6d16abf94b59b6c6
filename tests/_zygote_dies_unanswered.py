"""Preloaded into the zygote by test_zygote.py: as _zygote_enter_fails (the second child
dies before announcing itself), and the zygote dies by SIGKILL right after forking, before
it could reply. Nobody but the caller's engine can then know that child: it is left in
the zygote's process group, unannounced."""

import os
import signal

import _zygote_enter_fails as enter_fails


def _die_unanswered(result, children):
    if result[0] < 0 and len(children) > 1:  # in the zygote, after its forks
        os.kill(os.getpid(), signal.SIGKILL)


enter_fails.install(enter_fails.breaking_the_second(_die_unanswered))
