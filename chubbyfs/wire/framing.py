"""Length-prefixed msgpack frames: the byte format of every chubbyfs connection.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Both directions bound the frame size, so a confused or hostile peer can make
us drop its connection but never allocate without limit. Pure code: the trio
streams that carry frames live in `chubbyfs.wire.stream`.

Every connection starts with one handshake frame from the connecting side,
`{"v": PROTOCOL_VERSION, "kind": ..., ...}`; the acceptor answers with its
own handshake or an error and closes. The version lets a later release refuse
or adapt to an older peer instead of misreading its frames.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES_DEFAULT = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; drop the connection."""


# One encoder for the process: msgpack.packb would build a new one per call,
# and every message and reply passes through here.
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    return _PACKER.pack(obj)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {exc}") from None


def encode_frame(obj: Any, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> bytes:
    payload = pack(obj)
    if len(payload) > max_frame_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds limit {max_frame_bytes}")
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take whole frames out."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        frames: list[Any] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > self.max_frame_bytes:
                raise FrameError(f"peer announced a {length}-byte frame; limit is {self.max_frame_bytes}")
            if len(buf) - pos - 4 < length:
                break
            frames.append(unpack(bytes(buf[pos + 4 : pos + 4 + length])))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return frames

    def pending_bytes(self) -> int:
        return len(self._buf)


def check_handshake(obj: Any, kind: str) -> dict:
    """Validate a peer's handshake frame; raise FrameError with a clear reason."""
    if not isinstance(obj, dict):
        raise FrameError("handshake is not a map")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"unsupported protocol version {version!r}; this build speaks {PROTOCOL_VERSION}")
    if obj.get("kind") != kind:
        raise FrameError(f"expected a {kind!r} connection, got {obj.get('kind')!r}")
    return obj
