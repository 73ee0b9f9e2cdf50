"""``supervisor ls|inspect|events``: discovery, reasons, formatting, JSON keys, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from google.protobuf.timestamp_pb2 import Timestamp
from test_introspect import FakeContainer, FakeTasks, Sender, make_service, running

from supervisor import cli, ttrpc
from supervisor.api.events import task_pb2 as ev
from supervisor.api.introspect import introspect_pb2 as pb
from supervisor.events import Event, Outbox, Spool
from supervisor.introspect import SERVICE
from supervisor.io import Stdio
from supervisor.process import Process, State

# The keys docs/inspect-json.md promises.
PROCESS_KEYS = {"exec_id", "pid", "status", "exited", "exit_status", "exited_at", "stdio", "io"}
CONTAINER_KEYS = {"id", "namespace", "bundle", "runtime_binary", "created", "init", "execs"}
EVENT_KEYS = {"seq", "topic", "timestamp", "namespace", "container_id", "process_id",
              "type_url", "attempts", "first_error"}
EVENTS_KEYS = {"published", "delivered", "replayed", "pending_count",
               "oldest_pending_age_seconds", "last_error", "last_error_at", "spool_error",
               "spool_skipped", "pending", "recent"}
SHIM_KEYS = {"pid", "version", "namespace", "address", "started_at", "uptime_seconds",
             "memory_rss_bytes", "memory_pss_bytes", "open_fds", "runtime_binary",
             "runtime_version", "runtime_version_error", "container_count", "python_version",
             "reserved", "closing", "code", "upgrades", "upgrade_attempts",
             "last_upgrade_error", "upgraded_at"}
ROW_KEYS = {"namespace", "id", "pid", "status", "exit_status", "exited_at", "execs", "shim_pid",
            "pending_events", "other_code", "address", "reachable", "error"}
SHIM_SUMMARY_KEYS = {"address", "reachable", "error", "pid", "namespaces", "containers",
                     "pending_events", "code", "upgrades", "other_code"}


@pytest.fixture(autouse=True)
def _no_machine_forkserver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``ls`` shows the fork server; not the machine's (a conformance run may leave one)."""
    monkeypatch.setenv("SUPERVISOR_FORKSERVER", str(tmp_path / "no-forkserver.sock"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: keep sockets out of pytest's deep tmp_path.
    d = Path("/tmp") / f"svc-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def bundle(state: Path, ns: str, cid: str, address: str | None) -> Path:
    b = state / cli.TASK_DIR / ns / cid
    b.mkdir(parents=True)
    if address is not None:
        (b / "address").write_text(address)
    return b


def args(*argv: str) -> argparse.Namespace:
    return cli.parser().parse_args(list(argv))


# --- discovery ---------------------------------------------------------------------


def test_discover(tmp_path: Path) -> None:
    bundle(tmp_path, "ns1", "a", "unix:///run/s/1\n")
    bundle(tmp_path, "ns1", "b", "unix:///run/s/1")
    bundle(tmp_path, "ns2", "c", None)
    bundle(tmp_path, "ns2", "d", "")
    bundle(tmp_path, "ns2", "e", "abstract-name")
    found = cli.discover(str(tmp_path))
    assert [(b.namespace, b.id, b.address) for b in found] == [
        ("ns1", "a", "unix:///run/s/1"), ("ns1", "b", "unix:///run/s/1"),
        ("ns2", "c", ""), ("ns2", "d", ""), ("ns2", "e", "@abstract-name"),
    ]
    assert "no address file" in found[2].error and "empty" in found[3].error
    assert [b.id for b in cli.discover(str(tmp_path), "ns1")] == ["a", "b"]
    assert cli.discover(str(tmp_path), "nope") == []
    (tmp_path / "empty").mkdir()
    assert cli.discover(str(tmp_path / "empty")) == []  # no task dir: nothing runs
    with pytest.raises(cli.Failed, match="does not exist"):
        cli.discover(str(tmp_path / "missing"))


def test_targets(tmp_path: Path) -> None:
    assert cli.looks_like_address("unix:///x") and cli.looks_like_address("./s")
    assert not cli.looks_like_address("my-container.1")
    assert cli.resolve("/run/s/x", str(tmp_path), None).address == "unix:///run/s/x"
    assert cli.resolve("unix:///a", str(tmp_path), None).container_id == ""
    bundle(tmp_path, "ns1", "x", "unix:///s1")
    bundle(tmp_path, "ns2", "x", "unix:///s2")
    bundle(tmp_path, "ns2", "y", None)
    with pytest.raises(cli.UsageError, match="ns1, ns2"):
        cli.resolve("x", str(tmp_path), None)
    t = cli.resolve("x", str(tmp_path), "ns2")
    assert (t.address, t.container_id, t.namespace) == ("unix:///s2", "x", "ns2")
    with pytest.raises(cli.Failed, match="no container 'z'"):
        cli.resolve("z", str(tmp_path), None)
    with pytest.raises(cli.Failed, match="no address file"):
        cli.resolve("y", str(tmp_path), None)


# --- reasons -------------------------------------------------------------------------


async def test_unreachable_reasons(short_dir: Path, nursery: trio.Nursery) -> None:
    r = await cli.ask(f"unix://{short_dir}/none", timeout=1)
    assert (r.reachable, r.error) == (False, "no such socket")

    refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    refused.bind(str(short_dir / "refused"))  # bound, not listening
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(short_dir / "mute"))
    mute.listen(8)  # never accepts: connect succeeds (backlog), nothing answers
    try:
        r = await cli.ask(f"unix://{short_dir}/refused", timeout=1)
        assert r.error == "connection refused"
        start = trio.current_time()
        r = await cli.ask(str(short_dir / "mute"), timeout=0.3)
        assert r.error == "timeout after 0.3s"
        assert trio.current_time() - start < 1.5  # the three calls run concurrently
    finally:
        refused.close()
        mute.close()

    other = ttrpc.Server()
    other.register("containerd.task.v2.Task", {})
    await nursery.start(other.serve, await ttrpc.open_unix_listener(short_dir / "go"))
    r = await cli.ask(str(short_dir / "go"), timeout=1)
    assert r.error.startswith("no introspection service")
    await other.shutdown(1)


# --- against a served fake shim ---------------------------------------------------------


async def serve_fake(nursery: trio.Nursery, path: Path, *, calls: list[str] | None = None,
                     namespace: str = "ns1") -> tuple[FakeTasks, Outbox, Sender]:
    sender = Sender()
    outbox = Outbox(sender.send, namespace)
    nursery.start_soon(outbox.run)
    tasks = FakeTasks(nursery)
    for cid, pid in (("a", 101), ("b", 102)):
        c = FakeContainer(cid, f"/state/{namespace}/{cid}", namespace=namespace)
        running(c, pid)
        tasks.containers[cid] = c
    b = tasks.containers["b"]
    b.init.state = State.STOPPED
    b.init.set_exited(137, when=1_700_000_000.0)
    e = Process("a", "sh1", Stdio(stdin="/f/in", stdout="/f/out", terminal=True))
    e.pid, e.state = 150, State.RUNNING
    tasks.containers["a"].execs["sh1"] = e
    outbox.publish(ev.TaskExit(container_id="b", id="b", pid=102, exit_status=137))
    handlers = make_service(tasks, outbox).handlers()
    if calls is not None:
        shim = handlers["Shim"]

        async def counted(ctx: ttrpc.CallContext, payload: bytes) -> bytes:
            calls.append("Shim")
            return await shim(ctx, payload)

        handlers["Shim"] = counted
    server = ttrpc.Server()
    server.register(SERVICE, handlers)
    await nursery.start(server.serve, await ttrpc.open_unix_listener(path))
    with trio.fail_after(5):
        while not outbox.stats.last_error:
            await trio.sleep(0.01)
    return tasks, outbox, sender


async def test_ls_table_and_json(short_dir: Path, nursery: trio.Nursery) -> None:
    calls: list[str] = []
    await serve_fake(nursery, short_dir / "s1", calls=calls)
    state = short_dir / "state"
    bundle(state, "ns1", "a", f"unix://{short_dir}/s1")
    bundle(state, "ns1", "b", f"unix://{short_dir}/s1")  # one shim, two containers
    bundle(state, "ns1", "dead", f"unix://{short_dir}/gone")
    bundle(state, "ns2", "new", None)
    out = io.StringIO()
    # Not the machine's fork server (a conformance run may have left one on the default path).
    nofs = str(short_dir / "no-forkserver.sock")
    code = await cli.cmd_ls(args("ls", "--state-dir", str(state), "--forkserver", nofs), out)
    assert code == cli.EXIT_FAILED  # some shims are unreachable
    assert calls == ["Shim"]  # the shared shim was asked once
    lines = out.getvalue().splitlines()
    assert lines[0].split() == list(cli.LS_HEADERS)
    rows = {ln.split()[1]: ln.split() for ln in lines[1:]}
    assert rows["a"][:8] == ["ns1", "a", "101", "RUNNING", "-", "1", str(os.getpid()), "1"]
    assert rows["b"][:5] == ["ns1", "b", "102", "STOPPED", "137"]
    assert rows["dead"][3] == "UNREACHABLE" and "no such socket" in lines[3]
    assert rows["new"][3] == "UNREACHABLE" and "no address file" in lines[4]

    out = io.StringIO()
    code = await cli.cmd_ls(args("ls", "--state-dir", str(state), "-n", "ns1", "--json",
                                 "--forkserver", nofs), out)
    doc = json.loads(out.getvalue())
    assert set(doc) == {"containers", "shims", "forkserver"}
    assert all(set(r) == ROW_KEYS for r in doc["containers"])
    assert all(set(s) == SHIM_SUMMARY_KEYS for s in doc["shims"])
    by_id = {r["id"]: r for r in doc["containers"]}
    assert by_id["a"]["pid"] == 101 and by_id["a"]["status"] == "running"
    assert by_id["a"]["exit_status"] is None and by_id["a"]["pending_events"] == 1
    assert by_id["b"]["exit_status"] == 137
    assert by_id["b"]["exited_at"] == "2023-11-14T22:13:20.000000000Z"
    assert by_id["dead"]["reachable"] is False and by_id["dead"]["error"] == "no such socket"
    assert "new" not in by_id
    shims = {s["address"]: s for s in doc["shims"]}
    assert shims[f"unix://{short_dir}/s1"]["containers"] == ["a", "b"]
    assert shims[f"unix://{short_dir}/s1"]["pid"] == os.getpid()


async def test_inspect_and_events(short_dir: Path, nursery: trio.Nursery) -> None:
    _tasks, outbox, sender = await serve_fake(nursery, short_dir / "s1")
    state = short_dir / "state"
    bundle(state, "ns1", "a", f"unix://{short_dir}/s1")
    bundle(state, "ns1", "ghost", f"unix://{short_dir}/s1")

    out = io.StringIO()
    a = args("inspect", "a", "--state-dir", str(state), "--json")
    assert await cli.cmd_inspect(a, out) == cli.EXIT_OK
    doc = json.loads(out.getvalue())
    assert set(doc) == {"address", "reachable", "error", "shim", "containers", "events"}
    assert set(doc["shim"]) == SHIM_KEYS and set(doc["events"]) == EVENTS_KEYS
    assert [c["id"] for c in doc["containers"]] == ["a"]  # only the one asked for
    c = doc["containers"][0]
    assert set(c) == CONTAINER_KEYS and set(c["init"]) == PROCESS_KEYS
    assert set(c["execs"][0]) == PROCESS_KEYS
    assert c["execs"][0]["exec_id"] == "sh1" and c["execs"][0]["stdio"]["terminal"] is True
    assert all(set(e) == EVENT_KEYS for e in doc["events"]["pending"])
    assert doc["events"]["pending"][0]["topic"] == "/tasks/exit"
    assert doc["shim"]["runtime_version"] == "runc version 9.9.9"

    out = io.StringIO()
    whole = args("inspect", str(short_dir / "s1"))
    assert await cli.cmd_inspect(whole, out) == cli.EXIT_OK
    text = out.getvalue()
    for needle in ("Shim\n", "Container a\n", "Container b\n", "runc (runc version 9.9.9)",
                   "sh1", "RUNNING", "STOPPED", "/tasks/exit", "Pending:", "Last error:",
                   "containerd is down"):
        assert needle in text, needle

    with pytest.raises(cli.Failed, match="does not know"):
        await cli.cmd_inspect(args("inspect", "ghost", "--state-dir", str(state)),
                              io.StringIO())

    sender.up = True
    with trio.fail_after(5):
        while outbox.pending:
            await trio.sleep(0.01)
    out = io.StringIO()
    e = args("events", "a", "--state-dir", str(state))
    assert await cli.cmd_events(e, out) == cli.EXIT_OK
    text = out.getvalue()
    assert "Pending:    0" in text and "Recently delivered:" in text and "/tasks/exit" in text
    out = io.StringIO()
    e = args("events", "a", "--state-dir", str(state), "--json")
    await cli.cmd_events(e, out)
    doc = json.loads(out.getvalue())
    assert set(doc) == {"address", "reachable", "error", "shim_pid", "namespace", "events"}
    assert doc["events"]["pending_count"] == 0
    assert [x["topic"] for x in doc["events"]["recent"]] == ["/tasks/exit"]


async def test_events_show_skipped_spool_records(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = str(tmp_path / "spool")
    spool = Spool(path)
    spool.add(Event(1, 1, "ns1", "/tasks/exit", "t", b""))
    spool.add(Event(2, 1.5, "ns1", "/tasks/exit", "t", b""))  # type: ignore[arg-type]
    spool.close()
    outbox = Outbox(Sender().send, "ns1", spool=Spool(path))
    got = await make_service(FakeTasks(nursery), outbox).events(pb.EventsRequest())
    assert (got.replayed, got.spool_skipped) == (1, 1)
    assert cli.events_json(got)["spool_skipped"] == 1
    out = io.StringIO()
    cli.format_events(got, out, time.time())
    assert "Skipped:    1 damaged or invalid spool records" in out.getvalue()
    out = io.StringIO()
    cli.format_events(pb.EventsResponse(), out, time.time())
    assert "Skipped:" not in out.getvalue()


# --- main and exit codes ------------------------------------------------------------------


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out, err), out.getvalue(), err.getvalue()


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main()[0] == cli.EXIT_USAGE
    assert run_main("ls", "--timeout", "0")[0] == cli.EXIT_USAGE
    assert run_main("inspect")[0] == cli.EXIT_USAGE
    code, _out, err = run_main("ls", "--state-dir", str(tmp_path / "missing"))
    assert code == cli.EXIT_FAILED and "does not exist" in err
    code, out, _err = run_main("ls", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_OK and out.split() == list(cli.LS_HEADERS)
    code, _out, err = run_main("inspect", "nope", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_FAILED and "no container 'nope'" in err
    bundle(tmp_path, "ns1", "x", "unix:///nonexistent/sock")
    bundle(tmp_path, "ns2", "x", "unix:///nonexistent/sock")
    code, _out, err = run_main("events", "x", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_USAGE and "--namespace" in err
    code, out, err = run_main("inspect", "x", "-n", "ns1", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_FAILED
    assert "unreachable: no such socket" in err and "Traceback" not in err + out
    code, out, err = run_main("inspect", "x", "-n", "ns1", "--state-dir", str(tmp_path),
                              "--json")
    assert code == cli.EXIT_FAILED and json.loads(out)["error"] == "no such socket"
    assert run_main("--version")[0] == 0
    capsys.readouterr()


def test_time_and_age_formatting() -> None:
    ts = Timestamp(seconds=1_700_000_000, nanos=5)
    assert cli._time(ts) == "2023-11-14T22:13:20.000000005Z"
    assert cli._time(Timestamp()) is None
    assert cli._time(ts, present=False) is None
    assert cli._ago(3.21) == "3.2s" and cli._ago(125) == "2m05s"
    assert cli._ago(3 * 3600 + 60) == "3h01m" and cli._ago(3 * 86400) == "3d00h"
    assert cli._age_of("2023-11-14T22:13:20.000000005Z", 1_700_000_010.0) == "10.0s"
