"""What crosses between parent and children: framing, the pickled call, result records.

The engine only moves bytes. Everything here is plain Python so that both sides (the
parent in ``_api`` and the child in ``_child``) share one definition of the format.
"""

from __future__ import annotations

import fcntl
import io
import os
import pickle
import struct
import sys
import types
from multiprocessing import context as mp_context
from multiprocessing.reduction import ForkingPickler
from typing import Any, BinaryIO, Callable, List, NamedTuple, Optional, Sequence, Tuple

_LEN = struct.Struct("<Q")


def frame(data: bytes) -> bytes:
    """Prefix ``data`` with its length (8 bytes, little endian)."""
    return _LEN.pack(len(data)) + data


def read_frame(stream: BinaryIO) -> bytes:
    """Read one frame written by :func:`frame`; EOFError if the stream ends early."""
    head = stream.read(_LEN.size)
    if len(head) != _LEN.size:
        raise EOFError("fastspawn: control pipe closed before the payload arrived")
    (size,) = _LEN.unpack(head)
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("fastspawn: control pipe closed in the middle of the payload")
    return data


class FrameReader:
    """Frames written by :func:`frame` to ``fd``, taken as they arrive: :meth:`frames`
    never waits, so a writer stopped in the middle of a frame holds nobody up. Makes
    ``fd`` non-blocking."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ended = False  # the writer's end is closed (no more frames after the buffered)
        self._buffer = bytearray()
        os.set_blocking(fd, False)

    def frames(self) -> List[bytes]:
        """The frames complete by now (possibly none)."""
        while not self.ended:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNRESET: the writer is gone
                chunk = b""
            if not chunk:
                self.ended = True
            self._buffer += chunk
        out = []
        while len(self._buffer) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buffer)
            end = _LEN.size + size
            if len(self._buffer) < end:
                break
            out.append(bytes(self._buffer[_LEN.size : end]))
            del self._buffer[:end]
        return out


# The fds a child inherited for its pickled objects, by index. Exec'd children get them at
# the caller's numbers; zygote children at whatever numbers the zygote received them.
_inherited_fds: Tuple[int, ...] = ()


def set_inherited_fds(fds: Sequence[int]) -> None:
    """In a child, before unpickling: where the parent's pass_fds landed, by index."""
    global _inherited_fds
    _inherited_fds = tuple(fds)


class _DupFd:
    """Placeholder for an fd handed to the child (what ``DupFd`` reducers return)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited_fds[self.index]


class SpawningPopen:
    """Stands in for multiprocessing's Popen while pickling for a fresh interpreter.

    multiprocessing objects (Queue, Lock, Connection, torch shared tensors, ...) only
    pickle inside a "spawning" context, and hand over file descriptors through
    ``duplicate_for_child``: we collect those (the engine passes them to every child)
    and pickle their index, which the child maps back with :func:`set_inherited_fds`.
    """

    method = "spawn"
    DupFd = _DupFd

    def __init__(self) -> None:
        self.fds: List[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _explain(exc: BaseException, where: str) -> BaseException:
    """Same exception type, message extended with the object that failed to pickle."""
    message = f"{exc} (while pickling {where})"
    try:
        return type(exc)(message)
    except Exception:
        return exc


def dumps_call(fn: Callable[..., Any], args: Sequence[Any], plain: bool = False) -> Tuple[bytes, List[int]]:
    """Pickle ``(fn, args)`` as spawn does. Returns the bytes and the fds to pass on.

    On failure raises the pickler's own exception type, naming ``fn`` or ``args[i]``.
    ``plain`` (see :func:`is_plain`): nothing in the call needs multiprocessing's reducers.
    """
    if plain:
        try:
            return pickle.dumps((fn, tuple(args)), pickle.HIGHEST_PROTOCOL), []
        except Exception:
            pass  # said again below, with the culprit named
    popen = SpawningPopen()
    mp_context.set_spawning_popen(popen)  # type: ignore[arg-type]  # a stand-in for its Popen
    try:
        try:
            return _dumps((fn, tuple(args))), popen.fds
        except Exception as exc:
            culprit = _find_unpicklable(fn, args)
            if culprit is None:
                raise
            raise _explain(exc, f"{culprit} for the child processes") from exc
    finally:
        mp_context.set_spawning_popen(None)


_PLAIN_DATA = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_CONTAINERS = (tuple, list, frozenset, set)
_PLAIN_BUDGET = 10_000  # objects looked at; bigger calls are simply not "plain"


def is_plain(fn: Callable[..., Any], args: Sequence[Any]) -> bool:
    """Whether unpickling ``(fn, args)`` does nothing but look up ``fn`` by name: ``fn`` a
    module-level function or class, ``args`` built-in data. Such a call can be
    unpickled once for many children instead of once in each."""
    if not _by_name(fn):
        return False
    budget = _PLAIN_BUDGET
    stack: List[Any] = [tuple(args)]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        obj = stack.pop()
        kind = type(obj)
        if kind in _PLAIN_DATA:
            continue
        if kind in _PLAIN_CONTAINERS:
            stack.extend(obj)
        elif kind is dict:
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif not _by_name(obj):
            return False
    return True


def _by_name(obj: Any) -> bool:
    # What pickle stores as a module and qualified name, with nothing to run when loaded.
    if type(obj) not in (types.FunctionType, types.BuiltinFunctionType) and not isinstance(obj, type):
        return False
    name = getattr(obj, "__qualname__", "")
    return bool(name) and "<" not in name and getattr(obj, "__self__", None) in (None, sys.modules.get(obj.__module__))


def dumps_preparation(data: Any) -> bytes:
    """Pickle multiprocessing's preparation data (it holds the authkey: spawning only)."""
    mp_context.set_spawning_popen(SpawningPopen())  # type: ignore[arg-type]  # a stand-in for its Popen
    try:
        return _dumps(data)
    finally:
        mp_context.set_spawning_popen(None)


def _find_unpicklable(fn: Callable[..., Any], args: Sequence[Any]) -> Optional[str]:
    candidates: List[Tuple[str, Any]] = [(f"fn={fn!r}", fn)] + [(f"args[{i}]", a) for i, a in enumerate(args)]
    for label, obj in candidates:
        try:
            _dumps(obj)
        except Exception:
            return label
    return None


# ----------------------------------------------------------------- result records
# A rank's result pipe carries framed records, each a pickled ``(kind, text, data)``:
# at most one "return" (data: the pickled value) or "error" (text: the traceback, data: the
# pickled exception), then, as the rank's very last write, one "exit" (data: its exit code).
class Record(NamedTuple):
    """What a child reported: ``kind`` "error" carries the traceback and the exception,
    ``kind`` "return" the function's return value; ``kind`` "unreadable" is a return value
    the parent could not unpickle (``exception``: why, ``traceback``: its text)."""

    kind: str
    traceback: str
    exception: Optional[BaseException]
    value: Any = None


def encode_error(traceback_text: str, exc: BaseException) -> bytes:
    try:
        exc_bytes: Optional[bytes] = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:
        exc_bytes = None
    return frame(pickle.dumps(("error", traceback_text, exc_bytes), pickle.HIGHEST_PROTOCOL))


def encode_return(value: Any) -> bytes:
    """The record of a successful call's return value (raises if it cannot be pickled)."""
    try:
        data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise _explain(exc, f"the return value, a {type(value).__name__!r}, for the parent") from exc
    return frame(pickle.dumps(("return", "", data), pickle.HIGHEST_PROTOCOL))


def encode_exit(code: int) -> bytes:
    """A rank's last record: the status it exits with (what the parent goes by when
    someone else collected the real one). Small enough for one atomic pipe write."""
    return frame(pickle.dumps(("exit", "", code), pickle.HIGHEST_PROTOCOL))


def _frames(output: bytes) -> List[Tuple[str, str, Any]]:
    """The whole records in ``output`` (a cut or garbled one ends the list)."""
    records = []
    offset = 0
    while len(output) - offset >= _LEN.size:
        (size,) = _LEN.unpack_from(output, offset)
        start = offset + _LEN.size
        if len(output) - start < size:
            break
        try:
            kind, text, data = pickle.loads(output[start : start + size])
        except Exception:
            break
        records.append((str(kind), text, data))
        offset = start + size
    return records


def decode(output: bytes) -> Optional[Record]:
    """The return or error record in a child's output, or None if it sent none (or only
    part of one)."""
    for kind, text, data in _frames(output):
        if kind == "exit":
            continue
        if kind == "return":
            try:
                return Record(kind, text, None, pickle.loads(data))
            except Exception as why:
                return Record("unreadable", f"{type(why).__name__}: {why}", why)
        raised: Optional[BaseException] = None
        if data is not None:
            try:
                raised = pickle.loads(data)
            except Exception:
                raised = None
        if not isinstance(raised, BaseException):
            raised = None
        return Record(kind, text, raised)
    return None


def exit_status(output: bytes) -> Optional[int]:
    """The exit code a child reported as its last record, None if it sent none."""
    for kind, _text, data in reversed(_frames(output)):
        if kind == "exit" and isinstance(data, int):
            return data
    return None


_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_MAX = 1 << 20


def write_exit(fd: int, code: int) -> None:
    """Write the exit record in one non-blocking write; a full or closed pipe loses it
    (the parent then has only the engine's word), but never holds the exit up."""
    try:
        os.set_blocking(fd, False)
        os.write(fd, encode_exit(code))
    except OSError:
        pass


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of everything (the parent drains while it waits).

    A large record first widens the pipe (up to 1 MiB) so that the writer can usually
    exit even when nobody is draining yet.
    """
    if len(data) > 65536:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, min(len(data), _PIPE_MAX))
        except OSError:
            pass
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
