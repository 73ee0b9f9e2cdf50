"""The fork server on demand without containerd: the spawn and its lock, retiring, the code
identity, the status request.

Servers spawned here are this process's children (``spawn_server`` runs in ``start``, which
exits; here the test waits for them) and are stopped by pid.  Nothing is timed: the tests
wait for states (a socket answering, a process gone), bounded only to fail instead of hang.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import supervisor
from supervisor.launch import forkclient
from supervisor.launch.forkclient import NoServer, Request, Retired


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {predicate}")
        time.sleep(0.01)


def answering(path: str) -> dict[str, object] | None:
    try:
        return forkclient.status(path)
    except NoServer:
        return None


def exited(pid: int) -> bool:
    done, _ = os.waitpid(pid, os.WNOHANG)
    return done == pid






def request(code: str, cwd: str) -> Request:
    req = Request.of_this_process(namespace="unit", id="c1", address="/nonexistent.sock",
                                  debug=False, argv=[sys.executable, "shim"], code=code)
    req.cwd = cwd
    return req


def test_a_second_spawn_finds_the_lock_taken(place: str, spawned: list[int]) -> None:
    code = forkclient.code_identity()
    first = forkclient.spawn_server(place, code)
    assert first is not None
    spawned.append(first)
    # Whether the first is still starting or already serving, its lock is held: no second.
    assert forkclient.spawn_server(place, code) is None
    assert forkclient.read_pid(place) == first
    assert stat.S_IMODE(os.stat(os.path.dirname(place)).st_mode) == 0o700
    wait_for(lambda: answering(place))
    status = forkclient.status(place)
    assert (status["pid"], status["served"], status["code"]) == (first, 0, code)
    assert stat.S_IMODE(os.stat(place).st_mode) == 0o600
    assert forkclient.spawn_server(place, code) is None
    # Stopped by pid: its socket goes with it, and so does the lock.
    os.kill(first, signal.SIGTERM)
    wait_for(lambda: exited(first))
    spawned.clear()
    assert not os.path.exists(place)
    assert forkclient.read_pid(place) is None


def test_a_spawned_server_ignores_pythonpath(place: str, spawned: list[int], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd's environment reaches start; a PYTHONPATH there must not decide what the
    # long-lived, root fork server imports (here: a trio that cannot be imported).
    poison = tmp_path / "poison" / "trio"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('PYTHONPATH reached the server')\n")
    monkeypatch.setenv("PYTHONPATH", str(poison.parent))
    pid = forkclient.spawn_server(place, forkclient.code_identity())
    assert pid is not None
    spawned.append(pid)
    wait_for(lambda: answering(place) or exited(pid))
    assert answering(place), Path(forkclient.sibling(place, ".log")).read_text()


def test_a_request_of_other_code_retires_it(place: str, spawned: list[int],
                                            tmp_path: Path) -> None:
    pid = forkclient.spawn_server(place, "1.0+old")
    assert pid is not None
    spawned.append(pid)
    wait_for(lambda: answering(place))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(tmp_path / "l.sock"))
        listener.listen(1)
        # Malformed is not "other code": refused, and it keeps serving.
        bad = request("1.0+old", str(tmp_path))
        bad.code = 7  # type: ignore[assignment]
        with pytest.raises(forkclient.ForkServerError, match="field 'code'") as refused:
            forkclient.request_shim(place, bad, listener.fileno())
        assert not isinstance(refused.value, Retired)
        assert forkclient.status(place)["pid"] == pid
        with pytest.raises(Retired, match=r"the client.s code is 1\.0\+new"):
            forkclient.request_shim(place, request("1.0+new", str(tmp_path)), listener.fileno())
    # Socket and lock released before that answer: a new server can take both at once.
    assert not os.path.exists(place)
    assert forkclient.read_pid(place) in (None, pid)  # None once it has exited
    new = forkclient.spawn_server(place, "1.0+new")
    assert new is not None
    spawned.append(new)
    wait_for(lambda: exited(pid))
    spawned.remove(pid)
    wait_for(lambda: answering(place))
    assert forkclient.status(place)["code"] == "1.0+new"


def test_no_server_is_told_apart_from_a_failing_one(place: str, tmp_path: Path) -> None:
    with pytest.raises(NoServer):
        forkclient.status(place)  # no file
    os.makedirs(os.path.dirname(place))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(place)
    dead.close()  # a killed server's file: connections refused
    with pytest.raises(NoServer):
        forkclient.request_shim(place, request("x", str(tmp_path)), 0)


@pytest.mark.parametrize("unsafe", ["mode", "owner"])
def test_a_directory_others_may_write_is_refused(place: str, spawned: list[int],
                                                 unsafe: str) -> None:
    # Others could plant links there where root creates and truncates its files.
    folder = os.path.dirname(place)
    os.makedirs(folder, mode=0o700)
    if unsafe == "mode":
        os.chmod(folder, 0o1777)  # like /tmp: sticky does not keep new names out
        why = "writable by group or others"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(folder, 65534, 65534)
        why = "owned by uid 65534"
    try:
        with pytest.raises(PermissionError, match=why):
            pid = forkclient.spawn_server(place, "x")
            if pid:
                spawned.append(pid)
        assert os.listdir(folder) == []
    finally:
        os.chown(folder, os.geteuid(), os.getegid())


@pytest.mark.parametrize("name", [".lock", ".log"])
def test_the_lock_and_log_files_are_not_followed(place: str, spawned: list[int],
                                                 tmp_path: Path, name: str) -> None:
    folder = os.path.dirname(place)
    os.makedirs(folder, mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, forkclient.sibling(place, name))
    with pytest.raises(OSError) as refused:
        pid = forkclient.spawn_server(place, "x")
        if pid:
            spawned.append(pid)
    assert refused.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"
    if name == ".lock":
        assert forkclient.read_pid(place) is None  # not the symlink's target either


def test_start_goes_cold_with_a_note_when_the_directory_is_unsafe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from supervisor.launch import start  # noqa: PLC0415
    from supervisor.launch.flags import Flags  # noqa: PLC0415

    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    notes: list[str] = []
    monkeypatch.setenv(forkclient.SOCKET_ENV, str(folder / "fs.sock"))
    monkeypatch.setenv(forkclient.CODE_ENV, "1.0+me")
    monkeypatch.setattr(start, "note", lambda level, text: notes.append(f"{level}: {text}"))
    monkeypatch.setattr("supervisor.launch._spawn.spawn", lambda argv, **kw: 99)
    monkeypatch.chdir(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        assert start.start_daemon(Flags(namespace="ns", id="c1"), listener) == (99, False)
    assert os.listdir(folder) == []
    assert len(notes) == 1 and "writable by group or others" in notes[0], notes
    assert "starting the shim cold" in notes[0]


IDENTITY = "from supervisor.launch.forkclient import code_identity; print(code_identity())"


def test_the_code_identity_follows_the_files(tmp_path: Path) -> None:
    copy = tmp_path / "supervisor"
    shutil.copytree(os.path.dirname(supervisor.__file__), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != forkclient.CODE_ENV}
    env["PYTHONPATH"] = str(tmp_path)

    def identity(**extra: str) -> str:
        return subprocess.run([sys.executable, "-P", "-c", IDENTITY], env={**env, **extra},
                              check=True, capture_output=True, text=True, cwd="/").stdout

    before = identity()
    assert before.startswith(supervisor.__version__ + "+")
    assert identity() == before
    module = copy / "launch" / "delete.py"
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    changed = identity()
    assert changed != before
    module.write_text(module.read_text() + "\n")  # same mtime below, another size
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert identity() not in (before, changed)
    assert identity(**{forkclient.CODE_ENV: "pinned"}) == "pinned\n"


def test_the_code_identity_is_the_same_with_and_without_site() -> None:
    """``start`` runs under the entry script's ``-IS`` (no site: sys.prefix is the base
    interpreter's), the fork server and the tests with site: all must agree."""
    env = {k: v for k, v in os.environ.items() if k != forkclient.CODE_ENV}
    package = os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))
    code = f"import sys; sys.path.insert(0, {package!r}); {IDENTITY}"
    seen = {subprocess.run([sys.executable, *flags, "-c", code], env=env, check=True,
                           capture_output=True, text=True, cwd="/").stdout
            for flags in ([], ["-I", "-S"], ["-P"])}
    assert len(seen) == 1, seen


def test_ls_shows_the_fork_server(place: str, spawned: list[int], tmp_path: Path) -> None:
    from supervisor import cli  # noqa: PLC0415 - trio and protobuf: only this test

    def ls(*extra: str) -> str:
        out = io.StringIO()
        assert cli.main(["ls", "--state-dir", str(tmp_path), "--forkserver", place, *extra],
                        out, io.StringIO()) == cli.EXIT_OK
        return out.getvalue()

    assert "fork server" not in ls()  # none there: nothing to show
    assert json.loads(ls("--json"))["forkserver"] is None
    pid = forkclient.spawn_server(place, "1.0+ls")
    assert pid is not None
    spawned.append(pid)
    wait_for(lambda: answering(place))
    assert f"fork server pid {pid} ({place}): version {supervisor.__version__}, up " in ls()
    wait_for(lambda: json.loads(ls("--json"))["forkserver"]["spare"])  # parks once it serves
    doc = json.loads(ls("--json"))["forkserver"]
    assert (doc["pid"], doc["code"], doc["shims_forked"], doc["error"]) == (pid, "1.0+ls", 0,
                                                                             None)
    # The zygote that forked the spare is shown beside it (an operator sees it in ps).
    assert doc["zygote"]
    assert ls().rstrip().endswith(f", 0 shims forked, spare shim pid {doc['spare']}, "
                                  f"zygote pid {doc['zygote']}")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: exited(pid))
    spawned.clear()
    assert "connection refused" in ls()  # its socket file stayed behind


@pytest.mark.parametrize(("env", "failure", "spawns"), [
    ("/x/fs.sock", NoServer("nothing serves it"), True),
    ("/x/fs.sock", Retired("the client's code is a, this fork server's b: it retires"), True),
    ("/x/fs.sock", forkclient.ForkServerError("the client's mnt namespace is not"), False),
    ("/x/fs.sock", TimeoutError("no answer"), False),
    ("", None, False),  # $SUPERVISOR_FORKSERVER empty: not asked, never spawned
])
def test_start_spawns_a_fork_server_only_when_none_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str,
    failure: BaseException | None, spawns: bool,
) -> None:
    from supervisor.launch import start  # noqa: PLC0415
    from supervisor.launch.flags import Flags  # noqa: PLC0415

    calls: list[str] = []

    def request_shim(path: str, request: Request, fd: int) -> int:
        calls.append(f"ask {path}")
        assert failure is not None
        raise failure

    def spawn_server(path: str, code: str, python: str) -> int:
        calls.append(f"spawn {path} {code} {python}")
        return 4242

    def cold(argv: list[str], **kwargs: object) -> int:
        calls.append(f"cold {argv[0]}")
        return 99

    monkeypatch.setenv(forkclient.SOCKET_ENV, env)
    monkeypatch.setenv(forkclient.CODE_ENV, "1.0+me")
    monkeypatch.setattr(forkclient, "request_shim", request_shim)
    monkeypatch.setattr(forkclient, "spawn_server", spawn_server)
    monkeypatch.setattr("supervisor.launch._spawn.spawn", cold)
    monkeypatch.chdir(tmp_path)  # the bundle: no log FIFO, notes are dropped
    flags = Flags(namespace="ns", id="c1", address="/a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        # The daemon side's interpreter (the entry script's, maybe not this one) is
        # what a fork server and a cold daemon are started with.
        assert start.start_daemon(flags, listener, "/venv/bin/python") == (99, False)
    expected = ([f"ask {env}"] if env else []) + (
        [f"spawn {env} 1.0+me /venv/bin/python"] if spawns else []) + ["cold /venv/bin/python"]
    assert calls == expected


def test_start_goes_cold_when_its_code_identity_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from supervisor.launch import start  # noqa: PLC0415
    from supervisor.launch.flags import Flags  # noqa: PLC0415

    def unreadable() -> str:
        raise PermissionError(13, "Permission denied", "/pkg")

    def never(*args: object, **kwargs: object) -> int:
        raise AssertionError("neither asked nor spawned")

    monkeypatch.setenv(forkclient.SOCKET_ENV, "/x/fs.sock")
    monkeypatch.setattr(forkclient, "code_identity", unreadable)
    monkeypatch.setattr(forkclient, "request_shim", never)
    monkeypatch.setattr(forkclient, "spawn_server", never)
    monkeypatch.setattr("supervisor.launch._spawn.spawn", lambda argv, **kw: 99)
    monkeypatch.chdir(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        assert start.start_daemon(Flags(namespace="ns", id="c1"), listener) == (99, False)
