"""A client's connection to a cell: find the master, follow redirects, retry.

Any replica answers; a non-master answers `not_leader` with the master's
address, and the connection follows it. While no master is known it retries
with back-off until the call's deadline. The session protocol (KeepAlive,
cache, events) builds on this class rather than replacing it.
"""

from __future__ import annotations

import getpass
import itertools
import math
import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from chubbyfs._trio_util import single_errors
from chubbyfs.wire.framing import FrameError
from chubbyfs.wire.stream import FramedStream, open_framed, parse_address

# Short: while a master is being elected, a retry every 100 ms finds the new
# one within a tick of its election and costs the cell little.
MAX_BACKOFF_S = 0.25
DOWN_MEMORY_S = 1.0
RETRYABLE_ALWAYS = {"not_leader", "lost", "retry"}
# The request may or may not have taken effect; only idempotent calls retry.
AMBIGUOUS = {"timeout", "unavailable"}


class CellError(Exception):
    """The cell refused a request; `.code` says why (e.g. 'bad_request')."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class CellUnavailableError(CellError):
    """No master answered within the call's deadline."""


class _TimedOut(Exception):
    """The call's deadline passed."""


_TIMED_OUT: dict = {}  # a reply slot's value once its call's deadline has passed


class _ReplySlot:
    """Where one request's reply lands: the reply, None (the connection was
    lost) or _TIMED_OUT (put there by the deadline watchdog).

    A waiting call is also woken without a reply when the call that was
    reading the socket for everyone got its own: it then reads in turn."""

    __slots__ = ("_event", "reply", "answered", "deadline")

    def __init__(self, deadline: float) -> None:
        self._event = trio.Event()
        self.reply: dict | None = None
        self.answered = False
        self.deadline = deadline

    def put(self, reply: dict | None) -> None:
        if not self.answered:
            self.reply, self.answered = reply, True
            self._event.set()

    def nudge(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        if not self.answered:
            self._event = trio.Event()


class _Link:
    """One connection to one replica. Nobody reads it in the background: a
    call waiting for its reply reads the socket itself and hands every
    other call its reply (a reader task costs each call a second task
    switch)."""

    def __init__(self, address: str, framed: FramedStream) -> None:
        self.address = address
        self.framed = framed
        self.pending: dict[int, _ReplySlot] = {}
        self.reader: _ReplySlot | None = None  # the call reading the socket now
        self.alive = True
        # Replaced by a link to another replica: no new calls; closed once
        # the calls still waiting on it have their answers (a redirect must
        # not fail the other calls in flight, which may have been executed).
        self.retired = False

    def close_now(self) -> None:
        self.alive = False
        self.framed.stream.socket.close()  # wakes a call reading it (trio.ClosedResourceError)

    def lost(self) -> None:
        """The connection failed: every call waiting on it learns so."""
        if self.alive:
            self.close_now()
        for slot in self.pending.values():
            slot.put(None)

    def others_waiting(self, slot: _ReplySlot) -> bool:
        return any(not other.answered for other in self.pending.values() if other is not slot)


class CellConnection:
    def __init__(self, addresses: list[str], nursery: trio.Nursery, *, cell: str | None = None,
                 principal: str | None = None, call_timeout_s: float = 15.0) -> None:
        if not addresses:
            raise ValueError("a cell needs at least one replica address")
        for a in addresses:
            parse_address(a)
        self.addresses = list(addresses)
        self.cell = cell
        # The identity the cell enforces ACLs for; TLS client certificates
        # will vouch for it later, today the cell trusts what we say.
        self.principal = principal or getpass.getuser()
        self.call_timeout_s = call_timeout_s
        self._nursery = nursery
        self._link: _Link | None = None
        self._link_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._preferred: str | None = None
        self._rotation = itertools.cycle(random.sample(self.addresses, len(self.addresses)))
        self._down_until: dict[str, float] = {}
        # Deadlines: one watchdog task instead of a cancel scope per call (in
        # trio a cancel scope costs about a third of a call).
        self._watched: dict[_ReplySlot, _Link] = {}
        self._watchdog_started = False
        self._watchdog_scope: trio.CancelScope | None = None
        self._watchdog_until = math.inf

    @property
    def master_address(self) -> str | None:
        """The replica this connection currently talks to: the master, as far
        as the last redirect told us (None while no link is up)."""
        link = self._link
        return link.address if link is not None and link.alive else None

    async def call(self, op: str, *, idempotent: bool = True, timeout_s: float | None = None,
                   **args: Any) -> dict:
        """Send one request to the master and return its successful reply."""
        backoff = 0.01
        last = "no replica reachable"
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        deadline = trio.current_time() + timeout_s
        request = {"op": op, **args}
        try:
            while True:
                try:
                    link = await self._get_link(deadline)
                    reply = await self._roundtrip(link, request, deadline)
                except (OSError, EOFError, FrameError, trio.TooSlowError, trio.BrokenResourceError,
                        trio.ClosedResourceError, ConnectionRefusedError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    if getattr(exc, "sent", False) and not idempotent:
                        raise CellError("unknown_outcome", f"connection lost after sending: {last}") from None
                    self._preferred = None
                    backoff = await _back_off(backoff, deadline)
                    continue
                err = reply.get("error")
                if err is None:
                    return reply
                if err == "not_leader":
                    hint = reply.get("leader_address")
                    self._preferred = hint if self._down_until.get(hint, 0) <= trio.current_time() else None
                    if self._link is not None and self._link.address != self._preferred:
                        self._retire_link()
                    last = "replica is not the master" + ("" if self._preferred else "; no master known")
                    if not self._preferred:
                        backoff = await _back_off(backoff, deadline)
                    continue
                if err in RETRYABLE_ALWAYS or (err in AMBIGUOUS and idempotent):
                    last = f"{err}: {reply.get('message', '')}"
                    backoff = await _back_off(backoff, deadline)
                    continue
                if err in AMBIGUOUS:
                    raise CellError("unknown_outcome", reply.get("message", err))
                raise CellError(err, reply.get("message", ""))
        except _TimedOut:
            pass
        raise CellUnavailableError("unavailable", f"no master answered within {timeout_s}s ({last})")

    async def call_replica(self, address: str, op: str, *, timeout_s: float = 2.0, **args: Any) -> dict:
        """One request to one specific replica, no redirects (for status)."""
        host, port = parse_address(address)
        framed, _ = await open_framed(host, port, {"kind": "client", "cell": self.cell, "principal": self.principal}, connect_timeout_s=timeout_s)
        try:
            with trio.fail_after(timeout_s):
                await framed.send({"op": op, "id": 0, **args})
                return await framed.receive()
        finally:
            await trio.aclose_forcefully(framed.stream)

    async def _roundtrip(self, link: _Link, request: dict, deadline: float) -> dict:
        request_id = next(self._ids)
        request["id"] = request_id
        slot = _ReplySlot(deadline)
        link.pending[request_id] = slot
        self._watch(slot, link)
        try:
            # Straight into the socket when it takes it (no task switch).
            if not link.framed.send_nowait([request]):
                with trio.move_on_at(deadline):
                    await link.framed.flush()
            while not slot.answered:
                if not link.alive:
                    slot.put(None)
                elif link.reader is None:
                    await self._read_replies(link, slot)
                else:
                    await slot.wait()
            reply = slot.reply
            if reply is _TIMED_OUT:
                raise _TimedOut
            if reply is None:
                exc = EOFError(f"connection to {link.address} lost")
                exc.sent = True  # type: ignore[attr-defined]
                raise exc
            return reply
        finally:
            del link.pending[request_id]
            del self._watched[slot]
            if link.retired and not link.pending and link.alive:
                link.close_now()

    async def _read_replies(self, link: _Link, mine: _ReplySlot) -> None:
        """Read the link for every call on it until `mine` is answered, then
        leave the reading to another waiting call, if any."""
        link.reader = mine
        try:
            while not mine.answered:
                reply = await link.framed.receive()
                slot = link.pending.get(reply.get("id")) if isinstance(reply, dict) else None
                if slot is not None:
                    slot.put(reply)
        except (OSError, EOFError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._close_link(link)
        finally:
            link.reader = None
            for slot in link.pending.values():
                if slot is not mine and not slot.answered:
                    slot.nudge()
                    break

    # ---- deadlines ----------------------------------------------------------------------

    def _watch(self, slot: _ReplySlot, link: _Link) -> None:
        self._watched[slot] = link
        if not self._watchdog_started:
            self._watchdog_started = True
            self._nursery.start_soon(self._expire_calls)
        elif slot.deadline < self._watchdog_until and self._watchdog_scope is not None:
            self._watchdog_until = self._watchdog_scope.deadline = slot.deadline

    async def _expire_calls(self) -> None:
        """Answer every call whose deadline passed with _TIMED_OUT. A call
        reading the socket cannot be woken that way: if other calls still
        wait, a ping makes the replica write something, which wakes it and
        it passes the reading on; if none does, the link goes (a link with
        nothing on it for a whole timeout is not worth keeping)."""
        while True:
            now = trio.current_time()
            soonest = math.inf
            for slot, link in list(self._watched.items()):
                if slot.answered:
                    continue
                if slot.deadline > now:
                    soonest = min(soonest, slot.deadline)
                    continue
                slot.put(_TIMED_OUT)
                if link.reader is slot and link.others_waiting(slot) and link.alive:
                    if not link.framed.send_nowait([{"op": "ping", "id": next(self._ids)}]):
                        self._close_link(link)  # congested as well as unanswered
            # A reader that timed out with nobody else waiting: only closing wakes it.
            for link in set(self._watched.values()):
                reader = link.reader
                if reader is not None and reader.answered and not link.others_waiting(reader):
                    self._close_link(link)
            with trio.CancelScope(deadline=soonest) as scope:
                self._watchdog_scope, self._watchdog_until = scope, soonest
                await trio.sleep_forever()
            self._watchdog_scope = None

    def _close_link(self, link: _Link) -> None:
        link.lost()
        if self._link is link:
            self._link = None

    def _retire_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.retired = True
            if not link.pending:
                link.close_now()

    async def _get_link(self, deadline: float) -> _Link:
        link = self._link
        if link is not None and link.alive and self._preferred in (None, link.address):
            if link.reader is not None or not link.framed.peer_closed_nowait():
                return link  # the common case, without taking the lock
            # Closed by the replica while idle (a restart): do not send into it.
            self._close_link(link)
        with trio.move_on_at(deadline):
            return await self._connect()
        raise _TimedOut

    async def _connect(self) -> _Link:
        async with self._link_lock:
            link = self._link
            if link is not None and link.alive and (self._preferred in (None, link.address)):
                return link
            if link is not None:
                self._retire_link()
            address = self._preferred or self._next_candidate()
            self._preferred = None
            host, port = parse_address(address)
            try:
                framed, _ = await open_framed(host, port, {"kind": "client", "cell": self.cell,
                                                           "principal": self.principal})
            except (OSError, trio.TooSlowError):
                # Remember the refusal: during a failover the survivors keep
                # naming the dead master for a while, and following that hint
                # again would only cost another back-off.
                self._down_until[address] = trio.current_time() + DOWN_MEMORY_S
                raise
            link = self._link = _Link(address, framed)
            return link

    def _next_candidate(self) -> str:
        now = trio.current_time()
        for _ in range(len(self.addresses)):
            address = next(self._rotation)
            if self._down_until.get(address, 0) <= now:
                return address
        return next(self._rotation)

    async def reset(self) -> None:
        """Drop the current connection; the next call finds the master anew
        (e.g. after a KeepAlive went unanswered: the link may be half dead)."""
        await self._drop_link()

    async def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.alive = False
            await trio.aclose_forcefully(link.framed.stream)

    async def aclose(self) -> None:
        await self._drop_link()


async def _back_off(backoff_s: float, deadline: float) -> float:
    """Sleep about `backoff_s` (jittered, so that many clients that lost the
    master together do not retry in step) and return the next delay; past
    the deadline, _TimedOut."""
    await trio.sleep_until(min(deadline, trio.current_time() + backoff_s * random.uniform(0.5, 1.0)))
    if trio.current_time() >= deadline:
        raise _TimedOut
    return min(backoff_s * 2, MAX_BACKOFF_S)


@asynccontextmanager
async def open_cell_connection(addresses: list[str], **kwargs: Any) -> AsyncIterator[CellConnection]:
    with single_errors():
        async with trio.open_nursery() as nursery:
            conn = CellConnection(addresses, nursery, **kwargs)
            try:
                yield conn
            finally:
                await conn.aclose()
                nursery.cancel_scope.cancel()
