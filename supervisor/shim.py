"""``containerd-shim-supervisor-v2``: the binary containerd runs, and its three actions.

containerd 1.6 runs the shim binary three ways (facts from containerd's
``runtime/v2/shim``), always with the bundle as working directory and
``TTRPC_ADDRESS`` in the environment::

    SHIM -namespace NS -address A -publish-binary B -id ID start
    SHIM -namespace NS -address A -publish-binary B -id ID -bundle DIR delete
    SHIM -namespace NS -id ID -address A [-debug]         (the daemon)

``start``
    Picks the socket ``/run/containerd/s/<sha256(address/namespace/group)>``
    (the group is the id, or the sandbox id from the bundle's annotations, so
    a pod's containers share one shim), binds it 0600, starts the daemon in a
    new session with the listening socket as fd 3 and no stdio of
    containerd's, writes ``address`` in the bundle and prints the address --
    nothing else -- on stdout.  If a live shim already serves that socket it
    just prints its address.  It imports neither trio nor protobuf unless
    options arrive on stdin.

``delete``
    Cleans up after a shim that is gone: force-deletes the runtime's
    container, unmounts the rootfs, removes a socket nobody serves, and prints
    a protobuf ``DeleteResponse`` (init pid, status 137).  It needs neither the
    daemon nor containerd's ttrpc server.

the daemon
    Becomes the child subreaper, serves the Task service on fd 3, forwards
    events to ``TTRPC_ADDRESS`` and logs to the ``log`` FIFO in the bundle.
    It exits once ``Shutdown`` finds no container left, after its events are
    delivered.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass

from supervisor import __version__

SOCKET_DIR = "/run/containerd/s"
GROUP_LABELS = (
    "io.containerd.supervisor.v2.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)
LISTEN_FD = 3
EXIT_USAGE = 2

log = logging.getLogger("supervisor.shim")


class UsageError(Exception):
    pass


@dataclass
class Flags:
    namespace: str = ""
    id: str = ""
    address: str = ""
    publish_binary: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""


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
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group).encode())
    return f"unix://{SOCKET_DIR}/{digest.hexdigest()}"


def socket_path(address: str) -> str:
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return "\0" + address


def group_of(container_id: str, bundle: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        return container_id
    annotations = spec.get("annotations") or {} if isinstance(spec, dict) else {}
    for label in GROUP_LABELS:
        value = annotations.get(label)
        if isinstance(value, str) and value:
            return value
    return container_id


def can_connect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def new_listener(path: str) -> socket.socket:
    if not path.startswith("\0"):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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


def action_start(flags: Flags) -> int:
    from supervisor._spawn import spawn

    bundle = os.getcwd()
    address = socket_address(flags.address, flags.namespace, group_of(flags.id, bundle))
    path = socket_path(address)
    try:
        listener = new_listener(path)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        if can_connect(path):
            write_file_atomic("address", address)
            sys.stdout.write(address)
            return 0
        os.unlink(path)
        listener = new_listener(path)
    try:
        write_file_atomic("address", address)
        options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
        pid = spawn(daemon_argv(flags), fds={LISTEN_FD: listener.fileno()}, setsid=True)
        try:
            if options:
                from supervisor.options import decode_bytes

                settings = decode_bytes(options)
                if settings.shim_cgroup:
                    join_cgroup(settings.shim_cgroup, pid)
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
    import subprocess

    from supervisor import mount
    from supervisor.api.task.v2 import shim_pb2
    from supervisor.options import Settings
    from supervisor.runtime import DEFAULT_BINARY, DEFAULT_ROOT

    bundle = flags.bundle or os.getcwd()
    settings = Settings.load(bundle)
    root = os.path.join(settings.root or DEFAULT_ROOT, flags.namespace)
    argv = [settings.binary_name or DEFAULT_BINARY, "--root", root,
            "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
    if settings.systemd_cgroup:
        argv.append("--systemd-cgroup")
    try:
        done = subprocess.run([*argv, "delete", "--force", flags.id], capture_output=True,
                              check=False, timeout=60)
        if done.returncode != 0:
            log.warning("runtime delete %s: %s", flags.id, done.stderr.decode(errors="replace"))
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("runtime delete %s: %s", flags.id, e)
    try:
        mount.unmount_all(os.path.join(bundle, "rootfs"), detach=True)
    except OSError as e:
        log.warning("unmount rootfs of %s: %s", flags.id, e)
    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid"), encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as f:
            path = socket_path(f.read().strip())
        if not path.startswith("\0") and os.path.exists(path) and not can_connect(path):
            os.unlink(path)
    except OSError:
        pass  # no address file, or the socket went away already: nothing to remove
    response = shim_pb2.DeleteResponse(pid=pid, exit_status=128 + 9)
    response.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.buffer.flush()
    return 0


# --- serve (the daemon) ---------------------------------------------------


class FifoLogHandler(logging.Handler):
    """Log records to the bundle's ``log`` FIFO without ever blocking.

    containerd reads that FIFO into its own log.  When nobody reads it (say
    containerd is down) and it is full, records are counted and dropped, so
    the shim never stalls on its own logging.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except Exception:
            self.handleError(record)


def setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter(
        'time="%(asctime)s" level=%(levelname)s msg="%(message)s" logger=%(name)s',
    )
    handler: logging.Handler
    try:
        handler = FifoLogHandler("log")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)


def action_serve(flags: Flags) -> int:
    setup_logging(flags.debug)
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
            return action_delete(flags)
        if flags.action == "":
            return action_serve(flags)
    except Exception as e:
        print(f"containerd-shim-supervisor-v2 {flags.action}: {e}", file=sys.stderr)
        return 1
    print(f"containerd-shim-supervisor-v2: unknown action {flags.action!r}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
