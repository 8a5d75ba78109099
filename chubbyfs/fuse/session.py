"""The trio shell around the codec: read requests, run them, write replies.

* One reader: the device fd is non-blocking; we read until EAGAIN, then
  `wait_readable`. Each request is registered in the in-flight table
  *before* the next read, so an INTERRUPT always finds a request it names
  unless that request has already been answered.
* One task per request in the session's nursery, each in its own cancel
  scope; INTERRUPT cancels that scope and the request is answered EINTR.
* Replies are written from the loop thread, one whole message per write(2),
  which the kernel treats atomically, so replies never interleave.
* Notifications go through a second path: one at a time (a trio lock), each
  written from a worker thread. The kernel may block a notification on an
  inode lock that a request we have not answered yet holds; writing it from
  the loop thread (or under a lock the repliers share) would deadlock.
* ENODEV (unmounted or aborted) or EOF ends `serve()`; the session never
  touches its own mount.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from . import abi
from . import requests as rq
from .codec import DecodeOptions, decode_parts, encode_error, encode_notify, encode_reply, header_of
from .codec import xattr_list_payload, xattr_payload
from .errors import FuseDecodeError, FuseEncodeError, FuseError
from .inflight import InflightTable
from .negotiate import Accepted, FuseConfig, Negotiated, NegotiationError, negotiate
from .ops import NOT_NOW, AnswerNow, Operations, RequestContext, overrides
from .replies import (
    AttrOut, CreateOut, DirentBuffer, EntryOut, IoctlOut, LkOut, LseekOut, Notification,
    NotifyDelete, NotifyInvalEntry, NotifyInvalInode, NotifyPoll, NotifyStore, OpenOut,
    PollOut, StatfsOut, WriteOut,
)
from .requests import FileLock

log = logging.getLogger("chubbyfs.fuse")

_GONE = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF)
_F = abi.InitFlag


class FuseProtocolError(Exception):
    """The kernel and this session cannot agree (INIT failed); serving stops."""


@dataclass(frozen=True, slots=True)
class SessionStats:
    requests: int
    replies: int
    error_replies: int
    decode_errors: int
    handler_crashes: int
    interrupts_received: int
    interrupts_delivered: int
    in_flight: int
    notifications_sent: int
    notifications_unknown: int  # kernel had no such inode/entry (ENOENT)
    stale_replies: int  # kernel no longer waited for the request (ENOENT)
    busy_polls: int  # polls for a next request before sleeping
    busy_poll_hits: int  # of which found one


_Convert = Callable[[Any, Any, str], bytes]
_new_tuple = tuple.__new__  # context_of's way of building a RequestContext, inline in _dispatch
_pack_out_header = abi.OUT_HEADER.pack
_OUT_HEADER_SIZE = abi.OUT_HEADER.size


def _expect(value: Any, cls: type, method: str) -> Any:
    if not isinstance(value, cls):
        raise FuseEncodeError(f"{method} must return {cls.__name__}, got {type(value).__name__}")
    return value


def _expect_int(value: Any, method: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FuseEncodeError(f"{method} must return int, got {type(value).__name__}")
    return value


def _empty(value: Any, method: str) -> bytes:
    if value is not None:
        raise FuseEncodeError(f"{method} must return None, got {type(value).__name__}")
    return b""


def _pack(cls: type) -> _Convert:
    def convert(value: Any, req: Any, method: str) -> bytes:
        if not isinstance(value, cls):
            _expect(value, cls, method)  # raises
        return value.pack()
    return convert


def _read_bytes(value: Any, req: Any, method: str) -> bytes:
    data = bytes(_expect(value, (bytes, bytearray, memoryview), method))
    size = getattr(req, "size", None)
    if size is not None and len(data) > size:
        raise FuseEncodeError(f"{method} returned {len(data)} bytes, more than the {size} asked")
    return data


# How each method's return value becomes a reply payload.
_CONVERT: dict[str, _Convert] = {
    "lookup": _pack(EntryOut), "symlink": _pack(EntryOut), "mknod": _pack(EntryOut),
    "mkdir": _pack(EntryOut), "link": _pack(EntryOut),
    "getattr": _pack(AttrOut), "setattr": _pack(AttrOut),
    "open": _pack(OpenOut), "opendir": _pack(OpenOut),
    "create": _pack(CreateOut), "statfs": _pack(StatfsOut), "ioctl": _pack(IoctlOut),
    "readlink": lambda v, r, m: bytes(_expect(v, bytes, m)),
    "read": _read_bytes,
    "write": lambda v, r, m: WriteOut(_expect_int(v, m)).pack(),
    "copy_file_range": lambda v, r, m: WriteOut(_expect_int(v, m)).pack(),
    "lseek": lambda v, r, m: LseekOut(_expect_int(v, m)).pack(),
    "poll": lambda v, r, m: PollOut(_expect_int(v, m)).pack(),
    "getlk": lambda v, r, m: LkOut(_expect(v, FileLock, m)).pack(),
    "getxattr": lambda v, r, m: xattr_payload(r.size, bytes(_expect(v, bytes, m))),
    "listxattr": lambda v, r, m: xattr_list_payload(r.size, v),
}


class FuseSession:
    """Serves one FUSE connection (an open /dev/fuse fd) with `ops`."""

    def __init__(self, fd: int, ops: Operations, config: FuseConfig | None = None) -> None:
        self._fd = fd
        self._ops = ops
        self._now_handlers = dict(ops.answer_now_handlers())
        served = {info.method for info in abi.OPCODES.values() if info.replies}
        if not self._now_handlers.keys() <= served:
            raise ValueError(f"answer-now handlers for methods that are not answered: "
                             f"{sorted(self._now_handlers.keys() - served)}")
        # Opcode -> (method, its answer-now handler, reply converter or None);
        # filled once INIT is agreed (before that every request gets EIO).
        self._now_opcodes: dict[int, tuple[str, AnswerNow, _Convert | None]] = {}
        # Whether each request is logged (DEBUG): asked once, when serving
        # starts, not per request.
        self._log_requests = False
        self._config = config or FuseConfig()
        self._device_poller: select.poll | None = None
        self._table: InflightTable[trio.CancelScope] = InflightTable(
            self._config.interrupt_memory_s)
        self._negotiated: Negotiated | None = None
        self._decode_options = DecodeOptions()
        self._initialized = trio.Event()
        self._closed = trio.Event()
        self._notify_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._detached = False
        self._batch_writers = 0  # notify_batch_soon writes in flight (not under the lock)
        self._batches_idle = trio.Event()
        self._serving = False
        self._failure: FuseProtocolError | None = None
        # Counted on every request: plain attributes, cheaper than the dict.
        self._requests = self._replies = 0
        self._counts = dict.fromkeys(
            ("error_replies", "decode_errors", "handler_crashes", "interrupts_received",
             "notifications_sent", "notifications_unknown", "stale_replies", "busy_polls", "busy_poll_hits"), 0)

    # ------------------------------------------------------------------ public

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_initialized(self) -> Negotiated:
        await self._initialized.wait()
        assert self._negotiated is not None
        return self._negotiated

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def statistics(self) -> SessionStats:
        t = self._table.statistics()
        c = self._counts
        return SessionStats(
            requests=self._requests, replies=self._replies, error_replies=c["error_replies"],
            decode_errors=c["decode_errors"], handler_crashes=c["handler_crashes"],
            interrupts_received=c["interrupts_received"],
            interrupts_delivered=t.interrupts_delivered, in_flight=t.in_flight,
            notifications_sent=c["notifications_sent"],
            notifications_unknown=c["notifications_unknown"],
            stale_replies=c["stale_replies"], busy_polls=c["busy_polls"],
            busy_poll_hits=c["busy_poll_hits"],
        )

    def effective_want(self) -> int:
        """The INIT flags we ask for, adjusted to what `ops` implements."""
        want = self._config.want
        if overrides(self._ops, "readdirplus"):
            want |= _F.DO_READDIRPLUS
        if not (overrides(self._ops, "setlk") or overrides(self._ops, "setlkw")):
            # No lock support: let the kernel keep locks locally rather than
            # send lock requests that would only fail.
            want &= ~(_F.POSIX_LOCKS | _F.FLOCK_LOCKS) | self._config.require
        return int(want)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the connection ends (unmount/abort) or we are cancelled.

        Raises `FuseProtocolError` if INIT cannot be agreed.
        """
        if self._serving or self._closed.is_set():
            raise RuntimeError("a FuseSession serves its connection once")
        self._serving = True
        self._log_requests = log.isEnabledFor(logging.DEBUG)
        os.set_blocking(self._fd, False)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire_interrupts)
                task_status.started(self)
                await self._read_loop(nursery)
                # The connection is gone: nobody can receive the answers of
                # requests still running, so stop them.
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._closed.set()
        if self._failure is not None:
            raise self._failure

    async def notify(self, note: Notification) -> bool:
        """Send one notification and wait until the kernel took it.

        True if delivered; False if the kernel knew no such inode/entry
        (ENOENT, normal) or the connection is gone. Do not await this from a
        request handler for an inode that request may hold locked (e.g.
        inval_entry on the directory of a LOOKUP/CREATE being served): use
        `notify_soon` there.
        """
        msg = encode_notify(note)
        async with self._notify_lock:
            if self._detached:
                return False
            outcome = await trio.to_thread.run_sync(self._write_notify, msg)
        if outcome == 0:
            self._counts["notifications_sent"] += 1
            return True
        if outcome == errno.ENOENT:
            self._counts["notifications_unknown"] += 1
        elif outcome not in _GONE:
            raise OSError(outcome, f"notification rejected: {os.strerror(outcome)}")
        return False

    async def detach(self) -> None:
        """Stop using the fd (before its owner closes it): later notifications
        return False instead of writing to a recycled descriptor number."""
        async with self._notify_lock:
            self._detached = True
            while self._batch_writers:
                self._batches_idle = trio.Event()
                await self._batches_idle.wait()

    def notify_batch_soon(self, notes: Sequence[Notification]) -> trio.Event:
        """Queue `notes`, written in order from their own worker thread;
        returns an event set once the kernel took them all (or they named
        something it does not hold, or the connection is gone). Safe inside
        any handler. Batches do not wait for each other (nor for `notify`):
        one the kernel holds behind an inode lock delays no other."""
        msgs = [encode_notify(note) for note in notes]  # fail here, in the caller
        done = trio.Event()
        if self._nursery is None or not msgs:
            done.set()
            return done

        async def send() -> None:
            try:
                if self._detached:
                    return
                self._batch_writers += 1
                try:
                    outcomes = await trio.to_thread.run_sync(self._write_notify_many, msgs)
                finally:
                    self._batch_writers -= 1
                    if not self._batch_writers:
                        self._batches_idle.set()
                for outcome in outcomes:
                    if outcome == 0:
                        self._counts["notifications_sent"] += 1
                    elif outcome == errno.ENOENT:
                        self._counts["notifications_unknown"] += 1
                    elif outcome not in _GONE:
                        log.error("notification rejected: %s", os.strerror(outcome))
            finally:
                done.set()

        self._nursery.start_soon(send)
        return done

    async def notify_many(self, notes: Sequence[Notification], *, wait_s: float) -> bool:
        """Send `notes` in order and wait up to `wait_s` for the kernel to take
        them all. True if it did; on False they stay queued and go out as soon
        as the kernel lets them (it may hold one behind an inode lock of a
        request not answered yet), so a caller that must not wait forever can
        go on without losing them."""
        done = self.notify_batch_soon(notes)
        with trio.move_on_after(wait_s):
            await done.wait()
        return done.is_set()

    def notify_soon(self, note: Notification) -> None:
        """Queue a notification without waiting (safe inside any handler)."""
        encode_notify(note)  # fail here, in the caller, if it is malformed
        if self._nursery is None:
            raise RuntimeError("session is not serving")
        self._nursery.start_soon(self.notify, note)

    async def notify_inval_inode(self, ino: int, offset: int = 0, length: int = 0) -> bool:
        return await self.notify(NotifyInvalInode(ino, offset, length))

    async def notify_inval_entry(self, parent: int, name: bytes,
                                 expire_only: bool = False) -> bool:
        return await self.notify(NotifyInvalEntry(parent, name, expire_only))

    async def notify_delete(self, parent: int, child: int, name: bytes) -> bool:
        return await self.notify(NotifyDelete(parent, child, name))

    async def notify_poll(self, kh: int) -> bool:
        return await self.notify(NotifyPoll(kh))

    async def notify_store(self, nodeid: int, offset: int, data: bytes) -> bool:
        return await self.notify(NotifyStore(nodeid, offset, data))

    # ------------------------------------------------------------- reading

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        # One buffer for every read: os.read would allocate max_write + 4 KiB
        # per request, which glibc may serve with mmap/mremap/munmap (some
        # 10 us for a 64-byte OPEN). Decoding copies what it keeps.
        buffer = bytearray(self._config.read_buffer_size)
        buffers = (buffer,)
        view = memoryview(buffer)
        since_checkpoint = 0
        checkpoint_every = self._config.checkpoint_every
        busy_poll_s = self._config.busy_poll_us / 1e6
        while True:
            try:
                size = os.readv(self._fd, buffers)
            except BlockingIOError:
                if not (since_checkpoint and busy_poll_s and self._poll_device(busy_poll_s)):
                    since_checkpoint = 0
                    await trio.lowlevel.wait_readable(self._fd)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # the request was withdrawn between poll and read
                if exc.errno in _GONE:
                    log.info("fuse connection ended (%s)", errno.errorcode[exc.errno])
                    return
                raise
            if not size:
                log.info("fuse connection ended (EOF)")
                return
            self._dispatch(view[:size], nursery)
            if self._failure is not None:
                return
            since_checkpoint += 1
            if since_checkpoint >= checkpoint_every:
                # A busy kernel would otherwise starve woken lock waiters.
                since_checkpoint = 0
                await trio.lowlevel.checkpoint()

    def _poll_device(self, for_s: float) -> bool:
        """Whether a request arrives within `for_s` (a busy poll: the loop
        has just answered one, and another often follows within
        microseconds). Not while other tasks are ready to run (they would
        wait for it: a request being answered by its task, say), nor when
        this thread may run on one CPU only (the poll would hold the CPU
        the request's sender needs)."""
        if trio.lowlevel.current_statistics().tasks_runnable or len(os.sched_getaffinity(0)) < 2:
            return False
        poller = self._device_poller
        if poller is None:
            poller = self._device_poller = select.poll()
            poller.register(self._fd, select.POLLIN)
        self._counts["busy_polls"] += 1
        end = time.perf_counter() + for_s
        while time.perf_counter() < end:
            if poller.poll(0):
                self._counts["busy_poll_hits"] += 1
                return True
        return False

    def _dispatch(self, buf: bytes | memoryview, nursery: trio.Nursery) -> None:
        self._requests += 1
        try:
            fields, body = decode_parts(buf, self._decode_options)
        except FuseDecodeError as exc:
            self._undecodable(exc)
            return
        opcode = fields[1]
        if self._log_requests:
            log.debug("%s unique=%d nodeid=%d %s", abi.Opcode(opcode).name, fields[2], fields[3], body)
        now = self._now_opcodes.get(opcode)
        if now is not None:
            # The hot path: a request the filesystem can answer from what it
            # has at hand is answered here, with no task and no Request
            # object, and before the next read (so no INTERRUPT can reach
            # it). Inline, not a method: a call per request is worth saving.
            method, handler, convert = now
            try:
                # `ctx` built as context_of builds it.
                value = handler(_new_tuple(RequestContext, fields[1:7]), body)
                if value is not NOT_NOW:
                    if convert is not None:
                        payload = convert(value, body, method)
                    elif value is None:
                        payload = b""
                    else:
                        payload = _empty(value, method)
                    # encode_reply, inline (the kernel's unique is never 0).
                    self._reply(_pack_out_header(_OUT_HEADER_SIZE + len(payload), 0, fields[2]) + payload)
                    return
            except FuseError as exc:
                self._reply_error(fields[2], exc.errno)
                return
            except Exception:
                self._counts["handler_crashes"] += 1
                log.exception("%s (unique %d) answered at once failed", method, fields[2])
                self._reply_error(fields[2], errno.EIO)
                return
        req = rq.Request(header_of(fields), body)
        if opcode == abi.Opcode.INIT:
            self._handle_init(req, nursery)
            return
        if opcode == abi.Opcode.INTERRUPT:
            self._handle_interrupt(req)
            return
        if self._negotiated is None:
            log.warning("request %s before INIT", abi.Opcode(opcode).name)
            self._reply_error(req.unique, errno.EIO)
            return
        info = abi.OPCODES[opcode]
        if not info.replies:  # FORGET, BATCH_FORGET: no answer, no interrupt
            nursery.start_soon(self._run_forget, req, info.method)
            return
        scope = trio.CancelScope()
        if self._table.begin(req.unique, scope):
            scope.cancel()
        nursery.start_soon(self._run, req, info.method, scope)

    def _undecodable(self, exc: FuseDecodeError) -> None:
        self._counts["decode_errors"] += 1
        # ENOSYS for an opcode we do not serve is routine (STATX, SYNCFS...).
        log.log(logging.DEBUG if exc.errno == errno.ENOSYS else logging.WARNING,
                "undecodable request: %s", exc)
        info = abi.OPCODES.get(exc.opcode) if exc.opcode is not None else None
        wants_reply = info.replies if info is not None else True
        if exc.unique and not exc.unique & 1 and wants_reply:
            self._reply_error(exc.unique, exc.errno)

    def _handle_init(self, req: rq.Request, nursery: trio.Nursery) -> None:
        if self._negotiated is not None:
            log.warning("second INIT after a successful one")
            self._reply_error(req.unique, errno.EPROTO)
            return
        assert isinstance(req.body, rq.Init)
        config = FuseConfig(**{**_config_fields(self._config), "want": self.effective_want()})
        try:
            result = negotiate(req.body, config)
        except NegotiationError as exc:
            self._reply_error(req.unique, errno.EPROTO)
            self._failure = FuseProtocolError(str(exc))
            return
        self._reply(encode_reply(req.unique, result.reply.pack()))
        if isinstance(result, Accepted):
            self._negotiated = result.negotiated
            self._decode_options = result.negotiated.decode_options
            log.info("fuse 7.%d negotiated, flags %r", result.negotiated.minor,
                     _F(result.negotiated.flags))
            self._now_opcodes = {int(op): (info.method, self._now_handlers[info.method], _CONVERT.get(info.method))
                                 for op, info in abi.OPCODES.items()
                                 if info.replies and info.method in self._now_handlers}
            self._initialized.set()
            nursery.start_soon(self._ops.init, result.negotiated)

    def _handle_interrupt(self, req: rq.Request) -> None:
        assert isinstance(req.body, rq.Interrupt)
        self._counts["interrupts_received"] += 1
        scope = self._table.interrupt(req.body.target, trio.current_time())
        if scope is not None:
            scope.cancel()

    async def _expire_interrupts(self) -> None:
        period_s = self._config.interrupt_memory_s / 2
        while True:
            await trio.sleep(period_s)
            for own_unique in self._table.expire(trio.current_time()):
                # Never ENOSYS: that would switch interrupts off for good.
                self._reply_error(own_unique, errno.EAGAIN)

    # ------------------------------------------------------------- running

    def _context(self, req: rq.Request) -> RequestContext:
        h = req.header
        return RequestContext(h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid)

    async def _run(self, req: rq.Request, method: str, scope: trio.CancelScope) -> None:
        unique = req.unique
        payload: bytes | None = None
        error = errno.EIO
        try:
            with scope:
                # Interrupted before it started (see InflightTable.begin): don't run it.
                await trio.lowlevel.checkpoint_if_cancelled()
                payload = await self._call(method, req)
            if scope.cancelled_caught:
                payload, error = None, errno.EINTR
        except FuseError as exc:
            error = exc.errno
        except OSError as exc:
            error = exc.errno if exc.errno and 0 < exc.errno <= abi.MAX_ERRNO else errno.EIO
        except Exception:
            self._counts["handler_crashes"] += 1
            log.exception("%s (unique %d) failed", method, unique)
        finally:
            self._table.end(unique)
        if payload is None:
            self._reply_error(unique, error)
        else:
            self._reply(encode_reply(unique, payload))

    async def _call(self, method: str, req: rq.Request) -> bytes:
        ctx = self._context(req)
        fn = getattr(self._ops, method)
        body = req.body
        if method in ("readdir", "readdirplus"):
            assert isinstance(body, (rq.ReadDir, rq.ReadDirPlus))
            out = DirentBuffer(body.size, plus=method == "readdirplus")
            _empty(await fn(ctx, body, out), method)
            return out.getvalue()
        value = await fn(ctx, body)
        convert = _CONVERT.get(method)
        return convert(value, body, method) if convert else _empty(value, method)

    async def _run_forget(self, req: rq.Request, method: str) -> None:
        try:
            await getattr(self._ops, method)(self._context(req), req.body)
        except Exception:
            self._counts["handler_crashes"] += 1
            log.exception("%s failed", method)

    # ------------------------------------------------------------- writing

    def _reply_error(self, unique: int, errno_: int) -> None:
        if self._reply(encode_error(unique, errno_)):
            self._counts["error_replies"] += 1

    def _reply(self, msg: bytes) -> bool:
        """The only way replies reach the device: one message per write(2).
        True if the kernel took it."""
        try:
            written = os.write(self._fd, msg)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # Already answered or withdrawn by the kernel (interrupt race).
                self._counts["stale_replies"] += 1
            elif exc.errno in _GONE:
                pass  # connection gone; serve() is about to see it too
            else:
                log.error("writing a reply failed: %s", exc)
            return False
        if written != len(msg):
            log.error("short reply write: %d of %d bytes", written, len(msg))
            return False
        self._replies += 1
        return True

    def _write_notify(self, msg: bytes) -> int:
        """Runs in a worker thread (it may block inside the kernel); returns
        0 or the errno, and touches no shared state."""
        try:
            os.write(self._fd, msg)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _write_notify_many(self, msgs: list[bytes]) -> list[int]:
        return [self._write_notify(msg) for msg in msgs]

    def assert_invariants(self) -> None:
        self._table.assert_invariants()
        assert (self._negotiated is None) != self._initialized.is_set()


def _config_fields(config: FuseConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in FuseConfig.__dataclass_fields__}
