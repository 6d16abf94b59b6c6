"""The warm zygote: a pristine interpreter that imported the caller's modules once and
forks children on request, so that a spawned child costs a fork instead of a fresh
interpreter plus every import.

Both sides live here: :class:`Zygote` is the caller's handle, :func:`main` is the zygote
process. They talk over an inherited socketpair (nothing on the filesystem): a request
is a length-prefixed pickle of builtins followed by its file descriptors (SCM_RIGHTS).
Children are created with clone(CLONE_PARENT), so they are the caller's own children.
Each announces its pid on its result pipe; the caller's engine adopts it from there, so
a zygote that dies mid-request cannot leave unknown children behind.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import struct
import sys
import threading
import warnings
import weakref
from typing import Any, Dict, List, NamedTuple, NoReturn, Optional, Sequence, Tuple

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

_FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)
_ADOPT_TIMEOUT = 30.0  # a forked child announces itself at once; this only bounds disasters


class ZygoteError(RuntimeError):
    """The zygote died or misbehaved while starting children (none were left running)."""


# ----------------------------------------------------------------------------- wire
def _send(sock: socket.socket, message: Dict[str, Any], fds: Sequence[int] = ()) -> None:
    message = dict(message, nfds=len(fds))
    sock.sendall(_payload.frame(pickle.dumps(message, pickle.HIGHEST_PROTOCOL)))
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], list(fds[start : start + _FDS_PER_MESSAGE]))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError("zygote connection closed")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Tuple[Dict[str, Any], List[int]]:
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    message = pickle.loads(_recv_exact(sock, size))
    fds: List[int] = []
    while len(fds) < message["nfds"]:
        want = min(_FDS_PER_MESSAGE, message["nfds"] - len(fds))
        data, got, _flags, _addr = socket.recv_fds(sock, 1, want)
        if not data:
            raise EOFError("zygote connection closed")
        fds.extend(got)
    return message, fds


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


def _prepare(request: Dict[str, Any], fds: List[int], sock_fd: int, call: Optional[_child.Call]) -> _Prepared:
    # fds: 2 channels per rank, pass_fds, [tracker], the caller's stdio, per-rank stdio.
    n = request["n"]
    stdio = request["stdio"]
    rank_stdio = request["rank_stdio"]
    end = len(fds) - sum(len(targets) for targets in rank_stdio)
    passed = fds[2 * n : end - len(stdio)]
    tracker_fd = passed.pop() if request["tracker"] else None
    callers = list(zip(fds[end - len(stdio) : end], stdio))  # the caller's stdin/out/err of now
    # Every rank closes the others' channels, every stdio source (once in place) and the
    # zygote's socket. A source never sits on 0..2 unless the zygote had those closed.
    shared = [fd for fd, _ in callers] + fds[end:] + [sock_fd]
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
            _InheritedFinalize._registry[fin] = info  # type: ignore[attr-defined]
    finally:
        if enabled:
            gc.enable()


class _InheritedFinalize(weakref.finalize):
    """Finalizers made by the zygote's imports, in a registry of their own."""

    __slots__ = ()
    _registry: Dict[Any, Any] = {}


_InheritedFinalize.__name__ = _InheritedFinalize.__qualname__ = "finalize"  # as shown in reprs


class _State:
    """The zygote's memory between requests."""

    def __init__(self) -> None:
        self.unfit: Optional[str] = None  # from _health(), after the latest import
        self.null_stdin: Optional[Any] = None  # what children read as sys.stdin


_state = _State()


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


def _serve_spawn(request: Dict[str, Any], fds: List[int], sock: socket.socket, owner: int) -> Optional[Dict[str, Any]]:
    """Fork the request's children. Returns the reply when not all could be forked, and
    None when they were (the caller learns it from their announcements)."""
    # Once here rather than in every child: the zygote takes on the caller's context
    # (each request overwrites all of it), then imports fn's module in that context.
    _apply(request["context"])
    module = request.get("fn_module")
    if module and module not in sys.modules:
        _import(module)  # a failure shows up in the children, with its traceback
        _settle()
    call = _load_plain_call(request)
    if _state.unfit is not None:
        return {"ok": False, "fallback": _state.unfit}
    gc.freeze()  # fewer copy-on-write faults in the children
    prepared = _prepare(request, fds, sock.fileno(), call)
    n = request["n"]
    # Ranks [split, n) are forked by a helper child (it becomes rank `split`), the others
    # by the zygote: two processes fork at once. Only for big calls: a fork of a fork
    # costs more than the zygote's own, which pays off only when there are many.
    split = n // 2 if n >= _SPLIT_AT else n
    order = [0, split, *range(1, split)] if split < n else list(range(n))
    helper = 1 if split < n else -1
    index, forked, error = _core.zygote_fork_many(owner, [prepared.fds[r] for r in order], helper)
    if index >= 0 and index == helper:
        _fork_rest(prepared, split, n, sock, owner)
    if index >= 0:
        _run_rank(prepared, order[index], sock)
    if forked == 0:
        return {"ok": False, "fallback": f"clone(CLONE_PARENT) failed: {os.strerror(error)}"}
    if error:  # the helper (if any) forks on; the caller sees who never announced itself
        return {"ok": False, "error": f"fork {forked + 1} of {len(order)} failed: {os.strerror(error)}"}
    return None  # all forked: the children's announcements are the answer


_SPLIT_AT = 8  # calls with at least this many children fork from two processes


def _fork_rest(prepared: _Prepared, rank: int, last: int, sock: socket.socket, owner: int) -> NoReturn:
    """In the helper child: fork ranks rank+1..last-1, then become ``rank``."""
    try:
        siblings = list(range(rank + 1, last))
        index, _forked, error = _core.zygote_fork_many(owner, [prepared.fds[r] for r in siblings])
        if index >= 0:
            _run_rank(prepared, siblings[index], sock)
        if error:  # the caller sees which ranks never announced themselves
            _debug("fastspawn zygote child: fork failed: %s", os.strerror(error))
        # Only now: the siblings forked above start in this process's group (see
        # zygote_fork) and move to groups of their own; had this one led a group
        # already, signalling its group early could hit them.
        _core.enter_child(*prepared.fds[rank])
    except BaseException:
        os._exit(1)
    _run_rank(prepared, rank, sock)


def main() -> None:
    """The zygote process: ``python -c BOOTSTRAP CONTROL_FD RESULT_FD OWNER``."""
    control_fd, _result_fd, owner = (int(a) for a in sys.argv[-3:])
    if not _core.arm_parent_death(owner):
        os._exit(1)
    del sys.argv[1:]
    from multiprocessing import process, spawn

    with os.fdopen(control_fd, "rb") as control:
        config = pickle.loads(_payload.read_frame(control))
    os.close(_result_fd)  # the zygote reports over its socket; children get only their own
    sock = socket.socket(fileno=config["sock_fd"])
    status: Dict[str, Any] = {"op": "ready", "pid": os.getpid()}
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
            request, fds = _recv(sock)
        except (EOFError, OSError):
            os._exit(0)  # the owner closed the connection (or died): we are done
        reply: Optional[Dict[str, Any]]
        try:
            if request["op"] == "spawn":
                reply = _serve_spawn(request, fds, sock, owner)
            else:
                reply = {"ok": False, "error": f"unknown request {request['op']!r}"}
        except BaseException:
            reply = {"ok": False, "error": _format_exc()}
        finally:
            _close_all(fds)
        if reply is not None:
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


class Zygote:
    """The caller's handle on one zygote process."""

    def __init__(self, key: Tuple[Any, ...], preparation: Dict[str, Any], preload: Sequence[str], use_pidfd: bool) -> None:
        from multiprocessing import spawn as mp_spawn

        self.key = key
        self.lock = threading.Lock()
        self.group = _core.Group(1, use_pidfd)
        self._sent: Optional[Tuple[Any, ...]] = None  # the context the zygote has (see _context)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        try:
            config = {"sock_fd": theirs.fileno(), "prep": preparation, "preload": list(preload)}
            chunk = _core.Chunk(_payload.frame(_payload.dumps_preparation(config)))
            exe = mp_spawn.get_executable()
            argv = [exe, *_interpreter_flags(), "-c", BOOTSTRAP]
            self.group.start_exec(0, exe, argv, [theirs.fileno()], [chunk])
        except BaseException:
            ours.close()
            self.group.stop(0.0)
            raise
        finally:
            theirs.close()
        self.pid = self.group.pid(0)
        try:
            status, _ = _recv(self.sock)
        except (EOFError, OSError) as exc:
            self.close()
            raise ZygoteError(f"fastspawn: the zygote (pid {self.pid}) died while starting up") from exc
        self.unfit: Optional[str] = None
        if status.get("main_error"):
            last = status["main_error"].strip().splitlines()[-1]
            self.unfit = f"the main module cannot be imported in the zygote ({last})"
        elif status.get("unfit"):
            self.unfit = status["unfit"]
        for module, error in status.get("preload_errors", {}).items():
            last = error.strip().splitlines()[-1]
            warnings.warn(f"fastspawn: preloading {module!r} in the zygote failed: {last}", RuntimeWarning, stacklevel=4)
        _debug("fastspawn: zygote pid %d started (fit: %s)", self.pid, self.unfit is None)

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
        self.group.wait(0.0, False)
        return bool(self.group.running(0))

    def spawn(
        self,
        group: Any,
        specs: Sequence[_child.ChildSpec],
        payload: bytes,
        pass_fds: Sequence[int],
        tracker_fd: Optional[int],
        fn_module: Optional[str],
        owner: int,
        rank_env: Optional[Sequence[Dict[str, str]]] = None,
        rank_stdio: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
        plain: bool = False,
    ) -> Optional[str]:
        """Start ``len(specs)`` children in ``group``. Returns None, or a reason to fall back
        to fresh interpreters (then no child was left running). Raises ZygoteError if the
        zygote died mid-request (likewise leaving nothing behind).

        ``rank_env[i]``: variables laid over the caller's environment for rank i;
        ``rank_stdio[i]``: ``(caller fd, target)`` pairs that become rank i's stdio;
        ``plain``: the payload may be unpickled once for all (see _payload.is_plain)."""
        n = len(specs)
        channels: List[int] = []
        try:
            for rank in range(n):
                channels.extend(group.open_channels(rank))
            stdio = [fd for fd in (0, 1, 2) if _is_open(fd)]
            own = [list(pairs) for pairs in rank_stdio] if rank_stdio else [[] for _ in specs]
            fds = channels + list(pass_fds) + ([tracker_fd] if tracker_fd is not None else []) + stdio
            fds += [fd for pairs in own for fd, _ in pairs]
            request = {
                "op": "spawn",
                "n": n,
                "specs": [tuple(s) for s in specs],
                "payload": payload,
                "plain": plain,
                "fn_module": fn_module,
                "tracker": tracker_fd is not None,
                "stdio": stdio,
                "rank_stdio": [[target for _, target in pairs] for pairs in own],
                "rank_env": [dict(e) for e in rank_env] if rank_env else None,
            }
            with self.lock:
                request["context"], sent = self._context()
                try:
                    _send(self.sock, request, fds)
                finally:
                    _close_all(channels)
                    channels = []
                # Each child announces itself on its own pipe as soon as it exists; the
                # zygote replies only when it did not start them all (it has closed the
                # pipes of the others by then, so adopt() returns).
                adopted = group.adopt(_ADOPT_TIMEOUT)
                if len(adopted) == n:
                    self._sent = sent
                    return None
                reply, _ = _recv(self.sock)
        except (EOFError, OSError) as exc:
            _close_all(channels)
            self._abandon(group)
            raise ZygoteError(
                f"fastspawn: the zygote (pid {self.pid}) died while starting {n} children; "
                "the children it had started were stopped"
            ) from exc
        group.stop(0.0)
        if reply.get("error"):
            raise ZygoteError(f"fastspawn: the zygote failed to start children:\n{reply['error']}")
        if reply.get("fallback"):
            self.unfit = reply["fallback"]
            return self.unfit
        raise ZygoteError(f"fastspawn: only {len(adopted)} of {n} children announced themselves")

    def _abandon(self, group: Any) -> None:
        group.adopt(2.0)  # whoever was forked announces itself on its own pipe
        group.stop(0.0)
        self.close()

    def close(self, grace: float = 5.0) -> None:
        """Ask the zygote to exit (closing the socket) and reap it."""
        try:
            self.sock.close()
        finally:
            self.group.wait(grace, True)
            self.group.stop(0.0)

    def forget_after_fork(self) -> None:
        """In a fork child: the zygote is the parent's, not ours (closes our copy only)."""
        self.sock.close()


def _interpreter_flags() -> List[str]:
    import subprocess

    return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
