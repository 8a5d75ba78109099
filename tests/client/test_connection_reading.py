"""CellConnection against a scripted replica on 127.0.0.1: calls read their
own replies (no reader task), deadlines come from one watchdog task (no
cancel scope per call), and neither loses a reply or a timeout."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import trio

from chubbyfs.client.connection import CellUnavailableError, open_cell_connection
from chubbyfs.wire.framing import PROTOCOL_VERSION
from chubbyfs.wire.stream import FramedStream


class ScriptedReplica:
    """Answers each request as `answer(request)` says: a reply, or None to
    hold it until `release(op)`. Records what it saw."""

    def __init__(self, answer: Callable[[dict], dict | None]) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        self.connections = 0
        self.closed_connections = 0
        self.held: list[tuple[FramedStream, dict]] = []
        self.port = 0
        self.open: set[FramedStream] = set()
        self.current: FramedStream | None = None  # the connection of the request being answered

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        framed = FramedStream.over_tcp(stream)
        self.connections += 1
        self.open.add(framed)
        try:
            hello = await framed.receive()
            await framed.send({"v": PROTOCOL_VERSION, "kind": hello["kind"]})
            while True:
                request = await framed.receive()
                self.requests.append(request)
                self.current = framed
                reply = self.answer(request)
                if reply is None:
                    self.held.append((framed, request))
                elif reply != "later":  # the test answers it itself
                    await framed.send({**reply, "id": request["id"]})
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.open.discard(framed)
            self.closed_connections += 1
            await trio.aclose_forcefully(framed.stream)

    async def close_all(self) -> None:
        for framed in list(self.open):
            await trio.aclose_forcefully(framed.stream)

    async def release(self, op: str) -> None:
        for framed, request in [h for h in self.held if h[1]["op"] == op]:
            self.held.remove((framed, request))
            await framed.send({"ok": True, "op": op, "id": request["id"]})

    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]


def _hold(*held_ops: str) -> Callable[[dict], Any]:
    return lambda request: None if request["op"] in held_ops else {"ok": True, "op": request["op"]}


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


async def test_a_lone_call_that_gets_no_answer_times_out_and_its_link_goes() -> None:
    replica = ScriptedReplica(_hold("slow"))
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:
            with trio.fail_after(5):
                with pytest.raises(CellUnavailableError):
                    await conn.call("slow", timeout_s=0.2)
            # Nothing came back for a whole timeout: that connection is dropped.
            await _until(lambda: replica.closed_connections == 1)
            assert (await conn.call("fast"))["op"] == "fast"
            assert replica.connections == 2
        nursery.cancel_scope.cancel()


async def _short_and_long_call(first: str) -> tuple[ScriptedReplica, dict[str, Any], dict[str, Any]]:
    """A call with a 0.2 s timeout and one with 30 s on one connection, held
    by the replica; `first` is sent first, so it reads the socket. Returns
    the replica, the results and what was seen when the short call timed
    out (before the long one is answered)."""
    replica = ScriptedReplica(_hold("short", "long"))
    results: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:

            async def call(op: str) -> None:
                try:
                    results[op] = await conn.call(op, timeout_s=0.2 if op == "short" else 30)
                except CellUnavailableError as exc:
                    results[op] = exc

            async with trio.open_nursery() as calls:
                calls.start_soon(call, first)
                await _until(lambda: first in replica.ops())
                calls.start_soon(call, "long" if first == "short" else "short")
                await _until(lambda: isinstance(results.get("short"), CellUnavailableError))
                seen.update(ops=replica.ops(), closed=replica.closed_connections, long_done="long" in results)
                await replica.release("long")
        nursery.cancel_scope.cancel()
    return replica, results, seen


async def test_the_reading_call_times_out_while_another_still_waits() -> None:
    replica, results, seen = await _short_and_long_call(first="short")
    # It was woken by a ping, not by closing the link the other call waits on.
    assert "ping" in seen["ops"] and seen["closed"] == 0 and not seen["long_done"]
    assert results["long"]["op"] == "long"
    assert replica.connections == 1


async def test_a_waiting_call_times_out_while_the_reading_one_goes_on() -> None:
    replica, results, seen = await _short_and_long_call(first="long")
    assert "ping" not in seen["ops"] and seen["closed"] == 0 and not seen["long_done"]
    assert results["long"]["op"] == "long"
    assert replica.connections == 1


async def test_a_cancelled_reader_hands_the_reading_on() -> None:
    replica = ScriptedReplica(_hold("first", "second"))
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:
            second: list[dict] = []
            async with trio.open_nursery() as calls:
                first_scope = trio.CancelScope()

                async def first() -> None:
                    with first_scope:
                        await conn.call("first", timeout_s=30)

                async def call_second() -> None:
                    second.append(await conn.call("second", timeout_s=30))

                calls.start_soon(first)
                await _until(lambda: "first" in replica.ops())
                calls.start_soon(call_second)
                await _until(lambda: "second" in replica.ops())
                first_scope.cancel()
                await trio.sleep(0.05)
                await replica.release("first")  # a reply nobody waits for any more
                await replica.release("second")
            assert second[0]["op"] == "second"
        nursery.cancel_scope.cancel()


async def test_replies_in_any_order_reach_their_calls() -> None:
    replica = ScriptedReplica(_hold("a", "b", "c"))
    results: dict[str, dict] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:

            async def call(op: str) -> None:
                results[op] = await conn.call(op, timeout_s=30)

            async with trio.open_nursery() as calls:
                for op in "abc":
                    calls.start_soon(call, op)
                await _until(lambda: len(replica.held) == 3)
                for op in "cab":
                    await replica.release(op)
            assert {op: r["op"] for op, r in results.items()} == {"a": "a", "b": "b", "c": "c"}
        nursery.cancel_scope.cancel()


async def test_a_link_the_replica_closed_while_idle_is_not_sent_into() -> None:
    # A restarted replica closed the connection while no call was on it: a
    # later non-idempotent call must go out on a new connection, not into
    # the dead one (which would leave its outcome unknown).
    replica = ScriptedReplica(_hold())
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:
            await conn.call("one", idempotent=False)
            await replica.close_all()
            await _until(lambda: replica.closed_connections == 1)
            await trio.sleep(0.05)  # the FIN reaches our socket
            assert (await conn.call("two", idempotent=False))["op"] == "two"
            assert replica.connections == 2
        nursery.cancel_scope.cancel()


async def test_many_calls_with_random_delays_and_deadlines_each_get_their_own_outcome() -> None:
    # 300 calls, up to 40 at a time on one connection, answered after a
    # random delay (some after their deadline): every call ends with its
    # own reply or a timeout, none hangs, none gets another call's reply.
    import random

    rng = random.Random(7)
    replica = ScriptedReplica(_hold())

    async def late_answers(framed: FramedStream, request: dict) -> None:
        await trio.sleep(rng.uniform(0, 0.06))
        try:
            await framed.send({"ok": True, "op": request["op"], "id": request["id"]})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client dropped that connection meanwhile

    outcomes: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        def answer(request: dict) -> Any:
            if request["op"] == "ping":
                return {"ok": True}
            assert replica.current is not None
            nursery.start_soon(late_answers, replica.current, request)
            return "later"

        replica.answer = answer
        replica.held = []
        await nursery.start(replica.serve)
        async with open_cell_connection([f"127.0.0.1:{replica.port}"], cell="t") as conn:
            limit = trio.Semaphore(40)

            async def call(i: int) -> None:
                async with limit:
                    try:
                        reply = await conn.call(f"op{i}", timeout_s=rng.uniform(0.01, 0.1))
                    except CellUnavailableError:
                        outcomes[f"op{i}"] = "timeout"
                    else:
                        outcomes[f"op{i}"] = "ok" if reply["op"] == f"op{i}" else f"wrong: {reply}"

            with trio.fail_after(30):
                async with trio.open_nursery() as calls:
                    for i in range(300):
                        calls.start_soon(call, i)
                        await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert len(outcomes) == 300
    assert not [o for o in outcomes.values() if o.startswith("wrong")]
    counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("ok", "timeout")}
    assert counts["ok"] > 0 and counts["timeout"] > 0, counts
