"""``containerd-shim-supervisor-v2``: the binary containerd runs, dispatching its three actions.

containerd 1.6 runs the shim binary three ways (:mod:`supervisor.launch.flags`),
always with the bundle as working directory and ``TTRPC_ADDRESS`` in the
environment; containerd 2.x adds ``-info``.  This module only parses the
command line and dispatches:

``-info``
    :mod:`supervisor.launch.info`: prints a protobuf ``RuntimeInfo`` (name,
    version, the options echoed, the OCI runtime's features) and exits.

``start``
    :mod:`supervisor.launch.start`: joins a live shim of the container's group
    or starts one (forked by the fork server, or cold) and prints its address.
    Runtime options on stdin (bare, or in containerd 2.3's ``BootstrapParams``:
    :mod:`supervisor.launch.bootstrap`) are decoded by hand, without protobuf
    (:mod:`supervisor.launch.runopts`), imported only when containerd sent some.

``delete``
    :mod:`supervisor.launch.delete`: cleans up after a shim that is gone and
    prints a protobuf ``DeleteResponse``; it needs neither the daemon nor
    containerd's ttrpc server.

the daemon
    :func:`supervisor.daemon.action_serve`: becomes the child subreaper, serves
    the Task service on fd 3, forwards events to ``TTRPC_ADDRESS`` and logs to
    the ``log`` FIFO in the bundle (moving to another container's when a
    shared shim's first bundle goes).  It exits once ``Shutdown`` finds no
    container left and none reserved, after its events are delivered.

Light on purpose: ``start``, ``delete`` and ``-info`` load only :mod:`supervisor.launch`
(standard library alone; ``tests/unit/test_layering.py`` checks it); the
daemon side is imported only for the daemon.  The entry script ``make venv``
writes (:mod:`supervisor.launch.launcher`) runs this module as ``python -IS``,
without ``site``: ``start``, ``delete`` and ``-info`` never need site-packages
(nor protobuf, even for runtime options), so the script may run them in a
faster-starting interpreter than the venv's (its *light* one).  It names the
venv's as ``main``'s ``python``: the daemon side's interpreter, which ``start``
spawns daemons and fork servers with and computes the code identity of; any
action beyond the light ones runs there (re-executed if need be), after
:func:`~supervisor.launch.launcher.full_site`.
"""

from __future__ import annotations

import os
import sys

from supervisor import __version__
from supervisor.launch.flags import EXIT_USAGE, UsageError, parse_flags
from supervisor.launch.launcher import NAME, full_site

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from typing import NoReturn

    from supervisor.launch.settings import Settings

#: What ``-version`` and ``-info`` name as the revision (there is no build commit).
REVISION = "python"


def decode_options(data: bytes) -> Settings:
    """``start``'s and ``-info``'s runtime options (a serialized ``Any``) -> settings, by the
    light hand decoder (no protobuf, no site-packages)."""
    from supervisor.launch.runopts import decode_bytes

    return decode_bytes(data)


def exit_now(rc: int) -> NoReturn:
    """End ``start`` or ``delete`` with ``rc`` at once: containerd waits for the exit, and
    the interpreter's teardown (freeing every module) costs ~1.5 ms of it.  Only stdio
    needs flushing: the actions close their own files."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def in_daemon_python(python: str, args: list[str]) -> None:
    """Go on in the daemon's interpreter ``python``: re-execute the entry script there
    (with ``args``) unless this is it."""
    if os.path.abspath(sys.executable) != os.path.abspath(python):
        script = os.path.abspath(sys.argv[0])
        os.execv(python, [python, script, *args])


def main(argv: list[str] | None = None, *, python: str | None = None) -> int:
    """The binary's entry point; ``python``: the daemon side's interpreter (default: this
    one), which the entry script names when it runs the light actions in another."""
    args = sys.argv[1:] if argv is None else argv
    python = python or sys.executable
    try:
        flags = parse_flags(args)
    except UsageError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if flags.version:
        print(f"{NAME}:\n  Version: {__version__}\n  Revision: {REVISION}")
        return 0
    if flags.info:  # containerd 2.x, before namespace and id (it passes neither)
        from supervisor.launch.info import action_info

        return action_info(decode_options, version=__version__, revision=REVISION)
    if flags.action in ("start", "delete") and not (flags.namespace and flags.id):
        print(f"{NAME}: -namespace and -id are required", file=sys.stderr)
        return EXIT_USAGE
    try:
        if flags.action == "start":
            from supervisor.launch.start import action_start

            exit_now(action_start(flags, decode_options, python))
        if flags.action == "delete":
            from supervisor.launch.delete import action_delete

            exit_now(action_delete(flags.namespace, flags.id, flags.bundle or os.getcwd()))
        if flags.action == "":
            in_daemon_python(python, args)
            full_site()
            from supervisor.daemon import action_serve

            return action_serve(flags)
    except Exception as e:
        print(f"{NAME} {flags.action}: {e}", file=sys.stderr)
        return 1
    print(f"{NAME}: unknown action {flags.action!r}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
