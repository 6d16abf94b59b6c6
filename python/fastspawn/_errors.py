"""Exceptions raised in the parent when a child process fails (same as torch's)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["ProcessException", "ProcessRaisedException", "ProcessExitedException", "UnknownExitStatus"]


class ProcessException(Exception):
    """A child process failed. ``error_index`` is its rank, ``error_pid`` its pid."""

    __slots__ = ["error_index", "error_pid"]

    def __init__(self, msg: str, error_index: int, error_pid: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.error_index = error_index
        self.error_pid = error_pid

    @property
    def pid(self) -> int:
        """The failed process's pid (same as ``error_pid``)."""
        return self.error_pid

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.msg, self.error_index, self.error_pid)


class ProcessRaisedException(ProcessException):
    """The child's function raised; the message carries the child's traceback."""


class ProcessExitedException(ProcessException):
    """The child exited with a non-zero code or was killed by a signal."""

    __slots__ = ["exit_code"]

    def __init__(
        self,
        msg: str,
        error_index: int,
        error_pid: int,
        exit_code: int,
        signal_name: Optional[str] = None,
    ) -> None:
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name

    def __reduce__(self) -> Tuple[Any, ...]:
        return (
            type(self),
            (self.msg, self.error_index, self.error_pid, self.exit_code, self.signal_name),
        )


class UnknownExitStatus(int):
    """The exit code of a child whose exit status was collected by another process (the
    parent ignores SIGCHLD, or runs a ``waitpid(-1)`` loop) and that did not report one
    itself: it ended, but how is unknown. A failure: it is an int equal to 1 (the generic
    failure status), so ``exitcode != 0`` holds, and messages say what happened."""

    def __new__(cls) -> "UnknownExitStatus":
        return super().__new__(cls, 1)

    def __getnewargs__(self) -> Tuple[()]:  # type: ignore[override]
        return ()

    def __repr__(self) -> str:
        return "UnknownExitStatus()"

    __str__ = __repr__


UNKNOWN_STATUS_TEXT = (
    "its exit status was collected by another process (SIGCHLD ignored, or a waitpid(-1) "
    "loop) and it reported none"
)
