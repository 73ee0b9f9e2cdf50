r"""A process's standard streams: where containerd wants them, and the pipes and copies to them.

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

An in-place upgrade (issue 17) hands every stream to the new code without
losing a byte, for pipes and terminals alike (:class:`Streams`):
``pause()`` stops the copies at a chunk boundary; ``export()`` describes the
paused object as a small JSON-able dict whose fds are the ``*_fd`` fields
(``fds()`` lists them: they must survive ``execve``); the new code rebuilds
it with :func:`adopt_streams` and ``start``\ s it, and it goes on where it
stopped (``resume()`` does that in place when the upgrade is called off).
Output read from a pipe and not yet written is in the stream's
:class:`Backlog` (moved from memory to a memfd at pause, so that an fd
carries it); a chunk read for stdin (or by a terminal's copies) and not yet
written all the way is carried in the dict.  Counters, backlog counts, a
reader found gone, output that reached EOF, and a ``close_stdin`` not yet
done all carry over, so :meth:`ProcessIO.wait_output` means the same after.

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
  failed open closes whatever was opened before it; an exported object's fds
  belong to the exported dict (its ``close()`` leaves them open).
* Every await of a copy is at a chunk boundary: a chunk read is written,
  held in the backlog, or carried before the copy can stop there.
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

from supervisor.handover import StateError, b64, unb64
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
    r"""What the process layer needs of a process's stdio (pipes or a terminal).

    The upgrade path (issue 17) uses the rest: :meth:`pause` the copies,
    :meth:`export` their state and keep :meth:`fds` open across ``execve``;
    the new code rebuilds the object with :func:`adopt_streams` and
    :meth:`start`\ s it.  :meth:`resume` undoes a pause in place.
    """

    counters: StreamCounters

    def start(self, nursery: trio.Nursery) -> None: ...

    def close_stdin(self) -> None: ...

    async def wait_output(self, timeout: float | None = None) -> bool: ...

    def delivering(self) -> bool:
        """Whether the process's side has ended (every output pipe at EOF, every slave
        fd of the terminal closed) while its output is still on its way to the
        reader: what is left is finite, only slow to be read."""
        ...

    async def pause(self) -> None: ...

    def resume(self) -> None: ...

    def export(self) -> dict[str, object]: ...

    def fds(self) -> list[int]: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


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

    # --- across an upgrade (issue 17) -------------------------------------

    def hold_in_file(self) -> None:
        """Move held bytes kept in memory to a memfd, so that an fd carries them across exec.

        A no-op for a file backlog or an empty one.  Raises OSError if the
        memfd cannot take them (the backlog is unchanged then).
        """
        if self._fd >= 0 or self.empty:
            return
        data = memoryview(self.peek(self.held))
        fd = os.memfd_create("supervisor-backlog", os.MFD_CLOEXEC)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._memory.clear()
        self._read, self._write = 0, len(data)

    def export(self) -> dict[str, object]:
        """The backlog's state (its file by fd); after :meth:`hold_in_file` if it held bytes."""
        if self._fd < 0 and not self.empty:
            raise RuntimeError("an in-memory backlog holding bytes cannot be exported")
        return {
            "backlog_fd": self._fd,
            "backlog_dir": self.directory,
            "read": self._read if self._fd >= 0 else 0,
            "write": self._write if self._fd >= 0 else 0,
            "limit": self.limit,
            "dropped": self.dropped,
            "spooled": self.spooled,
            "finished": self.finished,
            "broken": self.broken,
        }

    @classmethod
    def adopt(cls, f: StateFields) -> Backlog:
        """Rebuild a backlog from :meth:`export`'s fields (validated by ``f``)."""
        b = cls(f.text("backlog_dir"), f.integer("limit", minimum=1))
        fd = f.fd("backlog_fd", kind="file")
        read, write = f.integer("read"), f.integer("write")
        if read > write:
            raise StreamStateError(f"{f.where}.read: {read} is past write ({write})")
        if fd < 0 and write:
            raise StreamStateError(f"{f.where}.backlog_fd: {write - read} bytes held but no file")
        if fd >= 0 and os.fstat(fd).st_size < write:
            raise StreamStateError(f"{f.where}.backlog_fd: the file is shorter than {write}")
        b._fd, b._read, b._write = fd, read, write
        b.dropped, b.spooled = f.integer("dropped"), f.integer("spooled")
        b.finished, b.broken = f.flag("finished"), f.flag("broken")
        return b


def _pipes_kind(stdio: Stdio) -> str:
    if stdio.stdout.startswith("binary://"):
        return "binary"
    return "none" if stdio.is_null() else "pipes"


@dataclass(eq=False)
class _Output:
    """One output stream of a :class:`ProcessIO`: its pipe, its destination, its backlog."""

    name: str
    pipe: int  # the process's pipe, read end; -1 once it read EOF (closed then)
    dest: int
    backlog: Backlog | None = None  # made when the copy first starts
    stalled_at: int = -1  # ProcessIO.delivered when the reader was found gone


class Resumable:
    """What both kinds of streams (:class:`ProcessIO` and
    :class:`~supervisor.console.Console`) do alike across an upgrade: :meth:`export`
    (each says when it must refuse, ``_export_refusal()``, and what it exports,
    ``_state()``), :meth:`resume`, :meth:`fds`, :attr:`closed`, the start of ``close()``
    (:meth:`_closing`), whether a stopping copy keeps its fds (:meth:`_keep_fds`) and
    :meth:`delivering` (each says when its side has ended, ``_ended()``), over the
    fields both keep."""

    _closed: bool
    _pausing: bool
    _exported: bool
    _nursery: trio.Nursery | None
    _output_done: trio.Event

    def _state(self) -> dict[str, object]:
        raise NotImplementedError

    def _export_refusal(self) -> str | None:
        """Why :meth:`export` must refuse now (closed, not paused...), or None."""
        raise NotImplementedError

    def export(self) -> dict[str, object]:
        """The paused object as JSON-able data for :func:`adopt_streams` (fds by number).

        From now on its fds belong to that data: :meth:`close` leaves them
        open, until :meth:`resume` takes them back.
        """
        why = self._export_refusal()
        if why:
            raise RuntimeError(why)
        state = self._state()
        self._exported = True
        return state

    def _closing(self) -> bool:
        """:meth:`close`'s start: marks the object closed; whether the caller has fds of
        its own to release (False when closed before, or exported: those fds are the
        exported state's, and the output is done as far as this object goes)."""
        if self._closed:
            return False
        self._closed = True
        if self._exported:
            self._output_done.set()
            return False
        return True

    def _keep_fds(self) -> bool:
        """Whether a copy that stops now stops for :meth:`pause` (its fds stay with us)."""
        return self._pausing and not self._closed

    def _ended(self) -> bool:
        """Whether the process's side has ended: every output pipe at EOF, every slave
        fd of the terminal closed (output may still be on its way)."""
        raise NotImplementedError

    def delivering(self) -> bool:
        """:meth:`Streams.delivering`: the process's side ended, the output not all out."""
        return self._ended() and not self._output_done.is_set()

    def start(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    def fds(self) -> list[int]:
        """Every fd :meth:`export` names: what must stay open across ``execve`` (ask
        after :meth:`pause`: a backlog in memory is in a file only then)."""
        return fds_of(self._state())

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: :meth:`export` refuses it (an upgrade is
        refused first, ``TaskService.handover_refusal``)."""
        return self._closed

    def resume(self) -> None:
        """Undo :meth:`pause` in place (also after :meth:`export`): the copies go on.

        A no-op if not paused or closed; copies never started stay unstarted.
        The fds are marked close-on-exec again (an upgrade clears the mark
        just before ``execve``; if that failed, no child may inherit them).
        """
        if self._closed or not self._pausing:
            return
        for fd in self.fds():
            os.set_inheritable(fd, False)
        if self._nursery is None:
            self._pausing = self._exported = False
            return
        self.start(self._nursery)


class ProcessIO(Resumable):
    """The pipes of one process and the copies between them and containerd.

    Build it with :meth:`create`, hand :attr:`child_fds` to the runtime, call
    :meth:`spawned` once the runtime has started the process (our copies of
    the child's ends are closed then), and :meth:`start` the copies.

    Upgrade (issue 17): :meth:`pause` stops every copy at a chunk boundary
    (what was read and not written is in the stream's :class:`Backlog`, or,
    for stdin, in a carried chunk), and :meth:`export` describes the paused
    object; :func:`adopt_streams` rebuilds it (in the new code) and
    :meth:`start` goes on from there.  While paused the object still owns
    every fd; once exported it owns none (:meth:`close` closes nothing):
    they belong to the exported state until :meth:`resume` takes them back.
    """

    def __init__(self, stdio: Stdio) -> None:
        self.stdio = stdio
        self.counters = StreamCounters(kind=_pipes_kind(stdio))
        self.child_fds: dict[int, int] = {}
        self._child_ends: list[int] = []
        self._stdin_w = -1
        self._stdin_fifo = -1
        self._stdin_pending = memoryview(b"")  # read from the FIFO, not yet in the pipe
        self._outputs: list[_Output] = []  # every output not yet delivered to its end
        self._output_done = trio.Event()
        self._stdin_close_requested = False
        self._stdin_scope: trio.CancelScope | None = None
        self._stdin_copying = False  # the stdin copy owns the stdin fds (running or paused)
        self._closed = False
        self.spool_dir = ""
        self.backlog_limit = BACKLOG_LIMIT
        self.delivered = 0  # bytes written to the destinations
        self._eofs = 0  # output pipes that reached EOF
        self._outputs_total = 0
        self._copies = trio.CancelScope()
        self._running = False  # a copy task is alive (from start until it ends or pauses)
        self._stopped = trio.Event()
        self._pausing = False
        self._exported = False
        self._nursery: trio.Nursery | None = None

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
            self._outputs.append(_Output(name, r, dest))
            self._child_ends.append(w)
            _grow_pipe(r)
            self.child_fds[n] = w
        if uid >= 0 or gid >= 0:
            for fd in self._child_ends:
                if fd != devnull:
                    os.fchown(fd, uid, gid)
        self._outputs_total = len(self._outputs)
        if not self._outputs:
            self._output_done.set()

    def unread_output(self, limit: int = 4096) -> str:
        """What sits unread in the output pipes (before :meth:`start`), as text.

        When the runtime fails before the process exists, its own complaints
        went to the process's stderr: this recovers them for the error message.
        """
        chunks: list[bytes] = []
        for out in self._outputs:
            try:
                os.set_blocking(out.pipe, False)
                chunks.append(os.read(out.pipe, limit))
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
        or :data:`CLOSE_GRACE` seconds after :meth:`close`).

        After :meth:`pause` (or :func:`adopt_streams`) they go on where they stopped.
        """
        if self._running:
            raise RuntimeError("the copies are running already")
        self._nursery = nursery
        self._pausing = self._exported = False
        for out in self._outputs:
            self._backlog(out)
        if self._stdin_fifo >= 0:
            self._stdin_copying = True
        if self._closed or not (self._outputs or self._stdin_copying):
            return
        self._running = True
        self._copies = trio.CancelScope()
        self._stopped = trio.Event()
        nursery.start_soon(self._run_copies, list(self._outputs), self._stdin_copying)

    def _backlog(self, out: _Output) -> Backlog:
        if out.backlog is None:
            out.backlog = Backlog(self.spool_dir, self.backlog_limit)
            self.counters.backlogs[out.name] = out.backlog
        return out.backlog

    async def _run_copies(self, outputs: list[_Output], stdin: bool) -> None:
        try:
            with self._copies:
                async with trio.open_nursery() as nursery:
                    for out in outputs:
                        nursery.start_soon(self._copy_out, out)
                    if stdin:
                        nursery.start_soon(self._copy_in)
        finally:
            self._running = False
            self._stopped.set()

    async def _copy_out(self, out: _Output) -> None:
        """Pipe -> destination.  Reading never waits for the destination's reader.

        Every await is at a chunk boundary: a chunk read is written or
        appended to the backlog before the next one, so a pause loses nothing.
        """
        backlog = self._backlog(out)
        counters = self.counters
        done = False
        try:
            if out.pipe >= 0:
                os.set_blocking(out.pipe, False)
            os.set_blocking(out.dest, False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_backlog, out.name, backlog, out.dest)
                while (r := out.pipe) >= 0:
                    await trio.lowlevel.checkpoint_if_cancelled()  # a pause stops here
                    if backlog.held >= backlog.limit and out.stalled_at != self.delivered:
                        out.stalled_at = -1
                        # A slow reader gets backpressure (nothing is lost); only a
                        # reader that takes nothing for STALL_TIMEOUT costs output.
                        mark = self.delivered
                        with trio.move_on_after(STALL_TIMEOUT):
                            while backlog.held >= backlog.limit:
                                await backlog.wait_progress()
                        if backlog.held >= backlog.limit and self.delivered == mark:
                            out.stalled_at = mark
                            log.warning("%s: nobody reads %s; dropping output past %d bytes",
                                        out.name, self.stdio, backlog.limit)
                    try:
                        data = os.read(r, COPY_BUFFER)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(r)
                        continue
                    if not data:
                        out.pipe = -1
                        os.close(r)
                        self._eofs += 1
                        backlog.finish()
                        break
                    if out.name == "stdout":
                        counters.stdout += len(data)
                    else:
                        counters.stderr += len(data)
                    if backlog.empty and not backlog.broken:
                        data = self._write_some(out.name, backlog, out.dest, data)
                    if data:
                        if out.stalled_at == self.delivered:
                            backlog.dropped += len(data)  # the reader is gone (see above)
                        else:
                            backlog.append(data)
            done = True
        except Exception:
            done = True  # failed, not paused: retired, never handed over
            raise
        finally:
            if done or not self._keep_fds():
                self._retire(out)

    def _retire(self, out: _Output) -> None:
        """``out`` is done with (delivered, or given up): close its fds, count it."""
        _close_all([out.pipe, out.dest])
        out.pipe = out.dest = -1
        if out.backlog is not None:
            out.backlog.close()
        if out in self._outputs:
            self._outputs.remove(out)
        if not self._outputs:
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
        """Stdin FIFO -> pipe.  A chunk read is kept in ``_stdin_pending`` until the
        pipe took all of it, so a pause between its writes loses nothing."""
        fifo, w = self._stdin_fifo, self._stdin_w
        done = False
        try:
            os.set_blocking(w, False)
            while True:
                await trio.lowlevel.checkpoint_if_cancelled()  # a pause stops here
                while self._stdin_pending:
                    try:
                        n = os.write(w, self._stdin_pending)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(w)
                        continue
                    self._stdin_pending = self._stdin_pending[n:]
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
                self._stdin_pending = memoryview(data)
            done = True
        except OSError as e:
            done = True
            if e.errno != errno.EPIPE:
                log.warning("stdin copy for %s stopped: %s", self.stdio.stdin, e)
        finally:
            self._stdin_scope = None
            if done or not self._keep_fds():
                self._stdin_copying = False
                self._close_stdin_fds()

    def close_stdin(self) -> None:
        """Close the process's stdin once what was written to the FIFO is delivered.

        While the copies are paused, the request waits for them to go on.
        """
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
        self._stdin_pending = memoryview(b"")

    async def wait_output(self, timeout: float | None = None) -> bool:
        """Wait until every output stream was delivered to its end.

        :func:`wait_delivered`'s rule: the source has ended when every pipe
        reached EOF; progress is :attr:`delivered`.
        """
        return await wait_delivered(
            self._output_done,
            timeout,
            ended=self._ended,
            progress=lambda: self.delivered,
        )

    def _ended(self) -> bool:
        return self._eofs >= self._outputs_total

    # --- across an upgrade (issue 17) -------------------------------------

    async def pause(self) -> None:
        """Stop every copy at a chunk boundary; the fds stay open and ours.

        Returns once no copy runs.  An output backlog kept in memory moves to
        a memfd (so an fd carries it; OSError if that fails).  A closed object
        is left alone: its copies finish their grace period (:meth:`export`
        refuses it).
        """
        if self._closed:
            return
        self._pausing = True
        if self._running:
            self._copies.cancel()
            await self._stopped.wait()
        for out in self._outputs:
            self._backlog(out).hold_in_file()

    def _state(self) -> dict[str, object]:
        outputs: list[dict[str, object]] = []
        live = {out.name: out for out in self._outputs}
        for name in ("stdout", "stderr"):
            out = live.get(name)
            backlog = self._backlog(out) if out is not None else self.counters.backlogs.get(name)
            if backlog is None:
                continue  # no such stream
            outputs.append({
                "name": name,
                "pipe_fd": out.pipe if out is not None else -1,
                "dest_fd": out.dest if out is not None else -1,  # -1: delivered
                "stalled_at": out.stalled_at if out is not None else -1,
                **backlog.export(),
            })
        return {
            "kind": self.counters.kind,
            "stdin": self.stdio.stdin,
            "stdout": self.stdio.stdout,
            "stderr": self.stdio.stderr,
            "spool_dir": self.spool_dir,
            "backlog_limit": self.backlog_limit,
            "stdin_bytes": self.counters.stdin,
            "stdout_bytes": self.counters.stdout,
            "stderr_bytes": self.counters.stderr,
            "delivered": self.delivered,
            "eofs": self._eofs,
            "outputs_total": self._outputs_total,
            "outputs": outputs,
            "stdin_fifo_fd": self._stdin_fifo,
            "stdin_pipe_fd": self._stdin_w,
            "stdin_pending": b64(self._stdin_pending),
            "stdin_close": self._stdin_close_requested,
        }

    def _export_refusal(self) -> str | None:
        if self._closed:
            return "closed streams are not exported"
        if self._running or (self._outputs and not self._pausing):
            return "pause the streams before exporting them"
        if self._child_ends:
            return "the process's ends are still ours (spawned() not called)"
        return None

    @classmethod
    def _adopt(cls, f: StateFields) -> ProcessIO:
        io = cls(Stdio(f.text("stdin"), f.text("stdout"), f.text("stderr")))
        if io.counters.kind != f.text("kind"):
            raise StreamStateError(f"{f.where}.kind: {f.text('kind')!r} does not match its URIs")
        io.spool_dir = f.text("spool_dir")
        io.backlog_limit = f.integer("backlog_limit", minimum=1)
        io.counters.stdin = f.integer("stdin_bytes")
        io.counters.stdout = f.integer("stdout_bytes")
        io.counters.stderr = f.integer("stderr_bytes")
        io.delivered = f.integer("delivered")
        io._eofs = f.integer("eofs")
        io._outputs_total = f.integer("outputs_total")
        for o in f.objects("outputs"):
            name = o.text("name")
            if name not in ("stdout", "stderr") or name in io.counters.backlogs:
                raise StreamStateError(f"{o.where}.name: {name!r} is not a new output stream")
            backlog = Backlog.adopt(o)
            io.counters.backlogs[name] = backlog
            dest = o.fd("dest_fd")
            if dest >= 0:
                io._outputs.append(
                    _Output(name, o.fd("pipe_fd", kind="fifo"), dest, backlog,
                            o.integer("stalled_at", minimum=-1)))
            elif o.integer("pipe_fd", minimum=-1) >= 0 or o.integer("backlog_fd", minimum=-1) >= 0:
                raise StreamStateError(f"{o.where}: a delivered output (dest_fd -1) names fds")
        if io._eofs > io._outputs_total or len(io._outputs) > io._outputs_total:
            raise StreamStateError(f"{f.where}.outputs_total: {io._outputs_total} is too small")
        if not io._outputs:
            io._output_done.set()
        io._stdin_fifo = f.fd("stdin_fifo_fd", kind="fifo")
        io._stdin_w = f.fd("stdin_pipe_fd", kind="fifo")
        if (io._stdin_fifo < 0) != (io._stdin_w < 0):
            raise StreamStateError(f"{f.where}.stdin_pipe_fd: stdin needs the FIFO and the pipe")
        io._stdin_pending = memoryview(f.blob("stdin_pending"))
        io._stdin_close_requested = f.flag("stdin_close")
        io._pausing = True
        return io

    def close(self) -> None:
        """Release every fd not owned by a running copy (idempotent).

        A running stdin copy is told to stop as :meth:`close_stdin` tells it: it
        delivers what the FIFO holds now and closes its fds, instead of waiting
        for a writer that may never close the FIFO (``ctr task exec`` keeps it
        open) until :data:`CLOSE_GRACE` ends it.  Exported fds are not ours: they
        are left open.
        """
        if not self._closing():
            return
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends.clear()
        if not self._running:  # not started, or paused: nothing else owns them
            for out in list(self._outputs):
                self._retire(out)
            self._stdin_copying = False
        if self._stdin_copying:
            self.close_stdin()
        else:
            self._close_stdin_fds()
        # Copies still running (a reader that never came back) end after a grace period.
        self._copies.deadline = min(self._copies.deadline, trio.current_time() + CLOSE_GRACE)
        self._output_done.set()


# --- across an upgrade (issue 17) ------------------------------------------

#: An exported field that names an fd ends in this: :func:`fds_of` and the
#: checks of :func:`adopt_streams` know fds by it (one fact in one place).
FD_SUFFIX = "_fd"


def fds_of(state: object) -> list[int]:
    """Every open fd (``*_fd`` field >= 0) in an exported state, in order."""
    fds: list[int] = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key.endswith(FD_SUFFIX) and isinstance(value, int) and value >= 0:
                fds.append(value)
            else:
                fds.extend(fds_of(value))
    elif isinstance(state, list):
        for item in state:
            fds.extend(fds_of(item))
    return fds


#: An exported stream state that cannot be adopted (the message names the field): the
#: state document's own error (:class:`supervisor.handover.StateError`), by this name here.
StreamStateError = StateError


class StateFields:
    """One object of an exported state, read with checks: every error names its field."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise StreamStateError(f"{where}: expected an object, got {type(data).__name__}")
        self.data: dict[str, object] = data
        self.where = where

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise StreamStateError(f"{self.where}.{key}: missing")
        return self.data[key]

    def integer(self, key: str, *, minimum: int = 0) -> int:
        value = self._get(key)
        if type(value) is not int or value < minimum:
            raise StreamStateError(f"{self.where}.{key}: expected an integer >= {minimum}, "
                             f"got {value!r}")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise StreamStateError(f"{self.where}.{key}: expected true or false, got {value!r}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise StreamStateError(f"{self.where}.{key}: expected a string, got {value!r}")
        return value

    def blob(self, key: str) -> bytes:
        """A base64 field."""
        return unb64(self.text(key), f"{self.where}.{key}")

    def objects(self, key: str) -> list[StateFields]:
        value = self._get(key)
        if not isinstance(value, list):
            raise StreamStateError(f"{self.where}.{key}: expected a list, got {value!r}")
        return [StateFields(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(value)]

    def fd(self, key: str, *, kind: str = "") -> int:
        """An fd field: -1 (none) or an open fd, of ``kind`` (``fifo``, ``file``, ``tty``)."""
        if not key.endswith(FD_SUFFIX):
            raise AssertionError(f"fd field {key!r} must end in {FD_SUFFIX!r}")
        fd = self.integer(key, minimum=-1)
        if fd < 0:
            return -1
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise StreamStateError(
                f"{self.where}.{key}: fd {fd} is not open ({e.strerror})") from None
        ok = {
            "": True,
            "fifo": stat.S_ISFIFO(st.st_mode),
            "file": stat.S_ISREG(st.st_mode),
            "tty": stat.S_ISCHR(st.st_mode) and os.isatty(fd),
        }[kind]
        if not ok:
            raise StreamStateError(f"{self.where}.{key}: fd {fd} is not a {kind}")
        return fd


#: How each exported kind is rebuilt (the ``kind`` field: :attr:`StreamCounters.kind`).
#: :mod:`supervisor.console` adds ``"terminal"`` when it is imported: it imports this
#: module, so this module cannot import it (no import cycles).
ADOPTERS: dict[str, Callable[[StateFields], Streams]] = {
    kind: ProcessIO._adopt for kind in ("pipes", "binary", "none")
}


def adopt_streams(
    data: dict[str, object],
    *,
    spool_dir: str | None = None,
    where: str = "io",
) -> Streams:
    """Rebuild a paused :class:`ProcessIO` or :class:`~supervisor.console.Console` from
    its :meth:`~Streams.export` (after a JSON round trip, in this process or after exec).

    ``.start(nursery)`` then goes on copying exactly where the old object
    stopped.  ``spool_dir`` (the container's work dir) replaces the exported
    one for backlog files made from now on (a logging binary needs nothing: it
    is a child like any other, which the shim's reaper reaps, and the pipes it
    reads are not ours).  Every fd named is checked (open, of the right kind,
    named once) and marked close-on-exec again.  Raises
    :class:`StreamStateError` (a ValueError) naming the field (under
    ``where``) for anything wrong; nothing is closed then: the fds still
    belong to ``data``.
    """
    f = StateFields(data, where)
    kind = f.text("kind")
    adopter = ADOPTERS.get(kind)
    if adopter is None:
        raise StreamStateError(f"{where}.kind: {kind!r} is not one of {sorted(ADOPTERS)} "
                               "(a terminal needs supervisor.console imported)")
    streams = adopter(f)
    if spool_dir is not None and isinstance(streams, ProcessIO):
        streams.spool_dir = spool_dir
        for backlog in streams.counters.backlogs.values():
            if backlog.directory:
                backlog.directory = spool_dir
    fds = streams.fds()
    if len(set(fds)) != len(fds):
        raise StreamStateError(f"{where}: an fd is named twice ({sorted(fds)})")
    for fd in fds:
        os.set_inheritable(fd, False)
    return streams
