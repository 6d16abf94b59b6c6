"""The error handler used by :func:`fastspawn.elastic.errors.record` by default."""

from ..._elastic_child import get_error_handler

__all__ = ["get_error_handler"]
