"""The Task service (``containerd.task.v2.Task``): containerd's requests, mapped to containers.

Design
------
Each rpc decodes its request, finds the container (and process) by id (an id
that is not a containerd identifier is INVALID_ARGUMENT, see
:mod:`supervisor.identifiers`), asks :class:`~supervisor.container.Container`
to do the work, publishes the event that says what happened, and encodes the
answer.  Delete may be cancelled (a dropped connection, a deadline) and
repeated: the process changes state only when the work is done, and the next
Delete finishes it (see :mod:`supervisor.process`).  This is the one boundary
where the shim's errors become ttrpc status codes (:func:`status_of`).

Exits arrive from the reaper (:meth:`TaskService.run_exits`, one subscription
opened before anything is spawned).  The service tells its
:class:`~supervisor.exits.ExitOrder` what happens (a process being announced,
its pid, a reaped exit, an event published, a delete) and does what it answers
(:meth:`TaskService._apply`): the order containerd relies on is decided there,
in one place -- TaskCreate/TaskStart/TaskExecStarted before that process's
TaskExit, the init's TaskExit after those of its running execs.  A process's
TaskExit comes only after its output is drained (bounded by
:data:`DRAIN_TIMEOUT`, for a process whose children keep its stdout open).
TaskDelete comes after the process's TaskExit: Delete waits for one under
way, and drops one not yet released (:meth:`TaskService._delete`).

Groups (``supervisor.group.v1.Group``)
--------------------------------------
``Join`` and ``Shutdown`` ask the shim's :class:`~supervisor.group.Group`
(reservations, and whether the shim may end); see :mod:`supervisor.group`.

Log level
---------
A container's ``LogLevel`` option sets the level of the whole shim, and a
shared shim serves many containers: its level is the most verbose that any of
its containers asked for (:class:`LogLevel`).  A later ``Create`` asking for a
less verbose one does not lower it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from supervisor import _unary, errors, identifiers, metrics
from supervisor._unary import Handler
from supervisor.api import typeurls
from supervisor.api.events import task_pb2 as ev
from supervisor.api.group import group_pb2
from supervisor.api.runc import options_pb2
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.api.types import task_pb2 as types
from supervisor.container import DRAIN_TIMEOUT, Container
from supervisor.events import Outbox
from supervisor.exits import Action, ExitOrder, InitExited
from supervisor.group import Group
from supervisor.io import Stdio
from supervisor.mount import MountSpec
from supervisor.options import decode as decode_options
from supervisor.process import Process, State
from supervisor.reaper import Exit, Reaper
from supervisor.runtime import OCIRuntimeError
from supervisor.ttrpc import Code, RPCError

if TYPE_CHECKING:
    from supervisor.handover import TaskState

log = logging.getLogger("supervisor.task")

SERVICE = "containerd.task.v2.Task"
GROUP_SERVICE = "supervisor.group.v1.Group"
#: Methods an upgrade hands over unanswered rather than waits for (``Wait`` blocks
#: until an exit: weeks).  Each is safe to run again: its effect is its answer.
RESUMABLE = frozenset({"Wait"})

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


class LogLevel:
    """The shim's log level, as its containers' ``LogLevel`` options ask (containerd's names).

    The most verbose level any container asked for: the first request sets it
    (a container may quiet the shim's default), each more verbose one lowers
    it, and a less verbose one changes nothing, so one container of a shared
    shim cannot silence the debugging another asked for.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger if logger is not None else logging.getLogger()
        self.asked: int | None = None  # the most verbose level asked for yet

    def ask(self, name: str) -> None:
        level = _LEVELS.get(name.lower())
        if level is None:
            raise errors.InvalidArgument(
                f"unknown LogLevel {name!r} (one of {', '.join(sorted(_LEVELS))})")
        if self.asked is None or level < self.asked:
            self.asked = level
            self._logger.setLevel(level)


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
        """``request_shutdown``: called once, when the shim's group decides it ends.
        ``first``: the container whose ``start`` started this shim (reserved).
        ``bundle_leaving(bundle, others)``: called when a container is deleted, before
        containerd deletes its bundle, with the bundles of the containers that remain."""
        self.reaper = reaper
        self.outbox = outbox
        self.nursery = nursery
        self.namespace = namespace
        self.bundle_leaving = bundle_leaving
        self.containers: dict[str, Container] = {}
        self.order = ExitOrder()
        self._exits = reaper.subscribe()
        self.started_at = time.time()
        self.group = Group(served=self.containers, end=request_shutdown, nursery=nursery,
                           first=first)
        self.log_level = LogLevel()
        self._busy = 0  # exits being reported, kill_all runs: what an upgrade waits for
        self._idle = trio.Event()

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
        """The container, once its Create has finished (as if Create held a lock).

        Every id in ``containers`` passed :func:`identifiers.check` at Create: only
        a miss is checked, so a bad id is INVALID_ARGUMENT, a good unknown one NOT_FOUND.
        """
        container = self.containers.get(container_id)
        if container is not None and not container.created.is_set():
            await container.created.wait()
            container = self.containers.get(container_id)
        if container is None:
            identifiers.check(container_id, "container id")
            raise errors.NotFound(f"container {container_id!r} not created")
        return container

    # --- exits ------------------------------------------------------------

    async def run_exits(self) -> None:
        """Hand every reaped exit to the exit order (it ignores pids it does not know)."""
        async for exit_ in self._exits:
            self._apply(self.order.exited(exit_))

    def _apply(self, actions: list[Action]) -> None:
        """Do what the exit order answered."""
        for action in actions:
            container = self.containers.get(action.container_id)
            if container is None:  # deleted meanwhile; the order has forgotten it
                continue
            if isinstance(action, InitExited):
                if container.kill_all_on_exit:
                    self._track(container.kill_all())
                continue
            process = container.init if not action.exec_id else container.execs.get(
                action.exec_id)
            if process is not None:
                self._track(self._finish_exit(container, process, action.exit))

    def _track(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the nursery, counted until it ends (see :meth:`settle_exits`)."""
        self._busy += 1

        async def run() -> None:
            try:
                await work
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
                    self._idle = trio.Event()

        self.nursery.start_soon(run)

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
        self._apply(self.order.reported(container.id, process.exec_id))

    # --- an in-place upgrade ------------------------------------------------

    def handover_refusal(self) -> str | None:
        """Why this service cannot be handed to new code now, or None."""
        for container in self.containers.values():
            if not container.created.is_set():
                return f"container {container.id!r} is being created"
            for process in container.all_processes():
                # Closed streams of a process still here: a Delete was cut off half-way
                # (they are not handed over); the next Delete finishes it.
                if process.io is not None and process.io.closed:
                    return f"{process.describe()} is being deleted"
            if any(io.delivering() for io in container.delivering):
                # Not handed over: the new code would not go on copying it.
                return f"a deleted exec of {container.id!r} still delivers its output"
        return None

    async def settle_exits(self) -> None:
        """Process every exit reaped so far, then pause the reaper (an upgrade).

        Returns with each reaped exit in the process table and its TaskExit
        published (or held or waiting in the exit order, which is exported),
        nothing being reported, no ``kill --all`` running, and the reaper
        paused, so no exit can arrive until :meth:`Reaper.resume` or the exec.
        """
        while True:
            if self._exits.pending:
                await trio.lowlevel.checkpoint()  # run_exits takes them
            elif self._busy:
                await self._idle.wait()
            else:
                self.reaper.pause()  # no checkpoint since the checks: nothing came between
                return

    def export(self) -> TaskState:
        """Every container and what the exit order and the group keep (JSON-able)."""
        return {
            "started_at": self.started_at,
            "log_level": self.log_level.asked,
            "containers": [c.export() for c in self.containers.values()],
            "order": self.order.export(),
            "group": self.group.export(),
        }

    async def adopt(self, state: TaskState) -> None:
        """Take over what :meth:`export` described (a fresh service in the new code,
        before its reaper runs; then :meth:`start_adopted`)."""
        self.started_at = state["started_at"]
        if state["log_level"] is not None:
            self.log_level.asked = state["log_level"]
        self.order = ExitOrder.adopt(state["order"], Exit)
        for data in state["containers"]:
            container = await Container.adopt(data, reaper=self.reaper)
            self.containers[container.id] = container
        self.group.restore(state["group"])

    def start_adopted(self) -> None:
        """Start what is not carried across an exec: stdio copies (resumed where they
        paused), OOM watches."""
        for container in self.containers.values():
            for process in container.all_processes():
                if process.io is not None:
                    process.io.start(self.nursery)
            self.nursery.start_soon(self._watch_oom, container)

    # --- rpcs -------------------------------------------------------------

    async def create(self, r: api.CreateTaskRequest) -> api.CreateTaskResponse:
        identifiers.check(r.id, "container id")  # before it names anything on disk
        self.group.release(r.id)
        if r.id in self.containers:
            raise errors.AlreadyExists(f"container {r.id!r} already exists")
        if r.checkpoint or r.parent_checkpoint:
            raise errors.Unimplemented("restoring from a checkpoint is not supported")
        settings = decode_options(r.options if r.HasField("options") else None)
        if settings.log_level:
            self.log_level.ask(settings.log_level)
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
        self.order.announcing(r.id)
        try:
            started = await container.create(self.nursery)
        except BaseException:
            del self.containers[r.id]
            self.order.forget(r.id)
            raise
        finally:
            container.created.set()
        self._apply(self.order.registered(r.id, "", started.pid, started.early_exit))
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
        self._apply(self.order.announced(r.id))
        return api.CreateTaskResponse(pid=started.pid)

    async def start(self, r: api.StartRequest) -> api.StartResponse:
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        process.check("start")
        self.order.announcing(container.id, process.exec_id)
        try:
            if process.is_init:
                await container.start_init()
                self.outbox.publish(ev.TaskStart(container_id=container.id, pid=process.pid))
            else:
                started = await container.start_exec(process, self.nursery)
                self._apply(self.order.registered(container.id, process.exec_id, started.pid,
                                                  started.early_exit))
                self.outbox.publish(
                    ev.TaskExecStarted(
                        container_id=container.id, exec_id=process.exec_id, pid=process.pid
                    )
                )
        finally:
            self._apply(self.order.announced(container.id, process.exec_id))
        return api.StartResponse(pid=process.pid)

    async def delete(self, r: api.DeleteRequest) -> api.DeleteResponse:
        if not r.exec_id:
            self.group.release(r.id)  # containerd gave up on it before its Create
        container = await self._container(r.id)
        process = container.process(r.exec_id)
        async with process.deleting:
            if process.state is State.DELETED:  # a Delete that held the lock did the job
                raise errors.NotFound(f"{process.describe()} was deleted")
            return await self._delete(container, process)

    async def _delete(self, container: Container, process: Process) -> api.DeleteResponse:
        """Delete's work.  Cancelled (a dropped connection, a deadline) before the
        container's part returns, it changed nothing a repeated Delete cannot
        finish (see :mod:`supervisor.process`); what follows that part is done
        whole, once: it waits only for a TaskExit already under way
        (:meth:`_exit_reported`, shielded and short), then does not wait.

        TaskDelete comes after the process's TaskExit, if it gets one, and
        carries its status: an exit being reported is waited for; a held or
        waiting one is dropped (:meth:`ExitOrder.forget`, no TaskExit) and its
        status recorded here."""
        if process.is_init:
            running = self.order.running_execs(container.id)
            if running:  # the pid namespace goes with the init: they are killed
                log.warning("container %s: deleting with execs still running: %s",
                            container.id, ", ".join(running))
            await container.delete_init()
            await self._exit_reported(container, process)
            del self.containers[container.id]
            dropped = self.order.forget(container.id)  # never reported now: no TaskExit
            if self.bundle_leaving is not None:
                self.bundle_leaving(container.bundle,
                                    [c.bundle for c in self.containers.values()])
            if not process.exited.is_set():
                # Deleted before it ran (or its exit never came, or was held or waiting):
                # no TaskExit.  delete_init delivered and closed its output.
                if dropped is not None:
                    process.set_exited(dropped.status, dropped.timestamp)
                else:
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
            await self._exit_reported(container, process)
            self._apply(self.order.forget_exec(container.id, process.exec_id))
        return api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_ns),
        )

    async def _exit_reported(self, container: Container, process: Process) -> None:
        """Wait for the TaskExit of an exit being reported (:meth:`_finish_exit`).

        Delete has delivered or closed the process's output by now, so the
        drain that holds the TaskExit ends at once; shielded, because the
        process is already deleted and a cancelled Delete could not be
        repeated.  ``exited`` is set in the same step as the TaskExit is
        published, so once it is set the TaskExit is out.
        """
        if self.order.reporting(container.id, process.exec_id):
            with trio.CancelScope(shield=True):
                await process.exited.wait()

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
        """The container's processes as the runtime lists them, and always its init.

        From Create to Delete the init's pid is in the answer, also once it has exited
        (the runtime then lists nothing): containerd 1.7 and later, when they restart,
        delete every loaded task whose ``Pids`` answer is empty ("cleaning leaked shim
        process", meant for shims whose Create never happened), and a container that
        exited while containerd was down would lose its exit status with its task.  A
        container that was never created still answers NotFound, so such a shim is
        still cleaned up.
        """
        container = await self._container(r.id)
        init = container.init
        try:
            listed = await container.pids()
        except OCIRuntimeError:
            if not init.exited.is_set():
                raise
            listed = []  # the runtime may know nothing of a stopped container any more
        if init.pid and init.pid not in listed:
            listed.insert(0, init.pid)
        by_pid = {p.pid: p for p in container.execs.values() if p.pid}
        response = api.PidsResponse()
        for pid in listed:
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
        self.group.shutdown(r.id, now=r.now)  # ends the shim if it may
        return empty_pb2.Empty()

    # --- group --------------------------------------------------------------

    async def join(self, r: group_pb2.JoinRequest) -> group_pb2.JoinResponse:
        return group_pb2.JoinResponse(containers=self.group.join(r.id, r.limit))
