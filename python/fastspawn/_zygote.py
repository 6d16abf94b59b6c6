"""The warm zygote: a pristine interpreter that imported the caller's modules once and
forks children on request, so that a spawned child costs a fork instead of a fresh
interpreter plus every import.

Both sides live here: :class:`Zygote` is the caller's handle, :func:`main` is the zygote
process. They talk over an inherited socketpair (nothing on the filesystem). A message is
a length-prefixed pickle of builtins; a request's file descriptors follow it (SCM_RIGHTS,
received with MSG_CMSG_CLOEXEC). Children are created with clone(CLONE_PARENT), so they
are the caller's own children; each announces its pid on its result pipe.

The protocol always answers:

* the zygote's first message is ``{"id": 0, "op": "ready", ...}``;
* a request ``{"id": k, "op": "spawn", "n": n, ...}`` gets exactly one reply
  ``{"id": k, "pids": [...], "error"?: str, "errno"?: int, "fallback"?: str}``, sent right
  after forking. ``pids[r]`` is rank r's pid, 0 when it was never forked, -1 when whether it
  was is unknown (then it announces itself or its pipe closes). A call of at least
  ``_SPLIT_AT`` ranks has a helper child fork half of them; it reports its pids (or why a
  fork failed) to the zygote over a socketpair made for that request;
* a request ``{"id": k, "op": "prefetch", "payload": pickle of (fn, args), ...}`` (see
  fastspawn._prewarm) runs ``fn(*args)`` in the caller's context, to import what coming
  calls need, and gets one reply ``{"id": k, "pids": [], "error"?: str, "unfit": ...}``;
* the caller bounds every wait on the zygote (start-up and each reply) by
  :func:`zygote_timeout` seconds. Past it, or on any exception mid-request, that zygote is
  retired (SIGKILL, reaped) and what the request started is stopped; a zygote stuck in its
  imports is asked for its Python stack (SIGUSR1 makes it dump the stack to a socket and
  die), which the caller names in the fallback warning. A staleness key whose zygote got
  stuck or died while starting is not tried again by this process.
"""

from __future__ import annotations

import array
import errno
import faulthandler
import gc
import itertools
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Mapping, NamedTuple, NoReturn, Optional, Sequence, Tuple

from . import _child, _core, _payload


def _debug(message: str, *args: Any) -> None:
    # logging (and traceback, below) are imported only when used: neither is needed by
    # the zygote's children, and every module in the zygote makes each fork dearer.
    import logging

    logging.getLogger(__name__).debug(message, *args)


def _format_exc() -> str:
    import traceback

    return traceback.format_exc()


BOOTSTRAP = "from fastspawn._zygote import main; main()"

TIMEOUT_ENV = "FASTSPAWN_ZYGOTE_TIMEOUT"
DEFAULT_TIMEOUT = 10.0  # seconds; see zygote_timeout()

_FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)
_STACK_WAIT = 2.0  # seconds the caller waits for a stuck zygote's stack dump
_STACK_FRAMES = 4  # innermost frames of that stack named in the warning
_UNKNOWN = -1  # in a reply's pids: the rank may have been forked, its pid is not known


def zygote_timeout() -> float:
    """Seconds any wait on the zygote may last (its start-up, each reply):
    ``FASTSPAWN_ZYGOTE_TIMEOUT`` as read now, :data:`DEFAULT_TIMEOUT` when unset or invalid."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


class ZygoteError(RuntimeError):
    """The zygote died or misbehaved while starting children (none were left running)."""


# ----------------------------------------------------------------------------- wire
# What a socket operation past its deadline raises: socket.timeout is TimeoutError from
# Python 3.10 on, an OSError of its own on 3.9.
_TIMED_OUT = (TimeoutError, socket.timeout)


def _limit(sock: socket.socket, deadline: Optional[float]) -> None:
    """The socket's next operation may last until ``deadline`` (None: no limit)."""
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("fastspawn: zygote deadline passed")
    sock.settimeout(left)


def _send(sock: socket.socket, message: Dict[str, Any], fds: Sequence[int] = (), deadline: Optional[float] = None) -> None:
    message = dict(message, nfds=len(fds))
    _limit(sock, deadline)
    sock.sendall(_payload.frame(pickle.dumps(message, pickle.HIGHEST_PROTOCOL)))
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        _limit(sock, deadline)
        socket.send_fds(sock, [b"F"], list(fds[start : start + _FDS_PER_MESSAGE]))


def _recv_exact(sock: socket.socket, size: int, deadline: Optional[float]) -> bytes:
    chunks = []
    while size:
        _limit(sock, deadline)
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError("zygote connection closed")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _scm_rights(ancdata: List[Tuple[int, int, bytes]]) -> List[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _recv(sock: socket.socket, deadline: Optional[float] = None) -> Tuple[Dict[str, Any], List[int], bool]:
    """One message and its fds (close-on-exec), and whether the kernel dropped some of
    them (MSG_CTRUNC: no room for them, EMFILE). Waits until ``deadline`` at most."""
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8, deadline))
    message = pickle.loads(_recv_exact(sock, size, deadline))
    fds: List[int] = []
    truncated = False
    try:
        for start in range(0, message["nfds"], _FDS_PER_MESSAGE):
            want = min(_FDS_PER_MESSAGE, message["nfds"] - start)
            _limit(sock, deadline)
            data, ancdata, flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(want * 4), socket.MSG_CMSG_CLOEXEC)
            if not data:
                raise EOFError("zygote connection closed")
            fds.extend(_scm_rights(ancdata))
            truncated = truncated or bool(flags & socket.MSG_CTRUNC)
    except BaseException:
        _close_all(fds)
        raise
    return message, fds, truncated


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ------------------------------------------------------------------- zygote side
def _thread_count() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def _null_stdin() -> Any:
    # What multiprocessing makes of a child's stdin (its original stream closed, fd 0 left
    # open, sys.stdin reading /dev/null), done once here: every child inherits the result.
    if sys.stdin is not None:
        try:
            sys.stdin.close()
        except (OSError, ValueError):
            pass
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None
    return open(fd, encoding="utf-8", closefd=False)


def _health() -> Optional[str]:
    """Why this process must not fork children, or None when it is fit to."""
    if _thread_count() > 1:
        # Thread pools that shut down at fork (OpenBLAS's does) go away after one
        # ordinary fork through glibc's at-fork handlers: give them that chance.
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        count = _thread_count()
        if count > 1:
            return f"the zygote has {count} threads after its imports"
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        initialized = bool(cuda is not None and cuda.is_initialized())
    except Exception:
        initialized = False
    if initialized:
        return "CUDA was initialised during the zygote's imports"
    reason = _core.zygote_fork_check()
    if reason:
        return f"the zygote cannot fork pristine children: {reason}"
    return None


def _import(module: str) -> Optional[str]:
    try:
        __import__(module)
    except BaseException:
        return _format_exc()
    return None


def _reseed() -> None:
    # A fresh interpreter seeds these global generators from OS entropy; so does each
    # zygote child (random already reseeds itself at fork, via os.register_at_fork).
    # numpy.random is imported lazily: if the zygote never loaded it, the child seeds it
    # itself on first use. torch's CPU generator is seeded at import; its CUDA ones start
    # from a fixed seed in a fresh interpreter, so they are left alone.
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()
    torch = sys.modules.get("torch")
    generator = getattr(torch, "default_generator", None)
    if generator is not None:
        generator.seed()


class _Prepared(NamedTuple):
    """One request, worked out in the zygote before it forks (so no child redoes it)."""

    specs: List[_child.ChildSpec]
    processes: List[Any]  # multiprocessing Process objects, one per rank
    fds: List[Tuple[int, List[Tuple[int, int]], List[int]]]  # per rank, for zygote_fork_many
    channels: List[Tuple[int, int]]  # per rank: (control_fd, result_fd)
    rank_env: Optional[List[Dict[str, str]]]
    rank_stdio: List[List[int]]  # per rank: its own stdio targets
    payload: bytes
    call: Optional[_child.Call]  # the payload unpickled, if plain (see _load_plain_call)


def _prepare(request: Dict[str, Any], fds: List[int], private: Sequence[int], call: Optional[_child.Call]) -> _Prepared:
    # fds: 2 channels per rank, pass_fds, [tracker], the caller's stdio, per-rank stdio.
    # private: the zygote's own fds (its socket, ...), which no child keeps.
    n = request["n"]
    stdio = request["stdio"]
    rank_stdio = request["rank_stdio"]
    end = len(fds) - sum(len(targets) for targets in rank_stdio)
    passed = fds[2 * n : end - len(stdio)]
    tracker_fd = passed.pop() if request["tracker"] else None
    callers = list(zip(fds[end - len(stdio) : end], stdio))  # the caller's stdin/out/err of now
    # Every rank closes the others' channels, every stdio source (once in place) and the
    # zygote's own fds. A source never sits on 0..2 unless the zygote had those closed.
    shared = [fd for fd, _ in callers] + fds[end:] + list(private)
    plans = []
    first = end
    for rank in range(n):
        own = [(fds[first + i], target) for i, target in enumerate(rank_stdio[rank])]
        first += len(own)
        mine = (fds[2 * rank], fds[2 * rank + 1])
        close = [fd for fd in fds[: 2 * n] + shared if fd > 2 and fd not in mine]
        plans.append((mine[1], callers + own, close))
    specs = [
        _child.ChildSpec(*spec)._replace(tracker_fd=tracker_fd, fds=tuple(passed)) for spec in request["specs"]
    ]
    if specs:
        _child.adopt_inherited(specs[0])  # the same for every rank: done once, inherited
    return _Prepared(
        specs=specs,
        processes=_child.make_processes(specs),
        fds=plans,
        channels=[(fds[2 * rank], fds[2 * rank + 1]) for rank in range(n)],
        rank_env=request["rank_env"],
        rank_stdio=rank_stdio,
        payload=request["payload"],
        call=call,
    )


def _run_rank(prepared: _Prepared, rank: int, sock: socket.socket) -> NoReturn:
    """In a new child whose fds are in place: become ``rank``. Never returns."""
    try:
        faulthandler.unregister(signal.SIGUSR1)  # the zygote's stack request, not the rank's
        sock.detach()  # its fd is closed already; the object must never close it again
        control_fd, result_fd = prepared.channels[rank]
        call = prepared.call

        def load() -> _child.Call:
            if prepared.rank_env or prepared.rank_stdio[rank]:
                _child.enter_rank(
                    prepared.rank_env[rank] if prepared.rank_env else None,
                    [(None, target) for target in prepared.rank_stdio[rank]],
                )
            _reseed()
            return call if call is not None else _child.loads_call(prepared.payload)

        _child.run_forked(
            prepared.specs[rank], load, control_fd, result_fd, run_atexit=True,
            process=prepared.processes[rank], stdin=_state.null_stdin,
        )
    finally:
        os._exit(1)  # never back into the zygote's loop


def _load_plain_call(request: Dict[str, Any]) -> Optional[_child.Call]:
    """A call the caller found plain (see _payload.is_plain), unpickled once for all the
    children; None when it is not plain or fails to load (each child then loads it and
    reports why)."""
    if not request.get("plain"):
        return None
    known = len(sys.modules)
    try:
        fn, args = pickle.loads(request["payload"])
    except BaseException:
        return None
    finally:
        if len(sys.modules) != known:
            _settle()  # looking fn up imported something
    return fn, args


def _set_aside_inherited_finalizers() -> None:
    # weakref.finalize objects made by the zygote's imports must not run at each child's
    # exit: they only tear down in-process state the child is about to lose anyway, and
    # running them costs copy-on-write faults (torch makes hundreds). Even skipped, each
    # would be visited at every child's exit. So they move to a registry of their own
    # (a subclass's): they still fire when what they watch dies; the exit hook, which
    # walks finalize's registry only, sees just the child's own.
    registry = weakref.finalize._registry  # type: ignore[attr-defined]
    if not registry:
        return
    enabled = gc.isenabled()
    gc.disable()  # a collection between pop and insert would lose that finalizer's call
    try:
        for fin in list(registry):
            info = registry.pop(fin)
            info.atexit = False
            fin.__class__ = _InheritedFinalize
            _InheritedFinalize._registry[fin] = info
    finally:
        if enabled:
            gc.enable()


class _InheritedFinalize(weakref.finalize):  # type: ignore[type-arg]  # not subscriptable at run time
    """Finalizers made by the zygote's imports, in a registry of their own."""

    __slots__ = ()
    _registry: Dict[Any, Any] = {}


_InheritedFinalize.__name__ = _InheritedFinalize.__qualname__ = "finalize"  # as shown in reprs


class _State:
    """The zygote's memory between requests."""

    def __init__(self) -> None:
        self.unfit: Optional[str] = None  # from _health(), after the latest import
        self.null_stdin: Optional[Any] = None  # what children read as sys.stdin
        self.stack_fd = -1  # where SIGUSR1 dumps the zygote's stack (see main)


_state = _State()


def in_zygote_tree() -> bool:
    """True in a zygote, and in the processes it forked."""
    return _state.stack_fd >= 0


def _settle() -> None:
    """After the zygote imported something: its fitness, and its exit finalizers off."""
    _state.unfit = _health()
    _set_aside_inherited_finalizers()
    _core.trim_heap()


def _apply(context: Optional[Dict[str, Any]]) -> None:
    """The caller's context at the time of the call (see Zygote._context): environment,
    cwd, umask, sys.path, argv, authkey. Applied in the zygote before it forks the
    request's children; None: the same as for the previous request."""
    if context is None:
        return
    from multiprocessing import process

    env = context["env"]
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():  # only what differs: each change is a putenv
        if os.environ.get(key) != value:
            os.environ[key] = value
    os.chdir(context["cwd"])
    os.umask(context["umask"])
    sys.path[:] = context["sys_path"]
    sys.argv[:] = context["argv"]
    process.current_process().authkey = context["authkey"]
    process.ORIGINAL_DIR = context["orig_dir"]  # type: ignore[attr-defined]


def _serve_spawn(request: Dict[str, Any], fds: List[int], sock: socket.socket, owner: int) -> Dict[str, Any]:
    """Fork the request's children; the reply (see the module's docstring)."""
    n = request["n"]
    # Once here rather than in every child: the zygote takes on the caller's context
    # (each request overwrites all of it), then imports the call's modules in that context.
    _apply(request["context"])
    missing = [module for module in request["modules"] if module not in sys.modules]
    for module in missing:
        _import(module)  # a failure shows up in the children, with its traceback
    if missing:
        _settle()
    call = _load_plain_call(request)
    if _state.unfit is not None:
        return {"pids": [0] * n, "fallback": _state.unfit}
    gc.freeze()  # fewer copy-on-write faults in the children
    # Ranks [split, n) are forked by a helper child (it becomes rank `split`), the others
    # by the zygote: two processes fork at once. Only for big calls: a fork of a fork
    # costs more than the zygote's own, which pays off only when there are many.
    split = n // 2 if n >= _SPLIT_AT else n
    order = [0, split, *range(1, split)] if split < n else list(range(n))
    helper = 1 if split < n else -1
    report = socket.socketpair() if split < n else None
    ours, theirs = (report[0].detach(), report[1].detach()) if report else (-1, -1)
    try:
        private = [sock.fileno(), _state.stack_fd, *([ours, theirs] if report else [])]
        prepared = _prepare(request, fds, private, call)
        index, forked, error, forked_pids = _core.zygote_fork_many(
            owner, [prepared.fds[r] for r in order], helper, pids=True
        )
        if index >= 0:
            if index == helper:
                os.close(ours)
                _fork_rest(prepared, split, n, sock, owner, theirs)
            _run_rank(prepared, order[index], sock)
        _close_all([theirs] if report else [])
        theirs = -1
        pids = [0] * n
        for i, pid in enumerate(forked_pids):
            pids[order[i]] = pid
        reply: Dict[str, Any] = {"pids": pids}
        if forked == 0:
            reply["fallback"] = f"clone(CLONE_PARENT) failed: {os.strerror(error)}"
        elif error:
            reply.update(error=f"fork {forked + 1} of {len(order)} failed: {os.strerror(error)}", errno=error)
        if forked > helper >= 0:
            _helper_report(reply, socket.socket(fileno=ours), range(split + 1, n))
            ours = -1
        return reply
    finally:
        _close_all([fd for fd in (ours, theirs) if fd >= 0])


def _serve_prefetch(request: Dict[str, Any]) -> Dict[str, Any]:
    """Run the request's call (it imports what the caller will need, e.g. a test module)
    in the caller's context, ahead of any spawn request; the reply says whether it failed
    and whether the zygote is still fit to fork."""
    _apply(request["context"])
    reply: Dict[str, Any] = {"pids": []}
    try:
        fn, args = pickle.loads(request["payload"])
        fn(*args)
    except BaseException:
        reply["error"] = _format_exc()
    finally:
        _settle()
    reply["unfit"] = _state.unfit
    return reply


def _helper_report(reply: Dict[str, Any], report: socket.socket, ranks: range) -> None:
    """Adds to ``reply`` what the helper child forked (ranks ``ranks``), as it reports."""
    pids = reply["pids"]
    with report:
        try:
            message, _, _ = _recv(report, time.monotonic() + zygote_timeout() / 2)
        except (OSError, EOFError) as exc:  # died or stuck: its ranks may or may not exist
            for rank in ranks:
                pids[rank] = _UNKNOWN
            reply.setdefault("error", f"the zygote's helper child did not report its forks ({exc!r})")
            return
    for rank, pid in zip(ranks, message["pids"]):
        pids[rank] = pid
    if message["errno"]:
        forked = len(message["pids"])
        text = f"the helper's fork {forked + 1} of {len(ranks)} failed: {os.strerror(message['errno'])}"
        reply.setdefault("error", text)
        reply.setdefault("errno", message["errno"])


_SPLIT_AT = 8  # calls with at least this many children fork from two processes


def _fork_rest(prepared: _Prepared, rank: int, last: int, sock: socket.socket, owner: int, report: int) -> NoReturn:
    """In the helper child: fork ranks rank+1..last-1, report their pids to the zygote
    over ``report``, then become ``rank``."""
    try:
        # What the zygote holds for its caller: a zygote that dies must not stay
        # reachable through this process (its socket's end of file, its stack).
        faulthandler.unregister(signal.SIGUSR1)
        os.close(sock.detach())
        os.close(_state.stack_fd)
        siblings = list(range(rank + 1, last))
        index, _forked, error, pids = _core.zygote_fork_many(owner, [prepared.fds[r] for r in siblings], pids=True)
        if index >= 0:
            _run_rank(prepared, siblings[index], sock)
        try:
            with socket.socket(fileno=report) as channel:
                _send(channel, {"pids": pids, "errno": error})
        except OSError:
            pass  # the zygote is gone: the caller learns of us from our announcements
        # Only now: the siblings forked above start in this process's group (see
        # zygote_fork) and move to groups of their own; had this one led a group
        # already, signalling its group early could hit them.
        _core.enter_child(*prepared.fds[rank])
        if error:
            os._exit(1)  # the call failed (the zygote says so): no rank runs for it
    except BaseException:
        os._exit(1)
    _run_rank(prepared, rank, sock)


def main() -> None:
    """The zygote process: ``python -c BOOTSTRAP STACK_FD CONTROL_FD RESULT_FD OWNER``."""
    stack_fd, control_fd, result_fd, owner = (int(a) for a in sys.argv[-4:])
    # First of all: SIGUSR1 dumps this process's Python stack to the caller, then ends it
    # (chained to the default action), so that an import stuck below can be located.
    os.set_inheritable(stack_fd, False)
    faulthandler.register(signal.SIGUSR1, file=stack_fd, all_threads=False, chain=True)
    _state.stack_fd = stack_fd
    if not _core.arm_parent_death(owner):
        os._exit(1)
    del sys.argv[1:]
    from multiprocessing import process, spawn

    with os.fdopen(control_fd, "rb") as control:
        config = pickle.loads(_payload.read_frame(control))
    os.close(result_fd)  # the zygote reports over its socket; children get only their own
    os.set_inheritable(config["sock_fd"], False)  # inherited without O_CLOEXEC
    sock = socket.socket(fileno=config["sock_fd"])
    status: Dict[str, Any] = {"id": 0, "op": "ready", "pid": os.getpid()}
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        spawn.prepare(config["prep"])
    except BaseException:
        status["main_error"] = _format_exc()
    finally:
        del current._inheriting  # type: ignore[attr-defined]
    errors = {m: e for m in config["preload"] if (e := _import(m)) is not None}
    if errors:
        status["preload_errors"] = errors
    _settle()
    status["unfit"] = _state.unfit
    _state.null_stdin = _null_stdin()
    # No gc.collect() first: with torch imported it takes ~90 ms of every cold start,
    # and what it would free is a few cycles left by imports, shared copy-on-write.
    gc.freeze()
    _send(sock, status)
    while True:
        try:
            request, fds, truncated = _recv(sock)
        except (EOFError, OSError):
            os._exit(0)  # the owner closed the connection (or died): we are done
        n = request.get("n", 0)
        try:
            if truncated:  # EMFILE: the fds that did arrive are useless without the rest
                reply = {
                    "pids": [0] * n,
                    "errno": errno.EMFILE,
                    "error": f"the zygote (pid {os.getpid()}) could not receive the call's {request['nfds']} "
                    f"file descriptors (only {len(fds)} arrived: {os.strerror(errno.EMFILE)})",
                }
            elif request.get("op") == "spawn":
                reply = _serve_spawn(request, fds, sock, owner)
            elif request.get("op") == "prefetch":
                reply = _serve_prefetch(request)
            else:
                reply = {"pids": [0] * n, "error": f"unknown request {request.get('op')!r}"}
        except BaseException:
            # Whatever it forked announces itself, or its pipe closes with ours below.
            reply = {"pids": [_UNKNOWN] * n, "error": _format_exc()}
        finally:
            _close_all(fds)
        reply["id"] = request.get("id")
        _send(sock, reply)


# ------------------------------------------------------------------- caller side
def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _current_umask() -> int:
    mask = int(_core.current_umask())  # from /proc/self/status
    if mask >= 0:
        return mask
    mask = os.umask(0o022)  # no /proc: the classic read-by-setting, briefly
    os.umask(mask)
    return mask


def _main_file(preparation: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    path = preparation.get("init_main_from_path")
    if path is None:
        name = preparation.get("init_main_from_name")
        return (f"module:{name}", 0) if name else None
    try:
        return (path, os.stat(path).st_mtime_ns)
    except OSError:
        return (path, -1)


def staleness_key(preparation: Dict[str, Any], preload: Sequence[str]) -> Tuple[Any, ...]:
    """What, when changed, makes a zygote stale: main file, sys.path, preload list."""
    return (_main_file(preparation), tuple(preparation.get("sys_path", ())), tuple(preload))


def still_serves(started: Tuple[Any, ...], now: Tuple[Any, ...], path_may_grow: bool) -> bool:
    """Whether a zygote started under staleness key ``started`` serves a call made under
    ``now``: the same key; or, with ``path_may_grow`` (a zygote started ahead of its first
    call, see fastspawn._prewarm), the same main file and preload list
    and a ``sys.path`` that only gained entries (every entry of the zygote's, in order,
    is still there). That is how a test session's path grows as pytest collects: the
    zygote follows it as the pytest process did (each request applies the current path
    before importing anything)."""
    if started == now:
        return True
    if not path_may_grow or (started[0], started[2]) != (now[0], now[2]):
        return False
    remaining = iter(now[1])
    return all(any(entry == later for later in remaining) for entry in started[1])


# Staleness keys whose zygote got stuck or crashed: this process starts no other for them.
_given_up: Dict[Tuple[Any, ...], str] = {}


def given_up_reason(key: Tuple[Any, ...]) -> Optional[str]:
    """Why the zygote of ``key`` was given up (stuck or crashed), or None."""
    return _given_up.get(key)


def _innermost(dump: str) -> str:
    """The innermost frames of a faulthandler dump, on one line."""
    frames = []
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith('File "') and '", line ' in line:
            path, rest = line[len('File "') :].split('", line ', 1)
            number, _, name = rest.partition(" in ")
            frames.append(f"{path}:{number} in {name}")
    return " <- ".join(frames[:_STACK_FRAMES])


class Zygote:
    """The caller's handle on one zygote process.

    Every wait on it is bounded by :func:`zygote_timeout`; a zygote that misses a
    deadline, dies, or sees a request interrupted is retired (killed and reaped).
    """

    def __init__(self, key: Tuple[Any, ...], preparation: Dict[str, Any], preload: Sequence[str], use_pidfd: bool) -> None:
        from multiprocessing import spawn as mp_spawn

        if key in _given_up:  # stuck or crashed before: fresh interpreters for this key
            raise ZygoteError(f"fastspawn: {_given_up[key]}")
        self.key = key
        self.lock = threading.Lock()  # one request at a time; only bounded waits under it
        self.group = _core.Group(1, use_pidfd)
        self.group.set_reap_strays(True)  # its forks that die unannounced are ours to reap
        self.pid = -1
        self.unfit: Optional[str] = None
        self.retired = False
        self.follows_path = False  # see still_serves
        self._sent: Optional[Tuple[Any, ...]] = None  # the context the zygote has (see _context)
        self._ids = itertools.count(1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stacks, stack_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self._stacks = stacks  # where the zygote dumps its stack on SIGUSR1 (see main)
        try:
            config = {"sock_fd": theirs.fileno(), "prep": preparation, "preload": list(preload)}
            chunk = _core.Chunk(_payload.frame(_payload.dumps_preparation(config)))
            exe = mp_spawn.get_executable()
            argv = [exe, *_interpreter_flags(), "-c", BOOTSTRAP, str(stack_end.fileno())]
            self.group.start_exec(0, exe, argv, [theirs.fileno(), stack_end.fileno()], [chunk])
            self.pid = self.group.pid(0)
        except BaseException:
            self._retire()
            self.group.stop(0.0)
            raise
        finally:
            theirs.close()
            stack_end.close()
        timeout = zygote_timeout()
        try:
            status = self._reply(0, time.monotonic() + timeout)
        except BaseException as exc:
            reason = None
            try:
                if isinstance(exc, _TIMED_OUT):
                    reason = self._stuck(f"did not finish starting within {timeout:g} s", "its import is stuck at")
                elif isinstance(exc, (OSError, EOFError)):
                    reason = f"the zygote (pid {self.pid}) died while starting up ({self._ending()})"
            finally:
                self._retire()
                self.group.stop(0.0)  # nothing forks at start-up: its process group goes too
            if reason is None:
                raise
            _given_up[key] = reason
            raise ZygoteError(f"fastspawn: {reason}") from exc
        if status.get("main_error"):
            last = status["main_error"].strip().splitlines()[-1]
            self.unfit = f"the main module cannot be imported in the zygote ({last})"
        elif status.get("unfit"):
            self.unfit = status["unfit"]
        # Warned by the first call that uses this zygote (see _api._Zygotes.get), not
        # here: a zygote started in the background must not warn from its thread.
        self.notices: List[str] = []
        for module, error in status.get("preload_errors", {}).items():
            last = error.strip().splitlines()[-1]
            self.notices.append(f"fastspawn: preloading {module!r} in the zygote failed: {last}")
        _debug("fastspawn: zygote pid %d started (fit: %s)", self.pid, self.unfit is None)

    def _reply(self, request_id: int, deadline: float) -> Dict[str, Any]:
        """The zygote's answer to request ``request_id``, by ``deadline`` (TimeoutError)."""
        message, fds, _ = _recv(self.sock, deadline)
        _close_all(fds)  # the zygote sends none
        if message.get("id") != request_id:
            raise OSError(errno.EPROTO, f"zygote answered request {message.get('id')!r}, not {request_id}")
        return message

    def _stuck(self, what: str, where: str) -> str:
        """Why this zygote is given up: ``what`` it failed to do in time, and ``where``
        its Python stack was (asking for the stack ends the zygote)."""
        frames = ""
        chunks = []
        if self.group.send_signal(0, signal.SIGUSR1):
            deadline = time.monotonic() + _STACK_WAIT
            try:
                while True:  # the dump ends when the zygote does (end of file)
                    _limit(self._stacks, deadline)
                    data = self._stacks.recv(1 << 16)
                    if not data:
                        break
                    chunks.append(data)
            except OSError:
                pass  # time is up: what arrived is all there is
            frames = _innermost(b"".join(chunks).decode("utf-8", "replace"))
        place = f"; {where}: {frames}" if frames else "; its Python stack could not be read"
        return f"the zygote (pid {self.pid}) {what} ({TIMEOUT_ENV}){place}"

    def _ending(self) -> str:
        """How the zygote ended, once it has (bounded wait; what it left in its process
        group is killed when it is reaped)."""
        self.group.begin_stop()
        exits = self.group.wait(_core.KILL_WAIT, True)
        if not exits:
            return "still running"
        code = exits[-1][2]
        if code is None:
            return "exit status unknown"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _retire(self) -> None:
        """This zygote serves no more: SIGKILL to it (not to its process group: a helper
        child may still be forking ranks, which must live to announce themselves), and
        no more talking to it. Reaped by :meth:`close` or the group's stop."""
        self.retired = True
        self.group.send_signal(0, signal.SIGKILL)
        self.sock.close()
        self._stacks.close()

    def _abandon(self, group: Any) -> None:
        """A request went wrong: retire this zygote, then stop whatever the request started."""
        try:
            self._retire()
            # Each forked child announces itself on its pipe; every other pipe closes once
            # the zygote (dead now) and its helper child (done soon) have closed their copies.
            group.adopt(zygote_timeout())
            self.group.stop(0.0)  # reaps the zygote; kills what is left in its process group
        finally:
            group.stop(0.0)

    def _context(self) -> Tuple[Optional[Dict[str, Any]], Tuple[Any, ...]]:
        """What the zygote must take on from this process (None: what it has already),
        and the key that says so."""
        from multiprocessing import process

        env = os.environ._data  # type: ignore[attr-defined]  # bytes: compared without decoding
        rest = (
            os.getcwd(), _current_umask(), list(sys.path), list(sys.argv),
            bytes(process.current_process().authkey), process.ORIGINAL_DIR,  # type: ignore[attr-defined]
        )
        if self._sent is not None and self._sent[1] == rest and self._sent[0] == env:
            return None, self._sent
        keys = ("cwd", "umask", "sys_path", "argv", "authkey", "orig_dir")
        return {"env": dict(os.environ), **dict(zip(keys, rest))}, (dict(env), rest)

    def alive(self) -> bool:
        """Whether this zygote can take requests (not retired, still running)."""
        if self.retired:
            return False
        self.group.wait(0.0, False)
        return bool(self.group.running(0))

    def spawn(
        self,
        group: Any,
        specs: Sequence[_child.ChildSpec],
        payload: bytes,
        pass_fds: Sequence[int],
        tracker_fd: Optional[int],
        modules: Sequence[str],
        owner: int,
        rank_env: Optional[Sequence[Mapping[str, str]]] = None,
        rank_stdio: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
        plain: bool = False,
    ) -> Optional[str]:
        """Start ``len(specs)`` children in ``group``. Returns None, or a reason to fall back
        to fresh interpreters (then no child was left running). Raises ZygoteError if the
        zygote died or failed mid-request (likewise leaving nothing behind); any other
        exception (KeyboardInterrupt) also stops what the request started, and retires
        this zygote, before it propagates.

        ``rank_env[i]``: variables laid over the caller's environment for rank i;
        ``rank_stdio[i]``: ``(caller fd, target)`` pairs that become rank i's stdio;
        ``modules``: imported by the zygote before it forks (those the call loads);
        ``plain``: the payload may be unpickled once for all (see _payload.is_plain)."""
        n = len(specs)
        stdio = [fd for fd in (0, 1, 2) if _is_open(fd)]
        own = [list(pairs) for pairs in rank_stdio] if rank_stdio else [[] for _ in specs]
        request = {
            "op": "spawn",
            "n": n,
            "specs": [tuple(s) for s in specs],
            "payload": payload,
            "plain": plain,
            "modules": list(modules),
            "tracker": tracker_fd is not None,
            "stdio": stdio,
            "rank_stdio": [[target for _, target in pairs] for pairs in own],
            "rank_env": [dict(e) for e in rank_env] if rank_env else None,
        }
        channels: List[int] = []
        talking = False  # from the first byte sent on, a failure leaves the socket out of step
        timeout = zygote_timeout()
        with self.lock:
            if self.retired:  # by a call in another thread, since ours got hold of it
                return f"the zygote (pid {self.pid}) was retired by a failed call"
            try:
                for rank in range(n):
                    channels.extend(group.open_channels(rank))
                fds = channels + list(pass_fds) + ([tracker_fd] if tracker_fd is not None else []) + stdio
                fds += [fd for pairs in own for fd, _ in pairs]
                request_id = request["id"] = next(self._ids)
                request["context"], sent = self._context()
                deadline = time.monotonic() + timeout
                talking = True
                try:
                    _send(self.sock, request, fds, deadline)
                finally:
                    _close_all(channels)
                    channels = []
                reply = self._reply(request_id, deadline)
                self._sent = sent
            except BaseException as exc:
                _close_all(channels)
                if not talking:
                    group.stop(0.0)
                    raise
                reason = None
                try:
                    if isinstance(exc, _TIMED_OUT):
                        reason = self._stuck(f"did not answer within {timeout:g} s", "it is stuck at")
                finally:
                    self._abandon(group)
                if reason is not None:
                    _given_up[self.key] = reason
                    return reason
                if isinstance(exc, (OSError, EOFError)):
                    raise ZygoteError(
                        f"fastspawn: the zygote (pid {self.pid}) died while starting {n} children; "
                        "the children it had started were stopped"
                    ) from exc
                raise
            try:
                return self._take(group, n, reply)
            except BaseException:  # the zygote is in step: only what it started must go
                try:
                    group.adopt(zygote_timeout())  # ranks the interrupted adoption left pending
                finally:
                    group.stop(0.0)
                raise

    def prefetch(self, fn: Any, args: Tuple[Any, ...]) -> Optional[str]:
        """Have the zygote run ``fn(*args)`` (picklable by reference: it imports modules
        the coming calls need) in this process's current context. Returns None, or why it
        failed (its traceback; or the zygote was given up: then it is retired, and the
        next call falls back and warns as a failed start-up does). Never warns."""
        request: Dict[str, Any] = {"op": "prefetch", "n": 0, "payload": pickle.dumps((fn, tuple(args)), pickle.HIGHEST_PROTOCOL)}
        timeout = zygote_timeout()
        with self.lock:
            if self.retired:
                return f"the zygote (pid {self.pid}) was retired by a failed call"
            request_id = request["id"] = next(self._ids)
            request["context"], sent = self._context()
            deadline = time.monotonic() + timeout
            try:
                _send(self.sock, request, (), deadline)
                reply = self._reply(request_id, deadline)
            except BaseException as exc:
                reason = None
                try:
                    if isinstance(exc, _TIMED_OUT):
                        reason = self._stuck(f"did not finish importing within {timeout:g} s", "its import is stuck at")
                        _given_up[self.key] = reason
                    elif isinstance(exc, (OSError, EOFError)):
                        reason = f"the zygote (pid {self.pid}) died while importing ({exc!r})"
                finally:
                    self._retire()
                    self.group.stop(0.0)  # idle but for the import: nothing else in its group
                if reason is None:
                    raise
                return reason
            self._sent = sent
        if reply.get("unfit") and self.unfit is None:
            self.unfit = str(reply["unfit"])
        error = reply.get("error")
        return None if error is None else str(error)

    def _take(self, group: Any, n: int, reply: Dict[str, Any]) -> Optional[str]:
        """Adopt what the reply says was forked (and stop it all if the call failed)."""
        pids = reply["pids"]
        for rank, pid in enumerate(pids):
            if pid > 0:
                group.adopt_pid(rank, pid)  # False (not our child): the rank is dropped
            elif pid == 0:
                group.drop_pending(rank)
        if _UNKNOWN in pids:
            group.adopt(zygote_timeout())  # they announce themselves, or their pipes close
        if reply.get("error") is None and reply.get("fallback") is None:
            missing = [rank for rank in range(n) if group.pid(rank) <= 0]
            if not missing:
                return None
            reply["error"] = f"ranks {missing} were not started"
        group.stop(0.0)
        if reply.get("errno") == errno.EMFILE:  # this zygote cannot take the call: a fresh one can
            self._retire()
            self.group.stop(0.0)  # idle (it answered): nothing of a request's is in its group
            return str(reply["error"])
        if reply.get("error"):
            raise ZygoteError(f"fastspawn: the zygote failed to start children:\n{reply['error']}")
        self.unfit = reply["fallback"]
        return self.unfit

    def close(self, grace: float = 5.0) -> None:
        """Ask the zygote to exit (closing the socket) and reap it (bounded)."""
        try:
            self.sock.close()
            self._stacks.close()
        finally:
            self.group.wait(grace, True)
            self.group.stop(0.0)

    def forget_after_fork(self) -> None:
        """In a fork child: the zygote is the parent's, not ours (closes our copies only)."""
        self.sock.close()
        self._stacks.close()


def _interpreter_flags() -> List[str]:
    import subprocess

    return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
