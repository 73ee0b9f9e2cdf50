"""The reaper: subscribe-before-spawn, 128+signal, subreaping, no zombies."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator

import pytest
import trio

from supervisor.reaper import PR_SET_CHILD_SUBREAPER, Reaper, spawn, zombies


@pytest.fixture(autouse=True)
def _not_a_subreaper_afterwards() -> Iterator[None]:
    """The reaper makes this (pytest) process a subreaper; undo it, or the shims later
    tests start would be re-parented to pytest, which never reaps them."""
    yield
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


async def test_exit_code_and_signal(nursery: trio.Nursery) -> None:
    reaper = Reaper()
    await nursery.start(reaper.run)
    with reaper.subscribe() as sub:
        pid = spawn(["sh", "-c", "exit 3"])
        assert (await sub.wait_for(pid)).status == 3
        pid = spawn(["sleep", "10"])
        os.kill(pid, signal.SIGKILL)
        assert (await sub.wait_for(pid)).status == 128 + signal.SIGKILL


async def test_exit_before_pid_known_is_buffered(nursery: trio.Nursery) -> None:
    reaper = Reaper()
    await nursery.start(reaper.run)
    with reaper.subscribe() as sub:
        pid = spawn(["true"])
        # Let the child die and be reaped before anyone asks for it.
        with trio.move_on_after(5):
            while sub.poll(pid) is None:
                await trio.sleep(0.01)
        assert sub.poll(pid) is not None
        assert (await sub.wait_for(pid)).status == 0


async def test_orphans_are_reaped(nursery: trio.Nursery, tmp_path: os.PathLike[str]) -> None:
    reaper = Reaper()
    await nursery.start(reaper.run)
    pidfile = os.path.join(tmp_path, "pid")
    with reaper.subscribe() as sub:
        pid = spawn(["sh", "-c", f"sleep 0.3 & echo $! > {pidfile}; exit 0"])
        await sub.wait_for(pid)
        with open(pidfile) as f:
            orphan = int(f.read())
        assert (await sub.wait_for(orphan)).status == 0
    assert list(zombies()) == []


async def test_spawn_fd_mapping(nursery: trio.Nursery) -> None:
    reaper = Reaper()
    await nursery.start(reaper.run)
    r, w = os.pipe()
    with reaper.subscribe() as sub:
        pid = spawn(["sh", "-c", "echo out; echo err >&2; echo three >&3"], fds={1: w, 2: w, 3: w})
        os.close(w)
        assert (await sub.wait_for(pid)).status == 0
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    assert sorted(data.split()) == [b"err", b"out", b"three"]


async def test_iteration_sees_every_exit(nursery: trio.Nursery) -> None:
    reaper = Reaper()
    await nursery.start(reaper.run)
    with reaper.subscribe() as sub:
        pids = {spawn(["sh", "-c", f"exit {i}"]): i for i in range(20)}
        seen: dict[int, int] = {}
        async for ex in sub:
            seen[ex.pid] = ex.status
            if len(seen) == len(pids):
                break
    assert seen == pids
