"""Preloaded into the zygote by test_zygote.py: the second child of each call fails in
enter_child (a dup2 from a closed fd) before it could announce itself, and exits."""

import types

from fastspawn import _core, _zygote

_CLOSED_FD = 1_000_000


def _fork_many(owner, children, deferred=-1, pids=False):
    children = list(children)
    if len(children) > 1:
        announce, dup2s, close = children[1]
        children[1] = (announce, [(_CLOSED_FD, 2), *dup2s], close)
    return _core.zygote_fork_many(owner, children, deferred, pids=pids)


_zygote._core = types.SimpleNamespace(**{**vars(_core), "zygote_fork_many": _fork_many})
