"""``supervisor upgrade``: arguments, which shims, the polling, the verdict, the output, the
fork server's retirement -- against fake shims served in memory (no daemon, no exec).

A fake shim here is a ttrpc server with the Introspect ``Shim`` method and the Upgrade
service, driven by a script: how many polls an attempt takes, whether it upgrades, whether
the connection drops on the way (as an exec window or a fallback may make it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from test_forkserver_spawn import answering, wait_for

from supervisor import cli, ttrpc
from supervisor.api.introspect import introspect_pb2 as pb
from supervisor.api.upgrade import upgrade_pb2 as upb
from supervisor.introspect import SERVICE
from supervisor.launch import forkclient

OUTCOME_KEYS = {"address", "containers", "upgraded", "pid", "from_code", "to_code", "code",
                "upgrades", "upgrade_attempts", "error"}
FORKSERVER_KEYS = {"socket", "pid", "code", "installed_code", "action", "error"}


@pytest.fixture(autouse=True)
def _no_machine_forkserver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUPERVISOR_FORKSERVER", str(tmp_path / "no-forkserver.sock"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sv-up-", dir="/tmp"))  # AF_UNIX: short paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


def bundle(state: Path, ns: str, cid: str, address: str | None) -> None:
    b = state / cli.TASK_DIR / ns / cid
    b.mkdir(parents=True)
    if address is not None:
        (b / "address").write_text(address)


def args(*argv: str) -> cli.argparse.Namespace:
    return cli.parser().parse_args(list(argv))


# --- the fake shim -------------------------------------------------------------------


@dataclass
class FakeShim:
    """Introspect/Shim and Upgrade/Upgrade as a shim answers them, scripted.

    ``polls``: Shim answers after the Upgrade call before the attempt is over;
    ``succeed``: whether it ends upgraded (else ``error`` is its last_upgrade_error);
    ``refuse``: the Upgrade call's status instead; ``drop``: the first poll after the
    call is never answered (the client must give it up, close and dial again).
    """

    polls: int = 2
    succeed: bool = True
    error: str = "new code failed to start: ImportError: boom"
    refuse: ttrpc.RPCError | None = None
    drop: bool = False
    upgrade_calls: int = 0
    shim: pb.ShimResponse = field(default_factory=lambda: pb.ShimResponse(
        pid=4242, code="1.0+old", upgrades=1, upgrade_attempts=3))
    pending: int = -1  # polls left before the attempt is over; -1: none under way
    cancel_scopes: list[trio.CancelScope] = field(default_factory=list)

    async def on_shim(self, ctx: ttrpc.CallContext, payload: bytes) -> bytes:
        if self.pending == 0:
            self.pending = -1
            self.shim.upgrade_attempts += 1
            if self.succeed:
                self.shim.upgrades += 1
                self.shim.code = "1.0+new"
                self.shim.last_upgrade_error = ""
            else:
                self.shim.last_upgrade_error = self.error
        elif self.pending > 0:
            self.pending -= 1
            if self.drop:  # a poll that never gets its answer: the client gives it up
                self.drop = False
                await trio.sleep_forever()
        return self.shim.SerializeToString()

    async def on_upgrade(self, ctx: ttrpc.CallContext, payload: bytes) -> bytes:
        self.upgrade_calls += 1
        upb.UpgradeRequest.FromString(payload)
        if self.refuse is not None:
            raise self.refuse
        answer = upb.UpgradeResponse(pid=self.shim.pid,
                                     upgrade_attempts=self.shim.upgrade_attempts,
                                     from_code=self.shim.code, to_code="1.0+new")
        self.pending = self.polls
        return answer.SerializeToString()


async def serve(nursery: trio.Nursery, path: Path, fake: FakeShim, *,
                upgrade_service: bool = True) -> None:
    server = ttrpc.Server()
    server.register(SERVICE, {"Shim": fake.on_shim})
    if upgrade_service:
        server.register(cli.UPGRADE_SERVICE, {"Upgrade": fake.on_upgrade})
    await nursery.start(server.serve, await ttrpc.open_unix_listener(path))


# --- arguments and targets -----------------------------------------------------------


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out, err), out.getvalue(), err.getvalue()


def test_arguments(tmp_path: Path) -> None:
    code, _, err = run_main("upgrade", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_USAGE and "or --all" in err
    code, _, err = run_main("upgrade", "x", "--all", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_USAGE and "not both" in err
    assert run_main("upgrade", "--all", "--parallel", "0")[0] == cli.EXIT_USAGE
    assert run_main("upgrade", "--all", "--wait", "-1")[0] == cli.EXIT_USAGE
    code, _, err = run_main("upgrade", "nope", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_FAILED and "no container 'nope'" in err
    a = args("upgrade", "--all")
    assert (a.wait, a.parallel, a.quiesce_timeout) == (cli.DEFAULT_UPGRADE_WAIT,
                                                       cli.DEFAULT_PARALLEL, 0.0)
    # Nothing to upgrade is not a failure.
    code, out, _ = run_main("upgrade", "--all", "--state-dir", str(tmp_path))
    assert code == cli.EXIT_OK and "0 of 0 shims upgraded" in out


def test_targets_name_each_shim_once(tmp_path: Path) -> None:
    bundle(tmp_path, "ns1", "a", "unix:///s/1")
    bundle(tmp_path, "ns1", "b", "unix:///s/1")  # a shared shim
    bundle(tmp_path, "ns2", "c", "unix:///s/2")
    bundle(tmp_path, "ns2", "new", None)  # its shim is not started yet
    shims, skipped = cli.upgrade_targets(args("upgrade", "--all", "--state-dir", str(tmp_path)))
    assert shims == {"unix:///s/1": ["ns1/a", "ns1/b"], "unix:///s/2": ["ns2/c"]}
    assert [(b.id, "no address file" in b.error) for b in skipped] == [("new", True)]
    shims, skipped = cli.upgrade_targets(args("upgrade", "--all", "-n", "ns1", "--state-dir",
                                              str(tmp_path)))
    assert (shims, skipped) == ({"unix:///s/1": ["ns1/a", "ns1/b"]}, [])
    shims, _ = cli.upgrade_targets(args("upgrade", "a", "b", "/s/2", "--state-dir",
                                        str(tmp_path)))
    assert shims == {"unix:///s/1": ["ns1/a", "ns1/b"], "unix:///s/2": ["ns2/c"]}
    shims, _ = cli.upgrade_targets(args("upgrade", "/s/3", "--state-dir",
                                        str(tmp_path / "none")))
    assert shims == {"unix:///s/3": []}


# --- polling and the verdict (pure) ----------------------------------------------------


async def test_await_attempt_retries_until_the_attempts_rise(
        autojump_clock: trio.testing.MockClock) -> None:
    script: list[pb.ShimResponse | BaseException] = [
        pb.ShimResponse(upgrade_attempts=3),  # still under way
        ttrpc.ConnectionBroken("exec"),
        ConnectionRefusedError(),
        trio.TooSlowError(),
        pb.ShimResponse(upgrade_attempts=4, upgrades=2),
        pb.ShimResponse(upgrade_attempts=5),  # never asked
    ]

    async def poll() -> pb.ShimResponse:
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    got, last = await cli.await_attempt(poll, 3, trio.current_time() + 60)
    assert got is not None and (got.upgrade_attempts, got.upgrades, last) == (4, 2, None)
    assert len(script) == 1


async def test_await_attempt_gives_up_at_the_deadline_with_the_last_failure(
        autojump_clock: trio.testing.MockClock) -> None:
    failures = [0]

    async def refused() -> pb.ShimResponse:
        failures[0] += 1
        raise ConnectionRefusedError("refused")

    got, last = await cli.await_attempt(refused, 0, trio.current_time() + 1)
    assert got is None and isinstance(last, ConnectionRefusedError) and failures[0] > 1

    async def unchanged() -> pb.ShimResponse:
        return pb.ShimResponse(upgrade_attempts=7)

    assert await cli.await_attempt(unchanged, 7, trio.current_time() + 1) == (None, None)


async def test_await_attempt_lets_other_errors_through(
        autojump_clock: trio.testing.MockClock) -> None:
    async def broken() -> pb.ShimResponse:
        raise ValueError("a bug, not a shim away")

    with pytest.raises(ValueError):
        await cli.await_attempt(broken, 0, trio.current_time() + 1)


def test_judge() -> None:
    before = pb.ShimResponse(pid=7, upgrades=1, upgrade_attempts=1, code="a")
    o = cli.Outcome("unix:///s", [])
    cli.judge(o, before, pb.ShimResponse(pid=7, upgrades=2, upgrade_attempts=2, code="b"))
    assert (o.upgraded, o.code, o.upgrades, o.upgrade_attempts, o.error) == (True, "b", 2, 2, "")
    o = cli.Outcome("unix:///s", [])
    cli.judge(o, before, pb.ShimResponse(pid=7, upgrades=1, upgrade_attempts=2, code="a",
                                         last_upgrade_error="quiesce timed out"))
    assert (o.upgraded, o.error) == (False, "quiesce timed out")
    o = cli.Outcome("unix:///s", [])
    cli.judge(o, before, pb.ShimResponse(pid=7, upgrades=1, upgrade_attempts=2))
    assert not o.upgraded and "no reason" in o.error
    o = cli.Outcome("unix:///s", [])
    cli.judge(o, before, pb.ShimResponse(pid=8, upgrades=2, upgrade_attempts=2))
    assert not o.upgraded and "pid 7 -> 8" in o.error


def test_refusal_reasons() -> None:
    assert cli.refusal(ttrpc.RPCError(ttrpc.Code.UNIMPLEMENTED, "x"), 1).startswith(
        "no upgrade service")
    assert cli.refusal(ttrpc.RPCError(ttrpc.Code.FAILED_PRECONDITION, "an upgrade is under way"),
                       1) == "refused: an upgrade is under way"
    assert "cannot run: ImportError" in cli.refusal(
        ttrpc.RPCError(ttrpc.Code.UNAVAILABLE, "ImportError: x"), 1)
    assert cli.refusal(FileNotFoundError(), 1) == "no such socket"


# --- against fake shims ----------------------------------------------------------------


async def test_upgrade_shim_outcomes(short_dir: Path, nursery: trio.Nursery) -> None:
    fakes = {
        "ok": FakeShim(),
        "dropped": FakeShim(drop=True),
        "failed": FakeShim(succeed=False),
        "busy": FakeShim(refuse=ttrpc.RPCError(ttrpc.Code.FAILED_PRECONDITION,
                                               "an upgrade is under way")),
        "old": FakeShim(),
    }
    for name, fake in fakes.items():
        await serve(nursery, short_dir / name, fake, upgrade_service=name != "old")

    async def up(name: str, timeout: float = 5) -> cli.Outcome:
        return await cli.upgrade_shim(f"unix://{short_dir}/{name}", [f"ns/{name}"],
                                      timeout=timeout, wait=30, interval=0.01)

    o = await up("ok")
    assert (o.upgraded, o.pid, o.from_code, o.to_code, o.code) == (
        True, 4242, "1.0+old", "1.0+new", "1.0+new")
    assert (o.upgrades, o.upgrade_attempts, o.error) == (2, 4, "")
    assert set(o.json()) == OUTCOME_KEYS and o.json()["error"] is None
    o = await up("dropped", timeout=0.2)
    assert o.upgraded and not fakes["dropped"].drop  # gave the call up, dialled again
    o = await up("failed")
    assert (o.upgraded, o.error, o.code, o.upgrade_attempts) == (
        False, "new code failed to start: ImportError: boom", "1.0+old", 4)
    o = await up("busy")
    assert (o.upgraded, o.error, o.pid) == (False, "refused: an upgrade is under way", 4242)
    o = await up("old")
    assert not o.upgraded and o.error.startswith("no upgrade service")
    o = await up("missing")
    assert (o.upgraded, o.error, o.pid) == (False, "no such socket", None)


async def test_an_attempt_that_never_ends_is_reported(short_dir: Path, nursery: trio.Nursery
                                                      ) -> None:
    fake = FakeShim(polls=10**9)
    await serve(nursery, short_dir / "s", fake)
    o = await cli.upgrade_shim(f"unix://{short_dir}/s", [], timeout=5, wait=0.3, interval=0.01)
    assert not o.upgraded and o.error == "no outcome within 0.3s"


async def test_cmd_upgrade_table_json_and_exit_status(short_dir: Path, nursery: trio.Nursery
                                                      ) -> None:
    shared, broken = FakeShim(), FakeShim(succeed=False, error="state: bad format")
    await serve(nursery, short_dir / "shared", shared)
    await serve(nursery, short_dir / "broken", broken)
    state = short_dir / "state"
    bundle(state, "ns1", "a", f"unix://{short_dir}/shared")
    bundle(state, "ns1", "b", f"unix://{short_dir}/shared")
    bundle(state, "ns2", "c", f"unix://{short_dir}/broken")
    bundle(state, "ns2", "new", None)

    out = io.StringIO()
    code = await cli.cmd_upgrade(args("upgrade", "--all", "--state-dir", str(state)), out)
    assert code == cli.EXIT_FAILED  # one shim did not upgrade
    assert shared.upgrade_calls == 1 and broken.upgrade_calls == 1  # a shared shim: once
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["SHIM-PID", "CONTAINERS", "RESULT", "UPGRADES", "ATTEMPTS",
                                "CODE", "NOTE"]
    assert lines[1].split() == ["4242", "ns2/c", "NOT-UPGRADED", "1", "4", "1.0+old", "state:",
                                "bad", "format"]
    assert lines[2].split() == ["4242", "ns1/a,ns1/b", "upgraded", "2", "4", "1.0+old", "->",
                                "1.0+new"]
    assert "skipped ns2/new: no address file" in out.getvalue()
    assert lines[-1] == "1 of 2 shims upgraded"

    out = io.StringIO()
    code = await cli.cmd_upgrade(args("upgrade", "a", "--json", "--state-dir", str(state)), out)
    assert code == cli.EXIT_OK
    doc = json.loads(out.getvalue())
    assert set(doc) == {"shims", "skipped", "forkserver"} and doc["forkserver"] is None
    [one] = doc["shims"]
    assert set(one) == OUTCOME_KEYS
    assert (one["containers"], one["upgraded"], one["upgrades"]) == (["ns1/a", "ns1/b"], True, 3)
    assert shared.upgrade_calls == 2 and broken.upgrade_calls == 1


# --- the fork server ---------------------------------------------------------------------


def test_a_forkserver_of_other_code_is_retired_and_one_of_this_code_kept(
        place: str, spawned: list[int]) -> None:
    assert cli.renew_forkserver(place, "1.0+new", 5) is None  # none there
    pid = forkclient.spawn_server(place, "1.0+old")
    assert pid is not None
    spawned.append(pid)
    wait_for(lambda: answering(place))
    kept = cli.renew_forkserver(place, "1.0+old", 5)
    assert kept is not None and set(kept) == FORKSERVER_KEYS
    assert (kept["action"], kept["pid"], kept["error"]) == ("kept", pid, None)
    with pytest.raises(forkclient.ForkServerError, match="did not retire"):
        forkclient.retire(place, "1.0+old", 5)  # the same code: a bad request, not stale
    retired = cli.renew_forkserver(place, "1.0+new", 5)
    assert retired is not None
    assert (retired["action"], retired["code"], retired["installed_code"]) == (
        "retired", "1.0+old", "1.0+new")
    assert not os.path.exists(place)  # released before it answered
    _, status = os.waitpid(pid, 0)
    spawned.remove(pid)
    assert os.WIFEXITED(status)
    out = io.StringIO()
    cli.format_upgrade([], [], retired, out)
    assert f"fork server pid {pid} ({place}): retired (ran 1.0+old)" in out.getvalue()


def test_the_documented_keys_are_the_keys() -> None:
    """docs/inspect-json.md names every key ``upgrade --json`` and ``inspect``'s shim give."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "inspect-json.md").read_text()
    shim = cli.shim_json(pb.ShimResponse())
    outcome = cli.Outcome("unix:///s", []).json()
    for key in [*shim, *outcome, *FORKSERVER_KEYS, "other_code", "skipped"]:
        assert f"`{key}`" in doc or f'"{key}"' in doc, key


def test_inspect_shows_the_code_and_the_upgrades() -> None:
    m = pb.ShimResponse(pid=1, code="1.0+new", upgrades=2, upgrade_attempts=3,
                        last_upgrade_error="quiesce timed out after 10s")
    m.upgraded_at.FromSeconds(1_700_000_000)
    j = cli.shim_json(m)
    assert (j["code"], j["upgrades"], j["upgrade_attempts"], j["upgraded_at"]) == (
        "1.0+new", 2, 3, "2023-11-14T22:13:20.000000000Z")
    out = io.StringIO()
    cli.format_shim(m, out)
    text = out.getvalue()
    assert "Code:       1.0+new (2 upgrades in 3 attempts, last at 2023-11-14T22:13:20.000Z)" \
        in text
    assert "Upgrade:    the last attempt failed: quiesce timed out after 10s" in text
    j = cli.shim_json(pb.ShimResponse())
    assert (j["code"], j["upgraded_at"], j["last_upgrade_error"]) == (None, None, None)
    out = io.StringIO()
    cli.format_shim(pb.ShimResponse(), out)
    assert "older than in-place upgrades" in out.getvalue() and "Upgrade:" not in out.getvalue()
    assert cli.other_code(pb.ShimResponse(code="a"), "a") is False
    assert cli.other_code(pb.ShimResponse(code="a"), "b") is True
    assert cli.other_code(pb.ShimResponse(), "b") is True  # reports none: older code
    assert cli.other_code(None, "b") is None


def test_ls_marks_shims_of_other_code() -> None:
    bundles = [cli.Bundle("ns", "new", "/b/new", "unix:///s/1"),
               cli.Bundle("ns", "old", "/b/old", "unix:///s/2"),
               cli.Bundle("ns", "gone", "/b/gone", "unix:///s/3")]
    reports = {"unix:///s/1": cli.Report("unix:///s/1", shim=pb.ShimResponse(pid=1, code="b")),
               "unix:///s/2": cli.Report("unix:///s/2", shim=pb.ShimResponse(pid=2, code="a")),
               "unix:///s/3": cli.Report("unix:///s/3", error="no such socket")}
    rows = cli.build_rows(bundles, reports, installed="b")
    assert [(r.id, r.json()["other_code"]) for r in rows] == [
        ("gone", None), ("new", False), ("old", True)]
    out = io.StringIO()
    cli.format_ls(rows, out)
    header, *lines = out.getvalue().splitlines()
    column = header.split().index("SHIM-CODE")
    assert [ln.split()[column] for ln in lines] == ["-", "installed", "OTHER"]
    summary = cli.shim_summary(reports["unix:///s/2"], bundles[1:2], installed="b")
    assert (summary["code"], summary["upgrades"], summary["other_code"]) == ("a", 0, True)
