"""Misbehaving clients and peers get their connection dropped; the replica
keeps serving and loses nothing."""

import socket
import struct

import pytest
import trio

from chubbyfs.client.connection import open_cell_connection
from chubbyfs.wire.framing import encode_frame

pytestmark = pytest.mark.e2e


def _connect(address):
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _reset(sock):
    # SO_LINGER 0: close with a TCP RST, as a crashed client would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_garbage_resets_and_oversized_frames_do_not_hurt_the_replica(make_cell):
    cell = make_cell(3)
    cell.start_all()
    async with open_cell_connection(list(cell.addresses.values()), cell=cell.name) as conn:
        leader = await cell.wait_for_leader(conn)
        await conn.call("put", key="before", value=b"1")
        address = cell.addresses[leader]
        attacks = [
            b"\x00\x00\x00\x05hello",  # not msgpack
            b"\xff\xff\xff\xff",  # a 4 GiB frame announced
            encode_frame({"v": 99, "kind": "client"}),  # unknown protocol version
            encode_frame({"v": 1, "kind": "client", "cell": "other"}),  # wrong cell
            encode_frame({"v": 1, "kind": "raft", "from": 9}) + b"\x00\x00\x00\x03abc",  # bad raft frame
            encode_frame({"v": 1, "kind": "client"}) + encode_frame(["not", "a", "map"]) + b"\x00\x00\x10",
        ]
        for payload in attacks:
            for reset in (False, True):
                sock = await trio.to_thread.run_sync(_connect, address)
                sock.sendall(payload)
                if reset:
                    _reset(sock)
                else:
                    sock.close()
        # A client that resets mid-request.
        sock = await trio.to_thread.run_sync(_connect, address)
        sock.sendall(encode_frame({"v": 1, "kind": "client"}) + encode_frame({"op": "get", "key": "before", "id": 1}))
        _reset(sock)
        await trio.sleep(0.5)
        assert all(cell.running(r) for r in cell.addresses), "a bad connection took a replica down"
        assert (await conn.call("get", key="before"))["value"] == b"1"
        await conn.call("put", key="after", value=b"2")
        assert (await cell.status(conn, leader))["role"] == "leader"
