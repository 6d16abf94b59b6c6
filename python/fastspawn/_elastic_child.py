"""What a rank needs of fastspawn.elastic, kept light (children import only this):
the error recorder (:func:`record`, :class:`ErrorHandler`, :class:`ChildFailedError`, all
re-exported by :mod:`fastspawn.elastic.errors`) and the call each function rank makes.

Error files use the JSON layout torch.distributed.elastic writes and reads::

    {"message": {"message": "ValueError: boom",
                 "extraInfo": {"py_callstack": "<traceback text>", "timestamp": "1700000000"}}}

so error files written by fastspawn workers are read by torch's tools and the other way round.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

logger = logging.getLogger("fastspawn.elastic.errors")
_handler_logger = logging.getLogger("fastspawn.elastic.errors.error_handler")

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
NOT_AVAILABLE = "<N/A>"
ERRORS_DOC = "https://pytorch.org/docs/stable/elastic/errors.html"

GlobalRank = int
_R = TypeVar("_R")


class ErrorHandler:
    """Records a process's failure in the JSON error file named by ``TORCHELASTIC_ERROR_FILE``.

    Without that variable nothing is written. Subclass it and override :meth:`initialize`
    and :meth:`record_exception` to handle errors differently.
    """

    def _get_error_file_path(self) -> Optional[str]:
        """Where to write the error file (None: nowhere)."""
        return os.environ.get(ERROR_FILE_ENV)

    def initialize(self) -> None:
        """Prepare to capture errors: enables :mod:`faulthandler` for all threads, so a
        fatal signal (e.g. SIGSEGV) still prints the Python stacks to stderr."""
        try:
            faulthandler.enable(all_threads=True)
        except Exception as exc:  # e.g. stderr closed or not a real file
            warnings.warn(f"Unable to enable fault handler. {type(exc).__name__}: {exc}", stacklevel=2)

    def _write_error_file(self, file_path: str, error_msg: str) -> None:
        """Write ``error_msg`` to ``file_path`` (atomically, see :func:`write_atomically`);
        warn (do not raise) when that fails."""
        try:
            write_atomically(file_path, error_msg)
        except Exception as exc:
            warnings.warn(f"Unable to write error to file. {type(exc).__name__}: {exc}", stacklevel=2)

    def record_exception(self, e: BaseException) -> None:
        """Write ``e`` (type, message, its traceback, time) to the error file.

        Call it from an ``except`` block. The traceback is ``e.__traceback__``, which is
        the handled one unless the handler replaced it (``with_traceback``): that choice
        also holds on Python < 3.11, where ``sys.exc_info()`` kept the original.
        """
        path = self._get_error_file_path()
        if not path:
            return
        import json  # (children that never fail do not load it)

        data = {
            "message": {
                "message": f"{type(e).__name__}: {e}",
                "extraInfo": {
                    "py_callstack": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
                    "timestamp": str(int(time.time())),
                },
            }
        }
        write_atomically(path, json.dumps(data))

    def override_error_code_in_rootcause_data(
        self,
        rootcause_error_file: str,
        rootcause_error: Dict[str, Any],
        error_code: int = 0,
    ) -> None:
        """Set ``errorCode`` in a child's error data read from ``rootcause_error_file``
        (only the structured layout has room for it; the others are logged and left)."""
        if "message" not in rootcause_error:
            _handler_logger.warning(
                "child error file (%s) does not have field `message`. \ncannot override error code: %s",
                rootcause_error_file,
                error_code,
            )
        elif isinstance(rootcause_error["message"], str):
            _handler_logger.warning(
                "child error file (%s) has a new message format. \nskipping error code override",
                rootcause_error_file,
            )
        else:
            rootcause_error["message"]["errorCode"] = error_code

    def dump_error_file(self, rootcause_error_file: str, error_code: int = 0) -> None:
        """Copy a child's error file into this process's own error file.

        ``error_code`` (when non-zero) is recorded as the error's ``errorCode``: a child
        killed by a signal cannot record its own exit status.
        """
        import json

        with open(rootcause_error_file) as src:
            rootcause_error = json.load(src)
        if error_code:
            self.override_error_code_in_rootcause_data(rootcause_error_file, rootcause_error, error_code)
        _handler_logger.debug(
            "child error file (%s) contents:\n%s", rootcause_error_file, json.dumps(rootcause_error, indent=2)
        )
        own = self._get_error_file_path()
        if not own:
            _handler_logger.error("no error file defined for parent, to copy child error file (%s)", rootcause_error_file)
            return
        # A child that got our variable (it inherits our environment) may have written to our
        # file before its own was set: keep a trace of what is replaced.
        self._rm(own)
        self._write_error_file(own, json.dumps(rootcause_error))
        _handler_logger.info("dumped error file to parent's %s", own)

    def _rm(self, my_error_file: str) -> None:
        if not os.path.isfile(my_error_file):
            return
        import json

        with open(my_error_file) as old:
            try:
                original = json.dumps(json.load(old), indent=2)
            except json.decoder.JSONDecodeError:
                _handler_logger.warning(
                    "%s already exists and will be overwritten. Unable to load original contents:\n",
                    my_error_file,
                )
            else:
                _handler_logger.warning(
                    "%s already exists and will be overwritten. Original contents:\n%s",
                    my_error_file,
                    original,
                )
        os.remove(my_error_file)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory renamed
    over it: a reader (the launcher) finds no file, an earlier one, or the whole new one,
    never part of it, even when the writer is killed midway."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def get_error_handler() -> ErrorHandler:
    """A new default :class:`ErrorHandler`."""
    return ErrorHandler()


def _traceback_text(message: Any) -> str:
    """What a failure report shows: the traceback in a structured error, else the text."""
    if not isinstance(message, dict):
        return str(message)
    text = message.get("extraInfo", {}).get("py_callstack", message.get("message", NOT_AVAILABLE))
    return str(text).replace("\n", "\n  ")


class ChildFailedError(Exception):
    """Child processes failed: ``failures`` maps (global) rank to :class:`ProcessFailure`.

    Raise it from a :func:`record`-decorated function to pass the first child failure's
    error file on as this process's own (a launcher whose job is its children). ``str()``
    is the report torch prints: every failure, then the root cause (earliest timestamp).
    """

    def __init__(self, name: str, failures: Dict[GlobalRank, Any]) -> None:
        self.name = name
        self.failures = failures
        if not self.failures:
            raise AssertionError("ChildFailedError needs at least one failure")
        super().__init__(self.format_msg())

    def get_first_failure(self) -> Tuple[GlobalRank, Any]:
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

    def _format_failure(self, idx: int, rank: int, failure: Any) -> Tuple[str, int]:
        import socket  # only the parent formats reports

        name = failure.signal_name()
        signal_text = f" ({name})" if name != NOT_AVAILABLE else ""
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
            if failure.error_file != NOT_AVAILABLE:
                handler.dump_error_file(failure.error_file, failure.exitcode)
            else:
                logger.info(
                    "local_rank %s FAILED with no error file. Decorate your entrypoint fn with"
                    " @record for traceback info. See: %s",
                    rank,
                    ERRORS_DOC,
                )
            raise
        except Exception as exc:
            handler.record_exception(exc)
            raise

    return wrapper


class RankCall:
    """The call each function rank makes: ``record(entrypoint)(*args[local_rank])``. Its
    ``__module__`` is the entrypoint's, so that the warm zygote imports the user's module
    once before forking (instead of once per child)."""

    def __init__(self, entrypoint: Callable[..., Any], args: Dict[int, Tuple[Any, ...]]) -> None:
        self.entrypoint = entrypoint
        self.args = args
        module = getattr(entrypoint, "__module__", None)
        if isinstance(module, str):
            self.__module__ = module

    def __call__(self, local_rank: int) -> Any:
        return record(self.entrypoint)(*self.args[local_rank])
