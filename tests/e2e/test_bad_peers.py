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


async def test_a_client_that_never_reads_its_replies_is_cut_off(make_cell):
    """It floods requests without reading: once more than the replica's bound
    waits for it, the replica drops the connection, and keeps serving."""
    cell = make_cell(3)
    cell.start_all()
    async with open_cell_connection(list(cell.addresses.values()), cell=cell.name) as conn:
        leader = await cell.wait_for_leader(conn)
        sock = _connect(cell.addresses[leader])
        sock.sendall(encode_frame({"v": 1, "kind": "client", "cell": cell.name}))
        request = encode_frame({"op": "status", "id": 1}) * 2_000  # each answered with ~1 KB
        sock.settimeout(1.0)
        cut_off = False
        with trio.fail_after(60):
            while not cut_off:
                try:
                    sock.sendall(request)
                except TimeoutError:
                    await trio.sleep(0)  # the replica is busy answering; keep pushing
                except (ConnectionResetError, BrokenPipeError):
                    cut_off = True
        sock.close()
        assert cell.running(leader)
        await conn.call("put", key="after", value=b"2")
        assert "reads none of its replies" in cell.log_text(leader)
