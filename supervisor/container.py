"""A container: its bundle, rootfs mounts, OCI runtime, init process and execs.

Design
------
:class:`Container` does the work behind each task operation -- mounts, the
runtime's commands, the process's stdio -- and keeps each
:class:`~supervisor.process.Process` in its lifecycle table.  It knows
nothing of ttrpc or of events: the Task service calls it, publishes what
happened, and maps its errors to status codes.

Invariants
----------
* Every runtime command that starts a process (``create``, ``exec``) runs
  under a reaper subscription opened before the command, so an exit that
  happens before the pid file is read is still seen (:attr:`Started.early_exit`).
* A failed create leaves nothing behind: the runtime's container is
  force-deleted, stdio closed and the rootfs unmounted.
* Delete may be repeated: each of its steps is, and the process is deleted
  only once all are done, so a cancelled Delete is finished by the next.
* Ids are containerd identifiers (:mod:`supervisor.identifiers`) before they
  name a file: an exec's process spec and pid file are named after its id.
* The bundle keeps the shim's settings (``supervisor-options.json``) and the
  init pid (``init.pid``) so ``delete`` can clean up after a dead shim.
* An in-place upgrade carries every fact (:meth:`Container.export`,
  :meth:`Container.adopt`); the OOM watch is started anew, with the count of
  kills already reported, and each process's stdio is carried by its own
  :class:`~supervisor.io.Streams` export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from supervisor import errors, identifiers, metrics, mount
from supervisor.console import Console, ConsoleError, ConsoleSocket
from supervisor.errors import AlreadyExists, InvalidArgument, NotFound
from supervisor.io import Opened, Owner, ProcessIO, Stdio, Streams, adopt_streams, open_stdio
from supervisor.launch import runcmd
from supervisor.launch.spool import work_dir
from supervisor.oom import OOMWatcher
from supervisor.options import Settings
from supervisor.process import NULL_STREAMS, Process, State
from supervisor.reaper import Exit, Reaper
from supervisor.runtime import OCIRuntime, OCIRuntimeError, read_pid_file

if TYPE_CHECKING:
    from supervisor.handover import ContainerState

log = logging.getLogger("supervisor.container")

INIT_PID_FILE = "init.pid"
CLEANUP_TIMEOUT = 30.0
#: How long output may make no progress before an exit or a delete stops waiting for it.
DRAIN_TIMEOUT = 2.0
CONSOLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Started:
    """A process the runtime just started, and its exit if it already happened."""

    pid: int
    early_exit: Exit | None


def kill_error(err: OCIRuntimeError) -> Exception:
    """Turn the runtime's answer to ``kill`` into what containerd expects."""
    text = str(err).lower()
    if "container not running" in text or "no such process" in text or "not running" in text:
        return NotFound("process already finished")
    if "does not exist" in text or "not found" in text:
        return NotFound("no such container")
    return err


class Container:
    """One container served by this shim."""

    def __init__(
        self,
        container_id: str,
        bundle: str,
        *,
        namespace: str,
        settings: Settings,
        reaper: Reaper,
        rootfs: list[mount.MountSpec],
        stdio: Stdio,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.namespace = namespace
        self.settings = settings
        self.reaper = reaper
        self.rootfs = rootfs
        self.runtime = OCIRuntime(
            reaper,
            binary=settings.binary_name,
            root=settings.root,
            namespace=namespace,
            log_path=runcmd.log_path(bundle),
            systemd_cgroup=settings.systemd_cgroup,
        )
        self.init = Process(container_id, "", stdio)
        self.execs: dict[str, Process] = {}
        self.kill_all_on_exit = True
        self.spec: dict[str, Any] = {}
        self.cgroup: metrics.CgroupPaths | None = None
        self.oom: OOMWatcher | None = None
        self.background = trio.CancelScope()  # the container's own watchers
        # Stdio of deleted execs whose output was still on its way (delete_exec).
        self.delivering: list[Streams] = []
        self.created = trio.Event()

    @property
    def work_dir(self) -> str:
        return work_dir(self.bundle)

    # --- lookup ---------------------------------------------------------

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            identifiers.check(exec_id, "exec id")  # every stored one passed it at Exec
            raise NotFound(f"exec {exec_id!r} of container {self.id!r} not found") from None

    def all_processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    # --- create / start -------------------------------------------------

    async def _launch(
        self,
        stdio: Stdio,
        pid_file: str,
        run: Callable[[dict[int, int], str | None], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> tuple[Streams, Started]:
        """Run the runtime command that starts a process, its stdio set up first.

        ``run(fds, console_socket)`` is ``runtime create`` or ``runtime exec``.
        The reaper subscription opens before it, so an exit that comes before
        the pid file is read is returned in :attr:`Started.early_exit`.
        """
        if stdio.terminal:
            return await self._launch_terminal(stdio, pid_file, run, nursery)
        io = await self._open_io(stdio)
        try:
            with self.reaper.subscribe() as sub:
                try:
                    await run(io.child_fds, None)
                except OCIRuntimeError as e:
                    said = io.unread_output()
                    if said and said not in str(e):
                        raise OCIRuntimeError(e.command, f"{e}: {said}", e.status) from e
                    raise
                io.spawned()
                pid = read_pid_file(pid_file)
                early = sub.poll(pid)
        except BaseException:
            io.close()
            raise
        io.start(nursery)
        return io, Started(pid, early)

    async def _launch_terminal(
        self,
        stdio: Stdio,
        pid_file: str,
        run: Callable[[dict[int, int], str | None], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> tuple[Streams, Started]:
        sock = ConsoleSocket.create(self.bundle)
        console: Console | None = None
        opened = Opened()
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                opened = await open_stdio(stdio, reaper=self.reaper,
                                          owner=Owner(self.id, self.namespace))
            except ValueError as e:
                raise InvalidArgument(str(e)) from e
            with self.reaper.subscribe() as sub:
                await run({0: devnull, 1: devnull, 2: devnull}, sock.path)
                try:
                    console = Console(await sock.receive_master(timeout=CONSOLE_TIMEOUT))
                except (TimeoutError, ConsoleError) as e:
                    raise errors.Unavailable(f"no terminal from the runtime: {e}") from e
                pid = read_pid_file(pid_file)
                early = sub.poll(pid)
        except BaseException:
            if console is not None:
                console.close()
            opened.close()
            raise
        finally:
            os.close(devnull)
            sock.close()
        console.start(nursery, opened)
        return console, Started(pid, early)

    async def _open_io(self, stdio: Stdio) -> ProcessIO:
        try:
            return await ProcessIO.create(
                stdio,
                uid=self.settings.io_uid,
                gid=self.settings.io_gid,
                reaper=self.reaper,
                owner=Owner(self.id, self.namespace),
                spool_dir=self.work_dir,
            )
        except ValueError as e:
            raise InvalidArgument(str(e)) from e

    def _read_spec(self) -> None:
        path = os.path.join(self.bundle, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except FileNotFoundError:
            raise InvalidArgument(f"bundle {self.bundle}: no config.json") from None
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"bundle {self.bundle}: bad config.json: {e}") from e
        if not isinstance(spec, dict):
            raise InvalidArgument(f"bundle {self.bundle}: config.json is not an object")
        self.spec = spec
        namespaces = (spec.get("linux") or {}).get("namespaces") or []
        self.kill_all_on_exit = not any(
            ns.get("type") == "pid" and not ns.get("path") for ns in namespaces
        )

    async def create(self, nursery: trio.Nursery) -> Started:
        """Mount the rootfs, ``runtime create`` the init, start copying its stdio."""
        if not os.path.isdir(self.bundle):
            raise InvalidArgument(f"bundle {self.bundle} does not exist")
        self._read_spec()
        self.settings.save(self.bundle)
        rootfs_dir = os.path.join(self.bundle, "rootfs")
        mounted = False
        try:
            if self.rootfs:
                os.makedirs(rootfs_dir, mode=0o711, exist_ok=True)
                mount.mount_all(self.rootfs, rootfs_dir)
                mounted = True
            pid_file = os.path.join(self.bundle, INIT_PID_FILE)

            async def run(stdio: dict[int, int], console_socket: str | None) -> None:
                await self.runtime.create(
                    self.id,
                    self.bundle,
                    pid_file=pid_file,
                    stdio=stdio,
                    console_socket=console_socket,
                    no_pivot=self.settings.no_pivot_root,
                    no_new_keyring=self.settings.no_new_keyring,
                )

            io, started = await self._launch(self.init.stdio, pid_file, run, nursery)
        except BaseException:
            # Clean up even when the caller gave up (cancelled): shielded, bounded.
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                with contextlib.suppress(OCIRuntimeError, OSError):
                    await self.runtime.delete(self.id, force=True)
                if mounted:
                    try:
                        await trio.to_thread.run_sync(mount.unmount_all, rootfs_dir)
                    except OSError as e:
                        log.warning("container %s: unmounting rootfs after a failed create: %s",
                                    self.id, e)
            raise
        self.init.pid = started.pid
        self.init.io = io
        try:
            # Kept, so Stats answers after the init is gone too (until delete).
            self.cgroup = metrics.cgroup_paths(started.pid)
            self.oom = OOMWatcher(self.cgroup)
        except (OSError, LookupError) as e:
            log.warning("container %s: no cgroup for pid %d: %s", self.id, started.pid, e)
        return started

    async def start_init(self) -> None:
        self.init.check("start")
        await self.runtime.start(self.id)
        if self.init.state is State.CREATED:
            self.init.transition("start")

    def add_exec(self, exec_id: str, stdio: Stdio, spec: bytes) -> Process:
        identifiers.check(exec_id, "exec id")  # it names files in the bundle
        if exec_id in self.execs:
            raise AlreadyExists(f"id {exec_id}: exec already exists")
        self.init.check("exec")
        if self.init.exited.is_set():
            raise NotFound(f"cannot exec in container {self.id!r}: its init has exited")
        try:
            process_spec = json.loads(spec or b"{}")
        except ValueError as e:
            raise InvalidArgument(f"exec {exec_id}: spec is not JSON: {e}") from e
        if not isinstance(process_spec, dict) or not process_spec.get("args"):
            raise InvalidArgument(f"exec {exec_id}: spec has no args")
        process = Process(self.id, exec_id, stdio, spec=spec)
        self.execs[exec_id] = process
        return process

    async def start_exec(self, process: Process, nursery: trio.Nursery) -> Started:
        process.check("start")
        if self.init.exited.is_set() or self.init.state not in (State.RUNNING, State.CREATED,
                                                                 State.PAUSED):
            raise NotFound(
                f"cannot start exec {process.exec_id!r}: container {self.id!r} is not running"
            )
        spec_path = os.path.join(self.bundle, f".{process.exec_id}.process.json")
        pid_file = os.path.join(self.bundle, f".{process.exec_id}.pid")
        spec = json.loads(process.spec)
        spec["terminal"] = process.stdio.terminal  # the request decides, as containerd's shim does
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)

        async def run(stdio: dict[int, int], console_socket: str | None) -> None:
            await self.runtime.exec(
                self.id, spec_path, pid_file=pid_file, stdio=stdio, console_socket=console_socket
            )

        try:
            io, started = await self._launch(process.stdio, pid_file, run, nursery)
        finally:
            for path in (spec_path, pid_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        process.pid = started.pid
        process.io = io
        process.transition("start")
        return started

    # --- an in-place upgrade ---------------------------------------------

    def export(self) -> ContainerState:
        """The container's facts (JSON-able), for :meth:`adopt` in the new code.

        The OOM watcher is not carried (the new code watches anew), only the
        count of kills reported, so none is reported twice or missed.
        """
        cgroup = self.cgroup
        return {
            "id": self.id, "bundle": self.bundle, "namespace": self.namespace,
            "settings": self.settings.to_dict(),
            "rootfs": [{"type": m.type, "source": m.source, "target": m.target,
                        "options": list(m.options)} for m in self.rootfs],
            "spec": self.spec, "kill_all_on_exit": self.kill_all_on_exit,
            "cgroup": None if cgroup is None else {
                "v1": {k: str(v) for k, v in cgroup.v1.items()},
                "unified": None if cgroup.unified is None else str(cgroup.unified)},
            "oom_seen": self.oom.seen if self.oom is not None else 0,
            "init": self.init.export(),
            "execs": [p.export() for p in self.execs.values()],
        }

    @classmethod
    async def adopt(cls, state: ContainerState, *, reaper: Reaper) -> Container:
        """The container :meth:`export` described, its processes' streams rebuilt
        (paused: the Task service starts them) and ``created`` set."""
        settings = Settings.from_dict(state["settings"])
        init = Process.adopt(state["id"], state["init"])
        container = cls(
            state["id"], state["bundle"], namespace=state["namespace"], settings=settings,
            reaper=reaper,
            rootfs=[mount.MountSpec(m["type"], m["source"], m["target"], tuple(m["options"]))
                    for m in state["rootfs"]],
            stdio=init.stdio,
        )
        container.init = init
        container.spec = state["spec"]
        container.kill_all_on_exit = state["kill_all_on_exit"]
        for p in state["execs"]:
            container.execs[p["exec_id"]] = Process.adopt(container.id, p)
        if state["cgroup"] is not None:
            unified = state["cgroup"]["unified"]
            container.cgroup = metrics.CgroupPaths(
                {k: Path(v) for k, v in state["cgroup"]["v1"].items()},
                None if unified is None else Path(unified))
            try:
                container.oom = OOMWatcher(container.cgroup)
                container.oom.seen = state["oom_seen"]
            except OSError as e:
                log.warning("container %s: no OOM watch after the upgrade: %s", container.id, e)
        for process, data in zip(container.all_processes(),
                                 [state["init"], *state["execs"]], strict=True):
            if data["io"] is not None:
                process.io = await container._adopt_streams(process, data["io"])
        container.created.set()
        return container

    async def _adopt_streams(self, process: Process, data: dict[str, object]) -> Streams:
        if data == NULL_STREAMS:  # no stdio: nothing was carried
            io = await self._open_io(process.stdio)
            io.spawned()
            return io
        return adopt_streams(data, spool_dir=self.work_dir)

    # --- other operations -----------------------------------------------

    async def kill(self, process: Process, signal: int, all: bool) -> None:
        process.check("kill")
        if process.is_init:
            try:
                await self.runtime.kill(self.id, signal, all=all)
            except OCIRuntimeError as e:
                raise kill_error(e) from e
            return
        if process.pid <= 0 or process.exited.is_set() or process.state is State.STOPPED:
            raise NotFound("process already finished")
        try:
            os.kill(process.pid, signal)
        except ProcessLookupError:
            raise NotFound("process already finished") from None

    async def pause(self) -> None:
        self.init.check("pause")
        await self.runtime.pause(self.id)
        self.init.transition("pause")

    async def resume(self) -> None:
        self.init.check("resume")
        await self.runtime.resume(self.id)
        self.init.transition("resume")

    async def update(self, resources: dict[str, Any]) -> None:
        self.init.check("update")
        await self.runtime.update(self.id, resources)

    def _sweep_delivered(self) -> None:
        """Close the stdio of deleted execs whose output has been delivered since."""
        for io in [io for io in self.delivering if not io.delivering()]:
            io.close()
            self.delivering.remove(io)

    async def pids(self) -> list[int]:
        return await self.runtime.ps(self.id)

    async def delete_exec(self, process: Process) -> None:
        """Deliver the exec's output, close its stdio, forget it.

        Every step may be repeated, and the state changes last: a Delete
        cancelled half-way leaves the exec stopped and listed, and the next
        Delete finishes the job (the caller holds :attr:`Process.deleting`).
        """
        process.check("delete")
        self._sweep_delivered()
        if process.io is not None:
            # As containerd's shim does: Delete returns once the output was delivered,
            # or DRAIN_TIMEOUT after it stopped moving.  Output that is only slow to be
            # read (the process's side has ended: it is finite) is still delivered after
            # Delete returned, to its end: the client reads to EOF (containerd's shim
            # likewise leaves its terminal copy running).  Only a source still held open
            # (a daemonized child) is cut off, so no client waits for it forever.
            if not await process.io.wait_output(DRAIN_TIMEOUT) and process.io.delivering():
                log.info("%s deleted; its output goes on being delivered", process.describe())
                self.delivering.append(process.io)
            else:
                process.io.close()
        self.execs.pop(process.exec_id, None)
        process.deleted()

    async def delete_init(self) -> None:
        """``runtime delete``, deliver and close every process's stdio, unmount the rootfs.

        As :meth:`delete_exec`: every step may be repeated (a container the
        runtime no longer knows, a closed stdio, an unmounted rootfs are fine),
        and the init is deleted only once all are done.
        """
        self.init.check("delete")
        try:
            await self.runtime.delete(self.id, force=self.init.state is State.CREATED)
        except OCIRuntimeError as e:
            if not e.not_found:
                raise
        self.background.cancel()
        for io in [*(p.io for p in self.all_processes()), *self.delivering]:
            if io is not None:
                await io.wait_output(DRAIN_TIMEOUT)
                io.close()
        self.delivering.clear()
        if self.rootfs:
            try:
                await trio.to_thread.run_sync(
                    mount.unmount_all, os.path.join(self.bundle, "rootfs")
                )
            except OSError as e:
                log.warning("container %s: unmounting rootfs: %s", self.id, e)
        self.init.deleted()

    def resize(self, process: Process, width: int, height: int) -> None:
        process.check("resize")
        if isinstance(process.io, Console):
            process.io.resize(width, height)

    async def kill_all(self) -> None:
        """SIGKILL everything left in the container (init shared the host pid ns)."""
        try:
            await self.runtime.kill(self.id, 9, all=True)
        except OCIRuntimeError as e:
            log.debug("container %s: kill --all after init exit: %s", self.id, e)
