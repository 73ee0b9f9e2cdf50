"""The fork server without containerd: protocol, refusals, the go-pipe commit, a served shim.

One server process (started here, stopped by pid) serves the whole module, so every test
after a bad request also proves that the server survived it.  The forked shims are real
daemons on listeners bound here; they are ended with ``Shutdown`` or by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest

from supervisor import forkserver
from supervisor.launch import forkclient
from supervisor.launch.forkclient import ForkServerError, Request

SERVER_CODE = "import sys; from supervisor.forkserver import main; sys.exit(main())"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {predicate}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Server:
    """A ``supervisor-forkserver`` process of ours, its socket in a short temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sv-fs-", dir="/tmp"))
        self.socket = str(self.dir / "fs.sock")
        self.log = self.dir / "fs.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, "--socket",
                                          self.socket, "--debug"], stdout=log, stderr=log)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="sv-l-", dir="/tmp") as d:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(d, "shim.sock"))
        sock.listen(16)
        with sock:
            yield sock


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    return b


def request_for(bundle: Path, cid: str = "c1", **changes: Any) -> Request:
    req = Request.of_this_process(namespace="unit", id=cid, address="/nonexistent.sock",
                                  debug=True, argv=[sys.executable, "shim-bin", "-id", cid])
    req.cwd = str(bundle)
    for k, v in changes.items():
        setattr(req, k, v)
    return req


def raw_call(path: str, payload: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    """One request as bytes, the server's decoded answer and any fds it sent."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with conn:
        conn.settimeout(10)
        conn.connect(path)
        socket.send_fds(conn, [payload], fds)
        data, got, _, _ = socket.recv_fds(conn, forkclient.MAX_MESSAGE, 4)
    answer = msgpack.unpackb(data)
    assert isinstance(answer, dict)
    return answer, got


# --------------------------------------------------------------------------- pure parts


def test_request_round_trip(bundle: Path) -> None:
    req = request_for(bundle)
    back = Request.from_wire(msgpack.unpackb(msgpack.packb(req.to_wire())))
    assert msgpack.packb(back.to_wire()) == msgpack.packb(req.to_wire())
    assert (back.namespace, back.id, back.cwd, back.debug) == ("unit", "c1", str(bundle), True)
    assert back.env == dict(os.environ)


@pytest.mark.parametrize(("key", "value", "why"), [
    ("v", 2, "protocol version"),
    ("id", "", "must not be empty"),
    ("namespace", 7, "want str"),
    ("argv", [], "empty"),
    ("env", {"A=B": "x"}, "bad environment variable name"),
    ("env", {"A": "x\0y"}, "bad string"),
    ("cwd", "relative/dir", "not absolute"),
    ("umask", 0o1000, "bad umask"),
    ("rlimits", [[1, 2]], "bad rlimit"),
    ("affinity", [-1], "bad CPU affinity"),
    ("debug", 1, "want bool"),
    ("nice", True, "want int"),
])
def test_request_validation(bundle: Path, key: str, value: object, why: str) -> None:
    wire = request_for(bundle).to_wire()
    wire[key] = value
    with pytest.raises(ForkServerError, match=why):
        Request.from_wire(msgpack.unpackb(msgpack.packb(wire)))
    with pytest.raises(ForkServerError, match="not a map"):
        Request.from_wire([1, 2])


def test_identity_mismatch() -> None:
    ours = forkclient.identity()
    assert forkserver.identity_mismatch(ours, ours) is None
    other = {**ours, "ns": {**ours["ns"], "mnt": 1}}
    assert forkserver.identity_mismatch(ours, other) == "different mnt namespace"
    other = {**ours, "status": {**ours["status"], "CapEff": "0000000000000000"}}
    assert "different CapEff" in str(forkserver.identity_mismatch(ours, other))


def test_socket_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(forkclient.SOCKET_ENV, raising=False)
    assert forkclient.socket_path() == forkclient.DEFAULT_SOCKET
    monkeypatch.setenv(forkclient.SOCKET_ENV, "/tmp/x.sock")
    assert forkclient.socket_path() == "/tmp/x.sock"
    monkeypatch.setenv(forkclient.SOCKET_ENV, "")
    assert forkclient.socket_path() is None


# --------------------------------------------------------------------------- the server


def test_bad_requests_are_answered_and_the_server_keeps_serving(
    server: Server, bundle: Path, listener: socket.socket
) -> None:
    good = msgpack.packb(request_for(bundle).to_wire())
    r, w = os.pipe()
    try:
        cases: list[tuple[bytes, list[int], str]] = [
            (b"\xc1garbage", [listener.fileno()], "undecodable"),
            (msgpack.packb([1, 2, 3]), [listener.fileno()], "not a map"),
            (good, [], "want 1 fd"),
            (good, [r], "not a socket"),
            (good, [listener.fileno(), listener.fileno()], "too many fds"),
        ]
        for payload, fds, why in cases:
            answer, got = raw_call(server.socket, payload, fds)
            assert why in answer.get("error", ""), answer
            assert got == []
    finally:
        os.close(r)
        os.close(w)
    # A client that sends nothing is timed out; the next one is served.
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with idle:
        idle.connect(server.socket)
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with stream:  # a stream socket that is not listening is refused too
            answer, _ = raw_call(server.socket, good, [stream.fileno()])
    assert "not a listening unix stream socket" in answer["error"]
    assert server.proc.poll() is None


def test_setup_failure_is_reported(server: Server, bundle: Path,
                                   listener: socket.socket) -> None:
    req = request_for(bundle, cwd=str(bundle / "missing"))
    with pytest.raises(ForkServerError, match="shim setup failed: FileNotFoundError"):
        forkclient.request_shim(server.socket, req, listener.fileno())


def test_uncommitted_shim_vanishes(server: Server, bundle: Path,
                                   listener: socket.socket) -> None:
    # The client gets the pid and the go pipe but never writes: the shim must not serve.
    payload = msgpack.packb(request_for(bundle).to_wire())
    answer, fds = raw_call(server.socket, payload, [listener.fileno()])
    pid = answer["pid"]
    assert len(fds) == 1
    assert not gone(pid)
    os.close(fds[0])
    wait_for(lambda: gone(pid), 10)


def test_other_uid_is_refused(server: Server, bundle: Path, listener: socket.socket) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    payload = msgpack.packb(request_for(bundle).to_wire())
    os.chmod(server.dir, 0o755)
    os.chmod(server.socket, 0o666)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.setuid(65534)
                answer, _ = raw_call(server.socket, payload, [listener.fileno()])
                os.write(w, str(answer.get("error", answer)).encode())
            except BaseException as e:
                os.write(w, repr(e).encode())
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            text = f.read().decode()
        os.waitpid(pid, 0)
    finally:
        os.chmod(server.socket, 0o600)
        os.chmod(server.dir, 0o700)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    assert "uid 65534 may not use this fork server" in text


def test_bind_replaces_a_stale_socket_and_refuses_a_live_one(server: Server) -> None:
    with pytest.raises(OSError, match="already serves"):
        forkserver.bind(server.socket)
    with tempfile.TemporaryDirectory(prefix="sv-b-", dir="/tmp") as d:
        path = os.path.join(d, "s.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dead.bind(path)
        dead.close()  # the file stays: a stale socket
        with forkserver.bind(path) as live:
            assert live.type == socket.SOCK_SEQPACKET
            assert os.stat(path).st_mode & 0o777 == 0o600


def test_sigterm_removes_the_socket() -> None:
    s = Server()
    try:
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
        assert not os.path.exists(s.socket)
    finally:
        s.stop()


async def test_forked_shim_is_a_cold_lookalike_and_serves(
    server: Server, bundle: Path, listener: socket.socket
) -> None:
    from supervisor import ttrpc  # noqa: PLC0415 - only this test talks ttrpc
    from supervisor.api.task.v2 import shim_pb2  # noqa: PLC0415

    os.environ["SV_FORKSERVER_TEST"] = "yes"
    try:
        req = request_for(bundle)
    finally:
        del os.environ["SV_FORKSERVER_TEST"]
    pid = forkclient.request_shim(server.socket, req, listener.fileno())
    shim = psutil.Process(pid)
    try:
        assert shim.ppid() != server.proc.pid
        assert shim.cwd() == str(bundle)
        assert shim.cmdline() == req.argv
        assert shim.environ().get("SV_FORKSERVER_TEST") == "yes"
        assert os.getsid(pid) == pid
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert [fds[n] for n in (0, 1, 2)] == ["/dev/null"] * 3
        assert fds[3].startswith("socket:")
        server_fds = {os.readlink(f"/proc/{server.proc.pid}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{server.proc.pid}/fd")}
        leaked = {n: f for n, f in fds.items() if n > 3 and f.startswith("socket:")
                  and f in server_fds}
        assert not leaked
        client = await ttrpc.connect_unix(listener.getsockname())
        async with client:
            md = {ttrpc.NAMESPACE_KEY: "unit"}
            raw = await client.call("containerd.task.v2.Task", "Connect",
                                    shim_pb2.ConnectRequest(id="c1").SerializeToString(),
                                    timeout=10, metadata=md)
            resp = shim_pb2.ConnectResponse()
            resp.ParseFromString(raw)
            assert resp.shim_pid == pid
            with contextlib.suppress(ttrpc.ConnectionEnded, ttrpc.RPCError):
                await client.call("containerd.task.v2.Task", "Shutdown",
                                  shim_pb2.ShutdownRequest(id="c1").SerializeToString(),
                                  timeout=10, metadata=md)
        wait_for(lambda: gone(pid), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_client_gives_up_at_its_deadline(bundle: Path, listener: socket.socket) -> None:
    # A server that accepts into its backlog but never answers: the client's one deadline.
    with tempfile.TemporaryDirectory(prefix="sv-m-", dir="/tmp") as d:
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mute:
            mute.bind(os.path.join(d, "mute.sock"))
            mute.listen(4)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                forkclient.request_shim(os.path.join(d, "mute.sock"), request_for(bundle),
                                        listener.fileno(), timeout=0.3)
            assert time.monotonic() - t0 < 2
