"""A process's standard streams: where containerd wants them, and the pipes and copies to them.

Design
------
containerd names each stream's destination by a URI (:class:`Stdio`), and
:func:`open_stdio` is the one place that opens every form, for pipes and
terminals alike (the terminal copies of :mod:`supervisor.console` use it too):

* a plain path or ``fifo://path``: a FIFO that containerd (or ``ctr``)
  created.  Output FIFOs are opened ``O_RDWR|O_NONBLOCK``: the open never
  blocks, and because the shim holds both ends, a reader that comes and goes
  never turns our writes into EPIPE; the stream only ends when the shim closes
  it after the process's last byte.  (A plain path that is a regular file is
  appended to.)  The stdin FIFO is opened ``O_RDONLY|O_NONBLOCK`` and read only
  after ``poll`` says so: a read with no writer would be a false EOF.  Stdin
  takes only these two forms.
* ``file:///path``: appended to the file (its directory created).  A write
  error is logged and the copy keeps draining, so the container never blocks
  or dies because of its log.
* ``binary:///path?k=v``: a logging binary, started as containerd documents
  it (``path k v``, environment ``CONTAINER_ID`` and ``CONTAINER_NAMESPACE``
  only, fd 3 the stdout pipe, fd 4 the stderr pipe, fd 5 a pipe it writes to
  or closes when it is ready).  Its pipes are the destinations: a piped
  process writes to them itself (the shim copies nothing); a terminal's output
  is copied into the stdout pipe, and the stderr pipe is closed at once (a
  terminal has one output), as containerd's own shim does.  The process is not
  created before the binary is ready.

The streams of a piped process (:class:`ProcessIO`): the container process
never sees containerd's FIFOs.  It gets the write ends of pipes the shim made
(stdout, stderr) and the read end of a stdin pipe; the shim copies between
those pipes and the destinations.  The one deliberate difference from a
terminal is the end of input: for pipes, a writer closing the stdin FIFO (or
:meth:`ProcessIO.close_stdin` once what was written has been delivered) closes
the process's stdin; a terminal's end of input is in-band, so it reopens the
FIFO and waits for the next writer (see :mod:`supervisor.console`).

Invariants
----------
* Output is drained to EOF before the process's exit is reported
  (:meth:`ProcessIO.wait_output`), so nothing the process wrote is lost.
* Copies use large buffers and no per-line work.
* Only this module and :mod:`supervisor.console` touch the stdio fds; the
  process layer sees :attr:`ProcessIO.child_fds` (hand them to the runtime,
  then call :meth:`ProcessIO.spawned`) and, for either kind,
  :attr:`Streams.counters`.
* Every fd opened for a process has exactly one owner at every moment: a
  failed open closes whatever was opened before it.
* A backlog never holds a byte that was not written: what the disk refuses
  (a short write, ENOSPC) is counted in :attr:`Backlog.dropped`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from supervisor.reaper import Reaper, spawn

log = logging.getLogger("supervisor.io")

COPY_BUFFER = 256 * 1024
PIPE_SIZE = 1024 * 1024
#: Output held for a destination whose reader is away (containerd down), per stream.
BACKLOG_LIMIT = 64 * 1024 * 1024
#: A reader that takes nothing for this long while the backlog is full is gone.
STALL_TIMEOUT = 5.0
#: How long copies may go on after the process was deleted.
CLOSE_GRACE = 5.0


@dataclass(frozen=True)
class Stdio:
    """Where containerd wants a process's streams (as in the task request)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


class Streams(Protocol):
    """What the process layer needs of a process's stdio (pipes or a terminal)."""

    counters: StreamCounters

    def close_stdin(self) -> None: ...

    async def wait_output(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Owner:
    """Who a logging binary works for (its environment)."""

    container_id: str
    namespace: str


def logger_argv(uri: str) -> list[str]:
    """``binary:///path?k=v&flag`` -> ``[path, k, v, flag]`` (query order kept)."""
    parts = urlsplit(uri)
    if not parts.path:
        raise ValueError(f"logging binary URI {uri!r} names no binary")
    argv = [unquote(parts.path)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        argv.append(key)
        if value:
            argv.append(value)
    return argv


@dataclass
class StreamCounters:
    """What a process's stdio did, as ``supervisor inspect`` shows it (pipes and terminals).

    ``kind`` is ``"pipes"``, ``"binary"`` (a logging binary reads the process's
    pipes), ``"terminal"`` or ``"none"``; ``stdin``/``stdout``/``stderr`` count
    bytes copied (a terminal has one output: its ``stderr`` stays 0).  The
    output backlogs of piped streams are here by name, not copied: their
    ``held`` and ``dropped`` are read live.
    """

    kind: str = "none"
    stdin: int = 0
    stdout: int = 0
    stderr: int = 0
    backlogs: dict[str, Backlog] = field(default_factory=dict)

    def backlog(self, stream: str) -> tuple[int, int]:
        """(bytes held, bytes dropped) of ``stream``'s backlog; (0, 0) without one."""
        b = self.backlogs.get(stream)
        return (b.held, b.dropped) if b is not None else (0, 0)


async def wait_delivered(
    done: trio.Event,
    timeout: float | None,
    *,
    ended: Callable[[], bool],
    progress: Callable[[], int],
) -> bool:
    """Wait for ``done`` (a process's output delivered to its end): the one drain rule.

    Pipes (:meth:`ProcessIO.wait_output`) and terminals
    (:meth:`supervisor.console.Console.wait_output`) both wait by it.  Without
    ``timeout``, wait as long as it takes.  With one, give up (False) once a
    ``timeout`` period passes without ``done`` -- unless ``ended()`` (the
    process's side is closed: every pipe read EOF, every slave fd of the
    terminal is closed) and ``progress()`` (a count of bytes moved) changed
    during that period: then what is left is the process's own output on its
    way to a slow reader, and waiting goes on, one period at a time, for as
    long as it moves.  A source that has not ended is held by a child of the
    process (a daemon keeping the pipe or the slave open): that is never
    waited for beyond one period, however much it writes.
    """
    if timeout is None:
        await done.wait()
        return True
    while True:
        mark = progress()
        with trio.move_on_after(timeout):
            await done.wait()
            return True
        if not ended() or progress() == mark:
            return False


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    except OSError:
        pass  # a smaller pipe only costs throughput (the limit is per user)


def read_nowait(fd: int, size: int = COPY_BUFFER) -> bytes:
    """What a non-blocking fd has now (b"" if nothing: EAGAIN, or EOF)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def stdin_path(uri: str) -> str:
    """The FIFO a stdin URI names (a plain path or ``fifo://path``)."""
    if uri.startswith("fifo://"):
        return unquote(urlsplit(uri).path)
    if "://" in uri:
        raise ValueError(f"unsupported stdin URI {uri!r} (a FIFO path or fifo:// only)")
    return uri


def open_stdin(path: str) -> int:
    """Open the stdin FIFO at ``path`` (from :func:`stdin_path`) for polling."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def open_output(uri: str) -> int:
    """Open a ``file://``, ``fifo://`` or plain-path destination: a writable fd (ours)."""
    if uri.startswith("file://"):
        path = unquote(urlsplit(uri).path)
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    if uri.startswith("fifo://"):
        uri = unquote(urlsplit(uri).path)
    if "://" in uri:
        raise ValueError(f"unsupported stdio URI scheme in {uri!r}")
    st = os.stat(uri)
    if stat.S_ISFIFO(st.st_mode):
        return os.open(uri, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    return os.open(uri, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


@dataclass
class Opened:
    """The destinations of one process's streams, opened by :func:`open_stdio`.

    Every fd is ours (-1: no such stream) until a consumer takes it: it
    clears the field then, and :meth:`close` closes only what is left.
    ``stdout``/``stderr`` are where output goes; with a logging binary
    (``logger_pid`` set) they are the write ends of its pipes.
    """

    stdin: int = -1
    stdin_path: str = ""
    stdout: int = -1
    stderr: int = -1
    logger_pid: int = 0

    def close(self) -> None:
        _close_all([self.stdin, self.stdout, self.stderr])
        self.stdin = self.stdout = self.stderr = -1


async def open_stdio(
    stdio: Stdio,
    *,
    reaper: Reaper | None = None,
    owner: Owner | None = None,
) -> Opened:
    """Open every destination ``stdio`` names (see the module's Design); all or nothing.

    For a terminal only stdout is output.  A logging binary needs ``owner``
    (its environment) and a running ``reaper`` (which reaps it); who owns its
    pipes is :class:`ProcessIO`'s business (a piped process writes to them).  Raises
    ValueError for a URI this shim cannot serve, OSError if a path cannot be
    opened or the logging binary cannot start.
    """
    opened = Opened()
    try:
        if stdio.stdin:
            opened.stdin_path = stdin_path(stdio.stdin)
            opened.stdin = open_stdin(opened.stdin_path)
        if stdio.stdout.startswith("binary://"):
            if reaper is None or owner is None:
                raise ValueError("a logging binary needs the reaper and the container's id")
            await _start_logger(opened, stdio, reaper=reaper, owner=owner)
        else:
            if stdio.stdout:
                opened.stdout = open_output(stdio.stdout)
            if stdio.stderr and not stdio.terminal:
                opened.stderr = open_output(stdio.stderr)
    except BaseException:
        opened.close()
        raise
    return opened


async def _start_logger(
    opened: Opened, stdio: Stdio, *, reaper: Reaper, owner: Owner
) -> None:
    """Start the logging binary of ``stdio.stdout``; its pipes' write ends go in ``opened``."""
    argv = logger_argv(stdio.stdout)
    out_r, opened.stdout = os.pipe2(os.O_CLOEXEC)
    err_r, opened.stderr = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        for r in (out_r, err_r):
            _grow_pipe(r)
        if stdio.terminal:  # one output: the binary sees EOF on its stderr pipe
            os.close(opened.stderr)
            opened.stderr = -1
        env = {"CONTAINER_ID": owner.container_id, "CONTAINER_NAMESPACE": owner.namespace}
        try:
            opened.logger_pid = spawn(argv, fds={3: out_r, 4: err_r, 5: ready_w}, env=env)
        except OSError as e:
            raise OSError(e.errno, f"starting logging binary {argv[0]}: {e.strerror}") from e
        _close_all([out_r, err_r, ready_w])
        out_r = err_r = ready_w = -1
        # Ready when it writes a byte or closes fd 5 (or dies).
        await trio.lowlevel.wait_readable(ready_r)
    finally:
        _close_all([out_r, err_r, ready_w, ready_r])


class Backlog:
    """Output the destination's reader has not taken yet: a bounded, ordered spool.

    Bytes go to an unnamed temporary file in ``directory`` (``O_TMPFILE``: it
    vanishes with the shim) and leave it in order.  At ``limit`` bytes held, the
    copy stops reading while the reader makes progress (a slow reader loses
    nothing); if it takes nothing for :data:`STALL_TIMEOUT` seconds (containerd
    is down), further output is dropped and counted in :attr:`dropped` rather
    than blocking the process.  Without a usable directory the backlog lives in
    memory, with the same limit.  What a full disk refuses is dropped and
    counted the same way: the file holds only bytes that were written, so the
    reader may see a gap, never invented bytes.
    """

    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.dropped = 0
        self.spooled = 0  # bytes that ever went through the backlog
        self.broken = False
        self.finished = False
        self._full = False  # the file refused bytes (warned once per episode)
        self._fd = -1
        self._memory = bytearray()
        self._read = 0
        self._write = 0
        self._event = trio.Event()
        self._progress = trio.Event()

    @property
    def held(self) -> int:
        return self._write - self._read

    @property
    def empty(self) -> bool:
        return self.held == 0

    def _file(self) -> int:
        if self._fd < 0 and self.directory:
            try:
                self._fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as e:
                log.warning("output backlog in memory (%s: %s)", self.directory, e)
                self.directory = ""
        return self._fd

    def append(self, data: bytes) -> None:
        """Hold ``data`` (the copy keeps :attr:`held` near :attr:`limit`; see above).

        What a full disk refuses (a short write, ENOSPC, EDQUOT) is dropped and
        counted; the file keeps what it took and takes more once it has room.
        Any other file error moves the backlog to memory (what the file held
        is counted as dropped).
        """
        fd = self._file()
        if fd >= 0:
            try:
                n = os.pwrite(fd, data, self._write)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.warning("output backlog file failed (%s); keeping it in memory", e)
                    os.close(fd)
                    self._fd = -1
                    self.directory = ""
                    self.dropped += self.held  # what the file held is lost
                    self._read = self._write = 0
                    self._hold(data, len(data))
                    return
                n = 0
            if n < len(data):
                if not self._full:
                    log.warning("output backlog file is full; dropping output until it has room")
                self._full = True
                self.dropped += len(data) - n
            else:
                self._full = False
            self._hold(b"", n)
        else:
            self._hold(data, len(data))

    def _hold(self, data: bytes, n: int) -> None:
        """``n`` more bytes are held (``data`` kept in memory: the in-memory backlog)."""
        self._memory += data
        self._write += n
        self.spooled += n
        if n:
            self._event.set()

    def peek(self, size: int = COPY_BUFFER) -> bytes:
        if self.empty:
            return b""
        if self._fd >= 0:
            return os.pread(self._fd, min(size, self.held), self._read)
        start = self._read - (self._write - len(self._memory))
        return bytes(self._memory[start:start + size])

    def consume(self, n: int) -> None:
        self._read += n
        self._progress.set()
        if self.empty:
            # Caught up: start the spool over.
            self._read = self._write = 0
            self._memory.clear()
            if self._fd >= 0:
                os.ftruncate(self._fd, 0)
        elif self._fd < 0 and self._read - (self._write - len(self._memory)) > COPY_BUFFER:
            cut = self._read - (self._write - len(self._memory))
            del self._memory[:cut]

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()

    async def wait_progress(self) -> None:
        await self._progress.wait()
        self._progress = trio.Event()

    def finish(self) -> None:
        self.finished = True
        self._event.set()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pipes_kind(stdio: Stdio) -> str:
    if stdio.stdout.startswith("binary://"):
        return "binary"
    return "none" if stdio.is_null() else "pipes"


class ProcessIO:
    """The pipes of one process and the copies between them and containerd.

    Build it with :meth:`create`, hand :attr:`child_fds` to the runtime, call
    :meth:`spawned` once the runtime has started the process (our copies of
    the child's ends are closed then), and :meth:`start` the copies.
    """

    def __init__(self, stdio: Stdio) -> None:
        self.stdio = stdio
        self.counters = StreamCounters(kind=_pipes_kind(stdio))
        self.child_fds: dict[int, int] = {}
        self._child_ends: list[int] = []
        self._stdin_w = -1
        self._stdin_fifo = -1
        self._outputs: list[tuple[str, int, int]] = []  # (name, pipe read end, dest fd)
        self._output_done = trio.Event()
        self._outputs_left = 0
        self._stdin_close_requested = False
        self._stdin_scope: trio.CancelScope | None = None
        self._stdin_copying = False
        self._closed = False
        self.spool_dir = ""
        self.backlog_limit = BACKLOG_LIMIT
        self.delivered = 0  # bytes written to the destinations
        self._eofs = 0  # output pipes that reached EOF
        self._outputs_total = 0
        self._copies = trio.CancelScope()

    @classmethod
    async def create(
        cls,
        stdio: Stdio,
        *,
        uid: int = -1,
        gid: int = -1,
        reaper: Reaper | None = None,
        owner: Owner | None = None,
        spool_dir: str = "",
    ) -> ProcessIO:
        io = cls(stdio)
        io.spool_dir = spool_dir
        opened = await open_stdio(stdio, reaper=reaper, owner=owner)
        try:
            io._setup(opened, uid, gid)
        except BaseException:
            io.close()
            raise
        finally:
            opened.close()  # whatever _setup did not take
        return io

    def _setup(self, opened: Opened, uid: int, gid: int) -> None:
        """Make the process's pipes around ``opened``, taking the fds it uses."""
        devnull = -1

        def null() -> int:
            nonlocal devnull
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                self._child_ends.append(devnull)
            return devnull

        if opened.stdin >= 0:
            self._stdin_fifo, opened.stdin = opened.stdin, -1
            r, self._stdin_w = os.pipe2(os.O_CLOEXEC)
            self._child_ends.append(r)
            self.child_fds[0] = r
        else:
            self.child_fds[0] = null()
        to_logger = opened.logger_pid != 0  # the logging binary reads its pipes itself
        for n, name in ((1, "stdout"), (2, "stderr")):
            dest = opened.stdout if n == 1 else opened.stderr
            if dest < 0:
                self.child_fds[n] = null()
                continue
            if n == 1:
                opened.stdout = -1
            else:
                opened.stderr = -1
            if to_logger:  # chowned with the other child ends below
                self._child_ends.append(dest)
                self.child_fds[n] = dest
                continue
            try:
                r, w = os.pipe2(os.O_CLOEXEC)
            except BaseException:
                os.close(dest)
                raise
            self._outputs.append((name, r, dest))
            self._child_ends.append(w)
            _grow_pipe(r)
            self.child_fds[n] = w
        if uid >= 0 or gid >= 0:
            for fd in self._child_ends:
                if fd != devnull:
                    os.fchown(fd, uid, gid)
        self._outputs_left = self._outputs_total = len(self._outputs)
        if not self._outputs:
            self._output_done.set()

    def unread_output(self, limit: int = 4096) -> str:
        """What sits unread in the output pipes (before :meth:`start`), as text.

        When the runtime fails before the process exists, its own complaints
        went to the process's stderr: this recovers them for the error message.
        """
        chunks: list[bytes] = []
        for _name, r, _dest in self._outputs:
            try:
                os.set_blocking(r, False)
                chunks.append(os.read(r, limit))
            except OSError:
                continue  # nothing there (EAGAIN) or the pipe is gone
        return b"".join(chunks).decode(errors="replace").strip()

    def spawned(self) -> None:
        """The process holds its ends now: close ours, so EOF means it is gone."""
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends.clear()

    def start(self, nursery: trio.Nursery) -> None:
        """Start the copies (in the service's nursery; they end on their own at EOF,
        or :data:`CLOSE_GRACE` seconds after :meth:`close`)."""
        outputs, self._outputs = self._outputs, []
        if self._stdin_fifo >= 0:
            self._stdin_copying = True
        nursery.start_soon(self._run_copies, outputs, self._stdin_copying)

    async def _run_copies(self, outputs: list[tuple[str, int, int]], stdin: bool) -> None:
        with self._copies:
            async with trio.open_nursery() as nursery:
                for name, r, dest in outputs:
                    nursery.start_soon(self._copy_out, name, r, dest)
                if stdin:
                    nursery.start_soon(self._copy_in)

    async def _copy_out(self, name: str, r: int, dest: int) -> None:
        """Pipe -> destination.  Reading never waits for the destination's reader."""
        backlog = Backlog(self.spool_dir, self.backlog_limit)
        self.counters.backlogs[name] = backlog
        counters = self.counters
        try:
            os.set_blocking(r, False)
            os.set_blocking(dest, False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_backlog, name, backlog, dest)
                stalled_at = -1  # self.delivered when the reader was found gone
                while True:
                    if backlog.held >= backlog.limit and stalled_at != self.delivered:
                        stalled_at = -1
                        # A slow reader gets backpressure (nothing is lost); only a
                        # reader that takes nothing for STALL_TIMEOUT costs output.
                        mark = self.delivered
                        with trio.move_on_after(STALL_TIMEOUT):
                            while backlog.held >= backlog.limit:
                                await backlog.wait_progress()
                        if backlog.held >= backlog.limit and self.delivered == mark:
                            stalled_at = mark
                            log.warning("%s: nobody reads %s; dropping output past %d bytes",
                                        name, self.stdio, backlog.limit)
                    try:
                        data = os.read(r, COPY_BUFFER)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(r)
                        continue
                    if not data:
                        break
                    if name == "stdout":
                        counters.stdout += len(data)
                    else:
                        counters.stderr += len(data)
                    if backlog.empty and not backlog.broken:
                        data = self._write_some(name, backlog, dest, data)
                    if data:
                        if stalled_at == self.delivered:
                            backlog.dropped += len(data)  # the reader is gone (see above)
                        else:
                            backlog.append(data)
                self._eofs += 1
                backlog.finish()
        finally:
            os.close(r)
            os.close(dest)
            backlog.close()
            self._outputs_left -= 1
            if self._outputs_left <= 0:
                self._output_done.set()

    def _write_some(self, name: str, backlog: Backlog, dest: int, data: bytes) -> bytes:
        """Write what the destination takes now; return the rest."""
        try:
            n = os.write(dest, data)
        except BlockingIOError:
            return data
        except OSError as e:
            # A broken log never blocks or kills the process: keep reading, count, drop.
            log.warning("%s: write to %s failed: %s", name, self.stdio, e)
            backlog.broken = True
            backlog.dropped += len(data)
            return b""
        self.delivered += n
        return data[n:]

    async def _drain_backlog(self, name: str, backlog: Backlog, dest: int) -> None:
        while True:
            chunk = backlog.peek()
            if not chunk:
                if backlog.finished:
                    return
                await backlog.wait()
                continue
            if backlog.broken:
                backlog.consume(len(chunk))
                backlog.dropped += len(chunk)
                continue
            await trio.lowlevel.wait_writable(dest)
            rest = self._write_some(name, backlog, dest, chunk)
            backlog.consume(len(chunk) - len(rest))

    async def _copy_in(self) -> None:
        fifo, w = self._stdin_fifo, self._stdin_w
        try:
            os.set_blocking(w, False)
            while True:
                if self._stdin_close_requested:
                    # Deliver what is already in the FIFO, then stop.
                    data = read_nowait(fifo)
                    if not data:
                        break
                else:
                    with trio.CancelScope() as scope:
                        self._stdin_scope = scope
                        await trio.lowlevel.wait_readable(fifo)
                    self._stdin_scope = None
                    if scope.cancelled_caught:
                        continue
                    try:
                        data = os.read(fifo, COPY_BUFFER)
                    except BlockingIOError:
                        continue
                    if not data:
                        break  # the writer closed: EOF
                self.counters.stdin += len(data)
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(w, view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(w)
        except OSError as e:
            if e.errno != errno.EPIPE:
                log.warning("stdin copy for %s stopped: %s", self.stdio.stdin, e)
        finally:
            self._stdin_copying = False
            self._stdin_fifo = self._stdin_w = -1
            os.close(fifo)
            os.close(w)

    def close_stdin(self) -> None:
        """Close the process's stdin once what was written to the FIFO is delivered."""
        self._stdin_close_requested = True
        if self._stdin_copying:
            if self._stdin_scope is not None:
                self._stdin_scope.cancel()
        else:
            self._close_stdin_fds()

    def _close_stdin_fds(self) -> None:
        """Close our stdin FIFO and pipe ends (each on its own: either may be unset)."""
        _close_all([self._stdin_fifo, self._stdin_w])
        self._stdin_fifo = self._stdin_w = -1

    async def wait_output(self, timeout: float | None = None) -> bool:
        """Wait until every output stream was delivered to its end.

        :func:`wait_delivered`'s rule: the source has ended when every pipe
        reached EOF; progress is :attr:`delivered`.
        """
        return await wait_delivered(
            self._output_done,
            timeout,
            ended=lambda: self._eofs >= self._outputs_total,
            progress=lambda: self.delivered,
        )

    def close(self) -> None:
        """Release every fd not owned by a running copy (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends.clear()
        for _name, r, dest in self._outputs:
            os.close(r)
            os.close(dest)
        self._outputs = []
        if not self._stdin_copying:
            self._close_stdin_fds()
        # Copies still running (a reader that never came back) end after a grace period.
        self._copies.deadline = min(self._copies.deadline, trio.current_time() + CLOSE_GRACE)
        self._output_done.set()
