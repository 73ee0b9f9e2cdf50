"""The output backlog: ordered, bounded, on disk or in memory."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
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
        backlog = pio.counters.backlogs["stdout"]
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


def drain(b: Backlog) -> bytes:
    got = bytearray()
    while not b.empty:
        chunk = b.peek()
        assert chunk, "held bytes that cannot be read back"
        b.consume(len(chunk))
        got += chunk
    return bytes(got)


# --- a full disk never invents bytes -------------------------------------------------


def test_a_short_backlog_write_counts_the_rest_as_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 3: ``os.pwrite``'s count was ignored, the offset advanced by the full
    length, and the hole read back as NUL bytes with ``dropped 0``."""
    real = os.pwrite
    room = [150]  # the "disk" takes 150 bytes, then is full

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data)[:room[0]], offset)
        room[0] -= n
        return n

    monkeypatch.setattr(io_module.os, "pwrite", pwrite)
    b = Backlog(str(tmp_path), limit=1 << 20)
    for c in b"abcd":
        b.append(bytes([c]) * 100)
    got = drain(b)
    assert got == b"a" * 100 + b"b" * 50  # what was written, in order, nothing invented
    assert b.dropped == 250
    assert b.spooled == 150
    room[0] = 1000  # space again: the backlog goes on
    b.append(b"e" * 10)
    assert drain(b) == b"e" * 10
    assert b.dropped == 250
    b.close()


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[str]:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(path)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_drops_and_counts_but_never_writes_nul(tmp_path: Path) -> None:
    """The experiment of issue 15 item 3 on a real 8 KiB tmpfs: every byte read back is
    one that was appended, in order, and the others are counted as dropped."""
    with tiny_tmpfs(tmp_path / "small") as spool:
        b = Backlog(spool, limit=1 << 20)
        payload = bytes(range(1, 256)) * 80  # ~20 KB, no NUL in it
        for i in range(0, len(payload), 1001):
            b.append(payload[i:i + 1001])
        got = drain(b)
        b.close()
    assert 0 < len(got) < len(payload)
    assert b"\0" not in got
    assert payload.startswith(got)
    assert len(got) + b.dropped == len(payload)
