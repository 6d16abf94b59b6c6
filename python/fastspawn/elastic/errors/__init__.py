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

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Tuple

from ..._elastic_child import (
    ERRORS_DOC as _ERRORS_DOC,
    NOT_AVAILABLE as _NOT_AVAILABLE,
    ChildFailedError,
    ErrorHandler,
    GlobalRank,
    get_error_handler,
    record,
)
from ..._errors import UNKNOWN_STATUS_TEXT, UnknownExitStatus

__all__ = ["ProcessFailure", "ChildFailedError", "record", "ErrorHandler", "get_error_handler"]

logger = logging.getLogger(__name__)

JSON = Dict[str, Any]

_NO_ERROR_DATA: JSON = {"message": "<NONE>"}


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
        if isinstance(self.exitcode, UnknownExitStatus):
            self.message = f"Process {self.pid} ended, but {UNKNOWN_STATUS_TEXT}"
        elif self.exitcode < 0:  # killed by a signal: nobody wrote anything
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
