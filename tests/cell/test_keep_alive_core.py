"""The master's KeepAlive bookkeeping (pure): held KeepAlives end at their
time or when woken, one per session, each answered once; lease batches
gather extensions and say when they are due."""

from __future__ import annotations

from typing import Any

import pytest

from chubbyfs.cell.keep_alive_core import HeldKeepAlives, LeaseBatch, PendingKeepAlive


def _ka(session_id: int, replies: list[tuple[int, Any, Any]], *, hold: bool = True) -> PendingKeepAlive:
    return PendingKeepAlive(session_id, hold=hold, acks=True, received_ms=0,
                            reply_to=lambda value, error: replies.append((session_id, value, error)))


def test_an_answer_is_given_once() -> None:
    replies: list = []
    ka = _ka(1, replies)
    assert not ka.answered
    assert ka.answer({"lease_ms": 5})
    assert not ka.answer(None, RuntimeError("late"))
    assert ka.answered and replies == [(1, {"lease_ms": 5}, None)]


def test_held_keep_alives_come_due_in_time_order_within_the_limit() -> None:
    held, replies = HeldKeepAlives(), []
    kas = {sid: _ka(sid, replies) for sid in (1, 2, 3)}
    for sid, until in ((1, 300), (2, 100), (3, 200)):
        assert held.hold(kas[sid], until) is None
    assert len(held) == 3 and held.next_deadline_ms() == 100
    assert held.due(99, 10) == []
    assert held.due(250, 1) == [kas[2]]  # the limit leaves 3 for the next round
    assert held.due(250, 10) == [kas[3]]
    assert held.next_deadline_ms() == 300 and len(held) == 1


def test_a_woken_keep_alive_leaves_and_its_old_deadline_is_skipped() -> None:
    held, replies = HeldKeepAlives(), []
    a, b = _ka(1, replies), _ka(2, replies)
    held.hold(a, 100)
    held.hold(b, 200)
    assert held.wake(1) is a
    assert held.wake(1) is None  # nothing parked for it any more
    assert held.next_deadline_ms() == 200
    assert held.due(1_000, 10) == [b]
    assert held.next_deadline_ms() is None and len(held) == 0


def test_a_second_keep_alive_of_a_session_displaces_the_first() -> None:
    held, replies = HeldKeepAlives(), []
    first, second = _ka(1, replies), _ka(1, replies)
    held.hold(first, 100)
    assert held.hold(second, 500) is first
    assert held.due(100, 10) == []  # the first's entry is stale
    assert held.due(500, 10) == [second]


def test_drain_takes_everything() -> None:
    held, replies = HeldKeepAlives(), []
    kas = [_ka(sid, replies) for sid in range(5)]
    for i, ka in enumerate(kas):
        held.hold(ka, 100 * i)
    held.wake(3)
    assert sorted(ka.session_id for ka in held.drain()) == [0, 1, 2, 4]
    assert len(held) == 0 and held.next_deadline_ms() is None


def test_a_lease_batch_opens_with_its_first_addition_and_is_due_a_window_later() -> None:
    batch, replies = LeaseBatch(window_ms=200, max_sessions=10), []
    assert batch.next_deadline_ms() is None and not batch.ready(10**9)
    a, b = _ka(1, replies), _ka(1, replies)
    batch.add(a, 5_000, now_ms=1_000)
    batch.add(b, 4_000, now_ms=1_100)  # an earlier end never lowers the session's
    assert batch.next_deadline_ms() == 1_200
    assert not batch.ready(1_199) and batch.ready(1_200)
    leases, renew, waiting = batch.take()
    assert leases == {1: 5_000} and renew == {} and waiting == [a, b]
    assert (a.lease_end_ms, b.lease_end_ms) == (5_000, 4_000)  # each checks its own
    assert batch.next_deadline_ms() is None and batch.take() == ({}, {}, [])


def test_a_full_lease_batch_is_due_at_once() -> None:
    batch, replies = LeaseBatch(window_ms=200, max_sessions=3), []
    for sid in range(3):
        batch.add(_ka(sid, replies), 5_000, now_ms=1_000)
    assert batch.next_deadline_ms() == 0 and batch.ready(1_000)


def test_renewals_alone_open_a_batch() -> None:
    batch = LeaseBatch(window_ms=50, max_sessions=3)
    batch.add_renewals({}, now_ms=0)
    assert batch.next_deadline_ms() is None
    batch.add_renewals({7: 1, 8: 1}, now_ms=10)
    assert batch.next_deadline_ms() == 60
    assert batch.take() == ({}, {7: 1, 8: 1}, [])


def test_a_lease_batch_needs_a_sane_shape() -> None:
    with pytest.raises(ValueError):
        LeaseBatch(window_ms=-1, max_sessions=3)
    with pytest.raises(ValueError):
        LeaseBatch(window_ms=10, max_sessions=0)


def test_a_keep_alive_is_abandoned_once_its_link_closes() -> None:
    class Link:
        closed = False

    link = Link()
    ka = PendingKeepAlive(1, hold=True, acks=True, received_ms=0, reply_to=lambda value, error: None, link=link)
    assert not ka.abandoned
    link.closed = True
    assert ka.abandoned
    assert not _ka(2, []).abandoned  # no link: someone always waits
