"""The state a shim hands to its new code at an in-place upgrade: format, dump, load.

Design
------
An upgrade (:mod:`supervisor.upgrade`, issue 17) execs the shim's own pid into
the code installed now, which must go on with everything the old code held.
The old code quiesces (see :class:`supervisor.daemon.Upgrader`), describes all
of it in one JSON document, :class:`State` (``"format": 1``), writes it to a
memfd (:func:`dump`) and execs ``python -I -m supervisor.upgrade --adopt FD
--fallback FD`` (:func:`adopt_argv`).  The new code loads it (:func:`load`),
rebuilds its objects from it and serves; if it cannot, it execs the old code
back from its snapshot (:mod:`supervisor.codesnap`) with the same state and
``--error`` (:func:`supervisor.upgrade.fallback_argv`), and the old code adopts
what it wrote.

The schema is the ``TypedDict`` classes below, and only them: :func:`validate`
reads their annotations, so the checks cannot drift from the types.  Bytes are
base64 strings; fds are ints, each listed in ``fds`` (close-on-exec is cleared
on exactly those before the exec, and the loader checks each is open); times
of trio's clock are stored as seconds left.  Each object exports and adopts
its own part (``export()``/``adopt()`` beside the object: the reaper needs
none, the outbox, exit order, group, containers, processes, Task service and
ttrpc server do).

Compatibility
-------------
Fields are only added within a format (a loader ignores keys it does not
know; a field a loader needs and an older writer lacked is a new format).
The loader accepts every format in :data:`FORMATS`; a golden document of each
lives in ``tests/unit/data/upgrade-state-v<N>.json`` and must always load
(``tests/unit/test_upgrade_state.py``).

Standard library only, and light at import: the new code's entry imports it
before anything that could fail (see :mod:`supervisor.upgrade`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import sys
import types
import typing
from typing import Any, TypedDict

__all__ = [
    "FORMAT",
    "FORMATS",
    "State",
    "StateError",
    "UpgradeRecord",
    "adopt_argv",
    "b64",
    "check_argv",
    "clear_cloexec",
    "dump",
    "load",
    "read",
    "unb64",
    "validate",
]

#: The format this code writes.
FORMAT = 1
#: The formats this code loads.
FORMATS = (1,)
#: The module the new code runs (``python -m``): its ``main`` adopts a state.
ENTRY = "supervisor.upgrade"


class StateError(ValueError):
    """A state that cannot be adopted; the message says where and why."""


# --- the schema (format 1) -------------------------------------------------------


class ExitState(TypedDict):
    pid: int
    status: int
    timestamp: float


class OrderEntryState(TypedDict):
    container_id: str
    exec_id: str
    announcing: bool
    registered: bool
    seen: bool
    held: ExitState | None
    reported: bool


class OrderPidState(TypedDict):
    pid: int
    container_id: str
    exec_id: str


class WaitingState(TypedDict):
    container_id: str
    exit: ExitState


class ExitOrderState(TypedDict):
    entries: list[OrderEntryState]
    pids: list[OrderPidState]
    waiting: list[WaitingState]


class EventState(TypedDict):
    seq: int
    timestamp_ns: int
    namespace: str
    topic: str
    type_url: str
    payload: str  # base64
    attempts: int
    first_error: str


class OutboxState(TypedDict):
    spool: str  # "": none
    next_seq: int
    published: int
    replayed: int
    delivered: int
    last_error: str
    last_error_at: float
    spool_error: str
    spool_skipped: int
    pending: list[EventState]  # also in the spool, unless spool_error


class StdioState(TypedDict):
    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class ProcessState(TypedDict):
    exec_id: str
    state: str
    pid: int
    exit_status: int
    exited_at_ns: int
    exited: bool
    stdio: StdioState
    spec: str  # base64
    io: dict[str, object] | None  # its Streams' export()


class MountState(TypedDict):
    type: str
    source: str
    target: str
    options: list[str]


class CgroupState(TypedDict):
    v1: dict[str, str]
    unified: str | None


class ContainerState(TypedDict):
    id: str
    bundle: str
    namespace: str
    settings: dict[str, object]
    rootfs: list[MountState]
    spec: dict[str, object]
    kill_all_on_exit: bool
    cgroup: CgroupState | None
    oom_seen: int
    init: ProcessState
    execs: list[ProcessState]


class GroupState(TypedDict):
    reserved: dict[str, float]  # container id -> seconds left (a closing shim is never handed)


class TaskState(TypedDict):
    started_at: float
    log_level: int | None  # the most verbose LogLevel asked for
    containers: list[ContainerState]
    order: ExitOrderState
    group: GroupState


class CallState(TypedDict):
    stream_id: int
    service: str
    method: str
    payload: str  # base64
    timeout_nano: int  # time left; 0: none; negative: expired
    metadata: list[list[str]]  # [key, value] pairs in wire order


class ConnectionState(TypedDict):
    fd: int
    unparsed: str  # base64
    last_stream_id: int
    discard: int
    oversized: list[int] | None  # [stream id, type, flags, length] being skipped
    spoke: bool
    calls: list[CallState]


class ServerState(TypedDict):
    listener_fd: int
    connections: list[ConnectionState]


class ShimState(TypedDict):
    pid: int
    namespace: str
    first: str
    bundle: str
    ttrpc_address: str
    code: str  # the code identity of the code that wrote this state
    upgrades: int
    upgrade_attempts: int
    last_upgrade_error: str
    upgraded_at: float  # 0: never
    root_log_level: int
    log_fifo: str  # "": logging to stderr
    cmdline: list[str]  # as the shim first showed it (ps, and tools that find shims by it)
    comm: str


class EventsState(TypedDict):
    """The connection to containerd's Events service (``daemon.ContainerdEvents``)."""

    fd: int
    unparsed: str  # base64: answer bytes received and not yet parsed
    next_stream_id: int
    pending: list[int]  # stream ids written and unanswered
    abandoned: list[int]  # stream ids whose late answers are dropped
    owed_seq: int  # the event whose Forward is owed on it; -1: none
    owed_stream_id: int  # 0: none


class _Added(TypedDict, total=False):
    """Keys added within format 1: a state without them, from code before, still loads
    (``total=False``; not ``NotRequired``, which postponed annotations hide)."""

    # With it, a Forward containerd has not answered yet is waited for, not sent again.
    events: EventsState | None


class State(_Added):
    format: int
    written_at: float
    shim: ShimState
    server: ServerState
    tasks: TaskState
    outbox: OutboxState
    fds: list[int]  # every fd the state names: they survive the exec


# --- the upgrade facts the shim reports ------------------------------------------


class UpgradeRecord:
    """What ``Introspect/Shim`` tells of upgrades (one per shim, kept across them)."""

    __slots__ = ("code", "last_upgrade_error", "upgrade_attempts", "upgraded_at", "upgrades")

    def __init__(self, code: str, *, upgrades: int = 0, upgrade_attempts: int = 0,
                 last_upgrade_error: str = "", upgraded_at: float = 0.0) -> None:
        self.code = code  #: the code identity this process runs
        self.upgrades = upgrades
        self.upgrade_attempts = upgrade_attempts
        self.last_upgrade_error = last_upgrade_error
        self.upgraded_at = upgraded_at

    def failed(self, error: str) -> None:
        """An attempt ended with the shim on the code it ran."""
        self.upgrade_attempts += 1
        self.last_upgrade_error = error or "unknown error"


# --- bytes and fds ----------------------------------------------------------------


def b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, where: str = "") -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise StateError(f"{where or 'a field'}: not base64: {e}") from None


def clear_cloexec(fds: list[int]) -> None:
    """Let ``fds`` survive the exec (everything else keeps close-on-exec)."""
    for fd in fds:
        os.set_inheritable(fd, True)


# --- dump, read, validate ------------------------------------------------------------


def dump(state: State) -> int:
    """Write ``state`` to a new memfd; its fd (close-on-exec, offset 0: read with pread)."""
    data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    fd = os.memfd_create("supervisor-upgrade-state", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read(fd: int) -> object:
    """The JSON document in ``fd`` (read with pread: the offset is left alone)."""
    try:
        size = os.fstat(fd).st_size
        chunks: list[bytes] = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as e:
        raise StateError(f"state fd {fd}: {e.strerror or e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError as e:
        raise StateError(f"state fd {fd}: not JSON: {e}") from None


def load(fd: int) -> State:
    """Read and :func:`validate` the state in ``fd``."""
    return validate(read(fd))


def validate(doc: object) -> State:
    """``doc`` as a :class:`State`, or :class:`StateError` naming the first problem.

    Checks every field's type against the schema (extra keys are ignored),
    the format, and that every fd the state names is listed in ``fds`` and open.
    """
    if not isinstance(doc, dict):
        raise StateError(f"the state is a {type(doc).__name__}, not an object")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt not in FORMATS:
        raise StateError(f"state format {fmt!r} is not one this code loads {list(FORMATS)}")
    _check(doc, State, "state")
    state = typing.cast("State", doc)
    fds = set(state["fds"])
    named = [("server.listener_fd", state["server"]["listener_fd"])]
    named += [(f"server.connections[{i}].fd", c["fd"])
              for i, c in enumerate(state["server"]["connections"])]
    events = state.get("events")
    if events is not None:
        named.append(("events.fd", events["fd"]))
    for where, fd in named:
        if fd not in fds:
            raise StateError(f"{where} ({fd}) is not in the state's fds")
    for fd in sorted(fds):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise StateError(f"fd {fd} named by the state is not open") from None
    return state


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, vars(sys.modules[__name__]))
    return hints


def _check(value: object, kind: Any, where: str) -> None:
    """Raise :class:`StateError` unless ``value`` (JSON) has the type ``kind``."""
    if kind is object or kind is Any:
        return
    if typing.is_typeddict(kind):
        if not isinstance(value, dict):
            raise StateError(f"{where}: {type(value).__name__}, not an object")
        for key, field_kind in _hints(kind).items():
            if key not in value:
                if key in kind.__optional_keys__:
                    continue
                raise StateError(f"{where}: no {key!r}")
            _check(value[key], field_kind, f"{where}.{key}")
        return
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        problems = []
        for option in args:
            try:
                _check(value, option, where)
            except StateError as e:
                problems.append(str(e))
            else:
                return
        raise StateError(" / ".join(problems))
    if origin is list:
        if not isinstance(value, list):
            raise StateError(f"{where}: {type(value).__name__}, not a list")
        for i, item in enumerate(value):
            _check(item, args[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise StateError(f"{where}: {type(value).__name__}, not an object")
        for key, item in value.items():
            _check(item, args[1], f"{where}[{key!r}]")
        return
    if kind is type(None):
        ok = value is None
    elif kind is float:
        ok = type(value) in (int, float)
    else:
        ok = type(value) is kind  # exact: a bool is not an int
    if not ok:
        raise StateError(f"{where}: {type(value).__name__} {value!r:.40}, "
                         f"not {getattr(kind, '__name__', kind)}")


# --- the two execs ------------------------------------------------------------------


def check_argv() -> list[str]:
    """The installed code's pre-flight check (``--check``: see :mod:`supervisor.upgrade`)."""
    return [sys.executable, "-I", "-m", ENTRY, "--check"]


def adopt_argv(state_fd: int, snapshot_fd: int, cmdline: list[str]) -> list[str]:
    """The new code (installed now) adopting the state in ``state_fd``.

    The shim's first command line follows ``--`` (ignored), so that ``ps`` and
    whatever finds shims by their arguments (containerd's address) still do.
    """
    return [sys.executable, "-I", "-m", ENTRY, "--adopt", str(state_fd),
            "--fallback", str(snapshot_fd), "--", *cmdline]

