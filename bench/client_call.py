"""What one call through `CellConnection` costs the client, against a stub
replica (a child process) that answers every request, at once or after a
delay. A script, not a test: it prints numbers.

    .venv/bin/python bench/client_call.py [--calls 2000] [--delay-ms 0,1]

For each delay: client CPU per call (this process's user+system time) and
calls/s. The stub runs in its own process, so that CPU is the client's
alone; `valgrind --tool=cachegrind --cache-sim=no` over two runs with
different `--calls` (say 200 and 1200, one delay) gives instructions per
call as the difference divided by 1000.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `chubbyfs`

import trio  # noqa: E402

VALUE = b"v" * 100
WARM_UP_CALLS = 200


async def _stub(port_fd: int, delay_s: float) -> None:
    """The replica: handshake, then answer every request `delay_s` later."""
    from chubbyfs.wire.framing import PROTOCOL_VERSION
    from chubbyfs.wire.stream import FramedStream

    async def serve(stream: trio.SocketStream) -> None:
        framed = FramedStream.over_tcp(stream)
        hello = await framed.receive()
        await framed.send({"v": PROTOCOL_VERSION, "kind": hello["kind"]})
        while True:
            try:
                request = await framed.receive()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if delay_s:
                await trio.sleep(delay_s)
            framed.send_nowait([{"ok": True, "version": 1, "id": request["id"]}])

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    os.write(port_fd, f"{listeners[0].socket.getsockname()[1]}\n".encode())
    os.close(port_fd)
    await trio.serve_listeners(serve, listeners)


async def _client(port: int, calls: int) -> tuple[float, float]:
    from chubbyfs.client.connection import open_cell_connection

    async with open_cell_connection([f"127.0.0.1:{port}"], cell="bench") as conn:
        for i in range(WARM_UP_CALLS):
            await conn.call("put", key=f"w{i}", value=VALUE)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(calls):
            await conn.call("put", key=f"k{i}", value=VALUE)
        return time.process_time() - cpu0, time.perf_counter() - wall0


def run(calls: int, delay_ms: float) -> tuple[float, float]:
    """(client CPU µs per call, calls/s) with a stub answering after `delay_ms`."""
    read_fd, write_fd = os.pipe()
    stub = subprocess.Popen([sys.executable, __file__, "--stub", str(write_fd), str(delay_ms)],
                            pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as ports:
            port = int(ports.readline())
        cpu_s, wall_s = trio.run(_client, port, calls)
    finally:
        stub.terminate()
        stub.wait(timeout=10)
    return cpu_s / calls * 1e6, calls / wall_s


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stub"]:
        trio.run(_stub, int(argv[1]), float(argv[2]) / 1000)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="measured calls per delay (default 2000)")
    ap.add_argument("--delay-ms", default="0,1", help="the stub's answer delays to run (default 0,1)")
    args = ap.parse_args(argv)
    print(f"CellConnection.call('put', 100-byte value) against a stub replica, {args.calls} calls each")
    print(f"{'stub delay':>10} | {'client cpu us/call':>18} {'calls/s':>9}")
    for delay in (float(d) for d in args.delay_ms.split(",")):
        cpu_us, rate = run(args.calls, delay)
        print(f"{delay:>8.1f}ms | {cpu_us:>18.1f} {rate:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
