"""Preloaded into the zygote by test_zygote.py: from the second child of a call on, its
forks fail (EAGAIN), as when a process limit is reached."""

import errno
import types

from fastspawn import _core, _zygote


def _fork_some(owner, children, deferred=-1, pids=False):
    index, forked, error, forked_pids = _core.zygote_fork_many(owner, children[:1], deferred, pids=True)
    if index < 0 and len(children) > 1:
        error = errno.EAGAIN
    return (index, forked, error, forked_pids) if pids else (index, forked, error)


_zygote._core = types.SimpleNamespace(**{**vars(_core), "zygote_fork_many": _fork_some})
