"""ErrorHandler: writes a worker's uncaught exception to ``TORCHELASTIC_ERROR_FILE`` as JSON.

The file layout is the one torch.distributed.elastic writes and reads::

    {"message": {"message": "ValueError: boom",
                 "extraInfo": {"py_callstack": "<traceback text>", "timestamp": "1700000000"}}}

so error files written by fastspawn workers are read by torch's tools and the other way round.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import time
import traceback
import warnings
from typing import Any, Dict, Optional

__all__ = ["ErrorHandler"]

logger = logging.getLogger(__name__)

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


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
        """Write ``error_msg`` to ``file_path``; warn (do not raise) when that fails."""
        try:
            with open(file_path, "w") as out:
                out.write(error_msg)
        except Exception as exc:
            warnings.warn(f"Unable to write error to file. {type(exc).__name__}: {exc}", stacklevel=2)

    def record_exception(self, e: BaseException) -> None:
        """Write ``e`` (type, message, the traceback being handled, time) to the error file.

        Call it from an ``except`` block: the traceback is the one currently handled.
        """
        path = self._get_error_file_path()
        if not path:
            return
        data = {
            "message": {
                "message": f"{type(e).__name__}: {e}",
                "extraInfo": {
                    "py_callstack": traceback.format_exc(),
                    "timestamp": str(int(time.time())),
                },
            }
        }
        with open(path, "w") as out:
            json.dump(data, out)

    def override_error_code_in_rootcause_data(
        self,
        rootcause_error_file: str,
        rootcause_error: Dict[str, Any],
        error_code: int = 0,
    ) -> None:
        """Set ``errorCode`` in a child's error data read from ``rootcause_error_file``
        (only the structured layout has room for it; the others are logged and left)."""
        if "message" not in rootcause_error:
            logger.warning(
                "child error file (%s) does not have field `message`. \ncannot override error code: %s",
                rootcause_error_file,
                error_code,
            )
        elif isinstance(rootcause_error["message"], str):
            logger.warning(
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
        with open(rootcause_error_file) as src:
            rootcause_error = json.load(src)
        if error_code:
            self.override_error_code_in_rootcause_data(rootcause_error_file, rootcause_error, error_code)
        logger.debug(
            "child error file (%s) contents:\n%s", rootcause_error_file, json.dumps(rootcause_error, indent=2)
        )
        own = self._get_error_file_path()
        if not own:
            logger.error("no error file defined for parent, to copy child error file (%s)", rootcause_error_file)
            return
        # A child that got our variable (it inherits our environment) may have written to our
        # file before its own was set: keep a trace of what is replaced.
        self._rm(own)
        self._write_error_file(own, json.dumps(rootcause_error))
        logger.info("dumped error file to parent's %s", own)

    def _rm(self, my_error_file: str) -> None:
        if not os.path.isfile(my_error_file):
            return
        with open(my_error_file) as old:
            try:
                original = json.dumps(json.load(old), indent=2)
            except json.decoder.JSONDecodeError:
                logger.warning(
                    "%s already exists and will be overwritten. Unable to load original contents:\n",
                    my_error_file,
                )
            else:
                logger.warning(
                    "%s already exists and will be overwritten. Original contents:\n%s",
                    my_error_file,
                    original,
                )
        os.remove(my_error_file)
