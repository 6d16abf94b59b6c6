"""The error handler used by :func:`fastspawn.elastic.errors.record` by default."""

from __future__ import annotations

from .error_handler import ErrorHandler

__all__ = ["get_error_handler"]


def get_error_handler() -> ErrorHandler:
    """A new default :class:`ErrorHandler`."""
    return ErrorHandler()
