"""The event outbox: every task event, in order, to containerd, whatever happens to it.

Design
------
:meth:`Outbox.publish` is synchronous: it stamps the event (time, namespace,
topic), appends it to the queue and returns.  Callers publish in the order the
things happened (TaskStart before TaskExit, an exec's exit before its init's)
and that order is the order of delivery.  One forwarder task
(:meth:`Outbox.run`) sends the head of the queue through the ``send``
coroutine it was given (the shim wires it to containerd's
``Events/Forward`` over ttrpc) and removes it only once containerd accepted
it.  A failure (containerd down, restarting, slow) is retried with capped
exponential backoff for as long as the shim lives: there is no retry limit,
so an event is never dropped, and never overtaken by a later one.

Delivery is at-least-once: an event whose acknowledgement was lost is sent
again.

Durability
----------
With a :class:`Spool`, every event is written to a file (msgpack records)
before ``publish`` returns -- so it survives the shim being killed -- and the
file is fsync'd before the event is forwarded (one fsync covers every event
queued so far), so what containerd may have seen survives the machine
crashing too.  An ``ack`` record is appended once
containerd accepted it; when nothing is pending the file is truncated.  A shim
that starts in a bundle whose spool holds unacknowledged events (the previous
shim was killed, or replaced by an upgrade) forwards those first, in their
original order and with their original timestamps.  If the spool cannot be
written (full disk, read-only file system) the outbox logs a warning once and
goes on in memory: nothing is dropped, only durability is lost.

Invariants
----------
* The queue is FIFO and the forwarder is the only consumer.
* ``delivered + pending == published + replayed`` at all times.
* An event is in the spool before it is in the queue.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgpack
import trio
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from supervisor.api import typeurls
from supervisor.api.events import task_pb2 as ev

log = logging.getLogger("supervisor.events")

TOPICS: dict[type[Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
    ev.TaskCheckpointed: "/tasks/checkpointed",
}

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 0.5


@dataclass
class Event:
    """One stamped event, ready to forward."""

    seq: int
    timestamp_ns: int
    namespace: str
    topic: str
    type_url: str
    payload: bytes
    attempts: int = 0
    first_error: str = ""


def describe(event: Event) -> str:
    """The event's fields on one line (for logs and people)."""
    try:
        message = typeurls.message_class(event.type_url).FromString(event.payload)
    except (ValueError, DecodeError):
        return f"<{len(event.payload)} bytes of {event.type_url}>"
    return text_format.MessageToString(message, as_one_line=True)


# (event) -> None on acceptance; raise on any failure.
Sender = Callable[[Event], Awaitable[None]]


@dataclass
class OutboxStats:
    published: int = 0
    replayed: int = 0
    delivered: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    spool_error: str = ""
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=64))


_ADD, _ACK = 1, 2


class Spool:
    """The on-disk record of events not yet accepted by containerd.

    Records are msgpack arrays: ``[1, seq, timestamp_ns, namespace, topic,
    type_url, payload]`` when an event is published, ``[2, seq]`` when it was
    accepted.  A torn last record (the shim died mid-write) is ignored.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.error = ""
        self._fd = -1
        self._live = 0  # events added and not acked since the last truncate
        self._dirty = False

    def _open(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        return self._fd

    def load(self) -> list[Event]:
        """Events added and never acknowledged, in order."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("event spool %s unreadable: %s", self.path, e)
            return []
        pending: dict[int, Event] = {}
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        try:
            for record in unpacker:
                if not isinstance(record, list) or not record:
                    continue
                if record[0] == _ADD and len(record) == 7:
                    _, seq, ts, ns, topic, type_url, payload = record
                    pending[seq] = Event(seq, ts, ns, topic, type_url, payload)
                elif record[0] == _ACK and len(record) == 2:
                    pending.pop(record[1], None)
        except (ValueError, msgpack.UnpackException) as e:
            log.warning("event spool %s: ignoring a damaged tail: %s", self.path, e)
        self._live = len(pending)
        return [pending[k] for k in sorted(pending)]

    def _fail(self, e: OSError) -> None:
        self.error = f"{self.path}: {e.strerror or e}"
        log.warning("event spool unwritable (%s); keeping events in memory only", self.error)

    def _write(self, record: list[object]) -> None:
        if self.error:
            return
        try:
            os.write(self._open(), msgpack.packb(record, use_bin_type=True))
        except OSError as e:
            self._fail(e)

    def add(self, event: Event) -> None:
        self._live += 1
        self._dirty = True
        self._write([_ADD, event.seq, event.timestamp_ns, event.namespace, event.topic,
                     event.type_url, event.payload])

    @property
    def dirty(self) -> bool:
        return self._dirty and not self.error

    def sync(self) -> None:
        """fsync what was added (blocking: call it from a worker thread)."""
        if not self.dirty:
            return
        self._dirty = False
        try:
            os.fsync(self._open())
        except OSError as e:
            self._fail(e)

    def ack(self, seq: int) -> None:
        self._live -= 1
        if self._live <= 0 and not self.error:
            self._live = 0
            try:
                os.ftruncate(self._open(), 0)
                return
            except OSError as e:
                log.debug("could not truncate event spool: %s", e)
        # Losing an ack costs a duplicate (at-least-once), never an event: no fsync.
        self._write([_ACK, seq])

    def move(self, path: str) -> None:
        """Keep the spool at ``path`` from now on (its directory is about to be deleted)."""
        os.rename(self.path, path)  # the open fd follows the file
        self.path = path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Outbox:
    """An ordered queue of task events with one forwarder that never gives up."""

    def __init__(self, send: Sender, namespace: str, *, spool: Spool | None = None) -> None:
        self._send = send
        self.namespace = namespace
        self._queue: deque[Event] = deque()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._empty.set()
        self.stats = OutboxStats()
        self.spool = spool
        self._next_seq = 1
        if spool is not None:
            replay = spool.load()
            if replay:
                log.info("replaying %d undelivered events from %s", len(replay), spool.path)
                self._queue.extend(replay)
                self.stats.replayed = len(replay)
                self._next_seq = replay[-1].seq + 1
                self._empty = trio.Event()

    @property
    def pending(self) -> list[Event]:
        return list(self._queue)

    def oldest_age(self) -> float:
        if not self._queue:
            return 0.0
        return max(0.0, time.time() - self._queue[0].timestamp_ns / 1e9)

    def publish(self, event: Message, *, topic: str | None = None) -> Event:
        """Queue ``event`` for containerd (never blocks, never fails)."""
        self.stats.published += 1
        item = Event(
            seq=self._next_seq,
            timestamp_ns=time.time_ns(),
            namespace=self.namespace,
            topic=topic or TOPICS[type(event)],
            type_url=typeurls.type_url(event),
            payload=event.SerializeToString(),
        )
        self._next_seq += 1
        if self.spool is not None:
            self.spool.add(item)
            self.stats.spool_error = self.spool.error
        self._queue.append(item)
        log.debug("event queued %s seq %d", item.topic, item.seq)
        if self._empty.is_set():
            self._empty = trio.Event()
        self._wakeup.set()
        return item

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward events in order, retrying each until it is accepted."""
        task_status.started()
        backoff = INITIAL_BACKOFF
        while True:
            if not self._queue:
                self._empty.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if self.spool is not None and self.spool.dirty:
                await trio.to_thread.run_sync(self.spool.sync)
            head.attempts += 1
            try:
                await self._send(head)
            except Exception as e:  # any failure: keep it and try again later
                reason = f"{type(e).__name__}: {e}"
                if head.attempts == 1 or reason != self.stats.last_error:
                    log.warning("forwarding %s (seq %d) failed, will retry: %s",
                                head.topic, head.seq, reason)
                head.first_error = head.first_error or reason
                self.stats.last_error = reason
                self.stats.last_error_at = time.time()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = INITIAL_BACKOFF
            self._queue.popleft()
            if self.spool is not None:
                self.spool.ack(head.seq)
            self.stats.delivered += 1
            self.stats.recent.append(head)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event forwarded %s seq %d {%s}", head.topic, head.seq, describe(head))

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was accepted; False if ``timeout`` ran out."""
        with trio.move_on_after(timeout):
            while self._queue:
                await self._empty.wait()
            return True
        return False
