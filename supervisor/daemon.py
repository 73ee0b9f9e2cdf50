"""The long-lived shim process: one nursery tree wiring reaper, outbox, Task service and server.

::

    serve()                        trio.run
    └── nursery
        ├── Reaper.run             SIGCHLD -> wait4 -> subscribers
        ├── Outbox.run             events -> containerd's Events/Forward, in order, retried
        ├── TaskService.run_exits  exits -> processes -> TaskExit
        ├── copies                 stdio pipes <-> FIFOs/files (started by the service)
        ├── Upgrader._attempt      an in-place upgrade under way (issue 17)
        └── Server.serve           ttrpc on the socket containerd connects to

The shim ends when the Task service asks for it (``Shutdown`` with no
container left and none reserved): it first removes its socket (so ``start``
can bind a new shim there at once), then gives the outbox a bounded time to
deliver what is pending, stops accepting, lets in-flight calls finish and
exits.  Only a shim that is still listening removes the socket, and only while
it is the inode it started with (:class:`OwnSocket`), so it can only be its
own: ``start`` replaces a socket only when nothing listens on it.

An in-place upgrade (``supervisor.upgrade.v1.Upgrade``, :class:`Upgrader`)
quiesces all of that, writes it down (:mod:`supervisor.handover`) and execs
the code installed now, which builds the same tree from the state
(:func:`serve_adopted`) instead of from a fresh listener: the same pid,
listener, connections, children and spool; the reaper, outbox, copies,
OOM watches and the events client start anew around them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from supervisor import _ksm, _unary, codesnap, errors, handover, introspect, shimlog, ttrpc
from supervisor.api.events import ttrpc_pb2 as events_api
from supervisor.api.upgrade import upgrade_pb2
from supervisor.events import Event, Outbox, Spool
from supervisor.handover import UpgradeRecord
from supervisor.io import Streams
from supervisor.launch import sockfile
from supervisor.launch.address import address_of, socket_path
from supervisor.launch.defaults import LISTEN_FD
from supervisor.launch.flags import Flags
from supervisor.launch.forkclient import code_identity
from supervisor.launch.spool import spool_path, work_dir
from supervisor.reaper import Reaper, run_captured
from supervisor.task import GROUP_SERVICE, RESUMABLE, SERVICE, TaskService, status_of
from supervisor.ttrpc._frame import MessageType, OversizedFrame
from supervisor.ttrpc._protocol import ServerSnapshot
from supervisor.ttrpc._wire import Request

log = logging.getLogger("supervisor.daemon")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
UPGRADE_SERVICE = "supervisor.upgrade.v1.Upgrade"
FORWARD_TIMEOUT = 5.0
SHUTDOWN_GRACE = 5.0
FLUSH_TIMEOUT = 10.0
#: How long a shim that must write its code snapshot waits before it does (its first
#: Create goes first).
SNAPSHOT_DELAY = 2.0
#: How long an upgrade waits for calls, exits, stdio and events to settle (by default).
QUIESCE_TIMEOUT = 10.0
#: How long the installed code's pre-flight check may take.
CHECK_TIMEOUT = 60.0
PR_SET_NAME = 15


class ContainerdEvents:
    """Sends events to containerd's ``Events/Forward``, reconnecting as needed.

    A Forward written is *owed*: until containerd answers it, or its connection
    ends, a retry of the same event waits for that answer again instead of
    sending the event a second time.  So a containerd that is slow or frozen
    (not restarted) gets each event once, however long it takes; only a
    connection that ends with the answer still owed leaves it unknown whether
    containerd took the event, and then it is sent again (at least once).
    An in-place upgrade hands the connection and the Forward owed on it to the
    new code (:meth:`export`, :meth:`adopt`).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: ttrpc.Client | None = None
        self._owed: tuple[int, ttrpc.PendingCall] | None = None  # (event seq, its Forward)

    async def send(self, event: Event) -> None:
        if not self.address:
            raise ConnectionError("TTRPC_ADDRESS is not set: nowhere to send events")
        owed = self._owed
        if owed is not None and (owed[0] != event.seq or self._client is None
                                 or self._client.closed):
            self._drop_owed()
            owed = None
        try:
            if owed is None:
                # Bounded too (a containerd that does not accept or read): a write cut
                # off closes the connection, so nothing half-sent is ever owed.
                with trio.fail_after(FORWARD_TIMEOUT):
                    if self._client is None or self._client.closed:
                        self._client = await ttrpc.connect_unix(socket_path(self.address))
                    pending = await self._client.send(
                        EVENTS_SERVICE, "Forward", _forward_request(event),
                        timeout=FORWARD_TIMEOUT,
                        metadata={ttrpc.NAMESPACE_KEY: event.namespace})
                self._owed = owed = (event.seq, pending)
            assert self._client is not None
            try:
                await self._client.result(owed[1], timeout=FORWARD_TIMEOUT)
            finally:
                if owed[1].answered:
                    self._owed = None
        except (ttrpc.ConnectionEnded, OSError):
            await self.aclose()
            raise

    def _drop_owed(self) -> None:
        owed, self._owed = self._owed, None
        if owed is not None and self._client is not None:
            self._client.abandon(owed[1])

    def export(self) -> handover.EventsState | None:
        """The connection to containerd and the Forward owed on it, for the new code
        (the outbox is paused: nothing sends); ``None`` when there is no connection."""
        client = self._client
        if client is None or client.closed:
            return None
        handed = client.handover()
        snap = handed.snapshot
        if snap.discard or snap.oversized is not None:
            return None  # skipping an oversized answer: the new code simply reconnects
        owed = self._owed
        return {"fd": handed.fd, "unparsed": handover.b64(snap.unparsed),
                "next_stream_id": snap.next_stream_id, "pending": list(snap.pending),
                "abandoned": list(snap.abandoned),
                "owed_seq": owed[0] if owed is not None else -1,
                "owed_stream_id": owed[1].stream_id if owed is not None else 0}

    @classmethod
    def adopt(cls, address: str, state: handover.EventsState | None) -> ContainerdEvents:
        """The sender :meth:`export` described (a new one for ``None``)."""
        sender = cls(address)
        if state is None:
            return sender
        snapshot = ttrpc.ClientSnapshot(
            handover.unb64(state["unparsed"], "events.unparsed"), state["next_stream_id"],
            tuple(state["pending"]), tuple(state["abandoned"]))
        client, pending = ttrpc.Client.adopt(ttrpc.ClientHandover(state["fd"], snapshot))
        sender._client = client
        call = pending.get(state["owed_stream_id"])
        if call is not None and state["owed_seq"] >= 0:
            sender._owed = (state["owed_seq"], call)
        return sender

    async def aclose(self) -> None:
        self._owed = None
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _forward_request(event: Event) -> bytes:
    request = events_api.ForwardRequest()
    envelope = request.envelope
    envelope.timestamp.FromNanoseconds(event.timestamp_ns)
    envelope.namespace = event.namespace
    envelope.topic = event.topic
    envelope.event.type_url = event.type_url
    envelope.event.value = event.payload
    return request.SerializeToString()


@dataclass(frozen=True)
class ShimFacts:
    """What the shim was started with (kept across upgrades)."""

    namespace: str
    first: str  # the container whose start started it
    bundle: str
    ttrpc_address: str
    #: As it first showed (/proc/self/cmdline, /proc/self/comm), kept across execs: read
    #: when the first upgrade needs them (nothing changes them before), not at start-up.
    cmdline: tuple[str, ...] = ()
    comm: str = ""


async def _serve(listener: socket.socket, facts: ShimFacts, *, own_socket: OwnSocket,
                 record: UpgradeRecord, adopted: Adopted | None = None) -> None:
    """The shim, new or (``adopted``) going on from a predecessor's state."""
    shutdown = trio.Event()
    sender = ContainerdEvents(facts.ttrpc_address)
    namespace = facts.namespace
    async with trio.open_nursery() as nursery:
        try:
            reaper = Reaper()
            if adopted is None:
                spool = Spool(spool_path(facts.bundle))
                await nursery.start(reaper.run)
                outbox = Outbox(sender.send, namespace, spool=spool)
            else:
                sender = ContainerdEvents.adopt(facts.ttrpc_address, adopted.state.get("events"))
                outbox = Outbox.adopt(sender.send, namespace, adopted.state["outbox"])
            service = TaskService(
                reaper=reaper,
                outbox=outbox,
                nursery=nursery,
                namespace=namespace,
                request_shutdown=shutdown.set,
                first=facts.first if adopted is None else "",
                bundle_leaving=functools.partial(_bundle_leaving, outbox.spool),
            )
            handed: list[ttrpc.HandedOver] = []
            if adopted is not None:
                await service.adopt(adopted.state["tasks"])
                handed = [_handed_over(c) for c in adopted.state["server"]["connections"]]
            server = ttrpc.Server()
            server.register(SERVICE, service.handlers(), resumable=RESUMABLE)
            server.register(GROUP_SERVICE, service.group_handlers())
            name = listener.getsockname()  # bytes for an abstract socket: never claimed privately
            published = sockfile.published_path(name) if isinstance(name, str) else name
            inspector = introspect.IntrospectService(service, outbox, namespace=namespace,
                                                     address=address_of(published),
                                                     upgrades=record)
            server.register(introspect.SERVICE, inspector.handlers())
            upgrader = Upgrader(server=server, service=service, outbox=outbox, sender=sender,
                                listener=listener,
                                facts=facts, record=record, nursery=nursery,
                                closing=shutdown.is_set)
            server.register(UPGRADE_SERVICE, upgrader.handlers())
            trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
            if adopted is not None:
                service.start_adopted()  # (tasks start_soon'd: nothing runs before a checkpoint)
                # The last step that may fall back: from here on, exits are reaped (the old
                # code would never see them) and containerd is answered.
                adopted.served()
                # Subscribed (the service) before the reaper reaps what exited meanwhile.
                await nursery.start(reaper.run)
            nursery.start_soon(outbox.run)
            nursery.start_soon(service.run_exits)
            await nursery.start(server.adopt, trio_listener, handed)
        except BaseException as e:
            if adopted is not None and not adopted.committed:
                adopted.fail(e)  # execs the old code back, unless this is the old code
            raise
        if adopted is not None:
            log.info("shim %d adopted %d containers and %d connections (upgrade %d, code %s)%s",
                     os.getpid(), len(service.containers), len(handed), record.upgrades,
                     record.code, f"; the upgrade failed: {adopted.error}"
                     if adopted.error else "")
        log.info("shim %d serving namespace %s", os.getpid(), namespace)
        if adopted is not None and adopted.snapshot is not None:
            upgrader.snapshot = adopted.snapshot  # the old code, running again: its own copy
        else:
            nursery.start_soon(upgrader.make_snapshot)
        await shutdown.wait()
        log.info("shutting down")
        own_socket.remove()  # still listening, so still ours; start may bind anew
        # Deliver TaskDelete & co. while containerd is still connected, then close.
        if not await outbox.flush(FLUSH_TIMEOUT):
            log.error("exiting with %d events undelivered", len(outbox.pending))
        await server.shutdown(SHUTDOWN_GRACE)
        await sender.aclose()
        if outbox.spool is not None:
            outbox.spool.close()
        nursery.cancel_scope.cancel()


def _bundle_leaving(spool: Spool | None, bundle: str, others: list[str]) -> None:
    """Before containerd deletes ``bundle``: move what the shim keeps there to another's.

    Only a shim serving several containers keeps going after its first
    bundle is deleted; its log FIFO and event spool follow a container that
    remains (containerd reads each bundle's FIFO only while that container exists).
    """
    if not others:
        return
    handler = shimlog.fifo_handler()
    if handler is not None and os.path.dirname(handler.path) == os.path.abspath(bundle):
        for other in others:
            try:
                handler.reopen(os.path.join(other, "log"))
            except OSError:
                continue
            log.info("logging to %s from now on (%s is deleted)", handler.path, bundle)
            break
    if spool is not None and os.path.dirname(spool.path) == os.path.abspath(work_dir(bundle)):
        for other in others:
            try:
                spool.move(spool_path(other))
            except OSError:
                continue
            break


class OwnSocket:
    """The listening socket's file, removed at most once, and only while it is still ours.

    Its path is where ``start`` published the listener (it reports its private
    claim name, :func:`~supervisor.launch.sockfile.published_path`); its inode is
    pinned now, while the listener still listens, so nobody can have replaced it.
    """

    def __init__(self, listener: socket.socket) -> None:
        try:
            name = listener.getsockname()
        except OSError:
            name = ""
        # Empty for an abstract (bytes) or unnamed ("") socket: nothing to remove.
        self.path = sockfile.published_path(name) if isinstance(name, str) and name else ""
        self._pinned = sockfile.pin(self.path) if self.path else None

    def remove(self) -> None:
        path, self.path = self.path, ""
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            try:
                sockfile.remove_own(path, pinned)  # never a successor's socket
            finally:
                os.close(pinned)


def serve(
    listener: socket.socket,
    *,
    namespace: str,
    container_id: str,
    ttrpc_address: str,
    bundle: str,
    code: str = "",
) -> int:
    """Serve as a new shim until it ends; ``code``: the code identity it runs
    (default: read now, :func:`~supervisor.launch.forkclient.code_identity`)."""
    log.debug("starting shim for %s/%s in %s", namespace, container_id, bundle)
    record = UpgradeRecord(code or code_identity())
    # Known now: containerd may remove the bundle (and its address file) before we exit.
    own_socket = OwnSocket(listener)
    facts = ShimFacts(namespace, container_id, bundle, ttrpc_address)
    return _run(functools.partial(_serve, listener, facts, own_socket=own_socket,
                                  record=record), own_socket)


def _run(main: Callable[[], Awaitable[None]], own_socket: OwnSocket) -> int:
    try:
        trio.run(main)
    except BaseException as e:
        own_socket.remove()  # a no-op if shutdown removed it (a successor's may be there now)
        if not isinstance(e, Exception):
            raise
        log.exception("shim failed")
        return 1
    return 0


def action_serve(flags: Flags, *, code: str = "") -> int:
    """The daemon, cold (:func:`supervisor.shim.main`) or forked (:mod:`supervisor.forkserver`).

    Either way the listening socket is fd 3 and the working directory is the bundle.
    ``code``: the code identity it runs (a fork server's; default: read now).
    """
    shimlog.setup_logging(logging.DEBUG if flags.debug else logging.INFO)
    log.debug("%s", _ksm.apply())
    try:
        listener = socket.socket(fileno=LISTEN_FD)
    except OSError as e:
        log.error("no listening socket on fd %d: %s", LISTEN_FD, e)
        return 1
    return serve(
        listener,
        namespace=flags.namespace,
        container_id=flags.id,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        bundle=os.getcwd(),
        code=code,
    )


# --- in-place upgrades (issue 17) ----------------------------------------------------


class UpgradeAborted(Exception):
    """An attempt given up before the exec; the shim goes on as it was."""


@dataclass
class Adopted:
    """A predecessor's state being adopted (:func:`serve_adopted`)."""

    state: handover.State
    state_fd: int
    snapshot_fd: int
    error: str  # "": new code; else the old code back, and why the new did not take over
    fail: Callable[[BaseException], None]  # before serving: exec the old code back
    on_served: Callable[[], None] = lambda: None
    snapshot: codesnap.Snapshot | None = None
    committed = False  # past served(): no falling back any more

    def served(self) -> None:
        """About to serve: the state and (for new code) the old code's snapshot are not
        needed any more."""
        self.on_served()
        os.close(self.state_fd)
        if self.snapshot is None:
            os.close(self.snapshot_fd)
        self.committed = True


def serve_adopted(state: handover.State, *, state_fd: int, snapshot_fd: int, error: str,
                  fail: Callable[[BaseException], None],
                  served: Callable[[], None] = lambda: None) -> int:
    """Go on serving what a predecessor (this pid, before its exec) handed over.

    ``error`` set: this is the old code back (run from its snapshot) because
    the new code failed with that error; then the snapshot fd is its own copy.
    ``fail(exc)`` is called on any failure before serving (it execs the old
    code back, and returns only if it could not); ``served()`` once serving.
    """
    shim = state["shim"]
    try:
        shimlog.setup_logging(shim["root_log_level"], shim["log_fifo"])
        log.debug("%s", _ksm.apply())  # per memory map: a new one since the exec
        if shim["pid"] != os.getpid():
            raise handover.StateError(f"the state is of pid {shim['pid']}, not this one")
        listener = socket.socket(fileno=state["server"]["listener_fd"])
        own_socket = OwnSocket(listener)
        code = shim["code"] if error else code_identity()
        record = handover.UpgradeRecord(
            code, upgrades=shim["upgrades"] + (0 if error else 1),
            upgrade_attempts=shim["upgrade_attempts"] + 1,
            last_upgrade_error=error, upgraded_at=shim["upgraded_at"] if error else time.time())
        facts = ShimFacts(shim["namespace"], shim["first"], shim["bundle"],
                          shim["ttrpc_address"], tuple(shim["cmdline"]), shim["comm"])
        _set_comm(shim["comm"])
        adopted = Adopted(state, state_fd, snapshot_fd, error, fail, served)
        if error:
            adopted.snapshot = codesnap.Snapshot(snapshot_fd, "")
    except BaseException as e:
        fail(e)
        raise
    return _run(functools.partial(_serve, listener, facts, own_socket=own_socket,
                                  record=record, adopted=adopted), own_socket)


def _shown_as() -> tuple[tuple[str, ...], str]:
    """The command line and name ``ps`` shows for this process."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = tuple(os.fsdecode(a) for a in f.read().split(b"\0")[:-1])
        with open("/proc/self/comm", "rb") as f:
            comm = os.fsdecode(f.read().strip())
    except OSError:
        return tuple(sys.argv), ""
    return cmdline, comm


def _set_comm(name: str) -> None:
    """Show as ``name`` again (``execve`` named us after the interpreter)."""
    if not name:
        return
    import ctypes  # noqa: PLC0415 - only after an upgrade

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(os.fsencode(name)[:15])
    libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def _connection_state(handed: ttrpc.HandedOver) -> handover.ConnectionState:
    if handed.fileno < 0:
        raise UpgradeAborted("a connection that is not a socket cannot be handed over")
    snap = handed.snapshot
    over = snap.oversized
    return {
        "fd": handed.fileno, "unparsed": handover.b64(snap.unparsed),
        "last_stream_id": snap.last_stream_id, "discard": snap.discard,
        "oversized": None if over is None else [over.stream_id, int(over.type), over.flags,
                                                 over.length],
        "spoke": handed.spoke,
        "calls": [{"stream_id": sid, "service": r.service, "method": r.method,
                   "payload": handover.b64(r.payload), "timeout_nano": r.timeout_nano,
                   "metadata": [[k, v] for k, v in r.metadata]} for sid, r in handed.calls],
    }


def _handed_over(state: handover.ConnectionState) -> ttrpc.HandedOver:
    """The connection :func:`_connection_state` described (its socket adopted)."""
    where = f"connection on fd {state['fd']}"
    over = state["oversized"]
    oversized = None
    if over is not None:
        if len(over) != 4 or over[1] not in (1, 2):
            raise handover.StateError(f"{where}: bad oversized frame {over}")
        oversized = OversizedFrame(over[0], MessageType(over[1]), over[2], over[3])
    if state["discard"] < 0 or (state["discard"] and oversized is None):
        raise handover.StateError(f"{where}: bad skip state")
    calls = []
    for c in state["calls"]:
        if any(len(pair) != 2 for pair in c["metadata"]):
            raise handover.StateError(f"{where}: call {c['stream_id']}: bad metadata")
        calls.append((c["stream_id"], Request(
            c["service"], c["method"], handover.unb64(c["payload"], f"{where}: call payload"),
            c["timeout_nano"], tuple((k, v) for k, v in c["metadata"]))))
    sock = socket.socket(fileno=state["fd"])
    if sock.type != socket.SOCK_STREAM:
        raise handover.StateError(f"{where}: not a stream socket")
    return ttrpc.HandedOver(
        trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
        ServerSnapshot(handover.unb64(state["unparsed"], f"{where}: unparsed bytes"),
                       state["last_stream_id"], state["discard"], oversized),
        tuple(calls), state["spoke"])


async def preflight(reaper: Reaper, timeout: float = CHECK_TIMEOUT) -> dict[str, Any]:
    """Run the installed code's ``--check`` (:mod:`supervisor.upgrade`) as a child:
    its answer, or :class:`errors.Unavailable` with what went wrong."""
    try:
        status, out, err = await run_captured(reaper, handover.check_argv(), timeout=timeout,
                                              limit=1 << 20, stderr=True)
    except OSError as e:
        raise errors.Unavailable(f"cannot run the installed code: {e}") from e
    tail = err.decode(errors="replace").strip()[-2000:]
    if status != 0:
        why = f"exit status {status}" if status >= 0 else f"no answer within {timeout:g}s"
        raise errors.Unavailable(f"the installed code fails its check ({why}): {tail}")
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
        if not (isinstance(answer, dict) and isinstance(answer.get("code"), str)
                and isinstance(answer.get("formats"), list)):
            raise TypeError(f"not an answer: {answer!r:.200}")
    except (ValueError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise errors.Unavailable(f"the installed code's check said nothing usable: {e}; "
                                 f"{tail}") from None
    return answer


class Upgrader:
    """``supervisor.upgrade.v1.Upgrade``: the old code's side of an in-place upgrade.

    Design
    ------
    ``Upgrade`` refuses (FAILED_PRECONDITION) while an attempt is under way
    or the shim is ending, or while a container is being created;
    (UNAVAILABLE) when there is no snapshot of the running code to fall back
    to, or the installed code fails its pre-flight check (:func:`preflight`).
    Otherwise it answers at once and the attempt goes on in the background:

    1. the ttrpc server quiesces (:meth:`ttrpc.Server.quiesce`: accepting and
       reading stop, calls in flight finish, ``Wait`` calls are handed over);
    2. exits already reaped are processed and the reaper is paused
       (:meth:`TaskService.settle_exits`); then every process's stdio is
       paused at a chunk boundary, and the outbox (a Forward under way is
       cancelled: written, it stays owed on containerd's connection, which is
       handed over with it; :class:`ContainerdEvents`), its spool synced;
    3. the state (:mod:`supervisor.handover`) goes to a memfd, close-on-exec is
       cleared on the fds it names, and the shim execs the installed code
       (``python -I -m supervisor.upgrade --adopt ...``), which adopts it all
       (:func:`serve_adopted`), or execs this code back from its snapshot.

    Steps 1-2 are bounded by the request's timeout (default
    :data:`QUIESCE_TIMEOUT`); if they do not finish, or anything fails before
    the exec, everything resumes in reverse order and the shim serves on as
    before, the attempt counted and its error recorded
    (:class:`~supervisor.handover.UpgradeRecord`): nothing is lost.
    """

    def __init__(self, *, server: ttrpc.Server, service: TaskService, outbox: Outbox,
                 sender: ContainerdEvents, listener: socket.socket, facts: ShimFacts,
                 record: UpgradeRecord, nursery: trio.Nursery, closing: Callable[[], bool]) -> None:
        self.server = server
        self.service = service
        self.outbox = outbox
        self.sender = sender
        self.listener = listener
        self.facts = facts
        self.record = record
        self.nursery = nursery
        self.closing = closing
        self.snapshot: codesnap.Snapshot | None = None
        self.snapshot_error = "not made yet"
        self._snapshot_lock = trio.Lock()
        self.under_way = False

    def handlers(self) -> dict[str, _unary.Handler]:
        return _unary.handlers(UPGRADE_SERVICE,
                               [("Upgrade", upgrade_pb2.UpgradeRequest, self.upgrade)],
                               status_of=status_of, log=log)

    async def make_snapshot(self) -> None:
        """Make sure a copy of the running code exists and hold it (off the hot path).

        Opening one that exists is two syscalls, done here; writing one (the first
        shim of its code) waits :data:`SNAPSHOT_DELAY` and runs in a worker thread,
        unless an Upgrade asks for it first (:meth:`_write_snapshot`).  Measured: a
        worker thread started while the first Create ran delayed ``/tasks/create``
        by ~15 ms (bench/compare, 2026-11-29).
        """
        try:
            self.snapshot = codesnap.open_existing(self.record.code)
        except OSError as e:
            self.snapshot_error = str(e)
        if self.snapshot is None:
            await trio.sleep(SNAPSHOT_DELAY)
            await self._write_snapshot()

    async def _write_snapshot(self) -> None:
        """Write (or open) the copy of the running code, once at a time; on failure
        :attr:`snapshot_error` says why (the code on disk changed: no copy can be made)."""
        async with self._snapshot_lock:
            if self.snapshot is not None:
                return
            try:
                self.snapshot = await trio.to_thread.run_sync(codesnap.ensure,
                                                              self.record.code)
                self.snapshot_error = ""
            except (OSError, ValueError) as e:
                self.snapshot_error = str(e)
                log.warning("no copy of the running code (upgrades are refused): %s", e)

    def _ending(self) -> bool:
        return self.closing() or self.service.group.closing

    async def upgrade(self, r: upgrade_pb2.UpgradeRequest) -> upgrade_pb2.UpgradeResponse:
        if self.under_way:
            raise errors.FailedPrecondition("an upgrade of this shim is already under way")
        if self._ending():
            raise errors.FailedPrecondition("the shim is ending")
        timeout = r.quiesce_timeout_seconds or QUIESCE_TIMEOUT
        if not 0 < timeout < math.inf:
            raise errors.InvalidArgument(f"quiesce_timeout_seconds {timeout} is not positive")
        self.under_way = True
        try:
            if self.snapshot is None:
                await self._write_snapshot()  # asked before the shim made it on its own
            if self.snapshot is None:
                raise errors.Unavailable(
                    f"no copy of the running code to fall back to ({self.snapshot_error})")
            why = self.service.handover_refusal()
            if why is not None:
                raise errors.FailedPrecondition(why)
            answer = await preflight(self.service.reaper)
            if handover.FORMAT not in answer["formats"]:
                raise errors.Unavailable(
                    f"the installed code loads state formats {answer['formats']}, "
                    f"not {handover.FORMAT}")
        except BaseException:
            self.under_way = False
            raise
        to_code = str(answer["code"])
        log.info("upgrade requested: code %s -> %s", self.record.code, to_code)
        self.nursery.start_soon(self._attempt, timeout)
        return upgrade_pb2.UpgradeResponse(
            pid=os.getpid(), upgrade_attempts=self.record.upgrade_attempts,
            from_code=self.record.code, to_code=to_code)

    async def _attempt(self, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        reaper_paused = outbox_paused = False
        paused: list[Streams] = []
        try:
            if not await self.server.quiesce(timeout):
                raise UpgradeAborted(f"calls in flight did not finish within {timeout:g}s")
            if self._ending():
                raise UpgradeAborted("the shim began to end")
            with trio.move_on_at(deadline) as waited:
                reaper_paused = True
                await self.service.settle_exits()
                for streams in self._streams():
                    paused.append(streams)
                    await streams.pause()
                outbox_paused = True
                await self.outbox.pause()
            if waited.cancelled_caught:
                raise UpgradeAborted(
                    f"exits, stdio and events did not settle within {timeout:g}s")
            why = self.service.handover_refusal()
            if why is not None:
                raise UpgradeAborted(why)
            if self._ending():  # a reservation lapsed meanwhile: a closing shim is never handed
                raise UpgradeAborted("the shim began to end")
            state = self.state()  # no checkpoint from here to the exec
            self._exec(state)
        except Exception as e:
            error = str(e) or type(e).__name__
            log.warning("upgrade called off, serving on: %s", error)
            if outbox_paused:
                self.outbox.resume()
            for streams in reversed(paused):
                streams.resume()
            if reaper_paused:
                self.service.reaper.resume()
            self.server.resume()  # a no-op unless quiescing (quiesce may have timed out)
            self.record.failed(error)
        finally:
            self.under_way = False

    def _streams(self) -> list[Streams]:
        """The stdio of every process (a process without stdio has none)."""
        return [process.io for container in self.service.containers.values()
                for process in container.all_processes() if process.io is not None]

    def state(self) -> handover.State:
        """Everything the new code needs (the shim is quiesced)."""
        if not self.facts.cmdline:  # a shim's first upgrade: how it shows, read now
            cmdline, comm = _shown_as()
            self.facts = replace(self.facts, cmdline=cmdline, comm=comm)
        handler = shimlog.fifo_handler()
        connections = [_connection_state(h) for h in self.server.export()]
        events = self.sender.export()
        fds = {self.listener.fileno(), *(c["fd"] for c in connections)}
        if events is not None:
            fds.add(events["fd"])
        for streams in self._streams():
            fds.update(streams.fds())
        record = self.record
        return {
            "format": handover.FORMAT,
            "written_at": time.time(),
            "shim": {
                "pid": os.getpid(), "namespace": self.facts.namespace,
                "first": self.facts.first, "bundle": self.facts.bundle,
                "ttrpc_address": self.facts.ttrpc_address, "code": record.code,
                "upgrades": record.upgrades, "upgrade_attempts": record.upgrade_attempts,
                "last_upgrade_error": record.last_upgrade_error,
                "upgraded_at": record.upgraded_at,
                "root_log_level": logging.getLogger().level,
                "log_fifo": handler.path if handler is not None else "",
                "cmdline": list(self.facts.cmdline), "comm": self.facts.comm,
            },
            "server": {"listener_fd": self.listener.fileno(), "connections": connections},
            "tasks": self.service.export(),
            "outbox": self.outbox.export(),
            "events": events,
            "fds": sorted(fds),
        }

    def _exec(self, state: handover.State) -> None:
        """Exec the installed code with ``state``; returns only by raising."""
        assert self.snapshot is not None
        fd = handover.dump(state)
        try:
            handover.clear_cloexec([*state["fds"], fd, self.snapshot.fd])
            argv = handover.adopt_argv(fd, self.snapshot.fd, list(self.facts.cmdline))
            log.info("upgrading: exec %s", " ".join(argv))
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.execv(argv[0], argv)
        except BaseException:
            os.close(fd)
            raise

