"""``start``'s side of the fork server: shim daemons forked from a pre-imported parent.

A cold shim daemon is a new interpreter importing trio, protobuf and our
modules: ~190 ms before it answers containerd.  The fork server
(:mod:`supervisor.forkserver`, beside the daemon) imports all of that once and
forks one shim per request; ``start`` (:mod:`supervisor.launch.start`) asks it
when its socket exists and falls back to the cold start on any failure.

This module holds what both sides of the private protocol share, once: the
socket's location, the :class:`Request` schema (written by the client, checked
by the server), fd passing and the one codec
(:mod:`supervisor.launch._msgpack`); and the client, :func:`request_shim`.
The protocol and its invariants are described in :mod:`supervisor.forkserver`.

Invariants
----------
* Importing this module loads nothing ``start`` has not loaded already (no
  typing, logging or msgpack package); :mod:`resource` is imported only when a
  fork server is there.
* The client's whole exchange (connect, send, answer, go) is bounded by one
  deadline, :data:`CLIENT_TIMEOUT`; on any failure no forked shim will ever
  serve the listener, so the caller may start one cold.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from supervisor.launch import _msgpack

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

DEFAULT_SOCKET = "/run/containerd/supervisor-forkserver.sock"
SOCKET_ENV = "SUPERVISOR_FORKSERVER"
#: 2: the client no longer claims an identity (the server reads the peer's from the
#: kernel); a server and a client of different versions refuse, and ``start`` starts cold.
PROTOCOL = 2
MAX_MESSAGE = 256 * 1024
CLIENT_TIMEOUT = 2.0  # start: connect, send and answer, all together


# --------------------------------------------------------------------------- fd passing
# ``socket.send_fds``/``recv_fds`` over the builtin ``_socket``: importing the
# ``socket`` module (enum, selectors) would cost ``start`` ~9 ms.

_INT = 4  # sizeof(int): SCM_RIGHTS carries C ints


def send_fds(sock: _socket.socket, buffers: list[bytes], fds: list[int]) -> int:
    data = b"".join(fd.to_bytes(_INT, sys.byteorder, signed=True) for fd in fds)
    return sock.sendmsg(buffers, [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)] if fds else [])


def recv_fds(sock: _socket.socket, bufsize: int, maxfds: int
             ) -> tuple[bytes, list[int], int, object]:
    msg, ancdata, flags, address = sock.recvmsg(bufsize, _socket.CMSG_LEN(maxfds * _INT))
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT
            fds += [int.from_bytes(data[i:i + _INT], sys.byteorder, signed=True)
                    for i in range(0, usable, _INT)]
    return msg, fds, flags, address


class ForkServerError(Exception):
    """The fork server refused or failed a request; the message says why."""



def socket_path() -> str | None:
    """The fork server's socket: ``$SUPERVISOR_FORKSERVER`` (empty: none) or the default."""
    value = os.environ.get(SOCKET_ENV)
    if value is None:
        return DEFAULT_SOCKET
    return value or None


class Request:
    """One shim to fork: what a cold start passes on its command line, and its context.

    Nothing in it is believed about who the client is: the server reads that
    from the kernel (:func:`supervisor.forkserver.peer_identity`).  A field
    ``identity`` sent by an older client is ignored.
    """

    __slots__ = ("address", "affinity", "argv", "cwd", "debug", "env", "id",
                 "namespace", "nice", "rlimits", "umask")

    def __init__(
        self,
        *,
        namespace: str,
        id: str,
        address: str,
        debug: bool,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        umask: int,
        rlimits: Sequence[tuple[int, int, int]],
        nice: int,
        affinity: Sequence[int],
    ) -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.debug = debug
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.umask = umask
        self.rlimits = [tuple(r) for r in rlimits]
        self.nice = nice
        self.affinity = list(affinity)

    @classmethod
    def of_this_process(cls, *, namespace: str, id: str,
                        address: str, debug: bool, argv: Sequence[str]) -> Request:
        """A request for a shim that inherits what a cold start by this process would."""
        import resource  # C module, ~0.1 ms; only when a fork server is there

        mask = os.umask(0)
        os.umask(mask)
        rlimits = []
        for name in dir(resource):
            if name.startswith("RLIMIT_"):
                which = getattr(resource, name)
                soft, hard = resource.getrlimit(which)
                rlimits.append((which, soft, hard))
        return cls(namespace=namespace, id=id, address=address, debug=debug, argv=argv,
                   env=os.environ, cwd=os.getcwd(), umask=mask, rlimits=sorted(set(rlimits)),
                   nice=os.getpriority(os.PRIO_PROCESS, 0),
                   affinity=sorted(os.sched_getaffinity(0)))

    def to_wire(self) -> dict[str, Any]:
        wire = {k: getattr(self, k) for k in self.__slots__}
        wire["v"] = PROTOCOL
        return wire

    @classmethod
    def from_wire(cls, wire: object) -> Request:
        """Check every field's type and range; :class:`ForkServerError` says what is wrong."""
        if not isinstance(wire, dict):
            raise ForkServerError("request is not a map")
        if wire.get("v") != PROTOCOL:
            raise ForkServerError(f"protocol version {wire.get('v')!r}, want {PROTOCOL}")

        def field(name: str, kind: type) -> Any:
            value = wire.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ForkServerError(f"field {name!r}: want {kind.__name__}, got {value!r:.80}")
            return value

        def strings(name: str, value: object) -> str:
            if not isinstance(value, str) or "\0" in value:
                raise ForkServerError(f"field {name!r}: bad string {value!r:.80}")
            return value

        namespace = strings("namespace", field("namespace", str))
        cid = strings("id", field("id", str))
        if not namespace or not cid:
            raise ForkServerError("namespace and id must not be empty")
        argv = [strings("argv", a) for a in field("argv", list)]
        if not argv:
            raise ForkServerError("field 'argv' is empty")
        env: dict[str, str] = {}
        for k, v in field("env", dict).items():
            if not strings("env", k) or "=" in k:
                raise ForkServerError(f"bad environment variable name {k!r:.80}")
            env[k] = strings("env", v)
        cwd = strings("cwd", field("cwd", str))
        if not os.path.isabs(cwd):
            raise ForkServerError(f"cwd {cwd!r} is not absolute")
        umask = field("umask", int)
        if not 0 <= umask <= 0o777:
            raise ForkServerError(f"bad umask {umask!r}")
        rlimits: list[tuple[int, int, int]] = []
        for r in field("rlimits", list):
            if (not isinstance(r, list) or len(r) != 3
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
                raise ForkServerError(f"bad rlimit {r!r:.80}")
            rlimits.append((r[0], r[1], r[2]))
        affinity = field("affinity", list)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in affinity):
            raise ForkServerError(f"bad CPU affinity {affinity!r:.80}")
        return cls(namespace=namespace, id=cid, address=strings("address", field("address", str)),
                   debug=field("debug", bool), argv=argv, env=env, cwd=cwd, umask=umask,
                   rlimits=rlimits, nice=field("nice", int), affinity=affinity)



# --------------------------------------------------------------------------- client


def request_shim(path: str, request: Request, listener_fd: int,
                 timeout: float = CLIENT_TIMEOUT) -> int:
    """Have the fork server at ``path`` start a shim serving ``listener_fd``; its pid.

    Raises :class:`ForkServerError` or ``OSError``; in every such case no shim
    will ever serve ``listener_fd`` (see the module's invariants), so the
    caller may start one cold.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {timeout:g} s")
        return remaining

    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        conn.settimeout(left())
        conn.connect(path)
        conn.settimeout(left())
        send_fds(conn, [_msgpack.packb(request.to_wire())], [listener_fd])
        conn.settimeout(left())
        data, fds, flags, _ = recv_fds(conn, MAX_MESSAGE, 1)
        if not data:
            raise ForkServerError("the fork server closed the connection")
        if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            raise ForkServerError("answer truncated")
        try:
            answer = _msgpack.unpackb(data)
        except ValueError as e:
            raise ForkServerError(f"undecodable answer: {e}") from None
        if not isinstance(answer, dict):
            raise ForkServerError(f"bad answer {answer!r:.80}")
        if "error" in answer:
            raise ForkServerError(str(answer["error"]))
        pid = answer.get("pid")
        if not isinstance(pid, int) or pid <= 0 or len(fds) != 1:
            raise ForkServerError(f"bad answer {answer!r:.80} with {len(fds)} fds")
        # The commit point: from here on the shim serves (or it is gone: EPIPE).
        os.write(fds[0], b"g")
        return pid
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


