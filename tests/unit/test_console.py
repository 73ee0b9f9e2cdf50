"""Terminals: receiving the pty master over the console socket, copies, resize, real runc."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import termios
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from supervisor.console import Console, ConsoleError, ConsoleSocket
from supervisor.events import Event, Outbox
from supervisor.io import Opened, Stdio, open_stdio
from supervisor.reaper import Reaper, Subscription, spawn
from supervisor.task import TaskService

# A stand-in for `runc init`: make a pty, send the master over the console
# socket (name as data, one fd as SCM_RIGHTS), then run argv on the slave.
FAKE_RUNC = r"""
import os, socket, sys
master, slave = os.openpty()
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.connect(sys.argv[1])
    socket.send_fds(s, [b"/dev/ptmx"], [master])
os.close(master)
os.login_tty(slave)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@pytest.fixture
async def reaper(nursery: trio.Nursery) -> Reaper:
    r = Reaper()
    await nursery.start(r.run)
    return r


async def terminal_stdio(stdin: str, stdout: str) -> Opened:
    return await open_stdio(Stdio(stdin=stdin, stdout=stdout, terminal=True))


def make_fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def open_reader(fifo: str) -> int:
    return os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


async def read_until_eof(fd: int) -> bytes:
    """Read a FIFO (opened O_NONBLOCK) until every writer is gone; closes it."""
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


async def read_until(fd: int, needle: bytes, got: bytearray) -> None:
    """Append what ``fd`` yields to ``got`` until ``needle`` appears in it."""
    while needle not in got:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        assert data, f"EOF before {needle!r}; got {bytes(got)!r}"
        got += data


def winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack(
        "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    )
    return rows, cols


def start_fake_runc(sock: ConsoleSocket, argv: Sequence[str]) -> int:
    return spawn([sys.executable, "-c", FAKE_RUNC, sock.path, *argv])


async def test_fake_runc_master_arrives_and_all_output_flows(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path
) -> None:
    fifo = make_fifo(tmp_path / "stdout")
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        # More than a FIFO holds: the copy must keep pace with our reader.
        pid = start_fake_runc(cs, ["seq", "1", "30000"])
        master = await cs.receive_master(timeout=10)
        assert os.isatty(master)
        console = Console(master)
        reader = open_reader(fifo)
        console.start(nursery, await terminal_stdio("", fifo))
        async with trio.open_nursery() as inner:
            result: list[bytes] = []

            async def collect() -> None:
                result.append(await read_until_eof(reader))

            inner.start_soon(collect)
            assert (await sub.wait_for(pid)).status == 0
            assert await console.wait_output(10)
        expected = b"".join(b"%d\r\n" % i for i in range(1, 30001))
        assert result[0] == expected
        assert console.counters.stdout == len(expected)
        console.close()
        console.close()
    assert not os.path.exists(cs.path)


async def test_stdin_survives_a_writer_leaving(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path
) -> None:
    out_fifo = make_fifo(tmp_path / "stdout")
    in_fifo = make_fifo(tmp_path / "stdin")
    script = 'read a; echo "got:$a"; read b; echo "got:$b"'
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        pid = start_fake_runc(cs, ["sh", "-c", script])
        console = Console(await cs.receive_master(timeout=10))
        reader = open_reader(out_fifo)
        console.start(nursery, await terminal_stdio(in_fifo, out_fifo))
        got = bytearray()
        with trio.fail_after(10):
            for word in (b"one", b"two"):
                # Each writer comes, writes and goes, as a client attaching would.
                w = os.open(in_fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(w, word + b"\n")
                os.close(w)
                await read_until(reader, b"got:" + word + b"\r\n", got)
            assert (await sub.wait_for(pid)).status == 0
            assert await console.wait_output()
        got += await read_until_eof(reader)
        assert console.counters.stdin == 8
        assert console.counters.stdout == len(got)
        console.close()


async def test_resize_sets_the_slave_window(tmp_path: Path) -> None:
    master, slave = os.openpty()
    console = Console(master)
    try:
        console.resize(80, 24)
        assert winsize(slave) == (24, 80)
        assert console.size() == (80, 24)
        console.resize(132, 50)
        assert winsize(slave) == (50, 132)
        with pytest.raises(ValueError):
            console.resize(-1, 10)
    finally:
        console.close()
        os.close(slave)
    with pytest.raises(ConsoleError):
        console.resize(80, 24)


async def test_output_ends_only_when_every_slave_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fifo = make_fifo(tmp_path / "stdout")
    master, slave = os.openpty()
    other = os.dup(slave)
    console = Console(master)
    reader = open_reader(fifo)
    console.start(nursery, await terminal_stdio("", fifo))
    os.write(slave, b"first\n")
    os.close(slave)
    assert not await console.wait_output(0.2)
    os.write(other, b"second\n")
    os.close(other)
    assert await console.wait_output(5)
    assert await read_until_eof(reader) == b"first\r\nsecond\r\n"
    # The master stays open until close(): resizing a finished console is harmless.
    console.resize(10, 10)
    console.close()
    assert console.master == -1


async def test_close_stdin_delivers_what_was_written_then_stops(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    in_fifo = make_fifo(tmp_path / "stdin")
    master, slave = os.openpty()
    os.set_blocking(slave, False)
    console = Console(master)
    console.start(nursery, await terminal_stdio(in_fifo, ""))
    w = os.open(in_fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"abc\n")
    console.close_stdin()
    got = bytearray()
    with trio.fail_after(5):
        await read_until(slave, b"abc\n", got)
        # The copy closed its reader: a new writer finds no one (ENXIO).
        while True:
            try:
                os.close(os.open(in_fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            await trio.sleep(0.01)
    assert console.counters.stdin == 4
    assert console.master >= 0
    assert not console.output_done
    os.close(w)
    os.close(slave)
    assert await console.wait_output(5)
    console.close()


async def test_close_while_copies_wait(nursery: trio.Nursery, tmp_path: Path) -> None:
    in_fifo = make_fifo(tmp_path / "stdin")
    out_fifo = make_fifo(tmp_path / "stdout")
    master, slave = os.openpty()
    console = Console(master)
    console.start(nursery, await terminal_stdio(in_fifo, out_fifo))
    await trio.sleep(0.05)  # both copies are parked in wait_readable now
    console.close()
    assert await console.wait_output(1)
    await trio.sleep(0.05)  # the copies wind down without raising into the nursery
    with pytest.raises(OSError) as nobody:
        os.open(in_fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert nobody.value.errno == errno.ENXIO
    os.close(slave)
    with pytest.raises(ConsoleError):
        console.start(nursery, await terminal_stdio(in_fifo, out_fifo))


async def test_receive_timeout_and_idempotent_close(tmp_path: Path) -> None:
    cs = ConsoleSocket.create(str(tmp_path))
    assert os.path.dirname(cs.path) == str(tmp_path)
    assert os.path.exists(cs.path)
    with pytest.raises(TimeoutError):
        await cs.receive_master(timeout=0.1)
    cs.close()
    assert not os.path.exists(cs.path)
    cs.close()
    with pytest.raises(ConsoleError):
        await cs.receive_master(timeout=0.1)


async def test_long_directory_falls_back_to_a_temp_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with ConsoleSocket.create(str(deep)) as cs:
        assert len(os.fsencode(cs.path)) <= 107
        assert not cs.path.startswith(str(deep))
        tmpdir = os.path.dirname(cs.path)
        assert os.path.exists(cs.path)
    assert not os.path.exists(tmpdir)


async def test_a_peer_without_a_terminal_fd_is_refused(tmp_path: Path) -> None:
    with ConsoleSocket.create(str(tmp_path)) as cs:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(cs.path)
            peer.sendall(b"/dev/ptmx")
            with pytest.raises(ConsoleError, match="expected one fd, got 0"):
                await cs.receive_master(timeout=5)
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                peer.connect(cs.path)
                socket.send_fds(peer, [b"pipe"], [r])
                with pytest.raises(ConsoleError, match="not a terminal"):
                    await cs.receive_master(timeout=5)
        finally:
            os.close(r)
            os.close(w)


# --- real runc ---------------------------------------------------------------

def _runc_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("runc") is None:
        return "runc not installed"
    if not os.path.exists("/bin/busybox"):
        return "needs a static /bin/busybox"
    return ""


async def _run(sub: Subscription, argv: list[str], log: Path) -> tuple[int, str]:
    with open(log, "wb") as f:
        pid = spawn(argv, fds={1: f.fileno(), 2: f.fileno()})
    status = (await sub.wait_for(pid)).status
    return status, log.read_text(errors="replace")


@pytest.mark.skipif(bool(_runc_missing()), reason=_runc_missing() or "runs")
async def test_real_runc_terminal(nursery: trio.Nursery, reaper: Reaper, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "tty", "stty"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    runc = ["runc", "--root", str(tmp_path / "runc")]
    log = tmp_path / "runc.log"
    cid = f"svcon-{secrets.token_hex(4)}"
    fifo = make_fifo(tmp_path / "stdout")
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        status, text = await _run(sub, ["runc", "spec", "--bundle", str(bundle)], log)
        assert status == 0, text
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["terminal"] = True
        config["process"]["args"] = ["sh", "-c", "tty; stty size"]
        config["root"]["readonly"] = False
        (bundle / "config.json").write_text(json.dumps(config))
        pid_file = tmp_path / "init.pid"
        console: Console | None = None
        try:
            with trio.fail_after(30):
                status, text = await _run(sub, [
                    *runc, "create", "--console-socket", cs.path, "--pid-file", str(pid_file),
                    "--bundle", str(bundle), cid,
                ], log)
                assert status == 0, text
                console = Console(await cs.receive_master(timeout=10))
                init = int(pid_file.read_text())
                console.resize(100, 30)
                reader = open_reader(fifo)
                console.start(nursery, await terminal_stdio("", fifo))
                status, text = await _run(sub, [*runc, "start", cid], log)
                assert status == 0, text
                assert (await sub.wait_for(init)).status == 0
                assert await console.wait_output(10)
                out = await read_until_eof(reader)
            assert re.search(rb"^/dev/pts/\d+\r?$", out, re.M), out
            assert re.search(rb"^30 100\r?$", out, re.M), out
            assert console.counters.stdout == len(out)
        finally:
            if console is not None:
                console.close()
            await _run(sub, [*runc, "delete", "-f", cid], log)


# --- the drain rule: a slow reader loses nothing, a daemon holds nothing ---------

# Output several MB long; each record numbered, so a loss anywhere shows.
BIG_OUTPUT = r"""
import os
data = memoryview(b"".join(b"%08d," % n for n in range(350_000)))
while data:
    data = data[os.write(1, data):]
"""
BIG_EXPECTED = b"".join(b"%08d," % n for n in range(350_000))
# The reader slows down for the last SLOW_TAIL bytes, until output is done: more
# than the FIFO (64 KiB) and the pty (~12 KiB) hold together, so when the process
# exits its last bytes are still in the pty and the copy's hands.  A pipe frees
# room a page at a time, so the slow reader takes a page per SLOW_STEP: the copy
# moves in every DRAIN_PERIOD, yet the pty's few pages take it well over one.
SLOW_TAIL = 80 * 1024
SLOW_STEP = 0.5
DRAIN_PERIOD = 1.0


async def read_slowly_at_the_end(
    fd: int, size: int, got: bytearray, console: Console
) -> None:
    """Read a FIFO to EOF; a page per ``SLOW_STEP`` once ``SLOW_TAIL`` bytes of ``size``
    are left, until ``console``'s output is done."""
    try:
        while True:
            left = size - len(got)
            slow = left <= SLOW_TAIL and not console.output_done
            try:
                data = os.read(fd, 4096 if slow else max(4096, min(65536, left - SLOW_TAIL)))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not data:
                return
            got += data
            if slow:
                await trio.sleep(SLOW_STEP)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


async def test_a_slow_reader_gets_every_byte_before_output_is_done(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path
) -> None:
    """Issue 15 item 8: the end of a terminal's output was cut off by a fixed 2 s wait."""
    fifo = make_fifo(tmp_path / "stdout")
    got = bytearray()
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        pid = start_fake_runc(cs, [sys.executable, "-c", BIG_OUTPUT])
        console = Console(await cs.receive_master(timeout=10))
        reader = open_reader(fifo)
        console.start(nursery, await terminal_stdio("", fifo))
        async with trio.open_nursery() as inner:
            inner.start_soon(read_slowly_at_the_end, reader, len(BIG_EXPECTED), got, console)
            assert (await sub.wait_for(pid)).status == 0
            assert console.slave_closed()
            # What task.py does before it reports the exit:
            assert await console.wait_output(DRAIN_PERIOD)
            assert console.output_done
            assert console.delivered == console.counters.stdout == len(BIG_EXPECTED)
        assert got == BIG_EXPECTED
        console.close()


def daemon_script(body: str) -> str:
    """sh that starts ``body`` in the background holding the terminal, prints its pid, exits.

    SIGHUP, which the session leader's exit sends to its group, is ignored (from
    before the fork: a daemon would detach).  ``body`` ends by itself within minutes,
    so a test that fails before it learns the pid leaves nothing running for long.
    """
    return f"trap '' HUP; ({body}) & echo pid=$!"


async def start_daemonizing(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path, body: str
) -> tuple[Console, int, int]:
    """Run ``sh -c daemon_script(body)`` on a terminal; (console, stdout reader, daemon pid)
    once sh has exited."""
    fifo = make_fifo(tmp_path / "stdout")
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        pid = start_fake_runc(cs, ["sh", "-c", daemon_script(body)])
        console = Console(await cs.receive_master(timeout=10))
        reader = open_reader(fifo)
        console.start(nursery, await terminal_stdio("", fifo))
        got = bytearray()
        with trio.fail_after(10):
            await read_until(reader, b"\r\n", got)
            assert (await sub.wait_for(pid)).status == 0
    match = re.search(rb"pid=(\d+)\r\n", got)
    assert match, got
    return console, reader, int(match[1])


async def test_a_daemon_holding_the_slave_does_not_hold_wait_output(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path
) -> None:
    console, reader, daemon = await start_daemonizing(nursery, reaper, tmp_path, "exec sleep 120")
    try:
        assert not console.slave_closed()
        assert not await console.wait_output(0.5)
    finally:
        os.kill(daemon, 9)
    # Its death closes the last slave fd: output ends on its own.
    assert await console.wait_output(10)
    assert console.slave_closed()
    await read_until_eof(reader)
    console.close()


async def test_a_chatty_daemon_is_not_waited_for_although_output_moves(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path
) -> None:
    """Progress alone is not the rule: while the slave is held, the output is a child's."""
    console, reader, daemon = await start_daemonizing(
        nursery, reaper, tmp_path,
        "i=0; while [ $i -lt 3000 ]; do echo tick; sleep 0.02; i=$((i+1)); done")
    try:
        with trio.fail_after(10):
            await read_until(reader, b"tick\r\ntick\r\n", bytearray())
        before = console.delivered
        assert not await console.wait_output(0.5)
        assert console.delivered > before
    finally:
        os.kill(daemon, 9)
    assert await console.wait_output(10)
    await read_until_eof(reader)
    console.close()


#: Left unread while the reader stalls: a little more than the FIFO holds (64 KiB), so
#: the copy is stuck with the rest in its hands, and little enough that the process can
#: write it all (into the pty) and exit.
STALL_TAIL = 68 * 1024


async def read_stalling_at_the_end(fd: int, size: int, resume: trio.Event, got: bytearray
                                   ) -> None:
    """Read a FIFO to EOF, stalling with ``STALL_TAIL`` bytes of ``size`` left until
    ``resume`` is set."""
    try:
        while True:
            left = size - len(got) - STALL_TAIL
            if left <= 0 and not resume.is_set():
                await resume.wait()
            try:
                data = os.read(fd, 65536 if resume.is_set() else min(65536, left))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not data:
                return
            got += data
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


async def test_a_deleted_exec_still_delivers_output_its_reader_was_slow_to_take(
    nursery: trio.Nursery, reaper: Reaper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd's client deletes an exec as soon as it exited, then reads its stdout
    FIFO to EOF.  A reader that stalled past the drain period lost the end of a
    terminal's output (`TestContainerExecLargeOutputWithTTY`, under load): Delete
    closed the console.  The output is finite (every slave fd is closed), so it goes
    on being delivered after Delete, and the console is closed once it has been."""
    from supervisor import container as container_mod  # noqa: PLC0415
    from supervisor.process import State  # noqa: PLC0415

    monkeypatch.setattr(container_mod, "DRAIN_TIMEOUT", 0.2)
    fifo = make_fifo(tmp_path / "stdout")
    got = bytearray()
    resume = trio.Event()
    box = container_mod.Container("c", str(tmp_path), namespace="ns",
                                  settings=container_mod.Settings(), reaper=reaper,
                                  rootfs=[], stdio=Stdio())
    with reaper.subscribe() as sub, ConsoleSocket.create(str(tmp_path)) as cs:
        pid = start_fake_runc(cs, [sys.executable, "-c", BIG_OUTPUT])
        console = Console(await cs.receive_master(timeout=10))
        reader = open_reader(fifo)
        console.start(nursery, await terminal_stdio("", fifo))
        async with trio.open_nursery() as inner:
            inner.cancel_scope.deadline = trio.current_time() + 30  # never hang the suite
            inner.start_soon(read_stalling_at_the_end, reader, len(BIG_EXPECTED), resume, got)
            assert (await sub.wait_for(pid)).status == 0
            process = container_mod.Process("c", "e1", Stdio(terminal=True))
            process.io, process.state = console, State.STOPPED
            box.execs["e1"] = process
            await box.delete_exec(process)  # the reader still stalls: not delivered yet
            assert process.state is State.DELETED and "e1" not in box.execs
            assert not console.closed and box.delivering == [console]
            # An upgrade now would leave it behind: the hand-over waits for it.
            service = TaskService(reaper=reaper, outbox=Outbox(_nowhere, "ns"),
                                  nursery=nursery, namespace="ns", request_shutdown=list)
            box.created.set()
            service.containers["c"] = box
            assert "still delivers its output" in (service.handover_refusal() or "")
            resume.set()
        assert got == BIG_EXPECTED  # every byte, to EOF
    assert console.output_done
    other = container_mod.Process("c", "e2", Stdio())
    other.state = State.STOPPED
    await box.delete_exec(other)  # the next Delete closes what has been delivered
    assert console.closed and box.delivering == []
    assert service.handover_refusal() is None


async def _nowhere(event: Event) -> None:
    raise ConnectionError("no containerd in this test")
