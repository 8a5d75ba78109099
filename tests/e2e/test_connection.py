"""The client connection against real replicas: a redirect from a replica
that is not the master moves new calls to the master without failing the
calls still in flight on the old link (a non-idempotent one among them would
otherwise end as `unknown_outcome` although the replica refused it)."""

import pytest
import trio

from chubbyfs.client.connection import CellConnection

pytestmark = pytest.mark.e2e


async def test_a_redirect_does_not_fail_the_other_calls_in_flight(make_cell):
    cell = make_cell(3, name="t")
    cell.start_all()
    async with trio.open_nursery() as nursery:
        probe = CellConnection(list(cell.addresses.values()), nursery, cell="t")
        leader = await cell.wait_for_leader(probe)
        await probe.aclose()
        follower = next(rid for rid in cell.addresses if rid != leader)
        # Only the follower to start with: every call first meets a redirect.
        conn = CellConnection([cell.addresses[follower]], nursery, cell="t", call_timeout_s=20)
        conn._preferred = cell.addresses[follower]
        results: dict[int, object] = {}

        async def put(i: int) -> None:
            try:
                results[i] = await conn.call("put", idempotent=False, key=f"k{i}", value=b"v")
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                results[i] = exc

        with trio.fail_after(30):
            async with trio.open_nursery() as calls:
                for i in range(20):
                    calls.start_soon(put, i)
        failures = {i: r for i, r in results.items() if isinstance(r, Exception)}
        assert not failures, failures
        assert conn.master_address == cell.addresses[leader]
        # The no-op a client's deadline watchdog sends to wake a reading call.
        assert (await conn.call("ping"))["ok"] is True
        await conn.aclose()
        nursery.cancel_scope.cancel()
