"""Rootfs mounts: mount containerd's ``Mount`` list on ``<bundle>/rootfs``, undo it.

Design
------
containerd hands a shim's Create request a list of mounts (``type``, ``source``,
``target``, ``options``): typically one overlay built by the overlayfs
snapshotter, or one bind mount (``options=[rbind, ro]``).  Their ``target`` is
empty; every mount goes on the same directory, in order, each one stacked on
the previous.  Delete (and the ``delete`` action) undoes the stack with
:func:`unmount_all` (from :mod:`supervisor.launch.unmount`, which ``delete``
shares; mount points are read with :mod:`supervisor.launch.procfs`).

Everything here is a thin, synchronous layer over ``mount(2)`` and
``umount2(2)`` called through :mod:`ctypes`; there are no external programs and
no dependencies.  The calls block (``unmount_all`` may sleep up to ~2.5 s on
``EBUSY``), so async callers should run them in a worker thread
(``trio.to_thread.run_sync``).

Options are fstab-style words.  :func:`parse_options` splits them into
``MS_*`` flags (``ro``, ``nosuid``, ``bind``, ``rbind``, ...; the ``rw``/``suid``
style words clear their flag, so order matters and the last word wins),
propagation flags (``shared``/``private``/``slave``/``unbindable``, with an
``r`` prefix adding ``MS_REC``; the last one wins) and everything else, joined
with commas, as the filesystem's data string (``lowerdir=...``, ``size=...``).
``defaults`` is accepted and ignored.

:func:`mount` then makes up to three calls, as the kernel requires:

1. the mount itself, with the non-propagation flags and the data string
   (skipped only for a bare ``remount`` that changes nothing but propagation);
2. if a propagation word was given, a second call that changes only the
   propagation type (the kernel refuses to combine it with anything else);
3. for a bind mount with per-mount flags (``ro``, ``nosuid``, ``nodev``,
   ``noexec``, atime words), a ``MS_REMOUNT|MS_BIND`` call, because the kernel
   ignores those flags on the initial bind.  containerd does this only for
   ``ro``; we do it for every per-mount flag and, as runc does, keep the
   ``ro``/``nosuid``/``nodev``/``noexec`` bits the new bind inherited from its
   source, so a remount can never make a bind *less* restricted than its
   source.  ``MS_REC`` is meaningless to a remount: with ``rbind,ro`` only the
   top mount becomes read-only, its submounts keep their own flags (as in
   containerd).

If step 2 or 3 fails, the mount made in step 1 is detached before the error
is raised, so :func:`mount` either stacks exactly one mount on the target or
none.

Long overlay data strings: the kernel copies at most one page of mount data.
When an overlay's data string would not fit, :func:`mount` does what
containerd does: :func:`compact_lowerdir` rewrites the ``lowerdir`` paths
relative to their common parent directory, and the mount is made from a
short-lived thread that first detaches its working directory from the rest
of the process (``unshare(CLONE_FS)``) and ``chdir``\\s there, so the kernel
resolves the relative paths against it while the rest of the process keeps
its working directory.  (containerd forks instead; the shim's reaper must be
the only waiter for children, so a thread is the safe equivalent here.)  If
the data string still does not fit, :func:`mount` raises ``OSError(E2BIG)``
and mounts nothing.

Unsupported on purpose (clear ``OSError(EOPNOTSUPP)``): the ``loop`` option
and ``fuse.*``/``fuse3.*`` helper mounts; mounts with a non-empty ``target``
(sub-mounts inside the rootfs) in :func:`mount_all`.

Invariants
----------
* Every error is an :class:`OSError` with the kernel's errno, a message naming
  the step, the filesystem type and the source, and ``filename`` set to the
  mount target (so ``str(err)`` names the target too).
* :func:`mount` stacks exactly one mount on the target, or none on error;
  :func:`mount_all` stacks ``len(specs)`` mounts, or none on error.
* :func:`unmount_all` leaves nothing mounted on the target; a target that is
  empty, missing, a symlink (``UMOUNT_NOFOLLOW``) or not a mount point is a
  no-op.  Without ``detach`` a mount with submounts (e.g. an ``rbind`` of a
  tree with mounts) stays ``EBUSY``; submounts are never unmounted one by one,
  because with shared propagation that would unmount the source's submounts
  on the host too.  Use ``detach=True`` (``MNT_DETACH``) for such stacks.
* No module state: the option tables are read-only mappings and libc is
  looked up per call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from supervisor.launch import procfs
from supervisor.launch.unmount import MNT_DETACH, UMOUNT_NOFOLLOW, sys_umount, unmount_all

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_MANDLOCK",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SLAVE",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "MS_UNBINDABLE",
    "MountSpec",
    "compact_lowerdir",
    "is_mountpoint",
    "mount",
    "mount_all",
    "parse_options",
    "unmount_all",
]

# mount(2) flags, from <linux/mount.h>.
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_SYNCHRONOUS: Final = 16
MS_REMOUNT: Final = 32
MS_MANDLOCK: Final = 64
MS_DIRSYNC: Final = 128
MS_NOATIME: Final = 1024
MS_NODIRATIME: Final = 2048
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_UNBINDABLE: Final = 1 << 17
MS_PRIVATE: Final = 1 << 18
MS_SLAVE: Final = 1 << 19
MS_SHARED: Final = 1 << 20
MS_RELATIME: Final = 1 << 21
MS_STRICTATIME: Final = 1 << 24

# unshare(2): give the calling thread its own cwd/root/umask.
_CLONE_FS: Final = 0x200

_PROPAGATION_TYPES: Final = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# Flags a MS_REMOUNT|MS_BIND call can change on a bind mount.
_PER_MOUNT_FLAGS: Final = (
    MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME
    | MS_RELATIME | MS_STRICTATIME
)

# statvfs f_flag bits that mean the same as the MS_* bits of the same value
# (ST_RDONLY, ST_NOSUID, ST_NODEV, ST_NOEXEC); kept on a bind remount.
_INHERITED_ST_FLAGS: Final = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC

# word -> (clear?, flag).  A "clear" word removes its flag, others add it.
_FLAG_OPTIONS: Final[Mapping[str, tuple[bool, int]]] = MappingProxyType({
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
})

_PROPAGATION_OPTIONS: Final[Mapping[str, int]] = MappingProxyType({
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
})

_IGNORED_OPTIONS: Final = frozenset({"defaults"})

_LOWERDIR: Final = "lowerdir="


@dataclass(frozen=True, slots=True)
class MountSpec:
    """One mount as containerd describes it (``containerd.types.Mount``)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


def parse_options(options: Sequence[str]) -> tuple[int, int, str]:
    """Split fstab-style words into ``(flags, propagation_flags, data)``.

    ``flags`` holds every non-propagation ``MS_*`` bit (``rbind`` gives
    ``MS_BIND|MS_REC``); ``propagation_flags`` is one of ``MS_SHARED``,
    ``MS_PRIVATE``, ``MS_SLAVE``, ``MS_UNBINDABLE``, possibly with ``MS_REC``,
    or 0; ``data`` is the remaining words joined by commas, in order.
    """
    flags = 0
    propagation = 0
    data: list[str] = []
    for word in options:
        if word in _FLAG_OPTIONS:
            clear, bit = _FLAG_OPTIONS[word]
            flags = flags & ~bit if clear else flags | bit
        elif word in _PROPAGATION_OPTIONS:
            propagation = _PROPAGATION_OPTIONS[word]
        elif word in _IGNORED_OPTIONS:
            continue
        else:
            data.append(word)
    return flags, propagation, ",".join(data)


def compact_lowerdir(options: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """Rewrite an overlay's ``lowerdir`` relative to the layers' common parent.

    Returns ``(directory, new_options)``: mounting ``new_options`` with
    ``directory`` as working directory is the same as mounting ``options``.
    Returns ``("", tuple(options))`` when there is nothing to gain or it would
    be unsafe: no ``lowerdir`` or only one layer, a relative or escaped
    (backslash) path, a relative ``upperdir``/``workdir``, or no common
    parent but ``/``.  Empty entries (``::``, data-only layers) are kept.
    """
    unchanged = ("", tuple(options))
    index = next((i for i, o in enumerate(options) if o.startswith(_LOWERDIR)), -1)
    if index < 0:
        return unchanged
    for opt in options:
        key, _, value = opt.partition("=")
        if key in ("upperdir", "workdir") and not os.path.isabs(value):
            return unchanged
    value = options[index][len(_LOWERDIR):]
    if "\\" in value:
        return unchanged
    entries = value.split(":")
    dirs = [d for d in entries if d]
    if len(dirs) < 2 or not all(os.path.isabs(d) for d in dirs):
        return unchanged
    common = os.path.commonpath([os.path.normpath(d) for d in dirs])
    if common in (os.path.normpath(d) for d in dirs):
        # Keep every layer a real relative path rather than ".".
        common = os.path.dirname(common)
    if common == "/":
        return unchanged
    relative = [os.path.relpath(d, common) if d else "" for d in entries]
    new = list(options)
    new[index] = _LOWERDIR + ":".join(relative)
    return common, tuple(new)


def mount(spec: MountSpec, target: str) -> None:
    """Mount ``spec`` on ``target`` (stacking it on whatever is there).

    Raises :class:`OSError` (errno from the kernel, ``filename=target``) and
    leaves nothing of this mount behind on failure.
    """
    options: tuple[str, ...] = tuple(spec.options)
    if "loop" in options:
        raise _error(errno.EOPNOTSUPP, "mount: the loop option is not supported", spec, target)
    if spec.type.startswith(("fuse.", "fuse3.")):
        raise _error(errno.EOPNOTSUPP, "mount: FUSE helper mounts are not supported",
                     spec, target)

    chdir = ""
    flags, propagation, data = parse_options(options)
    page = os.sysconf("SC_PAGE_SIZE")
    if spec.type == "overlay" and len(os.fsencode(data)) >= page:
        chdir, options = compact_lowerdir(options)
        flags, propagation, data = parse_options(options)
    size = len(os.fsencode(data))
    if size >= page:
        raise _error(errno.E2BIG, f"mount: data string is {size} bytes, more than the"
                     f" {page - 1} the kernel accepts", spec, target)

    plain = flags & ~_PROPAGATION_TYPES
    if chdir:
        target = os.path.abspath(target)
    if not (plain == MS_REMOUNT and not data):
        if chdir:
            err = _mount_from(chdir, target, source=spec.source, fstype=spec.type,
                              flags=plain, data=data)
        else:
            err = _sys_mount(spec.source, target, spec.type, plain, data)
        if err:
            raise _error(err, "mount", spec, target)
    try:
        _after_mount(spec, target, plain, propagation)
    except BaseException:
        if not plain & MS_REMOUNT:
            # Undo the mount we just made; the original error matters more
            # than a failure to clean up, which would only hide it.
            sys_umount(target, MNT_DETACH | UMOUNT_NOFOLLOW)
        raise


def mount_all(specs: Sequence[MountSpec], target: str) -> None:
    """Mount ``specs`` on ``target`` in order; on failure undo them, then raise."""
    for spec in specs:
        if spec.target:
            raise _error(errno.EOPNOTSUPP, "mount: a mount with its own target inside"
                         f" the rootfs ({spec.target!r}) is not supported", spec, target)
    done = 0
    try:
        for spec in specs:
            mount(spec, target)
            done += 1
    except BaseException:
        # Each successful mount() stacked exactly one mount: detach as many.
        for _ in range(done):
            sys_umount(target, MNT_DETACH | UMOUNT_NOFOLLOW)
        raise


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point in this namespace."""
    return os.path.exists(path) and procfs.mounted(os.path.realpath(path))


# --- internals --------------------------------------------------------------


def _after_mount(spec: MountSpec, target: str, plain: int, propagation: int) -> None:
    """Steps 2 and 3 of :func:`mount`: propagation, then the bind remount."""
    if propagation:
        err = _sys_mount("", target, "", propagation, "")
        if err:
            raise _error(err, "mount: setting propagation", spec, target)
    if plain & MS_BIND and plain & _PER_MOUNT_FLAGS:
        inherited = os.statvfs(target).f_flag & _INHERITED_ST_FLAGS
        remount = MS_REMOUNT | MS_BIND | (plain & _PER_MOUNT_FLAGS) | inherited
        err = _sys_mount("", target, "", remount, "")
        if err:
            raise _error(err, "mount: remounting the bind mount", spec, target)


def _error(err: int, step: str, spec: MountSpec, target: str) -> OSError:
    options = ",".join(spec.options)
    if len(options) > 300:
        options = options[:300] + "..."
    return OSError(err, f"{step} (type {spec.type!r}, source {spec.source!r},"
                   f" options {options!r}) failed: {os.strerror(err)}", target)


def _cstr(value: str) -> bytes | None:
    return os.fsencode(value) if value else None


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> int:
    """mount(2); returns 0 or the errno."""
    fn = ctypes.CDLL(None, use_errno=True).mount
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
    fn.restype = ctypes.c_int
    if fn(_cstr(source), os.fsencode(target), _cstr(fstype), flags, _cstr(data)) != 0:
        return ctypes.get_errno()
    return 0


def _mount_from(directory: str, target: str, *, source: str, fstype: str, flags: int,
                data: str) -> int:
    """mount(2) with ``directory`` as working directory, without moving ours.

    Runs in a fresh thread that unshares its filesystem attributes first, so
    its ``chdir`` is invisible to every other thread; the thread (and its
    private cwd) ends with the call.  Returns 0 or the errno.
    """
    result: list[int] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_FS) != 0:
            result.append(ctypes.get_errno())
            return
        try:
            os.chdir(directory)
        except OSError as e:
            result.append(e.errno or errno.EIO)
            return
        result.append(_sys_mount(source, target, fstype, flags, data))

    thread = threading.Thread(target=run, name="supervisor-mount", daemon=True)
    thread.start()
    thread.join()
    return result[0] if result else errno.EIO
