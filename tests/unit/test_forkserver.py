"""The fork server without containerd: protocol, refusals, the go-pipe commit, a served shim.

One server process (started here, stopped by pid) serves the whole module, so every test
after a bad request also proves that the server survived it.  The forked shims are real
daemons on listeners bound here; they are ended with ``Shutdown`` or by pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

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

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sv-fs-", dir="/tmp"))
        self.socket = str(self.dir / "fs.sock")
        self.log = self.dir / "fs.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, "--socket",
                                          self.socket, "--debug", *args],
                                         stdout=log, stderr=log)
        # Until it answers, not until its file exists: a test may connect at once.
        wait_for(lambda: self.answers() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text()

    def answers(self) -> bool:
        try:
            forkclient.status(self.socket)
        except (ForkServerError, OSError):
            return False
        return True

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






def request_for(bundle: Path, cid: str = "c1", **changes: Any) -> Request:
    req = Request.of_this_process(namespace="unit", id=cid, address="/nonexistent.sock",
                                  debug=True, argv=[sys.executable, "shim-bin", "-id", cid],
                                  code=forkclient.code_identity())
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
    ("v", 1, "protocol version"),  # an older client (it claimed its identity): start cold
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


def test_identity_mismatch_names_the_key_and_no_value() -> None:
    ours = forkserver.identity()
    assert forkserver.identity_mismatch(ours, dict(ours)) is None
    assert {"mnt namespace", "pid_for_children namespace", "root directory", "CapEff",
            "NoNewPrivs", "Seccomp", "LSM label"} <= set(ours)
    for key in ours:
        assert forkserver.identity_mismatch(ours, {**ours, key: "other"}) == key
        missing = {k: v for k, v in ours.items() if k != key}
        assert forkserver.identity_mismatch(ours, missing) == key  # left out is not equal


def test_peer_identity_is_the_kernels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert forkserver.peer_identity(a) == forkserver.identity()


def test_every_thread_of_the_peer_counts() -> None:
    # no_new_privs (like capabilities, credentials, seccomp, namespaces) is per thread,
    # and any thread may have connected: one that differs makes the peer differ.
    ours = forkserver.identity()
    if ours["NoNewPrivs"] != "0":
        pytest.skip("no_new_privs is set already")
    libc = ctypes.CDLL(None, use_errno=True)
    ready, done = threading.Event(), threading.Event()
    failed: list[int] = []

    def restricted() -> None:
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, this thread only
            failed.append(ctypes.get_errno())
        ready.set()
        done.wait()

    thread = threading.Thread(target=restricted)
    thread.start()
    try:
        ready.wait()
        assert not failed
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            theirs = forkserver.peer_identity(a)
        assert theirs["NoNewPrivs"] == forkserver.THREADS_DIFFER
        assert forkserver.identity_mismatch(ours, theirs) == "NoNewPrivs"
    finally:
        done.set()
        thread.join()
    # join() returns before the thread's task ends; until then it is still there.
    wait_for(lambda: not os.path.exists(f"/proc/self/task/{thread.native_id}"))
    b, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with b, c:  # the thread is gone: the peer is like us again
        assert forkserver.peer_identity(b) == ours


@contextlib.contextmanager
def forked_peer(*, stays: bool) -> Iterator[tuple[socket.socket, int]]:
    """(the server's end of a connection, the peer's pid): a forked child connects, then
    exits at once or (``stays``) waits to be killed; killed and reaped afterwards."""
    with tempfile.TemporaryDirectory(prefix="sv-p-", dir="/tmp") as d:
        path = os.path.join(d, "s")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with srv:
            srv.bind(path)
            srv.listen(1)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child connects (and waits, or is gone)
                c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                c.connect(path)
                if stays:
                    c.recv(1)
                os._exit(0)
            try:
                if not stays:
                    os.waitpid(pid, 0)
                conn, _ = srv.accept()
                with conn:
                    yield conn, pid
            finally:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


@pytest.mark.parametrize("peerpidfd", [True, False], ids=["SO_PEERPIDFD", "pidfd_open"])
def test_a_peer_that_is_gone_is_not_identified(monkeypatch: pytest.MonkeyPatch,
                                               peerpidfd: bool) -> None:
    # A client that exited before the server looked: its pid may be another process's now.
    if not peerpidfd:
        monkeypatch.setattr(forkserver, "SO_PEERPIDFD", -1)  # ENOPROTOOPT: an older kernel
    with forked_peer(stays=False) as (conn, _), pytest.raises(
            ForkServerError, match="cannot identify the client"):
        forkserver.peer_identity(conn)


def test_socket_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(forkclient.SOCKET_ENV, raising=False)
    assert forkclient.socket_path() == forkclient.DEFAULT_SOCKET
    monkeypatch.setenv(forkclient.SOCKET_ENV, "/tmp/x.sock")
    assert forkclient.socket_path() == "/tmp/x.sock"
    monkeypatch.setenv(forkclient.SOCKET_ENV, "")
    assert forkclient.socket_path() is None
    # start runs in each bundle: a relative path would spawn a server per bundle.
    monkeypatch.setenv(forkclient.SOCKET_ENV, "fs.sock")
    assert forkclient.socket_path() is None


@pytest.mark.parametrize("peerpidfd", [True, False], ids=["SO_PEERPIDFD", "pidfd_open"])
def test_a_peer_that_exits_while_read_is_not_believed(monkeypatch: pytest.MonkeyPatch,
                                                      peerpidfd: bool) -> None:
    # The peer exits (and its pid could be reused) between the server's reads and its
    # verdict: what was read may be another process's, so it counts for nothing.
    if not peerpidfd:
        monkeypatch.setattr(forkserver, "SO_PEERPIDFD", -1)
    with forked_peer(stays=True) as (conn, pid):
        real = forkserver.identity

        def read_then_lose_the_peer(proc: str = "/proc/self") -> dict[str, object]:
            found = real(proc)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return found

        monkeypatch.setattr(forkserver, "identity", read_then_lose_the_peer)
        with pytest.raises(ForkServerError, match="it exited"):
            forkserver.peer_identity(conn)


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


def test_bind_publishes_the_socket_only_once_it_listens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Whenever the path exists while bind works, a connect to it must succeed: a refused
    # one would send a client cold and let a second server take the file for stale.
    with tempfile.TemporaryDirectory(prefix="sv-b-", dir="/tmp") as d:
        path = os.path.join(d, "s.sock")
        seen: list[str] = []

        def check(when: str) -> None:
            if os.path.lexists(path):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with probe:
                    try:
                        probe.connect(path)
                    except OSError as e:
                        seen.append(f"{when}: {e}")

        def spy(name: str) -> Callable[..., Any]:
            real = getattr(os, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                check(f"before {name}")
                result = real(*args, **kwargs)
                check(f"after {name}")
                return result
            return call

        for name in ("chmod", "link", "unlink", "rename"):
            monkeypatch.setattr(os, name, spy(name))
        with forkserver.bind(path):
            monkeypatch.undo()
            check("bound")
        assert seen == []


def test_bind_replaces_only_a_refusing_socket() -> None:
    # Only ECONNREFUSED means stale; a listener of another kind (EPROTOTYPE) or one
    # whose backlog is full (EAGAIN) stays, and the probe does not wait for it.
    with tempfile.TemporaryDirectory(prefix="sv-b-", dir="/tmp") as d:
        path = os.path.join(d, "s.sock")
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with other:
            other.bind(path)
            other.listen(1)
            with pytest.raises(OSError, match="already serves"):
                forkserver.bind(path)
            assert os.path.exists(path)
        os.unlink(path)
        full = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        clients: list[socket.socket] = []
        with full:
            full.bind(path)
            full.listen(0)
            try:
                while True:  # fill its backlog
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    clients.append(c)
                    c.setblocking(False)
                    c.connect(path)
            except BlockingIOError:
                pass
            finally:
                for c in clients:
                    c.close()
            with pytest.raises(OSError, match="already serves"):
                forkserver.bind(path)
            assert os.path.exists(path)


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


def test_an_environment_that_is_not_utf8_still_forks(
    server: Server, bundle: Path, listener: socket.socket
) -> None:
    # containerd's environment may hold any bytes (surrogates in os.environ): the forked
    # shim's /proc/PID/environ must show them, not refuse the shim.
    req = request_for(bundle)
    req.env["SV_FORKSERVER_RAW"] = b"\xff\xfe".decode("utf-8", "surrogateescape")
    pid = forkclient.request_shim(server.socket, req, listener.fileno())
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"SV_FORKSERVER_RAW=\xff\xfe\0" in f.read()
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


# ------------------------------------------------------------- identity from the kernel
# The attacks of issue 15 item 1: a client that is not what the fork server is (its own
# namespaces; every capability dropped and no_new_privs) sends the fork server's own identity
# as its claim.  Only what the kernel says about the peer may count, and a refusal must not
# tell the client any of the server's values.

ATTACKER = r"""
import json, socket, sys
import msgpack
payload = sys.stdin.buffer.read()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("")  # autobound abstract name: valid in any namespace
listener.listen(4)
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.settimeout(10)
conn.connect(sys.argv[1])
socket.send_fds(conn, [payload], [listener.fileno()])
data, fds, _, _ = socket.recv_fds(conn, 1 << 18, 4)
print(json.dumps(msgpack.unpackb(data)))
"""


def server_values() -> list[str]:
    """Every value of this process's identity (the server's: same host, root, namespaces)."""
    values: list[str] = []
    for name in os.listdir("/proc/self/ns"):
        values.append(str(os.stat(f"/proc/self/ns/{name}").st_ino))
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith(("Cap", "NoNewPrivs", "Seccomp")):
                values.append(value.strip())
    return [v for v in values if len(v) > 1]  # "0", "1": too short to tell anything apart


def attack(server: Server, bundle: Path, wrapper: list[str]) -> dict[str, Any]:
    """Run a client under ``wrapper`` that claims the fork server's identity; its answer."""
    wire = request_for(bundle).to_wire()
    claimed = {}  # what an old client sent, the server's own values: a lie from the attacker
    claimed["root"] = [os.stat("/").st_dev, os.stat("/").st_ino]
    with open("/proc/self/status", encoding="utf-8") as f:
        claimed["status"] = {k: " ".join(v.split()) for k, _, v in
                             (line.partition(":") for line in f)}
    wire["identity"] = claimed  # "ns" left out: the old server then skipped that comparison
    done = subprocess.run([*wrapper, sys.executable, "-c", ATTACKER, server.socket],
                          input=msgpack.packb(wire), capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    answer = json.loads(done.stdout)
    assert isinstance(answer, dict)
    return answer


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and capabilities")


def test_client_in_other_namespaces_is_refused(server: Server, bundle: Path) -> None:
    needs_root()
    answer = attack(server, bundle, ["unshare", "--mount", "--net", "--uts", "--ipc"])
    assert "pid" not in answer, "a client in its own namespaces got a shim"
    assert "namespace" in answer["error"]
    assert not [v for v in server_values() if v in answer["error"]], answer


def test_client_without_capabilities_is_refused(server: Server, bundle: Path) -> None:
    needs_root()
    answer = attack(server, bundle, ["setpriv", "--no-new-privs", "--inh-caps=-all",
                                     "--ambient-caps=-all", "--bounding-set=-all"])
    assert "pid" not in answer, "a client without capabilities got a shim"
    assert "Cap" in answer["error"] or "NoNewPrivs" in answer["error"]
    assert not [v for v in server_values() if v in answer["error"]], answer


def test_client_with_no_new_privs_alone_is_refused(server: Server, bundle: Path) -> None:
    needs_root()
    answer = attack(server, bundle, ["setpriv", "--no-new-privs"])
    assert "pid" not in answer
    assert "NoNewPrivs" in answer["error"]


class FailingAccepts:
    """A listening socket whose ``accept`` fails as scripted, then retires the server."""

    def __init__(self, errors: list[int]) -> None:
        self.errors = errors
        self.server: forkserver.ForkServer | None = None

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        assert self.server is not None
        self.server.retired = True
        raise OSError(errno.ECONNABORTED, "the last one")

    def close(self) -> None:
        pass


def test_a_failed_accept_does_not_end_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FailingAccepts([errno.EMFILE, errno.ENFILE, errno.ECONNABORTED])
    server = forkserver.ForkServer(cast(socket.socket, fake), logging.getLogger("test"))
    fake.server = server
    pauses: list[float] = []
    monkeypatch.setattr(forkserver.time, "sleep", pauses.append)
    server.serve_forever()  # returns once retired: every failure was outlived
    assert len(pauses) == 4 and all(p > 0 for p in pauses)  # paused: no busy loop
    fake = FailingAccepts([errno.EBADF])  # not transient: the listener is gone
    server = forkserver.ForkServer(cast(socket.socket, fake), logging.getLogger("test"))
    with pytest.raises(OSError):
        server.serve_forever()
