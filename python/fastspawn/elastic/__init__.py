"""fastspawn.elastic: ``torch.distributed.elastic.multiprocessing`` on fastspawn's engine.

Same names, arguments, log layout, error files and messages as torch's module (what
torchrun runs its workers with), so code written for one runs with the other::

    from fastspawn.elastic import DefaultLogsSpecs, Std, start_processes

    def trainer(a, b):
        return a + b

    if __name__ == "__main__":
        ctx = start_processes(
            name="trainer",
            entrypoint=trainer,                       # or a program: "/usr/bin/echo"
            args={0: (1, 2), 1: (3, 4)},
            envs={0: {"LOCAL_RANK": "0"}, 1: {"LOCAL_RANK": "1"}},
            logs_specs=DefaultLogsSpecs(log_dir="/tmp/logs", redirects=Std.ALL, tee=Std.ERR),
        )
        result = ctx.wait()                           # RunProcsResult
        assert result.return_values == {0: 3, 1: 7}

What differs from torch, on purpose: ``wait`` returns as soon as the outcome is known;
``failures`` holds every rank that failed by itself and no rank stopped because another
failed; teed lines reach the console whole (never two ranks' bytes in one line); each
rank's env is set before its interpreter runs anything; ``Std.from_str`` takes local ranks
above 9; a temporary log directory is removed once unused; return values come back over
the engine's result pipe. ``numa_options`` is not supported.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .api import (
    DefaultLogsSpecs,
    LogsDest,
    LogsSpecs,
    MultiprocessContext,
    PContext,
    RunProcsResult,
    SignalException,
    Std,
    SubprocessContext,
    _validate_full_rank,
    to_map,
)
from .errors import ProcessFailure

__all__ = [
    "start_processes",
    "MultiprocessContext",
    "PContext",
    "ProcessFailure",
    "RunProcsResult",
    "SignalException",
    "Std",
    "LogsDest",
    "LogsSpecs",
    "DefaultLogsSpecs",
    "SubprocessContext",
    "to_map",
]


def start_processes(
    name: str,
    entrypoint: Union[Callable[..., Any], str],
    args: Dict[int, Tuple[Any, ...]],
    envs: Dict[int, Dict[str, str]],
    logs_specs: LogsSpecs,
    log_line_prefixes: Optional[Dict[int, str]] = None,
    start_method: str = "spawn",
    numa_options: None = None,
    duplicate_stdout_filters: Optional[List[str]] = None,
    duplicate_stderr_filters: Optional[List[str]] = None,
) -> PContext:
    """Start one copy of ``entrypoint`` per local rank and return its (started) context.

    ``entrypoint`` is a function (run as ``entrypoint(*args[i])`` in a child started with
    ``start_method``: "spawn" and "forkserver" fork from fastspawn's warm zygote, "fork"
    forks the caller) or a program path/name (run as ``entrypoint *map(str, args[i])``).
    ``args`` and ``envs`` are keyed by local rank and must both hold exactly the keys
    ``0..len(args)-1``; ``envs[i]`` is laid over the caller's environment for rank i.

    ``logs_specs`` (e.g. :class:`DefaultLogsSpecs`) says where each rank's stdout/stderr go
    (console, files, both) and where its error file is (``TORCHELASTIC_ERROR_FILE``,
    written by :func:`~fastspawn.elastic.errors.record`, which wraps function entrypoints
    automatically). Teed lines are prefixed with ``log_line_prefixes[i]`` (default
    ``"[{name}{i}]:"``). ``duplicate_stdout_filters``/``duplicate_stderr_filters``: teed
    lines containing any of these strings are also written to ``filtered_stdout.log`` /
    ``filtered_stderr.log`` of the attempt directory.

    Raises RuntimeError when the keys of ``args`` and ``envs`` do not match, and whatever
    starting raised (e.g. FileNotFoundError for a missing program) after closing the
    context. ``numa_options`` must be None (fastspawn does not bind ranks to NUMA nodes).
    """
    nprocs = len(args)
    _validate_full_rank(args, nprocs, "args")
    _validate_full_rank(envs, nprocs, "envs")
    common = dict(
        name=name,
        entrypoint=entrypoint,
        args=args,
        envs=envs,
        logs_specs=logs_specs,
        log_line_prefixes=log_line_prefixes,
        duplicate_stdout_filters=duplicate_stdout_filters,
        duplicate_stderr_filters=duplicate_stderr_filters,
        numa_options=numa_options,
    )
    context: PContext
    if isinstance(entrypoint, str):
        context = SubprocessContext(**common)  # type: ignore[arg-type]
    else:
        context = MultiprocessContext(start_method=start_method, **common)  # type: ignore[arg-type]
    try:
        context.start()
    except BaseException:
        context.close()
        raise
    return context
