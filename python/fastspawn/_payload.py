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
from typing import Any, BinaryIO, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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


def _dumps(obj: Any, pickler: Optional[Callable[[BinaryIO, int], pickle.Pickler]] = None) -> bytes:
    buf = io.BytesIO()
    (pickler or ForkingPickler)(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
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

    A function or class that pickle cannot send by reference (see :func:`by_reference`),
    at any depth, is sent by value with cloudpickle, which is imported only then; what
    pickles today is pickled exactly as before (same bytes), by multiprocessing's
    ``ForkingPickler``. On failure raises the pickler's own exception type, naming ``fn``
    or ``args[i]``. ``plain`` (see :func:`is_plain`): nothing in the call needs
    multiprocessing's reducers.
    """
    call = (fn, tuple(args))
    if plain:
        try:
            return pickle.dumps(call, pickle.HIGHEST_PROTOCOL), []
        except Exception:
            pass  # said again below, with the culprit named
    first: Optional[Callable[[BinaryIO, int], pickle.Pickler]] = None
    if interactive_main():
        first = _MainByName  # its functions are nowhere for a child to look them up
    try:
        popen = SpawningPopen()
        mp_context.set_spawning_popen(popen)  # type: ignore[arg-type]  # a stand-in for its Popen
        try:
            return _dumps(call, first), popen.fds
        except Exception:
            pass  # perhaps something to send by value: the by-value pickler tries it all again
        popen = SpawningPopen()  # what the failed attempt collected is not passed on
        mp_context.set_spawning_popen(popen)  # type: ignore[arg-type]
        pickler = by_value_pickler()
        try:
            return _dumps(call, pickler), popen.fds
        except Exception as exc:
            culprit = _find_unpicklable(fn, args, pickler)
            if culprit is None:
                raise
            raise _explain(exc, f"{culprit} for the child processes") from exc
    finally:
        mp_context.set_spawning_popen(None)


# ------------------------------------------------------- by reference or by value
def interactive_main() -> bool:
    """Whether ``__main__`` is a module a child cannot load again (``python -c``, a script
    read from stdin, a REPL, a notebook): one neither imported by name nor run from a file.
    Its functions and classes are sent by value."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None):
        return False
    path = getattr(main, "__file__", None)
    return not isinstance(path, str) or not os.path.isfile(path)


def by_reference(obj: Any) -> bool:
    """Whether pickle's reference to function or class ``obj`` (its module and qualified
    name) finds ``obj`` again in a child: the name leads back to this very object in its
    module, and the module is not an interactive ``__main__``. Lambdas, functions and
    classes defined in functions, and objects replaced or renamed in their module fail this;
    they are what :func:`dumps_call` sends by value."""
    name = getattr(obj, "__qualname__", None)
    if not isinstance(name, str):
        name = getattr(obj, "__name__", None)
    if not isinstance(name, str) or "<" in name:  # <lambda>, <locals>
        return False
    module_name = getattr(obj, "__module__", None)
    if not isinstance(module_name, str):  # made at run time with no module: by value
        return False
    if module_name == "__main__" and interactive_main():
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    found: Any = module
    try:
        for part in name.split("."):
            found = getattr(found, part)
    except AttributeError:
        return False
    return found is obj


def _function_or_class(obj: Any) -> bool:
    return isinstance(obj, (types.FunctionType, type))


class _NeedsByValue(Exception):
    """Raised by :class:`_MainByName` at the first object it must not send by name."""


class _MainByName(ForkingPickler):
    """multiprocessing's pickler, failing (to have it all pickled again by value) at the
    first function or class of an interactive ``__main__``, which pickle would send by
    a name the child cannot look up."""

    def reducer_override(self, obj: Any) -> Any:
        if _function_or_class(obj) and getattr(obj, "__module__", None) == "__main__":
            raise _NeedsByValue()
        return NotImplemented


_by_value: Optional[Callable[[BinaryIO, int], pickle.Pickler]] = None


def by_value_pickler() -> Callable[[BinaryIO, int], pickle.Pickler]:
    """multiprocessing's ``ForkingPickler`` that sends by value (with cloudpickle) each
    function and class that fails :func:`by_reference`, and everything else as
    ``ForkingPickler`` does. Imports cloudpickle (once, on first use)."""
    global _by_value
    if _by_value is None:
        _by_value = _make_by_value_pickler()
    return _by_value


def _make_by_value_pickler() -> Callable[[BinaryIO, int], pickle.Pickler]:
    import abc
    import copyreg
    import dataclasses
    import typing

    import cloudpickle  # type: ignore[import-untyped]

    # cloudpickle's reducers for what a function or class sent by value is made of (code,
    # closure cells, the modules among its globals, descriptors in a class body), never
    # its others (an open file or a memoryview keeps failing as pickle fails on it).
    table = cloudpickle.Pickler.dispatch_table
    wanted = [
        types.CodeType, types.CellType, types.ModuleType, types.GetSetDescriptorType,
        types.MappingProxyType, classmethod, staticmethod, property, abc.abstractmethod,
        abc.abstractclassmethod, abc.abstractstaticmethod, abc.abstractproperty, typing.TypeVar,
        getattr(dataclasses, "_FIELD_BASE", None),
    ]
    extra: Dict[Any, Any] = {kind: table[kind] for kind in wanted if kind is not None and kind in table}

    class ByValuePickler(ForkingPickler):
        """See :func:`by_value_pickler`."""

        def __init__(self, file: BinaryIO, protocol: int) -> None:
            super().__init__(file, protocol)
            dispatch = copyreg.dispatch_table.copy()
            dispatch.update(extra)
            dispatch.update(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
            self.dispatch_table = dispatch
            # cloudpickle's own pickler makes the reductions of what goes by value (and
            # keeps, for this one pickling, which functions share their globals).
            self._cloudpickler = cloudpickle.Pickler(io.BytesIO(), protocol)

        def reducer_override(self, obj: Any) -> Any:
            if _function_or_class(obj) and not by_reference(obj):
                return self._cloudpickler.reducer_override(obj)
            return NotImplemented

    return ByValuePickler


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
    if not name or "<" in name or getattr(obj, "__self__", None) not in (None, sys.modules.get(obj.__module__)):
        return False
    return type(obj) is types.BuiltinFunctionType or by_reference(obj)


def preparation_data(name: str) -> Dict[str, Any]:
    """multiprocessing's preparation data for a child named ``name`` (as
    ``multiprocessing.spawn.get_preparation_data``), without the main script's path when
    ``__main__`` is interactive: a script read from stdin has ``__file__`` "<stdin>",
    which multiprocessing takes for a file to run again in the child, and there is none
    (its functions go by value instead, see :func:`dumps_call`)."""
    from multiprocessing import spawn

    data: Dict[str, Any] = spawn.get_preparation_data(name)
    if interactive_main():
        data.pop("init_main_from_path", None)
    return data


def dumps_preparation(data: Any) -> bytes:
    """Pickle multiprocessing's preparation data (it holds the authkey: spawning only)."""
    mp_context.set_spawning_popen(SpawningPopen())  # type: ignore[arg-type]  # a stand-in for its Popen
    try:
        return _dumps(data)
    finally:
        mp_context.set_spawning_popen(None)


def _find_unpicklable(
    fn: Callable[..., Any], args: Sequence[Any], pickler: Callable[[BinaryIO, int], pickle.Pickler]
) -> Optional[str]:
    candidates: List[Tuple[str, Any]] = [(f"fn={fn!r}", fn)] + [(f"args[{i}]", a) for i, a in enumerate(args)]
    for label, obj in candidates:
        try:
            _dumps(obj, pickler)
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
