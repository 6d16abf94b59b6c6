"""Errors of worker processes, carried from child to parent through a JSON error file.

Same names and file layout as ``torch.distributed.elastic.multiprocessing.errors``:

- :func:`record` wraps a worker's entry point: an uncaught exception is written (type,
  message, traceback, time) to the file named by ``TORCHELASTIC_ERROR_FILE`` before it
  propagates. Function entrypoints started by :func:`fastspawn.elastic.start_processes` are
  wrapped automatically; decorate the ``main`` of a binary/script yourself.
- :class:`ProcessFailure` is the parent's view of one failed process (it reads the file).
- :class:`ChildFailedError` reports failed children in torch's familiar layout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from .error_handler import ErrorHandler
from .handlers import get_error_handler

__all__ = ["ProcessFailure", "ChildFailedError", "record", "ErrorHandler", "get_error_handler"]

logger = logging.getLogger(__name__)

JSON = Dict[str, Any]
GlobalRank = int

_NOT_AVAILABLE = "<N/A>"
_NO_ERROR_DATA: JSON = {"message": "<NONE>"}
_ERRORS_DOC = "https://pytorch.org/docs/stable/elastic/errors.html"

_R = TypeVar("_R")


@dataclass
class ProcessFailure:
    """One failed process, as the parent sees it.

    ``message`` and ``timestamp`` come from ``error_file`` when the process wrote one (then
    ``message`` is the error data: a dict for files written by :class:`ErrorHandler`);
    otherwise ``error_file`` becomes ``"<N/A>"``, ``timestamp`` is now (seconds since the
    epoch) and ``message`` describes the signal or how to get a traceback.
    """

    local_rank: int
    pid: int
    exitcode: int
    error_file: str
    error_file_data: JSON = field(init=False)
    message: str = field(init=False)
    timestamp: int = field(init=False)

    def __post_init__(self) -> None:
        self.error_file_data = _NO_ERROR_DATA
        self.message = ""
        if os.path.isfile(self.error_file):
            try:
                with open(self.error_file) as src:
                    self.error_file_data = json.load(src)
                logger.debug("User process failed with error data: %s", json.dumps(self.error_file_data, indent=2))
                self.message, self.timestamp = self._get_error_data(self.error_file_data)
            except Exception:
                logger.exception("Failed to parse reply file: %s", self.error_file)
                raise
        else:
            self.error_file = _NOT_AVAILABLE
            self.timestamp = int(time.time())
        if self.message:
            return
        if self.exitcode < 0:  # killed by a signal: nobody wrote anything
            self.message = f"Signal {-self.exitcode} ({self.signal_name()}) received by PID {self.pid}"
        else:
            # a copy: the shared "no data" default must stay as it is
            self.error_file_data = dict(self.error_file_data)
            self.error_file_data["errorTraits"] = {"category": "system_terminated_error", "retryability": "False"}
            self.message = f"To enable traceback see: {_ERRORS_DOC}"

    def _get_error_data(self, error_file_data: JSON) -> Tuple[Any, int]:
        message = error_file_data["message"]
        if isinstance(message, str):  # the flat layout: {"message": str, "timestamp": int}
            return message, int(error_file_data.get("timestamp", 0))
        return message, int(message["extraInfo"]["timestamp"])

    def signal_name(self) -> str:
        """Name of the signal that killed the process (e.g. ``"SIGKILL"``), else ``"<N/A>"``."""
        if self.exitcode >= 0:
            return _NOT_AVAILABLE
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return _NOT_AVAILABLE

    def timestamp_isoformat(self) -> str:
        """The failure time in local time, ISO format with ``_`` between date and time."""
        return datetime.fromtimestamp(self.timestamp).isoformat(sep="_")


def _traceback_text(message: Any) -> str:
    """What a failure report shows: the traceback in a structured error, else the text."""
    if not isinstance(message, dict):
        return str(message)
    text = message.get("extraInfo", {}).get("py_callstack", message.get("message", _NOT_AVAILABLE))
    return str(text).replace("\n", "\n  ")


class ChildFailedError(Exception):
    """Child processes failed: ``failures`` maps (global) rank to :class:`ProcessFailure`.

    Raise it from a :func:`record`-decorated function to pass the first child failure's
    error file on as this process's own (a launcher whose job is its children). ``str()``
    is the report torch prints: every failure, then the root cause (earliest timestamp).
    """

    def __init__(self, name: str, failures: Dict[GlobalRank, ProcessFailure]) -> None:
        self.name = name
        self.failures = failures
        if not self.failures:
            raise AssertionError("ChildFailedError needs at least one failure")
        super().__init__(self.format_msg())

    def get_first_failure(self) -> Tuple[GlobalRank, ProcessFailure]:
        """The rank and failure with the earliest timestamp (the first in order on ties)."""
        rank = min(self.failures, key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]

    def format_msg(self, boarder_delim: str = "=", section_delim: str = "-") -> str:
        """The report: title, other failures, root cause, framed by delimiter lines."""
        title = f"{self.name} FAILED"
        root_rank, _ = self.get_first_failure()
        root = ""
        others = []
        width = len(title)
        for index, (rank, failure) in enumerate(self.failures.items()):
            text, text_width = self._format_failure(index, rank, failure)
            width = max(width, text_width)
            if rank == root_rank:
                root = text
            else:
                others.append(text)
        width = min(width, 60)
        border, section = boarder_delim * width, section_delim * width
        return "\n".join(
            [
                "",
                border,
                title,
                section,
                "Failures:",
                "\n".join(others) if others else "  <NO_OTHER_FAILURES>",
                section,
                "Root Cause (first observed failure):",
                root,
                border,
            ]
        )

    def _format_failure(self, idx: int, rank: int, failure: ProcessFailure) -> Tuple[str, int]:
        name = failure.signal_name()
        signal_text = f" ({name})" if name != _NOT_AVAILABLE else ""
        text = (
            f"[{idx}]:\n"
            f"  time      : {failure.timestamp_isoformat()}\n"
            f"  host      : {socket.getfqdn()}\n"
            f"  rank      : {rank} (local_rank: {failure.local_rank})\n"
            f"  exitcode  : {failure.exitcode} (pid: {failure.pid}) {signal_text}\n"
            f"  error_file: {failure.error_file}\n"
            f"  traceback : {_traceback_text(failure.message)}"
        )
        return text, max(len(line) for line in text.split("\n"))


def record(
    fn: Callable[..., _R], error_handler: Optional[ErrorHandler] = None
) -> Callable[..., Optional[_R]]:
    """Decorate a process's top-level function so that its failure is recorded.

    An uncaught Exception is written to ``TORCHELASTIC_ERROR_FILE`` by ``error_handler``
    (default: :func:`get_error_handler`) and re-raised. A :class:`ChildFailedError` copies
    its first failure's error file into ours (with the child's exit code) and re-raises.
    ``SystemExit(0)`` becomes a normal return of None; other exits propagate untouched.

    Example::

        from fastspawn.elastic.errors import record

        @record
        def main():
            ...

        if __name__ == "__main__":
            main()
    """
    handler = error_handler if error_handler is not None else get_error_handler()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Optional[_R]:
        handler.initialize()
        try:
            return fn(*args, **kwargs)
        except SystemExit as exc:
            if exc.code == 0:  # e.g. a script run as a function that calls sys.exit(0)
                return None
            raise
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            if failure.error_file != _NOT_AVAILABLE:
                handler.dump_error_file(failure.error_file, failure.exitcode)
            else:
                logger.info(
                    "local_rank %s FAILED with no error file. Decorate your entrypoint fn with"
                    " @record for traceback info. See: %s",
                    rank,
                    _ERRORS_DOC,
                )
            raise
        except Exception as exc:
            handler.record_exception(exc)
            raise

    return wrapper
