"""The output backlog: ordered, bounded, on disk or in memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from supervisor import io as io_module
from supervisor.io import Backlog, ProcessIO, Stdio


@pytest.mark.parametrize("on_disk", [True, False])
def test_order(tmp_path: Path, on_disk: bool) -> None:
    b = Backlog(str(tmp_path) if on_disk else "", limit=100)
    b.append(b"a" * 60)
    b.append(b"b" * 60)  # the limit is the copy's to enforce: nothing is dropped here
    assert (b.held, b.dropped) == (120, 0)
    got = b""
    while not b.empty:
        chunk = b.peek(30)
        b.consume(len(chunk))
        got += chunk
    assert got == b"a" * 60 + b"b" * 60
    b.append(b"c" * 10)
    assert b.peek() == b"c" * 10
    assert b.spooled == 130
    b.close()


def test_partial_consume(tmp_path: Path) -> None:
    b = Backlog(str(tmp_path), limit=1 << 20)
    b.append(b"0123456789")
    b.consume(4)
    assert b.peek() == b"456789"
    b.append(b"ab")
    assert b.peek() == b"456789ab"
    b.close()


def test_unusable_directory_falls_back_to_memory(tmp_path: Path) -> None:
    b = Backlog(str(tmp_path / "missing"), limit=1 << 20)
    b.append(b"xyz")
    assert b.peek() == b"xyz"
    assert b.directory == ""


async def test_absent_reader_costs_output_not_the_writer(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads the FIFO: past the limit (and a stall) output is dropped and counted;
    the process's writes never block; what was held comes out first, in order."""
    monkeypatch.setattr(io_module, "STALL_TIMEOUT", 0.2)
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    pio.backlog_limit = 1 << 20
    w = pio.child_fds[1]
    writer = os.dup(w)
    pio.spawned()
    payload = b"".join(b"%08d\n" % i for i in range(600_000))  # ~5.4 MB
    async with trio.open_nursery() as nursery:
        pio.start(nursery)

        def write_all() -> None:
            view = memoryview(payload)
            while view:
                view = view[os.write(writer, view):]
            os.close(writer)

        with trio.fail_after(20):
            await trio.to_thread.run_sync(write_all)  # would hang if the copy stopped reading
        backlog = pio.backlogs["stdout"]
        with trio.fail_after(10):
            while pio._eofs < 1:
                await trio.sleep(0.05)
        assert backlog.dropped > 0
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        got = bytearray()
        with trio.fail_after(20):
            while True:
                try:
                    chunk = os.read(reader, 1 << 20)
                except BlockingIOError:
                    await trio.sleep(0.02)
                    continue
                if not chunk:
                    break
                got += chunk
        os.close(reader)
        pio.close()
    assert len(got) + backlog.dropped == len(payload)
    assert payload.startswith(bytes(got))  # a prefix, in order
