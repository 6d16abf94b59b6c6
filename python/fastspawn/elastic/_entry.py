"""What a function rank runs in the child: ``record(entrypoint)(*args[local_rank])``.

Kept free of parent-side imports: children load only this and the error recorder.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from .errors import record


class RankCall:
    """The call each rank makes; its ``__module__`` is the entrypoint's, so that the warm
    zygote imports the user's module once before forking (instead of once per child)."""

    def __init__(self, entrypoint: Callable[..., Any], args: Dict[int, Tuple[Any, ...]]) -> None:
        self.entrypoint = entrypoint
        self.args = args
        module = getattr(entrypoint, "__module__", None)
        if isinstance(module, str):
            self.__module__ = module

    def __call__(self, local_rank: int) -> Any:
        return record(self.entrypoint)(*self.args[local_rank])
