"""The ``start`` action: find or start the shim that serves a container, print its address.

``SHIM -namespace NS -address A -publish-binary B -id ID start`` runs with the
bundle as working directory and the runtime options (a serialized protobuf
``Any``, maybe empty) on stdin -- or, from containerd 2.3, a
``BootstrapParams`` holding them, whose socket directory and log level
``start`` honours (:mod:`supervisor.launch.bootstrap`).

Picks the container's group: a group annotation (a pod's sandbox id, or
``io.containerd.supervisor.v2.group``), else with ``shim_group = "namespace"``
(settings file, or ``$SUPERVISOR_SHIM_GROUP`` in containerd's environment) the
namespace's shared group, else the container alone.  The group's socket is
``/run/containerd/s/<sha256(address/namespace/group)>`` (then ``group#1``,
``group#2``... for a shared group whose shims are full; in 2.3's ``socket_dir``
when it names one).  A live shim there is
asked to take the container (``Group/Join``, :mod:`supervisor.launch._join`):
it answers only while it is not ending and, for a shared group, serves fewer
than ``shim_group_size`` containers (16); then ``start`` writes ``address`` in
the bundle and prints it.  Otherwise ``start`` claims the socket, 0600 and
already listening when it appears (replacing one nothing listens on;
:mod:`supervisor.launch.sockfile`), writes ``address``, and starts the daemon:
forked by the fork server (:mod:`supervisor.launch.forkclient`) when it
answers within 2 s, else (or on any failure) cold -- a new interpreter in a
new session with the listening socket as fd 3 and no stdio of containerd's;
when no fork server serves (or the one there was of other code and retired),
``start`` also spawns one for the next ``start`` (``$SUPERVISOR_FORKSERVER``
empty: never).  A forked shim is moved into ``start``'s own cgroups
(where a cold one is born); either then gets ``ShimCgroup`` and the OOM score.

``start`` prints the address -- nothing else, on stdout or stderr, since
containerd reads both as the address; a fork-server failure is noted in the
bundle's ``log`` FIFO.  It imports neither trio nor protobuf (the caller's
``decode_options`` reads the options by hand, :mod:`supervisor.launch.runopts`),
nor :mod:`logging`, :mod:`typing` or :mod:`dataclasses`, nor anything of site-packages.
"""

from __future__ import annotations

import _socket
import errno
import os
import sys
import time

from supervisor.launch import address as addresses
from supervisor.launch import procfs, sockfile
from supervisor.launch.address import socket_path
from supervisor.launch.defaults import CGROUP_ROOT, LISTEN_FD, SHIM_GROUPS, SOCKET_DIR
from supervisor.launch.digest import sha256_hex

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from collections.abc import Callable

    from supervisor.launch.flags import Flags
    from supervisor.launch.settings import Settings

    #: Runtime options (a serialized ``Any``) -> settings (:mod:`supervisor.launch.runopts`).
    DecodeOptions = Callable[[bytes], Settings]

GROUP_LABELS = (
    "io.containerd.supervisor.v2.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)
#: Environment defaults for ``shim_group`` / ``shim_group_size`` (containerd's environment).
GROUP_ENV = "SUPERVISOR_SHIM_GROUP"
GROUP_SIZE_ENV = "SUPERVISOR_SHIM_GROUP_SIZE"
DEFAULT_GROUP_SIZE = 16
SHARED_GROUP = "supervisor-shared"
MAX_GROUP_SOCKETS = 64


def socket_address(containerd_address: str, namespace: str, group: str,
                   socket_dir: str = "") -> str:
    """The group's socket, in ``socket_dir`` (containerd 2.3 may name one) or :data:`SOCKET_DIR`."""
    digest = sha256_hex(os.path.join(containerd_address, namespace, group).encode())
    return f"unix://{socket_dir or SOCKET_DIR}/{digest}"


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


def write_file_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def join_cgroup(path: str, pid: int) -> None:
    """Put ``pid`` in cgroup ``path`` (v2 unified, or every v1 hierarchy that has it)."""
    root = CGROUP_ROOT
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
        with open(os.path.join(target, "cgroup.procs"), "w", encoding="utf-8") as f:
            f.write(str(pid))


def adjust_oom_score(pid: int) -> None:
    """The shim is a little easier to kill than containerd (its parent): parent's score + 1.

    Files of digits here are opened as UTF-8, whose codec the interpreter loaded at
    start-up: naming ``ascii`` would import :mod:`encodings.ascii` for them.
    """
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj", encoding="utf-8") as f:
            score = int(f.read().strip())
    except (OSError, ValueError):
        return
    with open(f"/proc/{pid}/oom_score_adj", "w", encoding="utf-8") as f:
        f.write(str(min(score + 1, 1000)))


def daemon_argv(flags: Flags, python: str = "") -> list[str]:
    """The command line of the daemon for ``flags``: the entry script (or the module) run
    by the daemon side's interpreter ``python`` (default: this one), with ``site``."""
    python = python or sys.executable
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script).endswith(".py") or not os.access(script, os.X_OK):
        head = [python, "-m", "supervisor.shim"]
    else:
        head = [python, script]
    argv = [*head, "-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.debug:
        argv.append("-debug")
    return argv


def join_own_cgroups(pid: int) -> None:
    """Move ``pid`` into this process's cgroups, where a cold-started daemon is born."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        theirs = set(procfs.parse_cgroup(f.read()))
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        ours = [entry for entry in procfs.parse_cgroup(f.read()) if entry not in theirs]
    if not ours:
        return
    mounts = procfs.cgroup_mounts(procfs.read_mountinfo())
    for _, names, path in ours:
        wanted = set(names.split(",")) if names else set()
        for controllers, root, mountpoint in mounts:
            if (wanted <= controllers if wanted else not controllers) and (
                    root in ("/", path) or path.startswith(root + "/")):
                rel = path if root == "/" else path[len(root):]
                target = os.path.join(mountpoint, rel.lstrip("/"), "cgroup.procs")
                with open(target, "w", encoding="utf-8") as f:
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


def _spawn_server(path: str, code: str, why: str, python: str = "") -> None:
    """Spawn a fork server at ``path`` in ``python`` for the next ``start`` (this one goes
    on cold)."""
    from supervisor.launch import forkclient

    try:
        pid = forkclient.spawn_server(path, code, python)
    except Exception as e:
        note("warning", f"fork server {path}: {why}; cannot start one: {e}; "
             "starting the shim cold")
    else:
        started = f"started one (pid {pid})" if pid else "another start is starting one"
        note("info", f"fork server {path}: {why}; {started}; starting the shim cold")


def start_daemon(flags: Flags, listener: _socket.socket, python: str = ""
                 ) -> tuple[int, bool]:
    """Start the daemon serving ``listener``: (its pid, whether the fork server forked it);
    ``python`` is the daemon side's interpreter (default: this one).

    The fork server is asked unless ``$SUPERVISOR_FORKSERVER`` is empty; when
    none serves its socket, or the one there retired (other code), a new one
    is spawned (:func:`supervisor.launch.forkclient.spawn_server`) for the
    next ``start`` and this one goes on cold, without waiting for it.  On any
    failure no forked shim will ever serve the listener
    (:mod:`supervisor.launch.forkclient`), so the cold start cannot race one.
    """
    from supervisor.launch import forkclient

    path = forkclient.socket_path()
    if path:
        code = ""
        try:
            code = forkclient.code_identity(python)
            request = forkclient.Request.of_this_process(
                namespace=flags.namespace, id=flags.id, address=flags.address,
                debug=flags.debug, argv=daemon_argv(flags, python), code=code)
            return forkclient.request_shim(path, request, listener.fileno()), True
        except (forkclient.NoServer, forkclient.Retired) as e:
            _spawn_server(path, code, str(e), python)
        except Exception as e:  # whatever went wrong, the cold start below still works
            note("warning", f"fork server {path}: {e}; starting the shim cold")
    from supervisor.launch._spawn import spawn

    return spawn(daemon_argv(flags, python), fds={LISTEN_FD: listener.fileno()},
                 setsid=True), False


def group_settings(options: bytes, decode_options: DecodeOptions) -> tuple[str, int, str]:
    """(shim_group, shim_group_size, shim_cgroup): the runtime options', else the environment's.

    ``decode_options`` (:func:`supervisor.launch.runopts.decode_bytes`, passed in by
    :mod:`supervisor.shim`) is called only when containerd sent options.
    """
    mode, size, cgroup = "", 0, ""
    if options:
        settings = decode_options(options)
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


def ask_to_join(path: str, container_id: str, limit: int) -> str:
    """:func:`supervisor.launch._join.join`'s verdict ("joined", "full", "closing", "gone"),
    or "refused" for an answer it does not understand (noted in the log FIFO)."""
    from supervisor.launch import _join  # ~0.5 ms: only when a shim is there

    try:
        return _join.join(path, container_id, limit)
    except _join.JoinError as e:
        note("warning", f"shim on {path}: {e}; trying the group's next socket")
        return "refused"


def claim_socket(flags: Flags, group: str, limit: int) -> tuple[str, _socket.socket | None]:
    """(address, listener) for this container: a listener when ``start`` must start a
    shim on it, None when a live shim there has reserved a place
    (see :mod:`supervisor.launch._join`).

    The group's sockets are tried in order (``group``, ``group#1``, ...): a
    full shim or one on its way out sends the container to the next.
    """
    for n in range(MAX_GROUP_SOCKETS):
        address = socket_address(flags.address, flags.namespace,
                                 group if n == 0 else f"{group}#{n}", flags.socket_dir)
        path = socket_path(address)
        for _ in range(3):
            try:
                return address, sockfile.listen(path)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
            answer = ask_to_join(path, flags.id, limit)
            if answer == "joined":
                return address, None
            if answer != "gone":
                break  # full, closing or confused: the next socket
            listener = sockfile.replace_stale(path)
            if listener is not None:
                return address, listener
    raise OSError(errno.EAGAIN, f"no shim of group {group!r} took container {flags.id!r}"
                  f" ({MAX_GROUP_SOCKETS} sockets tried)")


def action_start(flags: Flags, decode_options: DecodeOptions, python: str = "") -> int:
    """``start``: claim the container's socket, start (or join) its shim, print its
    address.  ``python``: the daemon side's interpreter (daemons, fork servers; default:
    this one)."""
    bundle = os.getcwd()
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    if options:  # a bare Any (up to containerd 2.2) or a BootstrapParams (2.3)
        from supervisor.launch import bootstrap

        options, params = bootstrap.read_stdin(options, flags.id, flags.namespace)
        if params is not None:
            bootstrap.apply(params, flags)
    mode, size, shim_cgroup = group_settings(options, decode_options)
    group, limit = group_key(flags.id, bundle, mode, size, shim_cgroup)
    address, listener = claim_socket(flags, group, limit)
    if listener is None:  # a live shim took it
        write_file_atomic("address", address)
        sys.stdout.write(address)
        return 0
    path = socket_path(address)
    try:
        write_file_atomic("address", address)
        pid, forked = start_daemon(flags, listener, python)
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
        if not addresses.is_abstract(path):
            try:  # never hide the error in flight
                os.unlink(path)  # still listening, so still ours (sockfile's invariants)
            except FileNotFoundError:
                pass
        listener.close()
        raise
    listener.close()
    sys.stdout.write(address)
    return 0


