"""The event spool's file format, and what ``delete`` reads from a dead shim's spool.

The daemon's :class:`supervisor.events.Spool` writes and replays the file
(its docstring is the format's full description); this module holds the
facts both sides need, once: where the file is (:func:`spool_path`), the
frame (:func:`frame`, :func:`frames`) and the record kinds.  A frame is a
4-byte magic, the body's length and the CRC-32 of length and body (both
big-endian uint32), then the body, a msgpack array: ``[ADD, seq,
timestamp_ns, namespace, topic, type_url, payload]`` or ``[ACK, seq]``.

``delete`` after a shim was killed (:func:`init_exit`): the spool keeps
every event until containerd accepted it, so when the shim died with the
init's ``TaskExit`` undelivered (containerd was down, or restarting, when
the container exited), the file still holds the container's real exit
status and time.  ``delete`` reads them here instead of answering 128+SIGKILL.
An acknowledged exit may be there too (the file is truncated only when
nothing is pending); it is just as true.  A shim serving several containers
keeps one spool, in the bundle of one of them, so the bundles beside this one
that name the same shim ``address`` are read too.  The previous release's
unframed format is not read here (the daemon still replays it).

Standard library only (:mod:`supervisor.launch`'s rule): records are decoded
with :mod:`~supervisor.launch._msgpack` and the ``TaskExit`` payload with
:mod:`~supervisor.launch._pbwire` (``containerd.events.TaskExit{container_id=1,
id=2, pid=3, exit_status=4, exited_at=5 (Timestamp{seconds=1, nanos=2})}``).
Nothing here raises for a damaged file: a record that does not verify or
decode is passed over, as the daemon's loader does.
"""

from __future__ import annotations

import os
import struct
import zlib

from supervisor.launch import _msgpack
from supervisor.launch._pbwire import WireError, fields

TYPE_CHECKING = False  # not typing's: importing typing costs ~2 ms
if TYPE_CHECKING:
    from collections.abc import Iterator

#: The spool's file name, in the bundle's work directory (:func:`work_dir`).
SPOOL_FILE = "supervisor-events.spool"
#: Record kinds: an event published, an event containerd accepted.
ADD, ACK = 1, 2
#: A frame's magic.  0xC1 is the one byte msgpack never uses and never starts
#: a UTF-8 character, so the magic is unlikely inside a record; the checksum decides anyway.
MAGIC = b"\xc1SV\x02"
#: magic, body length, CRC-32 of (length bytes + body).
HEAD = struct.Struct(">4sII")

EXIT_TOPIC = "/tasks/exit"
EXIT_TYPE = "containerd.events.TaskExit"


def work_dir(bundle: str) -> str:
    """containerd's persistent work directory for the bundle (the ``work`` link it
    makes), or the bundle itself where there is none."""
    work = os.path.join(bundle, "work")
    return work if os.path.isdir(work) else bundle


def spool_path(bundle: str) -> str:
    """The event spool: in the bundle's work directory when containerd made one."""
    return os.path.join(work_dir(bundle), SPOOL_FILE)


def frame(body: bytes) -> bytes:
    """``body`` (a msgpack record) framed: magic, length, checksum, body."""
    length = len(body).to_bytes(4, "big")
    return HEAD.pack(MAGIC, len(body), zlib.crc32(body, zlib.crc32(length))) + body


def frames(data: bytes) -> Iterator[tuple[int, bytes | None, str]]:
    """``(offset, body, "")`` per verified frame, ``(offset, None, why)`` per damaged stretch.

    A stretch is everything from the first byte that does not start a verified
    frame to the next magic that does; the scan resumes at the next magic
    after a failed one, never at the end a damaged length points to, so no
    damage can hide a later intact record.
    """
    view = memoryview(data)
    n = len(data)
    i = 0
    bad_at, why = -1, ""
    while i < n:
        if not data.startswith(MAGIC, i):
            failure = "no record starts here"
        elif i + HEAD.size > n:
            failure = "a torn record header (the writer died mid-write?)"
        else:
            _, length, crc = HEAD.unpack_from(data, i)
            end = i + HEAD.size + length
            if end > n:
                failure = (f"a {length}-byte record runs past the end of the file "
                           "(torn by a writer that died mid-write, or a damaged length)")
            elif zlib.crc32(view[i + HEAD.size:end], zlib.crc32(view[i + 4:i + 8])) != crc:
                failure = "checksum mismatch"
            else:
                if bad_at >= 0:
                    yield bad_at, None, f"{i - bad_at} damaged bytes: {why}"
                    bad_at = -1
                yield i, bytes(view[i + HEAD.size:end]), ""
                i = end
                continue
        if bad_at < 0:
            bad_at, why = i, failure
        i = data.find(MAGIC, i + 1)
        if i < 0:
            i = n
    if bad_at >= 0:
        yield bad_at, None, f"{n - bad_at} damaged bytes: {why}"


class Exit:
    """An init's exit as its ``TaskExit`` told it."""

    __slots__ = ("exited_at_ns", "pid", "status")

    def __init__(self, pid: int, status: int, exited_at_ns: int) -> None:
        self.pid = pid
        self.status = status
        self.exited_at_ns = exited_at_ns

    def __repr__(self) -> str:
        return f"Exit(pid={self.pid}, status={self.status}, exited_at_ns={self.exited_at_ns})"


def _task_exit(payload: bytes, container_id: str) -> Exit | None:
    """The exit a ``TaskExit`` payload reports if it is ``container_id``'s init's."""
    cid = eid = b""
    pid = status = seconds = nanos = 0
    for number, value in fields(payload):
        if number == 1 and isinstance(value, bytes):
            cid = value
        elif number == 2 and isinstance(value, bytes):
            eid = value
        elif number == 3 and isinstance(value, int):
            pid = value
        elif number == 4 and isinstance(value, int):
            status = value & 0xFFFFFFFF
        elif number == 5 and isinstance(value, bytes):
            for inner, v in fields(value):
                if inner == 1 and isinstance(v, int):
                    seconds = v
                elif inner == 2 and isinstance(v, int):
                    nanos = v
    want = container_id.encode()
    if cid != want or eid != want:  # an exec's exit, or another container's
        return None
    return Exit(pid, status, seconds * 1_000_000_000 + nanos)


def exit_in(path: str, container_id: str, pid: int = 0) -> Exit | None:
    """The last init ``TaskExit`` of ``container_id`` the spool at ``path`` holds, if any;
    with ``pid`` (the bundle's ``init.pid``), only one of that pid: a record of an earlier
    container that had the same id (a shared shim's spool keeps acknowledged records) is
    not this one's exit."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = None
    for _, body, _why in frames(data):
        if body is None:
            continue
        try:
            record = _msgpack.unpackb(body)
        except ValueError:
            continue
        if (isinstance(record, list) and len(record) == 7 and record[0] == ADD
                and record[4] == EXIT_TOPIC and isinstance(record[5], str)
                and record[5].rsplit("/", 1)[-1] == EXIT_TYPE
                and isinstance(record[6], bytes)):
            try:
                candidate = _task_exit(record[6], container_id)
            except WireError:
                continue
            if candidate is not None and (not pid or candidate.pid in (0, pid)):
                found = candidate
    return found


def shim_address(bundle: str) -> str:
    """The bundle's ``address`` file, stripped; "" if there is none (or it is not UTF-8)."""
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def init_exit(bundle: str, container_id: str, pid: int = 0, *,
              known_address: str | None = None) -> Exit | None:
    """The init's exit from the spool of the shim that served ``container_id``, if it holds one.

    The bundle's own spool first; then (a shared shim's spool moves to a
    bundle that remains) those of the bundles beside it whose ``address``
    names the same shim.  ``known_address``: the bundle's :func:`shim_address`, if the
    caller read it already.
    """
    found = exit_in(spool_path(bundle), container_id, pid)
    if found is not None:
        return found
    address = shim_address(bundle) if known_address is None else known_address
    if not address:
        return None
    parent = os.path.dirname(os.path.abspath(bundle))
    try:
        siblings = sorted(os.listdir(parent))
    except OSError:
        return None
    for name in siblings:
        other = os.path.join(parent, name)
        if other != os.path.abspath(bundle) and shim_address(other) == address:
            found = exit_in(spool_path(other), container_id, pid)
            if found is not None:
                return found
    return None
