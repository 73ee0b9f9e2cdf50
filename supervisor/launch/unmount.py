"""Unmounting a rootfs stack: ``umount2(2)`` through :mod:`ctypes`, for the daemon and ``delete``.

The daemon's :mod:`supervisor.mount` re-exports :func:`unmount_all` (its
Invariants describe it); ``delete`` imports this module only when something is
still mounted on the rootfs (rarely: the shim unmounts before it exits).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

# umount2(2) flags, from <linux/mount.h>.
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# containerd's UnmountAll retries EBUSY 50 times, 50 ms apart.
_EBUSY_RETRIES = 50
_EBUSY_DELAY = 0.05
# A guard against looping forever should umount2 keep succeeding.
_MAX_STACKED = 10_000


def unmount_all(target: str, *, detach: bool = False) -> None:
    """Unmount every mount stacked on ``target`` until none is left.

    An empty, missing, symlinked or unmounted target is a no-op.  ``EBUSY`` is
    retried for about 2.5 s, then raised; ``detach=True`` uses ``MNT_DETACH``
    (lazy unmount, which also takes submounts with it).
    """
    if not target or not os.path.lexists(target):
        return
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    for _ in range(_MAX_STACKED):
        err = _umount_retrying(target, flags)
        if err in (errno.EINVAL, errno.ENOENT):
            return  # EINVAL: not a mount point (any more); ENOENT: gone.
        if err:
            raise OSError(err, f"unmount: {os.strerror(err)}", target)
    raise OSError(errno.ELOOP, f"unmount: still mounted after {_MAX_STACKED} unmounts",
                  target)


def sys_umount(target: str, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    fn = ctypes.CDLL(None, use_errno=True).umount2
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    if fn(os.fsencode(target), flags) != 0:
        return ctypes.get_errno()
    return 0


def _umount_retrying(target: str, flags: int) -> int:
    """umount2(2), retrying EBUSY like containerd; returns 0 or the errno."""
    err = 0
    for attempt in range(_EBUSY_RETRIES):
        err = sys_umount(target, flags)
        if err != errno.EBUSY:
            return err
        if attempt + 1 < _EBUSY_RETRIES:
            time.sleep(_EBUSY_DELAY)
    return err
