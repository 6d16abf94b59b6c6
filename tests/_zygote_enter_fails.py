"""Preloaded into the zygote by test_zygote.py: the second child of each call fails in
enter_child (a dup2 from a closed fd) before it could announce itself, and exits."""

import types
from typing import Any, Callable, List

from fastspawn import _core, _zygote

_CLOSED_FD = 1_000_000


def breaking_the_second(after: Callable[[Any, List[Any]], None] = lambda result, children: None) -> Callable[..., Any]:
    """zygote_fork_many as the zygote calls it, with the second child's fd plan broken;
    ``after(result, children)`` runs in every process it returns in."""

    def fork_many(owner, children, deferred=-1, pids=False):
        children = list(children)
        if len(children) > 1:
            announce, dup2s, close = children[1]
            children[1] = (announce, [(_CLOSED_FD, 2), *dup2s], close)
        result = _core.zygote_fork_many(owner, children, deferred, pids=pids)
        after(result, children)
        return result

    return fork_many


def install(fork_many: Callable[..., Any]) -> None:
    _zygote._core = types.SimpleNamespace(**{**vars(_core), "zygote_fork_many": fork_many})


install(breaking_the_second())
