"""Preloaded into the zygote by test_zygote.py: in a call of two or more, the second child
fails in enter_child (a dup2 from a closed fd) before it could announce itself, and the
zygote dies by SIGKILL right after forking, before it could reply. Nobody but the caller's
engine can then know that child: it is left in the zygote's process group, unannounced."""

import os
import signal
import types

from fastspawn import _core, _zygote

_CLOSED_FD = 1_000_000


def _fork_many(owner, children, deferred=-1, pids=False):
    children = list(children)
    if len(children) > 1:
        announce, dup2s, close = children[1]
        children[1] = (announce, [(_CLOSED_FD, 2), *dup2s], close)
    result = _core.zygote_fork_many(owner, children, deferred, pids=pids)
    if result[0] < 0 and len(children) > 1:  # in the zygote, after its forks
        os.kill(os.getpid(), signal.SIGKILL)
    return result


_zygote._core = types.SimpleNamespace(**{**vars(_core), "zygote_fork_many": _fork_many})
