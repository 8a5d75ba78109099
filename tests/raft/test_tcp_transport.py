"""The replica-to-replica transport on real loopback TCP: messages reach a
reading peer; a peer that accepts but never reads costs at most the bounded
queue (plus what the kernel buffers), never unbounded memory, and is reported
unreachable when messages are dropped."""

from __future__ import annotations

import functools

import trio

from chubbyfs.raft import Entry, Message, MessageType
from chubbyfs.raft.tcp_transport import TcpTransport
from chubbyfs.wire.framing import PROTOCOL_VERSION
from chubbyfs.wire.stream import FramedStream


def _append(i: int, size: int = 0) -> Message:
    return Message(type=MessageType.APPEND, to=2, frm=1, term=1, index=i,
                   entries=(Entry(term=1, index=i + 1, data=b"x" * size),))


async def _peer(nursery: trio.Nursery, *, reads: bool, got: list[Message]) -> str:
    """A listener that answers the handshake and then reads (or not)."""

    async def handler(stream: trio.SocketStream) -> None:
        framed = FramedStream.over_tcp(stream)
        hello = await framed.receive()
        await framed.send({"v": PROTOCOL_VERSION, "kind": hello["kind"], "id": 2, "cell": "t"})
        if not reads:
            await trio.sleep_forever()
        receiver = TcpTransport(2, "t", {})
        receiver.deliver = got.extend
        await receiver.serve_inbound(framed, hello)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_messages_reach_a_reading_peer_in_order() -> None:
    got: list[Message] = []
    async with trio.open_nursery() as nursery:
        address = await _peer(nursery, reads=True, got=got)
        transport = TcpTransport(1, "t", {1: "127.0.0.1:1", 2: address})
        nursery.start_soon(transport.run)
        for i in range(100):
            transport.send(_append(i))
            transport.flush()
            if i % 10 == 0:
                await trio.sleep(0.01)
        with trio.fail_after(10):
            while len(got) < 100:
                await trio.sleep(0.01)
        assert [m.index for m in got] == list(range(100))
        nursery.cancel_scope.cancel()


async def test_a_peer_that_does_not_read_costs_a_bounded_queue() -> None:
    unreachable: list[int] = []
    async with trio.open_nursery() as nursery:
        address = await _peer(nursery, reads=False, got=[])
        transport = TcpTransport(1, "t", {1: "127.0.0.1:1", 2: address}, queue_limit=64,
                                 on_unreachable=unreachable.append)
        nursery.start_soon(transport.run)
        await trio.sleep(0.2)  # connected
        for i in range(2_000):  # ~130 MB offered, far past the socket buffers
            transport.send(_append(i, size=64 * 1024))
            transport.flush()
            if i % 50 == 0:
                await trio.sleep(0)
        stats = transport.statistics()[2]
        assert stats["queued"] <= 64
        assert stats["dropped"] > 0 and unreachable and set(unreachable) == {2}
        nursery.cancel_scope.cancel()
