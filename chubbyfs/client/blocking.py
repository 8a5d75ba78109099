"""The blocking facade: the trio client API for programs that do not use trio.

    import chubbyfs
    with chubbyfs.connect("prod") as session:
        with session.open("/ls/prod/jobs/lock", write=True, lock=True, create="file") as h:
            sequencer = h.acquire()

A session runs the trio client in one background thread (trio cannot run
inside a caller's own blocking code); each call crosses into it with
`trio.from_thread.run`. Every method has the signature and meaning of its
trio counterpart in `chubbyfs.client.session`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import trio

from .session import Handle, Session, open_session

START_TIMEOUT_S = 60.0


class BlockingHandle:
    def __init__(self, session: BlockingSession, handle: Handle) -> None:
        self._session = session
        self.handle = handle

    @property
    def path(self) -> str:
        return self.handle.path

    @property
    def stat(self) -> Any:
        return self.handle.stat

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.handle, name)
        if not callable(method):
            return method
        return functools.partial(self._session._run, method)

    def __enter__(self) -> BlockingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._session._run(self.handle.close)


class BlockingSession:
    def __init__(self, cell: str, **options: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._session: Session | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, cell, options),
                                        name=f"chubbyfs-session-{cell}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"no session with cell {cell!r} within {START_TIMEOUT_S}s")
        if self._error is not None:
            raise self._error

    async def _main(self, cell: str, options: dict) -> None:
        try:
            async with open_session(cell, **options) as session:
                self._session = session
                self._token = trio.lowlevel.current_trio_token()
                self._closed = trio.Event()
                self._ready.set()
                await self._closed.wait()
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            self._ready.set()

    def _run(self, afn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(functools.partial(afn, *args, **kwargs), trio_token=self._token)

    @property
    def id(self) -> int:
        assert self._session is not None
        return self._session.id

    @property
    def state(self) -> Any:
        assert self._session is not None
        return self._session.state

    def open(self, path: str, **options: Any) -> BlockingHandle:
        assert self._session is not None
        return BlockingHandle(self, self._run(self._session.open, path, **options))

    def rename(self, src_path: str, dst_path: str) -> Any:
        assert self._session is not None
        return self._run(self._session.rename, src_path, dst_path)

    def check_sequencer(self, sequencer: str) -> tuple[bool, str]:
        assert self._session is not None
        return self._run(self._session.check_sequencer, sequencer)

    def close(self) -> None:
        """End the session (its locks are released) and stop its thread."""
        if self._closed is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._closed.set, trio_token=self._token)
        self._thread.join()

    def __enter__(self) -> BlockingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(cell: str, **options: Any) -> BlockingSession:
    """A blocking session with `cell` (options as for `open_session`)."""
    return BlockingSession(cell, **options)
