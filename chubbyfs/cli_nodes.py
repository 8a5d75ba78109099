"""`chubbyfs ls | cat | put | mkdir | rm | stat | lock | acl | sequencer`:
the cell's namespace from the shell, through the client library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from chubbyfs.client.connection import CellError
from chubbyfs.client.session import Session, cell_of, open_session
from chubbyfs.locks import Sequencer, SequencerError
from chubbyfs.wire.cell_protocol import Stat


def _run(args: argparse.Namespace, path: str, body: Callable[[Session], Awaitable[int]]) -> int:
    async def main() -> int:
        async with open_session(cell_of(path), cells_file=args.cells) as session:
            return await body(session)

    try:
        return trio.run(main)
    except (CellError, ValueError) as exc:
        print(f"chubbyfs: {path}: {exc}", file=sys.stderr)
        return 1


def _stat_dict(stat: Stat) -> dict[str, Any]:
    return {k: getattr(stat, k) for k in Stat.__dataclass_fields__}


def cmd_ls(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        async with await session.open(args.path) as h:
            if not h.stat.is_directory:
                print(args.path)
                return 0
            for entry in await h.read_dir():
                s = entry.stat
                name = entry.name + ("/" if s.is_directory else "")
                if args.long:
                    print(f"{'d' if s.is_directory else '-'}{'e' if s.ephemeral else '-'} {s.size:>8} "
                          f"gen={s.content_generation:<6} lock={s.lock_generation:<6} "
                          f"acl={s.acl_read},{s.acl_write},{s.acl_change}  {name}")
                else:
                    print(name)
        return 0
    return _run(args, args.path, body)


def cmd_cat(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        async with await session.open(args.path) as h:
            contents, _ = await h.get_contents_and_stat()
        sys.stdout.buffer.write(contents)
        sys.stdout.flush()
        return 0
    return _run(args, args.path, body)


def cmd_put(args: argparse.Namespace) -> int:
    data = args.data.encode() if args.data is not None else sys.stdin.buffer.read()

    async def body(session: Session) -> int:
        async with await session.open(args.path, write=True, create="file") as h:
            stat = await h.set_contents(data, expected_generation=args.cas)
        print(f"content_gen {stat.content_generation}")
        return 0
    return _run(args, args.path, body)


def cmd_mkdir(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        parts = args.path.rstrip("/").split("/")
        targets = ["/".join(parts[:i]) for i in range(4, len(parts) + 1)] if args.parents else [args.path]
        for target in targets:
            async with await session.open(target, write=True, create="directory",
                                          exclusive=not args.parents) as h:
                if not h.stat.is_directory:
                    raise CellError("not_a_directory", f"{target} exists and is a file")
        return 0
    return _run(args, args.path, body)


def cmd_rm(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        async with await session.open(args.path, write=True) as h:
            await h.delete()
        return 0
    return _run(args, args.path, body)


def cmd_stat(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        async with await session.open(args.path) as h:
            stat = await h.get_stat()
        d = _stat_dict(stat)
        if args.json:
            print(json.dumps(d))
        else:
            for k, v in d.items():
                print(f"{k}: {v:#018x}" if k == "checksum" else f"{k}: {v}")
        return 0
    return _run(args, args.path, body)


def cmd_acl(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        if args.acl_op == "get":
            async with await session.open(args.path) as h:
                s = await h.get_stat()
            print(f"read: {s.acl_read}\nwrite: {s.acl_write}\nchange: {s.acl_change}")
            return 0
        async with await session.open(args.path, change_acl=True) as h:
            s = await h.get_stat()
            await h.set_acl(args.read or s.acl_read, args.write or s.acl_write, args.change or s.acl_change)
        return 0
    return _run(args, args.path, body)


def cmd_sequencer_check(args: argparse.Namespace) -> int:
    try:
        cell = Sequencer.decode(args.sequencer).cell
    except SequencerError as exc:
        print(f"invalid: {exc}")
        return 1

    async def body(session: Session) -> int:
        valid, reason = await session.check_sequencer(args.sequencer)
        print("valid" if valid else f"invalid: {reason}")
        return 0 if valid else 1
    return _run(args, f"/ls/{cell}", body)


def cmd_lock(args: argparse.Namespace) -> int:
    """Hold a lock while CMD runs; the command sees the sequencer in
    CHUBBY_SEQUENCER and is stopped (SIGTERM) if the session is lost."""
    if not args.command:
        print("chubbyfs lock: give a command after --", file=sys.stderr)
        return 2
    mode = "shared" if args.shared else "exclusive"

    async def body(session: Session) -> int:
        async with await session.open(args.path, write=True, lock=True, create="file") as h:
            if args.nonblock:
                sequencer = await h.try_acquire(mode)
                if sequencer is None:
                    print(f"chubbyfs lock: {args.path} is held", file=sys.stderr)
                    return 1
            else:
                with trio.move_on_after(args.timeout if args.timeout is not None else math_inf()) as scope:
                    sequencer = await h.acquire(mode)
                if scope.cancelled_caught:
                    print(f"chubbyfs lock: timed out waiting for {args.path}", file=sys.stderr)
                    return 1
            env = dict(os.environ, CHUBBY_SEQUENCER=sequencer)
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(lambda task_status: trio.run_process(
                    args.command, check=False, env=env, task_status=task_status))

                async def watch_session() -> None:
                    while not session.expired:
                        await trio.sleep(0.2)
                    print("chubbyfs lock: session lost; stopping the command", file=sys.stderr)
                    proc.send_signal(signal.SIGTERM)

                nursery.start_soon(watch_session)
                await proc.wait()
                nursery.cancel_scope.cancel()
            if not session.expired:
                await h.release()
            return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return _run(args, args.path, body)


def cmd_watch(args: argparse.Namespace) -> int:
    """Print the node's events as they arrive, one line each, until
    interrupted; session state changes (jeopardy, safe, expired) go to
    stderr. Exit status 1 if the session expires."""
    from chubbyfs.client.events import EventKind

    every = int(EventKind.CONTENTS_MODIFIED | EventKind.CHILD_ADDED | EventKind.CHILD_REMOVED
                | EventKind.CHILD_MODIFIED | EventKind.HANDLE_INVALID | EventKind.LOCK_ACQUIRED
                | EventKind.CONFLICTING_LOCK)

    async def body(session: Session) -> int:
        async with await session.open(args.path, events=every) as h:
            print(f"watching {args.path} (instance {h.stat.instance})", file=sys.stderr, flush=True)
            async with trio.open_nursery() as nursery:
                async def report_states() -> None:
                    async for change in session.state_changes():
                        print(f"session {change.state.value}: {change.reason}", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()

                async def until_interrupted() -> None:
                    # Ctrl-C (or SIGTERM) ends the watch through trio, at a
                    # checkpoint, so the handle and the session are closed
                    # in order; a KeyboardInterrupt could strike anywhere.
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(report_states)
                nursery.start_soon(until_interrupted)
                async for event in h.events():
                    kind = event.kind.name.lower() if event.kind.name else str(int(event.kind))
                    child = f" {event.name}" if event.name else ""
                    print(f"{kind} {event.path or args.path}{child}", flush=True)
        return 1 if session.expired else 0

    try:
        return _run(args, args.path, body)
    except BaseException as exc:
        # A Ctrl-C before the signal receiver is up arrives as a
        # KeyboardInterrupt (perhaps wrapped in an exception group).
        interrupts, rest = (exc.split(KeyboardInterrupt) if isinstance(exc, BaseExceptionGroup)
                            else (exc, None) if isinstance(exc, KeyboardInterrupt) else (None, exc))
        if interrupts is not None and rest is None:
            return 0
        raise


def math_inf() -> float:
    return float("inf")


def add_parsers(sub: argparse._SubParsersAction, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    def leaf(name: str, helptext: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        client_options(p)
        p.set_defaults(func=func)
        return p

    p = leaf("ls", "list a directory", cmd_ls)
    p.add_argument("-l", "--long", action="store_true")
    p.add_argument("path")
    leaf("cat", "print a file's contents", cmd_cat).add_argument("path")
    p = leaf("put", "write a file whole (creating it), from DATA or stdin", cmd_put)
    p.add_argument("path")
    p.add_argument("data", nargs="?")
    p.add_argument("--cas", type=int, metavar="GEN", help="only if the content generation is still GEN")
    p = leaf("mkdir", "create a directory", cmd_mkdir)
    p.add_argument("-p", "--parents", action="store_true")
    p.add_argument("path")
    leaf("rm", "delete a file or an empty directory", cmd_rm).add_argument("path")
    p = leaf("stat", "a node's metadata", cmd_stat)
    p.add_argument("--json", action="store_true")
    p.add_argument("path")
    p = leaf("lock", "hold a lock while a command runs", cmd_lock)
    p.add_argument("--shared", action="store_true")
    p.add_argument("-n", "--nonblock", action="store_true", help="fail at once if the lock is held")
    p.add_argument("-w", "--timeout", type=float, help="give up after this many seconds")
    p.add_argument("path")
    p.add_argument("command", nargs=argparse.REMAINDER)

    leaf("watch", "print a node's events as they arrive, until interrupted", cmd_watch).add_argument("path")

    acl = sub.add_parser("acl", help="a node's ACL names")
    acl_sub = acl.add_subparsers(dest="acl_op", required=True)
    for op in ("get", "set"):
        p = acl_sub.add_parser(op)
        client_options(p)
        p.add_argument("path")
        if op == "set":
            p.add_argument("--read")
            p.add_argument("--write")
            p.add_argument("--change")
        p.set_defaults(func=cmd_acl)

    seq = sub.add_parser("sequencer", help="sequencers (fencing tokens)")
    seq_sub = seq.add_subparsers(dest="seq_op", required=True)
    p = seq_sub.add_parser("check", help="exit 0 if SEQ is still valid")
    client_options(p)
    p.add_argument("sequencer")
    p.set_defaults(func=cmd_sequencer_check)
