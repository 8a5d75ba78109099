"""INIT negotiation: what we ask of the kernel, and what we settle on.

The kernel offers capability bits; we answer with the subset we want. The
defaults and the reasons for each bit are in docs/fuse-layer.md; in short,
locks must reach the daemon (POSIX_LOCKS, FLOCK_LOCKS) or a "cluster" lock
would silently be local to one machine, and nothing that makes the kernel
trust its caches beyond what we invalidate explicitly is turned on.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi
from .codec import DecodeOptions
from .replies import InitOut
from .requests import Init

F = abi.InitFlag
PAGE_SIZE = 4096

DEFAULT_WANT = (
    F.ASYNC_READ
    | F.POSIX_LOCKS
    | F.FLOCK_LOCKS
    | F.BIG_WRITES
    | F.MAX_PAGES
    | F.PARALLEL_DIROPS
)
# Bits the layer itself cannot honour whatever a filesystem wants.
UNSUPPORTED = (
    F.SPLICE_WRITE | F.SPLICE_MOVE | F.SPLICE_READ | F.PASSTHROUGH | F.OVER_IO_URING
    | F.MAP_ALIGNMENT | F.HAS_INODE_DAX | F.SECURITY_CTX | F.CREATE_SUPP_GROUP
    # A kernel timeout aborts the whole connection while a SETLKW legitimately waits.
    | F.REQUEST_TIMEOUT
)


MAX_BUSY_POLL_US = 10_000  # beyond that a poll holds up the loop's other work for too long


class NegotiationError(Exception):
    """The kernel cannot give us a protocol we can serve."""


@dataclass(frozen=True, slots=True)
class FuseConfig:
    """Session parameters. Sizes in bytes."""

    max_write: int = 128 * 1024
    max_readahead: int = 128 * 1024
    max_background: int = 16
    congestion_threshold: int = 12
    want: int = int(DEFAULT_WANT)
    require: int = 0  # refuse to serve unless the kernel offers all of these
    # How long an INTERRUPT for a request we have not seen is remembered.
    interrupt_memory_s: float = 1.0
    # The read loop yields to other tasks after this many requests in a row
    # (a request answered at once takes some 10 us; a yield costs about
    # half of one, so yielding much more often would cost the hot path).
    checkpoint_every: int = 32
    # After answering, the read loop polls the device this long before it
    # sleeps in epoll (0: never), unless it may run on one CPU only. A
    # program that sends request after request (open, close, open, ...)
    # finds the daemon awake: a sleeping daemon costs every request two
    # wake-ups across CPUs, which on this VM halved the rate of cached
    # opens. At most this much CPU per burst of requests.
    busy_poll_us: int = 50

    def __post_init__(self) -> None:
        if self.max_write < PAGE_SIZE or self.max_write % PAGE_SIZE:
            raise ValueError(f"max_write must be a positive multiple of {PAGE_SIZE}")
        if self.max_write // PAGE_SIZE > 0xFFFF:
            raise ValueError("max_write too large")
        if self.want & int(UNSUPPORTED):
            raise ValueError(f"unsupported INIT flags requested: {F(self.want & int(UNSUPPORTED))!r}")
        if self.require & ~self.want:
            raise ValueError("required flags must also be wanted")
        if self.interrupt_memory_s <= 0 or self.checkpoint_every <= 0:
            raise ValueError("interrupt_memory_s and checkpoint_every must be positive")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ValueError(f"busy_poll_us must be between 0 and {MAX_BUSY_POLL_US}")

    @property
    def read_buffer_size(self) -> int:
        """The kernel refuses reads smaller than max(8192, headers + max_write)."""
        return max(abi.MIN_READ_BUFFER, self.max_write + PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The settled protocol, as both sides now understand it."""

    major: int
    minor: int
    flags: int
    max_write: int
    max_readahead: int
    kernel_minor: int
    kernel_flags: int

    def has(self, flag: int) -> bool:
        return flag != 0 and (self.flags & flag) == flag

    @property
    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(setxattr_ext=self.has(F.SETXATTR_EXT))


@dataclass(frozen=True, slots=True)
class RetryInit:
    """The kernel speaks a newer major: answer with ours and await another INIT."""

    reply: InitOut


@dataclass(frozen=True, slots=True)
class Accepted:
    reply: InitOut
    negotiated: Negotiated


def negotiate(init: Init, config: FuseConfig) -> RetryInit | Accepted:
    """Decide the answer to one INIT. Raises `NegotiationError` if we cannot serve."""
    if init.major < abi.KERNEL_VERSION:
        raise NegotiationError(f"kernel protocol {init.major}.{init.minor} is too old")
    if init.major > abi.KERNEL_VERSION:
        return RetryInit(InitOut(major=abi.KERNEL_VERSION, minor=abi.KERNEL_MINOR_VERSION))
    if init.minor < abi.MIN_KERNEL_MINOR_VERSION:
        raise NegotiationError(
            f"kernel protocol 7.{init.minor} is older than 7.{abi.MIN_KERNEL_MINOR_VERSION}")
    missing = config.require & ~init.flags
    if missing:
        raise NegotiationError(f"kernel does not offer required flags {F(missing)!r}")
    minor = min(init.minor, abi.KERNEL_MINOR_VERSION)
    flags = config.want & init.flags
    if flags >> 32:
        if init.flags & F.INIT_EXT:
            flags |= F.INIT_EXT
        else:
            flags &= 0xFFFFFFFF
    max_pages = config.max_write // PAGE_SIZE if flags & F.MAX_PAGES else 0
    max_readahead = min(config.max_readahead, init.max_readahead)
    reply = InitOut(
        major=abi.KERNEL_VERSION,
        minor=minor,
        max_readahead=max_readahead,
        flags=int(flags),
        max_background=config.max_background,
        congestion_threshold=config.congestion_threshold,
        max_write=config.max_write,
        time_gran=1,
        max_pages=max_pages,
    )
    negotiated = Negotiated(
        major=abi.KERNEL_VERSION, minor=minor, flags=int(flags), max_write=config.max_write,
        max_readahead=max_readahead, kernel_minor=init.minor, kernel_flags=init.flags,
    )
    return Accepted(reply, negotiated)
