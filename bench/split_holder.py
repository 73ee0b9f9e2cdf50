"""The split design's per-container "holder", and the zygote that forks holders.

Prototype for issue 16, point 3 (driver and measurement: ``bench/split_prototype.py``; the
decision: docs/benchmarks.md, "The split design, prototyped").  Not product code.

What a holder is
----------------
The one process per container that must outlive everything else: it is the child
subreaper of the container's processes, holds the read ends of their stdout/stderr pipes
and copies them to the destinations (FIFO or file), and writes the exit record (a file) when
the container's init has exited *and* its output is drained.  Everything else (ttrpc to
containerd, options, mounts, events, OOM, metrics) would be a shared "manager", one per
namespace, which drives holders over a tiny control socket.  A holder imports only
builtins and small standard modules (no trio, no protobuf, no ``socket``/``signal``
wrappers, which pull in ``enum``): ``_socket``, ``_signal``, ``select``, ``marshal`` and
``ctypes`` (for ``prctl``).

Spec and state
--------------
A holder's state directory holds ``spec`` (``marshal``: ``argv``, the command that creates
the container; ``then``, run once ``argv`` exited 0, e.g. ``runc start``; ``pid_file``,
where ``argv`` leaves the init's pid, empty when the init is ``argv`` itself; ``stdout``,
``stderr``: destination paths), and it creates ``ctl`` (its ``SOCK_SEQPACKET`` control
socket) and ``exit`` (``"INITPID STATUS UNIXTIME\\n"``, written by rename, so a reader sees
all of it or nothing; STATUS is 128+signal for a signalled init).

Control protocol (one datagram each way)::

    status    -> "starting HOLDERPID" | "running HOLDERPID INITPID"
                 | "exited HOLDERPID INITPID STATUS"
    kill SIG  -> "ok" | "error WHY"          (signals the init)
    shutdown  -> "ok" (the holder ends) | "error running"
    keep + SCM_RIGHTS fds -> "ok"            (the holder keeps them open, never reads them)
    give      -> "fds N" + SCM_RIGHTS: the kept fds (the holder keeps its copies)

``keep``/``give`` are how a containerd connection outlives its manager: the manager hands
the holder a duplicate of each connection it accepts, so the kernel does not close the
connection when the manager dies (containerd 1.6 would otherwise take the close for a
dead shim and clean up the task), and a new manager takes the connections back.

Several connections may be open at once (a manager, a new manager re-attaching, a CLI);
none of them is needed for the container to go on: with no manager at all a holder keeps
copying output and records the exit.

Invariants
----------
* The exit record is written once, only after the init was reaped and both of its output
  pipes reached EOF (the order containerd relies on: TaskExit after the output is drained).
* Output back-pressure: past :data:`PENDING_MAX` unwritten bytes a stream's pipe is no
  longer read (the container blocks on its write), never buffered without bound.
* Every child the holder reaps that is not the init (``argv``, ``then``, re-parented
  orphans) is reaped and forgotten; the holder never blocks in ``wait``.
* A holder forked by the zygote is nobody's child (the zygote forks an intermediate that
  forks the holder and exits), starts its own session and never returns into the zygote's
  code: each path ends in ``os._exit``.
"""

from __future__ import annotations

import _signal
import _socket
import ctypes
import gc
import marshal
import os
import select
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
CHUNK = 65536
PENDING_MAX = 1 << 20
MAX_FDS = 64
IN = select.POLLIN | select.POLLHUP | select.POLLERR


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def status_from_wait(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def open_destination(path: str) -> int:
    """A FIFO is opened read-write (never blocks, never ENXIO without a reader, as the Go
    shim does); anything else is appended to, created if missing."""
    try:
        fifo = os.stat(path).st_mode & 0o170000 == 0o010000
    except FileNotFoundError:
        fifo = False
    if fifo:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC,
                   0o600)  # fmt: skip


class Stream:
    """One output stream: the pipe's read end, the destination and what is not written yet."""

    def __init__(self, pipe: int, dest: int) -> None:
        self.pipe = pipe
        self.dest = dest
        self.pending = b""
        self.eof = False

    def done(self) -> bool:
        return self.eof and not self.pending


class Holder:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        with open(os.path.join(state_dir, "spec"), "rb") as f:
            spec = marshal.load(f)
        self.argv: list[str] = spec["argv"]
        self.then: list[str] = spec.get("then", [])
        self.pid_file: str = spec.get("pid_file", "")
        self.stdout_path: str = spec["stdout"]
        self.stderr_path: str = spec["stderr"]
        self.create_pid = 0
        self.init_pid = 0
        self.status: int | None = None
        self.recorded = False
        self.quit = False
        self.streams: list[Stream] = []
        self.conns: dict[int, _socket.socket] = {}
        self.kept: list[int] = []

    # -- set-up -------------------------------------------------------------------

    def start(self) -> None:
        set_subreaper()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.wake_r, False)
        _signal.signal(_signal.SIGCHLD, lambda signum, frame: None)
        _signal.set_wakeup_fd(wake_w)
        ctl = os.path.join(self.dir, "ctl")
        self.listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        self.listener.bind(ctl)
        os.chmod(ctl, 0o600)
        self.listener.listen(16)
        self.spawn()

    def spawn(self) -> None:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        ends = []
        for path in (self.stdout_path, self.stderr_path):
            r, w = os.pipe()
            os.set_blocking(r, False)
            self.streams.append(Stream(r, open_destination(path)))
            ends.append(w)
        try:
            self.create_pid = os.posix_spawnp(
                self.argv[0], self.argv, os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, ends[0], 1),
                              (os.POSIX_SPAWN_DUP2, ends[1], 2)],
                setsigdef=(_signal.SIGPIPE,))  # fmt: skip
        except OSError as e:
            self.record(0, 127)
            os.write(self.streams[1].dest, f"holder: {self.argv[0]}: {e}\n".encode())
        finally:
            for fd in (null, *ends):
                os.close(fd)
        if not self.pid_file:
            self.init_pid = self.create_pid

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        while not self.quit:
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            poller.register(self.listener.fileno(), select.POLLIN)
            for fd in self.conns:
                poller.register(fd, IN)
            for s in self.streams:
                mask = 0
                if not s.eof and len(s.pending) < PENDING_MAX:
                    mask |= IN
                if mask:
                    poller.register(s.pipe, mask)
                if s.pending:
                    poller.register(s.dest, select.POLLOUT)
            events = dict(poller.poll())
            if self.wake_r in events:
                self.reap()
            if self.listener.fileno() in events:
                self.accept()
            for s in self.streams:
                if s.pending and s.dest in events:
                    self.flush(s)
                if not s.eof and s.pipe in events:
                    self.drain(s)
            for fd in [fd for fd in self.conns if fd in events]:
                self.serve(fd)
            self.maybe_record()
        self.listener.close()
        os.unlink(os.path.join(self.dir, "ctl"))

    def reap(self) -> None:
        while True:
            try:
                os.read(self.wake_r, 256)
            except BlockingIOError:
                break
        while True:
            try:
                pid, ws = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = status_from_wait(ws)
            if pid == self.init_pid and self.status is None:
                self.status = status
            elif pid == self.create_pid and self.pid_file:
                self.created(status)

    def created(self, status: int) -> None:
        """``argv`` (e.g. ``runc create``) ended: the init is now ours (re-parented)."""
        if status != 0:
            self.status = status
            return
        with open(self.pid_file, encoding="utf-8") as f:
            self.init_pid = int(f.read().strip())
        if self.then:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_spawnp(self.then[0], self.then, os.environ,
                                file_actions=[(os.POSIX_SPAWN_DUP2, null, 0),
                                              (os.POSIX_SPAWN_DUP2, null, 1),
                                              (os.POSIX_SPAWN_DUP2, null, 2)])  # fmt: skip
            finally:
                os.close(null)

    def drain(self, s: Stream) -> None:
        try:
            data = os.read(s.pipe, CHUNK)
        except BlockingIOError:
            return
        if not data:
            s.eof = True
            os.close(s.pipe)
            return
        s.pending += data
        self.flush(s)

    def flush(self, s: Stream) -> None:
        try:
            n = os.write(s.dest, s.pending)
        except BlockingIOError:
            return
        s.pending = s.pending[n:]

    def maybe_record(self) -> None:
        if self.recorded or self.status is None or not all(s.done() for s in self.streams):
            return
        self.record(self.init_pid, self.status)

    def record(self, pid: int, status: int) -> None:
        path = os.path.join(self.dir, "exit")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{pid} {status} {time.time():.6f}\n")
        os.rename(path + ".tmp", path)
        self.status = status
        self.recorded = True

    # -- control ------------------------------------------------------------------

    def accept(self) -> None:
        try:
            fd, _ = self.listener._accept()
        except OSError:
            return
        self.conns[fd] = _socket.socket(fileno=fd)

    def serve(self, fd: int) -> None:
        conn = self.conns[fd]
        try:
            request, ancdata, _, _ = conn.recvmsg(256, _socket.CMSG_SPACE(4 * MAX_FDS))
        except OSError:
            request, ancdata = b"", []
        fds = [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
               for level, kind, data in ancdata
               if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
               for i in range(0, len(data) - 3, 4)]  # fmt: skip
        if not request:
            for passed in fds:
                os.close(passed)
            del self.conns[fd]
            conn.close()
            return
        words = request.decode("ascii", "replace").split()
        try:
            if words == ["keep"]:
                self.kept += fds
                conn.send(b"ok")
            elif words == ["give"]:
                payload = b"".join(k.to_bytes(4, sys.byteorder, signed=True) for k in self.kept)
                conn.sendmsg([f"fds {len(self.kept)}".encode()],
                             [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)] if payload else [])
            else:
                for passed in fds:
                    os.close(passed)
                conn.send(self.answer(words).encode())
        except OSError:
            del self.conns[fd]
            conn.close()

    def answer(self, words: list[str]) -> str:
        me = os.getpid()
        match words:
            case ["status"]:
                if self.recorded:
                    return f"exited {me} {self.init_pid} {self.status}"
                if self.init_pid:
                    return f"running {me} {self.init_pid}"
                return f"starting {me}"
            case ["kill", sig] if sig.isdigit():
                if not self.init_pid or self.recorded:
                    return "error not running"
                try:
                    os.kill(self.init_pid, int(sig))
                except OSError as e:
                    return f"error {e.strerror}"
                return "ok"
            case ["shutdown"]:
                if not self.recorded:
                    return "error running"
                self.quit = True
                return "ok"
        return "error bad request"


def holder_main(state_dir: str) -> None:
    """Run a holder for ``state_dir`` in this process; never returns."""
    code = 0
    try:
        h = Holder(state_dir)
        h.start()
        h.run()
    except BaseException as e:
        code = 1
        with open(os.path.join(state_dir, "holder.err"), "a", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}\n")
    os._exit(code)


def zygote_main(sock_path: str) -> None:
    """Fork a holder per request (a state directory path, one datagram), as the fork
    server forks shims: pre-imported, frozen for the collector, double fork, new session.
    Answers "ok PID" (the intermediate's; the holder's own pid comes from its ``status``)."""
    gc.collect()
    gc.freeze()
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    listener.bind(sock_path)
    listener.listen(64)
    while True:
        fd, _ = listener._accept()
        conn = _socket.socket(fileno=fd)
        try:
            state_dir = conn.recv(4096).decode()
            pid = os.fork()
            if pid == 0:
                try:
                    if os.fork() == 0:
                        listener.close()
                        conn.close()
                        os.setsid()
                        holder_main(state_dir)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            conn.send(b"ok")
        except OSError as e:
            try:
                conn.send(f"error {e}".encode())
            except OSError:
                pass
        finally:
            conn.close()


def main(argv: list[str]) -> None:
    match argv:
        case ["holder", state_dir]:
            holder_main(state_dir)
        case ["zygote", sock_path]:
            zygote_main(sock_path)
    sys.exit("usage: split_holder.py holder STATE_DIR | zygote SOCKET")


if __name__ == "__main__":
    main(sys.argv[1:])
