"""fastspawn.run: start ranks, wait for them, get what each returned."""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from . import _api

__all__ = ["run"]


def run(
    fn: Callable[..., Any],
    nprocs: int,
    args: Tuple[Any, ...] = (),
    *,
    start_method: str = "spawn",
    envs: Optional[Sequence[Mapping[str, str]]] = None,
    zygote: Optional[bool] = None,
) -> List[Any]:
    """Run ``fn(i, *args)`` in ``nprocs`` processes; return what each returned, by rank.

    ``results = fastspawn.run(square, 4)`` is ``[square(0), ..., square(3)]``, each
    computed in its own process. Return values travel back pickled. A failure is raised
    as by :func:`fastspawn.spawn` (ProcessRaisedException with the child's traceback, or
    ProcessExitedException), after the other processes are stopped; a rank ended by
    KeyboardInterrupt is such a failure (its traceback, exit by SIGINT), and a value that
    cannot be unpickled here raises RuntimeError naming the rank and why. ``envs[i]`` (str
    values) is laid over the environment of rank i before it runs anything;
    ``start_method`` and ``zygote`` are those of :func:`fastspawn.start_processes`.
    """
    context = _api.launch(
        fn, args, nprocs, start_method=start_method, envs=envs, zygote=zygote, return_values=True
    )
    while not context.join():
        pass
    return [context.return_value(rank) for rank in range(len(context.processes))]
