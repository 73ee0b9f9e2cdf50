"""Starting a child without registering it anywhere (no ``subprocess.Popen``).

Kept apart from :mod:`supervisor.reaper` (and free of trio) so that the shim's
``start`` command, which containerd waits for, imports as little as possible.
Nobody waits for a child started here but the reaper (or, in ``start``, no one:
the daemon outlives it).
"""

from __future__ import annotations

import fcntl
import os

# The builtin module's plain ints: signal wraps them in enums, and importing enum costs
# `start` ~2 ms (functools, collections) for two numbers.
from _signal import SIGPIPE, SIGXFSZ  # type: ignore[import-not-found]

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


def spawn(
    argv: Sequence[str],
    *,
    fds: Mapping[int, int] | None = None,
    env: Mapping[str, str] | None = None,
    setsid: bool = False,
) -> int:
    """Start ``argv`` (``argv[0]`` looked up on PATH) and return its pid.

    ``fds`` maps child fd numbers to our fds (``{0: r, 1: w, 2: w, 3: sock}``);
    child fds not named are ``/dev/null`` for 0-2 and closed above: every fd of
    ours above 2 is made close-on-exec first, so that nothing we inherited
    (``start`` inherits whatever containerd's parent leaked to containerd, e.g.
    a test runner's lock) outlives us in a shim or a fork server.  The child
    gets default dispositions for the signals Python ignores (SIGPIPE, SIGXFSZ)
    and an empty signal mask.  Nobody waits for it but the :class:`Reaper`.
    """
    mapping = dict(fds or {})
    _close_on_exec_all()
    devnull = -1
    if any(n not in mapping for n in (0, 1, 2)):
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        for n in (0, 1, 2):
            mapping.setdefault(n, devnull)
    # Lift every source above every target so one dup2 can never clobber
    # another source; the copies are close-on-exec and dup2 clears that flag on
    # the target only.
    floor = max(mapping) + 1 + 64
    lifted: dict[int, int] = {}
    actions: list[tuple[int, int, int]] = []
    try:
        for target, source in sorted(mapping.items()):
            if source not in lifted:
                lifted[source] = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, floor)
            actions.append((os.POSIX_SPAWN_DUP2, lifted[source], target))
        run = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
        return run(
            argv[0],
            list(argv),
            dict(env) if env is not None else dict(os.environ),
            file_actions=actions,
            setsid=setsid,
            setsigmask=(),
            setsigdef=(SIGPIPE, SIGXFSZ),
        )
    finally:
        for fd in lifted.values():
            os.close(fd)
        if devnull >= 0:
            os.close(devnull)


def _close_on_exec_all() -> None:
    """Mark every open fd above 2 close-on-exec (Python's own already are, PEP 446)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # the listing's own fd, or one closed meanwhile
