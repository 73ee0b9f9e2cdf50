"""Issue 17: a process's streams paused, exported and adopted (or resumed) without losing a byte.

Real pipes, FIFOs and ptys.  A writer pumps a numbered byte sequence through a
:class:`ProcessIO` (or a :class:`Console`); the copies are paused mid-stream,
exported, and rebuilt with :func:`adopt_streams` from a JSON round trip of the
export in this same process (the old object gives its fds up on export, as
``execve`` would), or resumed in place; the reader must get every byte exactly
once and in order.  No assertion depends on timing: waits are for conditions.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import io as io_module
from supervisor.console import Console
from supervisor.io import (
    ProcessIO,
    Stdio,
    Streams,
    StreamStateError,
    adopt_streams,
    fds_of,
    open_stdio,
)
from supervisor.reaper import Reaper

Mode = Literal["adopt", "resume"]


def numbered(size: int, tag: bytes = b"") -> bytes:
    """``size`` bytes of numbered lines: any loss, repeat or reordering shows."""
    lines = (b"%s%07d\n" % (tag, i) for i in range(size // 8 + 1))
    return b"".join(lines)[:size]


def open_fds() -> set[int]:
    """The open fds (not the one listing them)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.fstat(int(name))
            fds.add(int(name))
    return fds


async def write_all(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def read_to_eof(fd: int, got: bytearray, *, close: bool = True) -> None:
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError:  # EIO: a pty whose other side is gone
                return
            if not chunk:
                return
            got += chunk
    finally:
        if close:
            os.close(fd)


async def until(condition: object, what: str) -> None:
    """Wait for ``condition()`` (polled; a hang fails after 20 s, not a timing rule)."""
    assert callable(condition)
    with trio.fail_after(20):
        while not condition():
            await trio.sleep(0.005)


async def hand_over(old: Streams, nursery: trio.Nursery, mode: Mode) -> Streams:
    """Resume ``old`` in place, or export it, round-trip through JSON, adopt and start."""
    if mode == "resume":
        old.resume()
        return old
    state = json.loads(json.dumps(old.export()))
    old.close()  # exported: closes nothing that is the new object's now
    new = adopt_streams(state)
    new.start(nursery)
    return new


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="io-upgrade-") as d:
        yield Path(d)


# --- pipes: output -------------------------------------------------------------------


async def pump_output(
    tmp: Path, *, before: int, paused: int, after: int, reader_early: bool, mode: Mode,
    on_disk: bool,
) -> None:
    """stdout to a FIFO, stderr to a file://; pause after ``before`` bytes each, write
    ``paused`` more while paused, hand over, write ``after`` more, end; check all."""
    fds_at_start = open_fds()
    fifo = tmp / "out"
    os.mkfifo(fifo)
    log = tmp / "err.log"
    out = numbered(before + paused + after, b"o")
    err = numbered(before + paused + after, b"e")
    pio = await ProcessIO.create(Stdio(stdout=str(fifo), stderr=f"file://{log}"),
                                 spool_dir=str(tmp) if on_disk else "")
    w_out, w_err = os.dup(pio.child_fds[1]), os.dup(pio.child_fds[2])
    pio.spawned()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        if reader_early:
            nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        pio.start(nursery)
        await write_all(w_out, out[:before])
        await write_all(w_err, err[:before])
        if not reader_early:  # all read from the pipe: what the FIFO cannot hold is held
            await until(lambda: pio.counters.stdout == before, "stdout read")
        await pio.pause()
        await write_all(w_out, out[before:before + paused])  # the pipe holds it meanwhile
        await write_all(w_err, err[before:before + paused])
        state = pio.export()
        if not reader_early and before > 256 * 1024:  # more than the FIFO's 64 KiB
            (stdout,) = (o for o in state["outputs"] if o["name"] == "stdout")  # type: ignore[union-attr,index]
            assert stdout["write"] > stdout["read"]
        new = await hand_over(pio, nursery, mode)
        await write_all(w_out, out[before + paused:])
        await write_all(w_err, err[before + paused:])
        os.close(w_out)
        os.close(w_err)
        if not reader_early:
            nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        assert await new.wait_output()
    assert bytes(got) == out
    assert log.read_bytes() == err
    assert (new.counters.stdout, new.counters.stderr) == (len(out), len(err))
    assert new.counters.backlog("stdout") == (0, 0)
    new.close()
    assert open_fds() == fds_at_start


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.integers(0, 600_000),
    paused=st.integers(0, 60_000),
    after=st.integers(0, 200_000),
    reader_early=st.booleans(),
    mode=st.sampled_from(["adopt", "resume"]),
    on_disk=st.booleans(),
)
async def test_output_survives_a_pause_at_any_point(
    before: int, paused: int, after: int, reader_early: bool, mode: Mode, on_disk: bool
) -> None:
    with workdir() as tmp:
        await pump_output(tmp, before=before, paused=paused, after=after,
                          reader_early=reader_early, mode=mode, on_disk=on_disk)


@pytest.mark.parametrize("on_disk", [True, False])
@pytest.mark.parametrize("mode", ["adopt", "resume"])
async def test_a_held_backlog_is_handed_over(tmp_path: Path, mode: Mode, on_disk: bool) -> None:
    """Nobody reads the FIFO: ~1 MB waits in the backlog (a file, or memory moved to a
    memfd at pause), goes across, and comes out whole once a reader comes."""
    await pump_output(tmp_path, before=1_000_000, paused=10_000, after=100_000,
                      reader_early=False, mode=mode, on_disk=on_disk)


async def test_output_eof_reached_before_the_pause(tmp_path: Path) -> None:
    """The process is gone (its pipe read EOF) and the backlog waits for a reader: the
    pipe is not exported, the backlog is; wait_output keeps its meaning across."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    payload = numbered(500_000)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(w, payload)
        os.close(w)
        await until(lambda: pio.counters.backlog("stdout")[0] > 0 and pio._eofs == 1, "EOF")
        await pio.pause()
        state = json.loads(json.dumps(pio.export()))
        (stdout,) = state["outputs"]
        assert stdout["pipe_fd"] == -1 and stdout["finished"]
        assert state["eofs"] == 1
        new = adopt_streams(state)
        new.start(nursery)
        assert await new.wait_output(0.05) is False  # ended, but nothing moves: no reader
        got = bytearray()
        nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        assert await new.wait_output()
    assert bytes(got) == payload
    # Delivered and closed: a later export names no fd, and adopting it is "done".
    await new.pause()
    done = json.loads(json.dumps(new.export()))
    assert fds_of(done) == []
    again = adopt_streams(done)
    assert await again.wait_output()
    assert again.counters.stdout == len(payload)


async def test_a_gone_reader_stays_gone_across(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader found gone (output dropped past the limit) is still gone after adoption:
    what comes then is dropped at once, and counted; what was held comes out first."""
    monkeypatch.setattr(io_module, "STALL_TIMEOUT", 0.1)
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    pio.backlog_limit = 128 * 1024
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    payload = numbered(900_000)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(w, payload[:800_000])
        await until(lambda: pio.counters.stdout == 800_000, "read")
        held, dropped = pio.counters.backlog("stdout")
        assert dropped > 0
        await pio.pause()
        state = json.loads(json.dumps(pio.export()))
        assert state["outputs"][0]["stalled_at"] == state["delivered"]
        new = adopt_streams(state)
        assert new.counters.backlog("stdout") == (held, dropped)
        new.start(nursery)
        await write_all(w, payload[800_000:])
        await until(lambda: new.counters.stdout == len(payload), "read")
        assert new.counters.backlog("stdout") == (held, dropped + 100_000)
        os.close(w)
        nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        assert await new.wait_output()
    assert len(got) + new.counters.backlog("stdout")[1] == len(payload)
    assert payload.startswith(bytes(got))


# The new code, as a process of its own: it adopts the state (fds inherited by number,
# as across execve), copies until the output is delivered, and says what it counted.
NEW_CODE = """
import json, sys, trio
from supervisor.io import adopt_streams

async def main():
    streams = adopt_streams(json.loads(sys.argv[1]))
    async with trio.open_nursery() as nursery:
        streams.start(nursery)
        await streams.wait_output()
    streams.close()
    print(json.dumps([streams.counters.stdout, streams.counters.backlog("stdout")]))

trio.run(main)
"""


async def test_a_new_process_adopts_the_streams(tmp_path: Path) -> None:
    """The whole hand-over for real: fds() kept open into another process, export()
    as its argument; the old side closes its copies, as exec replaces it."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    payload = numbered(700_000)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(w, payload[:400_000])
        await until(lambda: pio.counters.stdout == 400_000, "read")  # ~340K held
        await pio.pause()
        fds = pio.fds()
        state = json.dumps(pio.export())
        new = subprocess.Popen([sys.executable, "-c", NEW_CODE, state], pass_fds=fds,
                               stdout=subprocess.PIPE)
        for fd in fds:  # exec leaves one holder: the new code
            os.close(fd)
        pio.close()  # exported: closes nothing
        nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        await write_all(w, payload[400_000:])
        os.close(w)
        out, _ = await trio.to_thread.run_sync(new.communicate)
    assert new.returncode == 0
    assert bytes(got) == payload
    assert json.loads(out) == [len(payload), [0, 0]]


# --- pipes: stdin ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["adopt", "resume"])
@pytest.mark.parametrize("close_first", [True, False])
async def test_stdin_loses_nothing_and_close_stdin_survives(
    tmp_path: Path, mode: Mode, close_first: bool
) -> None:
    """The process does not read: a chunk read from the FIFO waits for room in the pipe
    (carried across), more waits in the FIFO.  close_stdin asked before the pause is
    done after it: the process reads everything, then EOF."""
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    payload = numbered(300_000)
    pio = await ProcessIO.create(Stdio(stdin=str(fifo)))
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    child_stdin = os.dup(pio.child_fds[0])
    pio.spawned()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(writer, payload[:150_000])
        # More read than the pipe holds (64 KiB; nobody reads it): a chunk is carried.
        await until(lambda: pio.counters.stdin > 65536, "a chunk waits for the pipe")
        if close_first:
            pio.close_stdin()
        await pio.pause()
        state = pio.export()
        assert state["stdin_close"] is close_first
        new = await hand_over(pio, nursery, mode)
        if not close_first:
            nursery.start_soon(write_all, writer, payload[150_000:])
        nursery.start_soon(read_to_eof, child_stdin, got)
        if not close_first:
            await until(lambda: len(got) == len(payload), "all read")
            new.close_stdin()
    os.close(writer)
    assert bytes(got) == (payload[:150_000] if close_first else payload)
    assert new.counters.stdin == len(got)
    new.close()


async def test_pause_and_resume_in_place_again_and_again(tmp_path: Path) -> None:
    """Many pauses in a row, each resumed in place while output flows: nothing lost."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    payload = numbered(2_000_000)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        pio.start(nursery)
        step = 100_003
        for at in range(0, len(payload), step):
            await write_all(w, payload[at:at + step])
            await pio.pause()
            pio.resume()
        os.close(w)
        assert await pio.wait_output()
    assert bytes(got) == payload
    pio.close()


async def test_resume_after_a_failed_exec_takes_the_fds_back(tmp_path: Path) -> None:
    """Exported, close-on-exec cleared for an execve that failed: resume() owns the fds
    again, marks them close-on-exec (no child inherits them) and loses nothing."""
    fifo, inp = tmp_path / "out", tmp_path / "in"
    os.mkfifo(fifo)
    os.mkfifo(inp)
    before = open_fds()
    payload = numbered(500_000)
    pio = await ProcessIO.create(Stdio(stdin=str(inp), stdout=str(fifo)),
                                 spool_dir=str(tmp_path))
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(w, payload[:300_000])
        await until(lambda: pio.counters.stdout == 300_000, "read")
        await pio.pause()
        pio.export()
        for fd in pio.fds():
            os.set_inheritable(fd, True)  # what the upgrade does just before execve
        pio.resume()
        assert [os.get_inheritable(fd) for fd in pio.fds()] == [False] * len(pio.fds())
        nursery.start_soon(read_to_eof, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        await write_all(w, payload[300_000:])
        os.close(w)
        assert await pio.wait_output()
        pio.close_stdin()
    assert bytes(got) == payload
    pio.close()
    assert open_fds() == before


# --- the other states ------------------------------------------------------------------


async def test_a_closed_process_io_is_not_exported(tmp_path: Path) -> None:
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    before = open_fds()
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)), spool_dir=str(tmp_path))
    pio.spawned()
    pio.close()
    await pio.pause()  # nothing to do
    with pytest.raises(RuntimeError, match="closed"):
        pio.export()
    assert open_fds() == before


async def test_running_streams_are_paused_before_export(tmp_path: Path) -> None:
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    pio = await ProcessIO.create(Stdio(stdout=str(fifo)))
    pio.spawned()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        with pytest.raises(RuntimeError, match="pause"):
            pio.export()
        pio.close()
        nursery.cancel_scope.cancel()


async def test_fds_are_every_fd_the_object_holds(tmp_path: Path) -> None:
    """fds() (what survives exec) is exactly what the object opened: stdin FIFO and
    pipe, each output's pipe, destination and backlog file."""
    out, inp = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out)
    os.mkfifo(inp)
    before = open_fds()
    pio = await ProcessIO.create(Stdio(stdin=str(inp), stdout=str(out),
                                       stderr=f"file://{tmp_path}/err"),
                                 spool_dir=str(tmp_path))
    w, w_err = os.dup(pio.child_fds[1]), os.dup(pio.child_fds[2])
    pio.spawned()
    async with trio.open_nursery() as nursery:
        pio.start(nursery)
        await write_all(w, numbered(300_000))  # more than the FIFO takes: a backlog file
        await until(lambda: pio.counters.stdout == 300_000, "read")
        await pio.pause()
        assert set(pio.fds()) == open_fds() - before - {w, w_err}
        assert len(pio.fds()) == 2 + 3 + 2  # stdin 2; stdout pipe, FIFO, file; stderr 2
        pio.close()
    os.close(w)
    os.close(w_err)
    assert open_fds() == before


async def test_a_logging_binary_leaves_nothing_to_copy(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    """binary://: the logger reads the process's pipes itself; only stdin is ours."""
    reaper = Reaper()
    await nursery.start(reaper.run)
    logger = tmp_path / "logger"
    logger.write_text("#!/bin/sh\nexec 5>&-\ncat <&3 > \"$2\"\n")
    logger.chmod(0o755)
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    dest = tmp_path / "log"
    pio = await ProcessIO.create(
        Stdio(stdin=str(fifo), stdout=f"binary://{logger}?path={dest}"),
        reaper=reaper, owner=io_module.Owner("c1", "ns"))
    w = os.dup(pio.child_fds[1])
    pio.spawned()
    pio.start(nursery)
    await pio.pause()
    state = json.loads(json.dumps(pio.export()))
    assert state["kind"] == "binary" and state["outputs"] == []
    assert len(fds_of(state)) == 2  # the stdin FIFO and pipe
    new = adopt_streams(state)
    assert await new.wait_output()
    new.start(nursery)
    os.write(w, b"to the logger\n")
    os.close(w)
    await until(lambda: dest.exists() and dest.read_bytes() == b"to the logger\n", "logged")
    new.close()


# --- terminals -------------------------------------------------------------------------


def raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes pass as they are (no CR added, no echo)
    return master, slave


async def write_and_close(fd: int, data: bytes, done: trio.Event) -> None:
    await write_all(fd, data)
    os.close(fd)
    done.set()


@pytest.mark.parametrize("mode", ["adopt", "resume"])
@pytest.mark.parametrize("reader_early", [True, False])
async def test_console_output_and_input_survive(
    tmp_path: Path, mode: Mode, reader_early: bool
) -> None:
    """A slave writing numbered lines, a stdin FIFO with numbered bytes, nobody reading
    the slave's input (and, in one case, the output FIFO) at the pause: both directions
    arrive whole; the window size stays and resizing still works."""
    fds_at_start = open_fds()
    out_fifo, in_fifo = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out_fifo)
    os.mkfifo(in_fifo)
    master, slave = raw_pty()
    console = Console(master)
    console.resize(100, 40)
    opened = await open_stdio(Stdio(stdin=str(in_fifo), stdout=str(out_fifo), terminal=True))
    writer = os.open(in_fifo, os.O_WRONLY | os.O_NONBLOCK)
    output = numbered(400_000, b"t")
    keys = numbered(100_000, b"k")
    got_out, got_in = bytearray(), bytearray()
    first_out = trio.Event()
    async with trio.open_nursery() as nursery:
        if reader_early:
            nursery.start_soon(read_to_eof, os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK),
                               got_out)
        console.start(nursery, opened)
        nursery.start_soon(write_and_close, os.dup(slave), output[:150_000], first_out)
        await write_all(writer, keys[:60_000])  # the FIFO holds it
        await until(lambda: console.counters.stdout and console.counters.stdin, "flow")
        await console.pause()
        state = console.export()
        new = await hand_over(console, nursery, mode)
        assert isinstance(new, Console)
        assert new.size() == (100, 40)
        new.resize(120, 50)
        assert new.size() == (120, 50)
        if not reader_early:
            nursery.start_soon(read_to_eof, os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK),
                               got_out)
        nursery.start_soon(write_all, writer, keys[60_000:])
        slave_r = os.dup(slave)  # the process reads its terminal
        os.set_blocking(slave_r, False)
        with trio.fail_after(20):
            while len(got_in) < len(keys):
                try:
                    got_in += os.read(slave_r, 65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(slave_r)
        os.close(slave_r)
        with trio.fail_after(20):
            await first_out.wait()
        await write_all(slave, output[150_000:])
        os.close(slave)  # the last slave fd: the master reads EIO once all is read
        assert await new.wait_output()
        new.close_stdin()
    os.close(writer)
    assert set(state) >= {"out_pending", "in_pending"}
    assert bytes(got_in) == keys
    assert bytes(got_out) == output
    assert (new.counters.stdout, new.counters.stdin) == (len(output), len(keys))
    new.close()
    assert open_fds() == fds_at_start


# --- bad states --------------------------------------------------------------------------


def closed_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


async def test_adopt_names_what_is_wrong_and_closes_nothing(tmp_path: Path) -> None:
    out, inp = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out)
    os.mkfifo(inp)
    pio = await ProcessIO.create(Stdio(stdin=str(inp), stdout=str(out)), spool_dir=str(tmp_path))
    pio.spawned()
    await pio.pause()  # never started: paused as it is
    good = json.loads(json.dumps(pio.export()))
    held = open_fds()
    gone = closed_fd()

    def broken(**change: object) -> dict[str, object]:
        state = json.loads(json.dumps(good))
        for key, value in change.items():
            if key.startswith("out_"):
                state["outputs"][0][key[4:]] = value
            elif value is None:
                del state[key]
            else:
                state[key] = value
        return state  # type: ignore[no-any-return]

    cases: list[tuple[dict[str, object], str]] = [
        (broken(delivered=None), r"^io\.delivered: missing$"),
        (broken(delivered=-1), r"^io\.delivered: expected an integer >= 0"),
        (broken(kind="socket"), r"^io\.kind: 'socket' is not one of"),
        (broken(kind="none"), r"^io\.kind: 'none' does not match"),
        (broken(out_dest_fd=gone), rf"^io\.outputs\[0\]\.dest_fd: fd {gone} is not open"),
        (broken(out_pipe_fd=good["stdin_fifo_fd"]), r"^io: an fd is named twice"),
        (broken(out_pipe_fd=good["outputs"][0]["dest_fd"]),  # type: ignore[index]
         r"^io: an fd is named twice"),
        (broken(stdin_pipe_fd=-1), r"^io\.stdin_pipe_fd: stdin needs"),
        (broken(stdin_pending="not base64!"), r"^io\.stdin_pending: not base64"),
        (broken(out_read=5), r"^io\.outputs\[0\]\.read: 5 is past write"),
        (broken(outputs={}), r"^io\.outputs: expected a list"),
        (broken(stdin_close="yes"), r"^io\.stdin_close: expected true or false"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            adopt_streams(state)
        with pytest.raises(StreamStateError):
            adopt_streams(state)
    assert open_fds() == held  # nothing closed: the fds still belong to the state
    with pytest.raises(StreamStateError, match=r"^io: expected an object"):
        adopt_streams([])  # type: ignore[arg-type]
    new = adopt_streams(good)  # still whole
    new.close()


async def test_adopt_checks_what_kind_of_fd_each_is(tmp_path: Path) -> None:
    master, slave = raw_pty()
    console = Console(master)
    await console.pause()
    good = json.loads(json.dumps(console.export()))
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match=rf"^io\.master_fd: fd {r} is not a tty"):
            adopt_streams({**good, "master_fd": r})
        with pytest.raises(ValueError, match=rf"^term\.stdin_fd: fd {slave} is not a fifo"):
            adopt_streams({**good, "stdin_fd": slave, "stdin_path": "x"}, where="term")
        with pytest.raises(ValueError, match=r"^io\.master_fd: a terminal needs its master"):
            adopt_streams({**good, "master_fd": -1})
    finally:
        os.close(r)
        os.close(w)
    new = adopt_streams(good)
    assert isinstance(new, Console) and new.master == master
    new.close()
    os.close(slave)


async def test_a_console_whose_output_ended_is_done_after_adoption(tmp_path: Path) -> None:
    """Every slave closed and all output delivered before the pause: the adopted console
    is done at once (wait_output), holds no stdin, and the master still resizes."""
    out_fifo, in_fifo = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out_fifo)
    os.mkfifo(in_fifo)
    before = open_fds()
    master, slave = raw_pty()
    console = Console(master)
    opened = await open_stdio(Stdio(stdin=str(in_fifo), stdout=str(out_fifo), terminal=True))
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_to_eof, os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK), got)
        console.start(nursery, opened)
        await write_all(slave, b"bye\n")
        os.close(slave)
        assert await console.wait_output()
        await console.pause()
        state = json.loads(json.dumps(console.export()))
        assert state["output_done"] and state["stdout_fd"] == -1
        new = adopt_streams(state)
        assert await new.wait_output()
        new.start(nursery)
        assert isinstance(new, Console)
        new.resize(90, 30)
        assert new.size() == (90, 30)
        assert new.fds() == [new.master]  # stdin stopped when output ended
    assert bytes(got) == b"bye\n"
    new.close()
    assert open_fds() == before


def test_every_stream_kind_has_an_adopter() -> None:
    """Each kind StreamCounters can say is adoptable (a terminal's, once supervisor.console
    is imported: it registers itself, since it imports supervisor.io)."""
    kinds = {io_module._pipes_kind(s) for s in (Stdio(), Stdio(stdout="/x"),
                                                Stdio(stdout="binary:///l"))}
    assert set(io_module.ADOPTERS) == kinds | {Console.counters_kind}
