"""The contents of one open file: read and committed whole, as in Chubby.

A reader sees one version from start to end: a read at offset 0 of a clean
file asks for fresh contents, later offsets continue from that snapshot.
Writes go to a private buffer that the daemon commits with one SetContents
on flush/fsync/close. A buffer derived from contents it loaded (a write
without truncating first: an append, an edit in place) is committed with
compare-and-swap on the generation it loaded, so a concurrent update is
reported (EAGAIN) instead of silently lost; a buffer that started empty
(O_TRUNC, ftruncate to 0) is a plain overwrite.

Pure: no I/O. The daemon does the fetching and the committing.
"""

from __future__ import annotations

from dataclasses import dataclass


class NeedContents(Exception):
    """The operation needs the file's current contents: fetch, `load`, retry."""


@dataclass(frozen=True, slots=True)
class Commit:
    contents: bytes
    expected_generation: int | None
    too_large: bool  # the buffer outgrew the limit: refuse without asking the cell


class FileBuffer:
    def __init__(self, *, append: bool, max_bytes: int, cas_generation: int | None = None) -> None:
        self.append = append
        self.max_bytes = max_bytes
        self.base: bytes | None = None
        self.base_generation: int | None = None
        self.data: bytearray | None = None  # not None = dirty
        self.too_large = False
        # Bytes were written since the buffer was made. A buffer that was
        # only truncated (O_TRUNC) is not committed by a flush: shells open,
        # dup2 and close the original descriptor before anything is written,
        # and committing then would show readers an empty file.
        self.written = False
        # Explicit CAS armed through user.chubby.cas; outlives truncation.
        self.explicit_cas = cas_generation
        self.implicit_cas: int | None = None

    @property
    def dirty(self) -> bool:
        return self.data is not None

    @property
    def flush_pending(self) -> bool:
        """A flush (one of possibly several closes) would commit something."""
        return self.data is not None and self.written

    def load(self, contents: bytes, generation: int) -> None:
        """Fresh contents from the cell (only meaningful while clean)."""
        self.base, self.base_generation = contents, generation

    def forget_snapshot(self) -> None:
        """The next read from offset 0 must fetch again."""
        if not self.dirty:
            self.base = self.base_generation = None

    def read(self, offset: int, size: int) -> bytes:
        if self.data is not None:
            return bytes(self.data[offset:offset + size])
        if self.base is None:
            raise NeedContents()
        return self.base[offset:offset + size]

    def _ensure_buffer(self) -> bytearray:
        if self.data is None:
            if self.base is None:
                raise NeedContents()
            self.data = bytearray(self.base)
            self.implicit_cas = self.base_generation
        return self.data

    def write(self, offset: int, chunk: bytes) -> int:
        data = self._ensure_buffer()
        self.written = True
        if self.append:
            offset = len(data)
        end = offset + len(chunk)
        if end > self.max_bytes:
            # Keep memory bounded; the commit reports EFBIG and stores nothing.
            self.too_large = True
            return len(chunk)
        if offset > len(data):
            data.extend(b"\0" * (offset - len(data)))
        data[offset:end] = chunk
        return len(chunk)

    def truncate(self, size: int) -> None:
        if size == 0:
            # Nothing of the old contents survives: a plain overwrite.
            self.data = bytearray()
            self.implicit_cas = None
            self.too_large = False
            return
        data = self._ensure_buffer()
        self.written = True
        if size > self.max_bytes:
            self.too_large = True
            return
        del data[size:]
        data.extend(b"\0" * (size - len(data)))

    def size(self) -> int | None:
        if self.data is not None:
            return len(self.data)
        return None if self.base is None else len(self.base)

    def pending_commit(self, *, final: bool = True) -> Commit | None:
        """What to send, or None when clean. `final=False` (a flush, which may
        be one of several closes) skips a buffer that was only truncated."""
        if self.data is None or (not final and not self.flush_pending):
            return None
        expected = self.explicit_cas if self.explicit_cas is not None else self.implicit_cas
        return Commit(bytes(self.data), expected, self.too_large)

    def committed(self, contents: bytes, generation: int) -> None:
        self.data = None
        self.too_large = self.written = False
        self.implicit_cas = None
        self.explicit_cas = None  # an armed CAS applies to one commit
        self.base, self.base_generation = contents, generation

    def discard(self) -> None:
        """A failed commit: drop the buffer (the error was reported once)."""
        self.data = None
        self.too_large = self.written = False
        self.implicit_cas = None
        self.explicit_cas = None
        self.base = self.base_generation = None

    def assert_invariants(self) -> None:
        assert (self.base is None) == (self.base_generation is None)
        if self.data is not None:
            assert len(self.data) <= self.max_bytes
        else:
            assert not self.too_large and not self.written and self.implicit_cas is None
