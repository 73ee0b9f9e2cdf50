"""The Task service (``containerd.task.v2.Task``): containerd's requests, mapped to containers.

Design
------
Each rpc decodes its request, finds the container (and process) by id, asks
:class:`~supervisor.container.Container` to do the work, publishes the event
that says what happened, and encodes the answer.  This is the one boundary
where the shim's errors become ttrpc status codes (:func:`status_of`).

Exits arrive from the reaper (:meth:`TaskService.run_exits`, one subscription
opened before anything is spawned) and are matched to processes by pid.

Event order (containerd relies on it)
-------------------------------------
* TaskCreate after the init exists; TaskStart/TaskExecStarted before that
  process's TaskExit: an exit reaped while its process is *starting* is held
  until the start has been published.
* A process's TaskExit only after its output is drained (bounded by
  :data:`DRAIN_TIMEOUT`, for a process whose children keep its stdout open).
* The init's TaskExit only after the TaskExit of every exec that was running
  when it died.

Groups (``supervisor.group.v1.Group``)
--------------------------------------
One shim may serve many containers (a pod, a labelled group, a shared
namespace shim: see :mod:`supervisor.shim`).  ``start`` reserves a place with
``Join`` before it hands this shim's address to containerd, and the shim keeps
two promises: ``Shutdown`` does not end it while a container or a live
reservation remains (the shim's first container is reserved from the start),
and once it has decided to end it refuses every ``Join`` (UNAVAILABLE), so a
container is never handed to a shim on its way out.  A reservation ends with
the container's ``Create``, a ``Delete`` or ``Shutdown`` naming that id
(containerd giving up on it), or after :data:`RESERVATION_TTL`; a shim whose
last reservation lapses with no container to serve ends by itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from supervisor import _unary, errors, metrics
from supervisor._unary import Handler
from supervisor.api import typeurls
from supervisor.api.events import task_pb2 as ev
from supervisor.api.group import group_pb2
from supervisor.api.runc import options_pb2
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.api.types import task_pb2 as types
from supervisor.container import DRAIN_TIMEOUT, Container
from supervisor.events import Outbox
from supervisor.io import Stdio
from supervisor.mount import MountSpec
from supervisor.options import decode as decode_options
from supervisor.process import Process, State
from supervisor.reaper import Exit, Reaper
from supervisor.runtime import OCIRuntimeError
from supervisor.ttrpc import Code, RPCError

log = logging.getLogger("supervisor.task")

SERVICE = "containerd.task.v2.Task"
GROUP_SERVICE = "supervisor.group.v1.Group"
#: How long a ``Join`` keeps a place for a container whose ``Create`` has not come.
RESERVATION_TTL = 120.0

Req = TypeVar("Req", bound=Message)

_STATUS = {
    State.CREATED: types.CREATED,
    State.RUNNING: types.RUNNING,
    State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED,
    State.DELETED: types.STOPPED,
}

_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (errors.NotFound, Code.NOT_FOUND),
    (errors.AlreadyExists, Code.ALREADY_EXISTS),
    (errors.FailedPrecondition, Code.FAILED_PRECONDITION),
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (errors.Unavailable, Code.UNAVAILABLE),
    (errors.ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (errors.Unimplemented, Code.UNIMPLEMENTED),
    (DecodeError, Code.INVALID_ARGUMENT),
)


def status_of(exc: BaseException) -> RPCError:
    """The ttrpc status containerd should see for ``exc``."""
    if isinstance(exc, RPCError):
        return exc
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return RPCError(code, str(exc))
    if isinstance(exc, OCIRuntimeError):
        return RPCError(Code.UNKNOWN, str(exc))
    if isinstance(exc, OSError):
        return RPCError(Code.UNKNOWN, f"{exc.strerror or exc}" +
                        (f": {exc.filename}" if exc.filename else ""))
    return RPCError(Code.UNKNOWN, f"{type(exc).__name__}: {exc}")


_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
           "fatal": logging.CRITICAL, "panic": logging.CRITICAL}


def apply_log_level(name: str) -> None:
    """The settings file's ``LogLevel`` (containerd's names) for the whole shim."""
    level = _LEVELS.get(name.lower())
    if level is None:
        raise errors.InvalidArgument(
            f"unknown LogLevel {name!r} (one of {', '.join(sorted(_LEVELS))})")
    logging.getLogger().setLevel(level)


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


class TaskService:
    """All the containers of one shim, and the rpcs containerd drives them with."""

    def __init__(
        self,
        *,
        reaper: Reaper,
        outbox: Outbox,
        nursery: trio.Nursery,
        namespace: str,
        request_shutdown: Callable[[], None],
        first: str = "",
        bundle_leaving: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        """``first``: the container whose ``start`` started this shim (reserved).
        ``bundle_leaving(bundle, others)``: called when a container is deleted, before
        containerd deletes its bundle, with the bundles of the containers that remain."""
        self.reaper = reaper
        self.outbox = outbox
        self.nursery = nursery
        self.namespace = namespace
        self.request_shutdown = request_shutdown
        self.bundle_leaving = bundle_leaving
        self.containers: dict[str, Container] = {}
        self._by_pid: dict[int, tuple[Container, Process]] = {}
        self._exits = reaper.subscribe()
        self.started_at = time.time()
        #: Container id -> trio deadline: places ``Join`` reserved for a coming ``Create``.
        #: Never an id that has a container: ``Create`` takes its id out before it adds the
        #: container, and ``Join`` reserves only ids without one.
        self.reservations: dict[str, float] = {}
        #: Set once the shim has decided to end: ``Join`` is refused from then on.
        self.closing = False
        self._expiring = False
        if first:
            self._reserve(first)

    # --- plumbing -------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        table: list[tuple[str, type[Message], Callable[[Any], Awaitable[Message]]]] = [
            ("State", api.StateRequest, self.state),
            ("Create", api.CreateTaskRequest, self.create),
            ("Start", api.StartRequest, self.start),
            ("Delete", api.DeleteRequest, self.delete),
            ("Pids", api.PidsRequest, self.pids),
            ("Pause", api.PauseRequest, self.pause),
            ("Resume", api.ResumeRequest, self.resume),
            ("Checkpoint", api.CheckpointTaskRequest, self.checkpoint),
            ("Kill", api.KillRequest, self.kill),
            ("Exec", api.ExecProcessRequest, self.exec),
            ("ResizePty", api.ResizePtyRequest, self.resize_pty),
            ("CloseIO", api.CloseIORequest, self.close_io),
            ("Update", api.UpdateTaskRequest, self.update),
            ("Wait", api.WaitRequest, self.wait),
            ("Stats", api.StatsRequest, self.stats),
            ("Connect", api.ConnectRequest, self.connect),
            ("Shutdown", api.ShutdownRequest, self.shutdown),
        ]
        return _unary.handlers(SERVICE, table, status_of=status_of, log=log,
                               expected=(OCIRuntimeError,))

    def group_handlers(self) -> dict[str, Handler]:
        """The ``supervisor.group.v1.Group`` service (``start`` joining this shim)."""
        return _unary.handlers(GROUP_SERVICE, [("Join", group_pb2.JoinRequest, self.join)],
                               status_of=status_of, log=log)

    async def _container(self, container_id: str) -> Container:
        """The container, once its Create has finished (as if Create held a lock)."""
        container = self.containers.get(container_id)
        if container is not None and not container.created.is_set():
            await container.created.wait()
            container = self.containers.get(container_id)
        if container is None:
            raise errors.NotFound(f"container {container_id!r} not created")
        return container

    # --- exits ------------------------------------------------------------

    async def run_exits(self) -> None:
        """Match every reaped exit to the process it belongs to."""
        async for exit_ in self._exits:
            found = self._by_pid.get(exit_.pid)
            if found is not None:
                self._on_exit(*found, exit_)

    def _register(self, container: Container, process: Process) -> None:
        self._by_pid[process.pid] = (container, process)

    def _on_exit(self, container: Container, process: Process, exit_: Exit) -> None:
        if process.exit_seen:
            return
        process.exit_seen = True
        if process.starting:
            process.held_exit = exit_
            return
        self._by_pid.pop(process.pid, None)
        if process.is_init:
            if container.kill_all_on_exit:
                self.nursery.start_soon(container.kill_all)
            if container.running_execs():
                process.pending_exit = exit_
                return
        self.nursery.start_soon(self._finish_exit, container, process, exit_)

    def _report_oom(self, container: Container) -> None:
        """Publish a TaskOOM for OOM kills not reported yet (before the exit they cause)."""
        if container.oom is not None and container.oom.take():
            log.info("container %s: OOM kill", container.id)
            self.outbox.publish(ev.TaskOOM(container_id=container.id))

    async def _watch_oom(self, container: Container) -> None:
        if container.oom is None or not container.oom.available:
            return
        with container.background:
            await container.oom.watch(lambda: self._report_oom(container))

    async def _finish_exit(self, container: Container, process: Process, exit_: Exit) -> None:
        if process.io is not None and not await process.io.wait_output(DRAIN_TIMEOUT):
            log.info("%s exited but its output did not finish within %.1fs; reporting the exit",
                     process.describe(), DRAIN_TIMEOUT)
        if process.is_init:
            self._report_oom(container)
        process.set_exited(exit_.status, exit_.timestamp)
        self.outbox.publish(
            ev.TaskExit(
                container_id=container.id,
                id=process.id,
                pid=exit_.pid,
                exit_status=exit_.status,
                exited_at=timestamp(process.exited_at_ns),
            )
        )
        if not process.is_init:
            init = container.init
            if init.pending_exit is not None and not container.running_execs():
                pending, init.pending_exit = init.pending_exit, None
                self.nursery.start_soon(self._finish_exit, container, init, pending)

    def _started(self, container: Container, process: Process, early: Exit | None) -> None:
        self._register(container, process)
        if early is not None:
            self._on_exit(container, process, early)

    def _end_start(self, container: Container, process: Process) -> None:
        process.starting = False
        held, process.held_exit = process.held_exit, None
        if held is not None:
            process.exit_seen = False
            self._on_exit(container, process, held)

    # --- rpcs -------------------------------------------------------------

    async def create(self, r: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if not r.id:
            raise errors.InvalidArgument("container id must not be empty")
        self.reservations.pop(r.id, None)
        if r.id in self.containers:
            raise errors.AlreadyExists(f"container {r.id!r} already exists")
        if r.checkpoint or r.parent_checkpoint:
            raise errors.Unimplemented("restoring from a checkpoint is not supported")
        settings = decode_options(r.options if r.HasField("options") else None)
        if settings.log_level:
            apply_log_level(settings.log_level)
        container = Container(
            r.id,
            r.bundle,
            namespace=self.namespace,
            settings=settings,
            reaper=self.reaper,
            rootfs=[
                MountSpec(m.type, m.source, m.target, tuple(m.options)) for m in r.rootfs
            ],
            stdio=Stdio(r.stdin, r.stdout, r.stderr, r.terminal),
        )
        # Reserve the id while the runtime works, so a twin Create is refused.
        self.containers[r.id] = container
        container.init.starting = True
        try:
            started = await container.create(self.nursery)
        except BaseException:
            del self.containers[r.id]
            raise
        finally:
            container.created.set()
        self._started(container, container.init, started.early_exit)
        self.nursery.start_soon(self._watch_oom, container)
        self.outbox.publish(
            ev.TaskCreate(
                container_id=r.id,
                bundle=r.bundle,
                rootfs=r.rootfs,
                io=ev.TaskIO(stdin=r.stdin, stdout=r.stdout, stderr=r.stderr,
                             terminal=r.terminal),
                checkpoint=r.checkpoint,
                pid=started.pid,
            )
        )
        # An init that died meanwhile (killed before Start) is reported now, after TaskCreate.
        self._end_start(container, container.init)
        return api.CreateTaskResponse(pid=started.pid)

    async def start(self, r: api.StartRequest) -> api.StartResponse:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        process.check("start")
        process.starting = True
        try:
            if process.is_init:
                await container.start_init()
                self.outbox.publish(ev.TaskStart(container_id=container.id, pid=process.pid))
            else:
                started = await container.start_exec(process, self.nursery)
                self._started(container, process, started.early_exit)
                self.outbox.publish(
                    ev.TaskExecStarted(
                        container_id=container.id, exec_id=process.exec_id, pid=process.pid
                    )
                )
        finally:
            self._end_start(container, process)
        return api.StartResponse(pid=process.pid)

    async def delete(self, r: api.DeleteRequest) -> api.DeleteResponse:
        if not r.exec_id:
            self.reservations.pop(r.id, None)  # containerd gave up on it before its Create
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        if process.is_init:
            process.starting = False
            process.held_exit = None
            await container.delete_init()
            del self.containers[container.id]
            if self.bundle_leaving is not None:
                self.bundle_leaving(container.bundle,
                                    [c.bundle for c in self.containers.values()])
            for p in container.all_processes():
                if self._by_pid.get(p.pid, (None, None))[1] is p:
                    del self._by_pid[p.pid]
            if not process.exited.is_set():
                # Deleted before it ran (or its exit never came): no TaskExit.
                process.set_exited(process.exit_status)
            self.outbox.publish(
                ev.TaskDelete(
                    container_id=container.id,
                    pid=process.pid,
                    exit_status=process.exit_status,
                    exited_at=timestamp(process.exited_at_ns),
                    id=container.id,
                )
            )
        else:
            await container.delete_exec(process)
        return api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_ns),
        )

    async def state(self, r: api.StateRequest) -> api.StateResponse:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        response = api.StateResponse(
            id=process.id,
            bundle=container.bundle,
            pid=process.pid,
            status=_STATUS[process.state],
            stdin=process.stdio.stdin,
            stdout=process.stdio.stdout,
            stderr=process.stdio.stderr,
            terminal=process.stdio.terminal,
            exit_status=process.exit_status,
            exec_id=process.exec_id,
        )
        if process.exited.is_set():
            response.exited_at.CopyFrom(timestamp(process.exited_at_ns))
        return response

    async def pids(self, r: api.PidsRequest) -> api.PidsResponse:
        container = await self._container(r.id)
        by_pid = {p.pid: p for p in container.execs.values() if p.pid}
        response = api.PidsResponse()
        for pid in await container.pids():
            info = response.processes.add(pid=pid)
            exec_process = by_pid.get(pid)
            if exec_process is not None:
                info.info.CopyFrom(
                    typeurls.pack(options_pb2.ProcessDetails(exec_id=exec_process.exec_id))
                )
        return response

    async def pause(self, r: api.PauseRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        await container.pause()
        self.outbox.publish(ev.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, r: api.ResumeRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        await container.resume()
        self.outbox.publish(ev.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    async def checkpoint(self, r: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        await self._container(r.id)
        raise errors.Unimplemented("checkpoint is not supported by this shim")

    async def kill(self, r: api.KillRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        await container.kill(process, r.signal, r.all)
        return empty_pb2.Empty()

    async def exec(self, r: api.ExecProcessRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        container.add_exec(r.exec_id, Stdio(r.stdin, r.stdout, r.stderr, r.terminal),
                           r.spec.value)
        self.outbox.publish(ev.TaskExecAdded(container_id=container.id, exec_id=r.exec_id))
        return empty_pb2.Empty()

    async def resize_pty(self, r: api.ResizePtyRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        container.resize(process, r.width, r.height)
        return empty_pb2.Empty()

    async def close_io(self, r: api.CloseIORequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        process.check("closeio")
        if r.stdin and process.io is not None:
            process.io.close_stdin()
        return empty_pb2.Empty()

    async def update(self, r: api.UpdateTaskRequest) -> empty_pb2.Empty:
        container = await self._container(r.id)
        try:
            resources = json.loads(r.resources.value or b"{}")
        except ValueError as e:
            raise errors.InvalidArgument(f"update: resources are not JSON: {e}") from e
        if not isinstance(resources, dict):
            raise errors.InvalidArgument("update: resources must be a JSON object")
        await container.update(resources)
        return empty_pb2.Empty()

    async def wait(self, r: api.WaitRequest) -> api.WaitResponse:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        status, exited_at = await process.wait()
        return api.WaitResponse(exit_status=status, exited_at=timestamp(exited_at))

    async def stats(self, r: api.StatsRequest) -> api.StatsResponse:
        container = await self._container(r.id)
        container.init.check("stats")
        if container.cgroup is None:
            raise errors.NotFound(f"container {r.id!r}: cgroup does not exist")
        try:
            data = metrics.stats_for_paths(container.cgroup)
        except (ProcessLookupError, metrics.CgroupNotFoundError) as e:
            raise errors.NotFound(f"container {r.id!r}: {e}") from e
        return api.StatsResponse(stats=data)

    async def connect(self, r: api.ConnectRequest) -> api.ConnectResponse:
        container = self.containers.get(r.id)
        return api.ConnectResponse(
            shim_pid=os.getpid(),
            task_pid=container.init.pid if container is not None else 0,
        )

    async def shutdown(self, r: api.ShutdownRequest) -> empty_pb2.Empty:
        self.reservations.pop(r.id, None)  # containerd is done with it
        self._prune_reservations()
        if not r.now and (self.containers or self.reservations):
            return empty_pb2.Empty()
        self.closing = True
        self.request_shutdown()
        return empty_pb2.Empty()

    # --- group --------------------------------------------------------------

    def _reserve(self, container_id: str) -> None:
        self.reservations[container_id] = trio.current_time() + RESERVATION_TTL
        if not self._expiring:
            self._expiring = True
            self.nursery.start_soon(self._expire_reservations)

    async def _expire_reservations(self) -> None:
        """Drop lapsed reservations; end a shim left with nothing to serve.

        Without this, a shim whose reservation lapsed (its ``start`` gave up
        after Join, or containerd died before ``Create``) would refuse every
        ``Shutdown`` until then and get none after: an empty shim forever.
        """
        try:
            while self.reservations and not self.closing:
                await trio.sleep_until(min(self.reservations.values()))
                self._prune_reservations()
            if not self.containers and not self.closing:
                log.info("no container came for the reserved places: ending")
                self.closing = True
                self.request_shutdown()
        finally:
            self._expiring = False

    def _prune_reservations(self) -> None:
        """Drop the reservations that lapsed."""
        now = trio.current_time()
        for cid in [c for c, deadline in self.reservations.items() if deadline <= now]:
            log.warning("reservation for %s lapsed: no Create within %g s", cid, RESERVATION_TTL)
            del self.reservations[cid]

    async def join(self, r: group_pb2.JoinRequest) -> group_pb2.JoinResponse:
        if not r.id:
            raise errors.InvalidArgument("container id must not be empty")
        if self.closing:
            raise errors.Unavailable("the shim is shutting down")
        self._prune_reservations()
        count = len(self.containers) + len(self.reservations)
        if r.id not in self.containers and r.id not in self.reservations:
            if r.limit and count >= r.limit:
                raise errors.ResourceExhausted(
                    f"the shim serves {count} containers (limit {r.limit})")
            count += 1
        if r.id not in self.containers:
            self._reserve(r.id)
        log.debug("%s joins: %d containers served or reserved", r.id, count)
        return group_pb2.JoinResponse(containers=count)
