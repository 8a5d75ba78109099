"""Negotiation, the in-flight/interrupt table, and the purity rule."""

from __future__ import annotations

import pathlib

import pytest

import chubbyfs.fuse
from chubbyfs.fuse import abi
from chubbyfs.fuse.inflight import InflightTable
from chubbyfs.fuse.negotiate import (
    Accepted, FuseConfig, NegotiationError, RetryInit, negotiate,
)
from chubbyfs.fuse.requests import Init
from tests.purity import impure_imports

F = abi.InitFlag
PURE = ["abi", "errors", "requests", "replies", "codec", "negotiate", "inflight", "ops"]
@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    path = pathlib.Path(chubbyfs.fuse.__file__).parent / f"{module}.py"
    assert not impure_imports(path, allowed_siblings=set(PURE))


OFFER = int(F.ASYNC_READ | F.POSIX_LOCKS | F.FLOCK_LOCKS | F.BIG_WRITES | F.MAX_PAGES
            | F.PARALLEL_DIROPS | F.DO_READDIRPLUS | F.INIT_EXT | F.SPLICE_READ
            | F.HAS_EXPIRE_ONLY)


def test_negotiate_takes_the_wanted_subset() -> None:
    result = negotiate(Init(0, 7, 45, 65536, OFFER), FuseConfig())
    assert isinstance(result, Accepted)
    n = result.negotiated
    assert n.flags == int(F.ASYNC_READ | F.POSIX_LOCKS | F.FLOCK_LOCKS | F.BIG_WRITES
                          | F.MAX_PAGES | F.PARALLEL_DIROPS)
    assert n.has(F.FLOCK_LOCKS) and not n.has(F.SPLICE_READ) and not n.has(0)
    assert result.reply.max_pages == 32 and result.reply.max_write == 131072
    assert result.reply.max_readahead == 65536  # never more than the kernel offers
    assert result.reply.minor == 45 and n.kernel_minor == 45


def test_negotiate_high_flags_need_init_ext() -> None:
    config = FuseConfig(want=int(F.FLOCK_LOCKS | F.HAS_EXPIRE_ONLY))
    result = negotiate(Init(0, 7, 45, 0, OFFER), config)
    assert isinstance(result, Accepted)
    assert result.negotiated.has(F.INIT_EXT | F.HAS_EXPIRE_ONLY)
    result.reply.pack()
    no_ext = negotiate(Init(0, 7, 45, 0, OFFER & ~int(F.INIT_EXT)), config)
    assert isinstance(no_ext, Accepted) and not no_ext.negotiated.flags >> 32


def test_negotiate_versions() -> None:
    assert negotiate(Init(0, 7, 50, 0, OFFER), FuseConfig()).reply.minor == 45
    newer = negotiate(Init(0, 8, 0, 0, OFFER), FuseConfig())
    assert isinstance(newer, RetryInit) and newer.reply.major == 7
    with pytest.raises(NegotiationError, match="too old"):
        negotiate(Init(0, 6, 0, 0, OFFER), FuseConfig())
    with pytest.raises(NegotiationError, match="older than"):
        negotiate(Init(0, 7, 30, 0, OFFER), FuseConfig())
    with pytest.raises(NegotiationError, match="required"):
        negotiate(Init(0, 7, 45, 0, int(F.ASYNC_READ)), FuseConfig(require=int(F.FLOCK_LOCKS)))


def test_config_validation() -> None:
    for bad in (dict(max_write=1000), dict(want=int(F.REQUEST_TIMEOUT)),
                dict(want=0, require=int(F.FLOCK_LOCKS)), dict(interrupt_memory_s=0),
                dict(max_write=4096 * 70000)):
        with pytest.raises(ValueError):
            FuseConfig(**bad)
    assert FuseConfig(max_write=4096).read_buffer_size == 8192
    assert FuseConfig().read_buffer_size == 131072 + 4096


def test_inflight_interrupt_running_request() -> None:
    table: InflightTable[str] = InflightTable(memory_s=1.0)
    assert table.begin(10, "scope10") is False
    assert table.interrupt(10, now_s=0.0) == "scope10"
    table.end(10)
    assert table.statistics().interrupts_delivered == 1
    table.assert_invariants()


def test_inflight_interrupt_before_request_is_remembered() -> None:
    table: InflightTable[str] = InflightTable(memory_s=1.0)
    assert table.interrupt(12, now_s=5.0) is None
    assert table.next_expiry_s() == 6.0
    assert table.begin(12, "late") is True  # cancel at once
    table.assert_invariants()
    table.end(12)
    assert table.expire(100.0) == []


def test_inflight_interrupts_expire_with_eagain_uniques() -> None:
    table: InflightTable[str] = InflightTable(memory_s=1.0, max_remembered=2)
    table.interrupt(2, now_s=0.0)
    table.interrupt(4, now_s=0.5)
    assert table.expire(0.9) == []
    assert table.expire(1.0) == [3]
    table.interrupt(6, now_s=1.0)
    table.interrupt(8, now_s=1.0)  # over the cap: the oldest (4) is dropped
    assert table.statistics().remembered_interrupts == 2
    assert table.expire(10.0) == [7, 9]
    assert table.statistics().interrupts_expired == 4  # 3 expired + 1 dropped


def test_inflight_misuse_is_rejected() -> None:
    table: InflightTable[str] = InflightTable(memory_s=1.0)
    table.begin(2, "a")
    with pytest.raises(ValueError, match="already"):
        table.begin(2, "b")
    with pytest.raises(ValueError, match="even"):
        table.begin(3, "c")
    with pytest.raises(ValueError, match="not in flight"):
        table.end(4)
    with pytest.raises(ValueError):
        InflightTable(memory_s=0)
