"""Frames over a trio stream (TCP today, `trio.SSLStream` when TLS is on)."""

from __future__ import annotations

import select
import socket
from collections import deque
from typing import Any

import trio

from .framing import MAX_FRAME_BYTES_DEFAULT, PROTOCOL_VERSION, FrameDecoder, check_handshake, encode_frame

RECEIVE_CHUNK_BYTES = 256 * 1024


class FramedStream:
    """Send and receive msgpack frames on a byte stream.

    Sends are serialized by a lock so that concurrent request handlers on one
    connection never interleave partial frames.

    Over plain TCP (`over_tcp`) frames can also be written without waiting
    (`send_nowait`): the hot paths (Raft messages, replies from the apply
    step) then cost no task switch and no scheduler round, which in Python is
    most of what a message costs. Whatever the kernel does not take at once is
    kept, in order, for the next `flush()` or send.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT, *,
                 raw_socket: socket.socket | None = None) -> None:
        self.stream = stream
        self._max = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: deque[Any] = deque()
        self._send_lock = trio.Lock()
        self._raw = raw_socket
        self._backlog = bytearray()  # written by send_nowait, not yet taken by the kernel
        self._poller: select.poll | None = None

    @classmethod
    def over_tcp(cls, stream: trio.SocketStream, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> FramedStream:
        """Frames on a TCP stream, able to `send_nowait`. Takes the stream's
        socket over: use only the returned object's `stream` afterwards."""
        raw = socket.socket(fileno=stream.socket.detach())
        raw.setblocking(False)
        return cls(trio.SocketStream(trio.socket.from_stdlib_socket(raw)), max_frame_bytes, raw_socket=raw)

    @property
    def has_buffered_frames(self) -> bool:
        """Whether `receive` has frames ready without reading the socket."""
        return bool(self._ready)

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog)

    @property
    def busy(self) -> bool:
        """Bytes are waiting for the peer (kept back, or a send in progress):
        a writer that must bound its memory holds further frames itself."""
        return bool(self._backlog) or self._send_lock.locked()

    def peer_closed_nowait(self) -> bool:
        """Whether the peer has closed the connection (or reset it), as far
        as the socket already knows; unread frames stay unread. Only for a
        stream nobody is reading: over TCP one cheap system call; other
        streams cannot tell and say False."""
        if self._raw is None:
            return False
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._raw, select.POLLIN | select.POLLRDHUP)
        if not self._poller.poll(0):
            return False  # the common case, without an exception
        try:
            return self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def send_nowait(self, objs: list[Any]) -> bool:
        """Write frames now, as far as the kernel takes them without waiting.

        True when all of it is on the wire; False when bytes were kept back
        (a full socket buffer, a send in progress, a stream without a raw
        socket, or an error that the next `flush()` will raise): then the
        caller must arrange a `flush()`."""
        data = b"".join([encode_frame(o, self._max) for o in objs])
        if self._backlog or self._raw is None or self._send_lock.locked():
            self._backlog += data
            return False
        try:
            sent = self._raw.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the stream's own send_all reports it in flush()
        if sent < len(data):
            self._backlog += data[sent:]
            return False
        return True

    async def flush(self) -> None:
        """Write what `send_nowait` kept back."""
        await self._send_bytes(b"")

    async def send(self, obj: Any) -> None:
        await self._send_bytes(encode_frame(obj, self._max))

    async def send_many(self, objs: list[Any]) -> None:
        """One write for many frames."""
        await self._send_bytes(b"".join([encode_frame(o, self._max) for o in objs]))

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            # Frames kept back by send_nowait go first: they were sent first.
            if self._backlog:
                data = bytes(self._backlog) + data
                self._backlog.clear()
            while data:
                await self.stream.send_all(data)
                # send_nowait calls made while we waited queued behind us.
                data = bytes(self._backlog)
                self._backlog.clear()

    async def receive(self) -> Any:
        """The next frame; EOFError when the peer closed cleanly."""
        while not self._ready:
            chunk = await self._receive_chunk()
            if not chunk:
                if self._decoder.pending_bytes():
                    raise EOFError("connection closed in the middle of a frame")
                raise EOFError("connection closed")
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()

    async def _receive_chunk(self) -> bytes:
        if self._raw is None:
            return await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
        # Wait first, then read: with one request in flight per peer the
        # socket is nearly always empty when we come back, and a read that
        # fails with EAGAIN (what receive_some tries first) costs a system
        # call and an exception for nothing.
        while True:
            if self._raw.fileno() < 0:
                # Closed by another task (a redirect, a reset): what trio's
                # own receive would say, rather than epoll's ValueError.
                raise trio.ClosedResourceError("the connection was closed")
            await trio.lowlevel.wait_readable(self._raw)
            try:
                return self._raw.recv(RECEIVE_CHUNK_BYTES)
            except (BlockingIOError, InterruptedError):
                continue

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
        framed = FramedStream.over_tcp(await trio.open_tcp_stream(host, port), max_frame_bytes)
        stream = framed.stream
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
