"""The blocking facade, as USERS.md scenario 4 uses it, against a real cell."""

import threading

import pytest

import chubbyfs
from chubbyfs.client.connection import CellError

pytestmark = pytest.mark.e2e


def test_blocking_session_locks_writes_and_reads(make_cell):
    cell = make_cell(3, state_machine="chubby", name="t")
    cell.start_all()
    addresses = list(cell.addresses.values())
    with chubbyfs.connect("t", addresses=addresses) as session:
        with session.open("/ls/t/jobs", write=True, create="directory"):
            pass
        with session.open("/ls/t/jobs/lock", write=True, lock=True, create="file") as h:
            seq = h.acquire()
            assert session.check_sequencer(seq) == (True, "")
            h.set_contents(b"primary: a")
            contents, stat = h.get_contents_and_stat()
            assert contents == b"primary: a" and stat.content_generation > 0
            # Another program's blocking session sees the lock held.
            got: list = []
            with chubbyfs.connect("t", addresses=addresses) as other:
                with other.open("/ls/t/jobs/lock", write=True, lock=True) as h2:
                    assert h2.try_acquire() is None
                    waiter = threading.Thread(target=lambda: got.append(h2.acquire()))
                    waiter.start()
                    h.release()
                    waiter.join(timeout=20)
                    assert got and got[0] != seq
                    h2.release()
        assert not session.check_sequencer(seq)[0]
        with pytest.raises(CellError) as err:
            session.open("/ls/t/nope")
        assert err.value.code == "not_found"


def test_connect_to_an_unknown_cell_fails_clearly(tmp_path):
    cells = tmp_path / "cells.toml"
    cells.write_text('[cells.other]\nreplicas = ["127.0.0.1:1"]\n')
    with pytest.raises(CellError) as err:
        chubbyfs.connect("t", cells_file=str(cells))
    assert "no cell 't'" in str(err.value)
