"""``start``'s side of the fork server: shim daemons forked from a pre-imported parent.

A cold shim daemon is a new interpreter importing trio, protobuf and our
modules: ~190 ms before it answers containerd.  The fork server
(:mod:`supervisor.forkserver`, beside the daemon) imports all of that once and
forks one shim per request; ``start`` (:mod:`supervisor.launch.start`) asks it
when its socket exists and falls back to the cold start on any failure.

This module holds what both sides of the private protocol share, once: the
socket's location, the :class:`Request` schema (written by the client, checked
by the server), fd passing and the one codec
(:mod:`supervisor.launch._msgpack`), the code identity both sides compare
(:func:`code_identity`), the lock and log file names beside the socket; and the
client: :func:`request_shim`, :func:`spawn_server` (the fork server on demand)
and :func:`status` (for ``supervisor ls``).  The protocol and its invariants
are described in :mod:`supervisor.forkserver`.

On demand
---------
When no fork server answers (no socket, or a refused connect: a killed one's
file), or the one there retired because this client's code differs from its
own, ``start`` calls :func:`spawn_server` and goes on cold; the next ``start``
forks from the new server.  :func:`spawn_server` takes the lock file's
``flock`` without waiting and hands the locked file to the server it spawns
(fd 3), which holds it for its whole life: whoever holds the lock is *the*
fork server of that socket, alive or still starting, so two concurrent starts
spawn one (the other finds the lock taken and spawns nothing), and a killed
server's lock is free at once.  The lock file holds the server's pid (written
by the spawning ``start``, then by the server), for ``kill`` and for tests.

Invariants
----------
* Importing this module loads nothing ``start`` has not loaded already (no
  typing, logging or msgpack package); :mod:`resource` is imported only when a
  fork server is there.
* The client's whole exchange (connect, send, answer, go) is bounded by one
  deadline, :data:`CLIENT_TIMEOUT`; on any failure no forked shim will ever
  serve the listener, so the caller may start one cold.
* A server never forks a shim for a client whose :func:`code_identity`
  differs from the one it was started with: it retires instead
  (:class:`Retired`), so no shim runs code older than its ``start``'s.
* :func:`code_identity` costs ``start`` well under a millisecond (stats, no
  reads; measured ~0.2-0.6 ms for the package's ~80 files).
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

#: In a directory of its own (0700, made by the first server; refused if others may write
#: it: :func:`open_folder`), with its lock and log.
DEFAULT_SOCKET = "/run/containerd/supervisor/forkserver.sock"
SOCKET_ENV = "SUPERVISOR_FORKSERVER"
#: Replaces :func:`code_identity`'s digest (tests simulate "other code" with it).
CODE_ENV = "SUPERVISOR_CODE_IDENTITY"
#: 3: requests carry the client's code identity; a server of other code (or another
#: protocol) retires and ``start`` spawns a new one.  2: the server reads the client's
#: namespaces and credentials from the kernel, never from the request.
PROTOCOL = 3
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


class NoServer(ForkServerError):
    """Nothing serves the socket: no file, or a connect refused (a killed server's file)."""


class Retired(ForkServerError):
    """The server was started from other code than the client's, and has retired."""


def sibling(path: str, suffix: str) -> str:
    """The file beside the socket ``path`` with ``suffix`` instead of ``.sock``:
    ``forkserver.lock`` (the lock and pid file) and ``forkserver.log``."""
    return (path[:-5] if path.endswith(".sock") else path) + suffix


def code_identity(python: str | None = None) -> str:
    """What code a fork server runs, as its ``start`` sees it on disk: equal or retire.

    The package version, the daemon side's interpreter ``python`` (default:
    this one; ``start`` may run in another, see
    :mod:`supervisor.launch.launcher`, so nothing here is of the interpreter
    computing it: the executable's mtime and size, a Python upgrade), the
    mtime and size of every ``.py`` of the
    ``supervisor`` package, the mtime of each of its directories (a file
    added, removed or replaced by rename, as pip and git do) and of the
    site-packages directories it and the venv install into (any ``pip
    install`` there, dependencies too).  Stats only, no reads.
    ``$SUPERVISOR_CODE_IDENTITY`` replaces it (tests).
    """
    override = os.environ.get(CODE_ENV)
    if override:
        return override
    import supervisor
    from supervisor.launch.digest import sha256_hex

    def mtime_size(path: str) -> tuple[int, int]:
        try:
            st = os.stat(path)
        except OSError:
            return 0, 0
        return st.st_mtime_ns, st.st_size

    root = os.path.dirname(os.path.abspath(supervisor.__file__))
    parent = os.path.dirname(root)
    # Not sys.prefix: without ``site`` (the entry script's ``-S``) it names the base
    # interpreter, not the venv, and both sides must see the same directories.
    python = os.path.abspath(python or sys.executable)
    lib = os.path.join(os.path.dirname(os.path.dirname(python)), "lib")
    try:
        versions = sorted(n for n in os.listdir(lib) if n.startswith("python3."))
    except OSError:
        versions = []
    facts: list[int] = [*mtime_size(python),
                        *(mtime_size(f"{lib}/{v}/site-packages")[0] for v in versions),
                        mtime_size(parent)[0] if parent.endswith("-packages") else 0]
    stack = [root]
    while stack:
        folder = stack.pop()
        facts.append(mtime_size(folder)[0])
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".py"):
                    st = entry.stat()
                    facts += (st.st_mtime_ns, st.st_size)
                elif "." not in name and name != "__pycache__" and entry.is_dir():
                    stack.append(entry.path)
    digest = sha256_hex(f"{root}\0{facts}".encode())[:16]
    return f"{supervisor.__version__}+{digest}"



def socket_path() -> str | None:
    """The fork server's socket: ``$SUPERVISOR_FORKSERVER`` (empty: none) or the default.

    A relative path names no fork server: ``start`` runs in each bundle, so every
    start would spawn a server of its own there (and the server binds from ``/``).
    """
    value = os.environ.get(SOCKET_ENV)
    if value is None:
        return DEFAULT_SOCKET
    return value if value.startswith("/") else None


class Request:
    """One shim to fork: what a cold start passes on its command line, and its context.

    Nothing in it is believed about who the client is: the server reads that
    from the kernel (:func:`supervisor.forkserver.peer_identity`).  A field
    ``identity`` sent by an older client is ignored.
    """

    __slots__ = ("address", "affinity", "argv", "code", "cwd", "debug", "env", "id",
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
        code: str,
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
        #: The client's :func:`code_identity`: a server of other code retires.
        self.code = code

    @classmethod
    def of_this_process(cls, *, namespace: str, id: str, address: str, debug: bool,
                        argv: Sequence[str], code: str) -> Request:
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
                   affinity=sorted(os.sched_getaffinity(0)), code=code)

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
                   rlimits=rlimits, nice=field("nice", int), affinity=affinity,
                   code=strings("code", field("code", str)))



# --------------------------------------------------------------------------- client


def request_shim(path: str, request: Request, listener_fd: int,
                 timeout: float = CLIENT_TIMEOUT) -> int:
    """Have the fork server at ``path`` start a shim serving ``listener_fd``; its pid.

    Raises :class:`ForkServerError` (:class:`NoServer`, :class:`Retired`: the
    caller may spawn one) or ``OSError``; in every such case no shim will ever
    serve ``listener_fd`` (see the module's invariants), so the caller may
    start one cold.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {timeout:g} s")
        return remaining

    conn = _connect(path, left())
    fds: list[int] = []
    try:
        conn.settimeout(left())
        send_fds(conn, [_msgpack.packb(request.to_wire())], [listener_fd])
        conn.settimeout(left())
        data, fds, flags, _ = recv_fds(conn, MAX_MESSAGE, 1)
        if not data:
            raise ForkServerError("the fork server closed the connection")
        if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            raise ForkServerError("answer truncated")
        answer = _answer(data)
        if "error" in answer:
            raise (Retired if answer.get("retired") is True else ForkServerError)(
                str(answer["error"]))
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


def spawn_server(path: str, code: str, python: str = "") -> int | None:
    """Start a fork server on ``path`` unless one holds its lock: its pid, or None.

    The lock (:func:`sibling` ``.lock``) is taken without waiting and passed to
    the server as fd 3, so it is held from here on for the server's whole life
    (see "On demand").  The server is detached: a new session, the working
    directory ``/`` (it changes there), stdin ``/dev/null``, stdout and stderr
    its log file (truncated: one server's life), the daemon side's interpreter
    ``python`` (default: this one) with ``-I``
    (isolated: neither the bundle nor containerd's ``$PYTHONPATH`` on
    ``sys.path``, so it runs the installed code its identity names).  Both
    files are created only in a directory no one else may write
    (:func:`open_folder`, PermissionError otherwise) and never through a
    symlink.  ``code`` is this client's
    :func:`code_identity`, computed before the server imports anything, so a
    change of the files while it starts can only make it retire early.
    """
    import fcntl

    from supervisor.launch._spawn import spawn

    folder = open_folder(path)
    try:
        lock = open_beside(folder, path, ".lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a fork server holds it: running, starting or retiring
            log = open_beside(folder, path, ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                              | os.O_APPEND)
            try:
                pid = spawn([python or sys.executable, "-I", "-m", "supervisor.forkserver",
                             "--socket", path, "--code-identity", code, "--lock-fd",
                             str(LOCK_FD)],
                            fds={1: log, 2: log, LOCK_FD: lock}, setsid=True)
            finally:
                os.close(log)
            write_pid(lock, pid)
            return pid
        finally:
            os.close(lock)  # the server's copy keeps the lock
    finally:
        os.close(folder)


#: Where a spawned fork server finds its lock file, locked.
LOCK_FD = 3


def open_folder(path: str) -> int:
    """An fd of the directory of the socket ``path``, made 0700 if missing, and safe to
    create the lock and log files in; else PermissionError saying why.

    Safe: owned by this euid and writable by nobody else.  In a directory others
    may write (``$SUPERVISOR_FORKSERVER`` under /tmp), they could plant a symlink
    or a hard link where root creates and truncates its files; such a directory
    is refused, and ``start`` goes on cold with a note.  Checked on the open
    directory (``fstat``) and used through its fd (:func:`open_beside`): a rename
    of the path after the check does not redirect the files.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionError(f"the fork server's directory {folder} is owned by uid "
                                  f"{st.st_uid}, not {os.geteuid()}: refusing it")
        if st.st_mode & 0o022:
            raise PermissionError(f"the fork server's directory {folder} is writable by "
                                  f"group or others (mode {st.st_mode & 0o7777:o}): refusing it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beside(folder_fd: int, path: str, suffix: str, flags: int) -> int:
    """Open the :func:`sibling` ``suffix`` of ``path`` in the directory ``folder_fd``
    (:func:`open_folder`), never through a symlink (ELOOP), 0600 if created."""
    name = os.path.basename(sibling(path, suffix))
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder_fd)


def write_pid(lock_fd: int, pid: int) -> None:
    """The lock file's content: the pid of the server holding it."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, b"%d\n" % pid, 0)


def read_pid(path: str) -> int | None:
    """The pid in the lock file of the socket ``path`` while a server holds the lock, else None."""
    import fcntl

    try:
        fd = os.open(sibling(path, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0)
            return int(text) if text.strip().isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: no server
    finally:
        os.close(fd)


def _connect(path: str, timeout: float) -> _socket.socket:
    """A connection to the server at ``path`` (NoServer when nothing serves it)."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        conn.close()
        raise NoServer(f"nothing serves it ({e.strerror})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _answer(data: bytes) -> dict[str, Any]:
    """The server's answer decoded: a map, or ForkServerError."""
    try:
        answer = _msgpack.unpackb(data)
    except ValueError as e:
        raise ForkServerError(f"undecodable answer: {e}") from None
    if not isinstance(answer, dict):
        raise ForkServerError(f"bad answer {answer!r:.80}")
    return answer


def _exchange(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One message to the server at ``path`` and its answer, a map (a ``status`` or a
    stale request: neither passes an fd)."""
    conn = _connect(path, timeout)
    try:
        conn.send(_msgpack.packb(message))
        return _answer(conn.recv(MAX_MESSAGE))
    finally:
        conn.close()


def status(path: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """The fork server's status (pid, version, code, started, served, ...); raises as
    :func:`request_shim` (NoServer when none serves ``path``)."""
    answer = _exchange(path, {"op": "status"}, timeout)
    if "error" in answer:
        raise ForkServerError(f"bad answer {answer!r:.120}")
    return answer


def retire(path: str, code: str, timeout: float = CLIENT_TIMEOUT) -> str:
    """Make the fork server at ``path`` retire as a ``start`` of other code would: its reason.

    For ``supervisor upgrade --all``.  Sends the least a server reads as stale
    (this protocol and ``code``, the caller's :func:`code_identity`); only a
    server whose own code differs from ``code`` retires, and only for a peer it
    could serve (it compares the caller with itself first).  Raises
    :class:`NoServer`, or :class:`ForkServerError` with the server's answer when
    it did not retire (the same code, or a peer it refuses).  The next
    ``start`` spawns a new server (see "On demand").
    """
    answer = _exchange(path, {"v": PROTOCOL, "code": code}, timeout)
    if answer.get("retired") is True:
        return str(answer.get("error", ""))
    raise ForkServerError(f"it did not retire: {answer.get('error', answer)!s:.200}")
