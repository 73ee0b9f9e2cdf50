"""A shim socket's file: claimed atomically, replaced only when dead, removed only while ours.

Design
------
``start`` claims a socket path by binding a socket at a private name beside
it (:func:`claim_name`), making it 0600 and listening on it, and only then
hard-linking the private name to the path.  ``link(2)`` fails with EEXIST when
the path exists, so a claim either publishes a socket that already accepts
connections or fails with EADDRINUSE, as ``bind`` would; nobody ever finds the
path bound but not yet listening, which another ``start`` would take for a
dead shim's socket and replace (issue 15).  The private name is unlinked at
once; the socket keeps reporting it (``getsockname``), and
:func:`published_path` maps it back to the path, for the daemon.
The fork server (:func:`supervisor.forkserver.bind`) claims and replaces its
``SOCK_SEQPACKET`` socket with the same functions (``kind``): one way to
claim a socket.

Invariants
----------
* A path under claim names a socket that listens, or one whose listener is
  closed for good (a dead shim's).  Only the latter is replaced or removed
  by others (:func:`replace_stale`, :func:`remove_if_dead`), only when a
  connect is refused (a timeout is a busy shim, not a dead one), and only
  under the directory's lock, the one lock every change of a published path
  but the claim itself takes (a claim cannot replace anything).
* Its owner removes a path only while it is still the inode it published
  (:func:`remove_own`, compared under the same lock, the inode held open by
  :func:`pin` so that its number cannot be reused): nobody removes a
  successor's socket.
* Abstract sockets have no file: binding one is already atomic, and the name
  vanishes with its last fd; they are bound directly.

Light (``start`` and ``delete`` use it): the standard library only.
"""

from __future__ import annotations

import _socket
import errno
import os

from supervisor.launch.address import is_abstract

#: Between a path and the random tail of its private claim name.
CLAIM_MARK = ".claim-"
_TAIL = 12  # hex digits: a /run/containerd/s/<64 hex> claim name stays under 108 bytes
BACKLOG = 128
#: sizeof(sun_path) less its NUL: the longest path a unix socket binds to.
MAX_PATH = 107
PROBE_TIMEOUT = 0.5


def claim_name(path: str) -> str:
    """A fresh private name beside ``path`` for claiming it."""
    return f"{path}{CLAIM_MARK}{os.urandom(_TAIL // 2).hex()}"


def published_path(name: str) -> str:
    """The path a socket bound at ``name`` (its ``getsockname()``) is published under."""
    head, mark, tail = name.rpartition(CLAIM_MARK)
    if mark and "/" not in tail and len(tail) == _TAIL and not is_abstract(name):
        return head
    return name


def listen(path: str, kind: int = _socket.SOCK_STREAM) -> _socket.socket:
    """A listening unix socket of ``kind`` published at ``path`` (0600), or EADDRINUSE.

    The claim is atomic: ``path`` appears only once the socket listens.  (Stream
    for shims; the fork server's is ``SOCK_SEQPACKET``.)
    """
    if not is_abstract(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    s = _socket.socket(_socket.AF_UNIX, kind)
    try:
        if is_abstract(path):
            s.bind(path)
            s.listen(BACKLOG)
            return s
        private = claim_name(path)
        if len(os.fsencode(private)) > MAX_PATH:
            limit = MAX_PATH - len(CLAIM_MARK) - _TAIL
            raise OSError(errno.ENAMETOOLONG, f"socket path {path!r} is longer than the "
                          f"{limit} bytes a shim socket may have (choose a shorter socket "
                          "directory)")
        s.bind(private)
        try:
            os.chmod(private, 0o600)
            s.listen(BACKLOG)
            try:
                os.link(private, path)  # the commit point
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path) from None
        finally:
            try:  # never hide the error in flight
                os.unlink(private)
            except FileNotFoundError:
                pass
    except BaseException:
        s.close()
        raise
    return s


def is_dead(path: str, kind: int = _socket.SOCK_STREAM) -> bool:
    """Whether ``path`` names a socket nothing listens on (refused; a timeout is not).

    Probed with a socket of ``kind``: a listener of another kind answers
    EPROTOTYPE, which is not "dead" either.
    """
    s = _socket.socket(_socket.AF_UNIX, kind)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # gone already, busy, or not ours to judge
    finally:
        s.close()
    return False


def lock(path: str) -> int:
    """Take the exclusive lock of ``path``'s directory; close the returned fd to release it."""
    import fcntl

    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_stale(path: str, kind: int = _socket.SOCK_STREAM) -> _socket.socket | None:
    """A new listener on ``path`` if nothing listens there (None if something does now).

    Under the directory's lock, so two ``start`` runs that both found the
    socket dead cannot each replace the other's.
    """
    fd = lock(path)
    try:
        if os.path.lexists(path):
            if not is_dead(path, kind):
                return None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # its shim removed it meanwhile
        try:
            return listen(path, kind)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return None  # a start that needed no lock claimed it first
            raise
    finally:
        os.close(fd)


def remove_if_dead(path: str) -> bool:
    """Remove ``path`` if nothing listens on it (under the lock); whether it did."""
    fd = lock(path)
    try:
        if not is_dead(path):
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def pin(path: str) -> int | None:
    """An ``O_PATH`` fd of the file at ``path`` (None if there is none), for :func:`remove_own`.

    While it is open the inode cannot be freed, so its number cannot be given
    to a successor's socket (ext4 reuses a freed inode number at once).
    """
    try:
        return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def remove_own(path: str, pinned: int) -> bool:
    """Remove ``path`` if it is still the file ``pinned`` (:func:`pin`) holds; whether it did.

    Compared and removed under the directory's lock.  ``pinned`` stays open.
    """
    try:
        fd = lock(path)
    except OSError:
        return False  # the directory is gone, and the path with it
    try:
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return False
        own = os.fstat(pinned)
        if (now.st_dev, now.st_ino) != (own.st_dev, own.st_ino):
            return False  # a successor's socket now
        os.unlink(path)
        return True
    finally:
        os.close(fd)
