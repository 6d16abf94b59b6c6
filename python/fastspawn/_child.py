"""What every child runs: receive the call, run ``fn(i, *args)``, report failure, exit.

Two entry points share one body (:func:`_bootstrap`):
- :func:`main`, in a fresh interpreter started by the engine (start methods spawn and
  forkserver), which reads its orders from the control pipe;
- :func:`run_forked`, in a fork of the caller (start method fork), which already has them.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import traceback
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

from . import _payload

BOOTSTRAP = "from fastspawn._child import main; main()"


class ChildSpec(NamedTuple):
    """Per-rank facts the parent fixes, so the child looks like a multiprocessing one."""

    rank: int
    name: str
    identity: Tuple[int, ...]
    daemon: bool
    start_method: str
    parent_pid: int
    parent_name: str
    tracker_fd: Optional[int]


def _call(fn: Callable[..., Any], i: int, args: Sequence[Any], result_fd: int) -> None:
    # torch semantics: Ctrl-C ends a child quietly; an Exception is reported with its
    # traceback and exit code 1; SystemExit and other BaseExceptions go to multiprocessing.
    try:
        fn(i, *args)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        _payload.write_all(result_fd, _payload.encode_error(traceback.format_exc(), exc))
        sys.exit(1)


def _bootstrap(
    spec: ChildSpec,
    fn: Callable[..., Any],
    args: Sequence[Any],
    control_fd: int,
    result_fd: int,
) -> int:
    """Run the call inside a multiprocessing Process object; return the exit code."""
    ctx = multiprocessing.get_context(spec.start_method)
    proc = ctx.Process(  # type: ignore[attr-defined]
        target=_call, args=(fn, spec.rank, args, result_fd), name=spec.name, daemon=spec.daemon
    )
    proc._identity = spec.identity
    proc._parent_pid = spec.parent_pid
    proc._parent_name = spec.parent_name
    return int(proc._bootstrap(parent_sentinel=control_fd))


def _report_setup_failure(result_fd: int, exc: BaseException) -> None:
    try:
        _payload.write_all(result_fd, _payload.encode_error(traceback.format_exc(), exc))
    except OSError:
        pass


def run_forked(
    spec: ChildSpec,
    fn: Callable[..., Any],
    args: Sequence[Any],
    control_fd: int,
    result_fd: int,
) -> None:
    """In a fork of the caller: run and exit. Never returns into the caller's stack."""
    code = 1
    try:
        code = _bootstrap(spec, fn, args, control_fd, result_fd)
    except BaseException as exc:  # the bootstrap itself failed; say why, then exit
        _report_setup_failure(result_fd, exc)
    finally:
        os._exit(code)


def main() -> None:
    """Entry point of a fresh child: ``python -c BOOTSTRAP CONTROL_FD RESULT_FD OWNER``."""
    control_fd, result_fd, owner = (int(a) for a in sys.argv[-3:])
    from . import _core

    if not _core.arm_parent_death(owner):
        os._exit(1)  # the parent died while we started: nobody is waiting for us
    del sys.argv[1:]

    from multiprocessing import process, resource_tracker, spawn

    try:
        with os.fdopen(os.dup(control_fd), "rb") as control:
            spec: ChildSpec = ChildSpec(*pickle.loads(_payload.read_frame(control)))
            if spec.tracker_fd is not None:
                resource_tracker._resource_tracker._fd = spec.tracker_fd  # type: ignore[attr-defined]
            preparation = pickle.loads(_payload.read_frame(control))
            preparation["name"] = spec.name
            current = process.current_process()
            current._inheriting = True  # type: ignore[attr-defined]
            try:
                spawn.prepare(preparation)
                fn, args = pickle.loads(_payload.read_frame(control))
            finally:
                del current._inheriting  # type: ignore[attr-defined]
    except BaseException as exc:
        _report_setup_failure(result_fd, exc)
        sys.stderr.flush()
        os._exit(1)
    sys.exit(_bootstrap(spec, fn, args, control_fd, result_fd))
