"""End-to-end: a real 3-replica Chubby cell, driven by the `chubbyfs` CLI and
by the client library, including kill -9 of the master while clients hold
and wait for locks."""

import os
import subprocess
import sys

import pytest
import trio

from chubbyfs.client.connection import CellError
from chubbyfs.client.session import open_session
from chubbyfs.locks import Sequencer

pytestmark = pytest.mark.e2e


@pytest.fixture
def chubby_cell(make_cell):
    cell = make_cell(3, state_machine="chubby", name="t")
    cell.start_all()
    return cell


def run_cli(cell, *args, stdin=None, check=True):
    env = dict(os.environ, CHUBBYFS_CELLS=str(cell.cells_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = subprocess.run([sys.executable, "-m", "chubbyfs", *args], input=stdin, capture_output=True,
                         env=env, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr.decode()
    return out


async def _leader(cell):
    async with open_session("t", addresses=list(cell.addresses.values())):
        pass  # a session can be created only once a master serves


def test_cli_does_each_call(chubby_cell):
    cell = chubby_cell
    trio.run(_leader, cell)
    run_cli(cell, "mkdir", "-p", "/ls/t/svc/search")
    assert run_cli(cell, "put", "/ls/t/svc/search/config", "replicas: 5").stdout.startswith(b"content_gen ")
    assert run_cli(cell, "cat", "/ls/t/svc/search/config").stdout == b"replicas: 5"
    run_cli(cell, "put", "/ls/t/svc/search/stdin", stdin=b"\x00binary\xff")
    assert run_cli(cell, "cat", "/ls/t/svc/search/stdin").stdout == b"\x00binary\xff"
    assert run_cli(cell, "ls", "/ls/t/svc/search").stdout.split() == [b"config", b"stdin"]
    assert b"svc/" in run_cli(cell, "ls", "-l", "/ls/t").stdout
    stat = run_cli(cell, "stat", "/ls/t/svc/search/config").stdout.decode()
    gen = int(next(line for line in stat.splitlines() if line.startswith("content_generation:")).split()[1])
    # compare-and-swap from the shell
    bad = run_cli(cell, "put", "--cas", str(gen - 1), "/ls/t/svc/search/config", "x", check=False)
    assert bad.returncode == 1 and b"cas_mismatch" in bad.stderr
    run_cli(cell, "put", "--cas", str(gen), "/ls/t/svc/search/config", "replicas: 7")
    assert run_cli(cell, "cat", "/ls/t/svc/search/config").stdout == b"replicas: 7"
    # locks: the command gets the sequencer, which checks valid while held and not after
    out = run_cli(cell, "lock", "/ls/t/svc/search/leader", "--", "sh", "-c",
                  'echo "$CHUBBY_SEQUENCER"; chubbyfs sequencer check "$CHUBBY_SEQUENCER"').stdout.decode()
    seq, verdict = out.split()[:2]
    assert Sequencer.decode(seq).path == "/ls/t/svc/search/leader" and verdict == "valid"
    after = run_cli(cell, "sequencer", "check", seq, check=False)
    assert after.returncode == 1 and b"invalid" in after.stdout
    assert run_cli(cell, "lock", "/ls/t/svc/search/leader", "--", "sh", "-c", "exit 3", check=False).returncode == 3
    # ACLs
    run_cli(cell, "put", "/ls/t/acl/readers", "root\nalice\n")
    run_cli(cell, "acl", "set", "/ls/t/svc/search/config", "--read", "readers")
    assert b"read: readers" in run_cli(cell, "acl", "get", "/ls/t/svc/search/config").stdout
    # errors are clear and change nothing
    for args, code in [(("cat", "/ls/t/nope"), b"not_found"), (("rm", "/ls/t/svc"), b"not_empty"),
                       (("put", "/ls/t/a/../b", "x"), b"invalid_name"), (("mkdir", "/ls/t/svc"), b"exists"),
                       (("sequencer", "check", "garbage"), b"invalid")]:
        out = run_cli(cell, *args, check=False)
        assert out.returncode == 1 and code in out.stderr + out.stdout, (args, out)
    big = run_cli(cell, "put", "/ls/t/big", stdin=b"x" * (300 * 1024), check=False)
    assert big.returncode == 1 and b"too_large" in big.stderr
    assert run_cli(cell, "cat", "/ls/t/svc/search/config").stdout == b"replicas: 7"
    status = run_cli(cell, "status").stdout.decode()
    assert "leader: " in status and "master: epoch " in status and " sessions" in status, status
    run_cli(cell, "rm", "/ls/t/svc/search/stdin")
    assert run_cli(cell, "cat", "/ls/t/svc/search/stdin", check=False).returncode == 1


async def test_locks_and_writes_survive_kill9_of_the_master(chubby_cell):
    cell = chubby_cell
    addresses = list(cell.addresses.values())
    path = "/ls/t/lock"
    async with open_session("t", addresses=addresses) as a, open_session("t", addresses=addresses) as b:
        ha = await a.open(path, write=True, lock=True, create="file")
        hb = await b.open(path, write=True, lock=True)
        seq_a = await ha.acquire()
        await ha.set_contents(b"holder a")
        got_b: list[str] = []

        async def wait_for_lock():
            got_b.append(await hb.acquire())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_lock)
            await trio.sleep(0.5)  # b is queued at the master
            from chubbyfs.client.connection import open_cell_connection
            async with open_cell_connection(addresses, cell="t") as conn:
                master = await cell.wait_for_leader(conn)
                cell.kill(master)
                await cell.wait_for_leader(conn, exclude=master)
            # a's session survived the failover, and still holds the lock
            assert (await a.check_sequencer(seq_a)) == (True, "")
            assert not got_b
            contents, stat = await ha.get_contents_and_stat()
            assert contents == b"holder a"
            await ha.release()
            with trio.fail_after(20):
                while not got_b:
                    await trio.sleep(0.05)
        seq_b = got_b[0]
        assert Sequencer.decode(seq_b).lock_generation > Sequencer.decode(seq_a).lock_generation
        valid, reason = await b.check_sequencer(seq_a)
        assert not valid and reason
        assert (await b.check_sequencer(seq_b)) == (True, "")
        with pytest.raises(CellError) as err:
            await ha.set_contents(b"x", expected_generation=stat.content_generation - 1)
        assert err.value.code == "cas_mismatch"
        cell.start(master)


async def test_session_end_applies_lock_delay_and_deletes_ephemerals(chubby_cell):
    cell = chubby_cell
    addresses = list(cell.addresses.values())
    async with open_session("t", addresses=addresses) as watcher:
        async with open_session("t", addresses=addresses) as dying:
            h = await dying.open("/ls/t/eph", write=True, lock=True, create="file", ephemeral=True,
                                 lock_delay_ms=2000)
            await h.acquire()
            peek = await watcher.open("/ls/t/eph")
            assert peek.stat.ephemeral
            await peek.close()  # an open handle anywhere keeps an ephemeral node alive
        # dying's session ended without Release: its ephemeral file is gone...
        with pytest.raises(CellError) as err:
            await watcher.open("/ls/t/eph")
        assert err.value.code == "not_found"
        # ...and a new lock file at that path stays unavailable for the lock-delay.
        w2 = await watcher.open("/ls/t/eph", write=True, lock=True, create="file")
        assert await w2.try_acquire() is None
        start = trio.current_time()
        await w2.acquire()
        assert trio.current_time() - start > 0.5


def test_watch_prints_events_as_they_happen(chubby_cell):
    cell = chubby_cell
    trio.run(_leader, cell)
    run_cli(cell, "mkdir", "/ls/t/svc")
    run_cli(cell, "put", "/ls/t/svc/config", "v1")
    env = dict(os.environ, CHUBBYFS_CELLS=str(cell.cells_path))
    watchers = [subprocess.Popen([sys.executable, "-m", "chubbyfs", "watch", path], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env)
                for path in ("/ls/t/svc/config", "/ls/t/svc")]
    try:
        for w in watchers:  # wait until each has its handle open
            assert w.stderr.readline().startswith(b"watching ")
        run_cli(cell, "put", "/ls/t/svc/config", "v2")
        run_cli(cell, "put", "/ls/t/svc/new", "x")
        run_cli(cell, "rm", "/ls/t/svc/new")
        assert watchers[0].stdout.readline() == b"contents_modified /ls/t/svc/config\n"
        lines = []
        while not lines or lines[-1] != b"child_removed /ls/t/svc new\n":
            lines.append(watchers[1].stdout.readline())
        # In apply order: config's change, then new's creation (and its
        # first write), then its removal.
        assert lines[0] == b"child_modified /ls/t/svc config\n", lines
        assert lines[1] == b"child_added /ls/t/svc new\n", lines
        assert set(lines[2:-1]) <= {b"child_modified /ls/t/svc new\n"}, lines
    finally:
        for w in watchers:
            w.send_signal(2)  # Ctrl-C
            assert w.wait(timeout=20) == 0
