"""The long-lived shim process: one nursery tree wiring reaper, outbox, Task service and server.

::

    serve()                        trio.run
    └── nursery
        ├── Reaper.run             SIGCHLD -> wait4 -> subscribers
        ├── Outbox.run             events -> containerd's Events/Forward, in order, retried
        ├── TaskService.run_exits  exits -> processes -> TaskExit
        ├── copies                 stdio pipes <-> FIFOs/files (started by the service)
        └── Server.serve           ttrpc on the socket containerd connects to

The shim ends when the Task service asks for it (``Shutdown`` with no
container left and none reserved): it first removes its socket (so ``start``
can bind a new shim there at once), then gives the outbox a bounded time to
deliver what is pending, stops accepting, lets in-flight calls finish and
exits.  Only a shim that is still listening removes the socket, and only while
it is the inode it started with (:class:`OwnSocket`), so it can only be its
own: ``start`` replaces a socket only when nothing listens on it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket

import trio

from supervisor import _ksm, introspect, shimlog, ttrpc
from supervisor.api.events import ttrpc_pb2 as events_api
from supervisor.events import Event, Outbox, Spool
from supervisor.launch import sockfile
from supervisor.launch.address import address_of, socket_path
from supervisor.launch.defaults import LISTEN_FD
from supervisor.launch.flags import Flags
from supervisor.launch.spool import spool_path, work_dir
from supervisor.reaper import Reaper
from supervisor.task import GROUP_SERVICE, SERVICE, TaskService

log = logging.getLogger("supervisor.daemon")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
SHUTDOWN_GRACE = 5.0
FLUSH_TIMEOUT = 10.0


class ContainerdEvents:
    """Sends events to containerd's ``Events/Forward``, reconnecting as needed."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: ttrpc.Client | None = None

    async def send(self, event: Event) -> None:
        if not self.address:
            raise ConnectionError("TTRPC_ADDRESS is not set: nowhere to send events")
        if self._client is None or self._client.closed:
            self._client = await ttrpc.connect_unix(socket_path(self.address))
        request = events_api.ForwardRequest()
        envelope = request.envelope
        envelope.timestamp.FromNanoseconds(event.timestamp_ns)
        envelope.namespace = event.namespace
        envelope.topic = event.topic
        envelope.event.type_url = event.type_url
        envelope.event.value = event.payload
        try:
            await self._client.call(
                EVENTS_SERVICE,
                "Forward",
                request.SerializeToString(),
                timeout=FORWARD_TIMEOUT,
                metadata={ttrpc.NAMESPACE_KEY: event.namespace},
            )
        except (ttrpc.ConnectionEnded, OSError):
            await self.aclose()
            raise

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def _serve(listener: socket.socket, *, namespace: str, ttrpc_address: str, bundle: str,
                 first: str, own_socket: OwnSocket) -> None:
    shutdown = trio.Event()
    sender = ContainerdEvents(ttrpc_address)
    spool = Spool(spool_path(bundle))
    async with trio.open_nursery() as nursery:
        reaper = Reaper()
        await nursery.start(reaper.run)
        outbox = Outbox(sender.send, namespace, spool=spool)
        nursery.start_soon(outbox.run)
        service = TaskService(
            reaper=reaper,
            outbox=outbox,
            nursery=nursery,
            namespace=namespace,
            request_shutdown=shutdown.set,
            first=first,
            bundle_leaving=functools.partial(_bundle_leaving, spool),
        )
        nursery.start_soon(service.run_exits)
        server = ttrpc.Server()
        server.register(SERVICE, service.handlers())
        server.register(GROUP_SERVICE, service.group_handlers())
        name = listener.getsockname()  # bytes for an abstract socket: never claimed privately
        published = sockfile.published_path(name) if isinstance(name, str) else name
        inspector = introspect.IntrospectService(service, outbox, namespace=namespace,
                                                 address=address_of(published))
        server.register(introspect.SERVICE, inspector.handlers())
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        await nursery.start(server.serve, trio_listener)
        log.info("shim %d serving namespace %s", os.getpid(), namespace)
        await shutdown.wait()
        log.info("shutting down")
        own_socket.remove()  # still listening, so still ours; start may bind anew
        # Deliver TaskDelete & co. while containerd is still connected, then close.
        if not await outbox.flush(FLUSH_TIMEOUT):
            log.error("exiting with %d events undelivered", len(outbox.pending))
        await server.shutdown(SHUTDOWN_GRACE)
        await sender.aclose()
        spool.close()
        nursery.cancel_scope.cancel()


def _bundle_leaving(spool: Spool, bundle: str, others: list[str]) -> None:
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
    if os.path.dirname(spool.path) == os.path.abspath(work_dir(bundle)):
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
) -> int:
    log.debug("starting shim for %s/%s in %s", namespace, container_id, bundle)
    # Known now: containerd may remove the bundle (and its address file) before we exit.
    own_socket = OwnSocket(listener)
    try:
        trio.run(functools.partial(
            _serve, listener, namespace=namespace, ttrpc_address=ttrpc_address, bundle=bundle,
            first=container_id, own_socket=own_socket))
    except BaseException as e:
        own_socket.remove()  # a no-op if shutdown removed it (a successor's may be there now)
        if not isinstance(e, Exception):
            raise
        log.exception("shim failed")
        return 1
    return 0


def action_serve(flags: Flags) -> int:
    """The daemon, cold (:func:`supervisor.shim.main`) or forked (:mod:`supervisor.forkserver`).

    Either way the listening socket is fd 3 and the working directory is the bundle.
    """
    shimlog.setup_logging(flags.debug)
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
    )
