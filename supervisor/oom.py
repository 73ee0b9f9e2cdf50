"""OOM kills of a container's cgroup, noticed as they happen and counted before its exit.

Design
------
The kernel counts the OOM kills of a memory cgroup (``oom_kill`` in v1's
``memory.oom_control`` and in v2's ``memory.events``).  :class:`OOMWatcher`
remembers the count it last reported; :meth:`OOMWatcher.take` returns how many
kills happened since.  Two things call it:

* :meth:`OOMWatcher.watch`, woken by the kernel (v1: an eventfd registered in
  ``cgroup.event_control``; v2: inotify on ``memory.events``), so a TaskOOM is
  published while the container still runs;
* the Task service, right before it publishes the init's TaskExit, so an OOM
  kill that ended the container is always reported *before* its exit even when
  the SIGCHLD won the race against the notification (containerd#8893).

Invariant: each kill is reported once, by whichever caller takes it first.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from supervisor.metrics import CgroupPaths

log = logging.getLogger("supervisor.oom")

IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


def _read_counter(path: Path, key: str) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


class OOMWatcher:
    """The OOM kills of one container's memory cgroup (v1 or v2)."""

    def __init__(self, paths: CgroupPaths) -> None:
        memory = paths.v1.get("memory")
        self.v1 = memory if memory is not None and (memory / "memory.oom_control").exists() \
            else None
        unified = paths.unified
        self.v2 = unified if (self.v1 is None and unified is not None
                              and (unified / "memory.events").exists()) else None
        self._notified = 0  # for kernels whose v1 oom_control has no oom_kill counter
        self.seen = self.count()

    @property
    def available(self) -> bool:
        return self.v1 is not None or self.v2 is not None

    def count(self) -> int:
        if self.v1 is not None:
            n = _read_counter(self.v1 / "memory.oom_control", "oom_kill")
            return n if n is not None else self._notified
        if self.v2 is not None:
            n = _read_counter(self.v2 / "memory.events", "oom_kill")
            return n if n is not None else 0
        return 0

    def take(self) -> int:
        """OOM kills since the last call (never negative)."""
        now = self.count()
        new, self.seen = max(0, now - self.seen), max(now, self.seen)
        return new

    async def watch(self, on_oom: Callable[[], None]) -> None:
        """Call ``on_oom`` whenever the kernel reports an OOM event, until cancelled."""
        if self.v1 is not None:
            await self._watch_v1(self.v1, on_oom)
        elif self.v2 is not None:
            await self._watch_v2(self.v2, on_oom)

    async def _watch_v1(self, memory: Path, on_oom: Callable[[], None]) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(memory / "cgroup.event_control", "w", encoding="ascii") as f:
                    f.write(f"{efd} {control}")
            finally:
                os.close(control)
            while True:
                await trio.lowlevel.wait_readable(efd)
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    continue
                if not (memory / "memory.oom_control").exists():
                    return  # the cgroup is gone (removal also signals the eventfd)
                self._notified += 1
                on_oom()
        except OSError as e:
            log.warning("cannot watch %s for OOM kills: %s", memory, e)
        finally:
            os.close(efd)

    async def _watch_v2(self, group: Path, on_oom: Callable[[], None]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify_init1: %s", os.strerror(ctypes.get_errno()))
            return
        try:
            if libc.inotify_add_watch(fd, str(group / "memory.events").encode(), IN_MODIFY) < 0:
                log.warning("cannot watch %s: %s", group, os.strerror(ctypes.get_errno()))
                return
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    continue
                on_oom()
        finally:
            os.close(fd)
