"""Where each rank's stdout and stderr go: the console, a file, or both (tee).

A stream that is only redirected gets the file itself as the child's fd 1/2. A teed stream
gets a pipe instead; one thread per context reads every teed pipe (it waits in the engine's
wait, watching the pipes: no second event loop), writes the bytes as they come to the log
file, and writes each *whole* line, prefixed with the rank's header, to the console in a
single write under a lock shared by all contexts. So a console line never
holds bytes of two ranks, and no line is cut where a child happened to flush.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import signal
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, TextIO, Tuple

logger = logging.getLogger(__name__)

# Console writes of all contexts (one line batch at a time).
_CONSOLE_LOCK = threading.Lock()
# A line longer than this without a newline is written out in pieces (each one prefixed).
_MAX_LINE = 1 << 20
_CHUNK = 1 << 16
# On stop, at most this many reads per pipe: what the ranks wrote before they exited is
# in the pipe already; only a descendant that keeps the pipe open could write more.
_DRAIN_READS = 1024
# How long close() waits for the reader to write out what it drained.
_STOP_TIMEOUT = 30.0
# Signals the reader thread leaves to the others: a signal sent to the launcher (Ctrl-C,
# SIGTERM) must reach the main thread, whose wait it interrupts. Faults stay deliverable.
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS}

StdioPair = Tuple[Optional[int], Optional[int]]


class LineFilter:
    """Lines (with their header) that contain any of ``needles`` also go to ``dst``."""

    def __init__(self, dst: TextIO, needles: Sequence[str]) -> None:
        self.dst = dst
        self.needles = list(needles)

    def write(self, header: str, lines: List[str]) -> None:
        chosen = [f"{header}{line}\n" for line in lines if any(n in line for n in self.needles)]
        if chosen:
            self.dst.write("".join(chosen))


class _Tee:
    """One teed stream: pipe read end -> raw bytes to ``log_fd``, prefixed lines to ``console``.

    An output that fails (disk full, console closed) is reported once and dropped; the
    others go on. The reader thread closes the fds when it is done with them.
    """

    def __init__(self, fd: int, log_fd: int, console: TextIO, header: str, line_filter: Optional[LineFilter]) -> None:
        self.fd = fd
        self.log_fd = log_fd
        self.console = console
        self.header = header
        self.line_filter = line_filter
        self.decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("replace"), translate=True)
        self.pending = ""
        self.broken: Set[str] = set()

    def feed(self, data: bytes, final: bool = False) -> None:
        if data:
            self._guarded("log file", lambda: _write_all(self.log_fd, data))
        text = self.pending + self.decoder.decode(data, final)
        lines = text.split("\n")
        self.pending = lines.pop()
        if self.pending and (final or len(self.pending) > _MAX_LINE):
            lines.append(self.pending)
            self.pending = ""
        if not lines:
            return
        if self.line_filter is not None:
            self._guarded("filtered log", lambda: self.line_filter.write(self.header, lines))  # type: ignore[union-attr]
        self._guarded("console", lambda: self._to_console("".join(f"{self.header}{line}\n" for line in lines)))

    def _to_console(self, block: str) -> None:
        with _CONSOLE_LOCK:
            self.console.write(block)
            self.console.flush()

    def _guarded(self, output: str, write: Callable[[], None]) -> None:
        if output in self.broken:
            return
        try:
            write()
        except (OSError, ValueError) as exc:
            self.broken.add(output)
            # str(exc): a record holding the exception would keep its traceback's frames,
            # and with them this reader and its fds, alive for as long as the record lives.
            logger.warning("cannot write %s output to its %s any more: %s", self.header, output, str(exc))

    def close(self) -> None:
        """Close both fds (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.log_fd)
            self.fd = self.log_fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RankStreams:
    """Opens every rank's stdout/stderr destination and runs the reader of teed streams.

    ``files[k][rank]``: the destination path of stream k (0 = stdout, 1 = stderr): ``""``
    for the console (inherited), else a file (``os.devnull`` included). Ranks in
    ``teed[k]`` also see their lines on ``consoles[k]``, prefixed with ``headers[rank]``.
    """

    def __init__(
        self,
        name: str,
        files: Tuple[Dict[int, str], Dict[int, str]],
        teed: Tuple[Sequence[int], Sequence[int]],
        headers: Dict[int, str],
        consoles: Tuple[TextIO, TextIO],
        filters: Tuple[Optional[LineFilter], Optional[LineFilter]],
    ) -> None:
        self.name = name
        self.files = files
        self.teed = (set(teed[0]), set(teed[1]))
        self.headers = headers
        self.consoles = consoles
        self.filters = filters
        self._child_fds: List[int] = []
        self._tees: List[_Tee] = []
        self._thread: Optional[threading.Thread] = None
        self._wake_fd = -1  # write end of the reader's wake-up pipe
        self._release_wake: Optional[weakref.finalize[[int], RankStreams]] = None

    def open(self, nprocs: int) -> List[StdioPair]:
        """Create the files and pipes; returns the (stdout_fd, stderr_fd) of each rank."""
        stdio: List[StdioPair] = []
        try:
            for rank in range(nprocs):
                pair = [self._open(kind, rank) for kind in (0, 1)]
                stdio.append((pair[0], pair[1]))
        except BaseException:
            self.close()
            raise
        return stdio

    def _open(self, kind: int, rank: int) -> Optional[int]:
        path = self.files[kind][rank]
        if not path:
            return None
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        if rank not in self.teed[kind] or path == os.devnull:
            self._child_fds.append(log_fd)
            return log_fd
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(log_fd)
            raise
        os.set_blocking(read_fd, False)
        self._child_fds.append(write_fd)
        self._tees.append(_Tee(read_fd, log_fd, self.consoles[kind], self.headers[rank], self.filters[kind]))
        return write_fd

    def launched(self, group: Any) -> None:
        """The children hold their ends now: drop ours and start reading the teed pipes
        (``group``: the engine group of the ranks, whose wait watches the pipes)."""
        self._close_child_fds()
        if self._tees and self._thread is None:
            wake_read, self._wake_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._release_wake = weakref.finalize(self, os.close, self._wake_fd)
            self._thread = threading.Thread(
                target=self._read_all, args=(wake_read, group), name=f"fastspawn-elastic-{self.name}", daemon=True
            )
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _FAULTS)
            try:
                self._thread.start()  # with those signals blocked from its first instruction
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _close_child_fds(self) -> None:
        fds, self._child_fds = self._child_fds, []
        for fd in fds:
            os.close(fd)

    def _read_all(self, wake_fd: int, group: Any) -> None:
        """The reader thread: until every pipe ends, or a wake-up (then it drains them).
        It waits in the engine (``group.wait`` watching the pipes and the wake pipe), which
        also returns at each rank's exit. It closes each pipe and log file it is done
        with, and its end of the wake pipe."""
        live = {tee.fd: tee for tee in self._tees}
        known = 0
        try:
            while live:
                known += len(group.wait(None, False, known, watch=[wake_fd, *live]))
                if _woken(wake_fd):  # stop: take what is there, then finish
                    for tee in live.values():
                        _drain(tee)
                    return
                for fd, tee in list(live.items()):
                    if not _read_once(tee):
                        del live[fd]
                        tee.close()
        finally:
            for tee in live.values():
                tee.close()
            os.close(wake_fd)

    def close(self) -> None:
        """Write out what the ranks wrote, then close every file and pipe (idempotent)."""
        self._close_child_fds()
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                os.write(self._wake_fd, b"x")
            except OSError:  # already woken, or the reader is gone
                pass
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():
                logger.error(
                    "output of %s was not written out within %ss (console blocked?); giving up on it",
                    self.name,
                    _STOP_TIMEOUT,
                )
                return  # the reader still uses the pipes and files: it closes them when done
            assert self._release_wake is not None
            self._release_wake()
        tees, self._tees = self._tees, []
        for tee in tees:  # those no reader took (start failed), else already closed
            tee.close()


def _woken(wake_fd: int) -> bool:
    try:
        return bool(os.read(wake_fd, 1))
    except BlockingIOError:
        return False


def _read_once(tee: _Tee) -> bool:
    """One read of a readable pipe; False at end of file (the rest is then written out)."""
    try:
        data = os.read(tee.fd, _CHUNK)
    except BlockingIOError:
        return True
    if data:
        tee.feed(data)
        return True
    tee.feed(b"", final=True)
    return False


def _drain(tee: _Tee) -> None:
    for _ in range(_DRAIN_READS):
        try:
            data = os.read(tee.fd, _CHUNK)
        except BlockingIOError:
            break
        if not data:
            break
        tee.feed(data)
    tee.feed(b"", final=True)
