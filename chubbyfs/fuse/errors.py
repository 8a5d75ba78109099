"""Exceptions of the FUSE layer, split by whose fault it is.

* `FuseError`: a filesystem operation's answer "this failed with errno N";
  the session turns it into an error reply. Raised by `Operations` methods.
* `FuseDecodeError`: the kernel sent bytes we cannot accept (truncated,
  malformed, unknown opcode). The session logs it, answers the request if it
  can still name it, and keeps serving.
* `FuseEncodeError`: we tried to build a reply the kernel would reject (a bug
  in a filesystem or in this layer), caught before it reaches the device.

Pure: no I/O.
"""

from __future__ import annotations

import errno as _errno

from . import abi


class FuseError(Exception):
    """An operation failed; the request is answered with `-errno`."""

    def __init__(self, errno: int, message: str = "") -> None:
        if not 0 < errno <= abi.MAX_ERRNO:
            raise ValueError(f"errno must be in 1..{abi.MAX_ERRNO}, got {errno}")
        self.errno = errno
        text = message or _errno.errorcode.get(errno, str(errno))
        super().__init__(f"[errno {errno}] {text}")


class FuseDecodeError(ValueError):
    """A request from the kernel could not be decoded.

    `unique` and `opcode` are set when the header itself was readable, so the
    session can still answer the request with `errno` (EIO for malformed
    bodies, ENOSYS for opcodes we do not serve).
    """

    def __init__(
        self,
        message: str,
        *,
        unique: int | None = None,
        opcode: int | None = None,
        errno: int = _errno.EIO,
    ) -> None:
        super().__init__(message)
        self.unique = unique
        self.opcode = opcode
        self.errno = errno


class FuseEncodeError(ValueError):
    """A reply or notification could not be encoded as the kernel requires."""
