"""The Introspect service (``supervisor.introspect.v1.Introspect``): the shim, as it sees itself.

Design
------
Served on the shim's own socket next to the Task service, so ``supervisor
inspect`` (:mod:`supervisor.cli`) can ask a shim directly -- also while
containerd is down, which is exactly when one wants to see the events the
shim is holding for it.  Three rpcs:

* ``Shim`` -- pid, version, uptime, memory (RSS/PSS), open fds, the runtime
  binary and its version string, namespace and socket address, the code it
  runs and its in-place upgrades (:class:`~supervisor.handover.UpgradeRecord`);
* ``Containers`` -- every container and exec: pid, status, exit status and
  time, bundle, stdio paths or log URI, terminal, bytes copied per stream;
* ``Events`` -- the outbox: counts, the oldest pending event's age, the last
  delivery error and when, the pending and recently delivered events.

Every answer is built synchronously from objects in memory
(``TaskService.containers``, the processes, their stdio counters, the
outbox), so it never waits for the Task service, containerd or the runtime.
The one thing not in memory is the runtime's version string: it is probed
once per binary (``<binary> --version``) by a task in the shim's nursery,
spawned through the reaper like every child of the shim, killed after
:data:`VERSION_TIMEOUT`; ``Shim`` waits at most :data:`VERSION_WAIT` for a
probe it started and otherwise answers without the version (the next call
finds it cached).

Invariants
----------
* Read-only: nothing here changes a container, a process or the outbox.
* No handler awaits anything but the bounded wait for the version probe.
* Errors become ttrpc status codes only in :func:`status_of`, which
  :func:`supervisor._unary.handlers` applies to every handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import trio
from google.protobuf.message import DecodeError, Message

from supervisor import __version__, _unary
from supervisor._unary import Handler
from supervisor.api import typeurls
from supervisor.api.introspect import introspect_pb2 as pb
from supervisor.events import Event, Outbox
from supervisor.handover import UpgradeRecord
from supervisor.process import Process
from supervisor.reaper import Reaper, run_captured
from supervisor.runtime import DEFAULT_BINARY
from supervisor.ttrpc import Code, RPCError

__all__ = [
    "SERVICE",
    "IntrospectService",
    "VersionProbe",
    "probe_runtime_version",
]

log = logging.getLogger("supervisor.introspect")

SERVICE = "supervisor.introspect.v1.Introspect"
VERSION_TIMEOUT = 5.0  # a `<runtime> --version` still running after this is killed
VERSION_WAIT = 0.5  # how long Shim waits for a probe it started itself
VERSION_RETRY = 60.0  # a failed probe is tried again after this long
DEFAULT_EVENT_LIMIT = 256
_VERSION_OUTPUT_LIMIT = 64 * 1024


# --- what we read of the rest of the shim ------------------------------------


class RuntimeView(Protocol):
    @property
    def binary(self) -> str: ...


class ContainerView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def bundle(self) -> str: ...
    @property
    def runtime(self) -> RuntimeView: ...
    @property
    def init(self) -> Process: ...
    @property
    def execs(self) -> Mapping[str, Process]: ...
    @property
    def created(self) -> trio.Event: ...


class GroupView(Protocol):
    """The parts of :class:`supervisor.group.Group` this service reads."""

    @property
    def reserved(self) -> Mapping[str, float]: ...
    @property
    def closing(self) -> bool: ...


class TaskView(Protocol):
    """The parts of :class:`supervisor.task.TaskService` this service reads."""

    @property
    def containers(self) -> Mapping[str, ContainerView]: ...
    @property
    def group(self) -> GroupView: ...
    @property
    def started_at(self) -> float: ...
    @property
    def reaper(self) -> Reaper: ...
    @property
    def nursery(self) -> trio.Nursery: ...


# (binary) -> its version string; raise on failure.
VersionProbe = Callable[[str], Awaitable[str]]


# --- the runtime's version -----------------------------------------------------


async def probe_runtime_version(
    reaper: Reaper, binary: str, timeout: float = VERSION_TIMEOUT
) -> str:
    """The first line ``<binary> --version`` prints (through the reaper, killed on timeout)."""
    status, out, _ = await run_captured(reaper, [binary, "--version"], timeout=timeout,
                                        limit=_VERSION_OUTPUT_LIMIT)
    if status < 0:
        raise TimeoutError(f"{binary} --version: no answer within {timeout}s")
    lines = out.decode(errors="replace").strip().splitlines()
    if status != 0 and not lines:
        raise OSError(f"{binary} --version: exit status {status}")
    return lines[0].strip() if lines else ""


@dataclass
class _Version:
    version: str = ""
    error: str = ""
    at: float = 0.0


class _VersionCache:
    """One probe per binary, run in a nursery; its result (or error) kept."""

    def __init__(self, probe: VersionProbe) -> None:
        self._probe = probe
        self._results: dict[str, _Version] = {}
        self._running: dict[str, trio.Event] = {}

    def lookup(self, binary: str) -> _Version | None:
        found = self._results.get(binary)
        if found is not None and found.error and time.monotonic() - found.at > VERSION_RETRY:
            return None
        return found

    def ensure(self, binary: str, nursery: trio.Nursery) -> trio.Event:
        """Start a probe of ``binary`` unless one runs; the event is set when it is done."""
        done = self._running.get(binary)
        if done is None:
            done = self._running[binary] = trio.Event()
            nursery.start_soon(self._run, binary, done)
        return done

    async def _run(self, binary: str, done: trio.Event) -> None:
        result = _Version(at=time.monotonic())
        try:
            result.version = await self._probe(binary)
        except Exception as e:  # any failure is an answer too: report it, never crash the shim
            result.error = str(e) or type(e).__name__
            log.debug("runtime version of %s: %s", binary, result.error)
        finally:
            self._running.pop(binary, None)
            done.set()
        self._results[binary] = result


# --- conversions -----------------------------------------------------------------


def _set_time_ns(field: Any, ns: int) -> None:
    if ns > 0:
        field.FromNanoseconds(ns)


def _io_counters(process: Process) -> pb.IOCounters:
    if process.io is None:
        return pb.IOCounters(kind="none")
    c = process.io.counters
    out_held, out_dropped = c.backlog("stdout")
    err_held, err_dropped = c.backlog("stderr")
    return pb.IOCounters(
        kind=c.kind, stdin_bytes=c.stdin, stdout_bytes=c.stdout, stderr_bytes=c.stderr,
        stdout_backlog_bytes=out_held, stderr_backlog_bytes=err_held,
        stdout_dropped_bytes=out_dropped, stderr_dropped_bytes=err_dropped,
    )


def process_message(process: Process) -> pb.Process:
    message = pb.Process(
        exec_id=process.exec_id,
        pid=max(process.pid, 0),
        status=str(process.state),
        exit_status=max(process.exit_status, 0),
        exited=process.exited.is_set(),
        stdio=pb.Stdio(stdin=process.stdio.stdin, stdout=process.stdio.stdout,
                       stderr=process.stdio.stderr, terminal=process.stdio.terminal),
        io=_io_counters(process),
    )
    if message.exited:
        _set_time_ns(message.exited_at, process.exited_at_ns)
    return message


def container_message(container: ContainerView) -> pb.Container:
    message = pb.Container(
        id=container.id,
        namespace=container.namespace,
        bundle=container.bundle,
        runtime_binary=container.runtime.binary,
        created=container.created.is_set(),
        init=process_message(container.init),
    )
    for exec_id in sorted(container.execs):
        message.execs.append(process_message(container.execs[exec_id]))
    return message


def _subject(event: Event) -> tuple[str, str]:
    """(container id, process id) a task event is about, from its payload."""
    try:
        decoded = typeurls.message_class(event.type_url).FromString(event.payload)
    except (typeurls.UnknownTypeError, DecodeError):
        return "", ""
    container_id = str(getattr(decoded, "container_id", "") or "")
    process_id = str(getattr(decoded, "exec_id", "") or getattr(decoded, "id", "") or "")
    return container_id, process_id


def event_message(event: Event) -> pb.Event:
    container_id, process_id = _subject(event)
    message = pb.Event(seq=event.seq, topic=event.topic, namespace=event.namespace,
                       type_url=event.type_url, attempts=event.attempts,
                       first_error=event.first_error, container_id=container_id,
                       process_id=process_id)
    _set_time_ns(message.timestamp, event.timestamp_ns)
    return message


def status_of(exc: BaseException) -> RPCError:
    """The ttrpc status a caller sees for ``exc`` (this service's one error boundary)."""
    if isinstance(exc, RPCError):
        return exc
    if isinstance(exc, DecodeError):
        return RPCError(Code.INVALID_ARGUMENT, f"bad request: {exc}")
    return RPCError(Code.INTERNAL, f"{type(exc).__name__}: {exc}")


# --- the service -------------------------------------------------------------------


class IntrospectService:
    """Read-only answers about one shim (see the module docstring)."""

    def __init__(
        self,
        task_service: TaskView,
        outbox: Outbox,
        *,
        namespace: str,
        address: str,
        nursery: trio.Nursery | None = None,
        version_probe: VersionProbe | None = None,
        upgrades: UpgradeRecord | None = None,
    ) -> None:
        """``upgrades``: the shim's code and upgrade counters (``Shim``'s fields)."""
        self._tasks = task_service
        self._upgrades = upgrades
        self._outbox = outbox
        self.namespace = namespace
        self.address = address
        self._nursery = nursery
        reaper = task_service.reaper

        async def default_probe(binary: str) -> str:
            return await probe_runtime_version(reaper, binary)

        self._versions = _VersionCache(version_probe or default_probe)
        self._me = psutil.Process()

    def handlers(self) -> dict[str, Handler]:
        table: list[tuple[str, type[Message], Callable[[Any], Awaitable[Message]]]] = [
            ("Shim", pb.ShimRequest, self.shim),
            ("Containers", pb.ContainersRequest, self.containers),
            ("Events", pb.EventsRequest, self.events),
        ]
        return _unary.handlers(SERVICE, table, status_of=status_of, log=log)

    # --- rpcs -------------------------------------------------------------

    def _runtime_binary(self) -> str:
        for container in list(self._tasks.containers.values()):
            return container.runtime.binary or DEFAULT_BINARY
        return DEFAULT_BINARY

    async def _runtime_version(self, binary: str) -> _Version | None:
        cached = self._versions.lookup(binary)
        if cached is None:
            nursery = self._nursery or self._tasks.nursery
            done = self._versions.ensure(binary, nursery)
            with trio.move_on_after(VERSION_WAIT):
                await done.wait()
            cached = self._versions.lookup(binary)
        return cached

    def _memory(self, response: pb.ShimResponse) -> None:
        try:
            full = self._me.memory_full_info()
            response.memory_rss_bytes = int(full.rss)
            response.memory_pss_bytes = int(getattr(full, "pss", 0))
        except (psutil.Error, OSError):
            with contextlib.suppress(psutil.Error, OSError):
                response.memory_rss_bytes = int(self._me.memory_info().rss)
        with contextlib.suppress(psutil.Error, OSError):
            response.open_fds = self._me.num_fds()

    async def shim(self, r: pb.ShimRequest) -> pb.ShimResponse:
        binary = self._runtime_binary()
        response = pb.ShimResponse(
            pid=os.getpid(),
            version=__version__,
            namespace=self.namespace,
            address=self.address,
            uptime_seconds=max(0.0, time.time() - self._tasks.started_at),
            runtime_binary=binary,
            container_count=len(self._tasks.containers),
            python_version=platform.python_version(),
            reserved=sorted(self._tasks.group.reserved),
            closing=self._tasks.group.closing,
        )
        _set_time_ns(response.started_at, int(self._tasks.started_at * 1e9))
        record = self._upgrades
        if record is not None:
            response.code = record.code
            response.upgrades = record.upgrades
            response.upgrade_attempts = record.upgrade_attempts
            response.last_upgrade_error = record.last_upgrade_error
            _set_time_ns(response.upgraded_at, int(record.upgraded_at * 1e9))
        self._memory(response)
        version = await self._runtime_version(binary)
        if version is not None:
            response.runtime_version = version.version
            response.runtime_version_error = version.error
        return response

    async def containers(self, r: pb.ContainersRequest) -> pb.ContainersResponse:
        response = pb.ContainersResponse()
        for container_id, container in sorted(self._tasks.containers.items()):
            if r.id and container_id != r.id:
                continue
            response.containers.append(container_message(container))
        return response

    async def events(self, r: pb.EventsRequest) -> pb.EventsResponse:
        outbox = self._outbox
        stats = outbox.stats
        pending = outbox.pending
        limit = r.limit or DEFAULT_EVENT_LIMIT
        response = pb.EventsResponse(
            published=stats.published,
            delivered=stats.delivered,
            replayed=stats.replayed,
            spool_error=stats.spool_error,
            spool_skipped=stats.spool_skipped,
            pending_count=len(pending),
            oldest_pending_age_seconds=outbox.oldest_age(),
            last_error=stats.last_error,
        )
        if stats.last_error_at > 0:
            _set_time_ns(response.last_error_at, int(stats.last_error_at * 1e9))
        response.pending.extend(event_message(e) for e in pending[:limit])
        response.recent.extend(event_message(e) for e in list(stats.recent))
        return response
