"""The outbox: order, retries without limit, the spool, and what happens when it cannot write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor.api.events import task_pb2 as ev
from supervisor.events import Event, Outbox, Spool


class FlakySender:
    """Fails the first ``failures`` sends, then accepts; records what was accepted."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.accepted: list[Event] = []
        self.attempts = 0
        self.up = True

    async def send(self, event: Event) -> None:
        self.attempts += 1
        if not self.up or self.failures > 0:
            self.failures -= 1
            raise ConnectionRefusedError("containerd is down")
        self.accepted.append(event)


def exit_event(i: int) -> ev.TaskExit:
    return ev.TaskExit(container_id=f"c{i}", id=f"c{i}", pid=100 + i, exit_status=i)


async def test_order_kept_through_failures(nursery: trio.Nursery) -> None:
    sender = FlakySender(failures=5)
    outbox = Outbox(sender.send, "ns")
    nursery.start_soon(outbox.run)
    outbox.publish(ev.TaskStart(container_id="c", pid=1))
    for i in range(10):
        outbox.publish(exit_event(i))
    assert await outbox.flush(30)
    assert [e.topic for e in sender.accepted] == ["/tasks/start"] + ["/tasks/exit"] * 10
    assert [e.seq for e in sender.accepted] == list(range(1, 12))
    assert outbox.stats.delivered == 11 and not outbox.pending


async def test_no_retry_limit(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
                              ) -> None:
    sender = FlakySender()
    sender.up = False
    outbox = Outbox(sender.send, "ns")
    nursery.start_soon(outbox.run)
    outbox.publish(exit_event(1))
    await trio.sleep(3600)  # an hour of outage (virtual time)
    assert sender.attempts > 1000
    assert len(outbox.pending) == 1 and outbox.stats.last_error
    sender.up = True
    await trio.sleep(1)  # the backoff is capped: delivered within a second
    assert [e.seq for e in sender.accepted] == [1]


async def test_spool_replays_after_a_shim_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "spool")
    dead = FlakySender()
    dead.up = False
    first = Outbox(dead.send, "ns", spool=Spool(path))
    for i in range(3):
        first.publish(exit_event(i))
    # (the shim is killed here: its outbox never ran)

    sender = FlakySender()
    second = Outbox(sender.send, "ns", spool=Spool(path))
    assert second.stats.replayed == 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.run)
        second.publish(exit_event(9))
        assert await second.flush(10)
        nursery.cancel_scope.cancel()
    payloads = [ev.TaskExit.FromString(e.payload).container_id for e in sender.accepted]
    assert payloads == ["c0", "c1", "c2", "c9"]
    assert [e.seq for e in sender.accepted] == [1, 2, 3, 4]
    assert sender.accepted[0].timestamp_ns == first.pending[0].timestamp_ns
    # Everything was acknowledged: the spool is empty, a third shim replays nothing.
    assert Spool(path).load() == []


async def test_forwarding_never_syncs_nor_needs_a_thread(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The spool outlives the shim, not the machine (after a reboot containerd removes
    # the work directories before reading them): an fsync per event, from a worker
    # thread, cost CPU per exec and a thread in every shim for nothing.
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the outbox must neither fsync nor start a thread")

    monkeypatch.setattr(os, "fsync", refused)
    monkeypatch.setattr(os, "fdatasync", refused)
    monkeypatch.setattr(trio.to_thread, "run_sync", refused)
    path = str(tmp_path / "spool")
    sender = FlakySender(failures=1)
    outbox = Outbox(sender.send, "ns", spool=Spool(path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        for i in range(3):
            outbox.publish(exit_event(i))
            # In the file as soon as publish returns: a shim killed now loses nothing.
            assert [e.seq for e in Spool(path).load()] == list(range(1, i + 2))
        assert await outbox.flush(10)
        await outbox.pause()
        nursery.cancel_scope.cancel()
    assert [e.seq for e in sender.accepted] == [1, 2, 3]
    assert not outbox.stats.spool_error and Spool(path).load() == []


def test_spool_ignores_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path))
    outbox = Outbox(FlakySender().send, "ns", spool=spool)
    outbox.publish(exit_event(1))
    outbox.publish(exit_event(2))
    spool.close()
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the shim died mid-write
    assert [e.seq for e in Spool(str(path)).load()] == [1]


async def test_unwritable_spool_falls_back_to_memory(nursery: trio.Nursery, tmp_path: Path
                                                     ) -> None:
    spool = Spool(str(tmp_path / "no" / "such" / "dir" / "spool"))
    sender = FlakySender()
    outbox = Outbox(sender.send, "ns", spool=spool)
    nursery.start_soon(outbox.run)
    outbox.publish(exit_event(1))
    outbox.publish(exit_event(2))
    assert outbox.stats.spool_error
    assert await outbox.flush(10)
    assert len(sender.accepted) == 2


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(str(tmp_path / "spool"))
    outbox = Outbox(FlakySender().send, "ns", spool=spool)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("supervisor.events.os.write", full)
    outbox.publish(exit_event(1))
    outbox.publish(exit_event(2))
    assert "No space left" in outbox.stats.spool_error
    assert len(outbox.pending) == 2
