"""A dress rehearsal of an idle shim, run by the fork server before its first fork.

Why
---
The adaptive interpreter writes into the code objects it runs (its counters
and caches).  Code that a forked shim runs for the first time is written in
that shim, which copies the pages holding it: the daemon's serve path, the
Task service, ttrpc, the event outbox, logging (:mod:`supervisor.cow`,
docs/benchmarks.md "Keeping the fork server's pages shared").  Run here a few
times, before the fork, that code is specialised once in the server and the
shims share it.

What it runs
------------
:func:`rehearse`, one ``trio.run`` each time, in a private temporary directory:

* the real daemon (:func:`supervisor.daemon._serve`, with its Task service,
  reaper, outbox and ttrpc server) on a unix socket there, logging through the
  shim's own handler (:func:`supervisor.shimlog.setup_logging`) to
  ``/dev/null``;
* a client that calls ``Connect``, ``State`` (of no container: NotFound) and
  ``Shutdown``, as containerd does, after which the daemon ends as an idle
  shim does;
* an :class:`~supervisor.events.Outbox` (without a spool: a spool's code is a
  few writes, not worth a file here) forwarding a ``TaskCreate`` and a ``TaskStart`` through
  :class:`~supervisor.daemon.ContainerdEvents` to a fake ``Events/Forward``.

Invariants
----------
* It leaves nothing behind: no thread, fd, file, signal handler or wakeup
  fd (trio restores those at the end of each run); the root logger's handlers
  and level as they were; the process not a child subreaper (the daemon's
  reaper makes it one; :func:`rehearse` undoes that).  It starts no process,
  so its reaper has nothing to reap.  ``tests/unit/test_cow.py`` checks it.
* Bounded by its caller's deadline, and ends before the daemon's delayed code
  snapshot could start (:data:`supervisor.daemon.SNAPSHOT_DELAY`): under
  :data:`DEADLINE`.  Any failure is the caller's to log; the server goes on
  (only an optimisation).
* No container, no OCI runtime, nothing of containerd's: what it runs is what
  every shim runs before and around its first container, not the container's
  own paths (Create, stdio), which would need a runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import trio

from supervisor import daemon, shimlog, ttrpc
from supervisor.api.events import task_pb2 as ev
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.events import Outbox
from supervisor.handover import UpgradeRecord
from supervisor.launch.address import UNIX
from supervisor.reaper import set_child_subreaper
from supervisor.task import SERVICE

#: The rehearsal's namespace and container id (never containerd's: nothing leaves it).
NAME = "supervisor-rehearsal"
#: The code identity its daemon runs under: never a real one, so no code snapshot of it
#: exists (the daemon would open one and hold its fd).
CODE = "supervisor-rehearsal"
#: Seconds a rehearsal may take: well before the daemon's delayed code snapshot.
DEADLINE = daemon.SNAPSHOT_DELAY / 2


@contextlib.contextmanager
def _shim_logging() -> Iterator[None]:
    """The root logger as a shim's (:func:`shimlog.setup_logging`, to /dev/null) within,
    as it was after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:
        root.removeHandler(handler)
    try:
        shimlog.setup_logging(logging.INFO, os.devnull)
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
            if isinstance(handler, shimlog.FifoLogHandler):
                os.close(handler.fd)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _listen(path: str) -> socket.socket:
    """A unix stream socket listening at ``path`` (bound here: trio's ``bind`` of a path
    runs in a worker thread, which would outlive the rehearsal in its cache)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


async def _forward(ctx: ttrpc.CallContext, payload: bytes) -> bytes:
    return b""  # google.protobuf.Empty


async def _round(directory: str) -> None:
    """The daemon and its two peers in ``directory``; what they opened is closed here
    too when they never ran or failed (each closes its own when it ends)."""
    bundle = os.path.join(directory, "bundle")
    os.mkdir(bundle)
    events_path = os.path.join(directory, "events.sock")
    facts = daemon.ShimFacts(NAME, NAME, bundle, UNIX + events_path)
    with contextlib.ExitStack() as cleanup:
        listener = cleanup.enter_context(_listen(os.path.join(directory, "shim.sock")))
        events_listener = cleanup.enter_context(_listen(events_path))
        own = daemon.OwnSocket(listener)
        cleanup.callback(own.remove)  # as the daemon's own end does (``daemon._run``)
        with trio.fail_after(DEADLINE):
            await _play(listener, own, events_listener, facts)


async def _play(listener: socket.socket, own: daemon.OwnSocket,
                events_listener: socket.socket, facts: daemon.ShimFacts) -> None:
    events = ttrpc.Server()  # its log goes where the daemon's does: /dev/null
    events.register(daemon.EVENTS_SERVICE, {"Forward": _forward})
    metadata = {ttrpc.NAMESPACE_KEY: NAME}
    async with trio.open_nursery() as nursery:
        await nursery.start(events.serve,
                            trio.SocketListener(trio.socket.from_stdlib_socket(events_listener)))
        nursery.start_soon(lambda: daemon._serve(listener, facts, own_socket=own,
                                                 record=UpgradeRecord(CODE)))
        async with await ttrpc.connect_unix(listener.getsockname()) as client:
            for _ in range(2):
                await client.call(SERVICE, "Connect", api.ConnectRequest(
                    id=NAME).SerializeToString(), metadata=metadata)
                with contextlib.suppress(ttrpc.RPCError):  # NotFound: no such container
                    await client.call(SERVICE, "State", api.StateRequest(
                        id=NAME).SerializeToString(), metadata=metadata)
            sender = daemon.ContainerdEvents(facts.ttrpc_address)
            outbox = Outbox(sender.send, NAME)
            async with trio.open_nursery() as forwarding:
                forwarding.start_soon(outbox.run)
                for _ in range(2):
                    outbox.publish(ev.TaskCreate(container_id=NAME, bundle=facts.bundle))
                    outbox.publish(ev.TaskStart(container_id=NAME, pid=1))
                    if not await outbox.flush(DEADLINE):
                        raise RuntimeError("the rehearsal's events were not forwarded")
                forwarding.cancel_scope.cancel()
            await sender.aclose()
            await client.call(SERVICE, "Shutdown", api.ShutdownRequest(
                id=NAME).SerializeToString(), metadata=metadata)
        await events.shutdown(0)


def rehearse() -> None:
    """One rehearsal (see the module's docstring); raises what failed, after cleaning up."""
    directory = tempfile.mkdtemp(prefix="supervisor-rehearsal-")
    try:
        with _shim_logging():
            try:
                trio.run(_round, directory)
            finally:
                set_child_subreaper(False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
