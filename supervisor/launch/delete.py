"""The ``delete`` action: clean up after a shim that is gone, answer containerd, exit fast.

containerd runs ``SHIM ... -id ID -bundle DIR delete`` on its critical path
after every task whose shim disconnected (and after a shim was killed).  It
needs no daemon and no containerd: it force-deletes the runtime's container,
unmounts the rootfs, removes a socket nobody serves, and writes a protobuf
``DeleteResponse`` on stdout: the init's pid, and its real exit status and
time when the shim's event spool holds its ``TaskExit`` (the shim died before
containerd accepted it: :func:`supervisor.launch.spool.init_exit`), else
status 128+SIGKILL and now (the status is unknown, or the shim's death killed
the init).

It reads the settings the daemon saved through the same class that saved them
(:class:`~supervisor.launch.settings.Settings`) and builds the runtime's
command line as the daemon does (:mod:`~supervisor.launch.runcmd`).

Kept light on purpose (it runs once per task, and containerd waits for it):
no trio, no protobuf runtime -- the three fields of ``DeleteResponse`` are
encoded by hand (field numbers from containerd's ``runtime/v2/task/shim.proto``;
``tests/unit/test_delete.py`` checks the bytes against the generated class) --
no :mod:`json` (the settings file goes through the C scanner), no logging
package (warnings go to stderr, which containerd logs), and ``subprocess``,
:mod:`~supervisor.launch.unmount` and :mod:`~supervisor.launch.sockfile` are
imported only when there is work for them (usually there is none: the shim
cleaned up before it exited).  The bundle's ``address`` file is read once, and
``mountinfo`` parsed only when the rootfs occurs in it as a mount point
(:func:`~supervisor.launch.procfs.mounted`).
"""

from __future__ import annotations

import os
import sys
import time

from supervisor.launch import address, procfs, runcmd, spool
from supervisor.launch._pbwire import field_bytes, field_varint
from supervisor.launch.launcher import NAME
from supervisor.launch.settings import Settings

SIGKILL_STATUS = 128 + 9


def warn(message: str) -> None:
    sys.stderr.write(f"{NAME} delete: {message}\n")


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """``DeleteResponse{pid=1, exit_status=2, exited_at=3 (Timestamp{seconds=1, nanos=2})}``."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = field_varint(1, seconds) + field_varint(2, nanos)
    return (field_varint(1, pid) + field_varint(2, exit_status)
            + field_bytes(3, stamp, always=True))


def _mounted(path: str) -> bool:
    """Whether anything is mounted on ``path`` (symlinks resolved)."""
    try:
        return procfs.mounted(os.path.realpath(path))
    except OSError:
        return True  # cannot tell: let unmount_all find out


def _force_delete(argv: list[str], container_id: str) -> None:
    import subprocess

    try:
        done = subprocess.run([*argv, "delete", "--force", container_id], capture_output=True,
                              check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        warn(f"runtime delete {container_id}: {e}")
        return
    if done.returncode != 0:
        warn(f"runtime delete {container_id}: {done.stderr.decode(errors='replace').strip()}")


def _remove_dead_socket(shim_address: str) -> None:
    """Remove the socket of the bundle's ``address`` (read once: :func:`spool.shim_address`)
    if nothing serves it."""
    try:
        path = address.socket_path(shim_address)
    except ValueError:
        return  # no address file (or an empty one): nothing to remove
    if address.is_abstract(path) or not os.path.exists(path):
        return  # an abstract socket vanishes with its shim; a path may be gone already
    from supervisor.launch import sockfile  # _socket: only when there is a file to check

    try:
        sockfile.remove_if_dead(path)  # under start's lock: never a new shim's socket
    except OSError:
        pass  # its directory went away meanwhile


def cleanup(namespace: str, container_id: str, bundle: str,
            shim_address: str | None = None) -> int:
    """Do the cleanup; return the init pid (0 if unknown).  ``shim_address``: the
    bundle's :func:`~supervisor.launch.spool.shim_address`, if the caller read it already."""
    settings = Settings.load(bundle)
    root = runcmd.state_root(settings.root, namespace)
    # runc and crun keep a container's state in <root>/<id>: without it there is nothing
    # to force-delete (the usual case: the shim deleted it before it exited).
    if os.path.exists(os.path.join(root, container_id)):
        _force_delete(runcmd.global_argv(settings.binary_name, root, runcmd.log_path(bundle),
                                         systemd_cgroup=settings.systemd_cgroup),
                      container_id)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted(rootfs):
        from supervisor.launch.unmount import unmount_all

        try:
            unmount_all(rootfs, detach=True)
        except OSError as e:
            warn(f"unmount rootfs of {container_id}: {e}")
    try:
        with open(os.path.join(bundle, "init.pid"), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    _remove_dead_socket(spool.shim_address(bundle) if shim_address is None else shim_address)
    return pid


def last_status(bundle: str, container_id: str, pid: int, shim_address: str | None = None
                ) -> tuple[int, int, int]:
    """(pid, exit status, exit time in ns) to report: the init's ``TaskExit`` from the
    event spool when the dead shim left one there, else 128+SIGKILL now."""
    try:
        found = spool.init_exit(bundle, container_id, pid, known_address=shim_address)
    except Exception as e:  # never fail delete over a damaged spool: report the kill
        warn(f"reading the event spool of {container_id}: {e}")
        found = None
    if found is None:
        return pid, SIGKILL_STATUS, time.time_ns()
    return pid or found.pid, found.status, found.exited_at_ns or time.time_ns()


def action_delete(namespace: str, container_id: str, bundle: str) -> int:
    shim_address = spool.shim_address(bundle)
    pid = cleanup(namespace, container_id, bundle, shim_address)
    sys.stdout.buffer.write(encode_delete_response(
        *last_status(bundle, container_id, pid, shim_address)))
    sys.stdout.buffer.flush()
    return 0
