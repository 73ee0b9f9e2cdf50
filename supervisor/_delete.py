"""The ``delete`` action: clean up after a shim that is gone, answer containerd, exit fast.

containerd runs ``SHIM ... -id ID -bundle DIR delete`` on its critical path
after every task whose shim disconnected (and after a shim was killed).  It
needs no daemon and no containerd: it force-deletes the runtime's container,
unmounts the rootfs, removes a socket nobody serves, and writes a protobuf
``DeleteResponse`` (init pid, status 128+SIGKILL, now) on stdout.

Kept light on purpose (it runs once per task, and containerd waits for it):
no trio, no protobuf runtime -- the three fields of ``DeleteResponse`` are
encoded by hand (field numbers from containerd's ``runtime/v2/task/shim.proto``;
``tests/unit/test_delete.py`` checks the bytes against the generated class) --
no logging package (warnings go to stderr, which containerd logs), and the
runtime, mount and socket modules are imported only when there is work for
them (usually there is none: the shim cleaned up before it exited).
"""

from __future__ import annotations

import os
import sys
import time

from supervisor._pbwire import field_bytes, field_varint
from supervisor.defaults import DEFAULT_BINARY, DEFAULT_ROOT, SETTINGS_FILE


def warn(message: str) -> None:
    sys.stderr.write(f"containerd-shim-supervisor-v2 delete: {message}\n")

SIGKILL_STATUS = 128 + 9


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """``DeleteResponse{pid=1, exit_status=2, exited_at=3 (Timestamp{seconds=1, nanos=2})}``."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = field_varint(1, seconds) + field_varint(2, nanos)
    return (field_varint(1, pid) + field_varint(2, exit_status)
            + field_bytes(3, stamp, always=True))


def _mounted(path: str) -> bool:
    """Whether anything is mounted on ``path`` (mountinfo escapes spaces as \\040)."""
    target = os.path.realpath(path).replace(" ", "\\040")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(line.split(" ", 5)[4] == target for line in f if line.count(" ") > 4)
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


class _ScanContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``, plain defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def parse_json(text: str) -> object:
    """``json.loads`` through the C scanner alone: importing :mod:`json` (``re``, ``enum``)
    would cost ``delete`` ~6 ms on every task, for one small file of our own."""
    try:
        import _json
        scanner = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other Pythons
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip())
    try:
        value, end = scanner(text, start)
    except StopIteration:
        raise ValueError("not JSON") from None
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value


def cleanup(namespace: str, container_id: str, bundle: str) -> int:
    """Do the cleanup; return the init pid (0 if unknown)."""
    try:
        with open(os.path.join(bundle, SETTINGS_FILE), encoding="utf-8") as f:
            settings = parse_json(f.read())
        if not isinstance(settings, dict):
            settings = {}
    except (OSError, ValueError):
        settings = {}
    root = os.path.join(settings.get("root") or DEFAULT_ROOT, namespace)
    argv = [settings.get("binary_name") or DEFAULT_BINARY, "--root", root,
            "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
    if settings.get("systemd_cgroup"):
        argv.append("--systemd-cgroup")
    # runc and crun keep a container's state in <root>/<id>: without it there is nothing
    # to force-delete (the usual case: the shim deleted it before it exited).
    if os.path.exists(os.path.join(root, container_id)):
        _force_delete(argv, container_id)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted(rootfs):
        from supervisor import mount

        try:
            mount.unmount_all(rootfs, detach=True)
        except OSError as e:
            warn(f"unmount rootfs of {container_id}: {e}")
    try:
        with open(os.path.join(bundle, "init.pid"), encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as f:
            address = f.read().strip()
        path = address.removeprefix("unix://")
        if address.startswith("unix://") and os.path.exists(path):
            from supervisor.shim import can_connect

            if not can_connect(path):
                os.unlink(path)
    except OSError:
        pass  # no address file, or the socket went away already: nothing to remove
    return pid


def action_delete(namespace: str, container_id: str, bundle: str) -> int:
    pid = cleanup(namespace, container_id, bundle)
    sys.stdout.buffer.write(encode_delete_response(pid, SIGKILL_STATUS, time.time_ns()))
    sys.stdout.buffer.flush()
    return 0
