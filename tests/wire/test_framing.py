import pytest
from hypothesis import given, strategies as st

from chubbyfs.raft.types import ConfState, Entry, EntryType, Message, MessageType, SnapshotMeta
from chubbyfs.wire.framing import FrameDecoder, FrameError, check_handshake, encode_frame
from chubbyfs.wire.raft_codec import message_from_wire, message_to_wire


def test_frames_round_trip_byte_at_a_time():
    objs = [{"op": "put", "key": "k", "value": b"\x00" * 300}, [1, 2, 3], "x" * 70_000]
    data = b"".join(encode_frame(o) for o in objs)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == objs
    assert dec.pending_bytes() == 0


def test_oversized_frame_is_refused_before_buffering():
    dec = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(FrameError, match="limit is 100"):
        dec.feed((10_000).to_bytes(4, "big") + b"x")
    with pytest.raises(FrameError):
        encode_frame(b"x" * 200, max_frame_bytes=100)


def test_garbage_payload_is_a_frame_error():
    dec = FrameDecoder()
    with pytest.raises(FrameError, match="undecodable"):
        dec.feed((1).to_bytes(4, "big") + b"\xc1")  # 0xc1 is never valid msgpack


def test_handshake_checks_version_and_kind():
    assert check_handshake({"v": 1, "kind": "raft"}, "raft")["kind"] == "raft"
    with pytest.raises(FrameError, match="version"):
        check_handshake({"v": 99, "kind": "raft"}, "raft")
    with pytest.raises(FrameError, match="expected"):
        check_handshake({"v": 1, "kind": "client"}, "raft")
    with pytest.raises(FrameError, match="not a map"):
        check_handshake([1], "raft")


@given(st.binary(max_size=64))
def test_decoder_never_crashes_on_garbage(data):
    dec = FrameDecoder(max_frame_bytes=1 << 16)
    try:
        dec.feed(data)
    except FrameError:
        pass


def test_raft_message_round_trip():
    m = Message(
        type=MessageType.SNAPSHOT, to=2, frm=1, term=7, log_term=6, index=42,
        entries=(Entry(7, 43, EntryType.NORMAL, b"a"), Entry(7, 44, EntryType.CONF_CHANGE, b"b")),
        commit=40, reject=True, reject_hint=12, context=b"ctx", lease_tick=99,
        snapshot_meta=SnapshotMeta(index=30, term=5, conf=ConfState((1, 2, 3))),
        snapshot_offset=1024, snapshot_data=b"chunk", snapshot_done=True,
    )
    dec = FrameDecoder()
    (obj,) = dec.feed(encode_frame(message_to_wire(m)))
    assert message_from_wire(obj) == m


def test_malformed_raft_message_is_a_frame_error():
    with pytest.raises(FrameError):
        message_from_wire([1, 2])
    with pytest.raises(FrameError):
        message_from_wire([999] + [0] * 15)
