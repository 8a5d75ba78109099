"""Small trio helpers shared by the shells."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_errors() -> Iterator[None]:
    """Let a lone exception out of a nursery as itself rather than wrapped in
    an ExceptionGroup, so callers can `except CellError` as usual. Used where
    the nursery's background tasks never fail on their own, so a lone error
    is always the caller's."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
