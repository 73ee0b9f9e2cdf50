"""Terminals: the pty master the OCI runtime hands us, and the copies around it.

Design
------
When containerd asks for a terminal, the shim does not make the pty itself.  It
listens on a unix socket (:class:`ConsoleSocket`) and passes its path to the
runtime (``runc create|exec --console-socket PATH``).  Inside the container,
``runc init`` opens ``/dev/ptmx``, connects to the socket and sends the master
in one message: the data is the master's file name (at most 4096 bytes) and a
single ``SCM_RIGHTS`` control message carries exactly one fd.  Only then does it
open the slave and make it the process's stdio.  The runtime has sent the fd by
the time ``create``/``exec`` returns, so the shim calls
:meth:`ConsoleSocket.receive_master` afterwards; the connection waits in the
listen backlog meanwhile.

:class:`Console` owns the master and runs two copies in the caller's nursery,
between it and the destinations :func:`supervisor.io.open_stdio` opened (the
one opener of every stdio URI form, for pipes and terminals alike; opened
before the runtime runs, so a bad URI fails the request, not the copy):

* master -> stdout (a FIFO, a file, or a logging binary's stdout pipe).  With
  no stdout the master is still drained (and the bytes dropped) so the
  process never blocks on a full terminal.
* stdin FIFO -> master.  A terminal's end of input is in-band (the client's
  raw terminal sends ^D), so -- the one deliberate difference from pipes -- a
  writer leaving does not end the copy: the FIFO is reopened (the new reader
  is opened before the old one is closed, so the pipe and anything in it
  survive) and the copy waits for the next writer.  Only :meth:`Console.close_stdin`
  stops it, after delivering what was already written.

Invariants
----------
* End of output is the master reading EIO (or EOF): Linux reports that only
  when every slave fd is closed *and* everything written to the slave has been
  read.  So when :meth:`Console.wait_output` returns True, every byte the
  process wrote to its terminal has been written to stdout, and stdout has been
  closed (its reader sees EOF).  Before the slave is first opened, the master
  reads EAGAIN, not EIO, so receiving the master early is safe.
* Waiting for output with a timeout follows the pipes' drain rule
  (:func:`supervisor.io.wait_delivered`), so a slow reader never loses the
  end of a terminal's output: the terminal's side has ended when the master
  polls ``POLLHUP`` (the kernel sets it when the last slave fd closes, while
  output may still sit in the pty), and progress is :attr:`Console.delivered`.
  A daemonized child that keeps the slave open is "output still coming" only
  until one period passes: the master never hangs up while it lives.
* Once output has ended the stdin copy stops too: no process holds the slave.
* Every fd is closed by exactly one party, and only after
  ``trio.lowlevel.notify_closing``; the copies re-read the fd from the object
  after every wait, so a closed (possibly reused) fd number is never touched.
* A pause (issue 17: :meth:`Console.pause`, see :mod:`supervisor.io`) stops
  the copies at a chunk boundary: a chunk read from the master or the stdin
  FIFO and not yet written all the way is carried (exported with the
  console) and written first when the copies go on.
* The copies never raise into the caller's nursery: errors are logged and end
  the copy.  :meth:`Console.close` cancels them and closes every fd
  (idempotent); the master stays open until then, so resizing after the
  process exited is harmless.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import select
import shutil
import socket
import struct
import tempfile
import termios
from types import TracebackType

import trio

from supervisor.handover import b64
from supervisor.io import (
    ADOPTERS,
    Opened,
    Resumable,
    StateFields,
    StreamCounters,
    StreamStateError,
    open_stdin,
    read_nowait,
    wait_delivered,
)

__all__ = ["Console", "ConsoleError", "ConsoleSocket"]

log = logging.getLogger("supervisor.console")

COPY_BUFFER = 64 * 1024
# The runtime sends the master's name as the message data; longer is an error.
MAX_NAME = 4096
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_INT = struct.calcsize("i")
_WINSIZE = "HHHH"  # rows, cols, xpixel, ypixel (struct winsize)


class ConsoleError(Exception):
    """The console socket or the terminal could not be used."""


def _close_fd(fd: int) -> None:
    """Close ``fd``, waking (with ClosedResourceError) any trio task waiting on it."""
    with contextlib.suppress(RuntimeError):  # outside trio nobody can be waiting
        trio.lowlevel.notify_closing(fd)
    os.close(fd)


class ConsoleSocket:
    """A listening unix socket that receives one pty master from the runtime."""

    def __init__(self, sock: socket.socket, path: str, tmpdir: str | None) -> None:
        self._sock: socket.socket | None = sock
        self.path = path
        self._tmpdir = tmpdir
        self._unlinked = False

    @classmethod
    def create(cls, directory: str) -> ConsoleSocket:
        """Listen on a short random name in ``directory`` (or a temp dir if too long)."""
        directory = os.path.abspath(directory)
        tmpdir: str | None = None
        name = f"pty-{secrets.token_hex(4)}.sock"
        if len(os.fsencode(os.path.join(directory, name))) > MAX_SOCKET_PATH:
            base = tempfile.gettempdir()
            if len(os.fsencode(base)) > MAX_SOCKET_PATH - 40:
                base = "/tmp"
            tmpdir = directory = tempfile.mkdtemp(prefix="sv-pty-", dir=base)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for attempt in range(8):
                path = os.path.join(directory, name)
                try:
                    sock.bind(path)
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or attempt == 7:
                        raise
                    name = f"pty-{secrets.token_hex(4)}.sock"
            sock.listen(1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return cls(sock, path, tmpdir)

    async def receive_master(self, timeout: float | None = None) -> int:
        """Accept one connection and return the one fd it sends (close-on-exec, ours).

        Raises TimeoutError if nothing arrives within ``timeout`` seconds, and
        :class:`ConsoleError` if the peer sends anything but one terminal fd.
        """
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            return await self._receive()
        raise TimeoutError(f"no pty master received on {self.path} within {timeout}s")

    async def _receive(self) -> int:
        sock = self._sock
        if sock is None:
            raise ConsoleError(f"console socket {self.path} is closed")
        while True:
            try:
                conn, _ = sock.accept()
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    data, ancdata, flags, _ = conn.recvmsg(
                        MAX_NAME, socket.CMSG_SPACE(_INT), socket.MSG_CMSG_CLOEXEC
                    )
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(conn)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT
                fds.extend(struct.unpack(f"{usable // _INT}i", payload[:usable]))
        try:
            if flags & socket.MSG_CTRUNC:
                raise ConsoleError("console socket: control message truncated (more than one fd?)")
            if len(fds) != 1:
                raise ConsoleError(f"console socket: expected one fd, got {len(fds)}")
            if len(data) >= MAX_NAME:
                raise ConsoleError("console socket: name too long")
            if not os.isatty(fds[0]):
                raise ConsoleError("console socket: the fd received is not a terminal")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        log.debug("received pty master %r as fd %d", data.decode(errors="replace"), fds[0])
        return fds[0]

    def close(self) -> None:
        """Stop listening and remove the socket file (and our temp dir); idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError):  # outside trio nobody can be waiting
                trio.lowlevel.notify_closing(sock)
            sock.close()
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> ConsoleSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Console(Resumable):
    """A pty master (ours from construction) and the copies to and from it.

    Upgrade (issue 17): :meth:`pause` stops both copies at a chunk boundary
    (a chunk read and not yet written all the way is carried: it is written
    first when they go on), :meth:`export` describes the paused console, and
    :meth:`adopt` (through :func:`supervisor.io.adopt_streams`) rebuilds it;
    :meth:`start` goes on.  The window size lives in the pty itself.  Once
    exported the fds belong to the exported state: :meth:`close` leaves them
    open until :meth:`resume` takes them back.
    """

    #: What :attr:`counters` and an export's ``kind`` say.
    counters_kind = "terminal"

    def __init__(self, master: int) -> None:
        os.set_blocking(master, False)
        self._master = master
        self.counters = StreamCounters(kind=self.counters_kind)
        #: Output bytes done with: written to stdout, or dropped for want of one.
        self.delivered = 0
        self._stdin = -1
        self._stdin_path = ""
        self._stdout = -1
        self._out_pending = memoryview(b"")  # read from the master, not yet in stdout
        self._in_pending = memoryview(b"")  # read from the FIFO, not yet in the master
        self._started = False  # the stdio was given (start) or adopted
        self._closed = False
        self._out_scope = trio.CancelScope()
        self._in_scope = trio.CancelScope()
        self._stdin_wait: trio.CancelScope | None = None
        self._stdin_close_requested = False
        self._stdin_copying = False  # the stdin copy owns the stdin fd (running or paused)
        self._output_done = trio.Event()
        self._copies = 0  # copy tasks alive
        self._stopped = trio.Event()
        self._pausing = False
        self._exported = False
        self._nursery: trio.Nursery | None = None

    @property
    def master(self) -> int:
        """The master fd (-1 once closed); still owned by this object."""
        return self._master

    @property
    def output_done(self) -> bool:
        return self._output_done.is_set()

    def start(self, nursery: trio.Nursery, opened: Opened | None = None) -> None:
        """Start the copies in ``nursery`` between the master and ``opened``.

        Takes every fd of ``opened`` (what it does not use is closed, on error
        too); its stderr is not used: a terminal has one output.  Without
        ``opened``, the copies go on with the fds the console holds (after
        :meth:`pause`, or :meth:`adopt`).
        """
        try:
            if self._closed:
                raise ConsoleError("console is closed")
            if self._copies:
                raise RuntimeError("console copies already started")
            if opened is not None:
                if self._started:
                    raise RuntimeError("console stdio already given")
                stdout, opened.stdout = opened.stdout, -1
                stdin = -1
                if not self._stdin_close_requested:
                    stdin, opened.stdin = opened.stdin, -1
                self._stdin_path = opened.stdin_path
                self._stdout, self._stdin = stdout, stdin
                if stdout >= 0:
                    os.set_blocking(stdout, False)  # a logging binary's pipe is blocking
        finally:
            if opened is not None:
                opened.close()
        self._started = True
        self._nursery = nursery
        self._pausing = self._exported = False
        self._out_scope = trio.CancelScope()
        self._in_scope = trio.CancelScope()
        self._stopped = trio.Event()
        if not self.output_done:
            self._copies += 1
            nursery.start_soon(self._copy_out)
        if self._stdin >= 0:
            if self.output_done:  # nobody reads the terminal any more
                self._stdin_copying = False
                self._close_stdin_fd()
            else:
                self._stdin_copying = True
                self._copies += 1
                nursery.start_soon(self._copy_in)

    def _copy_stopped(self) -> None:
        self._copies -= 1
        if not self._copies:
            self._stopped.set()

    def _paused_by(self, scope: trio.CancelScope) -> bool:
        """Whether a copy that ``scope`` stopped stopped for :meth:`pause` (fds kept)."""
        return scope.cancelled_caught and self._keep_fds()

    # --- master -> stdout -------------------------------------------------

    async def _copy_out(self) -> None:
        paused = False
        try:
            with self._out_scope as scope:
                await self._write_stdout()  # what a pause left
                while (master := self._master) >= 0:
                    await trio.lowlevel.checkpoint_if_cancelled()  # a pause stops here
                    try:
                        data = os.read(master, COPY_BUFFER)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(master)
                        continue
                    except OSError as e:
                        if e.errno != errno.EIO:
                            log.warning("terminal output copy stopped: %s", e)
                        break  # EIO: every slave fd is closed and all output read
                    if not data:
                        break
                    self.counters.stdout += len(data)
                    self._out_pending = memoryview(data)
                    await self._write_stdout()
            paused = self._paused_by(scope)
        except trio.ClosedResourceError:
            log.debug("terminal output copy: console closed while waiting")
        finally:
            if not paused:
                self._out_pending = memoryview(b"")
                self._close_stdout()
                self._output_done.set()
                self._in_scope.cancel()
            self._copy_stopped()

    async def _write_stdout(self) -> None:
        """Write :attr:`_out_pending` (a chunk is carried across a pause until written)."""
        while self._out_pending and (fd := self._stdout) >= 0:
            try:
                n = os.write(fd, self._out_pending)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as e:
                # Keep draining the master (into nothing) so the process never blocks.
                log.warning("terminal stdout write failed, dropping output: %s", e)
                self._close_stdout()
                continue
            self.delivered += n
            self._out_pending = self._out_pending[n:]
        self.delivered += len(self._out_pending)  # no stdout (or it failed): dropped
        self._out_pending = memoryview(b"")

    def _close_stdout(self) -> None:
        fd, self._stdout = self._stdout, -1
        if fd >= 0:
            _close_fd(fd)

    # --- stdin -> master --------------------------------------------------

    async def _copy_in(self) -> None:
        paused = False
        try:
            with self._in_scope as scope:
                while (fifo := self._stdin) >= 0:
                    await trio.lowlevel.checkpoint_if_cancelled()  # a pause stops here
                    if self._in_pending and not await self._write_master():
                        break
                    if self._stdin_close_requested:
                        # Deliver what is already in the FIFO, then stop.
                        data = read_nowait(fifo, COPY_BUFFER)
                        if not data:
                            break
                    else:
                        with trio.CancelScope() as wait:
                            self._stdin_wait = wait
                            await trio.lowlevel.wait_readable(fifo)
                        self._stdin_wait = None
                        if wait.cancelled_caught or (fifo := self._stdin) < 0:
                            continue
                        try:
                            data = os.read(fifo, COPY_BUFFER)
                        except BlockingIOError:
                            continue
                        if not data:
                            self._reopen_stdin()
                            continue
                    self._in_pending = memoryview(data)
            paused = self._paused_by(scope)
        except trio.ClosedResourceError:
            log.debug("terminal stdin copy: console closed while waiting")
        except FileNotFoundError:
            log.debug("terminal stdin FIFO %s is gone: stdin copy stops", self._stdin_path)
        except OSError as e:
            log.warning("terminal stdin copy from %s stopped: %s", self._stdin_path, e)
        finally:
            self._stdin_wait = None
            if not paused:
                self._in_pending = memoryview(b"")
                self._stdin_copying = False
                self._close_stdin_fd()
            self._copy_stopped()

    def _reopen_stdin(self) -> None:
        """The writer left: read from a fresh open so poll waits for the next one."""
        new = open_stdin(self._stdin_path)
        old, self._stdin = self._stdin, new
        if old >= 0:
            _close_fd(old)

    async def _write_master(self) -> bool:
        """Write :attr:`_in_pending` to the master; False if the terminal is gone."""
        while self._in_pending:
            master = self._master
            if master < 0:
                return False
            try:
                n = os.write(master, self._in_pending)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(master)
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    log.warning("terminal stdin write failed: %s", e)
                return False
            self.counters.stdin += n
            self._in_pending = self._in_pending[n:]
        return True

    def _close_stdin_fd(self) -> None:
        fd, self._stdin = self._stdin, -1
        if fd >= 0:
            _close_fd(fd)

    def close_stdin(self) -> None:
        """Stop the stdin copy once what was written to the FIFO is delivered.

        The master stays open: a terminal's input has no EOF of its own.
        While the copies are paused, the request waits for them to go on.
        """
        self._stdin_close_requested = True
        if self._stdin_copying:
            if self._stdin_wait is not None:
                self._stdin_wait.cancel()
        else:
            self._close_stdin_fd()

    # --- the rest ---------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """Set the window size (columns, rows); the foreground group gets SIGWINCH."""
        if self._master < 0:
            raise ConsoleError("console is closed")
        if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
            raise ValueError(f"window size {width}x{height} out of range")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack(_WINSIZE, height, width, 0, 0))

    def size(self) -> tuple[int, int]:
        """The window size as (width, height)."""
        if self._master < 0:
            raise ConsoleError("console is closed")
        raw = fcntl.ioctl(self._master, termios.TIOCGWINSZ, bytes(struct.calcsize(_WINSIZE)))
        rows, cols, _, _ = struct.unpack(_WINSIZE, raw)
        return cols, rows

    def slave_closed(self) -> bool:
        """Whether every slave fd is closed (the master polls POLLHUP; or we closed it).

        Output may still be in the pty then: the master reads EIO only once it
        has been read too.
        """
        master = self._master
        if master < 0:
            return True
        poller = select.poll()
        poller.register(master, 0)  # POLLHUP is always reported
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def _ended(self) -> bool:
        return self.slave_closed()

    async def wait_output(self, timeout: float | None = None) -> bool:
        """Wait until output ended (every slave closed, all copied).

        With ``timeout``, False once a period passes without the end, unless
        the slave is closed and output moved meanwhile (the drain rule of
        :func:`supervisor.io.wait_delivered`; see the module's Invariants).
        """
        return await wait_delivered(
            self._output_done,
            timeout,
            ended=self._ended,
            progress=lambda: self.delivered,
        )

    # --- across an upgrade (issue 17) -------------------------------------

    async def pause(self) -> None:
        """Stop both copies at a chunk boundary; the fds stay open and ours.

        Returns once no copy runs.  A closed console is left alone
        (:meth:`export` refuses it).
        """
        if self._closed:
            return
        self._pausing = True
        if self._copies:
            self._out_scope.cancel()
            self._in_scope.cancel()
            await self._stopped.wait()

    def _state(self) -> dict[str, object]:
        return {
            "kind": self.counters.kind,
            "master_fd": self._master,
            "stdout_fd": self._stdout,
            "stdin_fd": self._stdin,
            "stdin_path": self._stdin_path,
            "stdin_close": self._stdin_close_requested,
            "stdin_bytes": self.counters.stdin,
            "stdout_bytes": self.counters.stdout,
            "delivered": self.delivered,
            "output_done": self.output_done,
            "out_pending": b64(self._out_pending),
            "in_pending": b64(self._in_pending),
        }

    def _export_refusal(self) -> str | None:
        if self._closed:
            return "a closed console is not exported"
        if self._copies or (self._started and not self._pausing and not self.output_done):
            return "pause the console before exporting it"
        return None

    @classmethod
    def adopt(cls, f: StateFields) -> Console:
        """Rebuild a paused console from :meth:`export`'s fields (checked by ``f``);
        :func:`supervisor.io.adopt_streams` is the way in."""
        master = f.fd("master_fd", kind="tty")
        if master < 0:
            raise StreamStateError(f"{f.where}.master_fd: a terminal needs its master")
        console = cls(master)
        console._stdout = f.fd("stdout_fd")
        console._stdin = f.fd("stdin_fd", kind="fifo")
        console._stdin_path = f.text("stdin_path")
        if console._stdin >= 0 and not console._stdin_path:
            raise StreamStateError(f"{f.where}.stdin_path: stdin needs its FIFO's path")
        console._stdin_copying = console._stdin >= 0
        console._stdin_close_requested = f.flag("stdin_close")
        console.counters.stdin = f.integer("stdin_bytes")
        console.counters.stdout = f.integer("stdout_bytes")
        console.delivered = f.integer("delivered")
        console._out_pending = memoryview(f.blob("out_pending"))
        console._in_pending = memoryview(f.blob("in_pending"))
        if f.flag("output_done"):
            console._output_done.set()
        console._started = console._pausing = True
        return console

    def close(self) -> None:
        """Stop the copies and close the master and FIFOs (idempotent).

        Exported fds are not ours: they are left open.
        """
        if not self._closing():
            return
        self._in_scope.cancel()
        self._out_scope.cancel()
        self._close_stdin_fd()
        self._close_stdout()
        master, self._master = self._master, -1
        if master >= 0:
            _close_fd(master)
        self._output_done.set()


ADOPTERS[Console.counters_kind] = Console.adopt
