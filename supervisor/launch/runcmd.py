"""The OCI runtime's command line: its global flags, built once for the daemon and ``delete``.

runc and crun take the same global flags::

    <binary> --root <root>/<namespace> --log <bundle>/log.json --log-format json
             [--debug] [--systemd-cgroup] <command> ...

The state root gets the namespace appended, as containerd's runc shim does, so
one root serves every namespace; a container's state is ``<state root>/<id>``.
"""

from __future__ import annotations

import os

from supervisor.launch.defaults import DEFAULT_BINARY, DEFAULT_ROOT

LOG_FILE = "log.json"


def state_root(root: str, namespace: str) -> str:
    """The runtime's ``--root`` for ``namespace`` (``root`` empty: the default)."""
    return os.path.join(root or DEFAULT_ROOT, namespace)


def log_path(bundle: str) -> str:
    """Where the runtime logs (JSON lines) for the container of ``bundle``."""
    return os.path.join(bundle, LOG_FILE)


def global_argv(binary: str, state: str, log: str, *, systemd_cgroup: bool = False,
                debug: bool = False) -> list[str]:
    """``binary`` (empty: the default) and its global flags, before the command."""
    argv = [binary or DEFAULT_BINARY, "--root", state, "--log", log, "--log-format", "json"]
    if debug:
        argv.append("--debug")
    if systemd_cgroup:
        argv.append("--systemd-cgroup")
    return argv
