"""The event spool against bad records: damaged, crafted, torn, short-written (issue 15 item 4).

Each crafted file is written through the spool's own writer (``Spool.add`` with a
deliberately wrong field, or bytes changed afterwards), so the tests say what a
reader must survive whatever the framing is.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.api.events import task_pb2 as ev
from supervisor.api.events import ttrpc_pb2 as events_api
from supervisor.events import Event, Outbox, Spool


def exit_payload(i: int) -> bytes:
    return ev.TaskExit(container_id=f"cont{i}", id=f"cont{i}", pid=100 + i,
                       exit_status=i).SerializeToString()


def event(seq: Any, *, ts: Any = 1_700_000_000_000_000_000, payload: bytes | None = None
          ) -> Event:
    return Event(seq, ts, "ns", "/tasks/exit", "containerd.events.TaskExit",
                 exit_payload(seq) if payload is None else payload)


def write(path: Path, events: list[Event]) -> None:
    spool = Spool(str(path))
    for e in events:
        spool.add(e)
    spool.close()


def seqs(path: Path) -> list[int]:
    return [e.seq for e in Spool(str(path)).load()]


class EnvelopeSender:
    """Builds containerd's Forward envelope as the daemon does, then accepts."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    async def send(self, e: Event) -> None:
        request = events_api.ForwardRequest()
        request.envelope.timestamp.FromNanoseconds(e.timestamp_ns)
        request.envelope.namespace = e.namespace
        request.envelope.topic = e.topic
        request.envelope.event.type_url = e.type_url
        request.envelope.event.value = e.payload
        request.SerializeToString()
        self.accepted.append(e.seq)


def sent_by_a_new_shim(path: Path) -> list[int]:
    """What a shim starting on ``path`` forwards; raises if the Outbox cannot be built."""
    sender = EnvelopeSender()

    async def main() -> None:
        outbox = Outbox(sender.send, "ns", spool=Spool(str(path)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            await outbox.flush(60)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return sender.accepted


# --- crafted records ------------------------------------------------------------------


@pytest.mark.parametrize("bad_seq", ["7", [7], None, True, -1, 2**63])
def test_a_seq_of_the_wrong_type_or_range_is_skipped(tmp_path: Path, bad_seq: Any) -> None:
    path = tmp_path / "spool"
    write(path, [event(1), event(bad_seq, payload=b"x"), event(3)])
    spool = Spool(str(path))
    assert [e.seq for e in spool.load()] == [1, 3]
    assert spool.skipped == 1
    assert sent_by_a_new_shim(path) == [1, 3]  # the shim starts; the bad one blocks nothing


@pytest.mark.parametrize("bad", [
    {"ts": 1.7e18}, {"ts": "now"}, {"ts": -5}, {"payload": "text, not bytes"},
])
def test_a_bad_field_does_not_block_later_events(tmp_path: Path, bad: dict[str, Any]) -> None:
    path = tmp_path / "spool"
    write(path, [event(1), event(2, **bad), event(3)])
    spool = Spool(str(path))
    spool.load()
    assert spool.skipped == 1
    # Before: a float timestamp made Forward fail for ever and seq 3 never went out.
    assert sent_by_a_new_shim(path) == [1, 3]


def test_a_record_that_is_not_an_event_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path))
    spool.add(event(1))
    spool._write([1, 2])  # an ADD with too few fields
    spool._write({"seq": 3})  # type: ignore[arg-type]
    spool._write([9, 4])  # an unknown kind
    spool.add(event(5))
    spool.close()
    again = Spool(str(path))
    assert [e.seq for e in again.load()] == [1, 5]
    assert again.skipped == 3


# --- damaged bytes --------------------------------------------------------------------


def test_one_bad_byte_mid_file_loses_only_its_record(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    write(path, [event(i) for i in range(1, 6)])
    data = bytearray(path.read_bytes())
    ns = data.find(b"\xa2ns", data.find(b"\xa2ns") + 1)  # record 2's namespace header
    data[ns] = 0xC1  # a byte msgpack never uses
    path.write_bytes(bytes(data))
    spool = Spool(str(path))
    assert [e.seq for e in spool.load()] == [1, 3, 4, 5]
    assert spool.skipped == 1


def test_a_flipped_length_byte_loses_only_its_record(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    write(path, [event(i) for i in range(1, 6)])
    data = bytearray(path.read_bytes())
    data[data.find(exit_payload(2)) - 1] ^= 0x40  # the payload's length prefix
    path.write_bytes(bytes(data))
    spool = Spool(str(path))
    assert [e.seq for e in spool.load()] == [1, 3, 4, 5]
    assert spool.skipped == 1


def test_a_flipped_frame_length_loses_only_its_record(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    write(path, [event(1)])
    one = path.stat().st_size
    write(path, [event(i) for i in range(2, 6)])
    for byte in range(4, 8):  # each byte of the second record's frame length
        data = bytearray(path.read_bytes())
        data[one + byte] ^= 0x01
        damaged = tmp_path / f"damaged{byte}"
        damaged.write_bytes(bytes(data))
        spool = Spool(str(damaged))
        assert [e.seq for e in spool.load()] == [1, 3, 4, 5]
        assert spool.skipped == 1


def test_a_torn_record_then_a_new_shims_appends(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    write(path, [event(1), event(2), event(3)])
    path.write_bytes(path.read_bytes()[:-7])  # the shim died writing seq 3

    async def never(e: Event) -> None:
        raise ConnectionRefusedError

    outbox = Outbox(never, "ns", spool=Spool(str(path)))
    assert [e.seq for e in outbox.pending] == [1, 2]
    outbox.publish(ev.TaskExit(container_id="new1"))
    outbox.publish(ev.TaskExit(container_id="new2"))
    assert outbox.spool is not None
    outbox.spool.close()
    # A third shim replays the new events too, and nothing made of the torn bytes.
    third = Spool(str(path))
    loaded = third.load()
    assert [e.seq for e in loaded] == [1, 2, 3, 4]
    assert [ev.TaskExit.FromString(e.payload).container_id for e in loaded[2:]] == [
        "new1", "new2"]
    assert loaded[:2] == [event(1), event(2)]
    assert outbox.stats.spool_skipped == 1
    assert third.skipped == 0  # the torn bytes were cleaned away before the appends


# --- short writes and a full disk -----------------------------------------------------


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def short(fd: int, data: bytes) -> int:
        return real(fd, bytes(data[:7]))

    monkeypatch.setattr("supervisor.events.os.write", short)
    path = tmp_path / "spool"
    write(path, [event(i) for i in range(1, 4)])
    monkeypatch.undo()
    spool = Spool(str(path))
    assert [e.seq for e in spool.load()] == [1, 2, 3]
    assert spool.skipped == 0 and spool.error == ""


def test_a_write_failing_mid_record_leaves_no_torn_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path))
    outbox = Outbox(EnvelopeSender().send, "ns", spool=spool)
    outbox.publish(ev.TaskExit(container_id="a"))
    one_record = path.stat().st_size
    real = os.write
    calls = 0

    def filling(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("supervisor.events.os.write", filling)
    outbox.publish(ev.TaskExit(container_id="b"))
    outbox.publish(ev.TaskExit(container_id="c"))
    monkeypatch.undo()
    assert "No space left" in outbox.stats.spool_error
    assert [e.seq for e in outbox.pending] == [1, 2, 3]  # nothing dropped in memory
    spool.close()
    assert path.stat().st_size == one_record  # no torn record was left behind
    again = Spool(str(path))
    assert [e.seq for e in again.load()] == [1]
    assert again.skipped == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    target = tmp_path / "tiny"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,mode=700", "tmpfs", str(target)],
                   check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_a_full_tmpfs_keeps_whole_records_only(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "spool"
    spool = Spool(str(path))
    outbox = Outbox(EnvelopeSender().send, "ns", spool=spool)
    for i in range(400):  # far more than 8 KiB of records
        outbox.publish(ev.TaskExit(container_id=f"c{i}", id=f"c{i}", pid=i))
    assert outbox.stats.spool_error
    assert len(outbox.pending) == 400
    spool.close()
    again = Spool(str(path))
    loaded = again.load()
    assert loaded  # some fitted
    assert [e.seq for e in loaded] == list(range(1, len(loaded) + 1))
    assert loaded == outbox.pending[:len(loaded)]
    assert again.skipped == 0


# --- the previous release's format ----------------------------------------------------


def v1(*records: list[object]) -> bytes:
    """Spool bytes as the previous release wrote them: bare msgpack arrays."""
    return b"".join(msgpack.packb(r, use_bin_type=True) for r in records)


def v1_add(e: Event) -> list[object]:
    return [1, e.seq, e.timestamp_ns, e.namespace, e.topic, e.type_url, e.payload]


def test_an_old_format_spool_is_replayed_then_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(v1(v1_add(event(1)), v1_add(event(2)), [2, 1], v1_add(event(3))))
    outbox = Outbox(EnvelopeSender().send, "ns", spool=Spool(str(path)))
    assert outbox.pending == [event(2), event(3)]
    assert outbox.stats.spool_skipped == 0
    outbox.publish(ev.TaskExit(container_id="new"))
    assert outbox.spool is not None
    outbox.spool.close()
    # The old records were rewritten in the new format before the append, not mixed with it.
    again = Spool(str(path))
    assert [e.seq for e in again.load()] == [2, 3, 4]
    assert again.skipped == 0


def test_an_old_format_spool_with_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(v1(v1_add(event(1)), v1_add(event("x", payload=b"x")), v1_add(event(3)))[:-2])
    spool = Spool(str(path))
    assert [e.seq for e in spool.load()] == [1]
    assert spool.skipped == 2  # the string seq, and the torn last record


# --- random damage --------------------------------------------------------------------

# Each op: (kind, a, b, garbage); positions are taken modulo the current length.
OPS = st.tuples(st.sampled_from(["flip", "truncate", "insert", "duplicate", "delete"]),
                st.integers(0, 10**6), st.integers(0, 10**6), st.binary(min_size=1, max_size=40))


def damage(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, a, b, garbage in ops:
        n = len(out)
        p = a % (n + 1)
        if kind == "flip" and n:
            out[p % n] ^= garbage[0] or 0xFF
        elif kind == "truncate":
            del out[p:]
        elif kind == "insert":
            out[p:p] = garbage
        elif kind == "duplicate":
            piece = out[p:p + b % 200]
            dest = int.from_bytes(garbage[:3], "big") % (n + 1)
            out[dest:dest] = piece
        elif kind == "delete":
            del out[p:p + b % 100]
    return bytes(out)


def whole_records_only(data: bytes, records: list[bytes]) -> bool:
    """Whether ``data`` is nothing but whole original records, end to end."""
    p = 0
    while p < len(data):
        n = next((len(r) for r in records if data.startswith(r, p)), 0)
        if not n:
            return False
        p += n
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.binary(max_size=60), min_size=1, max_size=8),
       acked=st.sets(st.integers(1, 7)), ops=st.lists(OPS, max_size=4))
def test_random_damage(payloads: list[bytes], acked: set[int],
                       ops: list[tuple[str, int, int, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spool"
        spool = Spool(str(path))
        originals = {i: event(i, payload=p) for i, p in enumerate(payloads, 1)}
        adds: dict[int, tuple[int, int]] = {}  # seq -> its record's byte range
        acks: dict[int, tuple[int, int]] = {}
        size = 0
        for seq, e in originals.items():
            spool.add(e)
            adds[seq], size = (size, path.stat().st_size), path.stat().st_size
            if seq - 1 in acked:  # never the last: the file is truncated when nothing is pending
                spool.ack(seq - 1)
                acks[seq - 1], size = (size, path.stat().st_size), path.stat().st_size
        spool.close()
        original = path.read_bytes()
        data = damage(original, ops)
        path.write_bytes(data)

        loaded = Spool(str(path))
        events = loaded.load()  # never raises
        got = [e.seq for e in events]
        assert got == sorted(set(got))  # in order, once each
        assert all(originals.get(e.seq) == e for e in events)  # nothing made of garbage
        # A record whose bytes are whole somewhere in the file is intact (the scan finds it).
        must = {s for s, (a, b) in adds.items() if original[a:b] in data
                and not (s in acks and original[acks[s][0]:acks[s][1]] in data)}
        assert must <= set(got)  # every intact record that was not acked
        # Skipped exactly when some byte is not part of a whole record.
        records = [original[a:b] for a, b in (*adds.values(), *acks.values())]
        assert (loaded.skipped == 0) == whole_records_only(data, records)
        if data == original:
            assert loaded.skipped == 0
            assert set(got) == set(originals) - set(acks)

        # A shim appending after the damage: nothing it writes is glued to garbage.
        new = Event(loaded.last_seq + 1, 1, "ns", "/tasks/exit", "t", b"new")
        loaded.add(new)
        loaded.close()
        after = Spool(str(path))
        assert after.load() == [*events, new]
        assert after.skipped == 0
