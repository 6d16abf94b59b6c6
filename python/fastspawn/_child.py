"""What every child runs: receive the call, run ``fn(i, *args)``, report failure, exit.

Three ways in, one body (:func:`_bootstrap`):
- :func:`main`, in a fresh interpreter started by the engine, which reads its orders
  from the control pipe (start methods spawn/forkserver without the zygote);
- :func:`run_forked`, in a fork of the caller (start method fork) or of the zygote, which
  already has them in memory.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import multiprocessing.resource_tracker
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import sys
import traceback
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

from . import _payload

BOOTSTRAP = "from fastspawn._child import main; main()"

Call = Tuple[Callable[..., Any], Sequence[Any]]


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
    fds: Tuple[int, ...] = ()  # where the parent's pass_fds are, in the child


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


def _bootstrap(spec: ChildSpec, call: Call, control_fd: int, result_fd: int) -> int:
    """Run the call inside a multiprocessing Process object; return the exit code."""
    fn, args = call
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


def load_call(spec: ChildSpec, payload: bytes) -> Call:
    """Unpickle ``(fn, args)`` as a spawned child does (fds mapped, tracker adopted)."""
    from multiprocessing import process, resource_tracker  # imported above, at load time

    _payload.set_inherited_fds(spec.fds)
    if spec.tracker_fd is not None:
        resource_tracker._resource_tracker._fd = spec.tracker_fd  # type: ignore[attr-defined]
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        fn, args = pickle.loads(payload)
    finally:
        del current._inheriting  # type: ignore[attr-defined]
    return fn, args


def run_forked(
    spec: ChildSpec,
    load: Callable[[], Call],
    control_fd: int,
    result_fd: int,
    run_atexit: bool = False,
) -> None:
    """In a fork (of the caller or of the zygote): run and exit; never returns.

    ``run_atexit``: end like an interpreter would (atexit handlers run), as the zygote's
    children stand in for fresh interpreters; a fork of the caller ends like
    multiprocessing's fork children, without them.
    """
    code = 1
    try:
        call = load()
    except BaseException as exc:  # could not even get the call: say why, then exit
        _report_setup_failure(result_fd, exc)
        os._exit(code)
    try:
        code = _bootstrap(spec, call, control_fd, result_fd)
        if run_atexit:
            import atexit

            atexit._run_exitfuncs()
    except BaseException as exc:
        _report_setup_failure(result_fd, exc)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    """Entry point of a fresh child: ``python -c BOOTSTRAP CONTROL_FD RESULT_FD OWNER``."""
    control_fd, result_fd, owner = (int(a) for a in sys.argv[-3:])
    from . import _core

    if not _core.arm_parent_death(owner):
        os._exit(1)  # the parent died while we started: nobody is waiting for us
    del sys.argv[1:]

    from multiprocessing import process, spawn

    try:
        with os.fdopen(os.dup(control_fd), "rb") as control:
            spec = ChildSpec(*pickle.loads(_payload.read_frame(control)))
            preparation = pickle.loads(_payload.read_frame(control))
            preparation["name"] = spec.name
            current = process.current_process()
            current._inheriting = True  # type: ignore[attr-defined]
            try:
                spawn.prepare(preparation)
            finally:
                del current._inheriting  # type: ignore[attr-defined]
            call = load_call(spec, _payload.read_frame(control))
    except BaseException as exc:
        _report_setup_failure(result_fd, exc)
        sys.stderr.flush()
        os._exit(1)
    sys.exit(_bootstrap(spec, call, control_fd, result_fd))
