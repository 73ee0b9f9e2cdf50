"""Unary ttrpc round trips per second over one unix-socket connection.

The server runs in a child process (this script with ``--serve PATH``) so the
client and server do not share one interpreter; ``--in-process`` runs both in
one trio loop instead.  Every call sends ``--payload`` bytes and gets them back.

    .venv/bin/python bench/ttrpc_roundtrip.py [--calls 20000] [--payload 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import trio

from supervisor.ttrpc import (
    CallContext,
    Client,
    Server,
    connect_unix,
    open_unix_listener,
)

SERVICE = "bench.Echo"


async def echo(ctx: CallContext, payload: bytes) -> bytes:
    return payload


def make_server() -> Server:
    server = Server()
    server.register(SERVICE, {"Echo": echo})
    return server


async def serve_forever(path: str) -> None:
    server = make_server()
    listener = await open_unix_listener(path)
    print("ready", flush=True)
    await server.serve(listener)


async def measure(client: Client, callers: int, calls: int, payload: bytes) -> float:
    """Run ``calls`` round trips split over ``callers`` tasks; return seconds."""
    per_caller = calls // callers

    async def caller() -> None:
        for _ in range(per_caller):
            await client.call(SERVICE, "Echo", payload)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return time.perf_counter() - start


async def run_bench(path: str, calls: int, payload_size: int, callers: list[int]) -> None:
    payload = os.urandom(payload_size)
    async with await connect_unix(path) as client:
        await measure(client, 1, min(calls, 1000), payload)  # warm up
        print(f"{'callers':>8} {'calls':>8} {'seconds':>8} {'calls/s':>9} {'us/call':>8}")
        for n in callers:
            total = (calls // n) * n
            seconds = await measure(client, n, total, payload)
            print(
                f"{n:>8} {total:>8} {seconds:>8.2f} {total / seconds:>9.0f} "
                f"{seconds / total * 1e6:>8.1f}"
            )


async def in_process(path: str, calls: int, payload_size: int, callers: list[int]) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(path))
        await run_bench(path, calls, payload_size, callers)
        await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--callers", default="1,8,64")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_forever, args.serve)
        return
    callers = [int(n) for n in args.callers.split(",")]
    with tempfile.TemporaryDirectory(prefix="ttrpc-bench-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "bench.sock")
        where = "one process" if args.in_process else "server in a child process"
        print(f"ttrpc unary echo, {args.payload}-byte payload, one connection, {where}")
        if args.in_process:
            trio.run(in_process, path, args.calls, args.payload, callers)
            return
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("benchmark server failed to start")
            trio.run(run_bench, path, args.calls, args.payload, callers)
        finally:
            child.terminate()
            child.wait()


if __name__ == "__main__":
    main()
