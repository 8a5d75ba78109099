"""Frames over a trio stream (TCP today, `trio.SSLStream` when TLS is on)."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from .framing import MAX_FRAME_BYTES_DEFAULT, PROTOCOL_VERSION, FrameDecoder, check_handshake, encode_frame

RECEIVE_CHUNK_BYTES = 256 * 1024


class FramedStream:
    """Send and receive msgpack frames on a byte stream.

    Sends are serialized by a lock so that concurrent request handlers on one
    connection never interleave partial frames.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        self.stream = stream
        self._max = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: deque[Any] = deque()
        self._send_lock = trio.Lock()

    async def send(self, obj: Any) -> None:
        data = encode_frame(obj, self._max)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_many(self, objs: list[Any]) -> None:
        """One write for many frames: the replication hot path."""
        data = b"".join(encode_frame(o, self._max) for o in objs)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> Any:
        """The next frame; EOFError when the peer closed cleanly."""
        while not self._ready:
            chunk = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
            if not chunk:
                if self._decoder.pending_bytes():
                    raise EOFError("connection closed in the middle of a frame")
                raise EOFError("connection closed")
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()

    def set_max_frame_bytes(self, max_frame_bytes: int) -> None:
        """Tighten the limit once the handshake says what kind of peer this is."""
        self._max = max_frame_bytes
        self._decoder.max_frame_bytes = max_frame_bytes

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_framed(host: str, port: int, handshake: dict, *, connect_timeout_s: float = 2.0,
                      max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> tuple[FramedStream, dict]:
    """Connect, send our handshake, and read the acceptor's."""
    with trio.fail_after(connect_timeout_s):
        stream = await trio.open_tcp_stream(host, port)
        framed = FramedStream(stream, max_frame_bytes)
        try:
            await framed.send({"v": PROTOCOL_VERSION, **handshake})
            reply = check_handshake(await framed.receive(), handshake["kind"])
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    if "error" in reply:
        await trio.aclose_forcefully(stream)
        raise ConnectionRefusedError(reply["error"])
    return framed, reply


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
