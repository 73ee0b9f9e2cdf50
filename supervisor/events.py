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

Invariants
----------
* The queue is FIFO and the forwarder is the only consumer.
* ``delivered + pending == published`` at all times.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from google.protobuf.message import Message

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


# (event) -> None on acceptance; raise on any failure.
Sender = Callable[[Event], Awaitable[None]]


@dataclass
class OutboxStats:
    published: int = 0
    delivered: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=64))


class Outbox:
    """An ordered queue of task events with one forwarder that never gives up."""

    def __init__(self, send: Sender, namespace: str) -> None:
        self._send = send
        self.namespace = namespace
        self._queue: deque[Event] = deque()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._empty.set()
        self.stats = OutboxStats()

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
            seq=self.stats.published,
            timestamp_ns=time.time_ns(),
            namespace=self.namespace,
            topic=topic or TOPICS[type(event)],
            type_url=typeurls.type_url(event),
            payload=event.SerializeToString(),
        )
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
            self.stats.delivered += 1
            self.stats.recent.append(head)
            log.debug("event forwarded %s seq %d", head.topic, head.seq)

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was accepted; False if ``timeout`` ran out."""
        with trio.move_on_after(timeout):
            while self._queue:
                await self._empty.wait()
            return True
        return False
