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
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _child, _core, _payload

log = logging.getLogger(__name__)

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
        return traceback.format_exc()
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


def _child_after_fork(request: Dict[str, Any], rank: int, fds: List[int], sock: socket.socket) -> None:
    # fds: 2 channels per rank, pass_fds, [tracker], the caller's stdio, per-rank stdio.
    n = request["n"]
    control_fd, result_fd = fds[2 * rank], fds[2 * rank + 1]
    stdio = request["stdio"]
    rank_stdio = request["rank_stdio"]
    extra = sum(len(targets) for targets in rank_stdio)
    end = len(fds) - extra
    passed = fds[2 * n : end - len(stdio)]
    stdio_fds = dict(zip(stdio, fds[end - len(stdio) : end]))
    tracker_fd = passed.pop() if request["tracker"] else None
    first = end + sum(len(targets) for targets in rank_stdio[:rank])
    own_stdio = [(fds[first + i], target) for i, target in enumerate(rank_stdio[rank])]

    def load() -> _child.Call:
        sock.close()
        for target, fd in stdio_fds.items():  # the caller's stdin/out/err of now
            os.dup2(fd, target)
        mine = {control_fd, result_fd} | {fd for fd, _ in own_stdio}
        _close_all([fd for fd in fds[: 2 * n] + fds[end:] if fd not in mine] + list(stdio_fds.values()))
        _child.enter_rank(request["rank_env"][rank] if request["rank_env"] else None, own_stdio)
        _reseed()
        spec = _child.ChildSpec(*request["specs"][rank])._replace(
            tracker_fd=tracker_fd, fds=tuple(passed)
        )
        return _child.load_call(spec, request["payload"])

    spec = _child.ChildSpec(*request["specs"][rank])
    try:
        _payload.write_all(result_fd, struct.pack("=i", os.getpid()))  # adopt me
    except BaseException:
        os._exit(1)
    _child.run_forked(spec, load, control_fd, result_fd, run_atexit=True)


def _skip_inherited_exit_finalizers() -> None:
    # weakref.finalize objects made by the zygote's imports would run at each child's
    # exit (torch registers thousands: ~30 ms of copy-on-write faults per child). They
    # only tear down in-process state the child is about to lose anyway; the child's own
    # finalizers still run at exit. (The zygote itself ends with os._exit.)
    import weakref

    for fin in list(weakref.finalize._registry):  # type: ignore[attr-defined]
        fin.atexit = False


def _apply(request: Dict[str, Any]) -> None:
    """The caller's context at the time of the call: environment, cwd, umask, sys.path,
    argv, authkey. Applied in the zygote before it forks the request's children."""
    from multiprocessing import process

    env = request["env"]
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():  # only what differs: each change is a putenv
        if os.environ.get(key) != value:
            os.environ[key] = value
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.path[:] = request["sys_path"]
    sys.argv[:] = request["argv"]
    process.current_process().authkey = request["authkey"]
    process.ORIGINAL_DIR = request["orig_dir"]  # type: ignore[attr-defined]


def _serve_spawn(request: Dict[str, Any], fds: List[int], sock: socket.socket, owner: int) -> Optional[Dict[str, Any]]:
    """Fork the request's children. Replies as soon as the first one exists (the caller
    adopts them from their own pipes meanwhile); returns a reply only if none was sent."""
    # Once here rather than in every child: the zygote takes on the caller's context
    # (each request overwrites all of it), then imports fn's module in that context.
    _apply(request)
    module = request.get("fn_module")
    if module and module not in sys.modules:
        _import(module)  # a failure shows up in the children, with its traceback
    reason = _health()
    if reason is not None:
        return {"ok": False, "fallback": reason}
    _skip_inherited_exit_finalizers()
    gc.freeze()  # fewer copy-on-write faults in the children
    n = request["n"]
    # Ranks [split, n) are forked by a helper child (it becomes rank `split`), the others
    # by the zygote: two processes fork at once. Only for big calls: a fork of a fork
    # costs more than the zygote's own, which pays off only when there are many.
    split = n // 2 if n >= _SPLIT_AT else n
    try:
        pid = _core.zygote_fork(owner)
    except OSError as exc:
        return {"ok": False, "fallback": f"clone(CLONE_PARENT) failed: {exc}"}
    if pid == 0:
        _become(request, 0, 0, fds, sock, owner)
    _send(sock, {"ok": True})
    try:
        if split < n and _core.zygote_fork(owner) == 0:
            _become(request, split, n, fds, sock, owner)
        for rank in range(1, split):
            if _core.zygote_fork(owner) == 0:
                _become(request, rank, 0, fds, sock, owner)
    except Exception:
        # Already replied: the caller sees which ranks never announced themselves.
        log.debug("fastspawn zygote: fork failed", exc_info=True)
    return None


_SPLIT_AT = 8  # calls with at least this many children fork from two processes


def _become(request: Dict[str, Any], rank: int, last: int, fds: List[int], sock: socket.socket, owner: int) -> None:
    """In a new child: fork ranks rank+1..last-1 first (if any), then become ``rank``."""
    try:
        for sibling in range(rank + 1, last):
            try:
                pid = _core.zygote_fork(owner)
            except OSError:  # the caller sees which ranks never announced themselves
                log.debug("fastspawn zygote child: fork failed", exc_info=True)
                break
            if pid == 0:
                rank = sibling
                break
        # Only now: the siblings forked above start in this process's group (see
        # zygote_fork) and move to groups of their own; had this one led a group
        # already, signalling its group early could hit them.
        os.setpgid(0, 0)
    except BaseException:
        os._exit(1)  # never back into the zygote's loop
    _child_after_fork(request, rank, fds, sock)


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
        status["main_error"] = traceback.format_exc()
    finally:
        del current._inheriting  # type: ignore[attr-defined]
    errors = {m: e for m in config["preload"] if (e := _import(m)) is not None}
    if errors:
        status["preload_errors"] = errors
    status["unfit"] = _health()
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
            elif request["op"] == "ping":
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown request {request['op']!r}"}
        except BaseException:
            reply = {"ok": False, "error": traceback.format_exc()}
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
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
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
        log.debug("fastspawn: zygote pid %d started (fit: %s)", self.pid, self.unfit is None)

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
    ) -> Optional[str]:
        """Start ``len(specs)`` children in ``group``. Returns None, or a reason to fall back
        to fresh interpreters (then no child was left running). Raises ZygoteError if the
        zygote died mid-request (likewise leaving nothing behind).

        ``rank_env[i]``: variables laid over the caller's environment for rank i;
        ``rank_stdio[i]``: ``(caller fd, target)`` pairs that become rank i's stdio."""
        from multiprocessing import process

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
                "fn_module": fn_module,
                "tracker": tracker_fd is not None,
                "stdio": stdio,
                "rank_stdio": [[target for _, target in pairs] for pairs in own],
                "rank_env": [dict(e) for e in rank_env] if rank_env else None,
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "umask": _current_umask(),
                "sys_path": list(sys.path),
                "argv": list(sys.argv),
                "authkey": bytes(process.current_process().authkey),
                "orig_dir": process.ORIGINAL_DIR,  # type: ignore[attr-defined]
            }
            with self.lock:
                try:
                    _send(self.sock, request, fds)
                finally:
                    _close_all(channels)
                    channels = []
                reply, _ = _recv(self.sock)
        except (EOFError, OSError) as exc:
            _close_all(channels)
            self._abandon(group)
            raise ZygoteError(
                f"fastspawn: the zygote (pid {self.pid}) died while starting {n} children; "
                "the children it had started were stopped"
            ) from exc
        adopted = group.adopt(_ADOPT_TIMEOUT)
        if reply.get("ok") and len(adopted) == n:
            return None
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
