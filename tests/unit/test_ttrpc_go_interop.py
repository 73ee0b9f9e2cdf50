"""Wire compatibility with containerd's Go ttrpc (v1.1.1, as packaged by Debian).

Builds ``ttrpc_go_peer/main.go`` against /usr/share/gocode (GOPATH mode, no
network) and runs it as a client of our Server and as a server for our Client.
Skipped when the Go toolchain or the ttrpc sources are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor.ttrpc import (
    CallContext,
    Client,
    Code,
    RPCError,
    Server,
    connect_unix,
    open_unix_listener,
)

GOPATH = Path("/usr/share/gocode")
PEER_SOURCE = Path(__file__).parent / "ttrpc_go_peer"


def kv(key: str, value: str) -> bytes:
    """Encode a ttrpc.KeyValue {1 key, 2 value} (short fields only)."""

    def field(number: int, text: str) -> bytes:
        data = text.encode()
        out = bytearray([number << 3 | 2])
        length = len(data)
        while length >= 0x80:
            out.append(length & 0x7F | 0x80)
            length >>= 7
        out.append(length)
        return bytes(out) + data

    return (field(1, key) if key else b"") + (field(2, value) if value else b"")


def parse_kv(data: bytes) -> tuple[str, str]:
    fields: dict[int, str] = {}
    pos = 0
    while pos < len(data):
        number = data[pos] >> 3
        pos += 1
        length = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        fields[number] = data[pos : pos + length].decode()
        pos += length
    return fields.get(1, ""), fields.get(2, "")


@pytest.fixture(scope="module")
def go_peer() -> Iterator[Path]:
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/github.com/containerd/ttrpc").is_dir():
        pytest.skip("needs the Go toolchain and Debian's containerd/ttrpc sources")
    out = Path(tempfile.mkdtemp(prefix="ttrpc-go-", dir="/tmp"))
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="")
    env.setdefault("GOCACHE", str(out / "cache"))
    build = subprocess.run(
        [go, "build", "-o", str(out / "peer"), "."],
        cwd=PEER_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        pytest.skip(f"cannot build the Go ttrpc peer offline: {build.stderr[-500:]}")
    yield out / "peer"
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_go_client_against_our_server(go_peer: Path, sock_dir: Path) -> None:
    async def echo(ctx: CallContext, payload: bytes) -> bytes:
        key, value = parse_kv(payload)
        if len(value) > 64:
            return kv(key.upper(), value)
        has_deadline = str(ctx.deadline is not None).lower()
        return kv(key.upper(), f"{value}|ns={ctx.namespace}|deadline={has_deadline}")

    async def sleep(ctx: CallContext, payload: bytes) -> bytes:
        await trio.sleep(float(parse_kv(payload)[1].removesuffix("ms")) / 1000)
        return payload

    async def fail(ctx: CallContext, payload: bytes) -> bytes:
        raise RPCError(Code.NOT_FOUND, "no such thing")

    server = Server()
    server.register("interop.Echo", {"Echo": echo, "Sleep": sleep, "Fail": fail})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(sock_dir / "py.sock"))
        with trio.fail_after(30):
            done = await trio.run_process(
                [str(go_peer), "client", str(sock_dir / "py.sock")], capture_stdout=True
            )
        await server.shutdown(grace=1)
    lines = dict(line.split(" ", 1) for line in done.stdout.decode().splitlines())
    assert lines["echo"] == "ok HELLO 30 world|ns=k8s.io|deadline=false"
    assert lines["deadline"] == "ok T 25 v|ns=k8s.io|deadline=true"
    assert lines["nomethod"] == "err Unimplemented method Nope not found in service interop.Echo"
    assert lines["noservice"] == "err Unimplemented service interop.Nope not found"
    assert lines["fail"] == "err NotFound no such thing"
    assert lines["big"] == f"ok BIG {3 << 20} xxxxxxxx"
    assert lines["huge"].startswith("err ResourceExhausted message length ")
    assert lines["afterhuge"] == "ok AFTER 29 huge|ns=k8s.io|deadline=false"
    assert lines["order"] == "fast,fast,slow"


async def test_our_client_against_go_server(go_peer: Path, sock_dir: Path) -> None:
    path = sock_dir / "go.sock"
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            trio.run_process, [str(go_peer), "server", str(path)]
        )
        try:
            with trio.fail_after(10):
                while not path.exists():
                    await trio.sleep(0.01)
            async with await connect_unix(path) as client:
                out = await client.call(
                    "interop.Echo",
                    "Echo",
                    kv("a", "b"),
                    metadata={"containerd-namespace-ttrpc": "default"},
                    timeout=5,
                )
                assert parse_kv(out) == ("A", "b|ns=default|deadline=true")
                for service, method, code, message in (
                    ("interop.Echo", "Nope", Code.UNIMPLEMENTED, "method Nope"),
                    ("interop.Nope", "Echo", Code.UNIMPLEMENTED, "service interop.Nope"),
                    ("interop.Echo", "Fail", Code.NOT_FOUND, "no such thing"),
                    ("interop.Echo", "Huge", Code.RESOURCE_EXHAUSTED, "exceeds the maximum"),
                ):
                    with pytest.raises(RPCError) as info:
                        await client.call(service, method, b"")
                    assert info.value.code is code
                    assert message in info.value.message
                with pytest.raises(RPCError) as info:
                    await client.call("interop.Echo", "Sleep", kv("", "10s"), timeout=0.2)
                assert info.value.code is Code.DEADLINE_EXCEEDED
                order: list[str] = []

                async def sleep(name: str, duration: str) -> None:
                    await client.call("interop.Echo", "Sleep", kv(name, duration))
                    order.append(name)

                async with trio.open_nursery() as calls:
                    calls.start_soon(sleep, "slow", "300ms")
                    await trio.sleep(0.05)
                    calls.start_soon(sleep, "fast", "1ms")
                assert order == ["fast", "slow"]
                big = "x" * (3 << 20)
                assert parse_kv(await client.call("interop.Echo", "Echo", kv("k", big)))[0] == "K"
            # An oversized request reaches Go's server, which answers
            # RESOURCE_EXHAUSTED and keeps the connection.
            stream = await trio.open_unix_socket(str(path))
            async with Client(stream, max_message_size=8 << 20) as client:
                with pytest.raises(RPCError) as info:
                    await client.call("interop.Echo", "Echo", kv("k", "x" * (5 << 20)))
                assert info.value.code is Code.RESOURCE_EXHAUSTED
                assert parse_kv(await client.call("interop.Echo", "Echo", kv("k", "v")))[0] == "K"
        finally:
            process.terminate()
            nursery.cancel_scope.cancel()
