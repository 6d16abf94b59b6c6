"""ErrorHandler: writes a worker's uncaught exception to ``TORCHELASTIC_ERROR_FILE`` as JSON
(defined in :mod:`fastspawn._elastic_child`, which workers import without the launcher)."""

from ..._elastic_child import ErrorHandler

__all__ = ["ErrorHandler"]
