"""The reaper: the one place in the shim that waits for children.

Design
------
The shim is the *child subreaper* of everything it starts: the OCI runtime's
short-lived commands, the container init processes that ``runc create`` leaves
behind (re-parented to us when runc exits), exec processes, logging binaries and
whatever those leave behind.  Every exit reaches us as a SIGCHLD, and
:meth:`Reaper.run` answers each SIGCHLD by draining ``wait4(-1, WNOHANG)``
until nothing is left.

Invariants
----------
* Nothing else in the process calls ``wait``/``waitpid``/``wait4``: no
  :class:`subprocess.Popen`, no ``trio.Process.wait``.  Children are started
  with :func:`spawn` (``posix_spawn``, which registers nothing anywhere).
* Subscribe before you spawn.  A :class:`Subscription` receives every exit
  reaped after it was opened, so a child that dies before its parent has even
  learned its pid is never missed: its exit waits in the subscription's buffer
  until someone asks for that pid (:meth:`Subscription.wait_for`).
* A death by signal N is reported as status ``128 + N``, as a shell and
  containerd do.
* Delivery never blocks the reaper: subscriptions buffer without bound, and a
  subscription lives only as long as its owner needs it (close it).
* An in-place upgrade pauses it (:meth:`Reaper.pause`): no ``wait4`` until
  :meth:`Reaper.resume` or the exec, so what exits meanwhile stays a zombie,
  which the new code's reaper reaps as it starts (:meth:`Reaper.run` drains
  first; the kernel keeps zombies and the subreaper flag across ``execve``).
  The new code subscribes before it runs its reaper, so none is missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

import trio

from supervisor.launch._spawn import spawn

__all__ = ["Exit", "Reaper", "Subscription", "run_captured", "spawn", "status_from_wait",
           "zombies"]

log = logging.getLogger("supervisor.reaper")

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class Exit:
    """One reaped child: its pid, its status (code, or 128+signal) and when."""

    pid: int
    status: int
    timestamp: float = field(default_factory=time.time)


def status_from_wait(wait_status: int) -> int:
    """Turn a raw ``wait`` status into a shell-style status (128+signal)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    # Stopped/continued are not requested (no WUNTRACED), so they cannot occur.
    return 255


def set_child_subreaper(on: bool = True) -> None:
    """Make this process the subreaper of its descendants (Linux >= 3.4), or (``on``
    False) no longer."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        flag = "" if on else ", 0"
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER{flag}): {os.strerror(err)}")


class Subscription:
    """Every exit reaped while this subscription is open, in reaping order.

    Use it either to wait for particular pids (:meth:`wait_for`, :meth:`poll`),
    or as an async iterator over all exits (the Task service does this), not
    both at once.
    """

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._send, self._recv = trio.open_memory_channel[Exit](float("inf"))
        self._seen: dict[int, Exit] = {}
        self.closed = False

    def _deliver(self, exit_: Exit) -> None:
        if not self.closed:
            self._send.send_nowait(exit_)

    def _pull_pending(self) -> None:
        while True:
            try:
                exit_ = self._recv.receive_nowait()
            except trio.WouldBlock:
                return
            self._seen[exit_.pid] = exit_

    @property
    def pending(self) -> int:
        """Exits delivered and not yet taken."""
        return self._recv.statistics().current_buffer_used

    def poll(self, pid: int) -> Exit | None:
        """The exit of ``pid`` if it was reaped since this subscription opened."""
        self._pull_pending()
        return self._seen.get(pid)

    async def wait_for(self, pid: int) -> Exit:
        """Wait until ``pid`` is reaped (returns at once if it already was)."""
        while True:
            found = self.poll(pid)
            if found is not None:
                return found
            exit_ = await self._recv.receive()
            self._seen[exit_.pid] = exit_

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Exit:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reaper._unsubscribe(self)
            self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Reaper:
    """Owns SIGCHLD and every ``wait4`` of the process.

    Start :meth:`run` in the shim's nursery (``await nursery.start(reaper.run)``)
    before anything is spawned.
    """

    def __init__(self, *, subreaper: bool = True) -> None:
        self._subscribers: list[Subscription] = []
        self._subreaper = subreaper
        self.reaped = 0
        self.paused = False

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        try:
            self._subscribers.remove(sub)
        except ValueError:
            pass  # already removed: close() is idempotent

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._subreaper:
            set_child_subreaper()
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            # A child may have exited before the receiver existed.
            self.drain()
            async for _ in signals:
                self.drain()

    def pause(self) -> None:
        """Stop reaping (an upgrade is about to exec): exits stay zombies from now on."""
        self.paused = True

    def resume(self) -> None:
        """Reap again, starting with what exited while paused."""
        self.paused = False
        self.drain()

    def drain(self) -> None:
        """Reap every child that has exited, and tell every subscriber (not while paused)."""
        while not self.paused:
            try:
                pid, wait_status, _rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            exit_ = Exit(pid, status_from_wait(wait_status))
            self.reaped += 1
            log.debug("reaped pid %d status %d", pid, exit_.status)
            for sub in list(self._subscribers):
                sub._deliver(exit_)


def zombies() -> Iterator[int]:
    """Pids of our children that are zombies (for tests and introspection)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # the process went away while we looked
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 2 and fields[0] == "Z" and int(fields[1]) == me:
            yield int(entry)


async def run_captured(reaper: Reaper, argv: list[str], *, timeout: float, limit: int,
                       stderr: bool = False) -> tuple[int, bytes, bytes]:
    """Run ``argv`` as a child of the shim and collect what it writes to stdout (and
    stderr, if asked; else /dev/null), at most ``limit`` bytes of each:
    ``(status, stdout, stderr)``.

    Status -1: the child did not end within ``timeout`` and was killed (while
    still unreaped, so the pid cannot be someone else's).  OSError if it cannot
    be started.  Subscribed before the spawn, as every child of the shim is.
    """
    pipes = {n: os.pipe2(os.O_CLOEXEC) for n in ((1, 2) if stderr else (1,))}
    output: dict[int, bytes] = {n: b"" for n in pipes}

    async def read(n: int) -> None:
        async with trio.lowlevel.FdStream(pipes[n][0]) as stream:
            while len(output[n]) < limit:
                data = await stream.receive_some(65536)
                if not data:
                    return
                output[n] += data

    status = -1
    with reaper.subscribe() as sub:
        try:
            pid = spawn(argv, fds={n: w for n, (_r, w) in pipes.items()})
        except BaseException:
            for r, w in pipes.values():
                os.close(r)
                os.close(w)
            raise
        for _r, w in pipes.values():
            os.close(w)
        try:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:
                    for n in pipes:
                        nursery.start_soon(read, n)
                status = (await sub.wait_for(pid)).status
        finally:
            if status < 0 and sub.poll(pid) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return status, output[1], output.get(2, b"")
