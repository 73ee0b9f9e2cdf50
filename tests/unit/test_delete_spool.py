"""``delete`` after a killed shim: the init's real exit status from the spool (issue 14 item 5).

Every spool here is written by the daemon's own writer (:class:`Outbox` with a
:class:`Spool`, as the shim publishes), and read by the light ``delete``
(:mod:`supervisor.launch.spool`, no msgpack package, no protobuf).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from supervisor.api.events import task_pb2 as ev
from supervisor.api.task.v2 import shim_pb2
from supervisor.events import Event, Outbox, Spool
from supervisor.launch import delete, spool
from supervisor.launch.spool import spool_path

CID = "c1"
EXITED_AT = 1_795_000_000_123_456_789


async def never(event: Event) -> None:
    raise ConnectionError("containerd is down")


def stamp(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(ns)
    return t


def publish(bundle: Path, *events: object, ack: tuple[int, ...] = ()) -> Spool:
    """Publish ``events`` as the shim does (containerd down: nothing delivered)."""
    s = Spool(spool_path(str(bundle)))
    outbox = Outbox(never, "default", spool=s)
    for e in events:
        outbox.publish(e)  # type: ignore[arg-type]
    for seq in ack:
        s.ack(seq)
    s.close()
    return s


def init_exit(status: int, cid: str = CID, pid: int = 4242) -> ev.TaskExit:
    return ev.TaskExit(container_id=cid, id=cid, pid=pid, exit_status=status,
                       exited_at=stamp(EXITED_AT))


def test_the_init_exit_is_found(tmp_path: Path) -> None:
    publish(tmp_path,
            ev.TaskStart(container_id=CID, pid=4242),
            ev.TaskExit(container_id=CID, id="exec1", pid=5000, exit_status=3,
                        exited_at=stamp(1)),
            init_exit(7, cid="other"),
            init_exit(7),
            ev.TaskExit(container_id=CID, id="exec2", pid=5001, exit_status=4))
    found = spool.init_exit(str(tmp_path), CID)
    assert found is not None
    assert (found.pid, found.status, found.exited_at_ns) == (4242, 7, EXITED_AT)
    assert delete.last_status(str(tmp_path), CID, 0) == (4242, 7, EXITED_AT)
    assert delete.last_status(str(tmp_path), CID, 4242) == (4242, 7, EXITED_AT)


def test_an_exit_of_an_earlier_container_with_the_same_id_is_not_this_ones(
        tmp_path: Path) -> None:
    # A shared shim's spool keeps acknowledged records: the id's earlier init (pid 4242)
    # exited with 7; this container's init (pid 99, init.pid) left no exit: a kill.
    publish(tmp_path, ev.TaskStart(container_id=CID, pid=4242), init_exit(7), ack=(1, 2))
    pid, status, _ = delete.last_status(str(tmp_path), CID, 99)
    assert (pid, status) == (99, delete.SIGKILL_STATUS)


def test_in_the_work_dir(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    publish(tmp_path, init_exit(0))
    assert (tmp_path / "work" / spool.SPOOL_FILE).exists()
    assert delete.last_status(str(tmp_path), CID, 4242)[1] == 0


def test_an_acknowledged_exit_is_still_true(tmp_path: Path) -> None:
    publish(tmp_path, ev.TaskStart(container_id=CID, pid=1), init_exit(2), ack=(1,))
    assert delete.last_status(str(tmp_path), CID, 4242)[1] == 2


@pytest.mark.parametrize("events", [(), (ev.TaskStart(container_id=CID, pid=1),),
                                    (init_exit(7, cid="other"),)])
def test_no_exit_is_a_kill(tmp_path: Path, events: tuple[object, ...]) -> None:
    publish(tmp_path, *events)
    pid, status, _ = delete.last_status(str(tmp_path), CID, 1)
    assert (pid, status) == (1, 137)


def test_no_spool_is_a_kill(tmp_path: Path) -> None:
    assert delete.last_status(str(tmp_path), CID, 5)[:2] == (5, 137)


def test_all_delivered_is_a_kill(tmp_path: Path) -> None:
    """Everything acknowledged: the spool is truncated, containerd has the exit already."""
    publish(tmp_path, init_exit(7), ack=(1,))
    assert os.path.getsize(spool_path(str(tmp_path))) == 0
    assert delete.last_status(str(tmp_path), CID, 5)[1] == 137


def test_damage_before_the_exit_costs_nothing(tmp_path: Path) -> None:
    publish(tmp_path, ev.TaskStart(container_id=CID, pid=1))
    path = Path(spool_path(str(tmp_path)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data) + b"garbage")
    publish(tmp_path, init_exit(9))  # appended after the damaged record (a new shim rewrites)
    assert delete.last_status(str(tmp_path), CID, 4242)[1] == 9


def test_garbage_spool_is_a_kill(tmp_path: Path) -> None:
    Path(spool_path(str(tmp_path))).write_bytes(os.urandom(300) + spool.MAGIC + b"\xff" * 20)
    assert delete.last_status(str(tmp_path), CID, 1)[1] == 137


def test_a_shared_shims_spool_beside_the_bundle(tmp_path: Path) -> None:
    """A shim serving several containers keeps one spool, in a remaining container's bundle."""
    mine, other, stranger = tmp_path / CID, tmp_path / "c2", tmp_path / "c3"
    for b in (mine, other, stranger):
        b.mkdir()
    (mine / "address").write_text("unix:///run/containerd/s/abc")
    (other / "address").write_text("unix:///run/containerd/s/abc")
    (stranger / "address").write_text("unix:///run/containerd/s/def")
    publish(stranger, init_exit(5))
    assert delete.last_status(str(mine), CID, 1)[1] == 137
    publish(other, init_exit(6, cid="c2"), init_exit(8))
    assert delete.last_status(str(mine), CID, 4242)[1] == 8


def test_the_binary_answers_the_real_status(tmp_path: Path) -> None:
    """``SHIM ... delete`` as containerd runs it, for a container runc no longer knows."""
    publish(tmp_path, init_exit(7))
    (tmp_path / "init.pid").write_text("4242")
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.shim", "-namespace", "supervisor-unit-test",
         "-id", CID, "-bundle", str(tmp_path), "delete"],
        capture_output=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answer = shim_pb2.DeleteResponse.FromString(done.stdout)
    assert (answer.pid, answer.exit_status, answer.exited_at.ToNanoseconds()) == (
        4242, 7, EXITED_AT)
