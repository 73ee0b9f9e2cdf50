"""``containerd-shim-supervisor-v2``: the binary containerd runs, and its three actions.

containerd 1.6 runs the shim binary three ways (facts from containerd's
``runtime/v2/shim``), always with the bundle as working directory and
``TTRPC_ADDRESS`` in the environment::

    SHIM -namespace NS -address A -publish-binary B -id ID start
    SHIM -namespace NS -address A -publish-binary B -id ID -bundle DIR delete
    SHIM -namespace NS -id ID -address A [-debug]         (the daemon)

``start``
    Picks the container's group: a group annotation (a pod's sandbox id, or
    ``io.containerd.supervisor.v2.group``), else with ``shim_group =
    "namespace"`` (settings file, or ``$SUPERVISOR_SHIM_GROUP`` in containerd's
    environment) the namespace's shared group, else the container alone.  The
    group's socket is ``/run/containerd/s/<sha256(address/namespace/group)>``
    (then ``group#1``, ``group#2``... for a shared group whose shims are full).
    A live shim there is asked to take the container (``Group/Join``,
    :mod:`supervisor._join`): it answers only while it is not ending and, for a
    shared group, serves fewer than ``shim_group_size`` containers (16); then
    ``start`` writes ``address`` in the bundle and prints it.  Otherwise
    ``start`` binds the socket 0600 (replacing one nothing listens on),
    writes ``address``, and starts the daemon: forked by the fork server
    (:mod:`supervisor.forkserver`) when its socket exists and it answers
    within 2 s, else (or on any failure) cold -- a new interpreter in a new
    session with the listening socket as fd 3 and no stdio of containerd's.
    A forked shim is moved into ``start``'s own cgroups (where a cold one is
    born); either then gets ``ShimCgroup`` and the OOM score.  ``start``
    prints the address -- nothing else, on stdout or stderr, since containerd
    reads both as the address; a fork-server failure is noted in the bundle's
    ``log`` FIFO.  It imports neither trio nor protobuf unless options arrive
    on stdin, nor :mod:`logging`.

``delete``
    Cleans up after a shim that is gone: force-deletes the runtime's
    container, unmounts the rootfs, removes a socket nobody serves, and prints
    a protobuf ``DeleteResponse`` (init pid, status 137).  It needs neither the
    daemon nor containerd's ttrpc server.

the daemon
    Becomes the child subreaper, serves the Task service on fd 3, forwards
    events to ``TTRPC_ADDRESS`` and logs to the ``log`` FIFO in the bundle
    (moving to another container's when a shared shim's first bundle goes).
    It exits once ``Shutdown`` finds no container left and none reserved,
    after its events are delivered.
"""

from __future__ import annotations

import _socket
import errno
import os
import sys
import time

from supervisor import __version__
from supervisor.defaults import SHIM_GROUPS

try:  # the builtin module: hashlib would load OpenSSL (~2 ms) for one digest
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - interpreters without it
    from hashlib import sha256

SOCKET_DIR = "/run/containerd/s"
GROUP_LABELS = (
    "io.containerd.supervisor.v2.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)
LISTEN_FD = 3
EXIT_USAGE = 2
#: Environment defaults for ``shim_group`` / ``shim_group_size`` (containerd's environment).
GROUP_ENV = "SUPERVISOR_SHIM_GROUP"
GROUP_SIZE_ENV = "SUPERVISOR_SHIM_GROUP_SIZE"
DEFAULT_GROUP_SIZE = 16
SHARED_GROUP = "supervisor-shared"
MAX_GROUP_SOCKETS = 64


class UsageError(Exception):
    pass


class Flags:
    """The parsed command line.  A plain class: ``dataclasses`` costs ``start`` ~5 ms."""

    __slots__ = ("action", "address", "bundle", "debug", "id", "namespace", "publish_binary",
                 "socket", "version")

    def __init__(self, *, namespace: str = "", id: str = "", address: str = "",
                 publish_binary: str = "", bundle: str = "", socket: str = "",
                 debug: bool = False, version: bool = False, action: str = "") -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.publish_binary = publish_binary
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.action = action

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Flags({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Flags):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces


_VALUE_FLAGS = {
    "namespace": "namespace",
    "id": "id",
    "address": "address",
    "publish-binary": "publish_binary",
    "bundle": "bundle",
    "socket": "socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "version": "version"}


def parse_flags(argv: list[str]) -> Flags:
    """Parse Go ``flag``-style arguments: ``-name value``, ``-name=value``, ``--name``."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
            setattr(flags, _BOOL_FLAGS[name], not eq or value.lower() in ("true", "1"))
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, _VALUE_FLAGS[name], value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    flags.action = rest[0] if rest else ""
    return flags


# --- start --------------------------------------------------------------


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    digest = sha256(os.path.join(containerd_address, namespace, group).encode())
    return f"unix://{SOCKET_DIR}/{digest.hexdigest()}"


def socket_path(address: str) -> str:
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return "\0" + address


def group_of(container_id: str, bundle: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return container_id
    if b"annotations" not in raw and b"\\u" not in raw:
        return container_id  # no annotations (nor escaped keys): skip importing json
    import json

    spec = json.loads(raw)
    annotations = spec.get("annotations") or {} if isinstance(spec, dict) else {}
    for label in GROUP_LABELS:
        value = annotations.get(label)
        if isinstance(value, str) and value:
            return value
    return container_id


def can_connect(path: str) -> bool:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def new_listener(path: str) -> _socket.socket:
    """A socket listening on ``path``; EADDRINUSE if something is there.

    Bound and made to listen under the socket directory's lock (as :func:`replace_stale`
    works): between ``bind`` and ``listen`` a connect is refused as if the socket were
    dead, and a concurrent ``start`` must not take it for stale and replace it.
    """
    if path.startswith("\0"):
        return _bind_listen(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    import fcntl

    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _bind_listen(path)
    finally:
        os.close(fd)


def _bind_listen(path: str) -> _socket.socket:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o600)
        s.listen(128)
    except BaseException:
        s.close()
        raise
    return s


def write_file_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def join_cgroup(path: str, pid: int) -> None:
    """Put ``pid`` in cgroup ``path`` (v2 unified, or every v1 hierarchy that has it)."""
    root = "/sys/fs/cgroup"
    rel = path.lstrip("/")
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        targets = [os.path.join(root, rel)]
    else:
        targets = [
            os.path.join(root, h, rel)
            for h in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, h, rel))
        ]
        if not targets:
            raise FileNotFoundError(errno.ENOENT, "no such cgroup", path)
    for target in targets:
        with open(os.path.join(target, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(pid))


def adjust_oom_score(pid: int) -> None:
    """The shim is a little easier to kill than containerd (its parent): parent's score + 1."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj", encoding="ascii") as f:
            score = int(f.read().strip())
    except (OSError, ValueError):
        return
    with open(f"/proc/{pid}/oom_score_adj", "w", encoding="ascii") as f:
        f.write(str(min(score + 1, 1000)))


def daemon_argv(flags: Flags) -> list[str]:
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script).endswith(".py") or not os.access(script, os.X_OK):
        head = [sys.executable, "-m", "supervisor.shim"]
    else:
        head = [sys.executable, script]
    argv = [*head, "-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.debug:
        argv.append("-debug")
    return argv


def cgroup_mounts() -> list[tuple[set[str], str, str]]:
    """(controllers, mount root, mount point) of every cgroup hierarchy; v2's set is empty."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            controllers = set(tail[2].split(",")) if tail[0] == "cgroup" else set()
            out.append((controllers, fields[3], fields[4].replace("\\040", " ")))
    return out


def join_own_cgroups(pid: int) -> None:
    """Move ``pid`` into this process's cgroups, where a cold-started daemon is born."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        theirs = set(f.read().splitlines())
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        ours = [line for line in f.read().splitlines() if line and line not in theirs]
    if not ours:
        return
    mounts = cgroup_mounts()
    for line in ours:
        _, names, path = line.split(":", 2)
        wanted = set(names.split(",")) if names else set()
        for controllers, root, mountpoint in mounts:
            if (wanted <= controllers if wanted else not controllers) and (
                    root in ("/", path) or path.startswith(root + "/")):
                rel = path if root == "/" else path[len(root):]
                target = os.path.join(mountpoint, rel.lstrip("/"), "cgroup.procs")
                with open(target, "w", encoding="ascii") as f:
                    f.write(str(pid))
                break


def note(level: str, message: str) -> None:
    """One line in the bundle's ``log`` FIFO (containerd's log) if it is read; never blocks.

    ``start`` may not write to stderr: containerd reads its output as the address.
    """
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no FIFO, or nobody reads it: there is no one to tell
    try:
        text = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f'time="{stamp}" level={level} msg="{text}" logger=supervisor.shim\n'
                 .encode(errors="replace"))
    except OSError:
        pass  # a full FIFO: the note is dropped, as the daemon's own records would be
    finally:
        os.close(fd)


def start_daemon(flags: Flags, listener: _socket.socket) -> tuple[int, bool]:
    """Start the daemon serving ``listener``: (its pid, whether the fork server forked it).

    The fork server is asked when its socket exists; on any failure no forked
    shim will ever serve the listener (:mod:`supervisor.forkserver`), so the
    cold start that follows cannot race one.
    """
    from supervisor import forkserver

    path = forkserver.socket_path()
    if path and os.path.exists(path):
        try:
            request = forkserver.Request.of_this_process(
                namespace=flags.namespace, id=flags.id, address=flags.address,
                debug=flags.debug, argv=daemon_argv(flags))
            return forkserver.request_shim(path, request, listener.fileno()), True
        except Exception as e:  # whatever went wrong, the cold start below still works
            note("warning", f"fork server {path}: {e}; starting the shim cold")
    from supervisor._spawn import spawn

    return spawn(daemon_argv(flags), fds={LISTEN_FD: listener.fileno()}, setsid=True), False


def group_settings(options: bytes) -> tuple[str, int, str]:
    """(shim_group, shim_group_size, shim_cgroup): the runtime options', else the environment's.

    Decoding options imports protobuf, so only when containerd sent some.
    """
    mode, size, cgroup = "", 0, ""
    if options:
        from supervisor.options import decode_bytes

        settings = decode_bytes(options)
        mode, size, cgroup = settings.shim_group, settings.shim_group_size, settings.shim_cgroup
    if not mode:
        mode = os.environ.get(GROUP_ENV, "")
        if mode not in SHIM_GROUPS:
            raise ValueError(f"${GROUP_ENV}: {mode!r} is not one of "
                             f"{', '.join(g for g in SHIM_GROUPS if g)}")
    if not size and os.environ.get(GROUP_SIZE_ENV):
        value = os.environ[GROUP_SIZE_ENV]
        if not value.isdigit():
            raise ValueError(f"${GROUP_SIZE_ENV}: {value!r} is not a number")
        size = int(value)
    return mode, size or DEFAULT_GROUP_SIZE, cgroup


def group_key(container_id: str, bundle: str, mode: str, size: int, cgroup: str
              ) -> tuple[str, int]:
    """(group, limit): whose shim serves this container, and how many one shim may serve.

    A group annotation (a pod, a label) wins and has no limit, as with the Go
    shim; else ``namespace`` mode shares shims (per shim cgroup) up to ``size``
    containers each; else the container has its own.
    """
    group = group_of(container_id, bundle)
    if group != container_id:
        return group, 0
    if mode == "namespace":
        return f"{SHARED_GROUP}/{cgroup}", size
    return container_id, 0


def replace_stale(path: str) -> _socket.socket | None:
    """A new listener on ``path`` if nothing listens there (None if something does now).

    Under an exclusive lock on the socket directory, so two ``start`` runs that
    both found the socket dead cannot each replace the other's.
    """
    import fcntl

    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if can_connect(path):
            return None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # its shim removed it meanwhile
        try:
            return _bind_listen(path)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return None  # a start bound it first
            raise
    finally:
        os.close(fd)


def ask_to_join(path: str, container_id: str, limit: int) -> str:
    """:func:`supervisor._join.join`'s verdict ("joined", "full", "closing", "gone"),
    or "refused" for an answer it does not understand (noted in the log FIFO)."""
    from supervisor import _join  # ~0.5 ms: only when a shim is there

    try:
        return _join.join(path, container_id, limit)
    except _join.JoinError as e:
        note("warning", f"shim on {path}: {e}; trying the group's next socket")
        return "refused"


def claim_socket(flags: Flags, group: str, limit: int) -> tuple[str, _socket.socket | None]:
    """(address, listener) for this container: a listener when ``start`` must start a
    shim on it, None when a live shim there has reserved a place (see :mod:`supervisor._join`).

    The group's sockets are tried in order (``group``, ``group#1``, ...): a
    full shim or one on its way out sends the container to the next.
    """
    for n in range(MAX_GROUP_SOCKETS):
        address = socket_address(flags.address, flags.namespace,
                                 group if n == 0 else f"{group}#{n}")
        path = socket_path(address)
        for _ in range(3):
            try:
                return address, new_listener(path)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
            answer = ask_to_join(path, flags.id, limit)
            if answer == "joined":
                return address, None
            if answer != "gone":
                break  # full, closing or confused: the next socket
            listener = replace_stale(path)
            if listener is not None:
                return address, listener
    raise OSError(errno.EAGAIN, f"no shim of group {group!r} took container {flags.id!r}"
                  f" ({MAX_GROUP_SOCKETS} sockets tried)")


def action_start(flags: Flags) -> int:
    bundle = os.getcwd()
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    mode, size, shim_cgroup = group_settings(options)
    group, limit = group_key(flags.id, bundle, mode, size, shim_cgroup)
    address, listener = claim_socket(flags, group, limit)
    if listener is None:  # a live shim took it
        write_file_atomic("address", address)
        sys.stdout.write(address)
        return 0
    path = socket_path(address)
    try:
        write_file_atomic("address", address)
        pid, forked = start_daemon(flags, listener)
        try:
            if forked:
                try:
                    join_own_cgroups(pid)
                except OSError as e:
                    note("warning", f"shim {pid} stays in the fork server's cgroups: {e}")
            if shim_cgroup:
                join_cgroup(shim_cgroup, pid)
            adjust_oom_score(pid)
        except BaseException:
            os.kill(pid, 9)
            raise
    except BaseException:
        listener.close()
        if not path.startswith("\0"):
            os.unlink(path)
        raise
    listener.close()
    sys.stdout.write(address)
    return 0


# --- delete -------------------------------------------------------------


def action_delete(flags: Flags) -> int:
    """See :mod:`supervisor._delete` (light: no trio, no protobuf)."""
    from supervisor._delete import action_delete as delete

    return delete(flags.namespace, flags.id, flags.bundle or os.getcwd())


# --- serve (the daemon) ---------------------------------------------------


def action_serve(flags: Flags) -> int:
    """The daemon, cold (``main``) or forked (:mod:`supervisor.forkserver`): fd 3, cwd bundle."""
    import logging

    from supervisor.shimlog import setup_logging

    setup_logging(flags.debug)
    log = logging.getLogger("supervisor.shim")
    from supervisor import _ksm

    log.debug("%s", _ksm.apply())
    import socket

    from supervisor.daemon import serve

    try:
        listener = socket.socket(fileno=LISTEN_FD)
    except OSError as e:
        log.error("no listening socket on fd %d: %s", LISTEN_FD, e)
        return 1
    return serve(
        listener,
        namespace=flags.namespace,
        container_id=flags.id,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        bundle=os.getcwd(),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as e:
        print(f"containerd-shim-supervisor-v2: {e}", file=sys.stderr)
        return EXIT_USAGE
    if flags.version:
        print(f"containerd-shim-supervisor-v2:\n  Version: {__version__}\n  Revision: python")
        return 0
    if flags.action in ("start", "delete") and not (flags.namespace and flags.id):
        print("containerd-shim-supervisor-v2: -namespace and -id are required", file=sys.stderr)
        return EXIT_USAGE
    try:
        if flags.action == "start":
            return action_start(flags)
        if flags.action == "delete":
            rc = action_delete(flags)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)  # containerd waits for us: skip the interpreter's teardown
        if flags.action == "":
            return action_serve(flags)
    except Exception as e:
        print(f"containerd-shim-supervisor-v2 {flags.action}: {e}", file=sys.stderr)
        return 1
    print(f"containerd-shim-supervisor-v2: unknown action {flags.action!r}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
