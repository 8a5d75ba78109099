"""FramedStream over real loopback TCP: frames written without waiting
(`send_nowait`), what the kernel does not take kept in order for `flush`,
and a connection closed under a waiting reader."""

from __future__ import annotations

import functools

import pytest
import trio

from chubbyfs.wire.stream import FramedStream


async def _pair(nursery: trio.Nursery) -> tuple[FramedStream, FramedStream]:
    accepted: list[FramedStream] = []
    got = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(FramedStream.over_tcp(stream))
        got.set()
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = FramedStream.over_tcp(await trio.open_tcp_stream("127.0.0.1", port))
    await got.wait()
    return client, accepted[0]


async def test_send_nowait_writes_in_order_and_keeps_what_the_kernel_refuses() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery)
        assert client.send_nowait([{"n": 0}, {"n": 1}])
        big = b"x" * (1 << 20)
        # Far more than the socket buffers take without a reader: some is kept back.
        sent_all = [client.send_nowait([{"n": i, "pad": big}]) for i in range(2, 40)]
        assert not all(sent_all) and client.has_backlog
        assert client.send_nowait([{"n": 40}]) is False  # queued behind the backlog, never ahead of it

        async def drain() -> None:
            await client.flush()

        nursery.start_soon(drain)
        seen = [(await server.receive())["n"] for _ in range(41)]
        assert seen == list(range(41))
        assert not client.has_backlog
        nursery.cancel_scope.cancel()


async def test_a_reader_learns_that_its_connection_was_closed() -> None:
    async with trio.open_nursery() as nursery:
        client, _server = await _pair(nursery)
        async def close_soon() -> None:
            await trio.sleep(0.05)
            await trio.aclose_forcefully(client.stream)

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await client.receive()
        # And once closed, at once (not epoll's ValueError for fd -1).
        with pytest.raises(trio.ClosedResourceError):
            await client.receive()
        assert client.send_nowait([{"late": True}]) is False  # kept; flush would report the closed stream
        with pytest.raises(trio.ClosedResourceError):
            await client.flush()
        nursery.cancel_scope.cancel()
