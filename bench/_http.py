"""A minimal HTTP/1.1 keep-alive client on trio streams, for etcd's JSON gateway.

One connection carries one request at a time (HTTP/1.1 without pipelining),
so a benchmark client owns one `HttpConnection`. Only what the gateway needs:
POST with a JSON body, responses framed by Content-Length or chunked.
"""

from __future__ import annotations

import json
from typing import Any

import trio


class HttpError(Exception):
    """A non-200 answer or a malformed response."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class HttpConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()

    async def post_json(self, path: str, payload: Any) -> Any:
        """POST `payload` as JSON and return the decoded JSON answer.

        A broken connection raises OSError/EOFError/trio.BrokenResourceError and
        is dropped; the next call reconnects.
        """
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._buffer.clear()
        try:
            await self._stream.send_all(head + body)
            status, answer = await self._read_response()
        except BaseException:
            await self.aclose()
            raise
        if status != 200:
            raise HttpError(status, answer)
        return json.loads(answer)

    async def _read_response(self) -> tuple[int, bytes]:
        header = await self._read_until(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HttpError(0, header)
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
                chunk = await self._read_exact(size + 2)  # data and its CRLF
                if size == 0:
                    break
                body += chunk[:-2]
            # A zero chunk may be followed by trailers; we sent no TE so expect none.
            answer = bytes(body)
        else:
            answer = await self._read_exact(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, answer

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise EOFError(f"{self.host}:{self.port} closed the connection")
        self._buffer += data

    async def _read_until(self, delimiter: bytes) -> bytes:
        while True:
            at = self._buffer.find(delimiter)
            if at >= 0:
                out = bytes(self._buffer[:at])
                del self._buffer[:at + len(delimiter)]
                return out
            await self._fill()

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buffer.clear()
        if stream is not None:
            await trio.aclose_forcefully(stream)
