"""Cell error codes -> errno, in one table (documented in docs/mount.md).

Pure: no I/O.
"""

from __future__ import annotations

import errno

# Every code the cell or the client library can answer. Anything missing maps
# to EIO and is logged by the caller, so a new code is visible, not silent.
ERRNO_OF_CODE: dict[str, int] = {
    "not_found": errno.ENOENT,
    "exists": errno.EEXIST,
    "not_empty": errno.ENOTEMPTY,
    "permission_denied": errno.EACCES,
    "stale_handle": errno.ESTALE,
    "bad_handle": errno.ESTALE,
    "bad_sequencer": errno.ESTALE,  # a bound sequencer went stale
    "invalid_name": errno.EINVAL,
    "invalid_argument": errno.EINVAL,
    "too_large": errno.EFBIG,
    # The file changed since this open file read it (or since the armed
    # user.chubby.cas generation): "try again" with fresh contents.
    "cas_mismatch": errno.EAGAIN,
    "lock_held": errno.EWOULDBLOCK,
    "lock_not_held": errno.ENOLCK,
    "not_a_directory": errno.ENOTDIR,
    "is_a_directory": errno.EISDIR,
    "session_expired": errno.EIO,
    # Handles per session and waiters per lock are per-process-like limits;
    # children per directory and sessions are the cell's space.
    "limit_exceeded": errno.ENOSPC,
    "unavailable": errno.EIO,
    "unknown_outcome": errno.EIO,
    # A numbered call the cell forgot (more calls in flight than it keeps
    # answers for): its outcome is unknown, as for unknown_outcome.
    "stale_request": errno.EIO,
    "cancelled": errno.EINTR,
    "not_initialized": errno.EIO,
    "bad_request": errno.EIO,
    "malformed_command": errno.EIO,
}

# limit_exceeded is ENOSPC except for "too many handles", which is EMFILE.
_HANDLE_LIMIT_WORDS = ("handle",)

MAX_NAME_BYTES = 255


def errno_for(code: str, message: str = "") -> int:
    """The errno a cell error code becomes at the system-call interface."""
    if code == "limit_exceeded" and any(w in message.lower() for w in _HANDLE_LIMIT_WORDS):
        return errno.EMFILE
    if code == "invalid_name" and "long" in message.lower():
        return errno.ENAMETOOLONG
    return ERRNO_OF_CODE.get(code, errno.EIO)


def check_name(name: bytes) -> str:
    """A FUSE name as a Chubby path component; raises `BadName` as the cell would
    refuse it (checked locally so a refused name costs no round trip)."""
    if len(name) > MAX_NAME_BYTES:
        raise BadName(errno.ENAMETOOLONG, "name longer than 255 bytes")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BadName(errno.EINVAL, "names must be UTF-8") from None
    if not text or text in (".", "..") or "/" in text or not text.isprintable():
        raise BadName(errno.EINVAL, f"{text!r} is not a valid Chubby name")
    return text


class BadName(Exception):
    """A name the cell would refuse; `.errno` says how to refuse it locally."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
