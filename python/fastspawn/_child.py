"""What every child runs: receive the call, run ``fn(i, *args)``, report failure, exit.

A call is ``(fn, args)``; or, for a child of a multiprocessing context
(``ChildSpec.process_object``), a pickled multiprocessing Process object, which runs its
own ``_bootstrap`` as a spawned child's does.

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
import signal
import sys
from typing import Any, Callable, List, Mapping, NamedTuple, NoReturn, Optional, Sequence, Tuple

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
    return_value: bool = False  # send fn's return value back on the result pipe
    # The call is ``(process, ())``: a multiprocessing Process object, pickled as spawn
    # pickles it, which the child runs as spawn's children do (its own _bootstrap).
    process_object: bool = False


# multiprocessing's exit step (util._exit_function: flush queues' feeder threads, end
# daemonic children) runs inside Process._bootstrap up to Python 3.12; from 3.13 on, a fork
# child clears atexit, registers that step alone and runs atexit after _bootstrap. A fork
# of the caller follows whichever its Python does.
_mp_bootstrap = multiprocessing.process.BaseProcess._bootstrap  # type: ignore[attr-defined]
_EXIT_STEP_IN_BOOTSTRAP = "_exit_function" in _mp_bootstrap.__code__.co_names


# Set when the call ended by KeyboardInterrupt in a call that owes a return value: the
# rank then ends as an interpreter does after an uncaught Ctrl-C, killed by SIGINT.
_interrupted = False


def _call(
    fn: Callable[..., Any], i: int, args: Sequence[Any], result_fd: int, send_return: bool, stdin: Any = None
) -> None:
    # torch semantics: Ctrl-C ends a child quietly; an Exception is reported with its
    # traceback and exit code 1; SystemExit and other BaseExceptions go to multiprocessing.
    # A call that owes a return value (fastspawn.run, fastspawn.elastic) cannot end quietly
    # without one: there Ctrl-C is reported (traceback record) and kills the rank by SIGINT.
    global _interrupted
    if stdin is not None:
        sys.stdin = stdin
    try:
        if send_return:
            _send_return(result_fd, fn(i, *args))
        else:  # the next line shows in tracebacks as is, like torch's
            fn(i, *args)
    except KeyboardInterrupt as exc:
        if send_return:
            import traceback

            _payload.write_all(result_fd, _payload.encode_error(traceback.format_exc(), exc))
            _interrupted = True
    except Exception as exc:
        import traceback

        _payload.write_all(result_fd, _payload.encode_error(traceback.format_exc(), exc))
        sys.exit(1)


def _send_return(result_fd: int, value: Any) -> None:
    _payload.write_all(result_fd, _payload.encode_return(value))


def make_process(spec: ChildSpec, like: Any = None) -> Any:
    """The multiprocessing Process object a child runs in (started only by _bootstrap).

    ``like``: one made for a sibling of the same call, copied instead of constructing
    anew (only name and identity differ between siblings)."""
    if like is None:
        ctx = multiprocessing.get_context(spec.start_method)
        proc = ctx.Process(target=_call, name=spec.name, daemon=spec.daemon)  # type: ignore[attr-defined]
    else:
        proc = object.__new__(type(like))
        proc.__dict__.update(like.__dict__)
        proc._name = spec.name
    proc._identity = spec.identity
    proc._parent_pid = spec.parent_pid
    proc._parent_name = spec.parent_name
    return proc


def make_processes(specs: Sequence[ChildSpec]) -> List[Any]:
    """:func:`make_process` for all the ranks of one call (None for a rank whose call
    brings its own Process object)."""
    procs: List[Any] = []
    for spec in specs:
        if spec.process_object:
            procs.append(None)
        else:
            procs.append(make_process(spec, next((p for p in procs if p is not None), None)))
    return procs


def _bootstrap(
    spec: ChildSpec, call: Call, control_fd: int, result_fd: int, process: Any = None, stdin: Any = None
) -> int:
    """Run the call inside a multiprocessing Process object; return the exit code.

    ``process``: one made by :func:`make_process` beforehand. ``stdin``: a stream reading
    /dev/null made beforehand (the original stdin already closed): multiprocessing then
    has no stdin to replace, and the call starts with this one as ``sys.stdin``.

    With ``spec.process_object``, ``call`` is ``(process, ())``: that Process object's own
    ``_bootstrap`` runs (multiprocessing's semantics throughout: it replaces stdin,
    prints an uncaught exception as ``Process <name>:`` and a traceback, returns 1).
    """
    fn, args = call
    if spec.process_object:
        process_obj: Any = fn
        return int(process_obj._bootstrap(parent_sentinel=control_fd))
    proc = process if process is not None else make_process(spec)
    proc._args = (fn, spec.rank, args, result_fd, spec.return_value, stdin)
    if stdin is not None:
        sys.stdin = None
    return int(proc._bootstrap(parent_sentinel=control_fd))


def _report_setup_failure(result_fd: int, exc: BaseException) -> None:
    import traceback

    try:
        _payload.write_all(result_fd, _payload.encode_error(traceback.format_exc(), exc))
    except OSError:
        pass


def adopt_inherited(spec: ChildSpec) -> None:
    """Where the parent's fds for pickled objects landed, and multiprocessing's resource
    tracker (kept from the rank's own children), as a spawned child sets them up before
    unpickling."""
    _payload.set_inherited_fds(spec.fds)
    if spec.tracker_fd is not None:
        os.set_inheritable(spec.tracker_fd, False)
        multiprocessing.resource_tracker._resource_tracker._fd = spec.tracker_fd  # type: ignore[attr-defined]


def _keep_to_ourselves(*fds: Optional[int]) -> None:
    """The rank's own channels are close-on-exec: a program it runs (``os.system``,
    ``subprocess`` with ``close_fds=False``) gets only fds 0-2 and what the user passes."""
    for fd in fds:
        if fd is not None:
            os.set_inheritable(fd, False)


def _report_exit(result_fd: int, code: int) -> None:
    """The rank's last record: ``code``, or -SIGINT after an interrupted call that owed a
    value (the rank then ends by SIGINT)."""
    _payload.write_exit(result_fd, -signal.SIGINT if _interrupted else code)


def _end(result_fd: int, code: int) -> NoReturn:
    """The last steps of a forked rank: the exit record, then ``os._exit(code)`` (or death
    by SIGINT after an interrupted call that owed a value, as an interpreter ends)."""
    _report_exit(result_fd, code)
    if _interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def loads_call(payload: bytes) -> Call:
    """Unpickle ``(fn, args)`` as a spawned child does (see :func:`adopt_inherited`)."""
    current = multiprocessing.process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        fn, args = pickle.loads(payload)
    finally:
        del current._inheriting  # type: ignore[attr-defined]
    return fn, args


def enter_rank(env: Optional[Mapping[str, str]], stdio: Sequence[Tuple[Optional[int], int]]) -> None:
    """In a forked child, before its call is loaded: the rank's own environment variables
    and stdio (``(fd, target)`` pairs; each ``fd`` is closed once in place; an fd of None
    means the target is in place already and only Python's stream must follow)."""
    if env:
        os.environ.update(env)
    for fd, target in stdio:
        if fd is not None:
            os.dup2(fd, target)
        _rebind_stream(target)
    for fd in {fd for fd, _ in stdio}:
        if fd is not None and fd > 2:
            os.close(fd)


def _rebind_stream(target: int) -> None:
    # In a fork, sys.stdout/sys.stderr may not write to fds 1/2 (a caller that captured
    # them, as pytest does): make them write where this rank's output now goes.
    name = {1: "stdout", 2: "stderr"}.get(target)
    stream = getattr(sys, name, None) if name else None
    if name is None or stream is None:
        return
    try:
        if stream.fileno() == target:
            return
    except (AttributeError, OSError, ValueError):
        pass
    setattr(sys, name, open(target, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                            errors=getattr(stream, "errors", None) or "backslashreplace", closefd=False))


def run_forked(
    spec: ChildSpec,
    load: Callable[[], Call],
    control_fd: int,
    result_fd: int,
    run_atexit: bool = False,
    process: Any = None,
    stdin: Any = None,
) -> None:
    """In a fork (of the caller or of the zygote): run and exit; never returns.

    ``run_atexit``: end like an interpreter would (atexit handlers run), as the zygote's
    children stand in for fresh interpreters; a fork of the caller ends like
    multiprocessing's fork children, without them. ``process``, ``stdin``: see
    :func:`_bootstrap`.
    """
    # Its fds are close-on-exec already: a fork's pipes are made O_CLOEXEC, a zygote's
    # are received with MSG_CMSG_CLOEXEC and its tracker fd set once in the zygote.
    code = 1
    if not run_atexit and not _EXIT_STEP_IN_BOOTSTRAP:
        import atexit

        atexit._clear()
        atexit.register(multiprocessing.util._exit_function)  # type: ignore[attr-defined]
        run_atexit = True
    try:
        call = load()
    except BaseException as exc:  # could not even get the call: say why, then exit
        _report_setup_failure(result_fd, exc)
        _end(result_fd, code)
    try:
        code = _bootstrap(spec, call, control_fd, result_fd, process, stdin)
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
            _end(result_fd, code)


# True in a fresh interpreter started as a child (by :func:`main`): what it imports (the
# call's modules) must not start processes of its own on import, e.g. a zygote.
in_fresh_child = False


def main() -> None:
    """Entry point of a fresh child: ``python -c BOOTSTRAP CONTROL_FD RESULT_FD OWNER``."""
    global in_fresh_child
    in_fresh_child = True
    control_fd, result_fd, owner = (int(a) for a in sys.argv[-3:])
    _keep_to_ourselves(control_fd, result_fd)
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
            adopt_inherited(spec)
            call = loads_call(_payload.read_frame(control))
    except BaseException as exc:
        _report_setup_failure(result_fd, exc)
        sys.stderr.flush()
        _end(result_fd, 1)
    code = _bootstrap(spec, call, control_fd, result_fd)
    _report_exit(result_fd, code)
    if _interrupted:  # the interpreter itself ends by SIGINT, after its usual shutdown
        sys.excepthook = lambda *exc_info: None  # the traceback went to the parent
        raise KeyboardInterrupt
    sys.exit(code)
